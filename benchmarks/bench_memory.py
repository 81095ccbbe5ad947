"""Benchmark (c): Redis bytes per emulated page (target <= 128; a kernel struct page is 64).

Faults N anonymous pages and N page-cache pages of a shared file into a machine and divides
the growth of Redis `used_memory` by the number of pages (page records + page tables + page
cache + lists + batches, everything the store keeps).

Run: python -m benchmarks.bench_memory [--pages 65536]
"""

from __future__ import annotations

import argparse
import asyncio

from mmsvc.mm.syscalls import Kernel
from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    FileSpec,
    MachineConfig,
    MmapArgs,
    ProcessSpec,
)
from mmsvc.store.embedded import EmbeddedRedis
from mmsvc.store.redis_store import RedisStore


async def used(store: RedisStore) -> int:
    info = await store.client.info("memory")
    return int(info["used_memory"])


async def measure(url: str, pages: int) -> tuple[float, float]:
    store = await RedisStore.connect(url)
    k = Kernel(store, 0)
    mid = await k.create_machine(MachineConfig(frames_per_node=2 * pages + 8192))
    pid = await k.create_process(mid, ProcessSpec())
    await k.create_file(mid, FileSpec("f", pages))
    base = await used(store)
    addr = await k.mmap(mid, pid, MmapArgs(pages * 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS))
    await k.fault(mid, pid, addr, pages * 4096, True)
    await k.drain(mid, False)
    anon = (await used(store) - base) / pages
    base = await used(store)
    addr = await k.mmap(mid, pid, MmapArgs(pages * 4096, 3, MAP_SHARED, file="f"))
    await k.fault(mid, pid, addr, pages * 4096, False)
    await k.drain(mid, False)
    file = (await used(store) - base) / pages
    await k.delete_machine(mid)
    await store.close()
    return anon, file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pages", type=int, default=65536)
    args = ap.parse_args()
    with EmbeddedRedis() as server:
        anon, file = asyncio.run(measure(server.url, args.pages))
    print("kernel struct page: 64 bytes")
    print(f"anonymous page, mapped:          {anon:6.1f} bytes/page  ratio {anon / 64:.2f}"
          "  (target <= 128)")
    print(f"shmem page, cached and mapped:   {file:6.1f} bytes/page  ratio {file / 64:.2f}")


if __name__ == "__main__":
    main()
