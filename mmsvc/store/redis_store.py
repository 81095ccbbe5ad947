"""Redis access for the emulated kernel: one client, the function library, typed calls.

The store is a single Redis server (``redis://``, ``rediss://``, ``unix://`` URLs) or a Redis
Cluster (``redis+cluster://``, ``rediss+cluster://``: see :mod:`mmsvc.store.cluster` and
docs/cluster.md).  Either way the kernel talks to :attr:`RedisStore.client`: every key carries
a hash tag (:mod:`mmsvc.store.keys`), every function call and MULTI touches one slot, and the
cluster client routes each command by its key and splits pipelines by node.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    MaxConnectionsError,
    ResponseError,
    TimeoutError,
)

from mmsvc.mm.library import LIBRARY_NAME, library_source
from mmsvc.store.cluster import cluster_client, is_cluster_url

FUNCTION_NOT_FOUND = "Function not found"

# Library functions registered with the 'no-writes' flag: no request id, nothing recorded.
READ_ONLY_FUNCTIONS = frozenset({"pc_peek", "mm_records", "pt_read", "mm_dump", "cpu_live",
                                 "pt_swap_read"})
_REQUEST_IDS = (f"{uuid.uuid4().hex[:10]}.{n:x}" for n in itertools.count())
STORE_RETRIES = 40
POOL_WAIT_SECONDS = 30.0
WAIT_SLICE_SECONDS = 1.0
# Lock waits may outnumber data calls (every queued call holds one): their client has more.
WAIT_CONNECTIONS_FACTOR = 4
STORE_RETRY_ERRORS: list[type[Exception]] = [ConnectionError, TimeoutError, BusyLoadingError]


class StoreRetry(Retry):
    """Retry, except what retrying cannot fix: a refused password or TLS verification
    (redis-py makes AuthenticationError a ConnectionError) fails at once."""

    async def call_with_retry(self, do: Any, fail: Any, is_retryable: Any = None,
                              with_failure_count: bool = False) -> Any:
        def retryable(exc: Exception) -> bool:
            if isinstance(exc, AuthenticationError | AuthorizationError):
                return False
            return is_retryable(exc) if is_retryable is not None else True

        return await super().call_with_retry(do, fail, retryable, with_failure_count)


def store_retry() -> Retry:
    """Retry policy of the store client: a dropped connection or a Redis restart (AOF
    reload: LOADING) is retried with jittered backoff for about half a minute, so a syscall in
    flight stalls and then completes instead of failing half way.  Writes are exactly-once
    (request ids), so retrying them is safe."""
    return StoreRetry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), STORE_RETRIES)


class RedisStore:
    """The page store.  Functions of the library are called with :meth:`fcall`."""

    def __init__(self, client: aioredis.Redis, url: str,
                 cluster: RedisCluster | None = None, waits: aioredis.Redis | None = None,
                 wait_connections: int = 256 * WAIT_CONNECTIONS_FACTOR) -> None:
        # On a cluster ``client`` is the RedisCluster itself.  It is typed as a Redis because
        # the kernel uses only commands both clients share with the same signatures (single
        # key or single slot commands, non-transactional pipelines, MULTI on one slot).
        self.client = client
        # Lock waiters block in BLPOP for up to a lease on a client of their own: however many
        # calls queue for a contended lock, the connections that holders need to release it
        # (and everybody else to work) are never taken by waits.
        self.waits = waits if waits is not None else client
        self.wait_slice = WAIT_SLICE_SECONDS
        # FIFO turns at the waits client's connections (asyncio's semaphore is fair): the
        # pool itself lets a waiter that just gave a connection back take it again at once,
        # ahead of those sleeping for one, and they would starve.
        self.wait_turns = asyncio.Semaphore(wait_connections)
        self.url = url
        self.cluster = cluster
        self.before_write: Callable[[], Awaitable[None]] | None = None

    @property
    def is_cluster(self) -> bool:
        return self.cluster is not None

    @classmethod
    async def connect(cls, url: str, *, max_connections: int = 256) -> RedisStore:
        """A store on ``url``: a Redis Cluster for ``redis+cluster://`` / ``rediss+cluster://``
        (max_connections per node), else one server; the library is loaded."""
        store: RedisStore
        if is_cluster_url(url):
            cluster = cluster_client(url, max_connections=max_connections)
            waits = cluster_client(url, max_connections=max_connections * WAIT_CONNECTIONS_FACTOR)
            store = cls(cast(aioredis.Redis, cluster), url, cluster,
                        cast(aioredis.Redis, waits), max_connections * WAIT_CONNECTIONS_FACTOR)
        else:
            # at start, a store that is not there (or refuses us) is an error now, not after
            # the half minute of retries that carries a running worker over a restart
            probe = aioredis.Redis.from_url(url, retry=Retry(NoBackoff(), 1))
            try:
                await probe.ping()
            finally:
                await probe.aclose()
            store = cls(single_client(url, max_connections), url,
                        waits=single_client(url, max_connections * WAIT_CONNECTIONS_FACTOR),
                        wait_connections=max_connections * WAIT_CONNECTIONS_FACTOR)
        try:
            if store.cluster is None:
                await store._refuse_cluster_node()
            await store.load_library()
        except BaseException:
            await store.close()
            raise
        return store

    async def _refuse_cluster_node(self) -> None:
        """A plain URL of a cluster node would fail later, at the first key of another node's
        slot (MOVED): say so now."""
        try:
            info = await self.client.info("cluster")
        except ResponseError:  # INFO not permitted: nothing to learn, carry on
            return
        if str(info.get("cluster_enabled", "0")) == "1":
            raise ValueError(
                f"{self.url} is a Redis Cluster node: use a redis+cluster:// (or "
                "rediss+cluster://) URL, see docs/cluster.md"
            )

    async def load_library(self) -> None:
        """Load (or replace) the function library; idempotent, safe from many workers.

        On a cluster it is loaded on every primary; each primary's replicas receive it by
        replication, so a replica promoted by a failover already has it."""
        source = library_source()
        try:
            if self.cluster is not None:
                await self.cluster.execute_command(
                    "FUNCTION LOAD", "REPLACE", source, target_nodes=RedisCluster.PRIMARIES
                )
            else:
                await self.client.function_load(source, replace=True)
        except ResponseError as exc:  # pragma: no cover - a bug in the Lua sources
            raise RuntimeError(f"loading the {LIBRARY_NAME} library failed: {exc}") from exc

    async def fcall(self, name: str, key: str, *args: Any) -> Any:
        """Call function ``name`` of the library on the node serving ``key``'s slot.

        A function that writes gets a fresh request id first (``register_once`` in
        lua/page.lua): when the client retries the call after a lost reply (a dropped
        connection, a Redis restart: see :func:`store_retry`), it is applied once."""
        if name not in READ_ONLY_FUNCTIONS:
            if self.before_write is not None:
                await self.before_write()  # e.g. a worker frozen past its CPU lease stops
            args = (next(_REQUEST_IDS), *args)
        try:
            return await self.client.fcall(name, 1, key, *args)
        except ResponseError as exc:
            if not str(exc).startswith(FUNCTION_NOT_FOUND):
                raise
        # A primary without the library: one added to the cluster (or a server restarted
        # empty) after this store loaded it.  Nothing ran, so loading it and calling again is
        # safe.
        await self.load_library()
        return await self.client.fcall(name, 1, key, *args)

    async def fcall2(self, name: str, key: str, key2: str, *args: Any) -> Any:
        """A writing function over two keys of different slots: only on a single Redis (see
        :attr:`is_cluster`), where one call may touch any key."""
        if self.cluster is not None:
            raise RuntimeError(f"{name}: two-slot calls need a single Redis, not a cluster")
        if self.before_write is not None:
            await self.before_write()
        args = (next(_REQUEST_IDS), *args)
        return await self.client.fcall(name, 2, key, key2, *args)

    async def scan_keys(self, match: str, count: int = 1000) -> AsyncIterator[bytes]:
        """Every key matching ``match``; on a cluster, of every primary (SCAN is per node)."""
        if self.cluster is not None:
            async for key in self.cluster.scan_iter(match=match, count=count):
                yield key
        else:
            async for key in self.client.scan_iter(match=match, count=count):
                yield key

    async def wait_list(self, key: str, timeout: float) -> list[bytes] | None:
        """BLPOP key (a lock waiter's private list): [key, value], or None after timeout s.

        The wait is cut into BLPOPs of at most WAIT_SLICE_SECONDS, each giving its connection
        back: when more calls wait than the waits client has connections, the waiter a
        release hands the token to may be one still waiting for a connection, and the
        connections' holders must not keep them for a whole lease (a 30 s stall of every
        waiter of the lock).  The token stays on the list until its owner pops it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            async with self.wait_turns:
                popped = await self.waits.blpop([key], timeout=min(left, self.wait_slice))
            if popped is not None:
                return cast("list[bytes]", popped)

    async def close(self) -> None:
        try:
            if self.waits is not self.client:
                await self.waits.aclose()
        finally:
            await self.client.aclose()


class WaitingConnectionPool(aioredis.ConnectionPool):
    """redis-py's pool, except that a caller finding all max_connections busy waits up to
    POOL_WAIT_SECONDS for one: the plain pool fails it at once, and outside the client's
    retry (a burst of calls would fail with "Too many connections").  redis-py's
    BlockingConnectionPool waits too, but costs ~20 µs more per command on the fast path."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + POOL_WAIT_SECONDS
        delay = 0.001
        while True:
            try:
                return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            except MaxConnectionsError:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)


def single_client(url: str, max_connections: int) -> aioredis.Redis:
    """A client of one Redis server whose callers wait for a connection when all
    max_connections are busy (WaitingConnectionPool)."""
    pool = WaitingConnectionPool.from_url(
        url, max_connections=max_connections,
        decode_responses=False, retry=store_retry(), retry_on_error=list(STORE_RETRY_ERRORS),
    )
    client = aioredis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True  # aclose() closes the pool too
    return client


def text(value: bytes | str) -> str:
    """A reply as str (the client returns bytes; typing allows both)."""
    return value.decode() if isinstance(value, bytes) else value
