"""KsmMerge and UffdCopy end to end: the real kernel behind a real gRPC server over a real
socket and a real redis-server (mm/ksm.py, mm/userfaultfd.py, spec S28, S29)."""

from __future__ import annotations

import pytest

from mmsvc.mm.types import MAP_ANONYMOUS, MAP_PRIVATE, MLOCK_ONFAULT, MmapArgs
from mmsvc.server.app import embedded_server
from mmsvc.store.embedded import EmbeddedRedis
from mmsvc_client import AsyncMmsvcClient, MmsvcError

PAGE = 4096


@pytest.mark.asyncio
async def test_ksm_merge_and_uffd_copy_over_grpc(redis_server: EmbeddedRedis) -> None:
    async with (
        embedded_server(redis_url=redis_server.url) as server,
        AsyncMmsvcClient(f"127.0.0.1:{server.port}") as k,
    ):
        m = await k.create_machine()
        p1, p2 = await k.create_process(m), await k.create_process(m)
        anon = MmapArgs(PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS)
        a1, a2 = await k.mmap(m, p1, anon), await k.mmap(m, p2, anon)
        for pid, addr in ((p1, a1), (p2, a2)):
            await k.mlock(m, pid, addr, PAGE, MLOCK_ONFAULT)
            assert await k.uffd_copy(m, pid, addr, PAGE) == 1  # S29: mlock_new_page
        await k.drain(m, True)
        res = await k.ksm_merge(m, p1, a1, p2, a2)  # S28
        assert res.new_ksm_page
        await k.drain(m, True)
        pg = (await k.page_flags(m, p2, a2, PAGE))[0]
        assert (pg.pfn, pg.ksm, pg.mlock_count) == (res.kpfn, True, 2)
        vm = await k.vmstat(m)
        assert (vm["unevictable_pgs_mlocked"], vm["unevictable_pgs_munlocked"],
                vm["unevictable_pgs_rescued"], vm["nr_mlock"]) == (2, 1, 1, 1)
        report = await k.check(m, True)
        assert not report.violations
        for call, errno in [
            (k.uffd_copy(m, p1, a1, PAGE), "EEXIST"),
            (k.uffd_copy(m, p1, a1 + 1, PAGE), "EINVAL"),
            (k.uffd_copy(m, p1, a1, 100), "EINVAL"),
            (k.uffd_copy(m, p1, a1 + 64 * PAGE, PAGE), "ENOENT"),
            (k.ksm_merge(m, p1, a1, p2, a2), "EINVAL"),  # one page now
            (k.ksm_merge(m, p1, a1, p2, a2 + 64 * PAGE), "EFAULT"),
            (k.ksm_merge(m, p1, a1 + 1, p2, a2), "EINVAL"),
            (k.ksm_merge(m, p1, a1, p2 + 100, a2), "ESRCH"),
        ]:
            with pytest.raises(MmsvcError) as err:
                await call
            assert err.value.errno == errno
        await k.delete_machine(m)
