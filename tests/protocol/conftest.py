"""Fixtures for protocol tests: a real redis-server started here, a fresh machine per test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from mmsvc.store.embedded import EmbeddedRedis

T = TypeVar("T")


@pytest.fixture(scope="session")
def protocol_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def run(protocol_redis: EmbeddedRedis) -> Callable[[Callable[..., Awaitable[T]]], T]:
    """run(scenario): scenario(world) is executed on a fresh World and its checker must pass."""
    from tests.protocol.world import World

    def runner(scenario: Callable[..., Awaitable[T]], **cfg: object) -> T:
        async def main() -> T:
            world = await World.create(protocol_redis.url, **cfg)
            try:
                result = await scenario(world)
                report = await world.kernel.check(world.mid, True)
                assert report.ok, report.violations
                return result
            finally:
                await world.close()

        return asyncio.run(main())

    return runner
