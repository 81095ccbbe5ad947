"""The store's queued locks stay live when a holder or a waiter vanishes (mmsvc/locks.py,
mm/lua/locks.lua; DESIGN.md decision 3).

A holder whose release never reaches the store (a worker that died, a connection pool that ran
dry) loses the lock when its lease runs out; the waiters queued behind it must then get it - not
wait for a release that never comes while every later caller queues behind them (the fuzzer's
"process stall").  A waiter whose wait fails must leave the queue, or it would be granted the
lock and hold it, unseen, for a whole lease.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from mmsvc.locks import Locks
from mmsvc.store.redis_store import RedisStore, single_client

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    s = await RedisStore.connect(redis_url)
    try:
        yield s
    finally:
        await s.close()


def lock_key() -> str:
    return f"{{t{uuid.uuid4().hex[:8]}}}:mmap_lock"


async def test_waiters_behind_an_expired_holder_get_the_lock(store: RedisStore) -> None:
    key = lock_key()
    vanished = Locks(store, cpu=0, lease_ms=300)
    # never released, never renewed: its worker died (or its release was lost)
    Locks.untrack(await vanished.acquire(key))
    cpu1, cpu2 = Locks(store, cpu=1), Locks(store, cpu=2)
    first = asyncio.create_task(cpu1.acquire(key))
    await asyncio.sleep(0.5)  # the holder's lease has run out; cpu1 is queued
    # The next acquirer finds the expired holder: the queue moves on, cpu1 first (FIFO).
    second = asyncio.create_task(cpu2.acquire(key))
    held1 = await asyncio.wait_for(first, 3)
    assert held1.contended
    assert not second.done()
    await cpu1.release(held1)
    held2 = await asyncio.wait_for(second, 3)
    await cpu2.release(held2)
    stats = await store.client.hgetall(f"{key}:st")
    assert int(stats[b"expired"]) == 1


async def test_an_expired_holders_late_release_changes_nothing(store: RedisStore) -> None:
    key = lock_key()
    late = Locks(store, cpu=0, lease_ms=200)
    stale = await late.acquire(key)
    Locks.untrack(stale)  # its worker stopped (SIGSTOP) past its lease, then goes on
    await asyncio.sleep(0.3)
    other = Locks(store, cpu=1)
    held = await asyncio.wait_for(other.acquire(key), 3)
    await late.release(stale)  # fenced: its token is gone, the new holder keeps the lock
    assert await other.try_acquire(key) is None
    await other.release(held)
    again = await other.try_acquire(key)
    assert again is not None
    await other.release(again)


async def test_a_waiter_whose_wait_fails_leaves_the_queue(store: RedisStore) -> None:
    key = lock_key()
    cpu0, cpu1, cpu2 = (Locks(store, cpu=c) for c in range(3))
    held = await cpu0.acquire(key)
    waiter = asyncio.create_task(cpu1.acquire(key))
    await asyncio.sleep(0.2)
    assert await store.client.llen(f"{key}:q") == 1
    waiter.cancel()  # its wait ends without the token
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await store.client.llen(f"{key}:q") == 0
    await cpu0.release(held)
    # Nobody was granted the lock in the vanished waiter's place: it is free now.
    now = await cpu2.try_acquire(key)
    assert now is not None
    await cpu2.release(now)


async def all_waiters_get_the_lock(store: RedisStore, waiters: int) -> list[int]:
    """``waiters`` callers queue for one lock that CPU 0 holds; CPU 0 releases it; each
    caller gets it in turn (within 10 s).  Returns the CPUs in the order they held it."""
    key = lock_key()
    cpus = [Locks(store, cpu=c) for c in range(waiters + 1)]
    held = await cpus[0].acquire(key)
    order: list[int] = []

    async def take(c: int) -> None:
        async with cpus[c].hold(key):
            order.append(c)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(take(c)) for c in range(1, waiters + 1)]
    await asyncio.sleep(0.3)
    await cpus[0].release(held)  # needs a connection while the waits are blocked
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    return order


async def test_waiters_never_take_the_connections_a_release_needs(redis_url: str) -> None:
    # Two connections, six callers queued for one lock: each waits in BLPOP for up to a lease.
    small = await RedisStore.connect(redis_url, max_connections=2)
    try:
        assert sorted(await all_waiters_get_the_lock(small, 6)) == [1, 2, 3, 4, 5, 6]
    finally:
        await small.close()


async def test_more_waiters_than_wait_connections_all_get_the_lock(redis_url: str) -> None:
    # Eight callers queue for one lock while the waits client has two connections: the two
    # waits holding them must give them back in slices, or the waiter a release hands the token
    # to (one still waiting for a connection) would stall everybody for a whole 30 s lease.
    small = RedisStore(single_client(redis_url, 2), redis_url, waits=single_client(redis_url, 2),
                       wait_connections=2)
    small.wait_slice = 0.2
    try:
        await small.load_library()
        assert sorted(await all_waiters_get_the_lock(small, 8)) == list(range(1, 9))
    finally:
        await small.close()


async def test_a_live_holder_keeps_its_lock_past_the_lease(store: RedisStore) -> None:
    # A holder that merely takes long (waiting in a convoy) has its lease renewed: nobody is
    # let in under it, as a dead holder's waiters are.
    key = lock_key()
    slow = Locks(store, cpu=0, lease_ms=300)
    held = await slow.acquire(key)
    other = Locks(store, cpu=1)
    await asyncio.sleep(1.0)  # more than three leases
    assert await other.try_acquire(key) is None
    assert slow.renewals >= 3
    await slow.release(held)
    now = await other.try_acquire(key)
    assert now is not None
    await other.release(now)
    renewed = slow.renewals
    await asyncio.sleep(0.3)
    assert slow.renewals == renewed  # nothing renews a released lock
    assert await store.client.zcard(f"{key}:h") == 0
