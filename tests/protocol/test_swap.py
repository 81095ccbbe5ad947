"""Swap (machine setting ``swap_pages``): anonymous reclaim to swap, swap-in faults, slot
freeing, fork sharing swap entries (spec §5, §3.2.1, §1.4.1, Appendix B, §8.5)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmsvc.mm.swapfile import swap_info
from mmsvc.mm.types import Advice
from mmsvc.mm.vma import VM, Vma
from mmsvc.store import keys
from tests.protocol.world import World, race_once, sub


async def slots(w: World) -> tuple[int, dict[int, int], int]:
    """(slots in use, slot -> swap ptes, pages in the swap cache)."""
    info = await swap_info(w.store, await w.kernel.machine(w.mid))
    return info.used, info.counts, len(info.cache)


async def anon(w: World, pages: int, name: str = "m") -> int:
    """A process with `pages` written anonymous pages on the inactive anon list."""
    p = await w.proc()
    await w.mmap(p, name, pages)
    await w.touch(p, name)
    await w.drain()
    return p


async def miss_mlock(w: World, pid: int, name: str) -> None:
    """VM_LOCKED (and locked_vm) stored on the VMA without the mlock walk: the state a missed
    mlock leaves (S16's undercount, §5.4), on anonymous pages."""
    mm_key = keys.mm(w.mid, pid)
    addr, pages = w.maps[(pid, name)]
    for vid, raw in (await w.store.client.hgetall(f"{mm_key}:vma")).items():
        v = Vma.from_json(raw)
        if v.start * 4096 == addr:
            await w.store.client.hset(f"{mm_key}:vma", vid,
                                      replace(v, flags=v.flags | VM.LOCKED).to_json())
    await w.store.client.hincrby(f"{mm_key}:info", "locked_vm", pages)


def present(pages: list[Any]) -> list[bool]:
    return [pg.present for pg in pages]


def test_reclaim_swaps_out_unlocked_anon_pages_and_swap_in_brings_them_back(run: Any) -> None:
    async def s(w: World) -> None:
        p = await anon(w, 4)
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert (res.scanned, res.reclaimed, res.culled) == (4, 4, 0)
        assert (await w.delta())["inactive_anon"] == 0
        assert present(await w.pages(p, "m")) == [False] * 4  # swap entries: not present
        assert await slots(w) == (4, {1: 1, 2: 1, 3: 1, 4: 1}, 0)
        info = await w.kernel.meminfo(w.mid)
        assert (info["SwapTotal"], info["SwapFree"]) == (64 * 4, 60 * 4)
        assert sub(await w.kernel.vmstat(w.mid), pswpout=4, pswpin=0) == {
            "pswpout": 4, "pswpin": 0}
        assert (await w.kernel.check(w.mid, True)).ok
        # swap-in: a read fault maps the page again (read-only) and frees the slot
        await w.touch(p, "m", 0, 2, write=False)
        assert present(await w.pages(p, "m")) == [True, True, False, False]
        assert await slots(w) == (2, {3: 1, 4: 1}, 0)
        # a write fault on a swapped-in page reuses it (exclusive: no copy)
        await w.touch(p, "m", 0, 1)
        await w.touch(p, "m", 2, 4)  # write faults on swap entries
        await w.drain()
        assert await slots(w) == (0, {}, 0)
        assert (await w.delta())["inactive_anon"] == 4
        assert (await w.kernel.vmstat(w.mid))["pswpin"] == 4

    run(s, swap_pages=64)


def test_reclaim_culls_pages_of_locked_vmas_instead_of_swapping_them(run: Any) -> None:
    """A missed mlock (page on the inactive anon list, VM_LOCKED vma) is repaired by reclaim
    (§5.2: page_referenced_one mlocks, the page is culled), never swapped."""
    async def s(w: World) -> None:
        p = await anon(w, 4)
        await w.mmap(p, "l", 2)
        await w.touch(p, "l")
        await w.drain()
        await miss_mlock(w, p, "l")
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert (res.scanned, res.reclaimed, res.culled) == (6, 4, 2)
        await w.drain()
        d = await w.delta()
        assert sub(d, mlocked=2, culled=2, nr_mlock=2, nr_unev=2) == {
            "mlocked": 2, "culled": 2, "nr_mlock": 2, "nr_unev": 2}
        assert present(await w.pages(p, "l")) == [True, True]
        assert await slots(w) == (4, {1: 1, 2: 1, 3: 1, 4: 1}, 0)

    run(s, swap_pages=64)


def test_swap_in_in_a_locked_vma_mlocks_through_the_rmap_hook(run: Any) -> None:
    """mlock of a swapped-out range: populate faults swap the pages in; page_add_anon_rmap's
    hook mlocks each (§3.2.1), lru_cache_add then culls it: Δmlocked 1, Δculled 1, count 1."""
    async def s(w: World) -> None:
        p = await anon(w, 4)
        assert (await w.kernel.reclaim(w.mid, None, None, 32)).reclaimed == 4
        before = await w.delta()
        await w.mlock(p, "m")
        await w.drain()
        d = await w.delta()
        assert (d["mlocked"] - before["mlocked"], d["culled"] - before["culled"]) == (4, 4)
        assert (d["nr_mlock"], d["nr_unev"], d["inactive_anon"]) == (4, 4, 0)
        for page in await w.pages(p, "m"):
            assert (page.present, page.mlocked, page.unevictable, page.mlock_count) == (
                True, True, True, 1)
        assert await slots(w) == (0, {}, 0)
        assert (await w.kernel.vmstat(w.mid))["pswpin"] == 4

    run(s, swap_pages=64)


def test_fork_shares_swap_entries_and_both_swap_in_the_same_page(run: Any) -> None:
    async def s(w: World) -> None:
        p = await anon(w, 2)
        assert (await w.kernel.reclaim(w.mid, None, None, 32)).reclaimed == 2
        c = await w.kernel.fork(w.mid, p)
        w.maps[(c, "m")] = w.maps[(p, "m")]
        assert await slots(w) == (2, {1: 2, 2: 2}, 0)  # swap_duplicate per child pte
        await w.touch(p, "m", 0, 1, write=False)
        # the parent's swap-in leaves the page in the swap cache: the child still names it
        assert await slots(w) == (2, {1: 1, 2: 2}, 1)
        assert (await w.kernel.check(w.mid, True)).ok
        await w.touch(c, "m", 0, 1, write=False)
        pp, cp = (await w.pages(p, "m"))[0], (await w.pages(c, "m"))[0]
        assert (pp.pfn, pp.mapcount) == (cp.pfn, 2)  # one page, shared read-only
        assert await slots(w) == (1, {2: 2}, 0)  # slot 1 freed with its swap cache page
        assert (await w.kernel.vmstat(w.mid))["pswpin"] == 1
        await w.touch(p, "m", 0, 1)  # COW: the parent gets a copy
        await w.touch(c, "m", 0, 1)  # the child's page is exclusive now: reused
        await w.drain()
        pp, cp = (await w.pages(p, "m"))[0], (await w.pages(c, "m"))[0]
        assert pp.pfn != cp.pfn and (pp.mapcount, cp.mapcount) == (1, 1)
        assert (await w.kernel.check(w.mid, True)).ok
        await w.kernel.exit(w.mid, c)  # zap of the child's swap pte: one reference less
        assert await slots(w) == (1, {2: 1}, 0)
        await w.munmap(p, "m")
        assert await slots(w) == (0, {}, 0)
        info = await w.kernel.meminfo(w.mid)
        assert info["SwapFree"] == info["SwapTotal"]

    run(s, swap_pages=64)


def test_swap_full_stops_anon_reclaim_without_error(run: Any) -> None:
    async def s(w: World) -> None:
        p = await anon(w, 4)
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert (res.scanned, res.reclaimed) == (4, 2)  # add_to_swap fails for the others
        assert present(await w.pages(p, "m")) == [False, False, True, True]
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert (res.scanned, res.reclaimed) == (0, 0)  # no swap left: anon lists not scanned
        assert (await w.kernel.meminfo(w.mid))["SwapFree"] == 0
        await w.touch(p, "m", 0, 1, write=False)  # a slot comes free: anon reclaim resumes
        await w.drain()
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert res.reclaimed == 1

    run(s, swap_pages=2)


def test_madv_pageout_swaps_anon_pages_out_only_with_swap(run: Any) -> None:
    async def s(w: World) -> None:
        p = await anon(w, 4)
        await w.kernel.madvise(w.mid, p, *w.rng(p, "m", 0, 2), Advice.MADV_PAGEOUT)
        assert present(await w.pages(p, "m")) == [False, False, True, True]
        assert await slots(w) == (2, {1: 1, 2: 1}, 0)
        await w.munmap(p, "m", 0, 1)  # zap of a swap pte frees its slot
        assert await slots(w) == (1, {2: 1}, 0)

    run(s, swap_pages=8)


def test_without_swap_anon_pages_stay_and_nothing_changes(run: Any) -> None:
    async def s(w: World) -> None:
        p = await anon(w, 4)
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert (res.scanned, res.reclaimed, res.culled) == (0, 0, 0)  # anon lists not scanned
        await w.kernel.madvise(w.mid, p, *w.rng(p, "m"), Advice.MADV_PAGEOUT)
        assert present(await w.pages(p, "m")) == [True] * 4  # add_to_swap fails: kept
        await w.drain()  # putback went through the lru_add batch
        vm = await w.kernel.vmstat(w.mid)
        # activate_locked_split: the pages go back to the active list
        assert "pswpout" not in vm and (await w.delta())["inactive_anon"] == 0
        assert [pg.lru_list for pg in await w.pages(p, "m")] == ["active_anon"] * 4
        assert (await w.kernel.meminfo(w.mid))["SwapTotal"] == 0

    run(s)


def test_checker_reports_a_slot_count_that_disagrees_with_the_swap_ptes(run: Any) -> None:
    async def s(w: World) -> None:
        await anon(w, 2)
        await w.kernel.reclaim(w.mid, None, None, 32)
        key = f"{keys.machine(w.mid)}:swap:map"
        await w.store.client.hincrby(key, "1", 1)
        report = await w.kernel.check(w.mid, True)
        assert [x for x in report.violations if x.startswith("S1")] == [
            "S1 swap slot 1: count 2 != 1 swap ptes and shmem swap entries"]
        await w.store.client.hincrby(key, "1", -1)

    run(s, swap_pages=8)


def test_a_swap_pte_zapped_while_reclaim_frees_its_cache_page(run: Any,
                                                              monkeypatch: Any) -> None:
    """free_swap_and_cache racing __remove_mapping: the last swap pte of a slot goes (here
    MADV_DONTNEED in a fork child) after reclaim froze the slot's swap cache page and before
    it deleted it from the swap cache.  Linux's free_swap_and_cache takes a reference
    (folio_try_get fails on the frozen folio) and trylocks the folio before it frees the
    cache page: reclaim owns it and frees it with the slot.  Before the fix the zap deleted
    and put the frozen page too: "refcount underflow" (the fuzzer's swap race)."""
    import mmsvc.mm.vmscan as vmscan

    async def s(w: World) -> None:
        p = await anon(w, 1)
        c = await w.kernel.fork(w.mid, p)
        w.maps[(c, "m")] = w.maps[(p, "m")]
        assert (await w.kernel.reclaim(w.mid, None, None, 32)).reclaimed == 1
        await w.touch(p, "m", write=False)  # swapped in: in the swap cache, the child's pte
        addr, pages = w.maps[(p, "m")]
        await w.kernel.madvise(w.mid, p, addr, pages * 4096, Advice.MADV_DONTNEED)
        await w.drain()
        assert await slots(w) == (1, {1: 1}, 1)  # only the swap cache holds the page now
        original = vmscan.delete_from_swap_cache
        zapped: list[bool] = []

        async def zap_first(*args: Any, **kw: Any) -> bool:
            if kw.get("written") and not zapped:
                zapped.append(True)
                await w.kernel.madvise(w.mid, c, addr, pages * 4096, Advice.MADV_DONTNEED)
            return await original(*args, **kw)

        monkeypatch.setattr(vmscan, "delete_from_swap_cache", zap_first)
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert zapped and res.reclaimed == 1
        assert await slots(w) == (0, {}, 0)
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations

    run(s, swap_pages=64)


def test_two_swap_ins_of_one_shared_slot_read_it_in_once(run: Any, monkeypatch: Any) -> None:
    """A fork parent and child fault on the same swap slot at once: both find it out of the
    swap cache and read it into a new page; the second to add its page to the swap cache
    finds the first's there (EEXIST in __read_swap_cache_async), frees its own page and
    retries with the cached one.  Before the fix the loser put its new page twice:
    INTERNAL "refcount underflow" (the fuzzer's swap race on Fault, Mlockall, Madvise)."""
    import mmsvc.mm.memory as memory

    async def s(w: World) -> None:
        p = await anon(w, 1)
        c = await w.kernel.fork(w.mid, p)
        w.maps[(c, "m")] = w.maps[(p, "m")]
        assert (await w.kernel.reclaim(w.mid, None, None, 32)).reclaimed == 1
        # the child reads the slot in first
        raced = race_once(monkeypatch, memory, "add_to_swap_cache",
                          lambda: w.touch(c, "m", write=False), before=True)
        await w.touch(p, "m", write=False)
        assert raced
        pp, cp = (await w.pages(p, "m"))[0], (await w.pages(c, "m"))[0]
        assert (pp.pfn, pp.mapcount) == (cp.pfn, 2)  # one page, read in once
        assert (await w.kernel.vmstat(w.mid))["pswpin"] == 1
        assert await slots(w) == (0, {}, 0)

    run(s, swap_pages=64)


def test_reclaims_restored_mlock_racing_a_munlock_of_the_vma(run: Any, monkeypatch: Any) -> None:
    """§5.2.1: reclaim's walk finds a missed mlock (VM_LOCKED vma, page not mlocked) and
    restores it; the vma's munlock clears VM_LOCKED and walks its ptes in between (Linux
    serializes the two under the PTL, so the page ends munlocked either way).  Reclaim
    rechecks the vma after its mlock and munlocks in the munlock's place: before the fix
    the page stayed PG_mlocked with no locked mapping (Q4 on the fuzzer's rework machine)."""
    from mmsvc.mm.rmap import Rmap

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "l", 1)
        await w.touch(p, "l")
        await w.drain()
        await miss_mlock(w, p, "l")
        raced = race_once(monkeypatch, Rmap, "mappings", lambda: w.munlock(p, "l", cpu=1))
        await w.kernel.reclaim(w.mid, None, None, 32)
        assert raced
        await w.drain_all()
        [page] = await w.pages(p, "l")
        assert page.present and not page.mlocked and not page.vma_locked
        assert (await w.delta())["nr_mlock"] == 0

    run(s, swap_pages=64)
