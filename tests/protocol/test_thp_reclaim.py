"""S17 (spec §5.2, [13/13]): reclaim avoids splitting a VM_LOCKED THP.

A pmd-mapped THP in a VM_LOCKED vma whose mlock was missed (PG_mlocked clear) is found by
reclaim's page_referenced_one, which "restores the mlock which got missed" on the compound
page - its batch entry is flushed at once, being a THP head - and activates it: the THP is
culled whole (Δmlocked 512, Δculled 512), never split.  With ``reclaim_locked_activate`` off
the verdict is RECLAIM and the THP is split before the mlock is discovered (the waste 13/13
removes); each subpage is then a small page of a VM_LOCKED vma (§5.2.5).

The spec's THP is a file THP (tests/protocol/test_thp_file.py since session 6); here the
scenario runs on an anonymous THP with swap - reclaim scans the anon lists only then.  The
rule under test (page_referenced_one on a pmd mapping) is the same.
"""

from __future__ import annotations

from typing import Any

from mmsvc.mm.types import MAP_LOCKED
from tests.protocol.test_thp import HPAGE, THP, thp_map
from tests.protocol.world import World, sub

SWAP = {**THP, "swap_pages": 1024}


async def missed_thp_mlock(w: World) -> tuple[int, int]:
    """A THP pmd-mapped by two VM_LOCKED vmas (a MAP_LOCKED parent and its child that
    mlocked its copy of the mapping, read-only so that mlock's populate does not break COW:
    mlock_count 2), isolated (compaction) while the parent
    munlocks it: off the LRU, munlock_page "assumes that was the last mlock" (§2.6.3) and
    clears PG_mlocked, the child's VM_LOCKED mapping notwithstanding; putback rescues it to
    inactive_anon.  S17's start: PG_mlocked clear in a VM_LOCKED vma, on an inactive list."""
    parent = await w.proc()
    await thp_map(w, parent, "m", 1, MAP_LOCKED)
    child = await w.kernel.fork(w.mid, parent)
    w.maps[(child, "m")] = w.maps[(parent, "m")]
    await w.kernel.mprotect(w.mid, child, *w.rng(child, "m"), 1)
    await w.mlock(child, "m")
    await w.drain()
    assert (await w.pages(child, "m"))[0].mlock_count == 2
    assert await w.kernel.isolate(w.mid, parent, *w.rng(parent, "m")) == 1
    await w.munlock(parent, "m")
    await w.kernel.putback(w.mid, parent, *w.rng(parent, "m"))
    await w.drain()
    head = (await w.pages(child, "m"))[0]
    assert (head.mlocked, head.lru_list, head.vma_locked, head.mapcount) == (
        False, "inactive_anon", True, 2)
    report = await w.kernel.check(w.mid, True)
    assert report.ok and report.undercounts == 1, report.violations
    return parent, child


def test_s17_reclaim_mlocks_a_locked_pmd_mapped_thp_whole(run: Any) -> None:
    async def s(w: World) -> None:
        _parent, child = await missed_thp_mlock(w)
        base = await w.delta()
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        # no drain needed: the THP head's mlock entry was flushed at once
        d = await w.delta()
        assert (d["mlocked"] - base["mlocked"], d["culled"] - base["culled"]) == (HPAGE, HPAGE)
        assert sub(d, nr_mlock=HPAGE, nr_unev=HPAGE) == {"nr_mlock": HPAGE, "nr_unev": HPAGE}
        assert (res.scanned, res.reclaimed, res.culled) == (HPAGE, 0, HPAGE)
        pages = await w.pages(child, "m")
        assert len({pg.pfn for pg in pages}) == 1  # still one THP: not split
        # The entry ran while reclaim had the THP isolated (§2.4.1: nothing to count off the
        # LRU) and putback's lru-add culled it with mlock_count 0 (§5.1.2): one VM_LOCKED
        # mapping, count 0 - an undercount as Linux leaves it; the child's munlock then
        # "assumes that was the last mlock" and is exact.
        assert (pages[0].mlocked, pages[0].unevictable, pages[0].mlock_count) == (True, True, 0)
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 1, report.violations
        await w.munlock(child, "m")
        await w.drain()
        d2 = await w.delta()
        assert (d2["munlocked"] - d["munlocked"], d2["rescued"] - d["rescued"]) == (HPAGE, HPAGE)
        assert sub(d2, nr_mlock=0, nr_unev=0) == {"nr_mlock": 0, "nr_unev": 0}
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 0, report.violations

    run(s, **SWAP)


def test_s17_without_13_13_the_thp_is_split_before_the_mlock_is_found(run: Any) -> None:
    """``reclaim_locked_activate`` off (before 13/13): page_referenced_one does not report the
    VM_LOCKED pmd mapping, the verdict is RECLAIM, and add_to_swap of the THP fails (no THP
    swap here), so it is split: unmap_folio splits both huge pmds (TTU_SPLIT_HUGE_PMD) and
    turns the ptes into migration entries, and the remap puts back small pages - "the waste
    13/13 removes".  Then base-kernel split behaviour (§5.2.5): each restored pte in the
    child's VM_LOCKED vma mlocks its small page (Δmlocked 512), which reclaim then keeps and
    putback culls (Δculled 512); nothing is swapped."""

    async def s(w: World) -> None:
        parent, child = await missed_thp_mlock(w)
        base = await w.delta()
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        await w.drain()
        d = await w.delta()
        assert (d["mlocked"] - base["mlocked"], d["culled"] - base["culled"]) == (HPAGE, HPAGE)
        assert (res.scanned, res.reclaimed, res.culled) == (HPAGE, 0, HPAGE)
        pages = await w.pages(child, "m")
        assert len({pg.pfn for pg in pages}) == HPAGE  # split
        assert all(pg.mlocked and pg.unevictable for pg in pages)
        assert [pg.pfn for pg in await w.pages(parent, "m")] == [pg.pfn for pg in pages]
        assert (await w.kernel.vmstat(w.mid))["pswpout"] == 0
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        await w.munlock(child, "m")
        await w.drain()
        assert sub(await w.delta(), nr_mlock=0, nr_unev=0) == {"nr_mlock": 0, "nr_unev": 0}
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **SWAP, reclaim_locked_activate=False)
