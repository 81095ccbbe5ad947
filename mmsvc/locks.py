"""Client side of the store's distributed locks (DESIGN.md decision 3; Lua in mm/lua/locks.lua).

A lock is queued (FIFO, readers queue behind a waiting writer), leased (a dead holder's lease
expires and it is evicted), fenced (each grant has a token that data functions check) and
instrumented (every acquisition records contention, wait and hold time, and whether the
previous holder was another CPU, in /proc/lock_stat's columns).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from mmsvc.mm.errors import KernelError
from mmsvc.store.redis_store import RedisStore, text

DEFAULT_LEASE_MS = 30_000
_RENEWING: set[asyncio.Task[None]] = set()  # renewals in flight (tasks need a reference)


@dataclass
class Held:
    """A granted lock: the fencing token and what lock_stat needs at release."""

    key: str
    mode: str
    token: int
    contended: bool
    bounce: int
    wait_us: float
    granted_at: float
    stats: str | None = None  # statistics kept for a family of locks (page locks)
    # what a ``peek`` acquisition read with the grant (None: queued, not read)
    peeked: list[bytes] | None = field(default=None, repr=False, compare=False)
    renewal: asyncio.TimerHandle | None = field(default=None, repr=False, compare=False)


def granted(key: str, handed: str) -> tuple[str, str]:
    """The token and bounce a releaser handed a waiter; "gone": the machine was deleted."""
    if handed == "gone":
        raise KernelError("ESRCH", f"the machine was deleted while waiting for {key}")
    tok, bounce = handed.split("|")
    return tok, bounce


class Locks:
    """Acquire/release locks of the store on behalf of one CPU (worker).

    Every lock granted here is leased: a holder that keeps it for a third of the lease has it
    renewed (``lk_renew``) as long as this worker runs, so only a dead or stopped holder loses
    a lock to lease expiry - a live one that merely waits long (a convoy on a busy machine)
    keeps it, and nobody else is let in under it."""

    def __init__(self, store: RedisStore, cpu: int, lease_ms: int = DEFAULT_LEASE_MS) -> None:
        self.store = store
        self.cpu = cpu
        self.lease_ms = lease_ms
        self.renewals = 0

    def track(self, held: Held) -> Held:
        """Renew held's lease every third of a lease until it is released."""
        loop = asyncio.get_running_loop()
        held.renewal = loop.call_later(self.lease_ms / 3000, self._renew_later, held)
        return held

    def _renew_later(self, held: Held) -> None:
        task = asyncio.get_running_loop().create_task(self._renew(held))
        _RENEWING.add(task)
        task.add_done_callback(_RENEWING.discard)

    async def _renew(self, held: Held) -> None:
        if held.renewal is None:
            return  # released meanwhile
        try:
            still = int(await self.store.fcall("lk_renew", held.key, held.token, self.lease_ms))
        except Exception:
            still = 1  # the store is away: try again later, the lease may still hold
        if still and held.renewal is not None:
            self.renewals += 1
            held.renewal = asyncio.get_running_loop().call_later(
                self.lease_ms / 3000, self._renew_later, held)
        else:
            held.renewal = None  # released by a function of the store, or lost

    @staticmethod
    def untrack(held: Held) -> None:
        if held.renewal is not None:
            held.renewal.cancel()
            held.renewal = None

    async def try_acquire(self, key: str, mode: str = "w", stats: str | None = None) -> Held | None:
        """trylock: the lock now, or None (nothing queued)."""
        res = await self.store.fcall("lk_acquire", key, mode, self.cpu, "-", self.lease_ms,
                                     "try", stats or key)
        if int(res[0]) == 1:
            return self.track(Held(key, mode, int(res[1]), False, int(res[2]), 0.0,
                                   time.perf_counter(), stats))
        return None

    async def acquire(self, key: str, mode: str = "w", stats: str | None = None,
                      peek: tuple[str, str] | None = None) -> Held:
        """Take the lock, queued behind its holders.  ``peek`` (kind, key of the lock's
        slot): an uncontended grant also reads that set's members in the same round trip
        (Held.peeked); a queued one leaves the read to the caller."""
        wid = uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        extra = ("peek", *peek) if peek else ()
        res = await self.store.fcall("lk_acquire", key, mode, self.cpu, wid, self.lease_ms,
                                     *extra)
        if int(res[0]) == 1:
            return self.track(Held(key, mode, int(res[1]), False, int(res[2]), 0.0,
                                   time.perf_counter(), stats,
                                   peeked=list(res[3:]) if peek else None))
        tok, bounce = await self._wait(key, wid)
        now = time.perf_counter()
        return self.track(Held(key, mode, int(tok), True, int(bounce), (now - t0) * 1e6, now,
                               stats))

    async def _wait(self, key: str, wid: str) -> tuple[str, str]:
        """Wait, queued as wid, for the token a releaser hands us on our private list.

        A wait that ends without the token - timed out, or failed (a dropped connection, an
        exhausted connection pool) - leaves the queue: a waiter left behind would be granted
        the lock and hold it, unseen, until its lease ran out."""
        try:
            popped = await self.store.wait_list(f"{key}:w:{wid}", self.lease_ms / 1000)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.fcall("lk_cancel", key, wid, self.lease_ms)
            raise
        if popped is None:
            await self.store.fcall("lk_cancel", key, wid, self.lease_ms)
            raise KernelError("EAGAIN", f"timed out waiting for lock {key}")
        return granted(key, text(popped[1]))

    async def enter_mm(
        self, mm_key: str, mode: str, prefetch: tuple[int, int] | None = None
    ) -> tuple[Held, list[bytes], list[bytes], list[int] | None] | None:
        """mmap_lock + the address space (+ the ptes of a range) in one round trip; None when
        there is no such process.  A queued acquisition waits for its token, then loads."""
        wid = uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        extra = list(prefetch) if prefetch else []
        res = await self.store.fcall("mm_enter", mm_key, mode, self.cpu, wid, self.lease_ms,
                                     *extra)
        if int(res[0]) == -1:
            return None
        key = f"{mm_key}:mmap_lock"
        if int(res[0]) == 1:
            held = self.track(Held(key, mode, int(res[1]), False, int(res[2]), 0.0,
                                   time.perf_counter()))
            ptes = [int(x) for x in res[5]] if prefetch else None
            return held, list(res[3]), list(res[4]), ptes
        tok, bounce = await self._wait(key, wid)
        now = time.perf_counter()
        held = self.track(Held(key, mode, int(tok), True, int(bounce), (now - t0) * 1e6, now))
        try:
            pipe = self.store.client.pipeline(transaction=False)
            pipe.hgetall(f"{mm_key}:info")
            pipe.hgetall(f"{mm_key}:vma")
            info, vmas = await pipe.execute()
            ptes = None
            if prefetch:
                ptes = [int(x) for x in await self.store.fcall("pt_read", mm_key, *prefetch)]
        except BaseException:
            with contextlib.suppress(Exception):  # the caller never saw the lock: give it back
                await self.release(held)
            raise
        flat_info = [x for kv in info.items() for x in kv]
        flat_vmas = [x for kv in vmas.items() for x in kv]
        return held, flat_info, flat_vmas, ptes

    def release_args(self, held: Held) -> list[str | int]:
        """lk_release's arguments for held (for functions that release as their last step)."""
        hold_us = (time.perf_counter() - held.granted_at) * 1e6
        return [held.token, int(held.contended), held.bounce, f"{held.wait_us:.3f}",
                f"{hold_us:.3f}", self.lease_ms]

    async def release(self, held: Held) -> None:
        self.untrack(held)
        hold_us = (time.perf_counter() - held.granted_at) * 1e6
        await self.store.fcall(
            "lk_release", held.key, held.token, int(held.contended), held.bounce,
            f"{held.wait_us:.3f}", f"{hold_us:.3f}", self.lease_ms, held.stats or held.key,
        )

    @asynccontextmanager
    async def hold(
        self, key: str, mode: str = "w", stats: str | None = None,
        peek: tuple[str, str] | None = None,
    ) -> AsyncIterator[Held]:
        held = await self.acquire(key, mode, stats, peek)
        try:
            yield held
        finally:
            await self.release(held)
