"""Spec §11 scenarios of the reworked protocol, on a real redis-server (seed batch length 15)."""

from __future__ import annotations

import time
from typing import Any

from mmsvc.mm.types import (
    MAP_LOCKED,
    MCL_CURRENT,
    MCL_FUTURE,
    MCL_ONFAULT,
    MLOCK_ONFAULT,
    FileSpec,
)
from tests.protocol.world import World, race_once, sub


def test_s1_mlock_of_present_anon_pages(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.touch(p, "m")
        await w.drain()
        assert (await w.delta())["inactive_anon"] == 4
        await w.mlock(p, "m")
        d = await w.delta()
        assert sub(d, mlocked=4, culled=4, nr_mlock=4, nr_unev=4, inactive_anon=0) == {
            "mlocked": 4, "culled": 4, "nr_mlock": 4, "nr_unev": 4, "inactive_anon": 0}
        for page in await w.pages(p, "m"):
            assert (page.mlocked, page.unevictable, page.active, page.mlock_count) == (
                True, True, False, 1)
        assert await w.locked_vm(p) == 4

    run(s)


def test_s2_unpopulated_mlock_leaves_new_page_entries_in_the_batch(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.mlock(p, "m")
        d = await w.delta()
        # Before drain: NR_MLOCK and mlocked counted at enqueue, nothing culled yet (§2.2.2).
        assert sub(d, nr_mlock=4, mlocked=4, nr_unev=4, culled=0) == {
            "nr_mlock": 4, "mlocked": 4, "nr_unev": 0, "culled": 0}
        assert not any(pg.lru for pg in await w.pages(p, "m"))
        await w.drain()
        d = await w.delta()
        assert (d["culled"], d["nr_unev"], d["inactive_anon"]) == (4, 4, 0)
        assert [pg.mlock_count for pg in await w.pages(p, "m")] == [1, 1, 1, 1]

    run(s)


def test_s3_mlocks_do_not_nest(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.touch(p, "m")
        await w.mlock(p, "m")
        before = await w.delta()
        await w.mlock(p, "m")
        assert await w.delta() == before
        assert await w.locked_vm(p) == 4
        await w.munlock(p, "m")
        d = await w.delta()
        assert sub(d, munlocked=4, rescued=4, nr_mlock=0, nr_unev=0, inactive_anon=4) == {
            "munlocked": 4, "rescued": 4, "nr_mlock": 0, "nr_unev": 0, "inactive_anon": 4}
        assert await w.locked_vm(p) == 0

    run(s)


def test_s4_one_file_page_mapped_by_two_vmas(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p = await w.proc()
        await w.mmap(p, "a", 1, file="f", shared=True)
        await w.mmap(p, "b", 1, file="f", shared=True)
        await w.touch(p, "a", write=False)
        await w.touch(p, "b", write=False)
        await w.mlock(p, "a")
        await w.mlock(p, "b")
        d = await w.delta()
        assert (d["mlocked"], d["culled"]) == (1, 1)
        assert (await w.pages(p, "a"))[0].mlock_count == 2
        await w.munlock(p, "a")
        assert (await w.pages(p, "b"))[0].mlock_count == 1
        assert (await w.delta())["munlocked"] == 0
        await w.munlock(p, "b")
        d = await w.delta()
        assert sub(d, munlocked=1, rescued=1, nr_mlock=0) == {
            "munlocked": 1, "rescued": 1, "nr_mlock": 0}
        # tmpfs pages are swap-backed: they return to the anon inactive list
        assert (await w.pages(p, "b"))[0].lru_list == "inactive_anon"

    run(s)


def test_s5_two_processes_lock_a_shared_file_page_then_exit(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):
            await w.mmap(p, "m", 1, file="f", shared=True)
            await w.touch(p, "m", write=False)
            await w.mlock(p, "m")
        assert (await w.pages(p2, "m"))[0].mlock_count == 2
        assert (await w.delta())["mlocked"] == 1
        await w.kernel.exit(w.mid, p1)
        await w.drain()
        page = (await w.pages(p2, "m"))[0]
        assert (page.mlocked, page.unevictable, page.mlock_count) == (True, True, 1)
        assert (await w.delta())["munlocked"] == 0
        await w.kernel.exit(w.mid, p2)
        await w.drain()
        d = await w.delta()
        assert sub(d, munlocked=1, rescued=1, nr_mlock=0, cleared=0) == {
            "munlocked": 1, "rescued": 1, "nr_mlock": 0, "cleared": 0}
        stats = {(r.lock_class, r.instance): r for r in await w.kernel.lock_stat(w.mid)}
        # i_mmap_rwsem: write holds only (link at mmap, unlink at exit); no read holds (§9.9)
        assert stats[("i_mmap_rwsem", "f")].acquisitions == 4

    run(s)


def test_s7_mlock_onfault_counts_present_pages_and_later_faults(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 8)
        await w.touch(p, "m", 0, 3)
        await w.mlock(p, "m", flags=MLOCK_ONFAULT)
        await w.drain()
        d = await w.delta()
        assert (d["mlocked"], d["culled"]) == (3, 3)
        assert await w.locked_vm(p) == 8
        assert [pg.present for pg in await w.pages(p, "m")] == [True] * 3 + [False] * 5
        await w.touch(p, "m", 3, 5)
        await w.drain()
        d = await w.delta()
        assert (d["mlocked"], d["culled"]) == (5, 5)
        pages = await w.pages(p, "m")
        assert all(pg.vma_onfault and pg.vma_locked for pg in pages)

    run(s)


def test_s8_onfault_does_not_break_cow_then_write_copies(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1)
        await w.touch(p, "m")
        c = await w.kernel.fork(w.mid, p)
        w.maps[(c, "m")] = w.maps[(p, "m")]
        await w.mlock(p, "m", flags=MLOCK_ONFAULT)
        await w.drain()
        x = (await w.pages(p, "m"))[0]
        assert (x.mapcount, x.mlock_count) == (2, 1)
        assert (await w.delta())["mlocked"] == 1
        await w.touch(p, "m")  # COW: new page X' for the parent
        await w.drain()
        d = await w.delta()
        assert sub(d, mlocked=2, culled=2, munlocked=1, rescued=1) == {
            "mlocked": 2, "culled": 2, "munlocked": 1, "rescued": 1}
        xp = (await w.pages(p, "m"))[0]
        xc = (await w.pages(c, "m"))[0]
        assert xp.pfn != xc.pfn and xp.mlock_count == 1
        assert (xc.mlocked, xc.lru_list) == (False, "inactive_anon")

    run(s)


def test_s9_mlock_after_onfault_populates_the_rest_without_recount(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 8)
        await w.mlock(p, "m", flags=MLOCK_ONFAULT)
        await w.touch(p, "m", 0, 3)
        await w.mlock(p, "m")
        await w.drain()
        assert (await w.delta())["mlocked"] == 8
        assert [pg.mlock_count for pg in await w.pages(p, "m")] == [1] * 8
        assert await w.locked_vm(p) == 8

    run(s)


def test_s21_munmap_of_mlocked_anon_pages(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.touch(p, "m")
        await w.mlock(p, "m")
        await w.munmap(p, "m")
        assert await w.locked_vm(p) == 0
        d = await w.delta()
        assert d["munlocked"] == 0  # the 4 munlock entries wait in the batch
        await w.drain()
        d = await w.delta()
        assert sub(d, munlocked=4, rescued=4, cleared=0, nr_mlock=0, nr_unev=0,
                   inactive_anon=0) == {"munlocked": 4, "rescued": 4, "cleared": 0,
                                        "nr_mlock": 0, "nr_unev": 0, "inactive_anon": 0}

    run(s)


def test_s22_exit_with_mlockall_current_future(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.kernel.mlockall(w.mid, p, MCL_CURRENT | MCL_FUTURE)
        await w.mmap(p, "m", 4)  # MCL_FUTURE: VM_LOCKED, populated, mlocked at fault
        assert await w.locked_vm(p) == 4
        await w.drain()
        assert sub(await w.delta(), mlocked=4, culled=4) == {"mlocked": 4, "culled": 4}
        await w.kernel.exit(w.mid, p)
        await w.drain()
        assert sub(await w.delta(), munlocked=4, rescued=4, cleared=0, nr_mlock=0) == {
            "munlocked": 4, "rescued": 4, "cleared": 0, "nr_mlock": 0}

    run(s)


def test_s24_batching_takes_one_lruvec_lock_per_flush(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 20)
        await w.touch(p, "m")
        await w.drain()
        before = {r.instance: r.acquisitions for r in await w.kernel.lock_stat(w.mid)
                  if r.lock_class == "lruvec_lock"}
        await w.mlock(p, "m")
        after = {r.instance: r.acquisitions for r in await w.kernel.lock_stat(w.mid)
                 if r.lock_class == "lruvec_lock"}
        # one flush when the 15th entry is added, one by the trailing drain (§11 S24)
        assert after["node0/root"] - before["node0/root"] == 2
        assert (await w.delta())["culled"] == 20

    run(s)


def test_s24_batch_length_one_is_exact_at_return(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 5)
        await w.mlock(p, "m")  # populate: NEW_PAGE entries flushed one by one
        d = await w.delta()
        assert (d["culled"], d["nr_unev"]) == (5, 5)

    run(s, mlock_batch_len=1, lru_add_batch_len=1)


def test_s25_new_page_then_munmap_before_drain(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1, flags=MAP_LOCKED)  # populated: one NEW_PAGE entry queued
        assert (await w.delta())["culled"] == 0
        await w.munmap(p, "m")
        await w.drain()
        assert sub(await w.delta(), culled=1, munlocked=1, rescued=1, cleared=0) == {
            "culled": 1, "munlocked": 1, "rescued": 1, "cleared": 0}

    run(s)


def test_s25_munlock_entry_drained_first_on_another_cpu(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1, flags=MAP_LOCKED)  # NEW_PAGE entry on CPU 0
        await w.on(1).munmap(w.mid, p, *w.rng(p, "m"))  # munlock entry on CPU 1
        await w.drain(cpu=1)
        d = await w.delta()
        assert (d["munlocked"], d["stranded"]) == (1, 0)
        await w.drain(cpu=0)
        d = await w.delta()
        assert (d["culled"], d["rescued"], d["cleared"]) == (0, 0, 0)

    run(s)


def test_s27_cow_after_fork_in_a_locked_vma(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1)
        await w.touch(p, "m")
        await w.mlock(p, "m")
        c = await w.kernel.fork(w.mid, p)
        w.maps[(c, "m")] = w.maps[(p, "m")]
        assert await w.locked_vm(c) == 0
        await w.touch(p, "m")
        await w.drain()
        assert sub(await w.delta(), mlocked=2, culled=2, munlocked=1, rescued=1) == {
            "mlocked": 2, "culled": 2, "munlocked": 1, "rescued": 1}
        child_page = (await w.pages(c, "m"))[0]
        assert (child_page.mlocked, child_page.vma_locked) == (False, False)

    run(s)


def test_exit_storm_of_lockers_munlocks_each_page_once(run: Any) -> None:
    """S6 (new design), small: N processes lock the same file pages, then all exit."""

    async def s(w: World) -> None:
        await w.file("f", 40, prefill=True)
        procs = [await w.proc() for _ in range(4)]
        for p in procs:
            await w.mmap(p, "m", 40, file="f", shared=True)
            await w.mlock(p, "m")
        await w.drain()
        assert [pg.mlock_count for pg in await w.pages(procs[0], "m")] == [4] * 40
        for p in procs:
            await w.kernel.exit(w.mid, p)
        await w.drain()
        assert sub(await w.delta(), mlocked=40, munlocked=40, cleared=0, nr_mlock=0) == {
            "mlocked": 40, "munlocked": 40, "cleared": 0, "nr_mlock": 0}

    run(s)


def test_reclaim_frees_clean_regular_file_pages_and_spares_locked_ones(run: Any) -> None:
    async def s(w: World) -> None:
        await w.kernel.create_file(w.mid, FileSpec("data", 8, prefill=True, kind="regular"))
        p = await w.proc()
        await w.mmap(p, "m", 4, file="data", shared=True)
        await w.mlock(p, "m")
        await w.drain()
        res = await w.kernel.reclaim(w.mid, None, None, 100)
        # 4 unmapped cache pages reclaimed; the 4 mlocked ones are on the unevictable LRU,
        # which reclaim never scans (§1.4.6)
        assert (res.scanned, res.reclaimed) == (4, 4)
        assert sub(await w.delta(), nr_unev=4, inactive_file=0) == {"nr_unev": 4,
                                                                    "inactive_file": 0}
        files = await w.kernel.file_pages(w.mid, "data")
        assert [f.present for f in files] == [True] * 4 + [False] * 4

    run(s)


def test_s16_reclaim_restores_a_missed_mlock(run: Any) -> None:
    """A munlock on another CPU finds the page still in CPU 0's lru_add batch and assumes
    it was the last mlock (§2.6.3), although p2's VM_LOCKED vma still maps it: an undercount
    that reclaim repairs (§5.2, §5.4)."""

    async def s(w: World) -> None:
        await w.kernel.create_file(w.mid, FileSpec("data", 1, kind="regular"))
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):  # VM_LOCKED|VM_LOCKONFAULT mappings: no populate, no drain
            await w.kernel.mlockall(w.mid, p, MCL_FUTURE | MCL_ONFAULT)
            await w.mmap(p, "m", 1, file="data", shared=True)
        await w.touch(p1, "m", write=False)  # read in: lru_add entry + LRU_PAGE entry
        await w.touch(p2, "m", write=False)  # second LRU_PAGE entry
        await w.on(1).munmap(w.mid, p1, *w.rng(p1, "m"))  # munlock entry on CPU 1
        await w.drain(cpu=1)
        await w.drain(cpu=0)
        page = (await w.pages(p2, "m"))[0]
        assert (page.mlocked, page.lru_list, page.vma_locked) == (False, "inactive_file", True)
        assert sub(await w.delta(), mlocked=1, munlocked=1) == {"mlocked": 1, "munlocked": 1}
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 1
        res = await w.kernel.reclaim(w.mid, None, None, 10)
        assert (res.scanned, res.reclaimed, res.culled) == (1, 0, 1)
        await w.drain()
        page = (await w.pages(p2, "m"))[0]
        assert (page.mlocked, page.unevictable, page.mlock_count) == (True, True, 1)
        assert sub(await w.delta(), mlocked=2, culled=1) == {"mlocked": 2, "culled": 1}

    run(s)


def test_s13_migration_of_an_mlocked_page_preserves_mlock_count(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p = await w.proc()
        await w.mmap(p, "a", 1, file="f", shared=True)
        await w.mmap(p, "b", 1, file="f", shared=True)
        await w.mlock(p, "a")
        await w.mlock(p, "b")
        await w.drain()
        old = (await w.pages(p, "a"))[0]
        assert old.mlock_count == 2
        before = await w.delta()
        res = await w.kernel.migrate(w.mid, p, *w.rng(p, "a"), 1)
        assert (res.migrated, res.failed) == (1, 0)
        await w.drain()
        new = (await w.pages(p, "a"))[0]
        assert (new.node, new.mlocked, new.unevictable, new.mlock_count) == (1, True, True, 2)
        assert (await w.pages(p, "b"))[0].pfn == new.pfn
        after = await w.delta()
        diff = {k: after[k] - before[k] for k in ("stranded", "rescued", "mlocked", "culled",
                                                  "cleared", "nr_mlock")}
        assert diff == {"stranded": 1, "rescued": 1, "mlocked": 1, "culled": 1, "cleared": 0,
                        "nr_mlock": 0}

    run(s, nodes=2)


def test_s15_failed_migration_undercounts_the_old_page(run: Any) -> None:
    """A reference held by CPU 1's batch (an mlock entry queued there) blocks the freeze."""

    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p = await w.proc()
        await w.mmap(p, "a", 1, file="f", shared=True)
        await w.mmap(p, "b", 1, file="f", shared=True, flags=0)
        await w.mlock(p, "a")
        await w.mlock(p, "b")
        await w.drain()
        # A third locked mapper unmaps on CPU 2, which then goes idle: its munlock entry
        # (and page reference) stays there; migration's local drains cannot reach it (S31).
        q = await w.proc()
        await w.kernel.mlockall(w.mid, q, MCL_FUTURE | MCL_ONFAULT)
        await w.mmap(q, "c", 1, file="f", shared=True)
        await w.touch(q, "c", write=False)
        await w.drain()
        await w.on(2).munmap(w.mid, q, *w.rng(q, "c"))
        migrator = w.kernel.migrator
        from mmsvc.mm.migrate import MigrateStats

        m = await w.kernel.machine(w.mid)
        page = (await w.pages(p, "a"))[0]
        stats = MigrateStats()
        lv, idx = page.pfn >> 32, page.pfn & 0xFFFFFFFF
        before = await w.delta()
        await migrator.migrate_page(m, lv, idx, m.lv_of(1, "root"), stats)
        assert (stats.migrated, stats.failed) == (0, 1)
        await w.drain()
        old = (await w.pages(p, "a"))[0]
        assert (old.pfn, old.mlocked, old.unevictable, old.mlock_count) == (
            page.pfn, True, True, 0)
        after = await w.delta()
        assert {k: after[k] - before[k] for k in ("stranded", "mlocked", "culled")} == {
            "stranded": 1, "mlocked": 1, "culled": 0}
        await w.drain(cpu=2)

    run(s, nodes=2)


def test_s26_munlockall_of_a_huge_unpopulated_prot_none_area_visits_no_page_table(
    run: Any,
) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        pages = 1 << 24  # 64 GiB
        await w.mmap(p, "m", pages, prot=0)
        await w.kernel.mlockall(w.mid, p, MCL_CURRENT)
        assert await w.locked_vm(p) == pages
        before = {r.lock_class: r.acquisitions for r in await w.kernel.lock_stat(w.mid)}
        t0 = time.perf_counter()
        await w.kernel.munlockall(w.mid, p)
        elapsed = time.perf_counter() - t0
        after = {r.lock_class: r.acquisitions for r in await w.kernel.lock_stat(w.mid)}
        assert await w.locked_vm(p) == 0
        assert after.get("ptl", 0) == before.get("ptl", 0)  # no page table was visited
        assert elapsed < 5  # a handful of round trips, not 16M lookups

    run(s, frames_per_node=1024)


def test_s26_legacy_munlock_looks_up_every_address(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        pages = 1 << 20  # 4 GiB
        await w.mmap(p, "m", pages, prot=0)
        await w.kernel.mlockall(w.mid, p, MCL_CURRENT)
        await w.kernel.munlockall(w.mid, p)
        assert w.kernel.legacy.costs.lookups == pages

    run(s, frames_per_node=1024, protocol="legacy")


def test_s12_page_in_the_lru_add_batch_when_mlocked(run: Any) -> None:
    """Order A (§8.2): one drain processes lru_add first, then the LRU_PAGE entry: the count
    is exact; never 2."""

    async def s(w: World) -> None:
        await w.file("f", 1)
        p = await w.proc()
        await w.kernel.mlockall(w.mid, p, MCL_FUTURE | MCL_ONFAULT)
        await w.mmap(p, "m", 1, file="f", shared=True)
        await w.touch(p, "m", write=False)  # read in: lru_add entry, then LRU_PAGE entry
        page = (await w.pages(p, "m"))[0]
        assert (page.mlocked, page.lru) == (True, False)
        await w.drain()
        page = (await w.pages(p, "m"))[0]
        assert (page.unevictable, page.mlock_count) == (True, 1)
        assert sub(await w.delta(), mlocked=1, culled=1) == {"mlocked": 1, "culled": 1}

    run(s)


def test_s12_order_b_mlock_batch_flushed_first_undercounts(run: Any) -> None:
    """Order B: the mlock batch is processed before the lru_add batch (batch length 1 for
    mlock): the entry finds the page off the LRU; lru-add culls it with count 0 (§8.2)."""

    async def s(w: World) -> None:
        await w.file("f", 1)
        p = await w.proc()
        await w.kernel.mlockall(w.mid, p, MCL_FUTURE | MCL_ONFAULT)
        await w.mmap(p, "m", 1, file="f", shared=True)
        await w.touch(p, "m", write=False)
        await w.drain()
        page = (await w.pages(p, "m"))[0]
        assert (page.mlocked, page.unevictable, page.mlock_count) == (True, True, 0)
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 1

    run(s, mlock_batch_len=1)


def test_s10_munlock_while_isolated_is_stranded_then_rescued_at_putback(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1)
        await w.touch(p, "m")
        await w.mlock(p, "m")
        await w.drain()
        assert await w.kernel.isolate(w.mid, p, *w.rng(p, "m")) == 1  # compaction isolates it
        assert (await w.delta())["nr_unev"] == 0  # isolation takes it off the unevictable LRU
        await w.munlock(p, "m")
        d = await w.delta()
        assert sub(d, stranded=1, munlocked=0, nr_mlock=0) == {
            "stranded": 1, "munlocked": 0, "nr_mlock": 0}
        await w.kernel.putback(w.mid, p, *w.rng(p, "m"))
        await w.drain()
        d = await w.delta()
        assert sub(d, rescued=1, inactive_anon=1) == {"rescued": 1, "inactive_anon": 1}
        assert d["mlocked"] == d["munlocked"] + d["stranded"] + d["cleared"]

    run(s)


def test_s11_mlock_while_isolated_undercounts_then_munlock_is_clean(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1)
        await w.touch(p, "m")
        await w.drain()
        assert await w.kernel.isolate(w.mid, p, *w.rng(p, "m")) == 1  # reclaim isolates it
        await w.mlock(p, "m")  # the LRU_PAGE entry finds it off the LRU: no cull
        d = await w.delta()
        assert (d["mlocked"], d["culled"]) == (1, 0)
        await w.kernel.putback(w.mid, p, *w.rng(p, "m"))
        await w.drain()
        page = (await w.pages(p, "m"))[0]
        assert (page.unevictable, page.mlock_count) == (True, 0)  # undercount, M = 1
        assert (await w.delta())["culled"] == 1
        await w.munlock(p, "m")
        assert sub(await w.delta(), munlocked=1, rescued=1) == {"munlocked": 1, "rescued": 1}

    run(s)


def test_s31_a_batch_left_on_another_cpu_waits_for_drain_all(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.mlock(p, "m", cpu=0)  # four NEW_PAGE entries queued on CPU 0
        await w.drain(cpu=1)  # the task "moved": CPU 1's drain does nothing for them
        assert sub(await w.delta(), nr_mlock=4, nr_unev=0) == {"nr_mlock": 4, "nr_unev": 0}
        await w.on(1).drain(w.mid, True)  # lru_add_drain_all from CPU 1
        assert (await w.delta())["nr_unev"] == 4

    run(s)


def test_two_putbacks_of_one_shared_page_put_it_back_once(run: Any, monkeypatch: Any) -> None:
    """The Putback API reads which pages it isolated, then puts them back: a racing Putback
    through another mapping of the same page may have put it back in between.  The second
    must find it on the LRU already and do nothing (before the fix: INTERNAL "lru_cache_add
    of a page already on the LRU", seen by the fuzzer)."""
    import mmsvc.mm.syscalls as syscalls

    async def s(w: World) -> None:
        p1, p2 = await w.sharers()
        assert await w.kernel.isolate(w.mid, p1, *w.rng(p1, "m")) == 1
        other = race_once(monkeypatch, syscalls, "read_pages",
                          lambda: w.on(1).putback(w.mid, p2, *w.rng(p2, "m")))
        assert await w.kernel.putback(w.mid, p1, *w.rng(p1, "m")) == 0
        assert other == [1]
        await w.drain_all()

    run(s)
