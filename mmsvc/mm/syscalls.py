"""The emulated kernel's syscall surface for one worker (CPU): :class:`Kernel`.

Each method takes the locks Linux takes (mmap_lock for read or write, ...), loads what it
needs, delegates to the module named after the kernel file, and maps nothing itself: errors
are :class:`KernelError` with Linux's errno.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from mmsvc.locks import Held, Locks
from mmsvc.mm import machine as machines
from mmsvc.mm import vmstat as views
from mmsvc.mm.checker import check_machine
from mmsvc.mm.cpu_hotplug import CpuHotplug, cpu_lease_ms
from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.filemap import cached_pages
from mmsvc.mm.gup import Gup
from mmsvc.mm.kernel import KsmMergeResult, MigrateResult, PinResult, ReclaimResult
from mmsvc.mm.khugepaged import Khugepaged
from mmsvc.mm.ksm import Ksm, merge_target
from mmsvc.mm.legacy import Legacy
from mmsvc.mm.lockstat import lock_stat
from mmsvc.mm.machine import Machine, release_reserve
from mmsvc.mm.madvise import Madvise
from mmsvc.mm.memory import (
    FaultRace,
    Faults,
    Programs,
    ProgramStopped,
    cache_flags,
    keep_progress,
    read_pages,
)
from mmsvc.mm.migrate import Migrate, MigrateStats, check_target
from mmsvc.mm.migrate_thp import ThpMigrate
from mmsvc.mm.mlock import MAX_POPULATE_PAGES, Mlock, page_range, too_many_pages
from mmsvc.mm.mm_struct import (
    MmState,
    decode_mm,
    decode_ptes,
    ensure_files,
    load_mm,
    pt_read,
)
from mmsvc.mm.mmap import Mmap, aligned_range
from mmsvc.mm.page import PG, PTEBit
from mmsvc.mm.recovery import reconcile
from mmsvc.mm.rmap import Rmap
from mmsvc.mm.sched import RunQueues
from mmsvc.mm.shm import SHM_LOCK, SHM_UNLOCK, Shm, caller_credentials
from mmsvc.mm.swap import Swap
from mmsvc.mm.truncate import Truncate, check_size
from mmsvc.mm.types import (
    MCL_CURRENT,
    MLOCK_ONFAULT,
    Advice,
    CheckReport,
    FileSpec,
    LockStatRow,
    MachineConfig,
    MmapArgs,
    PageInfo,
    ProcessSpec,
    ProcStatus,
    SmapsEntry,
)
from mmsvc.mm.userfaultfd import Userfaultfd
from mmsvc.mm.vma import VM
from mmsvc.mm.vmscan import ShrinkStats, Vmscan
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

#: One request faults in, locks, populates or migrates at most this many pages (mlock.py).
MAX_RANGE_PAGES = MAX_POPULATE_PAGES
MAX_MAP_PAGES = 1 << 24  # the largest mapping (64 GiB): mapping costs nothing until faulted
MAX_RECLAIM_PAGES = 1 << 24  # pages one Reclaim scans per lruvec (bounded by the LRUs)
MAX_VIEW_PAGES = 1 << 20
#: FilePages answers one PageInfo per page of the file: a bigger file would not fit a response.
MAX_FILE_VIEW_PAGES = 1 << 18


def touched_range(addr: int, length: int) -> tuple[int, int]:
    """Fault and Migrate: the pages of the bytes [addr, addr + length), addr not necessarily
    page aligned (one byte per page is touched); EINVAL past the user address space."""
    if addr < 0 or length <= 0:
        raise einval("length must be positive")
    start, end = page_range(addr, length)
    return aligned_range(start << 12, (end - start) << 12)


QUIESCE_TRY_SECONDS = 2.0  # Check(drain_all): all-or-none tries before queueing in pid order


def quiesce_key(m: Machine) -> str:
    """The lock a quiescent Check takes against operations without an mmap_lock."""
    return f"{keys.machine(m.mid)}:quiesce"


@dataclass
class CheckGate:
    """The quiescent checks of one machine on this CPU: one at a time; ``started`` numbers
    them, ``done`` is the last one finished and ``report`` its answer."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    started: int = 0
    done: int = 0
    report: CheckReport | None = None


class Kernel:
    """One CPU of the emulated machines; all state is in the store."""

    def __init__(self, store: RedisStore, cpu: int, *, runqueues: RunQueues | None = None,
                 sibling: Kernel | None = None) -> None:
        """``runqueues``: this CPU is one of a worker's CPUs (mm/sched.py), joined to
        ``sibling``'s (None: the worker's first)."""
        self.store = store
        self.cpu = cpu
        self.locks = Locks(store, cpu)
        self.swap = Swap(store, self.locks)
        if runqueues is not None:
            self.swap.join(runqueues, sibling.swap if sibling is not None else None)
        self.faults = Faults(store, self.swap)
        self.rmap = Rmap(store, self.locks)
        self.legacy = Legacy(store, self.swap, self.locks, self.rmap)
        self.faults.legacy_cow = self.legacy.cow_munlock
        self.hotplug = CpuHotplug(store, cpu, lease_ms=cpu_lease_ms(),
                                  recover=self.recover_dead_cpu)
        self.gate = self.hotplug.gate  # the server runs every syscall through it
        self._online = False
        self.mlocks = Mlock(store, self.swap, self.faults, self.legacy)
        self.mmaps = Mmap(store, self.swap, self.locks, self.faults, self.mlocks)
        self.vmscan = Vmscan(store, self.swap, self.rmap)
        self.migrator = Migrate(store, self.swap, self.rmap)
        self.thp_migrator = ThpMigrate(store, self.swap, self.rmap)
        self.khugepaged = Khugepaged(store, self.swap, self.rmap, self.drain_all, self.faults)
        self.madv = Madvise(store, self.swap, self.faults, self.mlocks, self.vmscan,
                            self.khugepaged)
        self.truncator = Truncate(store, self.swap, self.locks, self.rmap)
        self.gup = Gup(store, self.swap, self.faults)
        self.shms = Shm(store, self.swap, self.locks, self.mmaps)
        self.ksm = Ksm(store, self.swap)
        self.uffd = Userfaultfd(store, self.swap, self.faults)
        # the address spaces this CPU last faulted in, for fault_fast (checked by the store)
        self._seen: dict[tuple[str, int], MmState] = {}
        self.swap.direct_reclaim = self._direct_reclaim
        self._machines: dict[str, Machine] = {}
        self._checks: dict[str, CheckGate] = {}  # quiescent checks, coalesced per machine

    async def cpu_online(self) -> None:
        """Join the machine's CPUs (a lease in the store; dead CPUs get taken offline)."""
        await self.hotplug.online()
        self._online = True

    async def finish_dead_walks(self, machine: str, dead_cpu: int) -> int:
        """CPU hot-unplug: the mlock/munlock walks dead_cpu left half done (each address
        space's ``walk`` intent, stored with the VMA flags) are finished from this CPU."""
        m = await self.machine(machine)
        pids = sorted(int(p) for p in await self.store.client.smembers(
            f"{keys.machine(m.mid)}:procs"))
        pipe = self.store.client.pipeline(transaction=False)
        for pid in pids:
            pipe.hget(f"{keys.mm(m.mid, pid)}:info", "walk")
        done = 0
        for pid, walk in zip(pids, await pipe.execute(), strict=True):
            if not walk or not text(walk).startswith(f"{dead_cpu}|"):
                continue
            with contextlib.suppress(KernelError):  # exited meanwhile
                async with self._mm(machine, pid, "w") as (m2, mm):
                    done += int(await self.mlocks.finish_walk(m2, mm, dead_cpu))
        return done

    async def recover_dead_cpu(self, machine: str, dead_cpu: int) -> Counter[str]:
        """What dead_cpu left half done in this machine (the machine is stopped): its
        mlock/munlock walks finished, then the counts reconciled (mm/recovery.py)."""
        walks = await self.finish_dead_walks(machine, dead_cpu)
        m = await self._machine_fresh(machine)
        repairs = await reconcile(self.store, self.swap, m)
        repairs["walks_finished"] += walks
        return repairs

    async def aclose(self) -> None:
        """A worker stopping: this CPU goes offline (its batches drained, lease dropped)."""
        if self._online:
            self._online = False
            await self.hotplug.offline()

    # ------------------------------------------------------------------ machines -------
    async def machine(self, mid: str) -> Machine:
        m = self._machines.get(mid)
        if m is None:
            m = self._machines[mid] = await machines.load_machine(self.store, mid)
            # with this worker's other CPUs: a task placed here may move to one of them
            await self.store.client.sadd(f"{keys.machine(mid)}:cpus", *self.swap.sibling_cpus())
        return m

    async def _machine_fresh(self, mid: str) -> Machine:
        """Files can be created by other workers: reload the file registry (in place: every
        holder of the cached shape sees it)."""
        m = await self.machine(mid)
        await machines.refresh_files(self.store, m)
        return m

    async def create_machine(self, cfg: MachineConfig) -> str:
        return await machines.create_machine(self.store, cfg)

    async def delete_machine(self, machine: str) -> None:
        await machines.delete_machine(self.store, machine)
        self.forget_machine(machine)

    def forget_machine(self, machine: str) -> None:
        """Drop what this CPU cached of a deleted machine."""
        self._machines.pop(machine, None)
        self._checks.pop(machine, None)

    async def machine_config(self, machine: str) -> MachineConfig:
        return (await self.machine(machine)).cfg

    async def list_machines(self) -> list[str]:
        raw = await self.store.client.smembers(keys.MACHINES)
        return sorted((text(x) for x in raw), key=lambda s: (len(s), s))

    async def create_file(self, machine: str, spec: FileSpec) -> None:
        if spec.prefill and spec.pages > MAX_POPULATE_PAGES:
            raise einval(too_many_pages(spec.pages, "prefill"))
        m = await self._machine_fresh(machine)
        info = await machines.create_file(self.store, m, spec)  # checks the request first
        if spec.prefill:
            async with self._machine_op(m):  # after the checks: a refusal changes nothing
                await self._prefill(m, info.fid, info.pages, info.shmem)

    async def _prefill(self, m: Machine, fid: int, pages: int, shmem: bool) -> None:
        """write(2) of every page: page cache pages via the lru_add batch, then drained."""
        lv = m.lv_of(0, m.cfg.memcgs[0])
        owner = f"prefill{fid}"
        fkey = keys.file(m.mid, fid)
        for base in range(0, pages, 4096):
            idxs = list(range(base, min(pages, base + 4096)))
            await self.store.fcall("pc_lookup", fkey, owner, *idxs)
            progs = Programs.empty()
            for n, index in enumerate(idxs, 1):
                progs.add(lv, ["A", cache_flags(shmem), fid, index, 0], ["G", -n], ["C", -n])
            stopped: ProgramStopped | None = None
            try:
                allocs = await progs.execute(self.swap, m)
            except ProgramStopped as stop:  # a short write: the pages written stay cached
                spans = [(3 * i, 3 * i + 3) for i in range(len(idxs))]
                allocs = stop.allocated[:await keep_progress(self.swap, m, progs, stop, spans)]
                stopped = stop
            publish: list[int | str] = []
            for i, index in enumerate(idxs):
                publish += [index, f"{lv}|{allocs[i]}" if i < len(allocs) else ""]
            await self.store.fcall("pc_commit", fkey, owner, *publish)
            if stopped is not None:
                raise KernelError("ENOMEM", stopped.message) from stopped
        await self.swap.lru_add_drain(m)

    # ----------------------------------------------------------------- processes -------
    @asynccontextmanager
    async def _mm(
        self, machine: str, pid: int, mode: str, prefetch: tuple[int, int] | None = None
    ) -> AsyncIterator[tuple[Machine, MmState]]:
        """mmap_lock held (and the address space loaded) around one syscall."""
        m = await self.machine(machine)
        entered = await self.locks.enter_mm(keys.mm(m.mid, pid), mode, prefetch)
        if entered is None:
            raise KernelError("ESRCH", f"no process {pid} on machine {m.mid}")
        held, info, vmas, ptes = entered
        mm: MmState | None = None
        try:
            mm = decode_mm(m, pid, info, vmas)
            mm.held = held
            await ensure_files(self.store, m, mm)
            if prefetch is not None and ptes is not None:
                mm.prefetched = (prefetch[0], prefetch[1], decode_ptes(ptes))
            yield m, mm
        except KeyError as exc:  # a file created by another worker since we cached
            raise KernelError("EAGAIN", f"stale machine shape: {exc}") from exc
        finally:
            if mm is None or mm.held is not None:  # not released by a fault's last install
                await self.locks.release(held)

    async def create_process(self, machine: str, spec: ProcessSpec) -> int:
        return await machines.create_process(self.store, await self.machine(machine), spec)

    async def fork(self, machine: str, pid: int) -> int:
        async with self._mm(machine, pid, "w") as (m, parent):
            child_pid = await machines.new_id(self.store, m.mid, "pid")
            await machines.write_new_mm(
                self.store, m, child_pid, str(parent.info["memcg"]), parent.geti("node"),
                parent.geti("rlim_soft"), parent.geti("rlim_hard"),
                bool(parent.geti("cap_ipc_lock")), next_vpn=parent.geti("next_vpn"),
            )
            async with self.locks.hold(f"{keys.mm(m.mid, child_pid)}:mmap_lock", "w"):
                child = await load_mm(self.store, m, child_pid)
                await self.mmaps.dup_mmap(m, parent, child)
            return child_pid

    async def exit(self, machine: str, pid: int) -> None:
        async with self._mm(machine, pid, "w") as (m, mm):
            await self.mmaps.exit_mmap(m, mm)
        # do_exit: exit_files() after exit_mm(): the drivers' pins go with their files (gup.py)
        await self.gup.release_pins(m, pid)

    async def setrlimit(self, machine: str, pid: int, soft: int, hard: int) -> None:
        if soft < 0 or hard < 0 or soft > hard:
            raise einval("RLIMIT_MEMLOCK: soft must not exceed hard")
        async with self._mm(machine, pid, "w") as (_, mm):
            if hard > mm.geti("rlim_hard") and not mm.geti("cap_ipc_lock"):
                raise KernelError("EPERM", "raising the hard limit needs CAP_SYS_RESOURCE")
            mm.set_info("rlim_soft", soft)
            mm.set_info("rlim_hard", hard)
            from mmsvc.mm.mm_struct import save

            await save(self.store, mm)

    async def drop_capability(self, machine: str, pid: int, cap: str) -> None:
        if cap != "CAP_IPC_LOCK":
            raise einval(f"unsupported capability {cap!r}")
        async with self._mm(machine, pid, "w") as (_, mm):
            mm.set_info("cap_ipc_lock", 0)
            from mmsvc.mm.mm_struct import save

            await save(self.store, mm)

    # ---------------------------------------------------------------- mmap family -------
    async def mmap(self, machine: str, pid: int, args: MmapArgs) -> int:
        if args.length > MAX_MAP_PAGES << 12:
            raise KernelError("ENOMEM", "mapping too large for this emulator")
        m = await self._machine_fresh(machine) if args.file else await self.machine(machine)
        del m
        async with self._mm(machine, pid, "w") as (m, mm):
            vma, populate = await self.mmaps.do_mmap(m, mm, args)
        if populate:
            async with self._mm(machine, pid, "r") as (m, mm):
                await self.mlocks.populate(m, mm, vma.start, vma.end, ignore_errors=True,
                                           drain=lambda: self.swap.lru_add_drain(m))
        return vma.start << 12

    async def munmap(self, machine: str, pid: int, addr: int, length: int) -> None:
        start, end = aligned_range(addr, length)
        async with self._mm(machine, pid, "w") as (m, mm):
            await self.mmaps.do_munmap(m, mm, start, end)

    async def mprotect(self, machine: str, pid: int, addr: int, length: int, prot: int) -> None:
        start, end = aligned_range(addr, length)
        async with self._mm(machine, pid, "w") as (m, mm):
            await self.mmaps.do_mprotect(m, mm, start, end, prot)

    async def madvise(self, machine: str, pid: int, addr: int, length: int,
                      advice: Advice) -> None:
        if advice == Advice.MADV_DONTNEED_LOCKED and \
                str((await self.machine(machine)).cfg.protocol) == "legacy":
            # Linux 5.18 added it with the rework: to a legacy (5.17) kernel it is an unknown
            # advice (madvise_behavior_valid, checked first).  Its zap of VM_LOCKED ptes has
            # no legacy munlock: page_remove_rmap clears PG_mlocked only with the last
            # mapping, so a page another, unlocked vma maps would stay mlocked (Q4).
            raise einval("MADV_DONTNEED_LOCKED: unknown advice before Linux 5.18 (legacy)")
        if advice == Advice.MADV_COLLAPSE and \
                str((await self.machine(machine)).cfg.protocol) == "legacy":
            raise einval("MADV_COLLAPSE: unknown advice before Linux 6.1 (legacy)")
        if addr < 0 or addr % 4096:
            raise einval("address not page aligned")
        if length < 0:
            raise einval("negative length")
        if length == 0:
            return
        start, end = aligned_range(addr, length)
        populate = advice in (Advice.MADV_POPULATE_READ, Advice.MADV_POPULATE_WRITE)
        if populate and end - start > MAX_RANGE_PAGES:
            raise einval(too_many_pages(end - start, "populate"))
        # madvise_need_mmap_write: no - but MADV_COLLAPSE's collapse_huge_page of anonymous
        # memory takes the mmap_lock for write (khugepaged_anon.py)
        mode = "w" if advice == Advice.MADV_COLLAPSE else "r"
        async with self._mm(machine, pid, mode) as (m, mm):
            await self.madv.madvise(m, mm, start, end, Advice(advice))

    # ---------------------------------------------------------------- mlock family -------
    async def mlock(self, machine: str, pid: int, addr: int, length: int, flags: int = 0) -> None:
        start, end = page_range(addr, length)
        if end - start > MAX_RANGE_PAGES and not flags & MLOCK_ONFAULT:  # onfault: no populate
            raise KernelError("ENOMEM", too_many_pages(end - start, "lock and populate"))
        async with self._mm(machine, pid, "w") as (m, mm):
            start, end = await self.mlocks.do_mlock(m, mm, addr, length, flags)
        async with self._mm(machine, pid, "r") as (m, mm):
            try:
                await self.mlocks.populate(m, mm, start, end,
                                           drain=lambda: self.swap.lru_add_drain(m))
            except KernelError as exc:
                # __mlock_posix_error_return: EFAULT -> ENOMEM, ENOMEM -> EAGAIN
                if exc.errno == "ENOMEM":
                    raise KernelError("EAGAIN", exc.message) from exc
                if exc.errno == "EFAULT":
                    raise KernelError("ENOMEM", exc.message) from exc
                raise

    async def munlock(self, machine: str, pid: int, addr: int, length: int) -> None:
        async with self._mm(machine, pid, "w") as (m, mm):
            await self.mlocks.do_munlock(m, mm, addr, length)

    async def mlockall(self, machine: str, pid: int, flags: int) -> None:
        async with self._mm(machine, pid, "w") as (m, mm):
            await self.mlocks.do_mlockall(m, mm, flags)
        if flags & MCL_CURRENT:
            async with self._mm(machine, pid, "r") as (m, mm):
                for vma in list(mm.vmas):
                    await self.mlocks.populate(m, mm, vma.start, vma.end, ignore_errors=True,
                                               drain=lambda: self.swap.lru_add_drain(m))

    async def munlockall(self, machine: str, pid: int) -> None:
        async with self._mm(machine, pid, "w") as (m, mm):
            await self.mlocks.apply_mlockall_flags(m, mm, 0)

    # ------------------------------------------------------------------- SysV shm -------
    async def shm_create(self, machine: str, pid: int, pages: int,
                         addr: int = 0) -> tuple[int, int]:
        """shmget(IPC_PRIVATE, pages) + shmat into pid (mmsvc/mm/shm.py): (shmid, address).
        All or nothing: a segment whose shmat fails is removed again."""
        if not 1 <= pages <= MAX_MAP_PAGES:
            raise einval("segment size must be 1 page .. 64 GiB")
        if addr < 0 or addr % 4096:
            raise einval("address not page aligned")
        await self._machine_fresh(machine)  # the segment's file: other CPUs must see it
        async with self._mm(machine, pid, "w") as (m, mm):
            shmid = await self.shms.shmget(m, pages)
            try:
                start = await self.shms.shmat(m, mm, shmid, addr)
            except KernelError:
                await self.shms.remove_unattached(m, shmid)
                raise
        return shmid, start << 12

    async def shm_attach(self, machine: str, pid: int, shmid: int, addr: int = 0) -> int:
        """shmat(shmid, addr, 0): returns the address of the new shared mapping."""
        if addr < 0 or addr % 4096:
            raise einval("address not page aligned")
        await self._machine_fresh(machine)  # a segment made by another CPU
        async with self._mm(machine, pid, "w") as (m, mm):
            return await self.shms.shmat(m, mm, shmid, addr) << 12

    async def shm_ctl(self, machine: str, pid: int, shmid: int, cmd: str) -> None:
        """shmctl(shmid, SHM_LOCK | SHM_UNLOCK) by pid (its RLIMIT_MEMLOCK, CAP_IPC_LOCK)."""
        if cmd not in (SHM_LOCK, SHM_UNLOCK):
            raise einval(f"unknown shmctl command {cmd!r}")
        m = await self._machine_fresh(machine)
        rlim_soft, capable = await caller_credentials(self.store, m, pid)
        await self.shms.shmctl(m, shmid, cmd, rlim_soft, capable)

    # --------------------------------------------------------------------- faults -------
    async def fault(self, machine: str, pid: int, addr: int, length: int, write: bool) -> int:
        start, end = touched_range(addr, length)
        if end - start > MAX_RANGE_PAGES:
            raise einval(too_many_pages(end - start, "fault in"))
        if write and end - start == 1 and await self._fault_fast(machine, pid, start):
            return 1
        async with self._mm(machine, pid, "r", prefetch=(start, end)) as (m, mm):
            if not mm.covered(start, end):
                raise KernelError("EFAULT", "SIGSEGV: address not mapped")
            done = 0
            vmas = mm.overlapping(start, end)
            mm.unlock_on_install = len(vmas) == 1
            for vma in vmas:
                done += await self.faults.fault_range(m, mm, vma, max(start, vma.start),
                                                      min(end, vma.end), write)
            self._remember(m, mm)
            return done

    def _remember(self, m: Machine, mm: MmState) -> None:
        if len(self._seen) > 4096:
            self._seen.clear()
        self._seen[(m.mid, mm.pid)] = mm

    async def _fault_fast(self, machine: str, pid: int, vpn: int) -> bool:
        """One round trip for the common fault: a write to a new page of private anonymous
        memory (do_anonymous_page) of an address space this CPU has faulted in before; the
        store checks that the VMA and the pte are still what this CPU saw (Faults.fault_fast).
        Only on a single Redis, with the rework protocol and without THP."""
        m = await self.machine(machine)
        seen = self._seen.get((m.mid, pid))
        if (seen is None or self.store.is_cluster or m.cfg.thp
                or str(m.cfg.protocol) == "legacy"):
            return False
        vma = seen.find(vpn)
        if (vma is None or not vma.is_anon or vma.shared or not vma.anon_vma
                or not vma.flags & VM.WRITE):
            return False
        mm = MmState(seen.pid, seen.key, dict(seen.info), list(seen.vmas))
        try:
            return await self.faults.fault_fast(m, mm, vma, vpn, self.locks.lease_ms)
        except FaultRace:
            return False  # lost the pte to another fault (undone): fault the usual way

    async def migrate(self, machine: str, pid: int, addr: int, length: int,
                      node: int) -> MigrateResult:
        """move_pages(2)/mbind-like: migrate the range's pages to node (spec §4)."""
        start, end = touched_range(addr, length)
        if end - start > MAX_RANGE_PAGES:
            raise einval(too_many_pages(end - start, "migrate"))
        async with self._mm(machine, pid, "r") as (m, mm):
            check_target(m, node)
            if not mm.covered(start, end):
                raise KernelError("EFAULT", "range not fully mapped")
            ptes = await pt_read(self.store, mm.key, start, end)
            pages = list(dict.fromkeys((p.lv, p.idx) for p in ptes.values()
                                       if not p.bits & PTEBit.ZERO))
            thps = {(p.lv, p.idx) for p in ptes.values() if p.is_pmd or p.is_subpage}
            stats = MigrateStats()
            # do_pages_move: lru_cache_disable() drains every CPU and keeps batches empty
            self.swap.lru_cache_disabled += 1
            try:
                await self.swap.lru_add_drain(m)
                await self.drain_all(m)
                for lv, idx in pages:
                    self.swap.cond_resched(m)  # migrate_pages' cond_resched (§10.1)
                    _, memcg = m.lv_identity(lv)
                    target = m.lv_of(node, memcg)
                    if target == lv:
                        stats.migrated += 1
                        continue
                    if (lv, idx) in thps:  # a THP moves whole (migrate_thp.py)
                        await self.thp_migrator.migrate_page(m, lv, idx, target, stats)
                        continue
                    await self.migrator.migrate_page(m, lv, idx, target, stats)
            finally:
                self.swap.lru_cache_disabled -= 1
        errno = "EBUSY" if stats.busy else ("EAGAIN" if stats.failed else "")
        return MigrateResult(stats.migrated, stats.failed + stats.busy, errno)

    async def reclaim(self, machine: str, node: int | None, memcg: str | None,
                      nr_pages: int) -> ReclaimResult:
        """Memory pressure on a node and/or memcg: scan up to nr_pages per lruvec (§5)."""
        m = await self._machine_fresh(machine)
        if nr_pages <= 0 or nr_pages > MAX_RECLAIM_PAGES:
            raise einval("nr_pages must be 1..16M")
        if node is not None and not 0 <= node < m.cfg.nodes:
            raise einval(f"no node {node}")
        if memcg is not None and memcg not in m.cfg.memcgs:
            raise einval(f"no memcg {memcg!r}")
        total = ShrinkStats()
        async with self._machine_op(m):
            for (n, cg), lv in sorted(m.lruvecs.items(), key=lambda kv: kv[1]):
                if (node is None or n == node) and (memcg is None or cg == memcg):
                    st = await self.vmscan.shrink_lruvec(m, lv, nr_pages)
                    total.scanned += st.scanned
                    total.reclaimed += st.reclaimed
                    total.culled += st.culled
                    await release_reserve(self.store, m, lv)
        return ReclaimResult(total.scanned, total.reclaimed, total.culled)

    @asynccontextmanager
    async def _machine_op(self, m: Machine) -> AsyncIterator[None]:
        """A memory operation that takes no mmap_lock (Reclaim, truncation, hole punch, a
        prefilled file) holds the machine's quiesce lock shared; a quiescent Check takes it
        exclusively, after every mmap_lock, so it never sees one half done (the checker's
        invariants assume nothing in progress, §8.5: a reclaim in flight has locked pages
        and swap slots not yet in a pte).  None of these operations takes an mmap_lock, and
        direct reclaim, which runs inside a syscall holding one, does not take this lock."""
        async with self.locks.hold(quiesce_key(m), "r"):
            yield

    async def _direct_reclaim(self, m: Machine, lv: int, need: int) -> int:
        """An allocation found its node empty: reclaim from the node's lruvecs (§5)."""
        node, _ = m.lv_identity(lv)
        got = 0
        for (n, _cg), other in sorted(m.lruvecs.items(), key=lambda kv: kv[1]):
            if n != node:
                continue
            st = await self.vmscan.shrink_lruvec(m, other, max(need, 32))
            got += st.reclaimed
            await release_reserve(self.store, m, other)
        return got

    # ------------------------------------------------------ truncation and pins -------
    async def truncate(self, machine: str, file: str, size_pages: int) -> None:
        """ftruncate(2) of a file to size_pages (mm/truncate.py, spec S20)."""
        m = await self._machine_fresh(machine)
        f = self._file_named(m, file)
        check_size(m, size_pages, "size")
        async with self._machine_op(m):
            await self.truncator.ftruncate(m, f, size_pages)

    async def punch_hole(self, machine: str, file: str, offset_pages: int, pages: int) -> None:
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) of pages [offset, +pages)."""
        m = await self._machine_fresh(machine)
        f = self._file_named(m, file)
        if offset_pages < 0 or pages <= 0:
            raise einval("offset must be >= 0 and length > 0")  # fallocate(2) EINVAL
        async with self._machine_op(m):
            await self.truncator.punch_hole(m, f, offset_pages, pages)

    @staticmethod
    def _file_named(m: Machine, name: str) -> machines.FileInfo:
        f = m.files.get(name)
        if f is None:
            raise KernelError("ENOENT", f"no file {name!r}")
        return f

    async def pin(self, machine: str, pid: int, addr: int, length: int,
                  write: bool) -> PinResult:
        """pin_user_pages(FOLL_PIN | FOLL_LONGTERM [| FOLL_WRITE]) of the range (gup.py)."""
        if addr < 0 or addr % 4096:
            raise einval("address not page aligned")
        start, end = touched_range(addr, length)
        if end - start > MAX_RANGE_PAGES:
            raise einval(too_many_pages(end - start, "pin"))
        async with self._mm(machine, pid, "r") as (m, mm):
            return await self.gup.pin_user_pages(m, mm, start, end, write)

    async def unpin(self, machine: str, pid: int, pin_id: int) -> int:
        """unpin_user_pages of a pin pid took; returns the pages unpinned."""
        m = await self.machine(machine)
        if not await self.store.client.sismember(f"{keys.machine(m.mid)}:procs", str(pid)):
            raise KernelError("ESRCH", f"no process {pid} on machine {m.mid}")
        return await self.gup.unpin(m, pid, pin_id)

    async def ksm_merge(self, machine: str, pid: int, addr: int, other_pid: int,
                        other_addr: int) -> KsmMergeResult:
        """ksmd found the page at (other_pid, other_addr) identical to the one at (pid,
        addr): the first becomes (or is) the KSM page, the second is replaced by it (ksm.py)."""
        for a in (addr, other_addr):
            if a < 0 or a % 4096:
                raise einval("address not page aligned")
        m = await self.machine(machine)
        # ksmd's scan starts with lru_add_drain_all(): batch entries hold page references,
        # which write_protect_page's refcount check would take for a GUP pin
        await self.swap.lru_add_drain(m)
        await self.drain_all(m)
        async with contextlib.AsyncExitStack() as stack:
            mms: dict[int, MmState] = {}
            for p in sorted({pid, other_pid}):  # both mmap_locks for read, in pid order
                m, mms[p] = await stack.enter_async_context(self._mm(machine, p, "r"))
            first = await merge_target(self.store, m, mms[pid], addr // 4096)
            second = await merge_target(self.store, m, mms[other_pid], other_addr // 4096)
            return await self.ksm.merge(m, first, second)

    async def uffd_copy(self, machine: str, pid: int, addr: int, length: int) -> int:
        """UFFDIO_COPY of new pages into [addr, addr+length) (userfaultfd.py); returns the
        pages copied."""
        if addr < 0 or addr % 4096 or length <= 0 or length % 4096:
            raise einval("UFFDIO_COPY needs a page-aligned address and length > 0")
        start, end = addr // 4096, (addr + length) // 4096
        if end - start > MAX_RANGE_PAGES:
            raise einval(too_many_pages(end - start, "copy"))
        async with self._mm(machine, pid, "r") as (m, mm):
            return await self.uffd.copy(m, mm, start, end)

    async def isolate(self, machine: str, pid: int, addr: int, length: int) -> int:
        """Take the range's pages off their LRU, as compaction or NUMA balancing does
        (isolate_lru_page, §2.1.1; spec Appendix B).  Returns how many were isolated."""
        start, end = aligned_range(addr, length)
        async with self._mm(machine, pid, "r") as (m, mm):
            ptes = await pt_read(self.store, mm.key, start, end)
            done = 0
            for lv, idx in dict.fromkeys((p.lv, p.idx) for p in ptes.values()
                                         if not p.bits & PTEBit.ZERO):
                done += len((await self.swap.run(m, lv, [["I", idx, 1]])).isolated)
            return done

    async def putback(self, machine: str, pid: int, addr: int, length: int) -> int:
        """putback_lru_page for the range's isolated pages (§2.1.2): lru-add re-decides."""
        start, end = aligned_range(addr, length)
        async with self._mm(machine, pid, "r") as (m, mm):
            ptes = await pt_read(self.store, mm.key, start, end)
            refs = list(dict.fromkeys((p.lv, p.idx) for p in ptes.values()
                                      if not p.bits & PTEBit.ZERO))
            pages = await read_pages(self.store, m, refs)
            done = 0
            for (lv, idx), page in zip(refs, pages, strict=True):
                # only pages this API isolated: others belong to reclaim or migration
                if page.flags & PG.INUSE and page.has(PG.USER_ISOLATED):
                    # re-checked in the store: a racing Putback may have put it back since
                    res = await self.swap.run(m, lv, [["B", idx, 0, 1]])
                    done += not res.failed
            return done

    async def drain(self, machine: str, all_cpus: bool) -> None:
        m = await self.machine(machine)
        await self.swap.lru_add_drain(m)
        if all_cpus:
            await self.drain_all(m)

    async def drain_all(self, m: Machine) -> None:
        """lru_add_drain_all(): other CPUs' batches are drained from the store, as the kernel
        drains an offline CPU's pagevecs from another CPU."""
        cpus = {int(c) for c in await self.store.client.smembers(f"{keys.machine(m.mid)}:cpus")}
        for cpu in sorted(cpus - {self.swap.here().cpu}):  # not the one the caller drained
            # a CPU of this worker with its own Swap (its batch mirror and lock), another
            # worker's from the store
            other = self.swap.sibling(cpu) or Swap(self.store, Locks(self.store, cpu))
            await other.lru_add_drain_cpu(m)

    # ---------------------------------------------------------------------- views -------
    async def vmstat(self, machine: str) -> dict[str, int]:
        m = await self.machine(machine)
        if m.cfg.stat_refresh_drains_all:
            # §2.7, §10.1 stat_refresh_drains_all: Hugh's dropped stat_refresh change
            # [Hugh->Babka 11/13] - lru_add_drain_all() first, so batched entries on any CPU
            # are counted (nr_unevictable exact) when vmstat is read.
            await self.swap.lru_add_drain(m)
            await self.drain_all(m)
        return await views.vmstat(self.store, m)

    async def meminfo(self, machine: str) -> dict[str, int]:
        return await views.meminfo(self.store, await self.machine(machine))

    async def proc_status(self, machine: str, pid: int) -> ProcStatus:
        m = await self.machine(machine)
        mm = await load_mm(self.store, m, pid, allow_dead=True)
        return views.proc_status(mm, await views.rss_pages(self.store, mm))

    async def smaps(self, machine: str, pid: int) -> list[SmapsEntry]:
        m = await self.machine(machine)
        return await views.smaps(self.store, m, await load_mm(self.store, m, pid,
                                                               allow_dead=True))

    async def page_flags(self, machine: str, pid: int, addr: int, length: int) -> list[PageInfo]:
        start, end = aligned_range(addr, length)
        if end - start > MAX_VIEW_PAGES:
            raise einval("at most 1M pages per view")
        m = await self.machine(machine)
        mm = await load_mm(self.store, m, pid, allow_dead=True)
        return await views.page_flags(self.store, m, mm, start, end)

    async def file_pages(self, machine: str, name: str) -> list[PageInfo]:
        m = await self._machine_fresh(machine)
        f = m.files.get(name)
        if f is None:
            raise KernelError("ENOENT", f"no file {name!r}")
        if f.pages > MAX_FILE_VIEW_PAGES:
            raise KernelError("E2BIG", f"file {name!r} has {f.pages} pages: a view shows at "
                                       f"most {MAX_FILE_VIEW_PAGES}")
        cached = {index: slot.ref for index, slot in
                  (await cached_pages(self.store, m, f.fid)).items()}
        order = sorted(cached)
        pages = await read_pages(self.store, m, [cached[i] for i in order])
        found = dict(zip(order, pages, strict=True))
        out = []
        for index in range(f.pages):
            if index in found:
                lv, idx = cached[index]
                out.append(views.describe_page(m, index << 12, lv, idx, found[index], False))
            else:
                out.append(PageInfo(index << 12, False, False, "."))
        return out

    async def lock_stat(self, machine: str) -> list[LockStatRow]:
        return await lock_stat(self.store, await self.machine(machine))

    async def check(self, machine: str, drain_all: bool) -> CheckReport:
        """The §8.5 checker.  With drain_all the machine is made quiescent first: every live
        process's mmap_lock is taken for write (ascending pid, the order fork uses), so no
        syscall is in progress, then every CPU's batches are drained."""
        m = await self._machine_fresh(machine)
        if not drain_all:
            return await check_machine(self.store, m, quiescent=False)
        # Checks that arrive while one runs share the next one: it starts after all of them
        # arrived, so its report answers each (N waiting checks cost two, not N quiesces)
        gate = self._checks.setdefault(m.mid, CheckGate())
        arrived = gate.started
        async with gate.lock:
            if gate.done > arrived and gate.report is not None:
                return gate.report
            gate.started += 1
            mine = gate.started
            report = await self._check_quiescent(m)
            gate.done, gate.report = mine, report
            return report

    async def _check_quiescent(self, m: Machine) -> CheckReport:
        pids = sorted(int(p) for p in
                      await self.store.client.smembers(f"{keys.machine(m.mid)}:procs"))
        held = await self._quiesce(m, pids)
        try:
            # then the operations that take no mmap_lock (_machine_op): taken last, so that
            # they wait only for the check itself, not for the quiescing of every process
            async with self.locks.hold(quiesce_key(m), "w"):
                await self.swap.lru_add_drain(m)
                await self.drain_all(m)
                return await check_machine(self.store, m, quiescent=True)
        finally:
            for h in reversed(held):
                await self.locks.release(h)

    async def _quiesce(self, m: Machine, pids: list[int]) -> list[Held]:
        """Every process's mmap_lock for write.  First all at once or none, for up to
        QUIESCE_TRY_SECONDS: a busy lock makes this give back the ones it took and try again
        a little later, so the syscalls of the processes already taken are not held up
        behind a Check waiting for the others.  On a machine too busy for that to succeed
        (every lock taken at every try), the locks are then queued for, one after another in
        pid order - the order every caller that takes several mmap_locks uses (KSM merge),
        so this cannot deadlock; each wait is bounded by the holder's lease (EAGAIN)."""
        deadline = time.monotonic() + QUIESCE_TRY_SECONDS
        attempt = 0
        while time.monotonic() < deadline:
            held: list[Held] = []
            for pid in pids:
                h = await self.locks.try_acquire(f"{keys.mm(m.mid, pid)}:mmap_lock", "w")
                if h is None:
                    break
                held.append(h)
            else:
                return held
            for h in reversed(held):
                await self.locks.release(h)
            attempt += 1
            await asyncio.sleep(min(0.005 * attempt, 0.1))
        held = []
        try:
            for pid in sorted(pids):
                held.append(await self.locks.acquire(f"{keys.mm(m.mid, pid)}:mmap_lock", "w"))
        except BaseException:
            for h in reversed(held):
                await self.locks.release(h)
            raise
        return held
