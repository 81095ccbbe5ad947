"""Health, reflection, access log and Prometheus metrics, over a real socket."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.request
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mmsvc.mm.errors import KernelError
from mmsvc.mm.types import LockStatRow
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2 as pb
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2_grpc as pb_grpc
from mmsvc.server.app import SERVICE_NAME, build_server

pytestmark = pytest.mark.asyncio


async def test_health_serving(fake_server: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_not_serving_after_stop(fake_kernel: Any) -> None:
    server = await build_server(lambda: fake_kernel, "127.0.0.1:0", None)
    await server.start()
    await server.stop(None)
    assert fake_kernel.closed  # the kernel's aclose() ran


async def test_reflection_lists_and_describes_the_service(fake_server: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask(req: reflection_pb2.ServerReflectionRequest) -> Any:
            async for resp in stub.ServerReflectionInfo(iter([req])):
                return resp
            raise AssertionError("no reflection answer")

        listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        desc = await ask(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
        )
        assert desc.file_descriptor_response.file_descriptor_proto


async def test_access_log_line_per_rpc(
    fake_server: Any, fake_kernel: Any, log_stream: io.StringIO
) -> None:
    fake_kernel.fail["munlock"] = KernelError("ENOMEM", "nope")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        stub = pb_grpc.MmServiceStub(ch)
        await stub.Ping(pb.PingRequest())
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Munlock(pb.MunlockRequest(machine="m9", pid=42, addr=0, length=4096))
    lines = [json.loads(x) for x in log_stream.getvalue().splitlines() if x.strip()]
    access = [x for x in lines if x.get("event") == "rpc"]
    assert len(access) == 2, lines
    ping, munlock = access
    assert ping["method"] == "/mmsvc.v1.MmService/Ping"
    assert ping["code"] == "OK"
    assert isinstance(ping["duration_ms"], float)
    assert munlock["method"] == "/mmsvc.v1.MmService/Munlock"
    assert munlock["code"] == "RESOURCE_EXHAUSTED"
    assert munlock["machine"] == "m9"
    assert munlock["pid"] == 42
    assert munlock["component"] == "mmsvc.access"
    assert "timestamp" in munlock and "level" in munlock


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


async def test_metrics_endpoint(fake_kernel: Any) -> None:
    server = await build_server(
        lambda: fake_kernel, "127.0.0.1:0", 0, metrics_poll_interval=0.05
    )
    await server.start()
    try:
        assert server.metrics_port
        fake_kernel.fail["vmstat"] = KernelError("ESRCH", "no such machine")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.MmServiceStub(ch)
            await stub.Ping(pb.PingRequest())
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Vmstat(pb.VmstatRequest(machine="m1"))
        del fake_kernel.fail["vmstat"]
        # the poller exports the kernel's statistics
        for _ in range(100):
            text = await asyncio.to_thread(_scrape, server.metrics_port)
            if "mmsvc_vmstat{" in text:
                break
            await asyncio.sleep(0.05)
        assert (
            'grpc_server_handled_total{grpc_code="OK",grpc_method="Ping",'
            'grpc_service="mmsvc.v1.MmService",grpc_type="unary"} 1.0'
        ) in text
        assert 'grpc_code="NOT_FOUND",grpc_method="Vmstat"' in text
        assert 'grpc_server_started_total{grpc_method="Ping"' in text
        assert "grpc_server_handling_seconds_bucket" in text
        assert 'mmsvc_vmstat{counter="unevictable_pgs_mlocked",machine="m1"} 3.0' in text
        assert 'mmsvc_meminfo{field="Mlocked",machine="m1"} 8.0' in text
        assert (
            'mmsvc_lock_contentions_total{instance="node0/root",lock_class="lruvec->lru_lock",'
            'machine="m1"} 2.0'
        ) in text
        assert "mmsvc_worker_cpu 0.0" in text
    finally:
        await server.stop(None)


async def test_metrics_export_hook(fake_kernel: Any) -> None:
    server = await build_server(lambda: fake_kernel, "127.0.0.1:0", 0, metrics_poll_interval=None)
    await server.start()
    try:
        server.metrics.export_vmstat("mx", {"unevictable_pgs_cleared": 7})
        server.metrics.export_lock_stat(
            "mx", [LockStatRow("mmap_lock", "mm1", 0, 4, 1.0, 2.0, 3e6, 0, 9, 0.0, 0.0, 5e5)]
        )
        text = await asyncio.to_thread(_scrape, server.metrics_port or 0)
        assert 'mmsvc_vmstat{counter="unevictable_pgs_cleared",machine="mx"} 7.0' in text
        assert 'mmsvc_lock_wait_seconds_total{instance="mm1",lock_class="mmap_lock",' in text
        assert 'machine="mx"} 3.0' in text
        server.metrics.forget_machine("mx")
        text = await asyncio.to_thread(_scrape, server.metrics_port or 0)
        assert 'machine="mx"' not in text
    finally:
        await server.stop(None)


async def test_a_log_stream_closed_under_the_server_fails_no_rpc(
    fake_server: Any, fake_kernel: Any
) -> None:
    """Logging must never fail a call: the stream the logs go to is closed (a closed stdout,
    a broken pipe), then an RPC that logs an error still gets its own status."""
    from mmsvc.logging import configure_logging

    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    stream.close()
    try:
        fake_kernel.fail["mlock"] = RuntimeError("boom")  # logged as rpc_internal_error
        async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
            stub = pb_grpc.MmServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Mlock(pb.MlockRequest(machine="m1", pid=7, addr=4096, length=4096))
            assert err.value.code() == grpc.StatusCode.INTERNAL
            assert (await stub.Ping(pb.PingRequest())).cpu == 0
    finally:
        import sys

        configure_logging("auto", "warning", stream=sys.__stderr__)
