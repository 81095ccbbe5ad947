"""kernel/cpu.c + mm/swap.c's CPU-dead callback: workers (CPUs) come and go.

A worker is a CPU.  It registers in the store with a lease (``{mmsvc}:cpus``, a sorted set of
CPU number -> lease expiry in Redis time) that it renews every third of the lease.  A CPU
whose lease ran out (its worker was SIGKILLed, or paused longer than the lease) is *dead*, and
the first surviving CPU that claims it (ZREM: exactly one claimant) does what Linux does for
an offline CPU, from another CPU:

* ``lru_add_drain_cpu(dead)`` (page_alloc_cpu_dead -> lru_add_drain_cpu, mlock_drain_remote):
  the dead CPU's lru_add and mlock batches of every machine are processed from the store,
  releasing their page references (spec §2.1.5, §2.7);
* the locks it held or was queued for are evicted at once (their leases would expire anyway;
  fencing tokens make any late write of the evicted holder fail).

A worker that stops gracefully goes offline itself: it drains its own batches and leaves.
A worker restarted with the same CPU number first cleans up after its previous incarnation.

A worker killed in the middle of a *syscall* leaves that syscall half done.  Linux never
sees this (a CPU's tasks migrate), so the emulator repairs it: the surviving CPU stops the
machine (``stop_machine``: every live CPU finishes its syscalls in flight and holds new ones),
finishes the dead CPU's mlock/munlock walks and reconciles the page counts with the page
tables (mm/recovery.py), then lets everyone go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mmsvc.locks import Locks
from mmsvc.logging import get_logger
from mmsvc.mm import machine as machines
from mmsvc.mm.swap import Swap, cpu_unplugged
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

log = get_logger("mmsvc.cpu_hotplug")

CPUS_KEY = "{mmsvc}:cpus"
STOP_KEY = "{mmsvc}:stop"  # the token of a stop_machine in progress (same slot as CPUS_KEY)
DEFAULT_LEASE_MS = 3000
LEASE_ENV = "MMSVC_CPU_LEASE_MS"


def cpu_lease_ms() -> int:
    """The CPU lease: a dead worker's batches are drained within about this time (+ a
    third for the survivors' next beat).  ``MMSVC_CPU_LEASE_MS`` overrides the default."""
    raw = os.environ.get(LEASE_ENV, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_LEASE_MS


@dataclass
class OfflineReport:
    """What taking one dead CPU offline did."""

    cpu: int
    machines: int = 0
    batches_drained: int = 0  # machines where the CPU had pending entries
    locks_evicted: int = 0
    repairs: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class Beat:
    added: bool  # this CPU was not registered (first beat, or taken offline while paused)
    stop: str  # the token of a stop_machine in progress, or ""
    dead: list[int]  # CPUs whose lease ran out


async def cpu_beat(store: RedisStore, cpu: int, lease_ms: int) -> Beat:
    """Renew this CPU's lease."""
    raw = await store.fcall("cpu_beat", CPUS_KEY, cpu, lease_ms)
    return Beat(bool(int(raw[0])), text(raw[1]), [int(x) for x in raw[2:]])


class StopGate:
    """The syscalls of this CPU: counted in flight, held at entry while the machine is
    stopped (stop_machine)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.inflight = 0

    @contextlib.asynccontextmanager
    async def syscall(self) -> AsyncIterator[None]:
        await self._open.wait()
        self.inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    async def stop(self) -> None:
        """Hold new syscalls; return when none is in flight."""
        self._open.clear()
        await self._idle.wait()

    def resume(self) -> None:
        self._open.set()

    @property
    def stopped(self) -> bool:
        return not self._open.is_set()


async def _live_cpus(store: RedisStore) -> set[int]:
    """CPUs with a valid lease, judged by the clock of the node that holds the leases."""
    return {int(text(c)) for c in await store.fcall("cpu_live", CPUS_KEY)}


@contextlib.asynccontextmanager
async def stop_machine(store: RedisStore, cpu: int, gate: StopGate, *, dead: int,
                       timeout: float) -> AsyncIterator[bool]:
    """stop_machine(): every live CPU finishes its syscalls in flight and holds new ones
    (they ack through their beat); yields True once all did, False if some did not in time
    (or another CPU's stop did not end in time) - then nothing may be repaired."""
    token = uuid.uuid4().hex[:12]
    # Another CPU stopping the machine (it takes another dead CPU offline: a worker of
    # several CPUs dies with all of them) goes first; this CPU acks it meanwhile.
    queued_until = time.monotonic() + timeout
    while not await store.client.set(STOP_KEY, token, nx=True, px=int(timeout * 2000)):
        if time.monotonic() > queued_until:
            yield False
            return
        await asyncio.sleep(0.05)
    acks = f"{STOP_KEY}:acks:{token}"
    try:
        await gate.stop()
        await store.client.sadd(acks, cpu)
        deadline = time.monotonic() + timeout
        while True:
            need = (await _live_cpus(store)) - {dead}
            have = {int(c) for c in await store.client.smembers(acks)}
            if need <= have:
                break
            if time.monotonic() > deadline:
                log.warning("stop_machine_timeout", cpu=cpu, missing=sorted(need - have))
                yield False
                return
            await asyncio.sleep(0.02)
        yield True
    finally:
        await store.client.delete(STOP_KEY, acks)
        gate.resume()


async def _mark_offline(store: RedisStore, m: machines.Machine, cpu: int, offline: bool) -> None:
    """Fence a dead CPU out of every lruvec of the machine (page programs check it), or let
    it back in (a new incarnation coming online)."""
    pipe = store.client.pipeline(transaction=False)
    for lv in m.lruvecs.values():
        if offline:
            pipe.set(f"{m.lv_key(lv)}:offline:{cpu}", 1)
        else:
            pipe.delete(f"{m.lv_key(lv)}:offline:{cpu}")
    await pipe.execute()


async def clear_offline_marks(store: RedisStore, cpu: int) -> None:
    for raw_mid in await store.client.smembers(keys.MACHINES):
        with contextlib.suppress(Exception):  # a machine deleted meanwhile
            await _mark_offline(store, await machines.load_machine(store, text(raw_mid)), cpu,
                                False)


# recover(machine id, dead cpu) -> repairs made; run while the machine is stopped
Recover = Callable[[str, int], Awaitable[Counter[str]]]


async def take_cpu_offline(store: RedisStore, cpu: int, *, lease_ms: int = 30_000,
                           from_cpu: int | None = None, recover: Recover | None = None,
                           gate: StopGate | None = None) -> OfflineReport:
    """lru_add_drain_cpu(cpu) on every machine, and evict cpu's locks (spec §2.7)."""
    t0 = time.perf_counter()
    rep = OfflineReport(cpu)
    touched: list[str] = []
    for raw_mid in await store.client.smembers(keys.MACHINES):
        mid = text(raw_mid)
        try:
            rep.locks_evicted += await _evict_locks(store, mid, cpu, lease_ms)
            if not await store.client.sismember(f"{keys.machine(mid)}:cpus", str(cpu)):
                continue
            m = await machines.load_machine(store, mid)
            rep.machines += 1
            dead = Swap(store, Locks(store, cpu))
            if dead.pending(m) or await _has_batches(store, m, cpu):
                await dead.lru_add_drain_cpu(m)  # run by from_cpu, on the dead CPU's behalf
                rep.batches_drained += 1
            await _mark_offline(store, m, cpu, True)
            touched.append(mid)
        except Exception as exc:  # a machine deleted meanwhile, ...: go on with the others
            rep.errors.append(f"{mid}: {type(exc).__name__}: {exc}")
    if recover is not None and gate is not None and touched and from_cpu is not None:
        async with stop_machine(store, from_cpu, gate, dead=cpu,
                                timeout=max(10.0, 4 * lease_ms / 1000)) as stopped:
            if stopped:
                for mid in touched:
                    try:
                        rep.repairs.update(await recover(mid, cpu))
                    except Exception as exc:
                        rep.errors.append(f"{mid} recovery: {type(exc).__name__}: {exc}")
            else:
                rep.errors.append("stop_machine failed: recovery not done")
    rep.seconds = time.perf_counter() - t0
    log.info("cpu_offline", cpu=cpu, by_cpu=from_cpu, machines=rep.machines,
             batches_drained=rep.batches_drained, locks_evicted=rep.locks_evicted,
             repairs=dict(rep.repairs) or None,
             seconds=round(rep.seconds, 4), errors=rep.errors or None)
    return rep


async def _has_batches(store: RedisStore, m: machines.Machine, cpu: int) -> bool:
    pipe = store.client.pipeline(transaction=False)
    for lv in m.lruvecs.values():
        pipe.exists(f"{m.lv_key(lv)}:mlb:{cpu}", f"{m.lv_key(lv)}:lab:{cpu}")
    return any(int(n) for n in await pipe.execute())


async def _evict_locks(store: RedisStore, mid: str, cpu: int, lease_ms: int) -> int:
    """Every lock of the machine that cpu holds or waits for (holder records L:hc)."""
    n = 0
    async for raw in store.scan_keys(f"{{m{mid}[:}}]*:hc"):
        lock = text(raw)[: -len(":hc")]
        n += int(await store.fcall("lk_evict", lock, cpu, lease_ms))
    return n


class FreezeWatch:
    """Notices that this whole process was frozen (SIGSTOP, a VM pause): a thread ticks every
    few ms; a store write that finds the last tick older than a third of the lease first
    renews this CPU's lease - and stops the worker if another CPU took it offline meanwhile
    (then it repaired what this one was doing: nothing more may be written).  A store outage
    does not stop the ticks."""

    TICK = 0.02

    def __init__(self, store: RedisStore, cpu: int, lease_ms: int) -> None:
        self.store = store
        self.cpu = cpu
        self.lease_ms = lease_ms
        self.suspect = lease_ms / 3000
        self.last = time.monotonic()
        self._thread = threading.Thread(target=self._tick, name=f"cpu{cpu}-freezewatch",
                                        daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while True:
            self.last = time.monotonic()
            time.sleep(self.TICK)

    async def check(self) -> None:
        if time.monotonic() - self.last > self.suspect:
            self.last = time.monotonic()
            if (await cpu_beat(self.store, self.cpu, self.lease_ms)).added:
                cpu_unplugged(self.cpu)


class CpuHotplug:
    """This worker's membership: lease renewal, offlining CPUs found dead, stop_machine."""

    def __init__(self, store: RedisStore, cpu: int, lease_ms: int = DEFAULT_LEASE_MS,
                 recover: Recover | None = None) -> None:
        self.store = store
        self.cpu = cpu
        self.lease_ms = lease_ms
        self.recover = recover
        self.gate = StopGate()
        self.offlined: list[OfflineReport] = []
        self._task: asyncio.Task[None] | None = None
        self._side: set[asyncio.Task[None]] = set()
        self._acked = ""
        self._held_for: str = ""
        self.watch: FreezeWatch | None = None

    async def online(self) -> None:
        """Register; a lease left by this CPU's previous incarnation (a crash) is cleaned up
        first: its batches are this CPU's again (reloaded from the store), its locks go, what
        it left half done is repaired."""
        if await self.store.client.zscore(CPUS_KEY, self.cpu) is not None:
            self.offlined.append(await take_cpu_offline(
                self.store, self.cpu, from_cpu=self.cpu, recover=self.recover,
                gate=self.gate, lease_ms=self.lease_ms))
        await clear_offline_marks(self.store, self.cpu)
        await cpu_beat(self.store, self.cpu, self.lease_ms)
        self.watch = FreezeWatch(self.store, self.cpu, self.lease_ms)
        self.store.before_write = self.watch.check
        self._task = asyncio.create_task(self._run(), name=f"cpu{self.cpu}-hotplug")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    async def _ack_stop(self, token: str) -> None:
        """Another CPU stops the machine: finish this CPU's syscalls, hold new ones, ack."""
        await self.gate.stop()
        await self.store.client.sadd(f"{STOP_KEY}:acks:{token}", self.cpu)

    async def _offline(self, dead: int) -> None:
        self.offlined.append(await take_cpu_offline(
            self.store, dead, from_cpu=self.cpu, recover=self.recover, gate=self.gate,
            lease_ms=self.lease_ms))

    async def _run(self) -> None:
        period = max(self.lease_ms / 3000, 0.05)
        grace_until = 0.0
        while True:
            try:
                t0 = time.monotonic()
                beat = await cpu_beat(self.store, self.cpu, self.lease_ms)
                if beat.added:  # taken offline as dead while this worker was paused
                    cpu_unplugged(self.cpu)
                if beat.stop and beat.stop != self._acked:
                    self._acked = self._held_for = beat.stop
                    self._spawn(self._ack_stop(beat.stop))
                elif not beat.stop and self._held_for:
                    self._held_for = ""
                    self.gate.resume()
                if time.monotonic() - t0 > period:  # the store was away (the client retried)
                    grace_until = time.monotonic() + 2 * self.lease_ms / 1000
                dead = [] if time.monotonic() < grace_until else beat.dead
                for cpu in dead:
                    # exactly one survivor claims a dead CPU; the work runs beside the beat
                    if cpu != self.cpu and await self.store.client.zrem(CPUS_KEY, cpu):
                        self._spawn(self._offline(cpu))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is restarting, ...: try again next period
                log.warning("cpu_hotplug_error", cpu=self.cpu, error=f"{type(exc).__name__}")
                grace_until = time.monotonic() + 2 * self.lease_ms / 1000
            await asyncio.sleep(period)

    async def offline(self) -> None:
        """Graceful stop: drain this CPU's own batches everywhere, then leave."""
        for task in [self._task, *self._side]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        self.gate.resume()
        self.store.before_write = None
        await take_cpu_offline(self.store, self.cpu, from_cpu=self.cpu)
        await self.store.client.zrem(CPUS_KEY, self.cpu)
