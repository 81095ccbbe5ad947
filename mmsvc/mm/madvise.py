"""mm/madvise.c: the advice values that meet mlock (trace-format ops; spec §3.8.3)."""

from __future__ import annotations

from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.khugepaged import Khugepaged
from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import Faults, Programs, zap_range
from mmsvc.mm.mlock import Mlock
from mmsvc.mm.mm_struct import MmState, pt_read
from mmsvc.mm.page import PTEBit
from mmsvc.mm.swap import Swap
from mmsvc.mm.types import Advice
from mmsvc.mm.vma import VM, Vma
from mmsvc.mm.vmscan import ShrinkStats, Vmscan
from mmsvc.store.redis_store import RedisStore


def _check_vma(vma: Vma, advice: Advice) -> None:
    """madvise_walk_vmas checks each VMA as it reaches it (earlier VMAs stay advised)."""
    if vma.flags & VM.PFNMAP:
        raise einval("madvise on a VM_PFNMAP mapping")
    locked = bool(vma.flags & VM.LOCKED)
    if advice in (Advice.MADV_DONTNEED, Advice.MADV_FREE) and locked:
        raise einval("MADV_DONTNEED/MADV_FREE on a VM_LOCKED mapping")
    if advice in (Advice.MADV_COLD, Advice.MADV_PAGEOUT) and locked:
        # can_madv_lru_vma(): the cold/pageout paths still refuse VM_LOCKED (03/13)
        raise einval("MADV_COLD/MADV_PAGEOUT on a VM_LOCKED mapping")
    if advice == Advice.MADV_FREE and not vma.is_anon:
        raise einval("MADV_FREE on a file mapping")
    if advice in (Advice.MADV_POPULATE_READ, Advice.MADV_POPULATE_WRITE):
        # FOLL_MADV_POPULATE: incompatible mappings or permissions are EINVAL
        if vma.flags & VM.IO:
            raise einval("populate of a VM_IO mapping")
        if advice == Advice.MADV_POPULATE_READ and not vma.flags & VM.READ:
            raise einval("MADV_POPULATE_READ of an unreadable mapping")
        if advice == Advice.MADV_POPULATE_WRITE and not vma.flags & VM.WRITE:
            raise einval("MADV_POPULATE_WRITE of a read-only mapping")


POPULATE = (Advice.MADV_POPULATE_READ, Advice.MADV_POPULATE_WRITE)


class Madvise:
    def __init__(self, store: RedisStore, swap: Swap, faults: Faults, mlock: Mlock,
                 vmscan: Vmscan, khugepaged: Khugepaged) -> None:
        self.khugepaged = khugepaged
        self.store = store
        self.swap = swap
        self.faults = faults
        self.mlock = mlock
        self.vmscan = vmscan

    async def madvise(self, m: Machine, mm: MmState, start: int, end: int,
                      advice: Advice) -> None:
        """VMA by VMA, ascending (madvise_walk_vmas): a failing VMA stops the walk with the
        earlier ones advised; holes give ENOMEM at the end, or at once for populate."""
        if advice in (Advice.MADV_COLD, Advice.MADV_PAGEOUT):
            await self.swap.lru_add_drain(m)
        pos, hole = start, False
        try:
            for vma in list(mm.overlapping(start, end)):
                if vma.start > pos:
                    if advice in POPULATE:
                        raise KernelError("ENOMEM", "populate reached an unmapped hole")
                    hole = True
                _check_vma(vma, advice)
                await self._advise(m, mm, vma, max(start, vma.start), min(end, vma.end),
                                   advice)
                pos = vma.end
        finally:
            if advice in POPULATE and m.cfg.populate_drain:
                await self.swap.lru_add_drain(m)
        if hole or pos < end:
            raise KernelError("ENOMEM", "range not fully mapped")

    async def _advise(self, m: Machine, mm: MmState, vma: Vma, start: int, end: int,
                      advice: Advice) -> None:
        if advice in (Advice.MADV_DONTNEED, Advice.MADV_DONTNEED_LOCKED):
            await zap_range(self.store, self.swap, m, mm, vma, start, end)
        elif advice in POPULATE:
            await self.faults.fault_range(m, mm, vma, start, end,
                                          advice == Advice.MADV_POPULATE_WRITE)
        elif advice == Advice.MADV_COLD:
            await self._each_page(m, mm, [vma], start, end, "D")
        elif advice == Advice.MADV_FREE:
            await self._each_page(m, mm, [vma], start, end, "Z", exclusive=True)
        elif advice == Advice.MADV_PAGEOUT:
            await self._pageout(m, mm, [vma], start, end)
        elif advice == Advice.MADV_COLLAPSE:
            await self.khugepaged.madvise_collapse(m, mm, vma, start, end)
        else:  # pragma: no cover - Advice is a closed enum
            raise einval(f"unsupported advice {advice!r}")

    async def _each_page(self, m: Machine, mm: MmState, vmas: list[Vma], start: int, end: int,
                         op: str, exclusive: bool = False) -> None:
        from mmsvc.mm.memory import read_pages

        progs = Programs.empty()
        for vma in vmas:
            a, b = max(start, vma.start), min(end, vma.end)
            ptes = await pt_read(self.store, mm.key, a, b, walk=True)
            real = [p for p in ptes.values() if not p.bits & PTEBit.ZERO]
            pages = await read_pages(self.store, m, [(p.lv, p.idx) for p in real])
            for pte, page in zip(real, pages, strict=True):
                if exclusive and page.mapcount != 1:
                    continue  # MADV_FREE only frees pages this process alone maps
                progs.add(pte.lv, [op, pte.idx])
        await progs.execute(self.swap, m)

    async def _pageout(self, m: Machine, mm: MmState, vmas: list[Vma], start: int,
                       end: int) -> None:
        """reclaim_pages(): isolate the range's pages and run shrink_folio_list on them."""
        stats = ShrinkStats()
        for vma in vmas:
            a, b = max(start, vma.start), min(end, vma.end)
            ptes = await pt_read(self.store, mm.key, a, b, walk=True)
            by_lv: dict[int, list[int]] = {}
            for p in sorted(ptes.values(), key=lambda p: p.vpn):
                if not p.bits & PTEBit.ZERO:
                    by_lv.setdefault(p.lv, []).append(p.idx)
            for lv, idxs in by_lv.items():
                res = await self.swap.run(m, lv, [["I", i] for i in dict.fromkeys(idxs)])
                await self.vmscan.shrink_folio_list(m, lv, res.isolated, stats)
