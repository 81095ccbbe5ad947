"""mm/khugepaged.c: collapse_file, as madvise(MADV_COLLAPSE) runs it (spec §3.10, S32, 12/13);
anonymous memory: collapse_huge_page (khugepaged_anon.py).

collapse_file turns the 512 small pages of an aligned range of a shmem file into one THP:

1. A new THP is allocated, locked (lookups find it locked and wait), its holes reserved.
2. Each small page, in index order: locked and referenced (SCAN_PAGE_LOCK), isolated from its
   LRU (SCAN_DEL_PAGE_LRU), unmapped with ``try_to_unmap(TTU_IGNORE_MLOCK |
   TTU_BATCH_FLUSH)`` under i_mmap_rwsem for read (12/13: no longer ``unmap_mapping_pages``
   under it for write): every removal from a VM_LOCKED vma munlocks the page and drains the
   local batch at once (§4.2.2) - the page is isolated, so its munlock counts
   unevictable_pgs_stranded (S32) - and frozen at its three references (cache, isolation,
   lookup; SCAN_PAGE_COUNT when a racing reference remains).
3. Every slot of the range names the THP (pc_collapse, at once); the small pages leave the
   cache and are freed (PG_unevictable cleared first, as collapse_file does); the THP goes
   on the LRU through the lru_add batch (a THP head: flushed at once) and is unlocked.

On a failure every page taken so far is unfrozen, put back on its LRU and unlocked - the
ones already unmapped stay unmapped (and munlocked), as in Linux - and the THP is freed.

MADV_COLLAPSE (Linux 6.1+) runs collapse_file for each aligned 2 MiB of the range after an
``lru_add_drain_all()``, then (6.6+: ``collapse_pte_mapped_thp(install_pmd)``) frees the
emptied page tables of every mapping of the range and maps the new THP by its pmd in the
caller's address space - ``page_add_file_rmap(compound)``: a VM_LOCKED vma mlocks it whole
(Δmlocked 512, Δculled 512).  Other processes map it by their next faults.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.filemap import (
    HPAGE_PMD_NR,
    FilePmd,
    Slot,
    drop_reservations,
    parse_slot,
    pmd_suitable,
)
from mmsvc.mm.khugepaged_anon import AnonCollapse
from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import HPAGE_ORDER, Faults, Programs, cache_flags, read_pages
from mmsvc.mm.mm_struct import MmState, Pte, pt_install, pt_read
from mmsvc.mm.page import PG, PTRS_PER_PMD
from mmsvc.mm.rmap import Rmap, file_mms, pte_unmap_ops, vma_now
from mmsvc.mm.swap import Op, OutOfFrames, Swap
from mmsvc.mm.types import MigrationDrain
from mmsvc.mm.vma import VM, Vma
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

DrainAll = Callable[[Machine], Awaitable[None]]

# What each step of a small page has done, for the rollback (collapse_file's out_unlock;
# a freeze is undone blindly: clearing PG_FROZEN of a page that is not frozen changes nothing).
LOCKED, ISOLATED = 1, 2


@dataclass
class _Taken:
    index: int
    slot: Slot
    state: int = LOCKED


@dataclass
class Collapse:
    """One collapse_file in progress."""

    fid: int
    base: int
    owner: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    holes: list[int] = field(default_factory=list)
    taken: list[_Taken] = field(default_factory=list)
    thp: tuple[int, int] | None = None


def _by_lv(taken: list[_Taken]) -> dict[int, list[_Taken]]:
    out: dict[int, list[_Taken]] = defaultdict(list)
    for t in taken:
        out[t.slot.lv].append(t)
    return out


class Khugepaged:
    def __init__(self, store: RedisStore, swap: Swap, rmap: Rmap, drain_all: DrainAll,
                 faults: Faults) -> None:
        self.store = store
        self.swap = swap
        self.rmap = rmap
        self.drain_all = drain_all
        self.pmds = FilePmd(store, swap)
        self.anon = AnonCollapse(store, swap, rmap, faults)

    async def madvise_collapse(self, m: Machine, mm: MmState, vma: Vma, start: int,
                               end: int) -> None:
        """MADV_COLLAPSE over [start, end) of one vma: each aligned 2 MiB inside it is
        collapsed; the last failure's errno is returned once the others were tried."""
        if not m.cfg.thp:
            raise einval("MADV_COLLAPSE: transparent hugepages are off on this machine")
        if not vma.is_anon and not m.file_by_id(vma.file).shmem and vma.flags & VM.WRITE:
            # CONFIG_READ_ONLY_THP_FOR_FS: a regular file collapses only while nobody has it
            # open for writing - approximated here by a mapping without PROT_WRITE
            raise einval("MADV_COLLAPSE of a regular file through a writable mapping")
        first = -(-start // PTRS_PER_PMD)
        last = end // PTRS_PER_PMD
        if first >= last:
            return
        await self.swap.lru_add_drain(m)
        await self.drain_all(m)
        failure: KernelError | None = None
        for pmd in range(first, last):
            # anonymous memory: collapse_huge_page (khugepaged_anon.py); a file: collapse_file
            # of the aligned range the pmd maps, then its pmd maps the THP at once
            index = None if vma.is_anon else pmd_suitable(vma, pmd)
            if index is None and not vma.is_anon:
                raise einval("MADV_COLLAPSE: the mapping is not THP-aligned in its file")
            try:
                if index is None:
                    await self.anon.collapse(m, mm, vma, pmd)
                else:
                    await self.collapse_file(m, vma.file, index, mm.lv)
            except KernelError as exc:
                if index is None and exc.errno == "ENOMEM":
                    raise  # SCAN_ALLOC_HUGE_PAGE_FAIL ends an anonymous collapse
                failure = exc
                continue
            if index is not None:
                await self.retract_page_tables(m, vma.file, index)
                await self.pmds.map_pmd(m, mm, vma, pmd, write=False)
        if failure is not None:
            raise failure

    async def collapse_file(self, m: Machine, fid: int, base: int, lv: int) -> None:
        """Collapse the slots [base, base + 512) of file fid into a THP allocated on lruvec
        lv (the caller's node and memcg).  Already a THP there: nothing to do."""
        f = m.file_by_id(fid)
        if base + HPAGE_PMD_NR > f.pages:
            raise einval("MADV_COLLAPSE: the range reaches beyond the end of the file")
        c = Collapse(fid, base)
        fkey = keys.file(m.mid, fid)
        looked = await self.store.fcall("pc_lookup_flags", fkey, c.owner,
                                        *range(base, base + HPAGE_PMD_NR))
        mapping_flags = int(looked.pop())
        small: list[tuple[int, Slot]] = []
        thps: set[Slot] = set()
        values = [text(raw) for raw in looked]
        reserved = [index for index, val in zip(range(base, base + HPAGE_PMD_NR), values,
                                                 strict=True)
                    if val == "new" or val.startswith("swapin|")]
        for index, val in zip(range(base, base + HPAGE_PMD_NR), values, strict=True):
            if val == "new":
                c.holes.append(index)
            elif val in ("busy", "eof") or val.startswith("swapin|"):
                # every slot the lookup reserved goes back (a swap entry is put back)
                await drop_reservations(self.store, fkey, c.owner, reserved)
                if val == "eof":
                    raise einval("MADV_COLLAPSE: the file was truncated (SCAN_TRUNCATED)")
                if val == "busy":
                    raise KernelError("EAGAIN", "a page of the range is being read in")
                # collapse_file would read it back (shmem_get_folio): not emulated
                raise KernelError("EAGAIN", "MADV_COLLAPSE: a page of the range is swapped "
                                            "out (its read-back by collapse_file is not "
                                            "emulated)")
            elif (slot := parse_slot(val)) is not None and slot.is_thp:
                thps.add(slot)
            elif slot is not None:
                small.append((index, slot))
        if thps:
            await self._drop_holes(fkey, c)
            if len(thps) == 1 and not small and not c.holes and next(iter(thps)).base == base:
                return  # SCAN_PTE_MAPPED_HUGEPAGE: collapsed already
            raise einval("MADV_COLLAPSE: the range holds part of another THP "
                         "(SCAN_PAGE_COMPOUND)")
        try:
            await self._alloc(m, c, lv, f.shmem, mapping_flags)
            await self._take(m, c, small)
            await self._publish(m, c, lv)
        except BaseException:
            await self._rollback(m, c)
            raise
        await self._finish(m, c)

    async def _alloc(self, m: Machine, c: Collapse, lv: int, shmem: bool,
                     mapping_flags: int) -> None:
        """alloc_charge_folio: the new THP, locked (__folio_set_locked), in no slot yet,
        with the page cache's reference."""
        flags = cache_flags(shmem) | int(PG.HEAD | PG.LOCKED) | mapping_flags
        if shmem:
            flags |= int(PG.DIRTY)  # set_page_dirty: shmem has no backing store
        try:
            res = await self.swap.run(m, lv, [["A", flags, c.fid, c.base, HPAGE_ORDER],
                                              ["G", -1]])
        except OutOfFrames as exc:
            raise KernelError("ENOMEM", "MADV_COLLAPSE: no THP could be allocated "
                                        "(SCAN_ALLOC_HUGE_PAGE_FAIL)") from exc
        c.thp = (lv, res.allocs[0])

    async def _take(self, m: Machine, c: Collapse, small: list[tuple[int, Slot]]) -> None:
        """collapse_file's loop over the small pages, phase by phase for all of them (one
        page program per lruvec per phase, one unmap per address space): lock each
        (SCAN_PAGE_LOCK), isolate each (SCAN_DEL_PAGE_LRU, after one local drain), unmap
        them all with TTU_IGNORE_MLOCK, freeze each at its three references
        (SCAN_PAGE_COUNT).  Linux goes page by page; the counts are the same (every page is
        isolated before any of its mappings goes), only a failure leaves fewer pages
        unmapped here."""
        by_lv: dict[int, list[tuple[int, Slot]]] = defaultdict(list)
        for index, slot in small:
            by_lv[slot.lv].append((index, slot))
        lost = 0
        for lv, run in by_lv.items():
            res = await self.swap.run(m, lv, [slot.grab_op(c.fid, index)
                                              for index, slot in run])
            failed = set(res.failed)
            c.taken += [_Taken(index, slot) for index, slot in run if slot.idx not in failed]
            lost += len(failed)
        if lost:
            raise KernelError("EAGAIN", f"{lost} pages of the range are locked, being freed "
                                        "or migrated (SCAN_PAGE_LOCK)")
        await self._isolate(m, c)
        pages = await read_pages(self.store, m, [t.slot.ref for t in c.taken])
        mapped = {t.slot.ref: t.index for t, page in zip(c.taken, pages, strict=True)
                  if page.mapcount}
        if mapped:
            async with self.rmap.locked(m, pages[0]):  # i_mmap_rwsem for read (12/13)
                await self._unmap(m, c.fid, mapped)
        unfrozen = 0
        for lv, ts in _by_lv(c.taken).items():
            res = await self.swap.run(m, lv, [["R", t.slot.idx, 3] for t in ts])
            unfrozen += len(res.failed)  # the program stops at the first one
        if unfrozen:
            raise KernelError("EAGAIN", "a page of the range has references beyond the "
                                        "cache's, the isolation's and the lookup's "
                                        "(SCAN_PAGE_COUNT)")

    async def _isolate(self, m: Machine, c: Collapse) -> None:
        """isolate_lru_page of every page taken; a page still in this CPU's lru_add batch is
        tried again after a local drain."""
        for attempt in range(2):
            todo = [t for t in c.taken if t.state < ISOLATED]
            if not todo:
                return
            if attempt:
                await self.swap.lru_add_drain(m)
            for lv, ts in _by_lv(todo).items():
                res = await self.swap.run(m, lv, [["I", t.slot.idx] for t in ts])
                done = set(res.isolated)
                for t in ts:
                    if t.slot.idx in done:
                        t.state = ISOLATED
        if any(t.state < ISOLATED for t in c.taken):
            raise KernelError("EAGAIN", "a page of the range is not on an LRU "
                                        "(SCAN_DEL_PAGE_LRU)")

    async def _unmap(self, m: Machine, fid: int, pages: dict[tuple[int, int], int]) -> None:
        """try_to_unmap(TTU_IGNORE_MLOCK) of the taken pages that are mapped (page -> its
        file index), one address space at a time: each pte that still maps its page is
        cleared (one pt_install per address space), then page_remove_rmap + munlock and the
        mapping's reference (one program per lruvec per vma), and the local mlock batch is
        drained after the removals from a VM_LOCKED vma (§4.2.2, placed by
        ``migration_drain`` as for migration)."""
        first, last = min(pages.values()), max(pages.values()) + 1
        mode = m.cfg.migration_drain
        for mm in await file_mms(self.store, m, fid):
            found: list[tuple[Vma, Pte]] = []
            for vma in mm.vmas:
                lo, hi = max(first, vma.pgoff), min(last, vma.pgoff + vma.pages)
                if vma.file != fid or lo >= hi:
                    continue
                ptes = await pt_read(self.store, mm.key, vma.start + lo - vma.pgoff,
                                     vma.start + hi - vma.pgoff)
                found += [(vma, p) for p in ptes.values()
                          if pages.get((p.lv, p.idx)) == vma.linear_index(p.vpn)]
            if not found:
                continue
            raced = set(await pt_install(self.store, mm.key,
                                         [Pte(p.vpn, 0, 0, 0) for _, p in found],
                                         {p.vpn: p for _, p in found}))
            by_vma: dict[int, list[Pte]] = defaultdict(list)
            vmas: dict[int, Vma] = {}
            for vma, p in found:
                if p.vpn not in raced:
                    by_vma[vma.id].append(p)
                    vmas[vma.id] = vma
            for vid, gone in by_vma.items():
                # the flags as stored after the removal (an mlock may have walked since)
                vma = await vma_now(self.store, mm.key, gone[0].vpn, vmas[vid])
                progs = Programs.empty()
                for p in gone:
                    progs.add(p.lv, *pte_unmap_ops(m, vma, p), ["P", p.idx])
                await progs.execute(self.swap, m)
                if mode == MigrationDrain.AFTER_EACH_LOCKED_UNMAP and vma.locked:
                    await self.swap.lru_add_drain(m)  # mlock_drain_local()
        if mode == MigrationDrain.RMAP_WALK_LEVEL:
            await self.swap.lru_add_drain(m)

    async def _publish(self, m: Machine, c: Collapse, lv: int) -> None:
        """xas_store of the THP in every slot of the range, all at once."""
        assert c.thp is not None
        expected: list[int | str] = []
        for t in c.taken:
            expected += [t.index, t.slot.value()]
        for index in c.holes:
            expected += [index, ""]
        value = Slot(c.thp[0], c.thp[1], c.base).value()
        if not int(await self.store.fcall("pc_collapse", keys.file(m.mid, c.fid), c.owner,
                                          value, *expected)):
            raise KernelError("EAGAIN", "the page cache changed during the collapse")

    async def _finish(self, m: Machine, c: Collapse) -> None:
        """The small pages leave the cache and are freed (their three references); the THP
        is added to the LRU (lru_cache_add: a THP head flushes at once) and unlocked."""
        assert c.thp is not None
        gone = int(PG.PAGECACHE | PG.ISOLATED | PG.LOCKED | PG.FROZEN | PG.ACTIVE
                   | PG.UNEVICTABLE)
        by_lv: dict[int, list[Op]] = {}
        for t in c.taken:
            by_lv.setdefault(t.slot.lv, []).extend(
                [["F", t.slot.idx, 0, gone], ["P", t.slot.idx], ["P", t.slot.idx],
                 ["P", t.slot.idx]])
        for plv, ops in by_lv.items():
            await self.swap.run(m, plv, ops)
        lv, idx = c.thp
        await self.swap.run(m, lv, [["C", idx], ["F", idx, 0, int(PG.LOCKED)]])

    async def _rollback(self, m: Machine, c: Collapse) -> None:
        """out_unlock / xa_locked: each page taken goes back as it was (unfrozen, put back on
        its LRU, unlocked, the lookup's reference dropped), the reservations of the holes
        go, and the THP is freed."""
        for lv, ts in _by_lv(c.taken).items():
            ops: list[Op] = []
            for t in ts:
                ops.append(["F", t.slot.idx, 0, int(PG.FROZEN | PG.LOCKED)])
                if t.state >= ISOLATED:
                    ops.append(["B", t.slot.idx, 0])
                ops.append(["P", t.slot.idx])
            await self.swap.run(m, lv, ops)
        await self._drop_holes(keys.file(m.mid, c.fid), c)
        if c.thp is not None:
            lv, idx = c.thp
            await self.swap.run(m, lv, [["F", idx, 0, int(PG.LOCKED | PG.PAGECACHE)],
                                        ["P", idx]])

    async def _drop_holes(self, fkey: str, c: Collapse) -> None:
        await drop_reservations(self.store, fkey, c.owner, c.holes)

    async def retract_page_tables(self, m: Machine, fid: int, base: int) -> None:
        """retract_page_tables: in every address space that maps [base, base + 512) of the
        file with a whole aligned pmd, the page table the collapse emptied is freed, so
        that the pmd is pmd_none and a fault maps the THP by it."""
        for mm in await file_mms(self.store, m, fid):
            pmds = []
            for vma in mm.vmas:
                if vma.file == fid and vma.pgoff <= base < vma.pgoff + vma.pages:
                    pmd = (vma.start + base - vma.pgoff) // PTRS_PER_PMD
                    if pmd_suitable(vma, pmd) == base:
                        pmds.append(pmd)
            if pmds:
                await self.store.fcall("pt_retract", mm.key, *pmds)
