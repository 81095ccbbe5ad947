"""The MmService servicer: validate → call the kernel → map the result.

Servicers are thin on purpose.  Each method validates its request (see
:mod:`mmsvc.server.validate`), calls exactly one :class:`~mmsvc.mm.kernel.KernelAPI` method and
converts the result.  :func:`rpc` turns failures into statuses:

* :class:`~mmsvc.server.validate.ValidationError` → INVALID_ARGUMENT, reason ``EINVAL``
  (the kernel is not called);
* :class:`~mmsvc.mm.errors.KernelError` → the errno's status code (mmsvc.server.errors);
* anything else → INTERNAL with a generic message; the traceback goes to the server log only.

With per-tenant access (:mod:`mmsvc.server.tenancy`) :func:`rpc` first admits the call: no
identity → UNAUTHENTICATED; a machine of another tenant → the ESRCH of a missing machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import grpc
import grpc.aio

from mmsvc.logging import get_logger
from mmsvc.mm.errors import KernelError
from mmsvc.mm.kernel import KernelAPI
from mmsvc.mm.types import (
    MAP_FIXED,
    PAGE_SIZE,
    Advice,
    MmapArgs,
    PageInfo,
)
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2 as pb
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2_grpc as pb_grpc
from mmsvc.proto_gen.mmsvc.v1 import types_pb2 as tpb
from mmsvc.server import convert
from mmsvc.server import validate as v
from mmsvc.server.errors import (
    INTERNAL_MESSAGE,
    INTERNAL_REASON,
    STORE_DOWN,
    abort,
    build_status,
    code_for_errno,
    request_metadata,
    store_down_status,
)
from mmsvc.server.tenancy import Tenancy, Unauthenticated

log = get_logger("mmsvc.server")

Ctx = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
S = TypeVar("S", bound="MmServicer")

ADVICE_VALUES = frozenset(int(a) for a in Advice)
CAPABILITIES = {tpb.CAPABILITY_IPC_LOCK: "CAP_IPC_LOCK"}
SHM_COMMANDS = {tpb.SHM_COMMAND_LOCK: "SHM_LOCK", tpb.SHM_COMMAND_UNLOCK: "SHM_UNLOCK"}
MAX_SHM_PAGES = 1 << 24  # as the largest mapping (syscalls.MAX_MAP_PAGES)
PROTOCOLS = frozenset({tpb.PROTOCOL_REWORK, tpb.PROTOCOL_LEGACY})
UNAUTHENTICATED_REASON = "UNAUTHENTICATED"


async def abort_with(context: Ctx, status: grpc.Status) -> None:
    await abort(context, status)  # (a call already ended is CANCELLED, not a server fault)


async def abort_internal(context: Ctx, request: object, method: str) -> None:
    """Log the current exception with its traceback and fail the RPC with a generic INTERNAL."""
    meta = request_metadata(request)
    log.error("rpc_internal_error", method=method, exc_info=True, **meta)
    await abort_with(
        context,
        build_status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, INTERNAL_REASON, meta),
    )


def rpc(
    fn: Callable[[S, Req, Ctx], Awaitable[Resp]],
) -> Callable[[S, Req, Ctx], Coroutine[Any, Any, Resp]]:
    """Error mapping for one servicer method (see the module docstring)."""

    @functools.wraps(fn)
    async def wrapper(self: S, request: Req, context: Ctx) -> Resp:
        try:
            if self.tenancy is not None:
                await self.tenancy.admit(request, context)
            return await fn(self, request, context)
        except Unauthenticated as e:
            await abort_with(
                context,
                build_status(grpc.StatusCode.UNAUTHENTICATED, str(e), UNAUTHENTICATED_REASON),
            )
        except v.ValidationError as e:
            meta = request_metadata(request)
            meta["field"] = e.field
            await abort_with(
                context,
                build_status(
                    grpc.StatusCode.INVALID_ARGUMENT, str(e), "EINVAL", meta, field=e.field
                ),
            )
        except KernelError as e:
            await abort_with(
                context,
                build_status(
                    code_for_errno(e.errno), e.message, e.errno, request_metadata(request)
                ),
            )
        except grpc.aio.AbortError:
            raise
        except STORE_DOWN as e:
            # not a server fault: the store was unreachable past the client's retries
            log.warning("rpc_store_unavailable", method=fn.__name__, error=type(e).__name__,
                        **request_metadata(request))
            await abort_with(context, store_down_status(request_metadata(request)))
        except Exception:
            await abort_internal(context, request, fn.__name__)
        raise AssertionError("unreachable: context.abort() returned")  # pragma: no cover

    return wrapper


class MmServicer(pb_grpc.MmServiceServicer):
    """mmsvc.v1.MmService over one KernelAPI object (this worker's CPU)."""

    def __init__(
        self, kernel: KernelAPI, cpu: int | None = None, tenancy: Tenancy | None = None
    ) -> None:
        self.kernel = kernel
        self.cpu = cpu if cpu is not None else int(getattr(kernel, "cpu", 0))
        #: Per-tenant access (mmsvc.server.tenancy); None: one implicit tenant, no checks.
        self.tenancy = tenancy

    # -- baseline --------------------------------------------------------------------------

    @rpc
    async def Ping(self, request: pb.PingRequest, context: Ctx) -> pb.PingResponse:
        return pb.PingResponse(cpu=self.cpu)

    # -- machines --------------------------------------------------------------------------

    @rpc
    async def CreateMachine(
        self, request: pb.CreateMachineRequest, context: Ctx
    ) -> pb.CreateMachineResponse:
        c = request.config
        v.bounded(c.nodes, 0, v.MAX_NODES, "config.nodes")
        v.bounded(c.frames_per_node, 0, 1 << 32, "config.frames_per_node")
        v.bounded(c.swap_pages, 0, 1 << 40, "config.swap_pages")
        v.bounded(c.mlock_batch_len, 0, v.MAX_BATCH_LEN, "config.mlock_batch_len")
        v.bounded(c.lru_add_batch_len, 0, v.MAX_BATCH_LEN, "config.lru_add_batch_len")
        if c.fault_around_pages:
            v.power_of_two(c.fault_around_pages, "config.fault_around_pages")
            v.bounded(c.fault_around_pages, 1, 512, "config.fault_around_pages")
        if c.hpage_pmd_nr:
            v.power_of_two(c.hpage_pmd_nr, "config.hpage_pmd_nr")
            v.bounded(c.hpage_pmd_nr, 2, 1 << 18, "config.hpage_pmd_nr")
        if c.protocol:
            v.enum_value(c.protocol, PROTOCOLS, "config.protocol")
        v.machine_tunables(c)  # spec §10.1 settings: unknown enum values are EINVAL
        for memcg in c.memcgs:
            v.name(memcg, "config.memcgs")
        v.require(len(set(c.memcgs)) == len(c.memcgs), "config.memcgs", "duplicate memcg")
        v.require(len(c.name) <= v.MAX_ID_LEN, "config.name", "too long")
        machine = await self.kernel.create_machine(convert.machine_config_from_pb(c))
        if self.tenancy is not None:
            # shielded like the kernel call: a cancelled RPC still leaves an owned machine
            claim = asyncio.ensure_future(self.tenancy.claim(machine))
            try:
                await asyncio.shield(claim)
            except Exception:
                # an unowned machine would be visible to nobody: do not leave it behind
                with contextlib.suppress(Exception):
                    await self.kernel.delete_machine(machine)
                raise
        return pb.CreateMachineResponse(machine=machine)

    @rpc
    async def DeleteMachine(
        self, request: pb.DeleteMachineRequest, context: Ctx
    ) -> pb.DeleteMachineResponse:
        v.machine_id(request.machine)
        await self.kernel.delete_machine(request.machine)
        if self.tenancy is not None:
            await self.tenancy.release(request.machine)
        return pb.DeleteMachineResponse()

    @rpc
    async def GetMachine(
        self, request: pb.GetMachineRequest, context: Ctx
    ) -> pb.GetMachineResponse:
        v.machine_id(request.machine)
        cfg = await self.kernel.machine_config(request.machine)
        return pb.GetMachineResponse(
            machine=request.machine, config=convert.machine_config_to_pb(cfg)
        )

    @rpc
    async def ListMachines(
        self, request: pb.ListMachinesRequest, context: Ctx
    ) -> pb.ListMachinesResponse:
        machines = await self.kernel.list_machines()
        if self.tenancy is not None:
            machines = await self.tenancy.visible(machines)
        return pb.ListMachinesResponse(machines=machines)

    @rpc
    async def CreateFile(
        self, request: pb.CreateFileRequest, context: Ctx
    ) -> pb.CreateFileResponse:
        v.machine_id(request.machine)
        v.name(request.name, "name")
        v.bounded(request.pages, 1, v.MAX_FILE_PAGES, "pages")
        if request.kind:
            v.enum_value(request.kind, convert.FILE_KINDS_FROM_PB, "kind")
        await self.kernel.create_file(request.machine, convert.file_spec_from_pb(request))
        return pb.CreateFileResponse()

    # -- processes -------------------------------------------------------------------------

    @rpc
    async def CreateProcess(
        self, request: pb.CreateProcessRequest, context: Ctx
    ) -> pb.CreateProcessResponse:
        v.machine_id(request.machine)
        v.bounded(request.node, 0, v.MAX_NODES - 1, "node")
        if request.memcg:
            v.name(request.memcg, "memcg")
        spec = convert.process_spec_from_pb(request)
        v.require(
            spec.rlimit_memlock_soft <= spec.rlimit_memlock_hard,
            "rlimit_memlock_soft",
            "soft limit above hard limit",
        )
        pid = await self.kernel.create_process(request.machine, spec)
        return pb.CreateProcessResponse(pid=pid)

    @rpc
    async def Fork(self, request: pb.ForkRequest, context: Ctx) -> pb.ForkResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        child = await self.kernel.fork(request.machine, request.pid)
        return pb.ForkResponse(child_pid=child)

    @rpc
    async def Exit(self, request: pb.ExitRequest, context: Ctx) -> pb.ExitResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        await self.kernel.exit(request.machine, request.pid)
        return pb.ExitResponse()

    @rpc
    async def Setrlimit(
        self, request: pb.SetrlimitRequest, context: Ctx
    ) -> pb.SetrlimitResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        # kernel/sys.c do_prlimit: if (new_rlim->rlim_cur > new_rlim->rlim_max) return -EINVAL
        v.require(request.soft <= request.hard, "soft", "soft limit above hard limit")
        await self.kernel.setrlimit(request.machine, request.pid, request.soft, request.hard)
        return pb.SetrlimitResponse()

    @rpc
    async def DropCapability(
        self, request: pb.DropCapabilityRequest, context: Ctx
    ) -> pb.DropCapabilityResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.enum_value(request.cap, CAPABILITIES, "cap")
        await self.kernel.drop_capability(request.machine, request.pid, CAPABILITIES[request.cap])
        return pb.DropCapabilityResponse()

    # -- address space ---------------------------------------------------------------------

    @rpc
    async def Mmap(self, request: pb.MmapRequest, context: Ctx) -> pb.MmapResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.require(request.length > 0, "length", "must be > 0")
        v.require(request.length <= v.MAX_LENGTH, "length", f"must be <= {v.MAX_LENGTH}")
        if request.flags & MAP_FIXED:  # otherwise addr is only a hint
            v.byte_range(request.addr, request.length, align_addr=True, allow_zero=False)
        v.prot(request.prot)
        v.mmap_flags(request.flags)
        v.page_aligned(request.offset, "offset")
        v.require(request.offset <= v.U64 - v.MAX_LENGTH, "offset", "too large")
        args = MmapArgs(
            length=request.length,
            prot=request.prot,
            flags=request.flags,
            file=request.file,
            offset=request.offset,
            addr=request.addr,
        )
        addr = await self.kernel.mmap(request.machine, request.pid, args)
        return pb.MmapResponse(addr=addr)

    @rpc
    async def Munmap(self, request: pb.MunmapRequest, context: Ctx) -> pb.MunmapResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=True, allow_zero=False)
        await self.kernel.munmap(request.machine, request.pid, request.addr, request.length)
        return pb.MunmapResponse()

    @rpc
    async def Mprotect(self, request: pb.MprotectRequest, context: Ctx) -> pb.MprotectResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=True, allow_zero=True)
        v.prot(request.prot)
        await self.kernel.mprotect(
            request.machine, request.pid, request.addr, request.length, request.prot
        )
        return pb.MprotectResponse()

    @rpc
    async def Madvise(self, request: pb.MadviseRequest, context: Ctx) -> pb.MadviseResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=True, allow_zero=True)
        v.enum_value(request.advice, ADVICE_VALUES, "advice")
        await self.kernel.madvise(
            request.machine, request.pid, request.addr, request.length, Advice(request.advice)
        )
        return pb.MadviseResponse()

    @rpc
    async def Mlock(self, request: pb.MlockRequest, context: Ctx) -> pb.MlockResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=False, allow_zero=True)
        v.bits(request.flags, v.MLOCK_MASK, "flags")
        await self.kernel.mlock(
            request.machine, request.pid, request.addr, request.length, request.flags
        )
        return pb.MlockResponse()

    @rpc
    async def Isolate(self, request: pb.IsolateRequest, context: Ctx) -> pb.IsolateResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=True, allow_zero=False)
        n = await self.kernel.isolate(request.machine, request.pid, request.addr, request.length)
        return pb.IsolateResponse(isolated=n)

    @rpc
    async def Putback(self, request: pb.PutbackRequest, context: Ctx) -> pb.PutbackResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=True, allow_zero=False)
        n = await self.kernel.putback(request.machine, request.pid, request.addr, request.length)
        return pb.PutbackResponse(put_back=n)

    @rpc
    async def ShmCreate(self, request: pb.ShmCreateRequest, context: Ctx) -> pb.ShmCreateResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.bounded(request.pages, 1, MAX_SHM_PAGES, "pages")
        v.byte_range(request.addr, 0, align_addr=True, allow_zero=True)
        shmid, addr = await self.kernel.shm_create(
            request.machine, request.pid, request.pages, request.addr)
        return pb.ShmCreateResponse(shmid=shmid, addr=addr)

    @rpc
    async def ShmAttach(self, request: pb.ShmAttachRequest, context: Ctx) -> pb.ShmAttachResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.require(request.shmid >= 0, "shmid", "must be >= 0")
        v.byte_range(request.addr, 0, align_addr=True, allow_zero=True)
        addr = await self.kernel.shm_attach(
            request.machine, request.pid, request.shmid, request.addr)
        return pb.ShmAttachResponse(addr=addr)

    @rpc
    async def ShmCtl(self, request: pb.ShmCtlRequest, context: Ctx) -> pb.ShmCtlResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.require(request.shmid >= 0, "shmid", "must be >= 0")
        v.enum_value(request.cmd, SHM_COMMANDS, "cmd")
        await self.kernel.shm_ctl(
            request.machine, request.pid, request.shmid, SHM_COMMANDS[request.cmd])
        return pb.ShmCtlResponse()

    # -- truncation and pins (mm/truncate.py, mm/gup.py) ------------------------------------

    @rpc
    async def Truncate(self, request: pb.TruncateRequest, context: Ctx) -> pb.TruncateResponse:
        v.machine_id(request.machine)
        v.name(request.file, "file")
        v.bounded(request.size_pages, 0, v.MAX_FILE_PAGES, "size_pages")
        await self.kernel.truncate(request.machine, request.file, request.size_pages)
        return pb.TruncateResponse()

    @rpc
    async def PunchHole(self, request: pb.PunchHoleRequest, context: Ctx) -> pb.PunchHoleResponse:
        v.machine_id(request.machine)
        v.name(request.file, "file")
        v.bounded(request.offset_pages, 0, v.MAX_FILE_PAGES, "offset_pages")
        v.bounded(request.pages, 1, v.MAX_FILE_PAGES, "pages")
        await self.kernel.punch_hole(request.machine, request.file, request.offset_pages,
                                     request.pages)
        return pb.PunchHoleResponse()

    @rpc
    async def Pin(self, request: pb.PinRequest, context: Ctx) -> pb.PinResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=True, allow_zero=False)
        res = await self.kernel.pin(request.machine, request.pid, request.addr, request.length,
                                    request.write)
        return pb.PinResponse(pin_id=res.pin_id, pages=res.pages)

    @rpc
    async def Unpin(self, request: pb.UnpinRequest, context: Ctx) -> pb.UnpinResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.require(request.pin_id > 0, "pin_id", "must be a pin id (> 0)")
        pages = await self.kernel.unpin(request.machine, request.pid, request.pin_id)
        return pb.UnpinResponse(pages=pages)

    # -- KSM and userfaultfd (mm/ksm.py, mm/userfaultfd.py) ---------------------------------

    @rpc
    async def KsmMerge(self, request: pb.KsmMergeRequest, context: Ctx) -> pb.KsmMergeResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.pid(request.other_pid, "other_pid")
        v.page_aligned(request.addr, "addr")
        v.page_aligned(request.other_addr, "other_addr")
        res = await self.kernel.ksm_merge(request.machine, request.pid, request.addr,
                                          request.other_pid, request.other_addr)
        return pb.KsmMergeResponse(kpfn=res.kpfn, new_ksm_page=res.new_ksm_page)

    @rpc
    async def UffdCopy(self, request: pb.UffdCopyRequest, context: Ctx) -> pb.UffdCopyResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=True, allow_zero=False)
        v.page_aligned(request.length, "length")
        pages = await self.kernel.uffd_copy(request.machine, request.pid, request.addr,
                                            request.length)
        return pb.UffdCopyResponse(pages=pages)

    @rpc
    async def Munlock(self, request: pb.MunlockRequest, context: Ctx) -> pb.MunlockResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=False, allow_zero=True)
        await self.kernel.munlock(request.machine, request.pid, request.addr, request.length)
        return pb.MunlockResponse()

    @rpc
    async def Mlockall(self, request: pb.MlockallRequest, context: Ctx) -> pb.MlockallResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.mlockall_flags(request.flags)
        await self.kernel.mlockall(request.machine, request.pid, request.flags)
        return pb.MlockallResponse()

    @rpc
    async def Munlockall(
        self, request: pb.MunlockallRequest, context: Ctx
    ) -> pb.MunlockallResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        await self.kernel.munlockall(request.machine, request.pid)
        return pb.MunlockallResponse()

    @rpc
    async def Fault(self, request: pb.FaultRequest, context: Ctx) -> pb.FaultResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=False, allow_zero=False)
        faults = await self.kernel.fault(
            request.machine, request.pid, request.addr, request.length, request.write
        )
        return pb.FaultResponse(faults=faults)

    @rpc
    async def Migrate(self, request: pb.MigrateRequest, context: Ctx) -> pb.MigrateResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(request.addr, request.length, align_addr=False, allow_zero=False)
        v.bounded(request.node, 0, v.MAX_NODES - 1, "node")
        result = await self.kernel.migrate(
            request.machine, request.pid, request.addr, request.length, request.node
        )
        return convert.migrate_result_to_pb(result)

    # -- pressure and batches --------------------------------------------------------------

    @rpc
    async def Reclaim(self, request: pb.ReclaimRequest, context: Ctx) -> pb.ReclaimResponse:
        v.machine_id(request.machine)
        v.bounded(request.nr_pages, 1, 1 << 32, "nr_pages")
        node: int | None = None
        if request.HasField("node"):
            v.bounded(request.node, 0, v.MAX_NODES - 1, "node")
            node = request.node
        memcg: str | None = None
        if request.HasField("memcg"):
            v.name(request.memcg, "memcg")
            memcg = request.memcg
        result = await self.kernel.reclaim(request.machine, node, memcg, request.nr_pages)
        return convert.reclaim_result_to_pb(result)

    @rpc
    async def Drain(self, request: pb.DrainRequest, context: Ctx) -> pb.DrainResponse:
        v.machine_id(request.machine)
        await self.kernel.drain(request.machine, request.all_cpus)
        return pb.DrainResponse()

    # -- views -----------------------------------------------------------------------------

    @rpc
    async def Vmstat(self, request: pb.VmstatRequest, context: Ctx) -> pb.VmstatResponse:
        v.machine_id(request.machine)
        return pb.VmstatResponse(counters=await self.kernel.vmstat(request.machine))

    @rpc
    async def Meminfo(self, request: pb.MeminfoRequest, context: Ctx) -> pb.MeminfoResponse:
        v.machine_id(request.machine)
        return pb.MeminfoResponse(fields=await self.kernel.meminfo(request.machine))

    @rpc
    async def ProcStatus(
        self, request: pb.ProcStatusRequest, context: Ctx
    ) -> pb.ProcStatusResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        st = await self.kernel.proc_status(request.machine, request.pid)
        return pb.ProcStatusResponse(status=convert.proc_status_to_pb(st))

    @rpc
    async def Smaps(self, request: pb.SmapsRequest, context: Ctx) -> pb.SmapsResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        entries = await self.kernel.smaps(request.machine, request.pid)
        return pb.SmapsResponse(vmas=[convert.smaps_entry_to_pb(e) for e in entries])

    @rpc
    async def PageFlags(
        self, request: pb.PageFlagsRequest, context: Ctx
    ) -> pb.PageFlagsResponse:
        v.machine_id(request.machine)
        v.pid(request.pid)
        v.byte_range(
            request.addr,
            request.length,
            align_addr=True,
            allow_zero=False,
            max_length=v.MAX_VIEW_PAGES * PAGE_SIZE,
        )
        v.page_aligned(request.length, "length")
        pages = await self.kernel.page_flags(
            request.machine, request.pid, request.addr, request.length
        )
        return pb.PageFlagsResponse(pages=[convert.page_info_to_pb(p) for p in pages])

    @rpc
    async def FilePages(
        self, request: pb.FilePagesRequest, context: Ctx
    ) -> pb.FilePagesResponse:
        v.machine_id(request.machine)
        v.name(request.file, "file")
        file_pages = cast(
            "Callable[[str, str], Awaitable[list[PageInfo]]] | None",
            getattr(self.kernel, "file_pages", None),
        )
        if file_pages is None:
            raise KernelError("ENOTSUP", "this kernel has no file_pages view")
        pages = await file_pages(request.machine, request.file)
        return pb.FilePagesResponse(pages=[convert.page_info_to_pb(p) for p in pages])

    @rpc
    async def LockStat(self, request: pb.LockStatRequest, context: Ctx) -> pb.LockStatResponse:
        v.machine_id(request.machine)
        rows = await self.kernel.lock_stat(request.machine)
        return pb.LockStatResponse(rows=[convert.lock_stat_row_to_pb(r) for r in rows])

    @rpc
    async def Check(self, request: pb.CheckRequest, context: Ctx) -> pb.CheckResponse:
        v.machine_id(request.machine)
        report = await self.kernel.check(request.machine, request.drain_all)
        return pb.CheckResponse(report=convert.check_report_to_pb(report))
