"""A small scenario language over the Kernel API, for readable protocol tests (spec §11)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mmsvc.mm.syscalls import Kernel
from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    FileSpec,
    MachineConfig,
    MmapArgs,
    PageInfo,
    ProcessSpec,
)
from mmsvc.server.smp import smp_kernels
from mmsvc.store.redis_store import RedisStore

P = 4096


@dataclass
class World:
    store: RedisStore
    kernel: Kernel
    mid: str
    base: dict[str, int] = field(default_factory=dict)
    maps: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    kernels: dict[int, Kernel] = field(default_factory=dict)

    @classmethod
    async def create(cls, url: str, *, worker_cpus: int = 1, **cfg: Any) -> World:
        """``worker_cpus`` > 1: CPUs 0.. are one worker's (a task can move between them,
        mm/sched.py); else CPU 0 alone (``on`` adds CPUs of other workers)."""
        store = await RedisStore.connect(url)
        kernels = smp_kernels(store, list(range(worker_cpus))) if worker_cpus > 1 else [
            Kernel(store, 0)]
        kernel = kernels[0]
        conf = {"frames_per_node": 8192, **cfg}
        mid = await kernel.create_machine(MachineConfig(**conf))
        w = cls(store, kernel, mid)
        w.kernels.update(enumerate(kernels))
        w.base = await kernel.vmstat(mid)
        return w

    async def close(self) -> None:
        await self.kernel.delete_machine(self.mid)
        await self.store.close()

    def on(self, cpu: int) -> Kernel:
        """The same machine seen from another CPU (worker)."""
        if cpu not in self.kernels:
            self.kernels[cpu] = Kernel(self.store, cpu)
        return self.kernels[cpu]

    async def proc(self, **spec: Any) -> int:
        return await self.kernel.create_process(self.mid, ProcessSpec(**spec))

    async def sharers(self, *, touch: bool = True, mlock: tuple[int, ...] = (),
                      pages: int = 1, regular: bool = False) -> list[int]:
        """Two processes mapping a new file "f" of ``pages`` pages (prefilled tmpfs, or a
        regular file) shared as "m" (read faulted in with touch; mlocked in the processes
        numbered in mlock), drained."""
        if regular:
            await self.kernel.create_file(self.mid, FileSpec("f", pages, kind="regular"))
        else:
            await self.file("f", pages, prefill=True)
        pids = [await self.proc(), await self.proc()]
        for i, p in enumerate(pids):
            await self.mmap(p, "m", pages, file="f", shared=True)
            if touch:
                await self.touch(p, "m", write=False)
            if i in mlock:
                await self.mlock(p, "m")
        await self.drain()
        return pids

    async def file(self, name: str, pages: int, prefill: bool = False) -> None:
        await self.kernel.create_file(self.mid, FileSpec(name, pages, prefill))

    async def mmap(self, pid: int, name: str, pages: int, *, file: str = "", shared: bool = False,
                   flags: int = 0, prot: int = 3) -> int:
        f = (MAP_SHARED if shared else MAP_PRIVATE) | (0 if file else MAP_ANONYMOUS) | flags
        addr = await self.kernel.mmap(self.mid, pid, MmapArgs(pages * P, prot, f, file))
        self.maps[(pid, name)] = (addr, pages)
        return addr

    def rng(self, pid: int, name: str, a: int = 0, b: int | None = None) -> tuple[int, int]:
        addr, pages = self.maps[(pid, name)]
        b = pages if b is None else b
        return addr + a * P, (b - a) * P

    async def touch(self, pid: int, name: str, a: int = 0, b: int | None = None,
                    write: bool = True, cpu: int = 0) -> None:
        addr, length = self.rng(pid, name, a, b)
        for off in range(0, length, P):  # one page at a time, ascending: real faults
            await self.on(cpu).fault(self.mid, pid, addr + off, P, write)

    async def mlock(self, pid: int, name: str, a: int = 0, b: int | None = None,
                    flags: int = 0, cpu: int = 0) -> None:
        await self.on(cpu).mlock(self.mid, pid, *self.rng(pid, name, a, b), flags)

    async def munlock(self, pid: int, name: str, a: int = 0, b: int | None = None,
                      cpu: int = 0) -> None:
        await self.on(cpu).munlock(self.mid, pid, *self.rng(pid, name, a, b))

    async def munmap(self, pid: int, name: str, a: int = 0, b: int | None = None) -> None:
        await self.kernel.munmap(self.mid, pid, *self.rng(pid, name, a, b))

    async def drain(self, cpu: int = 0) -> None:
        await self.on(cpu).drain(self.mid, False)

    async def drain_all(self) -> None:
        await self.kernel.drain(self.mid, True)

    async def delta(self) -> dict[str, int]:
        """vmstat events since the world was made, short names (spec §11 convention)."""
        now = await self.kernel.vmstat(self.mid)
        out = {k.removeprefix("unevictable_pgs_"): now[k] - self.base.get(k, 0)
               for k in now if k.startswith("unevictable_pgs_")}
        out["nr_mlock"] = now["nr_mlock"]
        out["nr_unev"] = now["nr_unevictable"]
        out["inactive_anon"] = now["nr_inactive_anon"]
        out["inactive_file"] = now["nr_inactive_file"]
        return out

    async def pages(self, pid: int, name: str) -> list[PageInfo]:
        return await self.kernel.page_flags(self.mid, pid, *self.rng(pid, name))

    async def locked_vm(self, pid: int) -> int:
        return (await self.kernel.proc_status(self.mid, pid)).vm_lck_kb // 4


def sub(d: dict[str, int], **expected: int) -> dict[str, int]:
    """The entries of d named in expected (for compact assertions)."""
    return {k: d[k] for k in expected}


def race_once(monkeypatch: Any, owner: Any, name: str,
              action: Callable[[], Awaitable[object]], *, before: bool = False,
              when: Callable[[Any], bool] | None = None) -> list[object]:
    """Stage a race: the first call of coroutine function owner.name (whose result passes
    ``when``) runs ``action`` right after it returns (``before``: right before it runs).
    Returns a list that holds action's result once it ran."""
    original = getattr(owner, name)
    done: list[object] = []

    async def wrapper(*args: Any, **kw: Any) -> Any:
        if before and not done:
            done.append(None)
            done[0] = await action()
        result = await original(*args, **kw)
        if not before and not done and (when is None or when(result)):
            done.append(None)  # before awaiting: the action may call owner.name itself
            done[0] = await action()
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return done
