"""mm/swap.c orchestration: a CPU's batches, page programs, and the drains (spec §2.1, §2.7).

Each worker is a CPU.  Its mlock batch and lru_add batch hold entries across lruvecs in one
order; the entries themselves (with their page references) live in the lruvec slots of the
store, and this module keeps the order of the runs (which lruvec each pending entry is in) so
that a flush relocks per lruvec exactly where the kernel would (§2.3).  The order is rebuilt
from the entries' sequence numbers when a worker starts, so a batch survives its worker.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, NoReturn

from mmsvc.locks import Locks
from mmsvc.logging import get_logger
from mmsvc.mm.errors import KernelError
from mmsvc.mm.machine import Machine, reserve_frames
from mmsvc.mm.sched import TASK, RunQueues
from mmsvc.mm.types import MlockBatchScope, MlockCountInitCull, MlockCountInitLruAdd
from mmsvc.store.redis_store import RedisStore, text

Op = list[Any]  # a page-program op, see mm_pages in lua/memory.lua
log = get_logger("mmsvc.swap")


@dataclass
class CpuBatches:
    """This CPU's pending entries per batch, as the lruvec id of each entry in queue order."""

    mlb: list[int] = field(default_factory=list)
    lab: list[int] = field(default_factory=list)
    seq: int = 0
    loaded: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # preempt_disable()


@dataclass
class ProgramResult:
    allocs: list[int] = field(default_factory=list)
    freed: int = 0
    flushes: int = 0
    offlru: int = 0
    isolated: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)  # isolation failed: page not on an LRU
    # the ptes a fused program + install call set (conflicting vpns; [-1]: fenced), or None
    installed: list[int] | None = None
    # a fault_fast call: 'miss' (nothing done), 'held' or 'done', and the mmap_lock it took
    fast: str | None = None
    fast_lock: tuple[int, int] = (0, 0)  # token, bounce
    unfrozen: bool = False  # an "R" (folio_ref_freeze) failed: the program stopped there


@dataclass
class FastFault:
    """A whole fault in the program's first call (``fault_fast``): mmap_lock taken for
    ``mode`` if the VMA (``vma_id`` stored as ``vma_json``) and the ptes are still as the
    worker saw them, then the program, then ``entries`` set and the lock released."""

    mm_key: str
    mode: str
    vma_id: int
    vma_json: str
    entries: list[int]
    lease_ms: int
    # the mmap_lock the call took (token, bounce), once it returned 'held' or 'done'
    taken: list[tuple[int, int]] = field(default_factory=list)
    released: bool = False


@dataclass(frozen=True)
class InstallAfter:
    """Ptes to set, and the mmap_lock to release, in the same call as a page program when it
    runs to its end in one go (``mm_pages_install``; a single Redis only).  Entries are
    pte_args() values whose idx -k names the k-th page the program allocates."""

    mm_key: str
    release: list[str | int]
    entries: list[int]


def _runs(order: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive entries of one lruvec form a run: one lock acquisition (relock, §2.3)."""
    runs: list[tuple[int, int]] = []
    for lv in order:
        if runs and runs[-1][0] == lv:
            runs[-1] = (lv, runs[-1][1] + 1)
        else:
            runs.append((lv, 1))
    return runs


class NeedFrames(Exception):
    """The lruvec's frame reserve is short: get frames (maybe by direct reclaim) and retry."""

    def __init__(self, need: int, rest: list[Op], done: ProgramResult) -> None:
        super().__init__(need)
        self.need = need
        self.rest = rest
        self.done = done


class OutOfFrames(KernelError):
    """ENOMEM part-way through a page program: ``done`` of its ops ran (and allocated
    ``allocs``) before a page could not be allocated.  Page programs check the lruvec's frame
    reserve before they start, so ``done`` is 0 unless the program was split (a contended
    lruvec lock) and another CPU took the frames in between."""

    def __init__(self, message: str, done: int, allocs: list[int]) -> None:
        super().__init__("ENOMEM", message)
        self.done = done
        self.allocs = allocs


DirectReclaim = Callable[[Machine, int, int], Awaitable[int]]


@dataclass
class _WorkerCpus:
    """What the CPUs of one worker process share: each other, the run queues their tasks
    move on, and lru_cache_disable()'s count (global in Linux)."""

    swaps: dict[int, Swap] = field(default_factory=dict)
    runqueues: RunQueues | None = None
    lru_cache_disabled: int = 0


class Swap:
    """The batches of one CPU on every machine it serves.

    The CPU whose batches a call uses is the one the running task is on (sched.TASK): a
    task moved at a reschedule point of its syscall goes on with another CPU of this worker
    (its Swap, ``here()``), whichever kernel object runs the syscall's code."""

    def __init__(self, store: RedisStore, locks: Locks) -> None:
        self.store = store
        self.locks = locks
        self.cpu = locks.cpu
        self._batches: dict[str, CpuBatches] = {}
        self._worker = _WorkerCpus(swaps={self.cpu: self})
        self.direct_reclaim: DirectReclaim | None = None

    # --------------------------------------------------------------- this worker's CPUs --
    def join(self, runqueues: RunQueues, first: Swap | None = None) -> None:
        """Make this CPU one of a worker's CPUs (``first``: one already in; None: the first)."""
        if first is not None:
            self._worker = first._worker
        self._worker.runqueues = runqueues
        self._worker.swaps[self.cpu] = self
        runqueues.add(self.cpu)

    def runqueues(self) -> RunQueues | None:
        return self._worker.runqueues

    def sibling(self, cpu: int) -> Swap | None:
        """The Swap of another CPU of this worker process, if it is one."""
        return self._worker.swaps.get(cpu)

    def sibling_cpus(self) -> list[int]:
        return sorted(self._worker.swaps)

    def here(self) -> Swap:
        """The Swap of the CPU the running task is on (this one unless it was moved)."""
        task = TASK.get()
        if task is None or task.cpu == self.cpu:
            return self
        return self._worker.swaps.get(task.cpu, self)

    def cond_resched(self, m: Machine) -> None:
        """A reschedule point (§10.1): with the machine's ``task_migrate_permille`` the task
        moves to another CPU of this worker and its next page operations queue there.  (Every
        CPU of the worker is in the machine's CPU set already, Kernel.machine: so
        lru_add_drain_all() reaches the batches of the one it moves to.)"""
        rq = self._worker.runqueues
        task = TASK.get()
        if rq is not None and task is not None and rq.moves(m.cfg.task_migrate_permille):
            rq.move(task)

    @property
    def lru_cache_disabled(self) -> int:
        return self._worker.lru_cache_disabled

    @lru_cache_disabled.setter
    def lru_cache_disabled(self, value: int) -> None:
        self._worker.lru_cache_disabled = value

    def batches(self, m: Machine) -> CpuBatches:
        b = self._batches.get(m.mid)
        if b is None:
            b = self._batches[m.mid] = CpuBatches()
        return b

    async def _load(self, m: Machine, b: CpuBatches) -> None:
        """Rebuild the run order from the store (a restarted worker finds its batches)."""
        if b.loaded:
            return
        found: dict[str, list[tuple[int, int]]] = {"mlb": [], "lab": []}
        pipe = self.store.client.pipeline(transaction=False)
        lvs = sorted(m.lruvecs.values())
        for lv in lvs:
            pipe.lrange(f"{m.lv_key(lv)}:mlb:{self.cpu}", 0, -1)
            pipe.lrange(f"{m.lv_key(lv)}:lab:{self.cpu}", 0, -1)
        res = await pipe.execute()
        for i, lv in enumerate(lvs):
            for which, entries in (("mlb", res[2 * i]), ("lab", res[2 * i + 1])):
                for e in entries:
                    found[which].append((int(e.decode().rsplit("|", 1)[1]), lv))
        for which in ("mlb", "lab"):
            found[which].sort()
        b.mlb = [lv for _, lv in found["mlb"]]
        b.lab = [lv for _, lv in found["lab"]]
        b.seq = 1 + max([s for s, _ in found["mlb"] + found["lab"]], default=0)
        b.loaded = True

    def _header(self, m: Machine, b: CpuBatches, lv: int, tok: int = 0) -> str:
        return json.dumps({
            "cpu": self.cpu, "mlb_max": mlock_batch_max(m), "lab_max": m.cfg.lru_add_batch_len,
            "mlb_n": len(b.mlb), "lab_n": len(b.lab),
            "mlb_local": int(all(x == lv for x in b.mlb)),
            "lab_local": int(all(x == lv for x in b.lab)),
            "seq": b.seq, "disabled": int(self.lru_cache_disabled > 0),
            **flush_tunables(m), "tok": tok,
        })

    async def run(self, m: Machine, lv: int, ops: list[Op],
                  install: InstallAfter | FastFault | None = None) -> ProgramResult:
        """Run a page program on lruvec lv from this CPU, flushing batches where needed.
        With ``install``, the first store call also sets the ptes if the program completes in
        it (``installed`` of the result); otherwise the caller installs them itself."""
        cpu = self.here()
        if cpu is not self:
            return await cpu.run(m, lv, ops, install)
        b = self.batches(m)
        out = ProgramResult()
        total = len(ops)
        while True:
            try:
                async with b.lock:
                    await self._load(m, b)
                    _merge(out, await self._run_locked(m, b, lv, ops, install=install))
                    return out
            except NeedFrames as exc:
                _merge(out, exc.done)
                ops, need = exc.rest, exc.need
                install = None  # what the program allocated so far is not in the entries
            # Outside the CPU's batch lock: take frames from the node, else reclaim directly.
            if await reserve_frames(self.store, m, lv, need):
                continue
            reclaimed = self.direct_reclaim is not None and await self.direct_reclaim(m, lv, need)
            if reclaimed and await reserve_frames(self.store, m, lv, need):
                continue
            raise OutOfFrames("out of page frames on the node (after reclaim)",
                              total - len(ops), out.allocs)

    async def _run_locked(self, m: Machine, b: CpuBatches, lv: int, ops: list[Op],
                          tok: int = 0, install: InstallAfter | FastFault | None = None,
                          ) -> ProgramResult:
        out = ProgramResult()
        while ops:
            mlb_local = all(x == lv for x in b.mlb)
            lab_local = all(x == lv for x in b.lab)
            if isinstance(install, FastFault):
                fast = install
                install = None
                reply = await self.store.fcall2(
                    "fault_fast", fast.mm_key, m.lv_key(lv), fast.mode, self.cpu,
                    fast.lease_ms, fast.vma_id, fast.vma_json, self._header(m, b, lv, tok),
                    json.dumps(ops), *fast.entries)
                out.fast = text(reply[0])
                if out.fast == "miss":
                    return out  # nothing was done
                out.fast_lock = (int(reply[1]), int(reply[2]))
                fast.taken.append(out.fast_lock)
                fast.released = out.fast == "done"
                raw = reply[3]
            elif install is not None:
                reply = await self.store.fcall2(
                    "mm_pages_install", m.lv_key(lv), install.mm_key,
                    self._header(m, b, lv, tok), json.dumps(ops), *install.release,
                    *install.entries)
                raw = reply[0]
                if len(reply) > 1:
                    out.installed = [int(v) for v in reply[1]]
                install = None  # only the first call: a program that stopped went on
            else:
                raw = await self.store.fcall(
                    "mm_pages", m.lv_key(lv), self._header(m, b, lv, tok), json.dumps(ops)
                )
            res = json.loads(raw)
            out.freed += res["freed"]
            out.flushes += res["flushes"]
            out.offlru += res["offlru"]
            reason = res.get("reason")
            if reason == "stale":
                b.loaded = False
                await self._load(m, b)
                continue
            if reason == "reserve":
                raise NeedFrames(int(res["need"]), ops, out)
            if reason == "fenced":
                raise KernelError("EAGAIN", "lruvec lock lease expired (fenced)")
            allocs = _as_list(res["alloc"])
            out.allocs.extend(allocs)
            out.isolated.extend(_as_list(res.get("isolated")))
            out.failed.extend(_as_list(res.get("failed")))
            b.seq = int(res["seq"])
            b.mlb = [lv] * res["mlb_n"] if mlb_local else b.mlb + [lv] * (res["mlb_n"] - len(b.mlb))
            b.lab = [lv] * res["lab_n"] if lab_local else b.lab + [lv] * (res["lab_n"] - len(b.lab))
            done = int(res["done"])
            ops = rebase_ops(ops[done:], allocs)
            if reason == "offline":
                cpu_unplugged(self.cpu)
            if reason == "unfrozen":
                out.unfrozen = True
                return out  # folio_ref_freeze failed: the rest of the program is not run
            if reason == "lru_locked":
                # Contended lruvec lock: queue for it, run the rest holding it (fenced).
                try:
                    async with self.locks.hold(f"{m.lv_key(lv)}:lock") as held:
                        rest = await self._run_locked(m, b, lv, ops, held.token)
                except NeedFrames as exc:  # what ran before the split counts as done too
                    _merge(out, exc.done)
                    exc.done = out
                    raise
                _merge(out, rest)
                return out
            if reason:
                which = "mlb" if reason.startswith("mlb") else "lab"
                await self._flush(m, b, which)
        return out

    async def _flush(self, m: Machine, b: CpuBatches, which: str) -> int:
        """Process every pending entry of one batch, run by run (relock per lruvec, §2.3)."""
        order = b.mlb if which == "mlb" else b.lab
        freed = 0
        for lv, count in _runs(order):
            key = m.lv_key(lv)
            cfg = json.dumps(flush_tunables(m))
            res = json.loads(await self.store.fcall("mm_flush", key, which, self.cpu, count, 0,
                                                    cfg))
            if res.get("reason") == "locked":
                # Contended: queue for the lruvec lock, then flush with the fencing token.
                async with self.locks.hold(f"{key}:lock") as held:
                    res = json.loads(await self.store.fcall(
                        "mm_flush", key, which, self.cpu, count, held.token, cfg))
                if res.get("reason"):
                    raise KernelError("EAGAIN", f"lruvec lock lost during flush: {res['reason']}")
            freed += int(res["freed"])
        if which == "mlb":
            b.mlb = []
        else:
            b.lab = []
        return freed

    async def lru_add_drain(self, m: Machine) -> None:
        """lru_add_drain(): the running task's CPU's batches (§2.1.5)."""
        await self.here().lru_add_drain_cpu(m)

    async def lru_add_drain_cpu(self, m: Machine) -> None:
        """lru_add_drain_cpu(): this CPU's lru_add batch first, the mlock batch last."""
        b = self.batches(m)
        async with b.lock:
            await self._load(m, b)
            if b.lab:
                await self._flush(m, b, "lab")
            if b.mlb:
                await self._flush(m, b, "mlb")

    def pending(self, m: Machine) -> int:
        b = self.batches(m)
        return len(b.mlb) + len(b.lab)


#: Set while this task runs the mlock/munlock range walk (mlock.py), the only place that
#: batches with ``mlock_batch_scope=mass_only``.  A context variable: per request, not per CPU.
MASS_WALK: ContextVar[bool] = ContextVar("mmsvc_mass_walk", default=False)


def mlock_batch_max(m: Machine) -> int:
    """The mlock batch length for the caller: with ``mass_only`` (Babka's fallback, §10.1)
    only the range walk batches; everyone else runs §2.4-§2.6 at once (length 1, §2.11)."""
    if m.cfg.mlock_batch_scope == MlockBatchScope.MASS_ONLY and not MASS_WALK.get():
        return 1
    return m.cfg.mlock_batch_len


def flush_tunables(m: Machine) -> dict[str, int]:
    """The batch-processing choices of §8.2 the page programs read (CFG in lua/swap.lua)."""
    return {
        "init_lru_add_bool": int(m.cfg.mlock_count_init_lru_add
                                 == MlockCountInitLruAdd.BOOL_MLOCKED),
        "init_cull_one": int(m.cfg.mlock_count_init_cull == MlockCountInitCull.ONE),
    }


def cpu_unplugged(cpu: int) -> NoReturn:
    """This worker was paused past its CPU lease and another CPU took it offline as dead
    (drained its batches, evicted its locks; mm/cpu_hotplug.py): nothing it still has in
    flight may touch the store.  The process ends at once; a supervisor restarts it as a
    fresh CPU."""
    log.critical("cpu_taken_offline_while_running", cpu=cpu)
    os._exit(75)  # EX_TEMPFAIL


def _as_list(value: Any) -> list[int]:
    """cjson encodes an empty Lua table as {}."""
    return [int(x) for x in value] if isinstance(value, list) else []


def _merge(out: ProgramResult, more: ProgramResult) -> None:
    out.allocs.extend(more.allocs)
    out.isolated.extend(more.isolated)
    out.failed.extend(more.failed)
    out.freed += more.freed
    out.flushes += more.flushes
    out.offlru += more.offlru
    if more.installed is not None:
        out.installed = more.installed
    if more.fast is not None:
        out.fast, out.fast_lock = more.fast, more.fast_lock
    out.unfrozen = out.unfrozen or more.unfrozen


def rebase_ops(ops: list[Op], allocs: list[int]) -> list[Op]:
    """-k names the k-th page a program allocated: once ``allocs`` were made (by an earlier
    part of the program), those names become real indexes and later ones shift down."""
    if not allocs:
        return ops
    n = len(allocs)
    out: list[Op] = []
    for op in ops:
        if op[0] != "A" and len(op) > 1 and isinstance(op[1], int) and op[1] < 0:
            k = -op[1]
            op = [op[0], allocs[k - 1] if k <= n else -(k - n), *op[2:]]
        out.append(op)
    return out
