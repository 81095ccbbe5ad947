"""Every RPC through the client library and the server, against the fake kernel: the
arguments the kernel receives and the values the client returns survive the round trip."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import grpc.aio
import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.kernel import MigrateResult, ReclaimResult
from mmsvc.mm.types import (
    MAP_SHARED,
    MLOCK_ONFAULT,
    Advice,
    FileSpec,
    MachineConfig,
    MmapArgs,
    ProcessSpec,
    Protocol,
)
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2 as pb
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2_grpc as pb_grpc
from mmsvc.server.validate import MAX_VIEW_PAGES
from mmsvc_client import AsyncMmsvcClient, MmsvcClient, MmsvcError, RetryPolicy

U64_MAX = (1 << 64) - 1


@pytest.mark.asyncio
async def test_async_client_round_trip(fake_server: Any, fake_kernel: Any) -> None:
    async with AsyncMmsvcClient(f"127.0.0.1:{fake_server.port}") as k:
        assert await k.ping() == 0
        cfg = MachineConfig(nodes=2, mlock_batch_len=31, protocol=Protocol.LEGACY, name="x")
        assert await k.create_machine(cfg) == "m1"
        assert fake_kernel.called("create_machine") == [(cfg,)]
        assert (await k.machine_config("m1")).mlock_batch_len == 31
        assert await k.list_machines() == ["m1"]
        await k.create_file("m1", FileSpec("f", 8, prefill=True, kind="regular"))
        assert fake_kernel.called("create_file") == [("m1", FileSpec("f", 8, True, "regular"))]

        pid = await k.create_process("m1")
        assert fake_kernel.called("create_process") == [("m1", ProcessSpec())]
        spec = ProcessSpec(memcg="A", node=1, rlimit_memlock_soft=0, rlimit_memlock_hard=U64_MAX,
                           cap_ipc_lock=False)
        await k.create_process("m1", spec)
        assert fake_kernel.called("create_process")[1] == ("m1", spec)
        assert await k.fork("m1", pid) == 201
        await k.setrlimit("m1", pid, 0, U64_MAX)
        assert fake_kernel.called("setrlimit") == [("m1", pid, 0, U64_MAX)]
        await k.drop_capability("m1", pid)
        assert fake_kernel.called("drop_capability") == [("m1", pid, "CAP_IPC_LOCK")]

        args = MmapArgs(length=8192, prot=1, flags=MAP_SHARED, file="f", offset=4096, addr=1 << 40)
        assert await k.mmap("m1", pid, args) == 1 << 40
        assert fake_kernel.called("mmap") == [("m1", pid, args)]
        await k.munmap("m1", pid, 4096, 4096)
        await k.mprotect("m1", pid, 4096, 4096, 3)
        await k.madvise("m1", pid, 4096, 4096, Advice.MADV_PAGEOUT)
        assert fake_kernel.called("madvise") == [("m1", pid, 4096, 4096, Advice.MADV_PAGEOUT)]
        await k.mlock("m1", pid, 4097, 10, MLOCK_ONFAULT)
        assert fake_kernel.called("mlock") == [("m1", pid, 4097, 10, MLOCK_ONFAULT)]
        await k.munlock("m1", pid, 0, 4096)
        await k.mlockall("m1", pid, 3)
        await k.munlockall("m1", pid)
        assert await k.fault("m1", pid, 0, 3 * 4096, False) == 3
        assert fake_kernel.called("fault") == [("m1", pid, 0, 3 * 4096, False)]
        assert await k.migrate("m1", pid, 0, 4096, 1) == MigrateResult(3, 1, "EAGAIN")
        assert await k.reclaim("m1", None, None, 32) == ReclaimResult(32, 2, 1)
        await k.reclaim("m1", 0, "root", 5)
        assert fake_kernel.called("reclaim") == [("m1", None, None, 32), ("m1", 0, "root", 5)]
        await k.drain("m1", True)
        assert fake_kernel.called("drain") == [("m1", True)]

        assert (await k.vmstat("m1"))["unevictable_pgs_mlocked"] == 3
        assert (await k.meminfo("m1"))["Mlocked"] == 8
        status = await k.proc_status("m1", pid)
        assert status.vm_lck_kb == 32 and status.rlimit_memlock_hard == U64_MAX
        smaps = await k.smaps("m1", pid)
        assert smaps[0].vm_flags == ("rd", "wr", "lo")
        pages = await k.page_flags("m1", pid, 0, 4 * 4096)
        assert [p.present for p in pages] == [True, False, True, False]
        assert pages[0].mlock_count == 1 and pages[0].lru_list == "unevictable"
        assert (await k.file_pages("m1", "f"))[0].kind == "f"
        rows = await k.lock_stat("m1")
        assert rows[0].lock_class == "lruvec->lru_lock" and rows[0].holdtime_total == 30.0
        report = await k.check("m1", True)
        assert report.ok and report.pages_checked == 12 and report.known_exceptions == {"X1": 1}
        await k.exit("m1", pid)
        await k.delete_machine("m1")


@pytest.mark.asyncio
async def test_page_flags_is_chunked(fake_server: Any, fake_kernel: Any) -> None:
    length = (2 * MAX_VIEW_PAGES + 3) * 4096
    async with AsyncMmsvcClient(f"127.0.0.1:{fake_server.port}") as k:
        pages = await k.page_flags("m1", 1, 0, length)
    assert len(pages) == 2 * MAX_VIEW_PAGES + 3
    assert [a[3] for a in fake_kernel.called("page_flags")] == [
        MAX_VIEW_PAGES * 4096, MAX_VIEW_PAGES * 4096, 3 * 4096
    ]
    assert pages[-1].addr == length - 4096


@pytest.mark.asyncio
async def test_sync_client_in_thread(fake_server: Any, fake_kernel: Any) -> None:
    # the server runs on this test's event loop: the blocking client runs in a thread
    def work() -> tuple[int, str, str | None]:
        with MmsvcClient(f"127.0.0.1:{fake_server.port}", timeout=5) as k:
            cpu = k.ping()
            machine = k.create_machine(MachineConfig())
            fake_kernel.fail["munmap"] = KernelError("EINVAL", "bad")
            try:
                k.munmap(machine, 1, 0, 4096)
            except MmsvcError as e:
                return cpu, machine, e.errno
            return cpu, machine, None

    assert await asyncio.to_thread(work) == (0, "m1", "EINVAL")


class FlakyServicer(pb_grpc.MmServiceServicer):
    """Vmstat fails UNAVAILABLE twice, Mlock always."""

    def __init__(self) -> None:
        self.vmstat_calls = 0
        self.mlock_calls = 0

    async def Vmstat(self, request: pb.VmstatRequest, context: Any) -> pb.VmstatResponse:
        self.vmstat_calls += 1
        if self.vmstat_calls <= 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.VmstatResponse(counters={"x": 1})

    async def Mlock(self, request: pb.MlockRequest, context: Any) -> pb.MlockResponse:
        self.mlock_calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        raise AssertionError


@pytest.mark.asyncio
async def test_idempotent_calls_are_retried_on_unavailable() -> None:
    servicer = FlakyServicer()
    server = grpc.aio.server()
    pb_grpc.add_MmServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        retry = RetryPolicy(attempts=4, initial_backoff=0.001, max_backoff=0.01)
        async with AsyncMmsvcClient(f"127.0.0.1:{port}", retry=retry) as k:
            assert await k.vmstat("m") == {"x": 1}
            assert servicer.vmstat_calls == 3
            with pytest.raises(MmsvcError) as exc:
                await k.mlock("m", 1, 0, 4096)
            assert servicer.mlock_calls == 1  # not idempotent: never retried
            assert exc.value.code == grpc.StatusCode.UNAVAILABLE
            assert exc.value.errno is None
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_deadline_applies() -> None:
    class Slow(pb_grpc.MmServiceServicer):
        async def Ping(self, request: pb.PingRequest, context: Any) -> pb.PingResponse:
            await asyncio.sleep(5)
            return pb.PingResponse()

    server = grpc.aio.server()
    pb_grpc.add_MmServiceServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        t0 = time.monotonic()
        async with AsyncMmsvcClient(f"127.0.0.1:{port}", timeout=0.2) as k:
            with pytest.raises(MmsvcError) as exc:
                await k.ping()
        assert exc.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 3
    finally:
        await server.stop(None)
