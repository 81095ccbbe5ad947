"""Benchmark: scale-out of 2 workers (CPUs) over 1, on disjoint lruvecs and on one shared lruvec.

For each layout a private redis-server and `mmsvc serve --workers N` (N = 1, then 2) are
started; one client process per worker (pinned to its worker's private port) runs C tasks, each
looping over its own process: mlock then munlock of a 32-page faulted range (every call queues
32 batch entries and flushes them under the lruvec lock) for D seconds.

* disjoint: the machine has 2 nodes x 2 memcgs = 4 lruvecs; the processes of worker i live in
  lruvecs of their own (node i), so the two CPUs never touch the same lruvec;
* shared: every process lives in one lruvec (node 0, root), so both CPUs flush into it.

Printed: syscalls/s for 1 and 2 workers and the ratio (baseline: the 1-worker run of the same
layout, same run), and the lruvec lock's lock_stat columns for the 2-worker runs (contentions,
acquisitions whose previous holder was another CPU, wait time).

Run: python -m benchmarks.bench_scaleout [--seconds 8] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import subprocess
import sys
import time

from benchmarks.common import wait_ready
from mmsvc.mm.types import MAP_ANONYMOUS, MAP_PRIVATE, MachineConfig, MmapArgs, ProcessSpec
from mmsvc.store.embedded import EmbeddedRedis, free_port
from mmsvc_client import AsyncMmsvcClient

P = 4096
RANGE = 32


async def _client(target: str, mid: str, node: int, memcg: str, seconds: float,
                  tasks: int) -> int:
    async with AsyncMmsvcClient(target, timeout=60.0) as k:
        procs = []
        for _ in range(tasks):
            pid = await k.create_process(mid, ProcessSpec(node=node, memcg=memcg,
                                                          cap_ipc_lock=True))
            a = await k.mmap(mid, pid, MmapArgs(RANGE * P, flags=MAP_PRIVATE | MAP_ANONYMOUS))
            await k.fault(mid, pid, a, RANGE * P, True)
            procs.append((pid, a))
        done = 0
        until = time.monotonic() + seconds

        async def loop(pid: int, a: int) -> None:
            nonlocal done
            while time.monotonic() < until:
                await k.mlock(mid, pid, a, RANGE * P)
                await k.munlock(mid, pid, a, RANGE * P)
                done += 2

        await asyncio.gather(*(loop(pid, a) for pid, a in procs))
        for pid, _ in procs:
            await k.exit(mid, pid)
        return done


def _client_proc(target: str, mid: str, node: int, memcg: str, seconds: float, tasks: int,
                 out: mp.Queue) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(_client(target, mid, node, memcg, seconds, tasks)))



def run(workers: int, layout: str, seconds: float, tasks: int) -> tuple[float, dict[str, float]]:
    redis = EmbeddedRedis().start()
    port = free_port()
    while any(not _free(port + i) for i in range(1, workers + 2)):
        port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mmsvc.cli.main", "serve", "--workers", str(workers),
         "--listen", f"127.0.0.1:{port}", "--redis", redis.url, "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    targets = ([f"127.0.0.1:{port}"] if workers == 1
               else [f"127.0.0.1:{port + 1 + i}" for i in range(workers)])
    try:
        for t in targets:
            asyncio.run(wait_ready(t))

        async def setup() -> str:
            async with AsyncMmsvcClient(targets[0], timeout=60.0) as k:
                return await k.create_machine(MachineConfig(
                    nodes=2, memcgs=("root", "other"), frames_per_node=65536))

        mid = asyncio.run(setup())
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        # 2 client processes in both runs (the same client-side CPU): with 1 worker both
        # talk to it; with 2, one each.  disjoint: client i's processes on node i.
        procs = []
        for i in range(2):
            target = targets[i % len(targets)]
            node, memcg = (i, "root") if layout == "disjoint" else (0, "root")
            procs.append(ctx.Process(target=_client_proc,
                                     args=(target, mid, node, memcg, seconds, tasks, out)))
        cpu0 = _cpu_times()
        for p in procs:
            p.start()
        total = sum(out.get() for _ in procs)
        busy, idle = (a - b for a, b in zip(_cpu_times(), cpu0, strict=True))
        for p in procs:
            p.join()

        async def lruvec_stats() -> dict[str, float]:
            async with AsyncMmsvcClient(targets[0], timeout=60.0) as k:
                rows = [r for r in await k.lock_stat(mid) if r.lock_class.startswith("lruvec")]
            return {
                "acquisitions": sum(r.acquisitions for r in rows),
                "contentions": sum(r.contentions for r in rows),
                "bounces": sum(r.acq_bounces for r in rows),
                "wait_total_ms": sum(r.waittime_total for r in rows) / 1000,
            }

        stats = asyncio.run(lruvec_stats())
        stats["machine_busy"] = busy / max(busy + idle, 1)
        return total / seconds, stats
    finally:
        server.terminate()
        server.wait(timeout=30)
        redis.stop()


def _cpu_times() -> tuple[int, int]:
    """(busy, idle) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, idle


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=8, help="tasks per client process")
    args = ap.parse_args(argv)
    print(f"cpus: {os.cpu_count()}; {RANGE}-page mlock+munlock loops, "
          f"2 client processes x {args.concurrency} tasks, {args.seconds:.0f} s per run")
    for layout in ("disjoint", "shared"):
        one, st1 = run(1, layout, args.seconds, args.concurrency)
        two, st = run(2, layout, args.seconds, args.concurrency)
        print(f"{layout:8s}: 1 worker {one:8.1f} syscalls/s | 2 workers {two:8.1f} syscalls/s"
              f" | ratio {two / one:.2f}")
        print(f"          machine CPU busy (clients, workers, redis): 1 worker "
              f"{st1['machine_busy']:.0%}, 2 workers {st['machine_busy']:.0%} of "
              f"{os.cpu_count()} cores")
        print(f"          lruvec_lock (2 workers): acquisitions {st['acquisitions']:.0f}, "
              f"contentions {st['contentions']:.0f}, cross-CPU bounces {st['bounces']:.0f}, "
              f"wait {st['wait_total_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
