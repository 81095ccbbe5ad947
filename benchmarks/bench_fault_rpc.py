"""Benchmark (b): one-page Fault RPCs/s over no-op Ping RPCs/s, same server, same concurrency
(target ratio >= 0.5).

A `mmsvc serve` process (one worker, a private redis-server) is started; a client process with
C concurrent tasks first measures Ping for D seconds, then Fault of one new page per call (each
task faults the pages of its own process's anonymous mapping, so every call really allocates,
maps and queues a page) for D seconds.

Run: python -m benchmarks.bench_fault_rpc [--concurrency 16] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

from benchmarks.common import wait_ready
from mmsvc.mm.types import MachineConfig, MmapArgs
from mmsvc.store.embedded import EmbeddedRedis, free_port
from mmsvc_client import AsyncMmsvcClient

PAGES_PER_TASK = 200_000



async def rate(seconds: float, workers: list[object]) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def loop(step: object) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await step()  # type: ignore[operator]
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(w) for w in workers))
    return done / (time.perf_counter() - t0)


async def run(target: str, concurrency: int, seconds: float) -> tuple[float, float]:
    async with AsyncMmsvcClient(target, timeout=30.0) as c:
        mid = await c.create_machine(MachineConfig(frames_per_node=concurrency * PAGES_PER_TASK))
        ping_rate = await rate(seconds, [c.ping for _ in range(concurrency)])
        steps = []
        for _ in range(concurrency):
            pid = await c.create_process(mid)
            base = await c.mmap(mid, pid, MmapArgs(length=PAGES_PER_TASK * 4096))
            cursor = iter(range(PAGES_PER_TASK))

            async def fault(pid: int = pid, base: int = base, cursor: object = cursor) -> None:
                await c.fault(mid, pid, base + next(cursor) * 4096, 4096, True)  # type: ignore[call-overload]

            steps.append(fault)
        fault_rate = await rate(seconds, steps)
        report = await c.check(mid, True)
        assert not report.violations, report.violations[:3]
        await c.delete_machine(mid)
    return ping_rate, fault_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    port = free_port()
    target = f"127.0.0.1:{port}"
    with EmbeddedRedis() as redis:
        server = subprocess.Popen(
            [sys.executable, "-m", "mmsvc.cli.main", "serve", "--listen", target,
             "--redis", redis.url, "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
        )
        try:
            asyncio.run(wait_ready(target))
            ping, fault = asyncio.run(run(target, args.concurrency, args.seconds))
        finally:
            server.terminate()
            server.wait(10)
    print(f"no-op Ping RPCs:      {ping:8,.0f}/s  (concurrency {args.concurrency})")
    print(f"one-page Fault RPCs:  {fault:8,.0f}/s  ratio {fault / ping:.3f}  (target >= 0.5)")


if __name__ == "__main__":
    main()
