"""Shared fixtures.

* ``redis_server`` (session): a private ``redis-server`` on a free loopback port, started for
  this test session (never port 6379, never a server the tests did not start).
* ``redis_url`` (function): that server's URL, FLUSHDB'd before the test.
* ``key_prefix`` (function): a unique key prefix, for tests that share the database.
* ``fake_kernel`` (function): a recording stand-in for :class:`mmsvc.mm.kernel.KernelAPI`,
  for tests of the layers above the kernel.
* ``fake_server`` (function, async): a started mmsvc server over ``fake_kernel`` on a free
  loopback port (no /metrics endpoint).
* ``log_stream`` (function): structured logs of the test, as JSON lines in a StringIO.
"""

from __future__ import annotations

import io
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from mmsvc.logging import configure_logging
from mmsvc.mm.kernel import KernelAPI, MigrateResult, ReclaimResult
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
from mmsvc.store.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    try:
        find_redis_server()
    except EmbeddedRedisError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    server = EmbeddedRedis().start()
    assert server.port != 6379
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushdb()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def key_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


class FakeKernel(KernelAPI):
    """Records every call; ``fail[method] = exc`` makes that method raise ``exc``."""

    def __init__(self, cpu: int = 0) -> None:
        self.cpu = cpu
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[str, BaseException] = {}
        self.vmstat_values: dict[str, int] = {"unevictable_pgs_mlocked": 3, "nr_mlock": 2}
        self.closed = False

    async def _rec(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    def called(self, name: str) -> list[tuple[Any, ...]]:
        return [args for n, args in self.calls if n == name]

    async def aclose(self) -> None:
        self.closed = True

    async def create_machine(self, cfg: MachineConfig) -> str:
        await self._rec("create_machine", cfg)
        return "m1"

    async def delete_machine(self, machine: str) -> None:
        await self._rec("delete_machine", machine)

    async def machine_config(self, machine: str) -> MachineConfig:
        await self._rec("machine_config", machine)
        return MachineConfig(name="fake", mlock_batch_len=31)

    async def list_machines(self) -> list[str]:
        await self._rec("list_machines")
        return ["m1"]

    async def create_file(self, machine: str, spec: FileSpec) -> None:
        await self._rec("create_file", machine, spec)

    async def create_process(self, machine: str, spec: ProcessSpec) -> int:
        await self._rec("create_process", machine, spec)
        return 100 + len(self.called("create_process"))

    async def fork(self, machine: str, pid: int) -> int:
        await self._rec("fork", machine, pid)
        return 200 + len(self.called("fork"))

    async def exit(self, machine: str, pid: int) -> None:
        await self._rec("exit", machine, pid)

    async def setrlimit(self, machine: str, pid: int, soft: int, hard: int) -> None:
        await self._rec("setrlimit", machine, pid, soft, hard)

    async def drop_capability(self, machine: str, pid: int, cap: str) -> None:
        await self._rec("drop_capability", machine, pid, cap)

    async def mmap(self, machine: str, pid: int, args: MmapArgs) -> int:
        await self._rec("mmap", machine, pid, args)
        return args.addr or 0x7F0000000000

    async def munmap(self, machine: str, pid: int, addr: int, length: int) -> None:
        await self._rec("munmap", machine, pid, addr, length)

    async def mprotect(self, machine: str, pid: int, addr: int, length: int, prot: int) -> None:
        await self._rec("mprotect", machine, pid, addr, length, prot)

    async def madvise(
        self, machine: str, pid: int, addr: int, length: int, advice: Advice
    ) -> None:
        await self._rec("madvise", machine, pid, addr, length, advice)

    async def mlock(self, machine: str, pid: int, addr: int, length: int, flags: int = 0) -> None:
        await self._rec("mlock", machine, pid, addr, length, flags)

    async def munlock(self, machine: str, pid: int, addr: int, length: int) -> None:
        await self._rec("munlock", machine, pid, addr, length)

    async def mlockall(self, machine: str, pid: int, flags: int) -> None:
        await self._rec("mlockall", machine, pid, flags)

    async def munlockall(self, machine: str, pid: int) -> None:
        await self._rec("munlockall", machine, pid)

    async def fault(self, machine: str, pid: int, addr: int, length: int, write: bool) -> int:
        await self._rec("fault", machine, pid, addr, length, write)
        return (length + 4095) // 4096

    async def migrate(
        self, machine: str, pid: int, addr: int, length: int, node: int
    ) -> MigrateResult:
        await self._rec("migrate", machine, pid, addr, length, node)
        return MigrateResult(migrated=3, failed=1, errno="EAGAIN")

    async def reclaim(
        self, machine: str, node: int | None, memcg: str | None, nr_pages: int
    ) -> ReclaimResult:
        await self._rec("reclaim", machine, node, memcg, nr_pages)
        return ReclaimResult(scanned=nr_pages, reclaimed=2, culled=1)

    async def drain(self, machine: str, all_cpus: bool) -> None:
        await self._rec("drain", machine, all_cpus)

    async def vmstat(self, machine: str) -> dict[str, int]:
        await self._rec("vmstat", machine)
        return dict(self.vmstat_values)

    async def meminfo(self, machine: str) -> dict[str, int]:
        await self._rec("meminfo", machine)
        return {"MemTotal": 1048576, "Mlocked": 8, "Unevictable": 8}

    async def proc_status(self, machine: str, pid: int) -> ProcStatus:
        await self._rec("proc_status", machine, pid)
        return ProcStatus(
            pid=pid,
            alive=True,
            vm_lck_kb=32,
            vm_size_kb=64,
            vm_rss_kb=16,
            memcg="root",
            node=0,
            mlockall_flags=0,
            cap_ipc_lock=True,
            rlimit_memlock_soft=8 << 20,
            rlimit_memlock_hard=(1 << 64) - 1,
        )

    async def smaps(self, machine: str, pid: int) -> list[SmapsEntry]:
        await self._rec("smaps", machine, pid)
        return [SmapsEntry(0x1000, 0x3000, 8, 4, 4, ("rd", "wr", "lo"))]

    async def page_flags(self, machine: str, pid: int, addr: int, length: int) -> list[PageInfo]:
        await self._rec("page_flags", machine, pid, addr, length)
        return [
            PageInfo(
                addr=addr + i * 4096,
                vma_present=True,
                present=i % 2 == 0,
                kind="a" if i % 2 == 0 else ".",
                pfn=1000 + i,
                mlocked=True,
                unevictable=True,
                lru=True,
                lru_list="unevictable",
                mlock_count=1,
                refcount=2,
                mapcount=1,
                memcg="root",
                vma_locked=True,
            )
            for i in range(length // 4096)
        ]

    async def file_pages(self, machine: str, name: str) -> list[PageInfo]:
        await self._rec("file_pages", machine, name)
        return [PageInfo(addr=0, vma_present=True, present=True, kind="f", lru=True)]

    async def lock_stat(self, machine: str) -> list[LockStatRow]:
        await self._rec("lock_stat", machine)
        return [
            LockStatRow(
                "lruvec->lru_lock", "node0/root", 1, 2, 0.5, 3.0, 4.0, 5, 60, 0.1, 9.0, 30.0
            )
        ]

    async def check(self, machine: str, drain_all: bool) -> CheckReport:
        await self._rec("check", machine, drain_all)
        return CheckReport(quiescent=True, pages_checked=12, known_exceptions={"X1": 1})


@pytest.fixture
def fake_kernel() -> FakeKernel:
    return FakeKernel()


@pytest_asyncio.fixture
async def fake_server(fake_kernel: FakeKernel) -> AsyncIterator[Any]:
    from mmsvc.server.app import build_server

    server = await build_server(
        lambda: fake_kernel, "127.0.0.1:0", None, metrics_poll_interval=None
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(None)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    try:
        yield stream
    finally:
        configure_logging("auto", "warning", stream=sys.__stderr__)  # not a capture file
