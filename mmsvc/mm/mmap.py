"""mm/mmap.c, mm/mprotect.c and the mm side of fork/exit (spec §3.7.4, §3.8, §1.7.4).

munmap and exit need no munlock walk of their own in the rework (§3.8, patch 03/13): the zap
removes each pte through page_remove_rmap, whose munlock hook does the work.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import replace

from mmsvc.locks import Locks
from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.machine import Machine, new_id, refresh_files
from mmsvc.mm.memory import Faults, Programs, split_huge_pmds_around, zap_range
from mmsvc.mm.mlock import MAX_POPULATE_PAGES, Mlock, too_many_pages
from mmsvc.mm.mm_struct import MmState, Pte, pt_install, pt_read, save
from mmsvc.mm.page import PTRS_PER_PMD, PTEBit
from mmsvc.mm.rmap import anon_vma_add, vma_rmap_lock_keys
from mmsvc.mm.swap import Swap
from mmsvc.mm.swapfile import copy_swap_ptes
from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_LOCKED,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    MmapArgs,
)
from mmsvc.mm.vma import VM, VM_LOCKED_MASK, Vma
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore

TASK_SIZE_VPN = 1 << 35  # 47-bit user address space
KNOWN_MAP_FLAGS = (MAP_SHARED | MAP_PRIVATE | MAP_FIXED | MAP_ANONYMOUS | MAP_LOCKED
                   | MAP_NORESERVE | MAP_POPULATE)
GUARD_PAGES = 1  # a gap between mappings, so separately mapped areas never merge


def prot_to_vm(prot: int) -> int:
    if prot & ~(PROT_READ | PROT_WRITE | PROT_EXEC):
        raise einval("unknown PROT_ bits")
    flags = 0
    if prot & PROT_READ:
        flags |= VM.READ
    if prot & PROT_WRITE:
        flags |= VM.WRITE
    if prot & PROT_EXEC:
        flags |= VM.EXEC
    return flags


def aligned_range(addr: int, length: int) -> tuple[int, int]:
    """munmap/mprotect: addr must be page aligned, length > 0, rounded up, no wrap."""
    if addr < 0 or addr % PAGE_SIZE:
        raise einval("address not page aligned")
    if length <= 0:
        raise einval("length must be positive")
    start = addr >> PAGE_SHIFT
    end = start + ((length + PAGE_SIZE - 1) >> PAGE_SHIFT)
    if end > TASK_SIZE_VPN:
        raise einval("range beyond the user address space")
    return start, end


class Mmap:
    """mmap, munmap, mprotect, fork and exit of address spaces, on behalf of one CPU."""

    def __init__(self, store: RedisStore, swap: Swap, locks: Locks, faults: Faults,
                 mlock: Mlock) -> None:
        self.store = store
        self.swap = swap
        self.locks = locks
        self.faults = faults
        self.mlock = mlock
        self.legacy = mlock.legacy

    async def _legacy_munlock_all(self, m: Machine, mm: MmState, vmas: list[Vma]) -> list[Vma]:
        """Legacy munmap/exit: munlock_vma_pages_all for each VM_LOCKED vma first (§9.6)."""
        if str(m.cfg.protocol) != "legacy":
            return vmas
        out = []
        for vma in vmas:
            if vma.locked:
                vma = replace(vma, flags=vma.flags & ~VM_LOCKED_MASK)
                mm.update_vma(vma)
                await save(self.store, mm)
                await self.legacy.munlock_range(m, mm, vma, vma.start, vma.end)
            out.append(vma)
        return out

    async def do_mmap(self, m: Machine, mm: MmState, args: MmapArgs) -> tuple[Vma, bool]:
        """Create the VMA; returns it and whether it must be populated."""
        if args.length <= 0:
            raise einval("length must be positive")
        if args.flags & ~KNOWN_MAP_FLAGS:
            raise einval("unknown MAP_ flags")
        kind = args.flags & (MAP_SHARED | MAP_PRIVATE)
        if kind not in (MAP_SHARED, MAP_PRIVATE):
            raise einval("exactly one of MAP_SHARED and MAP_PRIVATE")
        if args.offset < 0 or args.offset % PAGE_SIZE:
            raise einval("offset not page aligned")
        if args.addr < 0 or (args.addr % PAGE_SIZE and args.flags & MAP_FIXED):
            raise einval("MAP_FIXED address not page aligned")
        npages = (args.length + PAGE_SIZE - 1) >> PAGE_SHIFT
        if npages >= TASK_SIZE_VPN // 2:
            raise KernelError("ENOMEM", "mapping larger than the address space")
        flags = prot_to_vm(args.prot) | VM.MAYREAD | VM.MAYWRITE | VM.MAYEXEC
        if args.flags & MAP_NORESERVE:
            flags |= VM.NORESERVE
        anon = bool(args.flags & MAP_ANONYMOUS)
        file_id = 0
        pgoff = args.offset >> PAGE_SHIFT
        if anon:
            if args.file:
                raise einval("MAP_ANONYMOUS with a file")
        else:
            f = m.files.get(args.file)
            if f is None:  # created by another worker since this one cached the shape?
                await refresh_files(self.store, m)
                f = m.files.get(args.file)
            if f is None:
                raise KernelError("EBADF", f"no file {args.file!r}")
            file_id = f.fid
        if kind == MAP_SHARED:
            flags |= VM.SHARED | VM.MAYSHARE
        # MAP_LOCKED / MCL_FUTURE (§3.7.4), checked by mlock_future_ok() -> EAGAIN.
        lockflags = int(mm.geti("def_flags"))
        if args.flags & MAP_LOCKED:
            if not (mm.geti("rlim_soft") or mm.geti("cap_ipc_lock")):
                raise KernelError("EPERM", "MAP_LOCKED without RLIMIT_MEMLOCK or CAP_IPC_LOCK")
            lockflags |= VM.LOCKED
        flags |= lockflags & VM_LOCKED_MASK
        if flags & VM.LOCKED and not mm.geti("cap_ipc_lock"):
            limit = mm.geti("rlim_soft") >> PAGE_SHIFT
            if mm.geti("locked_vm") + npages > limit:
                raise KernelError("EAGAIN", "RLIMIT_MEMLOCK exceeded by a locked mapping")
        populate = bool(flags & VM.LOCKED and not flags & VM.LOCKONFAULT) or bool(
            args.flags & MAP_POPULATE and not args.flags & MAP_NORESERVE)
        if populate and npages > MAX_POPULATE_PAGES:
            raise KernelError("ENOMEM", too_many_pages(npages, "populate"))
        shmem = kind == MAP_SHARED and anon
        if shmem and npages > m.cfg.frames_per_node * m.cfg.nodes:
            raise KernelError("ENOMEM", "shared anonymous mapping larger than the machine's "
                                        "memory")
        start = self._get_unmapped_area(mm, args, npages)
        # Every check is done: from here on the call changes things.
        if shmem:
            # shmem_zero_setup(): shared anonymous memory is an unnamed tmpfs file.
            file_id = await self._shmem_zero_file(m, npages)
            pgoff = 0
        if args.flags & MAP_FIXED:
            await self.do_munmap(m, mm, start, start + npages)
        vid = await new_id(self.store, m.mid, "vma")
        if file_id == 0:
            pgoff = start  # anonymous: linear index = vpn
        vma = Vma(vid, start, start + npages, int(flags), file_id, pgoff)
        if file_id:
            await self._i_mmap_link(m, mm, vma)
        mm.replace_vmas([], [vma])
        if vma.locked:
            mm.set_info("locked_vm", mm.geti("locked_vm") + npages)
        if not args.flags & MAP_FIXED:
            mm.set_info("next_vpn", start - GUARD_PAGES)
        await save(self.store, mm)
        return vma, populate

    async def _shmem_zero_file(self, m: Machine, npages: int) -> int:
        from mmsvc.mm.machine import FileInfo, create_file
        from mmsvc.mm.types import FileSpec

        info: FileInfo = await create_file(
            self.store, m, FileSpec(f"dev/zero#{await new_id(self.store, m.mid, 'shm')}", npages)
        )
        return info.fid

    def _get_unmapped_area(self, mm: MmState, args: MmapArgs, npages: int) -> int:
        if args.flags & MAP_FIXED:
            start = args.addr >> PAGE_SHIFT
            if start + npages > TASK_SIZE_VPN:
                raise KernelError("ENOMEM", "fixed mapping beyond the address space")
            return start
        hint = args.addr >> PAGE_SHIFT
        if hint and hint + npages <= TASK_SIZE_VPN and not mm.overlapping(hint, hint + npages):
            return hint
        top = mm.geti("next_vpn")
        lowest = min([v.start for v in mm.vmas], default=top + 1)
        top = min(top, lowest - GUARD_PAGES)
        start = top - npages
        if start < 0x1000:
            raise KernelError("ENOMEM", "address space exhausted")
        return start

    # The i_mmap tree is kept as the set of processes with a VMA of the file (field = pid):
    # rmap walkers then look at those processes' VMAs, which are always exact.

    async def _i_mmap_link(self, m: Machine, mm: MmState, vma: Vma) -> None:
        """vma_link(): insert into the file's i_mmap tree under i_mmap_rwsem (write)."""
        fkey = keys.file(m.mid, vma.file)
        async with self.locks.hold(f"{fkey}:i_mmap_rwsem", "w"):
            await self.store.client.hset(f"{fkey}:immap", str(mm.pid), 1)

    async def _i_mmap_unlink(self, m: Machine, mm: MmState, vmas: list[Vma]) -> None:
        """unlink_file_vma for each removed file VMA (mm.vmas no longer has them)."""
        for vma in vmas:
            if not vma.file:
                continue
            fkey = keys.file(m.mid, vma.file)
            async with self.locks.hold(f"{fkey}:i_mmap_rwsem", "w"):
                if not any(v.file == vma.file for v in mm.vmas):
                    await self.store.client.hdel(f"{fkey}:immap", str(mm.pid))

    async def _i_mmap_update(self, m: Machine, mm: MmState, old: Vma, new: list[Vma]) -> None:
        """__split_vma of a file VMA takes i_mmap_rwsem for write (vma_prepare)."""
        if not old.file:
            return
        async with self.locks.hold(f"{keys.file(m.mid, old.file)}:i_mmap_rwsem", "w"):
            pass

    async def split_at(self, m: Machine, mm: MmState, start: int, end: int) -> list[Vma]:
        """Split VMAs so that none straddles start or end; returns those inside."""
        await split_huge_pmds_around(self.store, self.swap, m, mm, start, end)
        for vma in list(mm.overlapping(start, end)):
            if vma.start >= start and vma.end <= end:
                continue
            pieces: list[Vma] = []
            for s, e in ((vma.start, start), (start, end), (end, vma.end)):
                s, e = max(s, vma.start), min(e, vma.end)
                if s < e:
                    vid = vma.id if not pieces else await new_id(self.store, m.mid, "vma")
                    pieces.append(vma.clip(s, e, vid))
            await self._i_mmap_update(m, mm, vma, pieces)
            mm.replace_vmas([vma], pieces)
        return mm.overlapping(start, end)

    async def do_munmap(self, m: Machine, mm: MmState, start: int, end: int) -> None:
        """§3.8.1: locked_vm drops at detach; the zap munlocks through the rmap hook."""
        inside = await self.split_at(m, mm, start, end)
        for vma in inside:
            if vma.locked:
                mm.set_info("locked_vm", mm.geti("locked_vm") - vma.pages)
        inside = await self._legacy_munlock_all(m, mm, inside)
        mm.replace_vmas(inside, [])
        await save(self.store, mm)
        for vma in inside:
            await zap_range(self.store, self.swap, m, mm, vma, vma.start, vma.end)
        await self._i_mmap_unlink(m, mm, inside)

    async def do_mprotect(self, m: Machine, mm: MmState, start: int, end: int, prot: int) -> None:
        newprot = prot_to_vm(prot)
        if mm.find(start) is None:
            raise KernelError("ENOMEM", "start of the range not mapped")
        # do_mprotect_pkey: VMA by VMA, ascending; a hole stops it with ENOMEM after the
        # VMAs before it were changed
        hole_at = None
        pos = start
        for vma in mm.overlapping(start, end):
            if vma.start > pos:
                hole_at = pos
                break
            pos = vma.end
        if hole_at is None and pos < end:
            hole_at = pos
        if hole_at is not None:
            await self.do_mprotect(m, mm, start, hole_at, prot)
            raise KernelError("ENOMEM", "range not fully mapped")
        for vma in list(mm.overlapping(start, end)):
            if newprot & VM.WRITE and vma.shared and vma.file and not vma.flags & VM.MAYWRITE:
                raise KernelError("EACCES", "file not opened for writing")
        if newprot & VM.WRITE:  # locked private read-only areas made writable are populated
            to_populate = sum(min(end, v.end) - max(start, v.start)
                              for v in mm.overlapping(start, end)
                              if (v.flags & (VM.WRITE | VM.SHARED | VM.LOCKED)) == VM.LOCKED)
            if to_populate > MAX_POPULATE_PAGES:
                raise KernelError("ENOMEM", too_many_pages(to_populate, "populate"))
        inside = await self.split_at(m, mm, start, end)
        populate: list[Vma] = []
        for vma in inside:
            oldflags = vma.flags
            newflags = (oldflags & ~(VM.READ | VM.WRITE | VM.EXEC)) | newprot
            new = replace(vma, flags=newflags)
            mm.update_vma(new)
            if oldflags & VM.WRITE and not newflags & VM.WRITE:
                await self._wrprotect(mm, vma.start, vma.end)
            # mprotect_fixup: a locked private mapping made writable is populated (COW broken)
            if (oldflags & (VM.WRITE | VM.SHARED | VM.LOCKED)) == VM.LOCKED and newflags & VM.WRITE:
                populate.append(new)
        for vma in list(mm.overlapping(start, end)):
            self.mlock._merge(mm, vma) if vma in mm.vmas else None
        await save(self.store, mm)
        for vma in populate:
            cur = mm.find(vma.start)
            if cur is not None:
                await self.mlock.populate(m, mm, vma.start, vma.end, ignore_errors=True,
                                          drain=lambda: self.swap.lru_add_drain(m))

    async def _wrprotect(self, mm: MmState, start: int, end: int) -> None:
        ptes = await pt_read(self.store, mm.key, start, end, walk=True)
        # ~int(): an IntFlag's ~ drops undefined bits - a subpage pte's number (§3.9)
        new = [Pte(p.vpn, p.idx, p.lv, p.bits & ~int(PTEBit.WRITE)) for p in ptes.values()
               if p.bits & PTEBit.WRITE]
        await pt_install(self.store, mm.key, new, ptes)

    async def exit_mmap(self, m: Machine, mm: MmState) -> None:
        """§3.8.2: no locked_vm update and no munlock pass; the zap does it."""
        vmas = await self._legacy_munlock_all(m, mm, list(mm.vmas))
        for vma in vmas:
            await zap_range(self.store, self.swap, m, mm, vma, vma.start, vma.end)
        mm.replace_vmas(vmas, [])
        await self._i_mmap_unlink(m, mm, vmas)
        mm.set_info("alive", 0)
        await save(self.store, mm)

    async def dup_mmap(self, m: Machine, parent: MmState, child: MmState) -> None:
        """fork: VMAs copied without VM_LOCKED/VM_LOCKONFAULT (§1.7.4); the page tables of
        VMAs with an anon_vma copied, their anon pages shared COW."""
        for vma in parent.vmas:
            cid = await new_id(self.store, m.mid, "vma")
            cv = Vma(cid, vma.start, vma.end, vma.flags & ~VM_LOCKED_MASK, vma.file, vma.pgoff)
            if vma.anon_vma:
                # anon_vma_fork: a new anon_vma for the child's own pages, chained to the
                # parent's ones (their pages are found through the child's VMA too)
                cv = replace(cv, anon_vma=await new_id(self.store, m.mid, "anon_vma"),
                             anon_parents=(vma.anon_vma, *vma.anon_parents))
                await anon_vma_add(self.store, m, cv.anon_vma, child.pid)
                for av in cv.anon_parents:
                    await anon_vma_add(self.store, m, av, child.pid)
            child.replace_vmas([], [cv])
            if cv.file:
                await self._i_mmap_link(m, child, cv)
            if vma.shared or not vma.anon_vma:
                # vma_needs_copy(): only an anon_vma means page tables that a fault cannot
                # rebuild; shared mappings and private file ones never written (no COW page
                # yet) fault again in the child
                continue
            async with AsyncExitStack() as stack:
                # The rmap locks of the vma, for write (anon_vma_fork and the child's i_mmap
                # insertion take them): a migration (or a THP split) holds its page's rmap
                # lock from the first migration entry to the last restore, so the copy
                # never meets a migration entry.  Linux instead copies the entries
                # (copy_nonpresent_pte) for remove_migration_ptes' rmap walk to find.
                for key in vma_rmap_lock_keys(m, vma):
                    await stack.enter_async_context(self.locks.hold(key, "w"))
                await self._copy_page_range(m, parent, child, vma)
        await save(self.store, child)

    async def _copy_page_range(self, m: Machine, parent: MmState, child: MmState,
                               vma: Vma) -> None:
        """copy_page_range of a private vma with an anon_vma."""
        # copy_nonpresent_pte: swap entries shared, one more slot reference each
        await copy_swap_ptes(self.store, m, parent.key, child.key, vma.start, vma.end)
        ptes = await pt_read(self.store, parent.key, vma.start, vma.end, walk=True)
        if not ptes:
            return
        progs = Programs.empty()
        small = {v: p for v, p in ptes.items() if not p.is_pmd}
        cow = [Pte(p.vpn, p.idx, p.lv, p.bits & ~int(PTEBit.WRITE)) for p in small.values()]
        for p in small.values():
            if not p.bits & PTEBit.ZERO:
                # page_dup_rmap: no mlock work (§1.7.4); a THP subpage: a pte mapping
                progs.add(p.lv, ["m" if p.is_subpage else "M", p.idx])
        for p in ptes.values():
            if p.is_pmd and p.vpn % PTRS_PER_PMD == 0:
                # copy_huge_pmd: both pmds write-protected, one more compound mapping
                progs.add(p.lv, ["M", p.idx])
                bits = int(p.bits & ~(PTEBit.WRITE | PTEBit.PMD))
                await self.store.fcall("pmd_install", parent.key, p.pmd, p.idx, p.lv, bits,
                                       p.idx, p.lv, int(p.bits & ~PTEBit.PMD))
                await self.store.fcall("pmd_install", child.key, p.pmd, p.idx, p.lv, bits,
                                       0, 0, 0)
        await progs.execute(self.swap, m)
        await pt_install(self.store, parent.key, cow, small)
        await pt_install(self.store, child.key, cow, {})
