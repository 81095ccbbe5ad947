"""One builder per RPC: the request message, how to read the answer, and whether it may be
retried.  Shared by the asyncio and the blocking client so that both stay identical."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from mmsvc.mm.kernel import KsmMergeResult, MigrateResult, PinResult, ReclaimResult
from mmsvc.mm.types import (
    Advice,
    CheckReport,
    FileSpec,
    LockStatRow,
    MachineConfig,
    MmapArgs,
    PageInfo,
    ProcessSpec,
    ProcStatus,
    SmapsEntry,
)
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2 as pb
from mmsvc.proto_gen.mmsvc.v1 import types_pb2 as tpb
from mmsvc.server import convert

T = TypeVar("T")

CAPABILITIES = {"CAP_IPC_LOCK": tpb.CAPABILITY_IPC_LOCK}
SHM_COMMANDS = {"SHM_LOCK": tpb.SHM_COMMAND_LOCK, "SHM_UNLOCK": tpb.SHM_COMMAND_UNLOCK}


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str  # RPC name on MmService
    request: Message
    convert: Callable[[Any], T]
    idempotent: bool = False


def _none(_: Any) -> None:
    return None


def ping() -> Call[int]:
    return Call("Ping", pb.PingRequest(), lambda r: int(r.cpu), idempotent=True)


# -- machines ---------------------------------------------------------------------------------


def create_machine(cfg: MachineConfig) -> Call[str]:
    return Call(
        "CreateMachine",
        pb.CreateMachineRequest(config=convert.machine_config_to_pb(cfg)),
        lambda r: str(r.machine),
    )


def delete_machine(machine: str) -> Call[None]:
    return Call("DeleteMachine", pb.DeleteMachineRequest(machine=machine), _none)


def machine_config(machine: str) -> Call[MachineConfig]:
    return Call(
        "GetMachine",
        pb.GetMachineRequest(machine=machine),
        lambda r: convert.machine_config_from_pb(r.config),
        idempotent=True,
    )


def list_machines() -> Call[list[str]]:
    return Call(
        "ListMachines", pb.ListMachinesRequest(), lambda r: list(r.machines), idempotent=True
    )


def create_file(machine: str, spec: FileSpec) -> Call[None]:
    return Call("CreateFile", convert.file_spec_to_pb(machine, spec), _none)


# -- processes --------------------------------------------------------------------------------


def create_process(machine: str, spec: ProcessSpec) -> Call[int]:
    return Call(
        "CreateProcess", convert.process_spec_to_pb(machine, spec), lambda r: int(r.pid)
    )


def fork(machine: str, pid: int) -> Call[int]:
    return Call("Fork", pb.ForkRequest(machine=machine, pid=pid), lambda r: int(r.child_pid))


def exit_(machine: str, pid: int) -> Call[None]:
    return Call("Exit", pb.ExitRequest(machine=machine, pid=pid), _none)


def setrlimit(machine: str, pid: int, soft: int, hard: int) -> Call[None]:
    return Call(
        "Setrlimit", pb.SetrlimitRequest(machine=machine, pid=pid, soft=soft, hard=hard), _none
    )


def drop_capability(machine: str, pid: int, cap: str) -> Call[None]:
    return Call(
        "DropCapability",
        pb.DropCapabilityRequest(
            machine=machine, pid=pid, cap=CAPABILITIES.get(cap, tpb.CAPABILITY_UNSPECIFIED)
        ),
        _none,
    )


# -- address space ----------------------------------------------------------------------------


def mmap(machine: str, pid: int, args: MmapArgs) -> Call[int]:
    return Call(
        "Mmap",
        pb.MmapRequest(
            machine=machine,
            pid=pid,
            length=args.length,
            prot=args.prot,
            flags=args.flags,
            file=args.file,
            offset=args.offset,
            addr=args.addr,
        ),
        lambda r: int(r.addr),
    )


def munmap(machine: str, pid: int, addr: int, length: int) -> Call[None]:
    return Call(
        "Munmap", pb.MunmapRequest(machine=machine, pid=pid, addr=addr, length=length), _none
    )


def mprotect(machine: str, pid: int, addr: int, length: int, prot: int) -> Call[None]:
    return Call(
        "Mprotect",
        pb.MprotectRequest(machine=machine, pid=pid, addr=addr, length=length, prot=prot),
        _none,
    )


def madvise(machine: str, pid: int, addr: int, length: int, advice: Advice | int) -> Call[None]:
    return Call(
        "Madvise",
        pb.MadviseRequest(
            machine=machine,
            pid=pid,
            addr=addr,
            length=length,
            advice=int(advice),  # type: ignore[arg-type]
        ),
        _none,
    )


def mlock(machine: str, pid: int, addr: int, length: int, flags: int) -> Call[None]:
    return Call(
        "Mlock",
        pb.MlockRequest(machine=machine, pid=pid, addr=addr, length=length, flags=flags),
        _none,
    )


def isolate(machine: str, pid: int, addr: int, length: int) -> Call[int]:
    return Call(
        "Isolate", pb.IsolateRequest(machine=machine, pid=pid, addr=addr, length=length),
        lambda r: int(r.isolated),
    )


def putback(machine: str, pid: int, addr: int, length: int) -> Call[int]:
    return Call(
        "Putback", pb.PutbackRequest(machine=machine, pid=pid, addr=addr, length=length),
        lambda r: int(r.put_back),
    )


def shm_create(machine: str, pid: int, pages: int, addr: int) -> Call[tuple[int, int]]:
    return Call(
        "ShmCreate", pb.ShmCreateRequest(machine=machine, pid=pid, pages=pages, addr=addr),
        lambda r: (int(r.shmid), int(r.addr)),
    )


def shm_attach(machine: str, pid: int, shmid: int, addr: int) -> Call[int]:
    return Call(
        "ShmAttach", pb.ShmAttachRequest(machine=machine, pid=pid, shmid=shmid, addr=addr),
        lambda r: int(r.addr),
    )


def shm_ctl(machine: str, pid: int, shmid: int, cmd: str) -> Call[None]:
    return Call(
        "ShmCtl",
        pb.ShmCtlRequest(machine=machine, pid=pid, shmid=shmid,
                         cmd=SHM_COMMANDS.get(cmd, tpb.SHM_COMMAND_UNSPECIFIED)),
        _none,
    )


def truncate(machine: str, file: str, size_pages: int) -> Call[None]:
    return Call("Truncate",
                pb.TruncateRequest(machine=machine, file=file, size_pages=size_pages), _none,
                idempotent=True)


def punch_hole(machine: str, file: str, offset_pages: int, pages: int) -> Call[None]:
    return Call("PunchHole", pb.PunchHoleRequest(machine=machine, file=file,
                                                 offset_pages=offset_pages, pages=pages),
                _none, idempotent=True)


def pin(machine: str, pid: int, addr: int, length: int, write: bool) -> Call[PinResult]:
    return Call(
        "Pin", pb.PinRequest(machine=machine, pid=pid, addr=addr, length=length, write=write),
        lambda r: PinResult(int(r.pin_id), int(r.pages)),
    )


def unpin(machine: str, pid: int, pin_id: int) -> Call[int]:
    return Call("Unpin", pb.UnpinRequest(machine=machine, pid=pid, pin_id=pin_id),
                lambda r: int(r.pages))


def ksm_merge(machine: str, pid: int, addr: int, other_pid: int,
              other_addr: int) -> Call[KsmMergeResult]:
    return Call(
        "KsmMerge", pb.KsmMergeRequest(machine=machine, pid=pid, addr=addr,
                                       other_pid=other_pid, other_addr=other_addr),
        lambda r: KsmMergeResult(int(r.kpfn), bool(r.new_ksm_page)),
    )


def uffd_copy(machine: str, pid: int, addr: int, length: int) -> Call[int]:
    return Call("UffdCopy", pb.UffdCopyRequest(machine=machine, pid=pid, addr=addr,
                                               length=length), lambda r: int(r.pages))


def munlock(machine: str, pid: int, addr: int, length: int) -> Call[None]:
    return Call(
        "Munlock", pb.MunlockRequest(machine=machine, pid=pid, addr=addr, length=length), _none
    )


def mlockall(machine: str, pid: int, flags: int) -> Call[None]:
    return Call("Mlockall", pb.MlockallRequest(machine=machine, pid=pid, flags=flags), _none)


def munlockall(machine: str, pid: int) -> Call[None]:
    return Call("Munlockall", pb.MunlockallRequest(machine=machine, pid=pid), _none)


def fault(machine: str, pid: int, addr: int, length: int, write: bool) -> Call[int]:
    return Call(
        "Fault",
        pb.FaultRequest(machine=machine, pid=pid, addr=addr, length=length, write=write),
        lambda r: int(r.faults),
    )


def migrate(machine: str, pid: int, addr: int, length: int, node: int) -> Call[MigrateResult]:
    return Call(
        "Migrate",
        pb.MigrateRequest(machine=machine, pid=pid, addr=addr, length=length, node=node),
        convert.migrate_result_from_pb,
    )


# -- pressure and batches ---------------------------------------------------------------------


def reclaim(
    machine: str, node: int | None, memcg: str | None, nr_pages: int
) -> Call[ReclaimResult]:
    req = pb.ReclaimRequest(machine=machine, nr_pages=nr_pages)
    if node is not None:
        req.node = node
    if memcg is not None:
        req.memcg = memcg
    return Call("Reclaim", req, convert.reclaim_result_from_pb)


def drain(machine: str, all_cpus: bool) -> Call[None]:
    return Call(
        "Drain", pb.DrainRequest(machine=machine, all_cpus=all_cpus), _none, idempotent=True
    )


# -- views ------------------------------------------------------------------------------------


def vmstat(machine: str) -> Call[dict[str, int]]:
    return Call(
        "Vmstat", pb.VmstatRequest(machine=machine), lambda r: dict(r.counters), idempotent=True
    )


def meminfo(machine: str) -> Call[dict[str, int]]:
    return Call(
        "Meminfo", pb.MeminfoRequest(machine=machine), lambda r: dict(r.fields), idempotent=True
    )


def proc_status(machine: str, pid: int) -> Call[ProcStatus]:
    return Call(
        "ProcStatus",
        pb.ProcStatusRequest(machine=machine, pid=pid),
        lambda r: convert.proc_status_from_pb(r.status),
        idempotent=True,
    )


def smaps(machine: str, pid: int) -> Call[list[SmapsEntry]]:
    return Call(
        "Smaps",
        pb.SmapsRequest(machine=machine, pid=pid),
        lambda r: [convert.smaps_entry_from_pb(e) for e in r.vmas],
        idempotent=True,
    )


def page_flags(machine: str, pid: int, addr: int, length: int) -> Call[list[PageInfo]]:
    return Call(
        "PageFlags",
        pb.PageFlagsRequest(machine=machine, pid=pid, addr=addr, length=length),
        lambda r: [convert.page_info_from_pb(p) for p in r.pages],
        idempotent=True,
    )


def file_pages(machine: str, file: str) -> Call[list[PageInfo]]:
    return Call(
        "FilePages",
        pb.FilePagesRequest(machine=machine, file=file),
        lambda r: [convert.page_info_from_pb(p) for p in r.pages],
        idempotent=True,
    )


def lock_stat(machine: str) -> Call[list[LockStatRow]]:
    return Call(
        "LockStat",
        pb.LockStatRequest(machine=machine),
        lambda r: [convert.lock_stat_row_from_pb(x) for x in r.rows],
        idempotent=True,
    )


def check(machine: str, drain_all: bool) -> Call[CheckReport]:
    return Call(
        "Check",
        pb.CheckRequest(machine=machine, drain_all=drain_all),
        lambda r: convert.check_report_from_pb(r.report),
        idempotent=True,
    )
