"""mm/khugepaged.c: collapse_huge_page, as madvise(MADV_COLLAPSE) runs it on anonymous memory
(spec §3.3: "anon THP collapse" adds the new THP as a new anonymous page; §3.4: the small
pages leave through page_remove_rmap and its munlock hook).

For one aligned pmd of a private anonymous vma, under the mmap_lock for write (the caller's
MADV_COLLAPSE takes it so) and the vma's anon_vma locks for write:

1. hpage_collapse_scan_pmd: the vma must have an anon_vma (SCAN_VMA_CHECK: EINVAL) and the
   pmd a page table (SCAN_PMD_NULL: EINVAL) - read-only and zero-page ptes collapse too, as
   on the host kernel; a huge pmd there already is success (SCAN_PMD_MAPPED).  Swap entries
   are read in first (__collapse_huge_page_swapin: read faults, then a local drain).  Ptes
   of a THP's subpages (a pte-mapped THP: after mprotect or munmap of part of it, a COW
   of it after fork) collapse too, as on the host kernel: the THP is one folio of the
   isolation's compound_pagelist.  MADV_COLLAPSE has no max_ptes_none/shared/swap limits.
2. The THP is allocated (SCAN_ALLOC_HUGE_PAGE_FAIL: ENOMEM).
3. __collapse_huge_page_isolate, folio by folio (a large one once): lock (SCAN_PAGE_LOCK:
   EAGAIN), references exactly the mappings' (+ the swap cache's) (SCAN_PAGE_COUNT: EAGAIN),
   isolate from its LRU - the unevictable one too (SCAN_DEL_PAGE_LRU: EAGAIN).  On a failure
   the folios taken go back (release_pte_pages: unlocked, put back), nothing else changed.
4. The ptes go (pmdp_collapse_flush, then each pte cleared); __collapse_huge_page_copy_
   succeeded for each small page: release_pte_folio (unlock, folio_putback_lru: through the
   lru_add batch), folio_remove_rmap_pte (the munlock hook in a VM_LOCKED vma) and the
   mapping's reference; for a THP's run of ptes one folio_remove_rmap_ptes (with the
   large-folio rules, one munlock in a VM_LOCKED vma) and each pte's reference, then the
   compound_pagelist: unlocked and put back (freed with its isolation reference, the last);
   the zero page's ptes just go.
5. The THP: folio_add_new_anon_rmap + folio_add_lru_vma (mlock_new_folio in a VM_LOCKED vma:
   a THP head, flushed at once), mapped by the pmd (the emptied page table freed first).
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import HPAGE_ORDER, THP_FLAGS, Faults, read_pages
from mmsvc.mm.mm_struct import MmState, Pte, pt_install, pt_read
from mmsvc.mm.page import PG, PTRS_PER_PMD, PTEBit
from mmsvc.mm.rmap import (
    Rmap,
    new_anon_ops,
    pte_unmap_ops,
    subpage_runs,
    vma_rmap_lock_keys,
    zap_ops,
)
from mmsvc.mm.swap import Op, OutOfFrames, Swap
from mmsvc.mm.swapfile import swap_ptes
from mmsvc.mm.vma import VM, Vma
from mmsvc.store.redis_store import RedisStore


class AnonCollapse:
    """collapse_huge_page on behalf of one CPU."""

    def __init__(self, store: RedisStore, swap: Swap, rmap: Rmap, faults: Faults) -> None:
        self.store = store
        self.swap = swap
        self.rmap = rmap
        self.faults = faults

    async def collapse(self, m: Machine, mm: MmState, vma: Vma, pmd: int) -> None:
        """Collapse the aligned pmd (wholly inside vma) into a THP mapped by it."""
        base = pmd * PTRS_PER_PMD
        if await self.store.client.exists(f"{mm.key}:hpmd:{pmd}"):
            return  # SCAN_PMD_MAPPED: a THP maps it already
        if not vma.anon_vma:
            # hugepage_vma_revalidate: only read faults so far (the zero page), no anon_vma
            raise einval("MADV_COLLAPSE: the mapping has no anonymous pages (SCAN_VMA_CHECK)")
        if await swap_ptes(self.store, mm.key, base, base + PTRS_PER_PMD):
            await self._swapin(m, mm, vma, base)
        if not await self.store.client.exists(f"{mm.key}:pt:{pmd}"):
            raise einval("MADV_COLLAPSE: no page table there (SCAN_PMD_NULL)")
        async with AsyncExitStack() as stack:
            # anon_vma_lock_write: rmap walkers keep off the pages while they move
            for key in vma_rmap_lock_keys(m, vma):
                await stack.enter_async_context(self.rmap.locks.hold(key, "w"))
            ptes = await pt_read(self.store, mm.key, base, base + PTRS_PER_PMD, walk=True)
            folios = self._scan(ptes)
            head = await self._alloc(m, mm, vma, base)
            try:
                await self._isolate(m, folios)
            except BaseException:
                await self.swap.run(m, mm.lv, [["P", head]])  # the THP goes back
                raise
            await self._copy_succeeded(m, mm, vma, ptes)
        await self._map(m, mm, vma, pmd, head)

    async def _swapin(self, m: Machine, mm: MmState, vma: Vma, base: int) -> None:
        """__collapse_huge_page_swapin: each swap entry of the pmd read in (do_swap_page)."""
        for vpn in sorted(await swap_ptes(self.store, mm.key, base, base + PTRS_PER_PMD)):
            await self.faults.fault_range(m, mm, vma, vpn, vpn + 1, False)
        # "Drain LRU cache to remove extra pin on the swapped in pages"
        await self.swap.lru_add_drain(m)

    @staticmethod
    def _scan(ptes: dict[int, Pte]) -> list[Pte]:
        """hpage_collapse_scan_pmd's checks of the ptes; returns one pte per folio: a small
        page's, or the first of a THP's subpage ptes.  Nothing needs to be writable, nor
        present: Linux 6.18 collapses read-only ptes (after fork, mprotect), a pmd of
        zero-page ptes and pte-mapped THPs alike (the host kernel does)."""
        folios: dict[tuple[int, int], Pte] = {}
        for pte in sorted(ptes.values(), key=lambda p: p.vpn):
            if pte.bits & PTEBit.ZERO:
                continue
            folios.setdefault((pte.lv, pte.idx), pte)
        return list(folios.values())

    async def _alloc(self, m: Machine, mm: MmState, vma: Vma, base: int) -> int:
        """alloc_charge_folio: the new THP, with the allocation's reference."""
        try:
            res = await self.swap.run(m, mm.lv, [
                ["A", THP_FLAGS, vma.anon_vma, vma.linear_index(base), HPAGE_ORDER],
                ["G", -1]])
        except OutOfFrames as exc:
            raise KernelError("ENOMEM", "MADV_COLLAPSE: no THP could be allocated "
                                        "(SCAN_ALLOC_HUGE_PAGE_FAIL)") from exc
        return res.allocs[0]

    async def _isolate(self, m: Machine, small: list[Pte]) -> None:
        """__collapse_huge_page_isolate, phase by phase for all the folios (one pte each; one
        page program per lruvec per phase; Linux goes folio by folio - the counts are the
        same, only a failure leaves fewer touched here): lock each (SCAN_PAGE_LOCK), check
        that its references are its mappings' (a THP: its pmd and pte mappings; + the swap
        cache's, SCAN_PAGE_COUNT), isolate it (SCAN_DEL_PAGE_LRU); on a failure the folios
        taken are released."""
        records = await read_pages(self.store, m, [(p.lv, p.idx) for p in small])
        if any(not page.has(PG.ANON) or page.has(PG.KSM) for page in records):
            raise einval("MADV_COLLAPSE: not an anonymous page (SCAN_PAGE_ANON)")
        by_lv: dict[int, list[Pte]] = {}
        for pte in small:
            by_lv.setdefault(pte.lv, []).append(pte)
        locked: list[Pte] = []
        isolated: set[tuple[int, int]] = set()
        try:
            busy = 0
            for lv, ptes in by_lv.items():
                failed = set((await self.swap.run(m, lv, [["O", p.idx] for p in ptes])).failed)
                locked += [p for p in ptes if p.idx not in failed]
                busy += len(failed)
            if busy:
                raise KernelError("EAGAIN", "MADV_COLLAPSE: a page of the range is locked "
                                            "(SCAN_PAGE_LOCK)")
            pages = await read_pages(self.store, m, [(p.lv, p.idx) for p in small])
            if any(page.refcount != page.mapcount + page.pte_mapcount
                   + (1 if page.has(PG.SWAPCACHE) else 0) for page in pages):
                raise KernelError("EAGAIN", "MADV_COLLAPSE: a page of the range has "
                                            "references beyond its mappings (SCAN_PAGE_COUNT)")
            for lv, ptes in by_lv.items():
                res = await self.swap.run(m, lv, [["I", p.idx] for p in ptes])
                isolated |= {(lv, i) for i in res.isolated}
            if len(isolated) != len(small):
                raise KernelError("EAGAIN", "MADV_COLLAPSE: a page of the range is not on an "
                                            "LRU (SCAN_DEL_PAGE_LRU)")
        except BaseException:
            await self._release(m, locked, isolated)
            raise

    async def _release(self, m: Machine, locked: list[Pte],
                       isolated: set[tuple[int, int]]) -> None:
        """release_pte_pages: each page taken unlocked and, if isolated, put back."""
        by_lv: dict[int, list[Op]] = {}
        for pte in locked:
            ops = by_lv.setdefault(pte.lv, [])
            ops.append(["F", pte.idx, 0, int(PG.LOCKED)])
            if (pte.lv, pte.idx) in isolated:
                ops.append(["B", pte.idx, 0])
        for lv, ops in by_lv.items():
            await self.swap.run(m, lv, ops)

    async def _copy_succeeded(self, m: Machine, mm: MmState, vma: Vma,
                              ptes: dict[int, Pte]) -> None:
        """The ptes cleared, then each small page released (unlocked, put back through the
        lru_add batch), its rmap removed (+ munlock) and its mapping's reference dropped."""
        empty = [Pte(v, 0, 0, 0) for v in sorted(ptes)]
        if await pt_install(self.store, mm.key, empty, ptes):
            # the mmap_lock for write and the anon_vma locks exclude every writer of these
            # ptes: a difference means the store lost our locks
            raise KernelError("EAGAIN", "MADV_COLLAPSE: the page table changed")
        by_lv: dict[int, list[Op]] = {}
        compound: dict[tuple[int, int], Pte] = {}  # compound_pagelist: released last
        for run in subpage_runs(sorted(ptes.values(), key=lambda p: p.vpn)):
            first = run[0]
            if first.bits & PTEBit.ZERO:
                continue
            ops = by_lv.setdefault(first.lv, [])
            if not first.is_subpage:
                ops += [["F", first.idx, 0, int(PG.LOCKED)], ["B", first.idx, 0],
                        *pte_unmap_ops(m, vma, first), ["P", first.idx]]
                continue
            for lv, unmap in zap_ops(m, vma, run):  # folio_remove_rmap_ptes: the run at once
                by_lv.setdefault(lv, []).extend(unmap)
            ops += [["P", p.idx] for p in run]
            compound.setdefault((first.lv, first.idx), first)
        for pte in compound.values():
            by_lv.setdefault(pte.lv, []).extend([["F", pte.idx, 0, int(PG.LOCKED)],
                                                 ["B", pte.idx, 0]])
        for lv, ops in by_lv.items():
            await self.swap.run(m, lv, ops)

    async def _map(self, m: Machine, mm: MmState, vma: Vma, pmd: int, head: int) -> None:
        """folio_add_new_anon_rmap + folio_add_lru_vma, then set_pmd_at over the emptied
        (and freed) page table; the allocation's reference passes to the mapping."""
        await self.store.fcall("pt_retract", mm.key, pmd)
        ops = new_anon_ops(m, vma, head)
        await self.swap.run(m, mm.lv, [*ops, ["P", head]])
        # maybe_pmd_mkwrite(pmd_mkdirty(mk_huge_pmd(...)), vma)
        bits = int(PTEBit.PRESENT | PTEBit.DIRTY) | (int(PTEBit.WRITE) if vma.flags & VM.WRITE
                                                    else 0)
        if not int(await self.store.fcall("pmd_install", mm.key, pmd, head, mm.lv, bits,
                                          0, 0, 0)):
            raise KernelError("EAGAIN", "MADV_COLLAPSE: the pmd changed")
