"""mm/gup.c: long-term pins, pin_user_pages(FOLL_PIN | FOLL_LONGTERM) and unpin_user_pages.

A pin is an extra reference on each page of a user range, held by a "driver" (the RDMA memory
region, vfio mapping or io_uring buffer a real process would register).  As in Linux it is
counted in the refcount itself: ``GUP_PIN_COUNTING_BIAS`` (1024) per pin of a small page, one
per pinned subpage of a THP (whose ``_pincount`` the pin registry below stands for).  So:

* migration's refcount freeze fails on a pinned page: Migrate reports EAGAIN (spec §4.1, S15);
* reclaim's freeze in ``__remove_mapping`` fails: the page is kept (§5);
* munmap, exit and truncation drop their references and leave the page alive until the last
  unpin, whose final release runs the clearance of §6 (``unevictable_pgs_cleared`` when the
  page kept PG_mlocked: S20, §8.3 row 10, known exception X1 of §8.5).

Pins are recorded in the store (``{m<id>}:pins``: pin id -> owner pid and the references per
page) so that the checker (§8.5 A6) and CPU-death recovery (mm/recovery.py) count them: nothing
a pin holds is lost or leaked.  A pin belongs to the process that took it; the process's exit
releases its pins after its address space is gone, as do_exit's exit_files() closing the
driver's file does after exit_mm() (a FOLL_LONGTERM pin held by a driver outlives the
mappings, not the driver's file).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict

from mmsvc.mm.errors import KernelError
from mmsvc.mm.kernel import PinResult
from mmsvc.mm.machine import Machine, new_id
from mmsvc.mm.memory import Faults, Programs
from mmsvc.mm.mm_struct import MmState, Pte, pt_read
from mmsvc.mm.page import PTEBit
from mmsvc.mm.swap import Swap
from mmsvc.mm.vma import VM
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

GUP_PIN_COUNTING_BIAS = 1024  # include/linux/mm.h: what one FOLL_PIN adds to a small page
PIN_RETRIES = 8  # a page freed or replaced between the fault and the grab: fault it again

PageRef = tuple[int, int]


def pins_key(m: Machine) -> str:
    return f"{keys.machine(m.mid)}:pins"


def pin_weight(pte: Pte) -> int:
    """References one pinned pte takes: the bias on a small page; on a THP (a pmd or a pte
    mapping a subpage) one per subpage, plus the folio's pincount (the registry)."""
    return 1 if pte.is_pmd or pte.is_subpage else GUP_PIN_COUNTING_BIAS


async def pin_refs(store: RedisStore, m: Machine) -> Counter[PageRef]:
    """References every recorded pin holds, per page (checker A6, recovery)."""
    out: Counter[PageRef] = Counter()
    for raw in (await store.client.hgetall(pins_key(m))).values():
        for lv, idx, n in json.loads(text(raw))["refs"]:
            out[(lv, idx)] += n
    return out


def check_vma_flags(mm: MmState, start: int, end: int, write: bool) -> None:
    """mm/gup.c check_vma_flags: VM_IO / VM_PFNMAP ranges cannot be pinned, a write pin needs
    VM_WRITE, a read pin VM_READ; a hole is EFAULT."""
    if not mm.covered(start, end):
        raise KernelError("EFAULT", "range not fully mapped")
    for vma in mm.overlapping(start, end):
        if vma.flags & (VM.IO | VM.PFNMAP):
            raise KernelError("EFAULT", "VM_IO/VM_PFNMAP mapping cannot be pinned")
        if write and not vma.flags & VM.WRITE:
            raise KernelError("EFAULT", "FOLL_WRITE pin of a mapping without PROT_WRITE")
        if not write and not vma.flags & VM.READ:
            raise KernelError("EFAULT", "pin of a mapping without PROT_READ")


class Gup:
    """pin_user_pages / unpin_user_pages on behalf of one CPU."""

    def __init__(self, store: RedisStore, swap: Swap, faults: Faults) -> None:
        self.store = store
        self.swap = swap
        self.faults = faults

    async def pin_user_pages(self, m: Machine, mm: MmState, start: int, end: int,
                             write: bool) -> PinResult:
        """__get_user_pages with FOLL_PIN | FOLL_LONGTERM (mmap_lock held for read): fault
        the range in as populate does (a write pin breaks COW first), then grab a pin on the
        page each pte maps.  Faults map and mlock through the rmap hooks (§3.2, §3.3); the
        pin itself does no mlock work (GUP "must not count", §3.7.1)."""
        check_vma_flags(mm, start, end, write)
        for attempt in range(PIN_RETRIES):
            for vma in mm.overlapping(start, end):
                await self.faults.fault_range(m, mm, vma, max(start, vma.start),
                                              min(end, vma.end), write)
            ptes = await pt_read(self.store, mm.key, start, end)
            refs = self._refs(ptes)
            failed = await self._grab(m, refs)
            # follow_page_mask grabs under the PTL: a pte changed meanwhile (truncation,
            # reclaim, migration) means this pass pinned the wrong page, or none: retry
            now = await pt_read(self.store, mm.key, start, end)
            if not failed and self._same(ptes, now):
                pages = sum(1 for p in ptes.values() if not p.bits & PTEBit.ZERO)
                pin_id = await new_id(self.store, m.mid, "pin")
                await self.store.client.hset(pins_key(m), str(pin_id), json.dumps({
                    "pid": mm.pid, "start": start, "end": end, "pages": pages,
                    "refs": [[lv, idx, n] for (lv, idx), n in sorted(refs.items())]}))
                return PinResult(pin_id, pages)
            await self._put(m, {r: n for r, n in refs.items() if r not in failed})
            await asyncio.sleep(0.001 * (attempt + 1))
        raise KernelError("EAGAIN", "pages kept changing under the pin")

    async def unpin(self, m: Machine, pid: int, pin_id: int) -> int:
        """unpin_user_pages: the pin's references go (the last one frees the page, §6).
        Returns the pages unpinned; ENOENT when pid holds no such pin."""
        raw = await self.store.client.hget(pins_key(m), str(pin_id))
        if raw is None or json.loads(text(raw))["pid"] != pid:
            raise KernelError("ENOENT", f"process {pid} holds no pin {pin_id}")
        # the record goes first, and only one caller removes it: a pin is released once
        if not await self.store.client.hdel(pins_key(m), str(pin_id)):
            raise KernelError("ENOENT", f"pin {pin_id} was released meanwhile")
        rec = json.loads(text(raw))
        refs = {(lv, idx): n for lv, idx, n in rec["refs"]}
        await self._put(m, refs)
        return int(rec["pages"])

    async def release_pins(self, m: Machine, pid: int) -> int:
        """Exit: the pins pid still holds are released (after its mappings went)."""
        done = 0
        for field, raw in (await self.store.client.hgetall(pins_key(m))).items():
            if json.loads(text(raw))["pid"] == pid:
                try:
                    done += await self.unpin(m, pid, int(text(field)))
                except KernelError:
                    continue  # released meanwhile by an Unpin
        return done

    @staticmethod
    def _refs(ptes: dict[int, Pte]) -> dict[PageRef, int]:
        refs: dict[PageRef, int] = defaultdict(int)
        for p in ptes.values():
            if not p.bits & PTEBit.ZERO:  # vm_normal_page(): the zero page has no struct page
                refs[(p.lv, p.idx)] += pin_weight(p)
        return dict(refs)

    @staticmethod
    def _same(before: dict[int, Pte], after: dict[int, Pte]) -> bool:
        return {v: (p.lv, p.idx) for v, p in before.items()} == {
            v: (p.lv, p.idx) for v, p in after.items()}

    async def _grab(self, m: Machine, refs: dict[PageRef, int]) -> set[PageRef]:
        """try_grab_folio for each page; returns the pages that could not be grabbed."""
        failed: set[PageRef] = set()
        by_lv: dict[int, list[list[int | str]]] = defaultdict(list)
        for (lv, idx), n in sorted(refs.items()):
            by_lv[lv].append(["pin", idx, n])
        for lv, ops in by_lv.items():
            res = await self.swap.run(m, lv, ops)
            failed.update((lv, idx) for idx in res.failed)
        return failed

    async def _put(self, m: Machine, refs: dict[PageRef, int]) -> None:
        progs = Programs.empty()
        for (lv, idx), n in sorted(refs.items()):
            progs.add(lv, ["unpin", idx, n])
        await progs.execute(self.swap, m)
