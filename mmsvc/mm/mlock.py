"""mm/mlock.c: mlock, mlock2, munlock, mlockall, munlockall (spec §3.5-§3.7, patch 07/13).

``mlock_fixup`` changes a VMA's lock flags (splitting and merging VMAs, accounting
``locked_vm``); when VM_LOCKED changes, ``mlock_vma_pages_range`` stores the new flags with
VM_IO in one store, drains, walks the present ptes queueing mlock/munlock entries, drains
again and clears VM_IO (§3.6).  Populate only faults pages in (§3.7.1): the rmap hooks of the
faults do the mlocking.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.legacy import Legacy
from mmsvc.mm.machine import Machine, new_id
from mmsvc.mm.memory import Faults, Programs, split_huge_pmds_around
from mmsvc.mm.mm_struct import MmState, Pte, pt_walk, save
from mmsvc.mm.page import PTRS_PER_PMD, SUBPAGE_SHIFT, PTEBit
from mmsvc.mm.rmap import large_folio_rules, subpage_runs
from mmsvc.mm.swap import MASS_WALK, Swap
from mmsvc.mm.types import MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT, MLOCK_ONFAULT, PAGE_SHIFT
from mmsvc.mm.vma import VM, VM_LOCKED_MASK, VM_SPECIAL, Vma
from mmsvc.store.redis_store import RedisStore

WALK_CHUNK = 4096  # ptes read per round trip of the mlock walk
#: The most pages one request may fault in, populate, lock or migrate (256 MiB).  The emulator
#: does some 20-60 thousand pages a second, in page programs that Redis runs one at a time: a
#: request must end well within its mmap_lock lease (30 s) and the clients' deadlines, and
#: must not hold up everyone else's calls for long.  Linux has no such bound; mmsvc refuses
#: bigger requests before changing anything (docs/api.md).
MAX_POPULATE_PAGES = 1 << 16


def too_many_pages(pages: int, what: str) -> str:
    return (f"cannot {what} {pages} pages in one call: this emulator does at most "
            f"{MAX_POPULATE_PAGES} ({MAX_POPULATE_PAGES >> 8} MiB) per request")


def page_range(addr: int, length: int) -> tuple[int, int]:
    """mlock(2) rounding: start rounded down, length rounded up (EINVAL if it wraps)."""
    if addr < 0 or length < 0:
        raise einval("negative address or length")
    start = addr >> PAGE_SHIFT
    end_addr = addr + length
    if end_addr >= 1 << 64:
        raise einval("range wraps around the address space")
    end = (end_addr + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
    return start, end


def can_do_mlock(mm: MmState) -> bool:
    return mm.geti("rlim_soft") != 0 or bool(mm.geti("cap_ipc_lock"))


class Mlock:
    """The mlock family of syscalls on behalf of one CPU."""

    def __init__(self, store: RedisStore, swap: Swap, faults: Faults, legacy: Legacy) -> None:
        self.store = store
        self.swap = swap
        self.faults = faults
        self.legacy = legacy

    # ------------------------------------------------------------------ mlock_fixup ------
    async def mlock_fixup(
        self, m: Machine, mm: MmState, vma: Vma, start: int, end: int, newflags: int
    ) -> Vma:
        """§3.5: change [start, end) of vma to newflags.  Returns the VMA now covering it."""
        oldflags = vma.flags
        if newflags == oldflags or oldflags & VM_SPECIAL or oldflags & VM.HUGETLB:
            return vma  # §3.5.1 "don't set VM_LOCKED or VM_LOCKONFAULT and don't count"
        target = await self._split(m, mm, vma, start, end)
        npages = target.pages
        if not newflags & VM.LOCKED:
            mm.set_info("locked_vm", mm.geti("locked_vm") - npages)
        elif not oldflags & VM.LOCKED:
            mm.set_info("locked_vm", mm.geti("locked_vm") + npages)
        if str(m.cfg.protocol) == "legacy":
            # §9.3.1 / §9.4.1: the flags change directly; munlock clears them, then walks.
            target = replace(target, flags=newflags)
            mm.update_vma(target)
            if oldflags & VM.LOCKED and not newflags & VM.LOCKED:
                await save(self.store, mm)
                await self.legacy.munlock_range(m, mm, target, target.start, target.end)
        elif newflags & VM.LOCKED and oldflags & VM.LOCKED:
            # §3.5.4: "No work to do, and mlocking twice would be wrong".
            target = replace(target, flags=newflags)
            mm.update_vma(target)
        else:
            target = await self.mlock_vma_pages_range(m, mm, target, newflags)
        return self._merge(mm, target)

    async def _split(self, m: Machine, mm: MmState, vma: Vma, start: int, end: int) -> Vma:
        if vma.start >= start and vma.end <= end:
            return vma
        await split_huge_pmds_around(self.store, self.swap, m, mm, start, end)
        pieces: list[Vma] = []
        for s, e in ((vma.start, start), (start, end), (end, vma.end)):
            s, e = max(s, vma.start), min(e, vma.end)
            if s < e:
                vid = vma.id if not pieces else await new_id(self.store, m.mid, "vma")
                pieces.append(vma.clip(s, e, vid))
        mm.replace_vmas([vma], pieces)
        return next(p for p in pieces if p.start == max(start, vma.start))

    def _merge(self, mm: MmState, vma: Vma) -> Vma:
        """vma_merge() with the neighbours, as mlock_fixup's vma_modify_flags does."""
        prev = next((v for v in mm.vmas if v.end == vma.start), None)
        nxt = next((v for v in mm.vmas if v.start == vma.end), None)
        merged = vma
        if prev is not None and vma.can_merge_after(prev):
            merged = replace(prev, end=merged.end)
            mm.replace_vmas([prev, vma], [merged])
        if nxt is not None and nxt.can_merge_after(merged):
            grown = replace(merged, end=nxt.end)
            mm.replace_vmas([merged, nxt], [grown])
            merged = grown
        return merged

    async def mlock_vma_pages_range(
        self, m: Machine, mm: MmState, vma: Vma, newflags: int
    ) -> Vma:
        """§3.6: the VM_IO guard, drains around the walk of present ptes.  Without the guard
        (``vm_io_guard`` off, before v2 07/13) an rmap walker that restores a pte between
        this store and the walk counts it, and the walk counts it again (§8.3 row 4, S23)."""
        guard = m.cfg.vm_io_guard and newflags & VM.LOCKED
        stored = newflags | (VM.IO if guard else 0)
        vma = replace(vma, flags=stored)
        mm.update_vma(vma)
        lock = bool(newflags & VM.LOCKED)
        # The walk's intent goes with the flags (one atomic store): if this CPU dies before
        # the syscall's last store, the CPU that takes it offline finishes it (cpu_hotplug).
        mm.set_info("walk", f"{self.swap.cpu}|{vma.id}|{int(lock)}")
        await save(self.store, mm)  # one atomic store of the flags, visible to rmap walkers
        await self.swap.lru_add_drain(m)
        await self.walk_vma(m, mm, vma, lock)
        mm.set_info("walk", "")
        if stored != newflags:
            vma = replace(vma, flags=newflags)
            mm.update_vma(vma)
        return vma

    async def walk_vma(self, m: Machine, mm: MmState, vma: Vma, lock: bool) -> None:
        """mlock_pte_range over the VMA: mlock_page or munlock_page for each present page,
        then drain.  This is the "mass" operation that batches even with
        ``mlock_batch_scope=mass_only`` (§10.1)."""
        token = MASS_WALK.set(True)
        try:
            await self._walk_vma(m, mm, vma, lock)
        finally:
            MASS_WALK.reset(token)

    async def _walk_vma(self, m: Machine, mm: MmState, vma: Vma, lock: bool) -> None:
        zero = int(PTEBit.ZERO)  # an int: IntFlag arithmetic per pte is slow
        large = large_folio_rules(m)
        first = True
        async for ptes in pt_walk(self.store, mm.key, vma.start, vma.end, WALK_CHUNK):
            if not first:
                # between page tables, no PTL held: the task may be moved (§10.1, sched.py)
                self.swap.cond_resched(m)
            first = False
            progs = Programs.empty()
            seen_pmds: set[int] = set()
            if large:
                sub = [ptes.pop(v) for v in sorted(ptes) if ptes[v].is_subpage]
                self._walk_pte_mapped_thps(vma, lock, sub, progs)
            for vpn in sorted(ptes):
                p = ptes[vpn]
                if p.bits & zero or p.is_subpage:
                    continue  # no normal page (zero page); a pte-mapped THP is skipped (§3.9)
                if p.is_pmd:  # mlock_pte_range: a pmd-mapped THP, once, by its head
                    if p.pmd in seen_pmds:
                        continue
                    seen_pmds.add(p.pmd)
                base = p.pmd * PTRS_PER_PMD if p.is_pmd else vpn
                # the page's identity, re-checked where the page is (see walk_target)
                progs.add(p.lv, ["L" if lock else "K", p.idx, vma.linear_index(base),
                                 vma.file if vma.file else -1])
            await progs.execute(self.swap, m)
        await self.swap.lru_add_drain(m)

    @staticmethod
    def _walk_pte_mapped_thps(vma: Vma, lock: bool, ptes: list[Pte], progs: Programs) -> None:
        """``large_folio_mlock`` (Linux 6.5+ mlock_pte_range with folio_mlock_step and
        allow_mlock_munlock): a THP mapped by ptes is mlocked once when one run of
        consecutive ptes inside this (VM_LOCKED) vma maps all its pages; a munlock walk
        munlocks it once per run, however much of it the run maps."""
        for run in subpage_runs(ptes):
            first = run[0]
            number = first.bits >> SUBPAGE_SHIFT
            index = vma.linear_index(first.vpn - number)  # the head's: walk_target checks it
            target = vma.file if vma.file else -1
            if not lock:
                progs.add(first.lv, ["K", first.idx, index, target])
            elif number == 0 and len(run) == PTRS_PER_PMD:
                progs.add(first.lv, ["L", first.idx, index, target])

    async def finish_walk(self, m: Machine, mm: MmState, dead_cpu: int) -> bool:
        """Finish the mlock/munlock walk a dead CPU left (mmap_lock held for write): an mlock
        only needs its last flag store (the VM_IO guard goes; pages not reached stay an
        allowed undercount, reclaim repairs them); a munlock walks again (munlocking a page
        twice can only undercount).  Returns whether there was one."""
        cpu, vid, lock = [*str(mm.info.get("walk") or "||").split("|"), "", ""][:3]
        if cpu != str(dead_cpu):
            return False
        vma = next((v for v in mm.vmas if v.id == int(vid)), None) if vid else None
        if vma is not None and lock == "1":
            mm.update_vma(replace(vma, flags=vma.flags & ~int(VM.IO)))
        elif vma is not None:
            await self.walk_vma(m, mm, vma, False)
        mm.set_info("walk", "")
        await save(self.store, mm)
        return True

    # -------------------------------------------------------------------- syscalls -------
    async def apply_vma_lock_flags(
        self, m: Machine, mm: MmState, start: int, end: int, flags: int
    ) -> None:
        """Linux's apply_vma_lock_flags: ENOMEM at the first hole (earlier VMAs stay done)."""
        if end == start:
            return
        first = mm.find(start)
        if first is None:
            raise KernelError("ENOMEM", "range not fully mapped")
        pos = start
        for vma in list(mm.overlapping(start, end)):
            if vma.start > pos:
                await save(self.store, mm)
                raise KernelError("ENOMEM", "range not fully mapped")
            newflags = (vma.flags & ~VM_LOCKED_MASK) | flags
            await self.mlock_fixup(m, mm, vma, max(start, vma.start), min(end, vma.end),
                                   newflags)
            pos = min(end, vma.end)
        await save(self.store, mm)
        if pos < end:
            raise KernelError("ENOMEM", "range not fully mapped")

    async def do_mlock(
        self, m: Machine, mm: MmState, addr: int, length: int, flags: int,
    ) -> tuple[int, int]:
        """do_mlock() up to (not including) populate; returns the page range to populate."""
        if flags & ~MLOCK_ONFAULT:
            raise einval("mlock2: unknown flags")
        if not can_do_mlock(mm):
            raise KernelError("EPERM", "RLIMIT_MEMLOCK is 0 and CAP_IPC_LOCK is not held")
        start, end = page_range(addr, length)
        vm_flags = int(VM.LOCKED | (VM.LOCKONFAULT if flags & MLOCK_ONFAULT else 0))
        lock_limit = mm.geti("rlim_soft") >> PAGE_SHIFT
        locked = (end - start) + mm.geti("locked_vm")
        cap = bool(mm.geti("cap_ipc_lock"))
        if locked > lock_limit and not cap:
            locked -= count_mm_mlocked_page_nr(mm, start, end)
        if locked > lock_limit and not cap:
            raise KernelError("ENOMEM", "RLIMIT_MEMLOCK exceeded")
        await self.apply_vma_lock_flags(m, mm, start, end, vm_flags)
        return start, end

    async def do_munlock(self, m: Machine, mm: MmState, addr: int, length: int) -> None:
        start, end = page_range(addr, length)
        await self.apply_vma_lock_flags(m, mm, start, end, 0)

    async def apply_mlockall_flags(self, m: Machine, mm: MmState, flags: int) -> None:
        def_flags = 0
        if flags & MCL_FUTURE:
            def_flags = int(VM.LOCKED | (VM.LOCKONFAULT if flags & MCL_ONFAULT else 0))
        mm.set_info("def_flags", def_flags)
        mm.set_info("mlockall", flags)
        if flags & MCL_CURRENT or not flags:
            to_add = 0
            if flags & MCL_CURRENT:
                to_add = int(VM.LOCKED | (VM.LOCKONFAULT if flags & MCL_ONFAULT else 0))
            for vma in list(mm.vmas):
                current = next((v for v in mm.vmas if v.start <= vma.start < v.end), None)
                if current is None:
                    continue
                newflags = (current.flags & ~VM_LOCKED_MASK) | to_add
                await self.mlock_fixup(m, mm, current, vma.start, vma.end, newflags)
        await save(self.store, mm)

    async def do_mlockall(self, m: Machine, mm: MmState, flags: int) -> None:
        if not flags or flags & ~(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) or flags == MCL_ONFAULT:
            raise einval("mlockall: invalid flags")
        if not can_do_mlock(mm):
            raise KernelError("EPERM", "RLIMIT_MEMLOCK is 0 and CAP_IPC_LOCK is not held")
        lock_limit = mm.geti("rlim_soft") >> PAGE_SHIFT
        total_vm = sum(v.pages for v in mm.vmas)
        if flags & MCL_CURRENT and total_vm > lock_limit and not mm.geti("cap_ipc_lock"):
            raise KernelError("ENOMEM", "RLIMIT_MEMLOCK exceeded by the address space")
        if flags & MCL_CURRENT and not flags & MCL_ONFAULT:
            to_populate = sum(v.pages for v in mm.vmas if populated_by_mlock(v))
            if to_populate > MAX_POPULATE_PAGES:
                raise KernelError("ENOMEM", too_many_pages(to_populate, "lock and populate"))
        await self.apply_mlockall_flags(m, mm, flags)

    async def populate(
        self, m: Machine, mm: MmState, start: int, end: int, *, ignore_errors: bool = False,
        drain: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """__mm_populate(): fault in [start, end); no mlock work of its own (§3.7.1).

        With ``populate_drain`` (Linux 6.18) the CPU's batches are drained after each VMA
        that was actually faulted in, as observed on the host kernel (an empty range, or a
        VM_LOCKONFAULT one, drains nothing); the seed-era kernel left them queued (S2).
        Holes are skipped (find_vma_intersection); with ``ignore_errors`` (mlockall,
        MAP_LOCKED, MAP_POPULATE) a failing VMA is skipped too, else its error ends it."""
        if start >= end:
            return
        for vma in list(mm.overlapping(start, end)):
            a, b = max(start, vma.start), min(end, vma.end)
            legacy = str(m.cfg.protocol) == "legacy"
            if vma.flags & (VM.IO | VM.PFNMAP):
                continue
            if vma.flags & VM.LOCKONFAULT:
                if legacy:  # §9.3.2: FOLL_MLOCK without FOLL_POPULATE: present pages only
                    await self.legacy.populate_mlock(m, mm, vma, a, b)
                continue  # §3.7.3: VM_LOCKONFAULT populate is "no work at all"
            if not vma.flags & (VM.READ | VM.WRITE | VM.EXEC):
                if ignore_errors:
                    continue  # mlockall / MAP_LOCKED: PROT_NONE areas are skipped
                # GUP without FOLL_FORCE on an inaccessible VMA: -EFAULT (mlock: ENOMEM)
                raise KernelError("EFAULT", "populate of a PROT_NONE mapping")
            write = (vma.flags & (VM.WRITE | VM.SHARED)) == VM.WRITE  # break COW (§3.7.2)
            self.swap.cond_resched(m)  # __get_user_pages' cond_resched (§10.1)
            try:
                await self.faults.fault_range(m, mm, vma, a, b, write)
                if legacy:
                    await self.legacy.populate_mlock(m, mm, vma, a, b)
            except KernelError as exc:
                if not ignore_errors or exc.errno not in ("EFAULT", "ENOMEM"):
                    raise
            finally:
                if drain is not None and m.cfg.populate_drain:
                    await drain()


def populated_by_mlock(vma: Vma) -> bool:
    """populate() faults this VMA in (it skips VM_IO/VM_PFNMAP and PROT_NONE ones)."""
    return bool(vma.flags & (VM.READ | VM.WRITE | VM.EXEC)
                and not vma.flags & (VM.IO | VM.PFNMAP))


def count_mm_mlocked_page_nr(mm: MmState, start: int, end: int) -> int:
    return sum(min(end, v.end) - max(start, v.start)
               for v in mm.overlapping(start, end) if v.locked)
