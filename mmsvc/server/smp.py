"""A worker process that runs several emulated CPUs (``mmsvc serve --cpus-per-worker K``).

Each CPU is a whole ``Kernel`` (its batches, lease, stop gate); :class:`SmpKernel` routes a
task's syscall to the CPU the task runs on (mm/sched.py).  At syscall entry - the return to
user space before it, a reschedule point - and at the reschedule points inside the syscall
the task may move to another of the worker's CPUs with the machine's
``task_migrate_permille`` (spec §10.1).  Calls that are not a task's (machines, views,
checks) run on the first CPU; Drain without ``all_cpus`` drains every CPU of this worker.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from mmsvc.mm.errors import KernelError
from mmsvc.mm.sched import TASK, RunQueues, TaskPlacement
from mmsvc.mm.syscalls import Kernel
from mmsvc.store.redis_store import RedisStore


def smp_kernels(store: RedisStore, cpus: list[int]) -> list[Kernel]:
    """The kernels of one worker's CPUs, joined (they share the store connection)."""
    rq = RunQueues()
    kernels: list[Kernel] = []
    for cpu in cpus:
        kernels.append(Kernel(store, cpu, runqueues=rq,
                              sibling=kernels[0] if kernels else None))
    return kernels


# Views of a task (/proc/PID/...) are read by another task: they neither place nor move it.
VIEWS = frozenset({"proc_status", "smaps", "page_flags"})


def _takes_pid(fn: Callable[..., Any]) -> bool:
    params = list(inspect.signature(fn).parameters)
    return len(params) >= 2 and params[:2] == ["machine", "pid"]


class SmpKernel:
    """KernelAPI over the CPUs of one worker (see the module docstring)."""

    gate = None  # each routed call is gated by the stop gate of the CPU it enters on

    def __init__(self, kernels: list[Kernel]) -> None:
        if not kernels:
            raise ValueError("a worker runs at least one CPU")
        self.kernels = kernels
        self.by_cpu = {k.cpu: k for k in kernels}
        self.cpu = kernels[0].cpu
        rq = kernels[0].swap.runqueues()
        if rq is None or set(rq.cpus) != set(self.by_cpu):
            raise ValueError("the kernels are not one worker's CPUs (smp_kernels)")
        self.runqueues = rq

    @property
    def task_migrations(self) -> int:
        """Moves of tasks between this worker's CPUs so far (a metric)."""
        return self.runqueues.migrations

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.kernels[0], name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        if _takes_pid(attr) and name not in VIEWS:
            return self._task_call(name)
        return self._first_cpu_call(name)

    # ------------------------------------------------------------------ routing -------
    def _first_cpu_call(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        kernel = self.kernels[0]
        fn = getattr(kernel, name)

        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> Any:
            async with kernel.gate.syscall():
                return await fn(*args, **kwargs)

        return call

    def _task_call(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
        rq = self.runqueues

        @functools.wraps(getattr(self.kernels[0], name))
        async def call(machine: str, pid: int, *args: Any, **kwargs: Any) -> Any:
            task = TaskPlacement(rq.place(machine, pid))
            with contextlib.suppress(KernelError):  # an unknown machine: the call says so
                m = await self.by_cpu[task.cpu].machine(machine)
                if rq.moves(m.cfg.task_migrate_permille):  # the return to user space
                    rq.move(task)
            kernel = self.by_cpu[task.cpu]
            token = TASK.set(task)
            try:
                async with kernel.gate.syscall():
                    result = await getattr(kernel, name)(machine, pid, *args, **kwargs)
            finally:
                TASK.reset(token)
                if name != "exit":
                    rq.placements[(machine, pid)] = task.cpu
            if name == "exit":
                rq.forget(machine, pid)
            elif name == "fork":
                rq.placements[(machine, int(result))] = task.cpu  # the child starts here
            return result

        return call

    # ------------------------------------------------------- every CPU of the worker -------
    async def drain(self, machine: str, all_cpus: bool) -> None:
        """Drain this worker's CPUs (lru_add_drain on each), or every CPU (all_cpus)."""
        if all_cpus:
            await self._first_cpu_call("drain")(machine, True)
            return
        for kernel in self.kernels:
            async with kernel.gate.syscall():
                await kernel.drain(machine, False)

    async def delete_machine(self, machine: str) -> None:
        await self._first_cpu_call("delete_machine")(machine)
        for kernel in self.kernels[1:]:
            kernel.forget_machine(machine)
        self.runqueues.forget(machine)

    async def cpu_online(self) -> None:
        for kernel in self.kernels:
            await kernel.cpu_online()
        # A frozen process notices at its next store write: every CPU's lease is checked
        # (they share the store; one hook).
        checks = [k.hotplug.watch.check for k in self.kernels if k.hotplug.watch is not None]

        async def before_write() -> None:
            for check in checks:
                await check()

        self.kernels[0].store.before_write = before_write

    async def aclose(self) -> None:
        for kernel in reversed(self.kernels):
            await kernel.aclose()
