"""Reclaim's try_to_unmap racing an mlock of the vma it read unlocked (spec §3.6, §5.3).

Linux's try_to_unmap_one reads vm_flags under the page table lock, which mlock's range walk
also takes after it stored VM_LOCKED: either reclaim sees VM_LOCKED (it mlocks the page and
fails), or it removes the pte before the walk gets there (the walk does not see the page).
mmsvc's reclaim reads the mappings first, without that lock: an mlock that stores VM_LOCKED
and walks the page in between must still end in one of those two outcomes - never an mlocked
page with no VM_LOCKED mapping (Q4) or freed with PG_mlocked (Δcleared).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import mmsvc.mm.vmscan as vmscan
from loadtests.fuzz import store_digest
from mmsvc.mm.errors import KernelError
from mmsvc.mm.rmap import Rmap
from mmsvc.mm.types import CheckReport, FileSpec

from .world import World, race_once, sub


async def mapped_file_page(w: World) -> int:
    await w.kernel.create_file(w.mid, FileSpec("f", 1, kind="regular"))
    p = await w.proc()
    await w.mmap(p, "m", 1, file="f", shared=True)
    await w.touch(p, "m", write=False)
    await w.drain_all()
    return p


def test_reclaim_sees_the_vm_locked_an_mlock_stored_after_its_rmap_walk(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def s(w: World) -> None:
        p = await mapped_file_page(w)
        # the mlock (flags stored, walk, populate) runs right after reclaim's rmap walk read
        # the vma unlocked; reclaim must find VM_LOCKED at unmap time and keep the page
        raced = race_once(monkeypatch, Rmap, "mappings", lambda: w.on(1).mlock(
            w.mid, p, *w.rng(p, "m")))
        res = await w.kernel.reclaim(w.mid, None, None, 8)
        assert raced, "the mlock did not run"
        await w.drain_all()
        assert (res.reclaimed, res.culled) == (0, 1)
        page = (await w.pages(p, "m"))[0]
        assert (page.present, page.mlocked, page.unevictable) == (True, True, True)
        d = await w.delta()
        assert sub(d, mlocked=1, cleared=0, nr_mlock=1) == {
            "mlocked": 1, "cleared": 0, "nr_mlock": 1}

    run(s)


def test_reclaim_gives_back_the_swap_counts_when_an_mlock_comes_before_its_unmap(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An mlock runs after add_to_swap (the slot counted the pte to come) and right before
    try_to_unmap_one's look at the vma and the pte (one atomic step, lua ttu_pte): reclaim
    finds VM_LOCKED, mlocks and fails (§5.3); the page stays mapped and mlocked, in the swap
    cache with its slot, and the slot counts no swap pte (the checker's S1)."""

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1)
        await w.touch(p, "m")
        await w.drain_all()
        raced = race_once(monkeypatch, vmscan.Vmscan, "_ttu_pte", lambda: w.on(1).mlock(
            w.mid, p, *w.rng(p, "m")), before=True)
        res = await w.kernel.reclaim(w.mid, None, None, 8)
        assert raced, "the mlock did not run"
        await w.drain_all()
        assert (res.scanned, res.reclaimed, res.culled) == (1, 0, 1)
        page = (await w.pages(p, "m"))[0]
        assert (page.present, page.mlocked, page.unevictable) == (True, True, True)
        d = await w.delta()
        assert sub(d, mlocked=1, cleared=0, nr_mlock=1) == {
            "mlocked": 1, "cleared": 0, "nr_mlock": 1}

    run(s, swap_pages=8, reclaim_locked_activate=False)


def test_legacy_populate_munlocks_a_page_whose_pte_an_rmap_walker_zapped(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Legacy FOLL_MLOCK populate (§9.3.2) read p's pte, then an rmap walker zapped it
    (unmap_mapping_folio, as truncation does) before the mlock: Linux's follow_page mlocks
    under the PTL the zap takes, so it would not have found the page.  The page, still mapped
    by q's unlocked vma, must not stay PG_mlocked (Q4)."""
    import mmsvc.mm.legacy as legacy
    from mmsvc.mm.memory import read_pages

    async def s(w: World) -> None:
        p, q = await w.sharers(regular=True)
        real_walk = legacy.pt_walk
        zapped: list[int] = []

        async def walk_then_zap(store: Any, key: str, start: int, end: int,
                                max_ptes: int = 4096) -> Any:
            async for ptes in real_walk(store, key, start, end, max_ptes):
                if not zapped:
                    # another CPU's rmap walker removes p's pte of the page
                    k1 = w.on(1)
                    m = await k1.machine(w.mid)
                    pte = next(iter(ptes.values()))
                    page = (await read_pages(k1.store, m, [(pte.lv, pte.idx)]))[0]
                    async with k1.rmap.locked(m, page):
                        maps = await k1.rmap.mappings(m, pte.lv, pte.idx, page)
                        mine = [(mp.mm_key, mp.vma, mp.pte) for mp in maps if mp.pid == p]
                        zapped.append(await k1.truncator._zap(m, mine))
                yield ptes

        monkeypatch.setattr(legacy, "pt_walk", walk_then_zap)
        await w.mlock(p, "m")
        assert zapped == [1]
        await w.drain_all()
        page = (await w.pages(q, "m"))[0]
        assert (page.present, page.mapcount, page.mlocked) == (True, 1, False)
        assert not (await w.pages(p, "m"))[0].present

    run(s, protocol="legacy")


def test_a_quiescent_check_waits_for_a_reclaim_in_flight(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Check(drain_all) that arrives while a Reclaim is half way (the page locked, a swap
    slot counting the pte to come, §5) waits for it: the checker's invariants assume nothing
    in progress (§8.5), and Reclaim takes no mmap_lock for the check to wait on."""

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1)
        await w.touch(p, "m")
        await w.drain_all()
        checks: list[asyncio.Task[CheckReport]] = []
        ttu = vmscan.Vmscan._ttu_pte

        async def start_a_check_first(self: vmscan.Vmscan, mp: Any, new: Any) -> Any:
            if not checks:
                checks.append(asyncio.create_task(w.kernel.check(w.mid, True)))
                await asyncio.sleep(0.5)
                assert not checks[0].done(), "the check ran beside the reclaim"
            return await ttu(self, mp, new)

        monkeypatch.setattr(vmscan.Vmscan, "_ttu_pte", start_a_check_first)
        res = await w.kernel.reclaim(w.mid, None, None, 8)
        assert res.reclaimed == 1 and checks
        report = await checks[0]
        assert report.ok, report.violations
        assert not (await w.pages(p, "m"))[0].present  # swapped out

    run(s, swap_pages=8)


def test_a_refused_create_file_leaves_the_store_as_it_was(run: Any) -> None:
    """The quiesce lock of a prefill is taken after the request's checks: a CreateFile
    refused for its name changes no key (it created the lock's keys, the fuzzer found)."""

    async def s(w: World) -> None:
        before = await store_digest(w.store.client, w.mid)
        with pytest.raises(KernelError) as exc:
            await w.kernel.create_file(w.mid, FileSpec("a|b", 8, prefill=True))
        assert exc.value.errno == "EINVAL"
        assert await store_digest(w.store.client, w.mid) == before

    run(s)
