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
import time
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
        # running syscalls -> (name, start): what finish_running waits for, SIGUSR1 shows
        self._running: dict[asyncio.Task[Any], tuple[str, float]] = {}
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
            self._running[task] = (fn.__name__, time.monotonic())
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
        self._running.pop(task, None)
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

    def running(self, older_than: float = 0.0) -> list[dict[str, Any]]:
        """The syscalls running for more than ``older_than`` seconds, oldest first, each with
        where it waits (its chain of awaits, innermost last, with the lock or store key a
        frame holds in ``key``): what an operator needs when calls hang (SIGUSR1 logs it)."""
        now = time.monotonic()
        out = []
        for task, (name, t0) in sorted(self._running.items(), key=lambda kv: kv[1][1]):
            if now - t0 >= older_than and not task.done():
                out.append({"syscall": name, "seconds": round(now - t0, 3),
                            "awaiting": await_chain(task.get_coro())})
        return out

    async def finish_running(self, timeout: float = 30.0) -> None:
        """Wait for syscalls still running (server shutdown)."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)


def await_chain(coro: Any, limit: int = 40) -> list[str]:
    """file:line function [key] of each coroutine a suspended coroutine awaits, outermost
    first (Task.get_stack shows the outermost frame only)."""
    out: list[str] = []
    while coro is not None and len(out) < limit:
        frame = (getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                 or getattr(coro, "ag_frame", None))
        if frame is not None:
            key = frame.f_locals.get("key")
            where = f"{frame.f_code.co_filename.rsplit('/mmsvc/', 1)[-1]}:{frame.f_lineno}"
            out.append(f"{where} {frame.f_code.co_name}"
                       + (f" [{key}]" if isinstance(key, str) else ""))
        nxt = (getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
               or getattr(coro, "ag_await", None))
        if frame is not None and frame.f_code.co_name in ("__aenter__", "__aexit__"):
            # `async with` an asynccontextmanager: it awaits anext() of its generator,
            # which hides the generator; follow the generator itself
            nxt = getattr(frame.f_locals.get("self"), "gen", None) or nxt
        coro = nxt
    return out
