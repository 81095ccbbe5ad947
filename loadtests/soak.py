"""Soak: a mixed concurrent load on several workers while faults are injected on a schedule.

    python -m loadtests.soak --minutes 10 [--workers 2] [--clients 3] [--fault-every 20]

Starts its own durable redis-server (AOF, appendfsync always) and one ``mmsvc serve`` process
per CPU (so a single CPU can be killed), then runs ``--clients`` client processes, each with a
few concurrent tasks doing process lifetimes (mmap anon/file, fault, mlock, MLOCK_ONFAULT,
munlock, fork, reclaim, migrate, exit) on one shared machine.  Every ``--fault-every`` seconds
the next fault of the cycle is injected:

* ``kill-worker``: SIGKILL a worker; a survivor takes its CPU offline; it is restarted;
* ``kill-redis``: SIGKILL redis-server, restart it on the same data after 1 s;
* ``drop-connections``: CLIENT KILL every client connection of the store, 10 times;
* ``pause-worker``: SIGSTOP a worker for twice its lease; resumed, it stops itself as
  unplugged and is restarted.

At the end every worker is up again, all CPUs are drained and the checker runs: the report
shows operations done, errors by status, faults injected, and the checker's verdict.  Exit
status 1 when the checker reports violations or a server fault status (INTERNAL, UNKNOWN) was
seen.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from loadtests.procs import DurableRedis, Worker, free_port_range
from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_LOCKED,
    MAP_PRIVATE,
    MAP_SHARED,
    FileSpec,
    MachineConfig,
    MmapArgs,
)
from mmsvc_client import AsyncMmsvcClient, MmsvcError

P = 4096
FAULTS = ("kill-worker", "kill-redis", "drop-connections", "pause-worker")


async def lifetime(k: AsyncMmsvcClient, mid: str, rng: random.Random, seen: Counter[str]) -> None:
    pid = await k.create_process(mid)
    seen["create_process"] += 1
    try:
        n = rng.choice((8, 32, 64))
        if rng.random() < 0.5:
            a = await k.mmap(mid, pid, MmapArgs(n * P, flags=MAP_PRIVATE | MAP_ANONYMOUS))
            await k.fault(mid, pid, a, n * P, True)
        else:
            flags = MAP_SHARED | (MAP_LOCKED if rng.random() < 0.3 else 0)
            a = await k.mmap(mid, pid, MmapArgs(n * P, flags=flags, file="shared"))
            await k.fault(mid, pid, a, n * P, False)
        seen["mmap+fault"] += 1
        await k.mlock(mid, pid, a, n * P, 1 if rng.random() < 0.2 else 0)
        seen["mlock"] += 1
        if rng.random() < 0.3:
            child = await k.fork(mid, pid)
            await k.munlock(mid, child, a, n * P // 2)
            await k.exit(mid, child)
            seen["fork"] += 1
        if rng.random() < 0.2:
            await k.reclaim(mid, None, None, 32)
            seen["reclaim"] += 1
        if rng.random() < 0.1:
            await k.migrate(mid, pid, a, n * P, 1)
            seen["migrate"] += 1
        await k.munlock(mid, pid, a, n * P // 2)
        seen["munlock"] += 1
    finally:
        await k.exit(mid, pid)
        seen["exit"] += 1


async def client_main(targets: list[str], mid: str, until: float, seed: int,
                      tasks: int) -> Counter[str]:
    rng = random.Random(seed)
    seen: Counter[str] = Counter()
    ks = [AsyncMmsvcClient(t, timeout=60.0) for t in targets]

    async def loop(i: int) -> None:
        while time.time() < until:
            k = ks[(i + rng.randrange(len(ks))) % len(ks)]
            try:
                await lifetime(k, mid, rng, seen)
                seen["lifetimes"] += 1
            except MmsvcError as e:
                seen[f"status {e.code.name} {e.errno}"] += 1
                await asyncio.sleep(0.2)

    await asyncio.gather(*(loop(i) for i in range(tasks)))
    for k in ks:
        await k.close()
    return seen


def client_process(targets: list[str], mid: str, until: float, seed: int, tasks: int,
                   out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(dict(asyncio.run(client_main(targets, mid, until, seed, tasks))))


class Injector:
    def __init__(self, redis: DurableRedis, workers: list[Worker], lease_ms: int) -> None:
        self.redis = redis
        self.workers = workers
        self.lease_ms = lease_ms
        self.done: Counter[str] = Counter()
        self.rng = random.Random(7)

    def restart_dead(self) -> None:
        for w in self.workers:
            if not w.alive():
                w.stop()
                w.start()

    def inject(self, kind: str) -> None:
        w = self.rng.choice(self.workers)
        if kind == "kill-worker":
            w.kill()
            time.sleep(2 * self.lease_ms / 1000)  # a survivor takes the CPU offline
            self.restart_dead()
        elif kind == "kill-redis":
            self.redis.kill()
            time.sleep(1.0)
            self.redis.start()
        elif kind == "drop-connections":
            with self.redis.client() as c:
                for _ in range(10):
                    c.client_kill_filter(_type="normal", skipme=True)
                    time.sleep(0.1)
        elif kind == "pause-worker":
            w.pause()
            time.sleep(2 * self.lease_ms / 1000 + 1)
            w.resume()
            time.sleep(2.0)  # it finds itself unplugged and stops
            self.restart_dead()
        self.done[kind] += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=3, help="client processes")
    ap.add_argument("--tasks", type=int, default=4, help="concurrent tasks per client")
    ap.add_argument("--fault-every", type=float, default=20.0, metavar="SECONDS")
    ap.add_argument("--lease-ms", type=int, default=1500)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="mmsvc-soak-"))
    redis = DurableRedis(tmp / "redis").start()
    base = free_port_range(args.workers)
    workers = [Worker(cpu, redis.url, base + cpu, tmp / f"cpu{cpu}.log", args.lease_ms).start()
               for cpu in range(args.workers)]
    targets = [w.target for w in workers]
    t_start = time.time()
    try:
        async def setup() -> str:
            async with AsyncMmsvcClient(targets[0], timeout=60.0) as k:
                mid = await k.create_machine(MachineConfig(frames_per_node=65536, nodes=2))
                await k.create_file(mid, FileSpec("shared", 256, prefill=True,
                                                  kind="regular"))
                return mid

        mid = asyncio.run(setup())
        until = t_start + args.minutes * 60
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [ctx.Process(target=client_process,
                             args=(targets, mid, until, 1000 + i, args.tasks, out))
                 for i in range(args.clients)]
        for p in procs:
            p.start()
        inj = Injector(redis, workers, args.lease_ms)
        i = 0
        while time.time() + args.fault_every < until:
            time.sleep(args.fault_every)
            kind = FAULTS[i % len(FAULTS)]
            print(f"[{time.time() - t_start:7.1f}s] inject {kind}", flush=True)
            inj.inject(kind)
            i += 1
        totals: Counter[str] = Counter()
        for _ in procs:
            totals.update(out.get())
        for p in procs:
            p.join()
        inj.restart_dead()

        async def verdict() -> tuple[list[str], dict[str, int], dict[str, int]]:
            async with AsyncMmsvcClient(targets[0], timeout=120.0) as k:
                rep = await k.check(mid, True)
                return rep.violations, dict(rep.known_exceptions), await k.vmstat(mid)

        violations, exceptions, vm = asyncio.run(verdict())
    finally:
        for w in workers:
            w.stop()
        redis.stop()
    elapsed = time.time() - t_start
    faults = {k: v for k, v in totals.items() if k.startswith("status ")}
    ops = {k: v for k, v in totals.items() if not k.startswith("status ")}
    print(f"\nsoak: {elapsed / 60:.1f} min, {args.workers} workers, {args.clients} client "
          f"processes x {args.tasks} tasks")
    print("operations: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    print("errors by status: " + (", ".join(f"{k[7:]} {v}" for k, v in sorted(faults.items()))
                                  or "none"))
    print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(inj.done.items())))
    print(f"vmstat: nr_mlock {vm['nr_mlock']}, nr_unevictable {vm['nr_unevictable']}, "
          f"mlocked {vm['unevictable_pgs_mlocked']}, cleared {vm['unevictable_pgs_cleared']}")
    print(f"checker: {'OK' if not violations else f'{len(violations)} violations'}"
          + (f" (known exceptions {exceptions})" if exceptions else ""))
    for v in violations[:20]:
        print(f"  {v}")
    print(f"logs: {tmp}")
    bad = any(("INTERNAL" in k or "UNKNOWN" in k) for k in faults)
    return 1 if violations or bad else 0


if __name__ == "__main__":
    sys.exit(main())
