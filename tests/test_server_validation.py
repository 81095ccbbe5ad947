"""Bad requests are refused with INVALID_ARGUMENT / EINVAL before the kernel is called."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MCL_CURRENT,
    MCL_ONFAULT,
    MLOCK_ONFAULT,
    PROT_READ,
)
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2 as pb
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2_grpc as pb_grpc
from mmsvc.proto_gen.mmsvc.v1 import types_pb2 as tpb

pytestmark = pytest.mark.asyncio

U64_MAX = (1 << 64) - 1
PAGE = 4096
ANON = MAP_PRIVATE | MAP_ANONYMOUS

BAD: list[tuple[str, str, Message]] = [
    # (rpc, field named in the error, request)
    ("Mlock", "machine", pb.MlockRequest(machine="", pid=1, addr=0, length=PAGE)),
    ("Mlock", "pid", pb.MlockRequest(machine="m", pid=0, addr=0, length=PAGE)),
    ("Mlock", "pid", pb.MlockRequest(machine="m", pid=-3, addr=0, length=PAGE)),
    ("Mlock", "length", pb.MlockRequest(machine="m", pid=1, addr=0, length=(1 << 47) + 1)),
    ("Mlock", "length", pb.MlockRequest(machine="m", pid=1, addr=U64_MAX - PAGE, length=2 * PAGE)),
    ("Mlock", "flags", pb.MlockRequest(machine="m", pid=1, addr=0, length=PAGE, flags=2)),
    ("Munlock", "length", pb.MunlockRequest(machine="m", pid=1, addr=U64_MAX, length=1)),
    ("Munmap", "addr", pb.MunmapRequest(machine="m", pid=1, addr=PAGE + 1, length=PAGE)),
    ("Munmap", "length", pb.MunmapRequest(machine="m", pid=1, addr=PAGE, length=0)),
    ("Munmap", "length", pb.MunmapRequest(machine="m", pid=1, addr=PAGE, length=U64_MAX)),
    ("Mprotect", "addr", pb.MprotectRequest(machine="m", pid=1, addr=12, length=PAGE, prot=1)),
    ("Mprotect", "prot", pb.MprotectRequest(machine="m", pid=1, addr=0, length=PAGE, prot=8)),
    ("Madvise", "advice", pb.MadviseRequest(machine="m", pid=1, addr=0, length=PAGE)),
    ("Madvise", "advice", pb.MadviseRequest(machine="m", pid=1, addr=0, length=PAGE, advice=99)),  # type: ignore[arg-type]
    ("Madvise", "addr", pb.MadviseRequest(machine="m", pid=1, addr=1, length=PAGE, advice=4)),  # type: ignore[arg-type]
    ("Mmap", "length", pb.MmapRequest(machine="m", pid=1, length=0, prot=1, flags=ANON)),
    ("Mmap", "length", pb.MmapRequest(machine="m", pid=1, length=1 << 48, prot=1, flags=ANON)),
    ("Mmap", "flags", pb.MmapRequest(machine="m", pid=1, length=PAGE, prot=1, flags=MAP_ANONYMOUS)),
    ("Mmap", "flags",
     pb.MmapRequest(machine="m", pid=1, length=PAGE, prot=1, flags=ANON | 1 << 24)),
    ("Mmap", "prot", pb.MmapRequest(machine="m", pid=1, length=PAGE, prot=0x10, flags=ANON)),
    ("Mmap", "offset", pb.MmapRequest(machine="m", pid=1, length=PAGE, prot=1, flags=MAP_SHARED,
                                      file="f", offset=100)),
    ("Mmap", "addr", pb.MmapRequest(machine="m", pid=1, length=PAGE, prot=1,
                                    flags=ANON | MAP_FIXED, addr=123)),
    ("Mlockall", "flags", pb.MlockallRequest(machine="m", pid=1, flags=0)),
    ("Mlockall", "flags", pb.MlockallRequest(machine="m", pid=1, flags=MCL_ONFAULT)),
    ("Mlockall", "flags", pb.MlockallRequest(machine="m", pid=1, flags=8 | MCL_CURRENT)),
    ("Fault", "length", pb.FaultRequest(machine="m", pid=1, addr=0, length=0)),
    ("Migrate", "node", pb.MigrateRequest(machine="m", pid=1, addr=0, length=PAGE, node=-1)),
    ("Setrlimit", "soft", pb.SetrlimitRequest(machine="m", pid=1, soft=2, hard=1)),
    ("DropCapability", "cap", pb.DropCapabilityRequest(machine="m", pid=1)),
    ("DropCapability", "cap", pb.DropCapabilityRequest(machine="m", pid=1, cap=42)),  # type: ignore[arg-type]
    ("PageFlags", "length", pb.PageFlagsRequest(machine="m", pid=1, addr=0, length=100)),
    ("PageFlags", "length", pb.PageFlagsRequest(machine="m", pid=1, addr=0, length=1 << 40)),
    ("PageFlags", "addr", pb.PageFlagsRequest(machine="m", pid=1, addr=5, length=PAGE)),
    ("Reclaim", "nr_pages", pb.ReclaimRequest(machine="m", nr_pages=0)),
    ("Reclaim", "memcg", pb.ReclaimRequest(machine="m", nr_pages=1, memcg="")),
    ("CreateFile", "pages", pb.CreateFileRequest(machine="m", name="f", pages=0)),
    ("CreateFile", "name", pb.CreateFileRequest(machine="m", name="", pages=1)),
    ("CreateFile", "kind", pb.CreateFileRequest(machine="m", name="f", pages=1, kind=9)),  # type: ignore[arg-type]
    ("CreateProcess", "rlimit_memlock_soft",
     pb.CreateProcessRequest(machine="m", rlimit_memlock_soft=10, rlimit_memlock_hard=5)),
    ("CreateMachine", "config.protocol",
     pb.CreateMachineRequest(config=tpb.MachineConfig(protocol=7))),  # type: ignore[arg-type]
    ("CreateMachine", "config.memcgs",
     pb.CreateMachineRequest(config=tpb.MachineConfig(memcgs=["a", "a"]))),
    ("CreateMachine", "config.nodes",
     pb.CreateMachineRequest(config=tpb.MachineConfig(nodes=100000))),
    ("CreateMachine", "config.fault_around_pages",
     pb.CreateMachineRequest(config=tpb.MachineConfig(fault_around_pages=3))),
    ("Vmstat", "machine", pb.VmstatRequest()),
    ("Check", "machine", pb.CheckRequest(machine="x" * 300)),
    ("FilePages", "file", pb.FilePagesRequest(machine="m")),
]


@pytest.mark.parametrize(("rpc", "field", "request_msg"), BAD, ids=[f"{r}-{f}" for r, f, _ in BAD])
async def test_bad_request_is_invalid_argument(
    fake_server: Any, fake_kernel: Any, rpc: str, field: str, request_msg: Message
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        stub = pb_grpc.MmServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await getattr(stub, rpc)(request_msg)
    err = exc.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert fake_kernel.calls == [], "kernel must not be called"
    md = dict(err.trailing_metadata() or ())
    status = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(info) for d in status.details)
    assert any(d.Unpack(bad) for d in status.details)
    assert info.reason == "EINVAL"
    assert info.domain == "mmsvc"
    assert info.metadata["field"] == field
    assert bad.field_violations[0].field == field


GOOD: list[tuple[str, Message, str]] = [
    # Linux accepts these (length 0 is a no-op for mlock/munlock/mprotect/madvise; mlock and
    # munlock round an unaligned start down; mmap's hint need not be aligned without MAP_FIXED)
    ("Mlock", pb.MlockRequest(machine="m", pid=1, addr=123, length=0), "mlock"),
    ("Mlock", pb.MlockRequest(machine="m", pid=1, addr=123, length=5, flags=MLOCK_ONFAULT),
     "mlock"),
    ("Munlock", pb.MunlockRequest(machine="m", pid=1, addr=5, length=PAGE), "munlock"),
    ("Mprotect", pb.MprotectRequest(machine="m", pid=1, addr=0, length=0, prot=PROT_READ),
     "mprotect"),
    ("Madvise", pb.MadviseRequest(machine="m", pid=1, addr=0, length=0, advice=tpb.ADVICE_COLD),
     "madvise"),
    ("Mmap", pb.MmapRequest(machine="m", pid=1, length=1, prot=0, flags=ANON, addr=77), "mmap"),
    ("Setrlimit", pb.SetrlimitRequest(machine="m", pid=1, soft=U64_MAX, hard=U64_MAX),
     "setrlimit"),
    ("Mlockall", pb.MlockallRequest(machine="m", pid=1, flags=MCL_CURRENT | MCL_ONFAULT),
     "mlockall"),
]


@pytest.mark.parametrize(("rpc", "request_msg", "method"), GOOD, ids=[g[0] for g in GOOD])
async def test_linux_valid_requests_reach_the_kernel(
    fake_server: Any, fake_kernel: Any, rpc: str, request_msg: Message, method: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        stub = pb_grpc.MmServiceStub(ch)
        await getattr(stub, rpc)(request_msg)
    assert len(fake_kernel.called(method)) == 1


# -- bodies that are not a valid request (found by loadtests/fuzz.py) ------------------------------

# A request body the method's deserializer refuses used to end UNKNOWN, with the protobuf
# exception text ("Unexpected <class 'DecodeError'>: Error parsing message...") sent to the
# client: grpc decodes before any handler runs.  mmsvc.server.decode answers INVALID_ARGUMENT.
MALFORMED: list[tuple[str, bytes]] = [
    ("Mlock", b"\x0a\x05ab"),  # machine: a length past the end
    ("Mlock", b"\x0a\x02\xff\xfe"),  # machine: bad UTF-8
    ("Mmap", b"\x0a\x01m\x10" + b"\xff" * 10 + b"\x01"),  # pid: an 11-byte varint
    ("Fork", b"\x0a\x011\x10\xfd\x07\x0f"),  # wire type 7
    ("Vmstat", b"\x0a\x013\x0b\x81\x0a"),  # an unterminated group
    ("Drain", b"\x0a\x014\x00\xfc"),  # field number 0
    ("CreateMachine", b"\x0a\xff\xff\xff\xff\x0f"),  # config: a 4 GiB length
    ("Check", b"\x5b" * 200 + b"\x5c" * 200),  # groups nested 200 deep
    ("Ping", b"\xff"),
]


def _error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    md = dict(err.trailing_metadata() or ())
    status = status_pb2.Status.FromString(md["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details)
    return info


@pytest.mark.parametrize(("rpc", "body"), MALFORMED, ids=[f"{r}-{i}" for i, (r, _) in
                                                         enumerate(MALFORMED)])
async def test_undecodable_body_is_invalid_argument(
    fake_server: Any, fake_kernel: Any, rpc: str, body: bytes
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        call = ch.unary_unary(f"/mmsvc.v1.MmService/{rpc}")  # bytes in, bytes out
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(body, timeout=10)
    err = exc.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert fake_kernel.calls == []
    details = err.details() or ""
    assert details.startswith(f"cannot decode the request of /mmsvc.v1.MmService/{rpc}: ")
    assert "DecodeError" not in details and "class" not in details
    info = _error_info(err)
    assert (info.reason, info.domain) == ("EINVAL", "mmsvc")


async def test_undecodable_health_check_is_invalid_argument(fake_server: Any) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{fake_server.port}") as ch:
        call = ch.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(b"\x0a\x02\xff\xfe", timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # the server is fine afterwards
        ok = await call(b"", timeout=10)
        assert ok == b"\x08\x01"  # SERVING


@pytest.mark.parametrize("length", [257, 1 << 16, 1 << 20])
async def test_huge_machine_id_is_refused_with_a_bounded_error(
    fake_server: Any, fake_kernel: Any, length: int
) -> None:
    # The id was echoed whole into the ErrorInfo metadata: above the client's 16 KiB limit
    # for trailers the call ended RESOURCE_EXHAUSTED ("received metadata size exceeds hard
    # limit") without any ErrorInfo, and the server logged "Abort already called" as INTERNAL.
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{fake_server.port}", options=[("grpc.max_send_message_length", 8 << 20)]
    ) as ch:
        stub = pb_grpc.MmServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Mlock(pb.MlockRequest(machine="x" * length, pid=1, length=PAGE))
    err = exc.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    info = _error_info(err)
    assert info.reason == "EINVAL"
    assert info.metadata["field"] == "machine"
    assert len(info.metadata["machine"]) <= 256
    assert info.metadata["machine"].endswith(f"({length} characters)")
    assert fake_kernel.calls == []
