"""split_huge_page in reclaim (spec S18, §3.9, §5.2.5, §2.10): a pte-mapped anonymous THP in a
VM_LOCKED vma is counted nowhere until reclaim splits it; the remap through migration entries
then mlocks each subpage, and reclaim's putback culls them."""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.types import MAP_LOCKED
from tests.protocol.test_thp import HPAGE, THP, thp_map
from tests.protocol.world import P, World, sub

SWAP = {**THP, "swap_pages": 1024}
FREE_KB = 8192 * 4


async def pte_mapped_locked_thp(w: World) -> int:
    """S19's start: a THP faulted in a VM_LOCKED vma, then one 4 KiB subrange mprotected (vma
    split -> pmd split -> munlock(compound)): pte-mapped in VM_LOCKED vmas, counted nowhere."""
    p = await w.proc()
    addr = await thp_map(w, p, "m", 1, MAP_LOCKED)
    await w.kernel.mprotect(w.mid, p, addr + 8 * P, P, 1)
    d = await w.delta()
    assert sub(d, mlocked=512, munlocked=512, nr_mlock=0, nr_unev=0) == {
        "mlocked": 512, "munlocked": 512, "nr_mlock": 0, "nr_unev": 0}
    return p


def test_s18_walk_and_pte_unmap_skip_then_reclaim_splits_and_mlocks_subpages(run: Any) -> None:
    async def s(w: World) -> None:
        p = await pte_mapped_locked_thp(w)
        base = await w.delta()
        # the mlock walk skips a pte-mapped THP (Δmlocked 0), in either direction
        await w.munlock(p, "m")
        await w.mlock(p, "m")
        await w.drain()
        # its pte removal in a VM_LOCKED vma never counts: munmap one subpage
        addr, _ = w.rng(p, "m")
        await w.kernel.munmap(w.mid, p, addr + 100 * P, P)
        await w.drain()
        d = await w.delta()
        assert sub(d, mlocked=base["mlocked"], munlocked=base["munlocked"], nr_mlock=0) == {
            "mlocked": base["mlocked"], "munlocked": base["munlocked"], "nr_mlock": 0}
        pages = await w.pages(p, "m")
        head_pfn = pages[0].pfn
        assert all(pg.pfn == head_pfn and not pg.mlocked for i, pg in enumerate(pages)
                   if i != 100)
        assert (await w.kernel.check(w.mid, True)).ok

        # reclaim treats those ptes as unlocked and splits the THP; each restored pte of a
        # small page in a VM_LOCKED vma mlocks it; putback culls it (mlock_count 0)
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        await w.drain()
        d = await w.delta()
        assert sub(d, mlocked=d["mlocked"], culled=d["culled"]) == sub(
            d, mlocked=base["mlocked"] + 511, culled=base["culled"] + 511)
        assert sub(d, nr_mlock=511, nr_unev=511, munlocked=base["munlocked"]) == {
            "nr_mlock": 511, "nr_unev": 511, "munlocked": base["munlocked"]}
        # scanned: the THP's 512 pages; reclaimed: subpage 100, unmapped (munmap above), on
        # reclaim's list after the split like every tail: written to swap and freed
        assert (res.scanned, res.reclaimed, res.culled) == (512, 1, 511)
        pages = await w.pages(p, "m")
        mapped = [pg for i, pg in enumerate(pages) if i != 100]
        assert len({pg.pfn for pg in mapped}) == 511  # 511 small pages now
        assert all(pg.mlocked and pg.unevictable and pg.mapcount == 1 and pg.refcount == 1
                   and pg.mlock_count == 0 for pg in mapped)
        assert not pages[100].present
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        # subpage 100 was freed; the other 511 frames are the small pages'
        assert (await w.kernel.meminfo(w.mid))["MemFree"] == FREE_KB - 511 * 4

        # small pages now (§3.9): munmap munlocks each, exit frees everything
        await w.kernel.munmap(w.mid, p, addr, 50 * P)
        await w.drain()
        d2 = await w.delta()
        assert sub(d2, munlocked=d["munlocked"] + 50, nr_mlock=461) == {
            "munlocked": d["munlocked"] + 50, "nr_mlock": 461}
        await w.kernel.exit(w.mid, p)
        await w.drain()
        d3 = await w.delta()
        assert sub(d3, nr_mlock=0, nr_unev=0, cleared=0) == {
            "nr_mlock": 0, "nr_unev": 0, "cleared": 0}
        assert (await w.kernel.meminfo(w.mid))["MemFree"] == FREE_KB
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **SWAP)


def test_split_subpages_of_an_unlocked_thp_are_swapped_out(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        addr = await thp_map(w, p, "m", 1)
        await w.touch(p, "m", 0, 1)
        await w.kernel.mprotect(w.mid, p, addr + 8 * P, P, 1)  # pmd split: pte-mapped
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        # split, then each subpage follows small-page reclaim: swapped out and freed
        assert (res.scanned, res.reclaimed) == (HPAGE, HPAGE)
        assert not any(pg.present for pg in await w.pages(p, "m"))
        assert (await w.kernel.meminfo(w.mid))["MemFree"] == FREE_KB
        assert (await w.kernel.check(w.mid, True)).ok
        await w.touch(p, "m", 3, 4)  # swap-in of one subpage: a small page
        assert (await w.pages(p, "m"))[3].present
        await w.kernel.exit(w.mid, p)
        await w.drain()  # the swapped-in page's lru_add entry
        assert (await w.kernel.meminfo(w.mid))["MemFree"] == FREE_KB
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **SWAP)


def test_reclaim_splits_a_pmd_mapped_thp_too(run: Any) -> None:
    """A pmd-mapped anonymous THP: add_to_swap of a THP fails (the emulated swap area has
    no THP clusters, as with CONFIG_THP_SWAP off), so shrink_page_list falls back to
    split_huge_page_to_list, whose unmap_folio splits the pmd first (TTU_SPLIT_HUGE_PMD);
    both THPs end as small pages swapped out."""
    async def s(w: World) -> None:
        p = await w.proc()
        addr = await thp_map(w, p, "m", 2)
        await w.touch(p, "m", 0, 1)
        await w.touch(p, "m", HPAGE, HPAGE + 1)
        await w.kernel.mprotect(w.mid, p, addr + (HPAGE + 8) * P, P, 1)  # second THP: ptes
        assert (await w.pages(p, "m"))[0].mapcount == 1  # the first one: by its pmd
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert (res.scanned, res.reclaimed) == (2 * HPAGE, 2 * HPAGE)
        assert not any(pg.present for pg in await w.pages(p, "m"))
        assert (await w.kernel.vmstat(w.mid))["pswpout"] == 2 * HPAGE
        assert (await w.kernel.check(w.mid, True)).ok
        await w.touch(p, "m", 3, 4)  # swapped in: a small page now
        assert (await w.pages(p, "m"))[3].present
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **SWAP)


def test_thp_pte_holds_in_locked_vma_keeps_the_thp_whole(run: Any) -> None:
    """§10.1 ``thp_pte_holds_in_locked_vma`` (§5.2.2 [open]: "whether a pte-mapped subpage
    should hold the whole THP"): on, the pte mappings of the S18 THP in its VM_LOCKED vmas
    report VM_LOCKED, so reclaim activates it unsplit - and does not mlock it, a pte mapping
    of a THP is never counted (§3.9).  The default (off) splits it: the test above."""
    async def s(w: World) -> None:
        p = await pte_mapped_locked_thp(w)
        base = await w.delta()
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        await w.drain()
        d = await w.delta()
        assert (res.reclaimed, res.culled) == (0, 0)
        assert sub(d, mlocked=0, munlocked=0, culled=0, nr_mlock=0, nr_unev=0) == sub(
            base, mlocked=0, munlocked=0, culled=0, nr_mlock=0, nr_unev=0)
        pages = await w.pages(p, "m")
        assert len({pg.pfn for pg in pages}) == 1  # still one THP
        assert not any(pg.mlocked for pg in pages)
        assert (await w.kernel.vmstat(w.mid))["pswpout"] == 0

    run(s, **SWAP, thp_pte_holds_in_locked_vma=True)


class CpuDied(BaseException):
    """The CPU splitting the THP stops dead (SIGKILL of its worker): nothing undone."""


@pytest.mark.parametrize("after", ["_unmap_folio", "split"])
def test_a_cpu_dying_mid_split_is_repaired_by_recovery(run: Any, monkeypatch: Any,
                                                       after: str) -> None:
    """Reclaim's split_huge_page dies after unmap_folio (subpage ptes are migration entries
    naming the THP) or after __split_huge_page too (the THP is 512 small pages, the entries
    still name the head): the survivor's recovery maps each entry back - to the THP's
    subpage, or to the small page that subpage became (the entry keeps its number) - and
    recounts; the checker is green and every page is mapped where it was."""

    async def s(w: World) -> None:
        p = await w.proc()
        addr = await thp_map(w, p, "m", 1)
        await w.touch(p, "m", 0, 1)
        await w.kernel.mprotect(w.mid, p, addr + 8 * P, P, 1)  # the pmd split: 512 ptes
        huge = w.kernel.vmscan.huge
        name = "_unmap_folio" if after == "_unmap_folio" else "_remap"
        real = getattr(huge, name)

        async def dies(*args: Any) -> Any:
            if after == "_unmap_folio":
                await real(*args)
            raise CpuDied

        monkeypatch.setattr(huge, name, dies)
        with pytest.raises(CpuDied):
            await w.kernel.reclaim(w.mid, None, None, 32)
        survivor = w.on(1)
        await survivor.drain(w.mid, True)
        repairs = await survivor.recover_dead_cpu(w.mid, 0)
        assert repairs["marker_restored"] == HPAGE, repairs
        pages = await survivor.page_flags(w.mid, p, *w.rng(p, "m"))
        assert all(pg.present for pg in pages)
        assert len({pg.pfn for pg in pages}) == (1 if after == "_unmap_folio" else HPAGE)
        report = await survivor.check(w.mid, True)
        assert report.ok, report.violations
        await survivor.exit(w.mid, p)
        assert (await survivor.check(w.mid, True)).ok

    run(s, **SWAP)
