"""THP migration (mmsvc/mm/migrate_thp.py, spec §4 with §3.9): a THP moves whole - pmd
migration entries, the compound munlock at unmap and the compound mlock at restore that
rebuilds mlock_count (S13 for a THP), pte-mapped subpages uncounted, file THPs' page cache
slots moved, a pinned THP left in place (S15's undercount)."""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.types import MAP_LOCKED, Advice
from tests.protocol.test_thp import HPAGE, THP, thp_map
from tests.protocol.test_thp_file import collapse, file_map
from tests.protocol.world import P, World, race_once, sub

NUMA = {**THP, "nodes": 2}
EVENTS = ("stranded", "rescued", "mlocked", "munlocked", "culled", "cleared")


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in EVENTS}


def test_s13_for_a_thp_migration_rebuilds_the_compound_count(run: Any) -> None:
    """A pmd-mapped THP in a VM_LOCKED vma (S19: cnt 1) moves to node 1: the unmap's
    compound munlock finds it isolated (stranded 512), the new THP goes on the LRU first
    carrying PG_unevictable (rescued 512 at lru-add) and the restored pmd mlocks it whole
    (mlocked 512, culled 512): cnt 1 again, nr_mlock unchanged - S13's figures times 512."""

    async def s(w: World) -> None:
        p = await w.proc()
        await thp_map(w, p, "m", 1, MAP_LOCKED)
        old = (await w.pages(p, "m"))[0]
        assert (old.node, old.mlock_count, old.mapcount) == (0, 1, 1)
        before = await w.delta()
        res = await w.kernel.migrate(w.mid, p, *w.rng(p, "m"), 1)
        assert (res.migrated, res.failed, res.errno) == (1, 0, "")
        after = await w.delta()
        assert diff(after, before) == {"stranded": HPAGE, "rescued": HPAGE, "mlocked": HPAGE,
                                       "munlocked": 0, "culled": HPAGE, "cleared": 0}
        assert sub(after, nr_mlock=HPAGE, nr_unev=HPAGE) == {"nr_mlock": HPAGE,
                                                            "nr_unev": HPAGE}
        pages = await w.pages(p, "m")
        assert len({pg.pfn for pg in pages}) == 1 and pages[0].pfn != old.pfn
        new = pages[0]
        assert (new.node, new.mlocked, new.unevictable, new.mlock_count, new.mapcount) == (
            1, True, True, 1, 1)
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 0, report.violations
        await w.munmap(p, "m")
        assert sub(await w.delta(), nr_mlock=0, nr_unev=0) == {"nr_mlock": 0, "nr_unev": 0}
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **NUMA)


def test_a_pte_mapped_thp_moves_whole_and_its_ptes_stay_uncounted(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        addr = await thp_map(w, p, "m", 1)
        await w.touch(p, "m", 0, 1)
        await w.kernel.mprotect(w.mid, p, addr + 8 * P, P, 1)  # the pmd split: 512 ptes
        before = await w.delta()
        res = await w.kernel.migrate(w.mid, p, *w.rng(p, "m"), 1)
        assert (res.migrated, res.failed) == (1, 0)
        pages = await w.pages(p, "m")
        assert all(pg.present and pg.node == 1 for pg in pages)
        assert len({pg.pfn for pg in pages}) == 1 and pages[0].mapcount == 0
        assert diff(await w.delta(), before) == dict.fromkeys(EVENTS, 0)
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **NUMA)


def test_a_file_thp_moves_with_its_page_cache_slots(run: Any) -> None:
    """A collapsed shmem THP mapped by two processes' pmds, one of them VM_LOCKED (cnt 1):
    after the move every slot names the new THP, both pmds map it, the count is rebuilt."""

    async def s(w: World) -> None:
        await w.file("f", HPAGE, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        await file_map(w, p1, "m", flags=MAP_LOCKED)
        await collapse(w, p1, "m")
        await file_map(w, p2, "m")
        await w.touch(p2, "m", 0, 1, write=False)
        old = (await w.pages(p1, "m"))[0]
        assert (old.mapcount, old.mlock_count) == (2, 1)
        res = await w.kernel.migrate(w.mid, p2, *w.rng(p2, "m"), 1)
        assert (res.migrated, res.failed) == (1, 0)
        new = (await w.pages(p1, "m"))[0]
        assert (new.node, new.mapcount, new.mlocked, new.mlock_count) == (1, 2, True, 1)
        assert (await w.pages(p2, "m"))[0].pfn == new.pfn != old.pfn
        files = await w.kernel.file_pages(w.mid, "f")
        assert {pg.pfn for pg in files} == {new.pfn}
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 0, report.violations

    run(s, **NUMA)


def test_a_pinned_thp_stays_and_its_count_is_undercounted(run: Any) -> None:
    """A GUP pin holds a reference no freeze can account for: every pass fails (EAGAIN),
    the old THP's pmd comes back and its mlock finds it isolated - putback culls it with
    mlock_count 0, the allowed undercount of §4.2.5 (S15 for a THP)."""

    async def s(w: World) -> None:
        p = await w.proc()
        await thp_map(w, p, "m", 1, MAP_LOCKED)
        old = (await w.pages(p, "m"))[0]
        await w.kernel.pin(w.mid, p, w.rng(p, "m")[0], P, write=False)
        res = await w.kernel.migrate(w.mid, p, *w.rng(p, "m"), 1)
        assert (res.migrated, res.failed, res.errno) == (0, 1, "EAGAIN")
        now = (await w.pages(p, "m"))[0]
        assert (now.pfn, now.node, now.mlocked, now.unevictable, now.mapcount) == (
            old.pfn, 0, True, True, 1)
        assert now.mlock_count == 0
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 1, report.violations

    run(s, **NUMA)


def test_dontneed_cutting_through_a_migrating_pmd_splits_its_entry(run: Any,
                                                                   monkeypatch: Any) -> None:
    """MADV_DONTNEED of 8 pages of a THP while its pmd is a migration entry: the zap splits
    the entry into pte migration entries (__split_huge_pmd) and clears its 8; the restore
    maps the other 504 subpages of the new THP by ptes (uncounted, §3.9)."""

    async def s(w: World) -> None:
        p = await w.proc()
        await thp_map(w, p, "m", 1)
        await w.touch(p, "m", 0, 1)
        race_once(monkeypatch, w.kernel.thp_migrator, "_move",
                  lambda: w.on(1).madvise(w.mid, p, *w.rng(p, "m", 0, 8),
                                          Advice.MADV_DONTNEED), before=True)
        res = await w.kernel.migrate(w.mid, p, *w.rng(p, "m"), 1)
        assert (res.migrated, res.failed) == (1, 0)
        pages = await w.pages(p, "m")
        assert [pg.present for pg in pages] == [False] * 8 + [True] * (HPAGE - 8)
        assert {(pg.pfn, pg.node, pg.mapcount) for pg in pages[8:]} == {
            (pages[8].pfn, 1, 0)}
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        await w.touch(p, "m", 3, 4)  # refaulted: a small page
        assert (await w.kernel.check(w.mid, True)).ok
        await w.munmap(p, "m")
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **NUMA)


class CpuDied(BaseException):
    """The migrating CPU stops dead (SIGKILL of its worker): nothing undone."""


def test_a_cpu_dying_with_a_pmd_migration_entry_is_repaired(run: Any,
                                                             monkeypatch: Any) -> None:
    """The worker migrating a VM_LOCKED THP dies after its unmap (a pmd migration entry in
    place, the THP isolated, locked, munlocked): the survivor's recovery maps the THP back
    by its pmd (`pt_markers` reports the pmd entry) and recounts; after a full drain the
    checker is green - the THP stays mlocked or is an allowed undercount."""

    async def s(w: World) -> None:
        p = await w.proc()
        await thp_map(w, p, "m", 1, MAP_LOCKED)

        async def dies(*args: Any) -> None:
            raise CpuDied

        monkeypatch.setattr(w.kernel.thp_migrator, "_move", dies)
        monkeypatch.setattr(w.kernel.thp_migrator, "_restore", dies)
        with pytest.raises(CpuDied):
            await w.kernel.migrate(w.mid, p, *w.rng(p, "m"), 1)
        survivor = w.on(1)
        await survivor.drain(w.mid, True)
        repairs = await survivor.recover_dead_cpu(w.mid, 0)
        assert repairs["marker_restored"] == 1, repairs
        pages = await survivor.page_flags(w.mid, p, *w.rng(p, "m"))
        assert all(pg.present for pg in pages) and pages[0].mapcount == 1
        report = await survivor.check(w.mid, True)
        assert report.ok, report.violations
        await survivor.exit(w.mid, p)
        assert (await survivor.check(w.mid, True)).ok

    run(s, **NUMA)


def test_legacy_thp_migration_mlocks_the_new_thp_again(run: Any) -> None:
    """Legacy (5.17): the unmap's page_remove_rmap takes the THP's last mapping and
    clear_page_mlock clears PG_mlocked (cleared 512); remove_migration_pmd mlocks the new
    THP in the VM_LOCKED vma (mlocked 512), culled at putback: mlocked and unevictable on
    node 1, nr_mlock as before."""

    async def s(w: World) -> None:
        p = await w.proc()
        await thp_map(w, p, "m", 1, MAP_LOCKED)
        await w.drain()
        before = await w.delta()
        assert before["nr_mlock"] == HPAGE
        res = await w.kernel.migrate(w.mid, p, *w.rng(p, "m"), 1)
        assert (res.migrated, res.failed) == (1, 0)
        await w.drain()
        after = await w.delta()
        d = diff(after, before)
        assert (d["cleared"], d["mlocked"]) == (HPAGE, HPAGE), d
        new = (await w.pages(p, "m"))[0]
        assert (new.node, new.mlocked, new.unevictable, new.mapcount) == (1, True, True, 1)
        assert after["nr_mlock"] == HPAGE
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        await w.munmap(p, "m")
        assert (await w.delta())["nr_mlock"] == 0
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **NUMA, protocol="legacy")
