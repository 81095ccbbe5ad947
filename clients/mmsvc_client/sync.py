"""The blocking client: one method per RPC, mirroring :class:`mmsvc.mm.kernel.KernelAPI`.

Same surface and behaviour as :class:`mmsvc_client.aio.AsyncMmsvcClient`, without asyncio.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, TypeVar

import grpc

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
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2_grpc as pb_grpc
from mmsvc_client import _calls as c
from mmsvc_client._base import (
    DEFAULT_TIMEOUT,
    RetryPolicy,
    TLSOptions,
    channel_settings,
    page_chunks,
)
from mmsvc_client.errors import from_rpc_error

T = TypeVar("T")


class MmsvcClient:
    """``with MmsvcClient("127.0.0.1:50051") as k: k.ping()``.

    Every call has a deadline (``timeout`` seconds, default 60).  Idempotent calls are retried
    on UNAVAILABLE per ``retry``.  Failures raise :class:`mmsvc_client.MmsvcError`.
    A client uses one channel (one connection): against a multi-worker server all its calls
    land on one worker; use a worker's private port to choose the CPU.

    ``tls`` connects over TLS (with a client certificate for mutual TLS), ``token`` adds a
    bearer token to every call (TLS only); see docs/security.md.  Without them: plaintext.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        channel: grpc.Channel | None = None,
        tls: TLSOptions | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        if channel is None:
            creds, options = channel_settings(tls, token)
            channel = (
                grpc.insecure_channel(target, options=options)
                if creds is None
                else grpc.secure_channel(target, creds, options=options)
            )
        self._channel = channel
        self._stub: Any = pb_grpc.MmServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MmsvcClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel is connected (or raise grpc.FutureTimeoutError)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def _run(self, call: c.Call[T]) -> T:
        method = getattr(self._stub, call.method)
        attempts = self.retry.attempts if call.idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                response = method(call.request, timeout=self.timeout)
                return call.convert(response)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                if attempt < attempts and code in self.retry.retry_codes:
                    time.sleep(self.retry.backoff(attempt))
                    continue
                raise from_rpc_error(e) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- baseline -------------------------------------------------------------------------

    def ping(self) -> int:
        """No-op RPC; returns the CPU (worker) that answered."""
        return self._run(c.ping())

    # -- machines -------------------------------------------------------------------------

    def create_machine(self, cfg: MachineConfig | None = None) -> str:
        return self._run(c.create_machine(cfg or MachineConfig()))

    def delete_machine(self, machine: str) -> None:
        self._run(c.delete_machine(machine))

    def machine_config(self, machine: str) -> MachineConfig:
        return self._run(c.machine_config(machine))

    def list_machines(self) -> list[str]:
        return self._run(c.list_machines())

    def create_file(self, machine: str, spec: FileSpec) -> None:
        self._run(c.create_file(machine, spec))

    # -- processes ------------------------------------------------------------------------

    def create_process(self, machine: str, spec: ProcessSpec | None = None) -> int:
        return self._run(c.create_process(machine, spec or ProcessSpec()))

    def fork(self, machine: str, pid: int) -> int:
        return self._run(c.fork(machine, pid))

    def exit(self, machine: str, pid: int) -> None:
        self._run(c.exit_(machine, pid))

    def setrlimit(self, machine: str, pid: int, soft: int, hard: int) -> None:
        self._run(c.setrlimit(machine, pid, soft, hard))

    def drop_capability(self, machine: str, pid: int, cap: str = "CAP_IPC_LOCK") -> None:
        self._run(c.drop_capability(machine, pid, cap))

    # -- address space --------------------------------------------------------------------

    def mmap(self, machine: str, pid: int, args: MmapArgs) -> int:
        return self._run(c.mmap(machine, pid, args))

    def munmap(self, machine: str, pid: int, addr: int, length: int) -> None:
        self._run(c.munmap(machine, pid, addr, length))

    def mprotect(self, machine: str, pid: int, addr: int, length: int, prot: int) -> None:
        self._run(c.mprotect(machine, pid, addr, length, prot))

    def madvise(
        self, machine: str, pid: int, addr: int, length: int, advice: Advice | int
    ) -> None:
        self._run(c.madvise(machine, pid, addr, length, advice))

    def mlock(
        self, machine: str, pid: int, addr: int, length: int, flags: int = 0
    ) -> None:
        self._run(c.mlock(machine, pid, addr, length, flags))

    def isolate(self, machine: str, pid: int, addr: int, length: int) -> int:
        return self._run(c.isolate(machine, pid, addr, length))

    def putback(self, machine: str, pid: int, addr: int, length: int) -> int:
        return self._run(c.putback(machine, pid, addr, length))

    def shm_create(
        self, machine: str, pid: int, pages: int, addr: int = 0
    ) -> tuple[int, int]:
        """shmget(IPC_PRIVATE) + shmat: (shmid, address)."""
        return self._run(c.shm_create(machine, pid, pages, addr))

    def shm_attach(self, machine: str, pid: int, shmid: int, addr: int = 0) -> int:
        return self._run(c.shm_attach(machine, pid, shmid, addr))

    def shm_ctl(self, machine: str, pid: int, shmid: int, cmd: str) -> None:
        """cmd: "SHM_LOCK" or "SHM_UNLOCK"."""
        self._run(c.shm_ctl(machine, pid, shmid, cmd))

    def truncate(self, machine: str, file: str, size_pages: int) -> None:
        """ftruncate(2) of a file to size_pages pages."""
        self._run(c.truncate(machine, file, size_pages))

    def punch_hole(self, machine: str, file: str, offset_pages: int, pages: int) -> None:
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) of pages [offset, +pages)."""
        self._run(c.punch_hole(machine, file, offset_pages, pages))

    def pin(self, machine: str, pid: int, addr: int, length: int,
            write: bool = True) -> PinResult:
        """pin_user_pages(FOLL_PIN | FOLL_LONGTERM): the pin's id and the pages pinned."""
        return self._run(c.pin(machine, pid, addr, length, write))

    def unpin(self, machine: str, pid: int, pin_id: int) -> int:
        """unpin_user_pages: returns the pages unpinned."""
        return self._run(c.unpin(machine, pid, pin_id))

    def ksm_merge(self, machine: str, pid: int, addr: int, other_pid: int,
                  other_addr: int) -> KsmMergeResult:
        """KSM merge: the page at (other_pid, other_addr) is replaced by the (KSM) page at
        (pid, addr)."""
        return self._run(c.ksm_merge(machine, pid, addr, other_pid, other_addr))

    def uffd_copy(self, machine: str, pid: int, addr: int, length: int) -> int:
        """UFFDIO_COPY of new pages into a missing range; returns the pages copied."""
        return self._run(c.uffd_copy(machine, pid, addr, length))

    def munlock(self, machine: str, pid: int, addr: int, length: int) -> None:
        self._run(c.munlock(machine, pid, addr, length))

    def mlockall(self, machine: str, pid: int, flags: int) -> None:
        self._run(c.mlockall(machine, pid, flags))

    def munlockall(self, machine: str, pid: int) -> None:
        self._run(c.munlockall(machine, pid))

    def fault(
        self, machine: str, pid: int, addr: int, length: int, write: bool = True
    ) -> int:
        return self._run(c.fault(machine, pid, addr, length, write))

    def migrate(
        self, machine: str, pid: int, addr: int, length: int, node: int
    ) -> MigrateResult:
        return self._run(c.migrate(machine, pid, addr, length, node))

    # -- pressure and batches -------------------------------------------------------------

    def reclaim(
        self, machine: str, node: int | None, memcg: str | None, nr_pages: int
    ) -> ReclaimResult:
        return self._run(c.reclaim(machine, node, memcg, nr_pages))

    def drain(self, machine: str, all_cpus: bool = False) -> None:
        self._run(c.drain(machine, all_cpus))

    # -- views ----------------------------------------------------------------------------

    def vmstat(self, machine: str) -> dict[str, int]:
        return self._run(c.vmstat(machine))

    def meminfo(self, machine: str) -> dict[str, int]:
        return self._run(c.meminfo(machine))

    def proc_status(self, machine: str, pid: int) -> ProcStatus:
        return self._run(c.proc_status(machine, pid))

    def smaps(self, machine: str, pid: int) -> list[SmapsEntry]:
        return self._run(c.smaps(machine, pid))

    def page_flags(
        self, machine: str, pid: int, addr: int, length: int
    ) -> list[PageInfo]:
        """One PageInfo per page; large ranges are fetched in several calls."""
        out: list[PageInfo] = []
        for a, n in page_chunks(addr, length):
            chunk = self._run(c.page_flags(machine, pid, a, n))
            out.extend(chunk)
        return out

    def file_pages(self, machine: str, file: str) -> list[PageInfo]:
        return self._run(c.file_pages(machine, file))

    def lock_stat(self, machine: str) -> list[LockStatRow]:
        return self._run(c.lock_stat(machine))

    def check(self, machine: str, drain_all: bool = False) -> CheckReport:
        return self._run(c.check(machine, drain_all))
