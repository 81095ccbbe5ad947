"""Truncate, PunchHole, Pin and Unpin end to end: the real kernel behind a real gRPC server
over a real socket and a real redis-server (mm/truncate.py, mm/gup.py, spec S20)."""

from __future__ import annotations

import pytest

from mmsvc.mm.types import MAP_SHARED, FileSpec, MmapArgs
from mmsvc.server.app import embedded_server
from mmsvc.store.embedded import EmbeddedRedis
from mmsvc_client import AsyncMmsvcClient, MmsvcError


@pytest.mark.asyncio
async def test_truncate_and_pins_over_grpc(redis_server: EmbeddedRedis) -> None:
    async with (
        embedded_server(redis_url=redis_server.url) as server,
        AsyncMmsvcClient(f"127.0.0.1:{server.port}") as k,
    ):
        m = await k.create_machine()
        await k.create_file(m, FileSpec("f", 4, prefill=True))
        pid = await k.create_process(m)
        addr = await k.mmap(m, pid, MmapArgs(4 * 4096, 3, MAP_SHARED, "f"))
        await k.mlock(m, pid, addr, 4 * 4096)
        pin = await k.pin(m, pid, addr, 4096, write=False)
        assert pin.pages == 1
        await k.punch_hole(m, "f", 3, 1)
        await k.truncate(m, "f", 2)
        await k.drain(m, False)
        vm = await k.vmstat(m)
        # the zaps munlocked (VM_LOCKED vma); the pinned page is still mapped and mlocked
        assert (vm["unevictable_pgs_munlocked"], vm["unevictable_pgs_cleared"]) == (2, 0)
        assert vm["nr_mlock"] == 2
        with pytest.raises(MmsvcError) as err:  # beyond the new end of the file: SIGBUS
            await k.fault(m, pid, addr + 3 * 4096, 4096, False)
        assert err.value.errno == "EFAULT"
        await k.munmap(m, pid, addr, 4 * 4096)
        await k.drain(m, False)
        assert (await k.vmstat(m))["nr_inactive_anon"] == 2  # page 1 cached, page 0 pinned
        assert await k.unpin(m, pid, pin.pin_id) == 1
        report = await k.check(m, True)
        assert not report.violations
        for call, errno in [
            (k.unpin(m, pid, pin.pin_id), "ENOENT"),
            (k.truncate(m, "nope", 0), "ENOENT"),
            (k.punch_hole(m, "f", 0, 0), "EINVAL"),
            (k.pin(m, pid, addr + 1, 4096), "EINVAL"),
            (k.pin(m, pid, addr, 4096), "EFAULT"),  # unmapped now
            (k.pin(m, pid + 100, addr, 4096), "ESRCH"),
        ]:
            with pytest.raises(MmsvcError) as err:
                await call
            assert err.value.errno == errno
        # a machine deleted with a pin outstanding leaves nothing behind
        addr = await k.mmap(m, pid, MmapArgs(4096, 3, MAP_SHARED, "f"))
        await k.pin(m, pid, addr, 4096, write=True)
        await k.delete_machine(m)
        assert m not in await k.list_machines()
