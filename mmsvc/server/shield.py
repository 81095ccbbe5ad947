"""Kernel calls that finish even when their RPC does not.

grpc.aio cancels a handler when its client goes away (deadline, dropped connection, a load
generator stopping).  An emulated syscall cancelled half way would leave the store half
applied: a mapping counted but no pte installed, a lock never released.  Every coroutine of
the kernel therefore runs as its own task, shielded from the RPC's cancellation; the RPC
reports CANCELLED while the syscall completes, as a real syscall completes after its caller
stopped listening.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from mmsvc.logging import get_logger
from mmsvc.mm.errors import KernelError

log = get_logger("mmsvc.server")

# Kernel methods that do not count as syscalls for stop_machine (the CPU's own lifecycle).
UNGATED = frozenset({"aclose", "cpu_online", "recover_dead_cpu", "finish_dead_walks"})


class ShieldedKernel:
    """Proxy: coroutine methods of ``inner`` run to completion whatever happens to the caller."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self._running: set[asyncio.Task[Any]] = set()
        self._abandoned: set[asyncio.Task[Any]] = set()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return self._shielded(attr)

    def _shielded(
        self, fn: Callable[..., Coroutine[Any, Any, Any]]
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        gate = getattr(self._inner, "gate", None)
        if gate is not None and fn.__name__ not in UNGATED:
            inner_fn = fn

            async def gated(*args: Any, **kwargs: Any) -> Any:
                async with gate.syscall():  # held while another CPU stops the machine
                    return await inner_fn(*args, **kwargs)

            fn = functools.wraps(inner_fn)(gated)

        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> Any:
            task = asyncio.ensure_future(fn(*args, **kwargs))
            self._running.add(task)
            task.add_done_callback(self._finished)
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                self._abandoned.add(task)  # the RPC went away; the syscall goes on
                raise

        return call

    def _finished(self, task: asyncio.Task[Any]) -> None:
        """A syscall ended.  When its RPC had been cancelled nobody reads its outcome: it is
        read and logged here (asyncio would print "Task exception was never retrieved" with
        a traceback, for what is mostly a plain errno after the caller's deadline)."""
        self._running.discard(task)
        abandoned = task in self._abandoned
        self._abandoned.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # read in every case: the shield may have let go of it
        if not abandoned or exc is None:
            return
        if isinstance(exc, KernelError):
            log.info("syscall_ended_after_cancel", errno=exc.errno)
        else:
            log.error("syscall_failed_after_cancel", exc_info=exc)

    async def finish_running(self, timeout: float = 30.0) -> None:
        """Wait for syscalls still running (server shutdown)."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)
