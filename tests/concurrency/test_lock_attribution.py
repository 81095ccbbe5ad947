"""Q9 (spec §8.5, new design): munlock, munmap and exit never walk the rmap, so they take no
i_mmap_rwsem for read - even when several processes do them at once on different CPUs.

lock_stat counts acquisitions per lock instance without telling readers from writers, so the
test uses operations whose only legitimate i_mmap_rwsem acquisitions are known: munlock of whole
VMAs (no split, so no i_mmap update: zero acquisitions) and munmap/exit of one whole file VMA
each (one write acquisition per VMA for vma_unlink, whatever the number of pages).  The legacy
protocol, whose munlock runs page_mlock()'s rmap walk per page (§9.4), is the control that
shows the measure sees such walks.
"""

from __future__ import annotations

import asyncio

from mmsvc.mm.types import MAP_LOCKED, MAP_SHARED, FileSpec, MachineConfig, MmapArgs, Protocol
from mmsvc_client import AsyncMmsvcClient

from .cluster import Driver

P = 4096
PAGES = 16


async def i_mmap_acquisitions(k: AsyncMmsvcClient, mid: str, name: str) -> int:
    return sum(r.acquisitions for r in await k.lock_stat(mid)
               if r.lock_class == "i_mmap_rwsem" and r.instance == name)


async def deltas(driver: Driver, protocol: Protocol) -> tuple[int, int, list[str]]:
    """(acquisitions during 3 concurrent munlocks, during 3 concurrent munmap/exits, checker)."""
    ks = [driver.on(i) for i in range(3)]
    mid = await ks[0].create_machine(MachineConfig(frames_per_node=2048, protocol=protocol))
    try:
        await ks[0].create_file(mid, FileSpec("f", PAGES, prefill=True))
        pids = [await ks[0].create_process(mid) for _ in range(3)]
        addrs = list(await asyncio.gather(*(
            k.mmap(mid, pid, MmapArgs(PAGES * P, flags=MAP_SHARED | MAP_LOCKED, file="f"))
            for k, pid in zip(ks, pids, strict=True))))
        await ks[0].drain(mid, True)

        base = await i_mmap_acquisitions(ks[0], mid, "f")
        await asyncio.gather(
            ks[0].munlock(mid, pids[0], addrs[0], PAGES * P),
            ks[1].munlockall(mid, pids[1]),
            ks[2].munlock(mid, pids[2], addrs[2], PAGES * P))
        after_munlock = await i_mmap_acquisitions(ks[0], mid, "f")

        await asyncio.gather(
            ks[0].munmap(mid, pids[0], addrs[0], PAGES * P),
            ks[1].exit(mid, pids[1]),
            ks[2].exit(mid, pids[2]))
        after_exit = await i_mmap_acquisitions(ks[0], mid, "f")
        report = await ks[1].check(mid, True)
        vm = await ks[0].vmstat(mid)
        problems = list(report.violations)
        if vm["nr_mlock"] or vm["nr_unevictable"]:
            problems.append(f"Q8: nr_mlock {vm['nr_mlock']}, nr_unevictable "
                            f"{vm['nr_unevictable']} after every mapping went")
        return after_munlock - base, after_exit - after_munlock, problems
    finally:
        await ks[0].delete_machine(mid)


def test_q9_rework_munlock_munmap_exit_skip_the_rmap(driver4: Driver) -> None:
    munlock, unmap, problems = driver4.run(deltas(driver4, Protocol.REWORK))
    assert problems == []
    assert munlock == 0, "munlock of whole VMAs took i_mmap_rwsem (an rmap walk?)"
    assert unmap == 3, "munmap/exit took i_mmap_rwsem more than once per file VMA"


def test_q9_control_legacy_munlock_walks_the_rmap(driver4: Driver) -> None:
    munlock, _unmap, problems = driver4.run(deltas(driver4, Protocol.LEGACY))
    assert problems == []
    assert munlock >= PAGES, "legacy munlock should walk the rmap (page_mlock) per page"
