"""Fixtures of the Redis Cluster tests (docs/cluster.md).

* ``redis_cluster`` (session): a real local Redis Cluster started for this session: 3 primaries
  with one replica each, ``redis-server`` processes on free loopback ports (never 6379, never a
  server the tests did not start), joined with ``redis-cli --cluster create``; stopped at the
  end.  Skipped without redis-server/redis-cli, unless ``CI`` is set (then it fails).
* ``cluster_url`` (session): its store URL, ``redis+cluster://host:port,host:port``.
* ``protocol_redis`` / ``run``: the protocol scenarios' fixtures (tests/protocol/conftest.py)
  with the cluster as their store, so test_protocol_on_cluster.py runs those scenarios as
  they are.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from mmsvc.store.embedded import EmbeddedRedisError, find_redis_server

# The protocol scenarios' runner, unchanged: it asks for ``protocol_redis``, overridden below.
from tests.protocol.conftest import run  # noqa: F401

from .redis_cluster import LocalClusterError, LocalRedisCluster, find_redis_cli


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    try:
        find_redis_cli(find_redis_server())
    except (EmbeddedRedisError, LocalClusterError) as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"), masters=3, replicas=1)
    cluster.start()
    try:
        assert all(n.port != 6379 for n in cluster.nodes)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def cluster_url(redis_cluster: LocalRedisCluster) -> str:
    return redis_cluster.url


@pytest.fixture(scope="session")
def protocol_redis(redis_cluster: LocalRedisCluster) -> LocalRedisCluster:
    """What the protocol runner needs of its server: ``.url``, here the cluster's."""
    return redis_cluster
