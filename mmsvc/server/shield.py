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


class ShieldedKernel:
    """Proxy: coroutine methods of ``inner`` run to completion whatever happens to the caller."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self._running: set[asyncio.Task[Any]] = set()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return self._shielded(attr)

    def _shielded(
        self, fn: Callable[..., Coroutine[Any, Any, Any]]
    ) -> Callable[..., Coroutine[Any, Any, Any]]:
        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> Any:
            task = asyncio.ensure_future(fn(*args, **kwargs))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            return await asyncio.shield(task)

        return call

    async def finish_running(self, timeout: float = 30.0) -> None:
        """Wait for syscalls still running (server shutdown)."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)
