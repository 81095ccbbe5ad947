"""KernelError → gRPC status mapping, rich ErrorInfo details, INTERNAL without leaks."""

from __future__ import annotations

import io
import json
from typing import Any

import grpc
import grpc.aio
import pytest
import redis.exceptions
from google.rpc import error_details_pb2, status_pb2

from mmsvc.mm.errors import KernelError
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2 as pb
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2_grpc as pb_grpc
from mmsvc.server.errors import ERRNO_TO_CODE
from mmsvc_client import AsyncMmsvcClient, MmsvcError

pytestmark = pytest.mark.asyncio


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    md = dict(err.trailing_metadata() or ())
    status = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    assert status.code == err.code().value[0]
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("no ErrorInfo detail")


@pytest.mark.parametrize(
    ("errno", "code"),
    [
        ("EINVAL", grpc.StatusCode.INVALID_ARGUMENT),
        ("ENOMEM", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("EPERM", grpc.StatusCode.PERMISSION_DENIED),
        ("EACCES", grpc.StatusCode.PERMISSION_DENIED),
        ("EAGAIN", grpc.StatusCode.ABORTED),
        ("ESRCH", grpc.StatusCode.NOT_FOUND),
        ("ENOENT", grpc.StatusCode.NOT_FOUND),
        ("EBUSY", grpc.StatusCode.FAILED_PRECONDITION),
        ("EEXIST", grpc.StatusCode.ALREADY_EXISTS),
    ],
)
async def test_kernel_error_maps_to_status_with_error_info(
    fake_server: Any, fake_kernel: Any, errno: str, code: grpc.StatusCode
) -> None:
    fake_kernel.fail["mlock"] = KernelError(errno, "emulated failure")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        stub = pb_grpc.MmServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Mlock(pb.MlockRequest(machine="m1", pid=7, addr=4096, length=4096))
    assert exc.value.code() == code
    assert exc.value.details() == "emulated failure"
    info = error_info(exc.value)
    assert info.reason == errno
    assert info.domain == "mmsvc"
    assert dict(info.metadata) == {"machine": "m1", "pid": "7"}


@pytest.mark.parametrize("exc", [redis.exceptions.TimeoutError("Timeout reading from socket"),
                                 redis.exceptions.ConnectionError("Connection refused"),
                                 redis.exceptions.BusyLoadingError("loading the dataset")])
async def test_store_down_inside_a_handler_is_unavailable(
    fake_server: Any, fake_kernel: Any, exc: Exception
) -> None:
    """The store unreachable past the store client's retries: UNAVAILABLE (retry later), not
    INTERNAL, and the driver's message stays in the server log."""
    fake_kernel.fail["mlock"] = exc
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        stub = pb_grpc.MmServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Mlock(pb.MlockRequest(machine="m1", pid=7, addr=4096, length=4096))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "page store unavailable"
    info = error_info(err.value)
    assert info.reason == "EAGAIN"
    assert dict(info.metadata) == {"machine": "m1", "pid": "7"}


async def test_every_errno_name_has_a_code() -> None:
    from mmsvc.mm.errors import ERRNO_NAMES

    assert set(ERRNO_NAMES) <= set(ERRNO_TO_CODE)


async def test_client_raises_typed_error(fake_server: Any, fake_kernel: Any) -> None:
    fake_kernel.fail["fork"] = KernelError("EAGAIN", "too many tasks")
    async with AsyncMmsvcClient(f"127.0.0.1:{fake_server.port}") as k:
        with pytest.raises(MmsvcError) as exc:
            await k.fork("m1", 5)
    err = exc.value
    assert err.errno == "EAGAIN"
    assert err.code == grpc.StatusCode.ABORTED
    assert err.message == "too many tasks"
    assert err.machine == "m1"
    assert err.pid == 5


async def test_unexpected_exception_is_internal_without_leak(
    fake_server: Any, fake_kernel: Any, log_stream: io.StringIO
) -> None:
    fake_kernel.fail["vmstat"] = RuntimeError("secret-token /etc/shadow")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        stub = pb_grpc.MmServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Vmstat(pb.VmstatRequest(machine="m1"))
    err = exc.value
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal server error"
    everything = (
        repr(err.details()) + repr(err.trailing_metadata()) + repr(err.debug_error_string())
    )
    assert "secret" not in everything
    assert "Traceback" not in everything
    assert "RuntimeError" not in everything
    assert error_info(err).reason == "INTERNAL"
    # ... but the server log has the traceback
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines() if line.strip()]
    errors = [e for e in lines if e.get("event") == "rpc_internal_error"]
    assert errors, lines
    assert "secret-token" in json.dumps(errors[0])


async def test_client_maps_internal(fake_server: Any, fake_kernel: Any) -> None:
    fake_kernel.fail["check"] = ZeroDivisionError("boom")
    async with AsyncMmsvcClient(f"127.0.0.1:{fake_server.port}") as k:
        with pytest.raises(MmsvcError) as exc:
            await k.check("m1")
    assert exc.value.code == grpc.StatusCode.INTERNAL
    assert exc.value.errno == "INTERNAL"
    assert "boom" not in str(exc.value)


async def test_error_guard_catches_non_servicer_exceptions(fake_kernel: Any) -> None:
    """An exception escaping a handler outside the MmService decorator still becomes INTERNAL."""
    from mmsvc.server.app import build_server

    server = await build_server(lambda: fake_kernel, "127.0.0.1:0", None)

    class Broken(grpc.GenericRpcHandler):
        def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
            if handler_call_details.method != "/test.Broken/Call":
                return None

            async def call(request: bytes, context: Any) -> bytes:
                raise ValueError("private detail")

            return grpc.unary_unary_rpc_method_handler(call)

    server.add_generic_rpc_handlers([Broken()])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            call = ch.unary_unary("/test.Broken/Call")
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await call(b"")
        assert exc.value.code() == grpc.StatusCode.INTERNAL
        assert "private" not in (exc.value.details() or "")
    finally:
        await server.stop(None)
