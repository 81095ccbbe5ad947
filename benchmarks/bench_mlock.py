"""Benchmark (a): mlock of an already-faulted 64k-page range, pages/s, against
`redis-benchmark -P 32 -t hset` ops/s on the same private redis-server (target ratio >= 0.25).

Run: python -m benchmarks.bench_mlock [--pages 65536] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from benchmarks.common import redis_benchmark_hset
from mmsvc.mm.mlock import WALK_CHUNK
from mmsvc.mm.mm_struct import load_mm, pt_read
from mmsvc.mm.syscalls import Kernel
from mmsvc.mm.types import MachineConfig, MmapArgs, ProcessSpec
from mmsvc.store.embedded import EmbeddedRedis
from mmsvc.store.redis_store import RedisStore

THP_HINT = 0x7E0000000000  # 2 MiB aligned: write faults there make pmd-mapped THPs


async def one_run(url: str, pages: int, thp: bool = False) -> tuple[float, float, float]:
    """mlock and munlock pages/s, and the floor: get+put pages/s (see floor_rate)."""
    store = await RedisStore.connect(url)
    k = Kernel(store, 0)
    mid = await k.create_machine(MachineConfig(frames_per_node=pages + 4096, thp=thp))
    pid = await k.create_process(mid, ProcessSpec())
    addr = await k.mmap(mid, pid, MmapArgs(length=pages * 4096, addr=THP_HINT if thp else 0))
    await k.fault(mid, pid, addr, pages * 4096, True)
    await k.drain(mid, False)
    t0 = time.perf_counter()
    await k.mlock(mid, pid, addr, pages * 4096)
    t_lock = time.perf_counter() - t0
    t0 = time.perf_counter()
    await k.munlock(mid, pid, addr, pages * 4096)
    t_unlock = time.perf_counter() - t0
    floor = await floor_rate(k, mid, pid, addr, pages)
    report = await k.check(mid, True)
    assert report.ok, report.violations[:5]
    await k.delete_machine(mid)
    await store.close()
    return pages / t_lock, pages / t_unlock, floor


async def floor_rate(k: Kernel, mid: str, pid: int, addr: int, pages: int) -> float:
    """The cheapest per-page work of this design, timed like the mlock: a page program that
    takes and drops a reference on each page of the range (get_page/put_page: one record
    decoded, changed and encoded in Redis's Lua; no batch, no list, no lock), in the walk's
    chunks, pages read from the page tables first.  An mlock does this and more per page,
    so pages/s of this over the hset baseline bounds benchmark (a)'s ratio from above."""
    m = await k.machine(mid)
    mm = await load_mm(k.store, m, pid)
    t0 = time.perf_counter()
    for base in range(0, pages, WALK_CHUNK):
        start = addr // 4096 + base
        ptes = await pt_read(k.store, mm.key, start, start + min(WALK_CHUNK, pages - base))
        by_lv: dict[int, list[list[object]]] = {}
        for p in ptes.values():
            by_lv.setdefault(p.lv, []).extend((["G", p.idx], ["P", p.idx]))
        for lv, ops in by_lv.items():
            await k.swap.run(m, lv, ops)
    return pages / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pages", type=int, default=65536)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--thp", action="store_true",
                    help="also time the same range backed by THPs (one mlock per pmd, as in "
                         "Linux: an illustration, not the target's measure)")
    args = ap.parse_args()
    with EmbeddedRedis() as server:
        baseline = redis_benchmark_hset(server)
        runs = [asyncio.run(one_run(server.url, args.pages)) for _ in range(args.repeat)]
        thp_runs = [asyncio.run(one_run(server.url, args.pages, thp=True))
                    for _ in range(args.repeat if args.thp else 0)]
    lock = statistics.median(r[0] for r in runs)
    unlock = statistics.median(r[1] for r in runs)
    floor = statistics.median(r[2] for r in runs)
    print(f"baseline redis-benchmark -P 32 -t hset: {baseline:,.0f} ops/s")
    print(f"mlock   of {args.pages} faulted pages: {lock:,.0f} pages/s  ratio {lock / baseline:.3f}"
          "  (target >= 0.25)")
    print(f"munlock of {args.pages} locked pages:  {unlock:,.0f} pages/s  "
          f"ratio {unlock / baseline:.3f}")
    print(f"floor: get+put of each page:     {floor:,.0f} pages/s  ratio {floor / baseline:.3f}"
          "  (the least per-page work of a page program: the ceiling of the mlock ratio)")
    if thp_runs:
        tl = statistics.median(r[0] for r in thp_runs)  # (the floor is per base page)
        tu = statistics.median(r[1] for r in thp_runs)
        print(f"with THPs ({args.pages // 512} pmd-mapped): mlock {tl:,.0f} pages/s "
              f"(ratio {tl / baseline:.3f}), munlock {tu:,.0f} pages/s "
              f"(ratio {tu / baseline:.3f}) - base pages per second, one mlock per THP")


if __name__ == "__main__":
    main()
