"""A syscall whose RPC is cancelled still completes: nothing is half applied."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.server.shield import ShieldedKernel


class SlowKernel:
    def __init__(self) -> None:
        self.steps: list[str] = []

    async def mlock(self, n: int) -> int:
        self.steps.append("start")
        await asyncio.sleep(0.05)
        self.steps.append("end")
        return n

    async def munlock(self) -> None:
        await asyncio.sleep(0.05)
        raise KernelError("ENOMEM", "not fully mapped")

    def plain(self) -> str:
        return "plain"


@pytest.mark.asyncio
async def test_cancelled_caller_does_not_cancel_the_syscall() -> None:
    inner = SlowKernel()
    k = ShieldedKernel(inner)
    caller = asyncio.ensure_future(k.mlock(3))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert inner.steps == ["start"]
    await k.finish_running()
    assert inner.steps == ["start", "end"]


@pytest.mark.asyncio
async def test_results_and_plain_attributes_pass_through() -> None:
    k = ShieldedKernel(SlowKernel())
    assert await k.mlock(5) == 5
    assert k.plain() == "plain"


@pytest.mark.asyncio
async def test_the_error_of_an_abandoned_syscall_is_not_left_unretrieved() -> None:
    # The fuzzer's server logs showed "Task exception was never retrieved" tracebacks: the
    # error of a syscall whose RPC had gone away was read by nobody.
    import gc

    unretrieved: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    try:
        k = ShieldedKernel(SlowKernel())
        caller = asyncio.ensure_future(k.munlock())
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await k.finish_running()
        await asyncio.sleep(0)
        del caller
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []
    # a caller still waiting gets the errno as before
    with pytest.raises(KernelError):
        await k.munlock()


@contextlib.asynccontextmanager
async def running_call(k: ShieldedKernel, call: Any) -> AsyncIterator[None]:
    """The syscall ``call`` running (its caller and the syscall cancelled afterwards)."""
    caller = asyncio.ensure_future(call)
    await asyncio.sleep(0.05)
    try:
        yield
    finally:
        caller.cancel()
        for task in list(k._running):
            task.cancel()
        await asyncio.sleep(0)


class LockWaiter:
    async def acquire(self, key: str) -> None:
        await asyncio.sleep(5)

    async def mlock(self, key: str) -> None:
        await self.acquire(key)


@pytest.mark.asyncio
async def test_running_syscalls_show_where_they_wait() -> None:
    # What SIGUSR1 logs (mmsvc.server.app.log_running_syscalls): each syscall running longer
    # than the threshold, with its chain of awaits down to the one it waits in.
    k = ShieldedKernel(LockWaiter())
    async with running_call(k, k.mlock("{m1:lv0}:lock")):
        assert k.running(older_than=10.0) == []
        (call,) = k.running(older_than=0.01)
    assert call["syscall"] == "mlock" and call["seconds"] >= 0.04
    chain = call["awaiting"]
    assert any(f.endswith("mlock [{m1:lv0}:lock]") for f in chain), chain
    assert any(" acquire [{m1:lv0}:lock]" in f for f in chain), chain
    assert chain[-1].endswith(" sleep"), chain


class ContextWaiter:
    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        await asyncio.sleep(5)
        yield

    async def munlock(self, key: str) -> None:
        async with self.hold(key):
            pass


@pytest.mark.asyncio
async def test_running_syscalls_follow_async_with() -> None:
    k = ShieldedKernel(ContextWaiter())
    async with running_call(k, k.munlock("{m1:mm2}:mmap_lock")):
        (call,) = k.running(older_than=0.01)
    chain = call["awaiting"]
    assert any(" hold [{m1:mm2}:mmap_lock]" in f for f in chain), chain
    assert chain[-1].endswith(" sleep"), chain
