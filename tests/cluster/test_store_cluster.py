"""The page store on a Redis Cluster: URL form, library on every node, routing, failover.

The URL tests need no server; the others use the session's local cluster (conftest.py).  The
failover test is last in this file: it leaves a replica promoted (later tests, if any, run on
the new topology).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from mmsvc.mm.library import LIBRARY_NAME, library_source
from mmsvc.store import keys
from mmsvc.store.cluster import is_cluster_url, parse_cluster_url
from mmsvc.store.redis_store import RedisStore
from tests.protocol.world import World, sub

from .redis_cluster import LocalRedisCluster, Node

# -- URL ---------------------------------------------------------------------------------------


def test_cluster_urls_are_recognised_by_scheme() -> None:
    assert is_cluster_url("redis+cluster://h:7000")
    assert is_cluster_url("rediss+cluster://h:7000")
    assert not is_cluster_url("redis://h:7000/0")
    assert not is_cluster_url("rediss://h:7000")
    assert not is_cluster_url("unix:///run/redis.sock")


@pytest.mark.parametrize(("url", "single", "seeds"), [
    ("redis+cluster://10.0.0.1:7000", "redis://10.0.0.1:7000", [("10.0.0.1", 7000)]),
    ("redis+cluster://a:7000,b:7001,c/0", "redis://a:7000",
     [("a", 7000), ("b", 7001), ("c", 6379)]),
    ("rediss+cluster://user:p%40ss@a:7000,b:7001?ssl_cert_reqs=none&socket_timeout=2",
     "rediss://user:p%40ss@a:7000?ssl_cert_reqs=none&socket_timeout=2",
     [("a", 7000), ("b", 7001)]),
    ("redis+cluster://[::1]:7000,[::1]:7001", "redis://[::1]:7000",
     [("::1", 7000), ("::1", 7001)]),
])
def test_cluster_url_parts(url: str, single: str, seeds: list[tuple[str, int]]) -> None:
    assert parse_cluster_url(url) == (single, seeds)


@pytest.mark.parametrize("url", [
    "redis://a:7000",  # not a cluster URL
    "redis+cluster://a:7000/3",  # a cluster has database 0 only
    "redis+cluster://a:7000,,b:7001",
    "redis+cluster://a:notaport",
    "redis+cluster://:7000",
])
def test_bad_cluster_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_cluster_url(url)


# -- on the cluster ----------------------------------------------------------------------------


def _library_on(node: Node) -> str | None:
    """The library's code on one node (None without it)."""
    with node.client() as c:
        libs: Any = c.execute_command("FUNCTION LIST", "WITHCODE", "LIBRARYNAME", LIBRARY_NAME)
    for lib in libs:
        fields = dict(zip(lib[::2], lib[1::2], strict=True))
        if fields[b"library_name"] == LIBRARY_NAME.encode():
            return str(fields[b"library_code"].decode())
    return None


def _wait_library_everywhere(cluster: LocalRedisCluster, timeout: float = 10.0) -> None:
    """Replicas receive FUNCTION LOAD by replication, asynchronously: wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [n.address for n in cluster.nodes if _library_on(n) != library_source()]
        if not missing:
            return
        assert time.monotonic() < deadline, f"library missing on {missing}"
        time.sleep(0.05)


def _getkeys_calls(cluster: LocalRedisCluster) -> int:
    total = 0
    for n in cluster.nodes:
        with n.client() as c:
            stats = c.info("commandstats")
        total += int(stats.get("cmdstat_command|getkeys", {}).get("calls", 0))
    return total


def test_connect_loads_the_library_on_every_primary_and_replicas_get_it(
    redis_cluster: LocalRedisCluster,
) -> None:
    async def main() -> None:
        store = await RedisStore.connect(redis_cluster.url)
        try:
            assert store.is_cluster and store.cluster is not None
            assert len(store.cluster.get_primaries()) == 3
        finally:
            await store.close()

    asyncio.run(main())
    _wait_library_everywhere(redis_cluster)


def test_a_plain_url_of_a_cluster_node_is_refused_with_a_hint(
    redis_cluster: LocalRedisCluster,
) -> None:
    url = f"redis://{redis_cluster.nodes[0].address}/0"
    with pytest.raises(ValueError, match=r"redis\+cluster://"):
        asyncio.run(RedisStore.connect(url))


def test_the_protocol_runner_here_is_on_the_cluster(run: Any) -> None:
    async def scenario(w: World) -> None:
        assert w.store.is_cluster
        pid = await w.proc()
        await w.mmap(pid, "a", 8)
        await w.touch(pid, "a")
        await w.mlock(pid, "a")
        await w.drain_all()
        assert sub(await w.delta(), mlocked=8, nr_mlock=8) == {"mlocked": 8, "nr_mlock": 8}

    run(scenario)


def test_fcall_is_routed_by_its_key_without_asking_a_server(
    redis_cluster: LocalRedisCluster,
) -> None:
    """redis-py would send COMMAND GETKEYS (twice) before every FCALL: the store's client
    reads the key from the call itself."""
    before = _getkeys_calls(redis_cluster)

    async def main() -> None:
        w = await World.create(redis_cluster.url)
        try:
            pid = await w.proc()
            await w.mmap(pid, "a", 16)
            await w.touch(pid, "a")
            await w.mlock(pid, "a")
            await w.munlock(pid, "a")
        finally:
            await w.close()

    asyncio.run(main())
    assert _getkeys_calls(redis_cluster) == before


def test_slots_keep_each_lruvec_and_each_address_space_together(
    redis_cluster: LocalRedisCluster,
) -> None:
    with redis_cluster.nodes[0].client() as c:
        def slot(key: str) -> int:
            return int(c.execute_command("CLUSTER KEYSLOT", key))

        lv = keys.lruvec("7", 3)
        lv_keys = ["meta", "pg:0", "pg:9", "free", "mlb:1", "lab:0", "lock", "lock:h",
                   "lock:q", "lock:st", "page_lock:5"]
        assert len({slot(f"{lv}:{s}") for s in lv_keys}) == 1
        mm = keys.mm("7", 42)
        mm_keys = ["info", "vma", "pt:3", "mmap_lock", "mmap_lock:h", "mmap_lock:w:x"]
        assert len({slot(f"{mm}:{s}") for s in mm_keys}) == 1
        # different objects are hashed independently (spread over the cluster)
        tags = [keys.machine("7"), lv, mm, keys.file("7", 1), keys.anon_vma("7", 1),
                keys.node("7", 0), keys.lruvec("7", 0), keys.mm("7", 1)]
        assert len({slot(t) for t in tags}) == len(tags)


def test_a_primary_without_the_library_gets_it_at_the_first_call(
    redis_cluster: LocalRedisCluster,
) -> None:
    """A primary that joined (or restarted empty) after the store loaded the library: the
    first FCALL it refuses makes the store load the library on every primary again."""

    async def main() -> None:
        w = await World.create(redis_cluster.url)
        try:
            pid = await w.proc()
            await w.mmap(pid, "a", 8)
            for n in redis_cluster.nodes:
                with n.client() as c:
                    if c.info("replication")["role"] == "master":
                        c.function_delete(LIBRARY_NAME)
            await w.touch(pid, "a")
            await w.mlock(pid, "a")
            await w.drain_all()
            assert (await w.delta())["nr_mlock"] == 8
            report = await w.kernel.check(w.mid, True)
            assert report.ok, report.violations
        finally:
            await w.close()

    asyncio.run(main())
    _wait_library_everywhere(redis_cluster)


def test_manual_failover_keeps_the_store_working(redis_cluster: LocalRedisCluster) -> None:
    """CLUSTER FAILOVER promotes a replica: it already has the library (replicated, never
    loaded there by the store), and a store connected before the failover follows the slots
    to the new primary."""
    replica = next(n for n in redis_cluster.nodes
                   if redis_cluster.roles()[n.address] == "slave")

    async def main() -> None:
        w = await World.create(redis_cluster.url)
        try:
            pids = [await w.proc() for _ in range(6)]  # mms spread over the primaries
            for pid in pids:
                await w.mmap(pid, "a", 8)
                await w.touch(pid, "a", 0, 4)

            with replica.client() as c:
                assert c.execute_command("CLUSTER FAILOVER") in (b"OK", "OK", True)
            deadline = time.monotonic() + 20
            while redis_cluster.roles()[replica.address] != "master":
                assert time.monotonic() < deadline, "the replica was not promoted"
                await asyncio.sleep(0.05)
            redis_cluster.wait_converged(20)
            assert _library_on(replica) == library_source()

            for pid in pids:
                await w.mlock(pid, "a")
                await w.touch(pid, "a", 4, 8)
                await w.munlock(pid, "a", 0, 2)
            await w.drain_all()
            assert (await w.delta())["nr_mlock"] == 6 * 6
            report = await w.kernel.check(w.mid, True)
            assert report.ok, report.violations
        finally:
            await w.close()

    asyncio.run(main())
