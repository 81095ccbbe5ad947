"""The real kernel behind a real gRPC server over a real socket and a real redis-server."""

from __future__ import annotations

import pytest

from mmsvc.mm.types import MAP_ANONYMOUS, MAP_PRIVATE, MmapArgs
from mmsvc.server.app import embedded_server
from mmsvc.store.embedded import EmbeddedRedis
from mmsvc_client import AsyncMmsvcClient, MmsvcError


@pytest.mark.asyncio
async def test_s10_over_grpc_isolate_munlock_putback(redis_server: EmbeddedRedis) -> None:
    async with (
        embedded_server(redis_url=redis_server.url) as server,
        AsyncMmsvcClient(f"127.0.0.1:{server.port}") as k,
    ):
        m = await k.create_machine()
        pid = await k.create_process(m)
        addr = await k.mmap(m, pid, MmapArgs(4096, 3, MAP_PRIVATE | MAP_ANONYMOUS))
        await k.fault(m, pid, addr, 4096, True)
        await k.mlock(m, pid, addr, 4096)
        await k.drain(m, False)
        assert await k.isolate(m, pid, addr, 4096) == 1
        await k.munlock(m, pid, addr, 4096)
        assert (await k.vmstat(m))["unevictable_pgs_stranded"] == 1
        assert await k.putback(m, pid, addr, 4096) == 1
        await k.drain(m, False)
        vm = await k.vmstat(m)
        assert (vm["unevictable_pgs_rescued"], vm["nr_unevictable"]) == (1, 0)
        report = await k.check(m, True)
        assert not report.violations
        with pytest.raises(MmsvcError) as err:
            await k.isolate(m, pid, addr + 1, 4096)
        assert err.value.errno == "EINVAL"
        with pytest.raises(MmsvcError) as err:
            await k.mlock(m, pid + 100, addr, 4096)
        assert err.value.errno == "ESRCH"
        await k.delete_machine(m)
