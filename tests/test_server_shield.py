"""A syscall whose RPC is cancelled still completes: nothing is half applied."""

from __future__ import annotations

import asyncio

import pytest

from mmsvc.server.shield import ShieldedKernel


class SlowKernel:
    def __init__(self) -> None:
        self.steps: list[str] = []

    async def mlock(self, n: int) -> int:
        self.steps.append("start")
        await asyncio.sleep(0.05)
        self.steps.append("end")
        return n

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
