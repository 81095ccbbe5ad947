"""MADV_COLLAPSE end to end: a real gRPC server over a real socket and a real redis-server
(mm/khugepaged.py, spec S32): the counters Linux 6.18 shows, and errors that change nothing."""

from __future__ import annotations

import pytest

from mmsvc.mm.types import MAP_SHARED, Advice, FileSpec, MachineConfig, MmapArgs, Protocol
from mmsvc.server.app import embedded_server
from mmsvc.store.embedded import EmbeddedRedis
from mmsvc_client import AsyncMmsvcClient, MmsvcError

HPAGE = 512
HINT = 0x7E0000000000  # 2 MiB aligned


@pytest.mark.asyncio
async def test_collapse_over_grpc(redis_server: EmbeddedRedis) -> None:
    async with (
        embedded_server(redis_url=redis_server.url) as server,
        AsyncMmsvcClient(f"127.0.0.1:{server.port}") as k,
    ):
        m = await k.create_machine(MachineConfig(thp=True, frames_per_node=8192))
        await k.create_file(m, FileSpec("f", HPAGE, prefill=True))
        pid = await k.create_process(m)
        length = HPAGE * 4096
        addr = await k.mmap(m, pid, MmapArgs(length, 3, MAP_SHARED, "f", addr=HINT))
        assert addr == HINT
        await k.mlock(m, pid, addr, length)
        await k.drain(m, False)
        before = await k.vmstat(m)
        await k.madvise(m, pid, addr, length, Advice.MADV_COLLAPSE)
        vm = await k.vmstat(m)
        assert {e: vm[f"unevictable_pgs_{e}"] - before[f"unevictable_pgs_{e}"]
                for e in ("stranded", "mlocked", "culled")} == {
            "stranded": HPAGE, "mlocked": HPAGE, "culled": HPAGE}
        pages = await k.page_flags(m, pid, addr, length)
        assert len({p.pfn for p in pages}) == 1 and pages[0].mlock_count == 1
        assert not (await k.check(m, True)).violations

        legacy = await k.create_machine(MachineConfig(thp=True, frames_per_node=8192,
                                                      protocol=Protocol.LEGACY))
        await k.create_file(legacy, FileSpec("f", HPAGE, prefill=True))
        lpid = await k.create_process(legacy)
        laddr = await k.mmap(legacy, lpid, MmapArgs(length, 3, MAP_SHARED, "f", addr=HINT))
        for call, errno in [
            (k.madvise(legacy, lpid, laddr, length, Advice.MADV_COLLAPSE), "EINVAL"),
            (k.madvise(m, pid + 100, addr, length, Advice.MADV_COLLAPSE), "ESRCH"),
            (k.madvise(m, pid, addr + 1, length, Advice.MADV_COLLAPSE), "EINVAL"),
        ]:
            with pytest.raises(MmsvcError) as err:
                await call
            assert err.value.errno == errno
        assert await k.vmstat(m) == vm


@pytest.mark.asyncio
async def test_anonymous_collapse_over_grpc(redis_server: EmbeddedRedis) -> None:
    """collapse_huge_page of 512 mlocked anonymous pages, the Linux 6.18 counts (the
    conformance trace collapse_anon_mlocked); a range without page table is EINVAL."""
    from mmsvc.mm.types import MAP_ANONYMOUS, MAP_PRIVATE

    async with (
        embedded_server(redis_url=redis_server.url) as server,
        AsyncMmsvcClient(f"127.0.0.1:{server.port}") as k,
    ):
        m = await k.create_machine(MachineConfig(thp=True, thp_anon_fault=False,
                                                 frames_per_node=8192, mlock_batch_len=31,
                                                 lru_add_batch_len=31, populate_drain=True))
        pid = await k.create_process(m)
        length = HPAGE * 4096
        flags = MAP_PRIVATE | MAP_ANONYMOUS
        addr = await k.mmap(m, pid, MmapArgs(2 * length, 3, flags, addr=HINT))
        await k.fault(m, pid, addr, 300 * 4096, True)
        await k.mlock(m, pid, addr, length)
        before = await k.vmstat(m)
        await k.madvise(m, pid, addr, length, Advice.MADV_COLLAPSE)
        vm = await k.vmstat(m)
        assert {e: vm[f"unevictable_pgs_{e}"] - before[f"unevictable_pgs_{e}"]
                for e in ("stranded", "munlocked", "rescued", "mlocked", "culled")} == {
            "stranded": 16, "munlocked": 496, "rescued": 496, "mlocked": HPAGE,
            "culled": HPAGE}
        pages = await k.page_flags(m, pid, addr, length)
        assert len({p.pfn for p in pages}) == 1 and pages[0].mlock_count == 1
        with pytest.raises(MmsvcError) as err:
            await k.madvise(m, pid, addr + length, length, Advice.MADV_COLLAPSE)
        assert err.value.errno == "EINVAL"  # SCAN_PMD_NULL: nothing faulted there
        await k.drain(m, True)
        assert not (await k.check(m, True)).violations
