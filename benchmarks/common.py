"""Shared pieces of the benchmarks: a private redis-server and a baseline measured beside it."""

from __future__ import annotations

import re
import shutil
import subprocess

from mmsvc.store.embedded import EmbeddedRedis


def redis_benchmark_hset(server: EmbeddedRedis, requests: int = 1_000_000) -> float:
    """`redis-benchmark -P 32 -t hset` ops/s against the same server (the baseline)."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark not found (Debian package redis-tools)")
    host, port = server.url.removeprefix("redis://").split("/")[0].split(":")
    out = subprocess.run(
        [exe, "-h", host, "-p", port, "-P", "32", "-t", "hset", "-n", str(requests), "-q"],
        capture_output=True, text=True, check=True,
    ).stdout
    found = re.findall(r"HSET: ([\d.]+) requests per second", out)
    if not found:
        raise SystemExit(f"cannot parse redis-benchmark output: {out!r}")
    return float(found[-1])


async def wait_ready(target: str, attempts: int = 200) -> None:
    """Until a mmsvc server answers Ping on target (0.1 s apart)."""
    import asyncio

    from mmsvc_client import AsyncMmsvcClient

    for _ in range(attempts):
        try:
            async with AsyncMmsvcClient(target, timeout=1.0) as c:
                await c.ping()
                return
        except Exception:
            await asyncio.sleep(0.1)
    raise SystemExit(f"server {target} did not start")
