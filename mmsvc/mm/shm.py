"""ipc/shm.c with mm/shmem.c's shmem_lock/shmem_unlock_mapping: SysV shared memory and SHM_LOCK
(spec §1.1.4, §1.6.1, §7.1 ``scanned``, §8.5 X2, §11 S30).

A segment is a shmem (tmpfs) file of the machine, named ``SYSV#<shmid>``; ``shmat`` maps it
shared into a process like any shared file mapping (its pages are page cache, ``kind f``).

SHM_LOCK (``shmem_lock(file, 1)``) charges the segment to the user (``user_shm_lock``) and sets
the mapping unevictable (``mapping_set_unevictable``): here the mark is kept on the mapping (for
pages read in later, see ``pc_lookup_flags``) and on every page of its page cache as
``PG_UNEVICTABLE_MAPPING``, which ``page_evictable`` consults (§1.6.1).  Nothing is faulted and
nothing moves: a page already on an evictable list stays there until lru-add or reclaim meets
it and culls it (``culled``); a page added to the LRU afterwards is culled at lru-add (§2.1.4).
An mlock of a page already on the unevictable LRU only raises its mlock_count (S30, §2.4.4),
and its munlock leaves it there (§2.6.5: still not evictable).

SHM_UNLOCK (``shmem_lock(file, 0)`` + ``shmem_unlock_mapping``) uncharges, clears the mark and
runs ``check_move_unevictable_folios`` over the segment's page cache: every page is
``scanned``; those on the unevictable LRU that are evictable now move to their inactive list
(``rescued``); mlocked pages stay.  SHM_UNLOCK of a segment that is not locked does nothing.

Credentials, as ipc/shm.c checks them: without CAP_IPC_LOCK, SHM_LOCK with a zero
RLIMIT_MEMLOCK is EPERM; ``user_shm_lock`` refuses (ENOMEM) a charge beyond RLIMIT_MEMLOCK
(the caller's soft limit, in pages) unless the caller has CAP_IPC_LOCK.  Linux charges the
*user* (``ucounts``); every process of an emulated machine runs as one user, so the charge is
kept per machine.  Segments are never removed (IPC_RMID is not emulated): a segment lives as
long as its machine, like one whose creator never removed it.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import replace

from mmsvc.locks import Locks
from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.filemap import parse_slot
from mmsvc.mm.machine import Machine, create_file, new_id
from mmsvc.mm.memory import FAULT_RETRY_SECONDS, Programs
from mmsvc.mm.mm_struct import MmState, save
from mmsvc.mm.mmap import Mmap
from mmsvc.mm.page import PG
from mmsvc.mm.swap import Swap
from mmsvc.mm.types import (
    MAP_SHARED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    FileSpec,
    MmapArgs,
)
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

SHM_LOCK, SHM_UNLOCK = "SHM_LOCK", "SHM_UNLOCK"  # shmctl commands (Linux 11, 12)
RLIM_INFINITY = (1 << 64) - 1
PASS_CHUNK = 2048  # pages per page-program call of a SHM_LOCK / SHM_UNLOCK pass


def segment_file(shmid: int) -> str:
    return f"SYSV#{shmid}"


class Shm:
    """shmget, shmat and shmctl(SHM_LOCK / SHM_UNLOCK) on behalf of one CPU."""

    def __init__(self, store: RedisStore, swap: Swap, locks: Locks, mmaps: Mmap) -> None:
        self.store = store
        self.swap = swap
        self.locks = locks
        self.mmaps = mmaps

    # ---------------------------------------------------------------- shmget / shmat ----
    async def shmget(self, m: Machine, pages: int) -> int:
        """shmget(IPC_PRIVATE, pages * PAGE_SIZE): a new segment (a tmpfs file, nothing
        allocated yet).  The size is checked first (EINVAL): nothing is created then."""
        if not 1 <= pages <= m.cfg.frames_per_node * m.cfg.nodes:
            raise einval("segment size must be 1 page .. the machine's memory")
        shmid = await new_id(self.store, m.mid, "shm_seg")
        info = await create_file(self.store, m, FileSpec(segment_file(shmid), pages))
        await self.store.client.hset(f"{keys.machine(m.mid)}:shm", str(shmid),
                                     f"{info.fid}|{pages}|0")
        return shmid

    async def segment(self, m: Machine, shmid: int) -> tuple[int, int, bool]:
        """(fid, pages, SHM_LOCKED) of a segment; EINVAL when there is none (shm_obtain_object)."""
        raw = await self.store.client.hget(f"{keys.machine(m.mid)}:shm", str(shmid))
        if raw is None:
            raise einval(f"no shared memory segment {shmid}")
        fid, pages, locked = text(raw).split("|")
        return int(fid), int(pages), locked == "1"

    async def shmat(self, m: Machine, mm: MmState, shmid: int, addr: int) -> int:
        """shmat(shmid, addr, 0): a shared read-write mapping of the whole segment; ``addr``
        is a hint, as mmap's.  Returns the first virtual page."""
        _, pages, _ = await self.segment(m, shmid)
        vma, _ = await self.mmaps.do_mmap(m, mm, MmapArgs(
            length=pages << PAGE_SHIFT, prot=PROT_READ | PROT_WRITE, flags=MAP_SHARED,
            file=segment_file(shmid), addr=addr))
        # shm_vm_ops has a close hook: the attach's VMAs never merge once split (mm/vma.c)
        mm.update_vma(replace(vma, vm_ops_close=True))
        await save(self.store, mm)
        return vma.start

    async def remove_unattached(self, m: Machine, shmid: int) -> None:
        """Undo a shmget whose shmat failed (ShmCreate is all or nothing): the segment has no
        page and no mapping yet."""
        name = segment_file(shmid)
        await self.store.client.hdel(f"{keys.machine(m.mid)}:shm", str(shmid))
        await self.store.client.hdel(f"{keys.machine(m.mid)}:files", name)
        m.files.pop(name, None)

    # ---------------------------------------------------------------- shmctl ------------
    async def shmctl(self, m: Machine, shmid: int, cmd: str, rlim_soft: int,
                     capable: bool) -> None:
        """shmctl(shmid, SHM_LOCK | SHM_UNLOCK, NULL)."""
        if cmd not in (SHM_LOCK, SHM_UNLOCK):
            raise einval(f"unknown shmctl command {cmd!r}")
        fid, _, _ = await self.segment(m, shmid)
        lock = cmd == SHM_LOCK
        if lock and not capable and rlim_soft == 0:
            raise KernelError("EPERM", "SHM_LOCK without CAP_IPC_LOCK and RLIMIT_MEMLOCK 0")
        limit = -1 if rlim_soft >= RLIM_INFINITY else rlim_soft // PAGE_SIZE
        fkey = keys.file(m.mid, fid)
        # ipc_lock_object: one shmctl at a time per segment, so that the mapping's mark and
        # the pass over its pages of a SHM_LOCK and a SHM_UNLOCK never interleave.
        async with self.locks.hold(f"{fkey}:ipc_lock", "w"):
            err, _, changed = await self.store.fcall(
                "shm_ctl", keys.machine(m.mid), shmid, "lock" if lock else "unlock", limit,
                int(capable))
            if text(err) != "ok":
                raise KernelError(text(err), "SHM_LOCK beyond RLIMIT_MEMLOCK (user_shm_lock)"
                                  if text(err) == "ENOMEM" else f"no segment {shmid}")
            if not int(changed):
                return  # already locked / not locked: shmctl changes nothing
            await self.store.fcall("shm_mapping_flags", fkey,
                                   int(PG.UNEVICTABLE_MAPPING) if lock else 0)
            await self._mapping_pass(m, fid, lock)

    async def _mapping_pass(self, m: Machine, fid: int, lock: bool) -> None:
        """Every page of the segment's page cache, in index order (filemap_get_folios): marked
        (SHM_LOCK) or unmarked and checked (SHM_UNLOCK: check_move_unevictable_folios).

        A slot reserved by a fault (a page being read in) is waited for: the fault read the
        mapping's mark when it reserved the slot, maybe before this shmctl changed it."""
        fkey = keys.file(m.mid, fid)
        seen: set[int] = set()
        deadline = asyncio.get_running_loop().time() + FAULT_RETRY_SECONDS
        while True:
            raw = await self.store.client.hgetall(f"{fkey}:pc")
            ready: list[tuple[int, int, int]] = []
            busy = False
            thps: set[tuple[int, int]] = set()  # a file THP: once, by its head's index
            for k, v in raw.items():
                index, val = int(k), text(v)
                if val.startswith("busy|"):
                    busy = True  # being read in (or back from swap)
                elif index not in seen and (slot := parse_slot(val)) is not None:
                    if slot.ref not in thps:
                        ready.append((slot.lookup_index(index), slot.lv, slot.idx))
                    if slot.is_thp:
                        thps.add(slot.ref)
                    seen.add(index)
            ready.sort()
            by_chunk: dict[int, Programs] = defaultdict(Programs.empty)
            for n, (index, lv, idx) in enumerate(ready):
                by_chunk[n // PASS_CHUNK].add(lv, ["shm", idx, fid, index, int(lock)])
                seen.add(index)
            for chunk in sorted(by_chunk):
                await by_chunk[chunk].execute(self.swap, m)
            if not busy or asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.002)


async def caller_credentials(store: RedisStore, m: Machine, pid: int) -> tuple[int, bool]:
    """(RLIMIT_MEMLOCK soft, CAP_IPC_LOCK) of a live process; ESRCH otherwise."""
    info = await store.client.hmget(f"{keys.mm(m.mid, pid)}:info",
                                    ["alive", "rlim_soft", "cap_ipc_lock"])
    if info[0] is None or not int(info[0]):
        raise KernelError("ESRCH", f"no process {pid} on machine {m.mid}")
    return int(info[1] or 0), bool(int(info[2] or 0))
