"""MADV_COLLAPSE of anonymous memory: collapse_huge_page (mmsvc/mm/khugepaged_anon.py).

The counts of the successful collapses are the host kernel's (tests/conformance traces
``collapse_anon_*``, recorded on Linux 6.18); these tests cover what the host cannot show:
failures that must change nothing, swap entries read in first, and a collapse racing others.
"""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.types import MAP_ANONYMOUS, MAP_PRIVATE, Advice, MmapArgs
from mmsvc.store import keys
from tests.protocol.test_thp import HINT, HPAGE
from tests.protocol.world import P, World, sub

COLLAPSE = Advice.MADV_COLLAPSE
# THPs only by MADV_COLLAPSE (as on a host with THP enabled=madvise)
CFG = {"thp": True, "thp_anon_fault": False, "frames_per_node": 8192}


async def anon_map(w: World, pid: int, name: str, pmds: int = 1) -> int:
    addr = await w.kernel.mmap(w.mid, pid, MmapArgs(pmds * HPAGE * P, 3,
                                                    MAP_PRIVATE | MAP_ANONYMOUS, addr=HINT))
    assert addr == HINT
    w.maps[(pid, name)] = (addr, pmds * HPAGE)
    return addr


async def huge_pmd(w: World, pid: int) -> bool:
    return bool(await w.store.client.exists(f"{keys.mm(w.mid, pid)}:hpmd:{HINT // P // HPAGE}"))


async def state(w: World, pid: int) -> list[tuple[Any, ...]]:
    return [(pg.present, pg.pfn, pg.mapcount, pg.refcount, pg.lru_list, pg.mlocked, pg.locked)
            for pg in await w.pages(pid, "m")]


def test_collapse_replaces_small_pages_by_a_pmd_mapped_thp(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await anon_map(w, p, "m")
        await w.touch(p, "m", 0, 64)
        await w.kernel.madvise(w.mid, p, *w.rng(p, "m"), COLLAPSE)
        assert await huge_pmd(w, p)
        pages = await w.pages(p, "m")
        assert all(pg.present for pg in pages)
        assert len({pg.pfn for pg in pages}) == 1  # the THP (its head's flags) everywhere
        await w.drain_all()
        d = await w.delta()
        assert d["inactive_anon"] == HPAGE  # the small pages were freed
        # collapsed already: SCAN_PMD_MAPPED, success without a change
        await w.kernel.madvise(w.mid, p, *w.rng(p, "m"), COLLAPSE)

    run(s, **CFG)


def test_a_pinned_page_fails_the_collapse_and_changes_nothing(run: Any) -> None:
    """SCAN_PAGE_COUNT: a GUP pin is a reference beyond the mappings' - EAGAIN, and the
    pages taken before it are put back unlocked."""

    async def s(w: World) -> None:
        p = await w.proc()
        await anon_map(w, p, "m")
        await w.touch(p, "m")
        await w.mlock(p, "m")
        await w.kernel.pin(w.mid, p, *w.rng(p, "m", 300, 301), True)
        await w.drain_all()
        before, counts = await state(w, p), await w.delta()
        with pytest.raises(KernelError) as exc:
            await w.kernel.madvise(w.mid, p, *w.rng(p, "m"), COLLAPSE)
        assert exc.value.errno == "EAGAIN"
        await w.drain_all()
        assert not await huge_pmd(w, p)
        assert await state(w, p) == before
        assert await w.delta() == counts

    run(s, **CFG)


def test_swap_entries_are_read_in_before_the_collapse(run: Any) -> None:
    """__collapse_huge_page_swapin: MADV_COLLAPSE has no max_ptes_swap; each swap entry is
    faulted in first, then the pmd collapses."""

    async def s(w: World) -> None:
        p = await w.proc()
        await anon_map(w, p, "m")
        await w.touch(p, "m")
        await w.kernel.madvise(w.mid, p, *w.rng(p, "m", 0, 100), Advice.MADV_PAGEOUT)
        assert sum(pg.present for pg in await w.pages(p, "m")) == HPAGE - 100
        await w.kernel.madvise(w.mid, p, *w.rng(p, "m"), COLLAPSE)
        assert await huge_pmd(w, p)
        assert all(pg.present for pg in await w.pages(p, "m"))

    run(s, **CFG, swap_pages=256)


def test_no_thp_frame_is_enomem_and_changes_nothing(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await anon_map(w, p, "m")
        await w.touch(p, "m")
        await w.drain_all()
        before = await state(w, p)
        with pytest.raises(KernelError) as exc:
            await w.kernel.madvise(w.mid, p, *w.rng(p, "m"), COLLAPSE)
        assert exc.value.errno == "ENOMEM"
        assert await state(w, p) == before
        assert not await huge_pmd(w, p)

    run(s, thp=True, thp_anon_fault=False, frames_per_node=HPAGE + 200)


async def split_thp(w: World, p: int) -> int:
    """A THP mapped by ptes (its pmd split by an mprotect of part of it), beside small
    pages; returns its pfn."""
    await anon_map(w, p, "m")
    await w.touch(p, "m", 0, 1)  # THP enabled=always: a THP at the first write
    await w.kernel.mprotect(w.mid, p, *w.rng(p, "m", 0, 1), 1)
    await w.kernel.mprotect(w.mid, p, *w.rng(p, "m", 0, 1), 3)
    assert not await huge_pmd(w, p)
    return (await w.pages(p, "m"))[0].pfn


def test_a_pte_mapped_thp_collapses_into_a_new_one(run: Any) -> None:
    """The THP is one folio of the isolation (compound_pagelist): its subpages are copied,
    each pte's rmap and reference go, and its putback frees it (as on the host kernel,
    trace collapse_anon_pte_mapped_thp)."""

    async def s(w: World) -> None:
        p = await w.proc()
        old = await split_thp(w, p)
        await w.drain_all()
        await w.kernel.madvise(w.mid, p, *w.rng(p, "m"), COLLAPSE)
        assert await huge_pmd(w, p)
        pages = await w.pages(p, "m")
        assert len({pg.pfn for pg in pages}) == 1 and pages[0].pfn != old
        await w.drain_all()
        assert (await w.delta())["inactive_anon"] == HPAGE  # the old THP was freed

    run(s, thp=True, frames_per_node=8192)


def test_a_pinned_pte_mapped_thp_fails_the_collapse_and_changes_nothing(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await split_thp(w, p)
        await w.kernel.pin(w.mid, p, *w.rng(p, "m", 300, 301), True)
        await w.drain_all()
        before, counts = await state(w, p), await w.delta()
        with pytest.raises(KernelError) as exc:
            await w.kernel.madvise(w.mid, p, *w.rng(p, "m"), COLLAPSE)
        assert exc.value.errno == "EAGAIN"  # SCAN_PAGE_COUNT
        await w.drain_all()
        assert await state(w, p) == before
        assert await w.delta() == counts

    run(s, thp=True, frames_per_node=8192)


def test_legacy_has_no_madv_collapse(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await anon_map(w, p, "m")
        await w.touch(p, "m", 0, 1)
        with pytest.raises(KernelError) as exc:
            await w.kernel.madvise(w.mid, p, *w.rng(p, "m"), COLLAPSE)
        assert exc.value.errno == "EINVAL"

    run(s, **CFG, protocol="legacy")


# ----------------------------------------------------------- large_folio_mlock (6.5+) -----
FOLIO = {**CFG, "large_folio_mlock": True, "swap_pages": 1024}


async def pte_mapped_thp(w: World, pid: int) -> None:
    """A THP (MADV_COLLAPSE) whose pmd an mlock of half of it split: mapped by 512 ptes."""
    await anon_map(w, pid, "m")
    await w.touch(pid, "m")
    await w.kernel.madvise(w.mid, pid, *w.rng(pid, "m"), COLLAPSE)
    await w.mlock(pid, "m", 0, HPAGE // 2)
    await w.munlock(pid, "m", 0, HPAGE // 2)
    assert not await huge_pmd(w, pid)


def test_a_zap_of_a_run_of_ptes_munlocks_the_thp_once(run: Any) -> None:
    """Two VM_LOCKED vmas (a process and its fork child) each mlock a pte-mapped THP: its
    mlock_count is 2.  The child's munmap removes 512 ptes in one run: one munlock
    (folio_remove_rmap_ptes), the THP stays mlocked for the parent; the parent's munmap
    then munlocks it."""

    async def s(w: World) -> None:
        p = await w.proc()
        await pte_mapped_thp(w, p)
        c = await w.kernel.fork(w.mid, p)
        w.maps[(c, "m")] = w.maps[(p, "m")]
        for pid in (p, c):
            # read-only first: the mlock's populate of a writable private mapping would
            # break COW and give each process its own small copies
            await w.kernel.mprotect(w.mid, pid, *w.rng(pid, "m"), 1)
            await w.mlock(pid, "m")
        await w.drain_all()
        page = (await w.pages(p, "m"))[0]
        assert (page.mlocked, page.mlock_count) == (True, 2)
        assert sub(await w.delta(), mlocked=HPAGE, culled=HPAGE) == {
            "mlocked": HPAGE, "culled": HPAGE}
        await w.munmap(c, "m")
        await w.drain_all()
        page = (await w.pages(p, "m"))[0]
        assert (page.mlocked, page.mlock_count) == (True, 1)
        assert sub(await w.delta(), munlocked=0) == {"munlocked": 0}
        await w.munmap(p, "m")
        await w.drain_all()
        assert sub(await w.delta(), munlocked=HPAGE, nr_mlock=0) == {
            "munlocked": HPAGE, "nr_mlock": 0}

    run(s, **FOLIO)


@pytest.mark.parametrize("folio", [False, True])
def test_reclaim_of_a_wholly_pte_mapped_thp_in_a_locked_vma(run: Any, folio: bool) -> None:
    """A missed mlock (VM_LOCKED stored, no walk) over a pte-mapped THP: with Linux 6.5+'s
    rules folio_referenced_one mlocks the THP, wholly mapped in the VM_LOCKED vma (culled
    and mlocked 512, not split); under §3.9 a pte mapping reports nothing and reclaim splits
    the THP (S18)."""
    from tests.protocol.test_swap import miss_mlock

    async def s(w: World) -> None:
        p = await w.proc()
        await pte_mapped_thp(w, p)
        await w.drain_all()
        await miss_mlock(w, p, "m")
        res = await w.kernel.reclaim(w.mid, None, None, 16)
        await w.drain_all()
        pages = await w.pages(p, "m")
        if folio:
            assert (res.reclaimed, res.culled) == (0, HPAGE)
            assert all(pg.mlocked for pg in pages) and len({pg.pfn for pg in pages}) == 1
            assert sub(await w.delta(), mlocked=HPAGE) == {"mlocked": HPAGE}
        else:
            # split, each small page then found in the VM_LOCKED vma and mlocked (S18)
            assert len({pg.pfn for pg in pages if pg.present}) == HPAGE
            assert res.culled == HPAGE and all(pg.mlocked for pg in pages)

    run(s, **{**FOLIO, "large_folio_mlock": folio})
