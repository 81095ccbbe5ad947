"""A concurrent load for a real ``mmsvc serve`` over the Redis Cluster (test_load_on_cluster.py).

:func:`client_process` runs in its own OS process (``spawn``): several asyncio tasks, each
driving emulated processes through a lifecycle (mmap anon + shared file + tmpfs, fault, mlock,
fork + COW, migrate, munlock, munmap, exit) on a worker it is pinned to, plus one task issuing
reclaim (both nodes) and local drains until the lifecycles are done.  Emulated errnos (EAGAIN,
ENOMEM, ...) are counted, not failures; any status no emulated syscall may produce
(INTERNAL, UNKNOWN, a deadline...) is recorded as a fault for the test to report.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from mmsvc.mm.types import MAP_SHARED, MmapArgs, ProcessSpec
from mmsvc_client import AsyncMmsvcClient, MmsvcError

T = TypeVar("T")
P = 4096
CALL_TIMEOUT = 30.0
DATA_FILE, DATA_PAGES = "data", 64  # regular file: page cache that reclaim can drop
SHM_FILE, SHM_PAGES = "shm", 16  # tmpfs: swap-backed, shared between all processes
FAULTS = frozenset({
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
})


@dataclass
class LoadSpec:
    targets: list[str]  # worker i's private address
    machine: str
    client: int  # index of this client process
    tasks: int = 4
    rounds: int = 3
    nodes: int = 2
    seed: int = 0


@dataclass
class LoadResult:
    client: int
    calls: Counter[str] = field(default_factory=Counter)
    errnos: Counter[str] = field(default_factory=Counter)
    faults: list[str] = field(default_factory=list)
    lifecycles: int = 0
    pages: Counter[str] = field(default_factory=Counter)  # migrated, reclaimed, scanned


class _Runner:
    def __init__(self, spec: LoadSpec, clients: list[AsyncMmsvcClient]) -> None:
        self.spec = spec
        self.clients = clients
        self.result = LoadResult(spec.client)
        self.rng = random.Random(spec.seed * 1000 + spec.client)

    async def call(self, what: str, aw: Awaitable[T]) -> T | None:
        """The call's value, or None after an emulated errno (counted)."""
        self.result.calls[what] += 1
        try:
            return await aw
        except MmsvcError as e:
            if e.code in FAULTS or e.errno in (None, "INTERNAL"):
                self.result.faults.append(f"{what}: {e.code.name}: {e.message}")
            else:
                self.result.errnos[f"{what}:{e.errno}"] += 1
            return None

    async def lifecycle(self, task: int, rnd: int) -> None:
        s, m = self.spec, self.spec.machine
        k = self.clients[(s.client + task + rnd) % len(self.clients)]
        # munlock and exit from the other CPU: its batches then hold entries of pages whose
        # mlock entries are in this CPU's (Drain(all) at the end settles both)
        other = self.clients[(s.client + task + rnd + 1) % len(self.clients)]
        node = (task + rnd) % s.nodes
        pid = await self.call("create_process", k.create_process(m, ProcessSpec(node=node)))
        if pid is None:
            return
        anon = await self.call("mmap", k.mmap(m, pid, MmapArgs(32 * P)))
        off = self.rng.randrange(0, DATA_PAGES - 16)
        data = await self.call("mmap", k.mmap(m, pid, MmapArgs(
            16 * P, flags=MAP_SHARED, file=DATA_FILE, offset=off * P)))
        shm = await self.call("mmap", k.mmap(m, pid, MmapArgs(SHM_PAGES * P, flags=MAP_SHARED,
                                                              file=SHM_FILE)))
        if anon is not None:
            await self.call("fault", k.fault(m, pid, anon, 32 * P, True))
            await self.call("mlock", k.mlock(m, pid, anon, 16 * P))
        if data is not None:
            await self.call("fault", k.fault(m, pid, data, 16 * P, False))
            await self.call("mlock", k.mlock(m, pid, data, 8 * P))
        if shm is not None:
            await self.call("mlock", k.mlock(m, pid, shm, SHM_PAGES * P))
            await self.call("fault", k.fault(m, pid, shm, SHM_PAGES * P, True))
        if rnd % 2 == 0:
            child = await self.call("fork", k.fork(m, pid))
            if child is not None:
                if anon is not None:  # COW in the locked half and outside it
                    await self.call("fault", k.fault(m, child, anon + 12 * P, 8 * P, True))
                await self.call("exit", k.exit(m, child))
        if anon is not None:
            moved = await self.call("migrate", k.migrate(m, pid, anon + 8 * P, 16 * P,
                                                         (node + 1) % s.nodes))
            if moved is not None:
                self.result.pages["migrated"] += moved.migrated
            await self.call("munlock", other.munlock(m, pid, anon + 8 * P, 8 * P))
            await self.call("munmap", k.munmap(m, pid, anon + 24 * P, 8 * P))
        if data is not None:
            await self.call("munlock", other.munlock(m, pid, data, 16 * P))
        await self.call("exit", other.exit(m, pid))
        self.result.lifecycles += 1

    async def lifecycles(self, task: int) -> None:
        for rnd in range(self.spec.rounds):
            await self.lifecycle(task, rnd)

    async def pressure(self, done: asyncio.Event) -> None:
        """kswapd: reclaim on each node (and drains of this CPU's batches) while the
        lifecycles run."""
        s, m = self.spec, self.spec.machine
        i = 0
        while not done.is_set():
            k = self.clients[i % len(self.clients)]
            res = await self.call("reclaim", k.reclaim(m, i % s.nodes, None, 32))
            if res is not None:
                self.result.pages["scanned"] += res.scanned
                self.result.pages["reclaimed"] += res.reclaimed
            if i % 3 == 2:
                await self.call("drain", k.drain(m, False))
            i += 1
            await asyncio.sleep(0.05)

    async def run(self) -> LoadResult:
        done = asyncio.Event()
        kswapd = asyncio.create_task(self.pressure(done))
        try:
            await asyncio.gather(*(self.lifecycles(t) for t in range(self.spec.tasks)))
        finally:
            done.set()
            await kswapd
        return self.result


async def _main(spec: LoadSpec) -> LoadResult:
    clients = [AsyncMmsvcClient(t, timeout=CALL_TIMEOUT) for t in spec.targets]
    try:
        for c in clients:
            await c.wait_ready()
        return await _Runner(spec, clients).run()
    finally:
        for c in clients:
            await c.close()


def client_process(spec: LoadSpec) -> LoadResult:
    """Entry point of one client OS process."""
    return asyncio.run(_main(spec))


def summary(results: list[LoadResult]) -> dict[str, Any]:
    calls: Counter[str] = Counter()
    errnos: Counter[str] = Counter()
    pages: Counter[str] = Counter()
    for r in results:
        calls.update(r.calls)
        errnos.update(r.errnos)
        pages.update(r.pages)
    return {"lifecycles": sum(r.lifecycles for r in results), "calls": dict(calls),
            "errnos": dict(errnos), "pages": dict(pages)}
