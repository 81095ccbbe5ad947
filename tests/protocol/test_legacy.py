"""The pre-rework design (spec §9): the same scenarios, its own counters and costs."""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.types import MLOCK_ONFAULT
from tests.protocol.world import World, race_once, sub

LEGACY = {"protocol": "legacy"}


async def rows(w: World) -> dict[tuple[str, str], Any]:
    return {(r.lock_class, r.instance): r for r in await w.kernel.lock_stat(w.mid)}


def test_s5_legacy_exit_re_mlocks_through_page_mlock(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):
            await w.mmap(p, "m", 1, file="f", shared=True)
            await w.mlock(p, "m")
            await w.drain()
        assert (await w.delta())["mlocked"] == 1
        reads_before = w.kernel.legacy.costs.page_mlock_calls
        await w.kernel.exit(w.mid, p1)
        await w.drain()
        # one page_mlock under i_mmap_rwsem (read), one page lock, a re-mlock, no munlock
        assert w.kernel.legacy.costs.page_mlock_calls - reads_before == 1
        d = await w.delta()
        assert (d["mlocked"], d["munlocked"]) == (2, 0)
        await w.kernel.exit(w.mid, p2)
        await w.drain()
        assert sub(await w.delta(), mlocked=2, munlocked=1, rescued=1, nr_mlock=0) == {
            "mlocked": 2, "munlocked": 1, "rescued": 1, "nr_mlock": 0}
        stats = await rows(w)
        assert stats[("page_lock", "node0/root")].acquisitions >= 2

    run(s, **LEGACY)


def test_s34_legacy_munlock_of_a_page_locked_elsewhere(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):
            await w.mmap(p, "m", 1, file="f", shared=True)
            await w.mlock(p, "m")
            await w.drain()
        before = await w.delta()
        await w.munlock(p1, "m")
        after = await w.delta()
        assert (after["mlocked"] - before["mlocked"], after["munlocked"] - before["munlocked"]) \
            == (1, 0)
        await w.drain()
        page = (await w.pages(p2, "m"))[0]
        assert (page.mlocked, page.unevictable) == (True, True)

    run(s, **LEGACY)


def test_s34_new_design_only_decrements_the_count(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):
            await w.mmap(p, "m", 1, file="f", shared=True)
            await w.mlock(p, "m")
        await w.drain()
        before = await w.delta()
        await w.munlock(p1, "m")
        assert await w.delta() == before
        assert (await w.pages(p2, "m"))[0].mlock_count == 1
        reads = [r for r in await w.kernel.lock_stat(w.mid) if r.lock_class == "i_mmap_rwsem"]
        assert all(r.acquisitions == 2 for r in reads)  # the two links, no read holds

    run(s)


def test_legacy_anon_mlock_and_munmap(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.touch(p, "m")
        await w.mlock(p, "m")
        await w.drain()
        assert sub(await w.delta(), mlocked=4, culled=4, nr_mlock=4, nr_unev=4) == {
            "mlocked": 4, "culled": 4, "nr_mlock": 4, "nr_unev": 4}
        await w.munmap(p, "m")
        await w.drain()
        assert sub(await w.delta(), munlocked=4, rescued=4, nr_mlock=0, nr_unev=0,
                   cleared=0) == {"munlocked": 4, "rescued": 4, "nr_mlock": 0, "nr_unev": 0,
                                  "cleared": 0}

    run(s, **LEGACY)


def test_s35_legacy_lockonfault_mlocks_present_pages_only(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 8)
        await w.touch(p, "m", 0, 3)
        await w.mlock(p, "m", flags=MLOCK_ONFAULT)
        await w.drain()
        assert sub(await w.delta(), mlocked=3, culled=3) == {"mlocked": 3, "culled": 3}
        assert [pg.present for pg in await w.pages(p, "m")] == [True] * 3 + [False] * 5
        await w.touch(p, "m", 3, 5)  # new anon pages in a VM_LOCKED vma: mlocked at fault
        await w.drain()
        assert sub(await w.delta(), mlocked=5, culled=5) == {"mlocked": 5, "culled": 5}

    run(s, **LEGACY)


def test_exit_storm_costs_legacy_vs_rework(run: Any) -> None:
    """S6, small: legacy pays page_mlock read holds and re-mlocks; the rework pays none."""

    async def storm(w: World) -> tuple[dict[str, int], int]:
        await w.file("f", 16, prefill=True)
        procs = [await w.proc() for _ in range(3)]
        for p in procs:
            await w.mmap(p, "m", 16, file="f", shared=True)
            await w.mlock(p, "m")
            await w.drain()
        for p in procs:
            await w.kernel.exit(w.mid, p)
            await w.drain()
        reads = w.kernel.legacy.costs.page_mlock_calls
        return await w.delta(), reads

    legacy, legacy_reads = run(storm, **LEGACY)
    rework, rework_reads = run(storm)
    assert rework_reads == 0 and rework["mlocked"] == 16 and rework["munlocked"] == 16
    # all but the last exiting process re-mlock each page: 16 + 2 * 16
    assert legacy_reads == 32 and legacy["mlocked"] == 48 and legacy["munlocked"] == 16


def test_legacy_page_mlock_racing_the_munlock_of_the_vma_it_found_locked(
        run: Any, monkeypatch: Any) -> None:
    """page_mlock (p1's munlock, §9.5) finds p2's vma VM_LOCKED; before it re-mlocks the page,
    p2 munlocks that vma (VM_LOCKED cleared, then its walk: §9.4).  Linux serializes the two
    under the PTL, so the page ends munlocked whichever comes first; here the re-mlock comes
    after p2's walk passed the page unless page_mlock rechecks the vma and pte after it.
    Before the fix: Q4, PG_mlocked with no VM_LOCKED mapping (the fuzzer's legacy-q4-race)."""
    from mmsvc.mm.rmap import Rmap

    async def s(w: World) -> None:
        p1, p2 = await w.sharers(mlock=(0, 1))
        raced = race_once(monkeypatch, Rmap, "mappings", lambda: w.munlock(p2, "m", cpu=1))
        await w.munlock(p1, "m")
        assert raced
        await w.drain_all()
        page = (await w.pages(p2, "m"))[0]
        assert not page.mlocked
        assert (await w.delta())["nr_mlock"] == 0

    run(s, **LEGACY)


@pytest.mark.parametrize("walk", ["mlock", "munlock"])
def test_legacy_walks_skip_a_page_migrated_after_its_pte_was_read(
        run: Any, monkeypatch: Any, walk: str) -> None:
    """FOLL_MLOCK (§9.3.2) and munlock_vma_pages_range (§9.4) take each page with a
    reference under the PTL; here the walk read the ptes first, so a migration (driven
    through another process's mapping) may free the page before the walk's mlock_vma_page
    or phase 1.  The old page must be skipped, not touched: before the fix an INTERNAL "page
    N is free" from mm_pages (the fuzzer's freed-page-program, on Mlock and Exit)."""
    import mmsvc.mm.legacy as legacy

    async def s(w: World) -> None:
        p1, p2 = await w.sharers(mlock=(0,) if walk == "munlock" else ())
        pt_walk = legacy.pt_walk
        moved: list[Any] = []

        async def walk_then_migrate(*args: Any, **kw: Any) -> Any:
            async for ptes in pt_walk(*args, **kw):
                if not moved:
                    moved.append(await w.on(1).migrate(w.mid, p2, *w.rng(p2, "m"), 1))
                yield ptes

        monkeypatch.setattr(legacy, "pt_walk", walk_then_migrate)
        if walk == "mlock":
            await w.mlock(p1, "m")
        else:
            await w.munlock(p1, "m")
        assert moved and moved[0].migrated == 1
        await w.drain_all()
        page = (await w.pages(p1, "m"))[0]
        # remove_migration_pte mlocks the new page in a VM_LOCKED vma (§9.3.5): after the
        # munlock cleared VM_LOCKED there is none
        assert (page.node, page.mlocked) == (1, walk == "mlock")

    run(s, nodes=2, **LEGACY)


def test_legacy_migration_restore_racing_the_munlock_of_its_vma(
        run: Any, monkeypatch: Any) -> None:
    """Legacy remove_migration_pte mlocks the new page for a VM_LOCKED vma (§9.3.5); p1's
    munlock clears VM_LOCKED and walks the restored pte before that mlock.  Linux checks
    VM_LOCKED and mlocks under the PTL; here the restore read the vma with the pte (one
    step) but mlocks after it, so it rechecks after the mlock and undoes it: before the fix
    the new page stayed PG_mlocked with no locked mapping (Q4 on the fuzzer's legacy
    machine)."""
    import mmsvc.mm.migrate as migrate
    from mmsvc.mm.page import PTEBit

    async def s(w: World) -> None:
        p1, p2 = await w.sharers(mlock=(0,))
        real = migrate.set_pte_reading_vma
        raced: list[int] = []

        async def restore_then_munlock(store: Any, mp: Any, new: Any, expect: Any,
                                       **kw: Any) -> Any:
            status, vma = await real(store, mp, new, expect, **kw)
            if not raced and not new.bits & PTEBit.MIGRATION and vma.locked:
                raced.append(1)  # the restore of p1's pte: the munlock walks it now
                await w.munlock(p1, "m", cpu=1)
            return status, vma

        monkeypatch.setattr(migrate, "set_pte_reading_vma", restore_then_munlock)
        res = await w.kernel.migrate(w.mid, p2, *w.rng(p2, "m"), 1)
        assert raced and res.migrated == 1
        await w.drain_all()
        page = (await w.pages(p1, "m"))[0]
        assert (page.node, page.mlocked) == (1, False)
        assert (await w.delta())["nr_mlock"] == 0

    run(s, nodes=2, **LEGACY)


def test_legacy_kernel_does_not_know_madv_dontneed_locked(run: Any) -> None:
    """MADV_DONTNEED_LOCKED came with Linux 5.18, after the rework: a legacy (5.17) kernel
    answers EINVAL and changes nothing.  It used to zap the VM_LOCKED ptes, and legacy's
    page_remove_rmap clears PG_mlocked only with the last mapping: pages another, unlocked
    vma also maps stayed mlocked (Q4, the fuzzer's `q4-race`)."""
    from mmsvc.mm.errors import KernelError
    from mmsvc.mm.types import Advice

    async def s(w: World) -> None:
        p, _q = await w.sharers(pages=4, regular=True)
        await w.mlock(p, "m")
        await w.drain_all()
        before = await w.delta()
        for length in (4 * 4096, 0):
            with pytest.raises(KernelError) as err:
                await w.kernel.madvise(w.mid, p, w.rng(p, "m")[0], length,
                                       Advice.MADV_DONTNEED_LOCKED)
            assert err.value.errno == "EINVAL"
        assert all(pg.present and pg.mlocked for pg in await w.pages(p, "m"))
        assert await w.delta() == before

    run(s, **LEGACY)


@pytest.mark.parametrize("fork", [False, True], ids=["file-page", "forked-anon-copy"])
def test_legacy_cow_in_a_locked_private_file_mapping_munlocks_the_old_page(
        run: Any, fork: bool) -> None:
    """wp_page_copy in a VM_LOCKED vma munlocks the page it copied (§9.7) - for private file
    mappings too: the file page itself, or (after a fork) the anonymous copy parent and child
    share.  The file side of the fault did not, and the old page stayed PG_mlocked for the
    child's unlocked mapping (Q4: the fuzzer's legacy machine, replayed to one Mlock)."""
    from mmsvc.mm.types import FileSpec

    async def s(w: World) -> None:
        await w.kernel.create_file(w.mid, FileSpec("f", 4, kind="regular"))
        p = await w.proc()
        # MAP_PRIVATE; read-only while mlock populates, so that the file pages themselves
        # are mapped and mlocked (a writable one is COWed by the populate already)
        await w.mmap(p, "m", 4, file="f", prot=3 if fork else 1)
        if fork:
            await w.touch(p, "m")  # private anonymous copies
        await w.mlock(p, "m")
        await w.drain_all()
        others = []
        if fork:
            c = await w.kernel.fork(w.mid, p)  # shares the copies, write-protected
            w.maps[(c, "m")] = w.maps[(p, "m")]
            others = [c]
        old = [pg.pfn for pg in await w.pages(p, "m")]
        if not fork:
            assert all(f.mlocked for f in await w.kernel.file_pages(w.mid, "f"))
            # mprotect_fixup populates a VM_LOCKED private vma that gains VM_WRITE: COW
            await w.kernel.mprotect(w.mid, p, *w.rng(p, "m"), 3)
        await w.touch(p, "m")  # write: COW of each page in the VM_LOCKED vma
        await w.drain_all()
        mine = await w.pages(p, "m")
        assert all(pg.mlocked and pg.pfn not in old for pg in mine)
        for c in others:
            theirs = await w.pages(c, "m")
            assert [pg.pfn for pg in theirs] == old
            assert not any(pg.mlocked for pg in theirs)
        files = await w.kernel.file_pages(w.mid, "f")
        assert not any(f.mlocked for f in files if f.present)

    run(s, **LEGACY)
