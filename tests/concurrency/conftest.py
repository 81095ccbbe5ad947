"""Fixtures of the concurrency tests (docs/concurrency.md).

* marker ``slow``: long runs, skipped unless selected with ``-m slow`` (any ``-m`` expression
  naming ``slow``) or ``MMSVC_SLOW=1`` in the environment.
* ``cluster2`` / ``cluster4`` (session): ``mmsvc serve --workers 2|4`` subprocesses against the
  session's ``redis_server`` (tests/conftest.py), each on a database of its own.
* ``driver2`` / ``driver4`` (function): an event loop with one client pinned to each worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mmsvc.store.embedded import EmbeddedRedis

from .cluster import Cluster, Driver, database_url, flush_database, free_port_block

HERE = Path(__file__).parent
# Database numbers of the clusters' stores (database 0 is FLUSHDB'd by other tests' fixtures).
CLUSTER_DB = {2: 11, 3: 12, 4: 13}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: long concurrency runs; deselected unless -m names 'slow' or "
        "MMSVC_SLOW=1"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr", "") or ""
    if "slow" in markexpr or os.environ.get("MMSVC_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or MMSVC_SLOW=1")
    for item in items:
        if item.get_closest_marker("slow") and HERE in Path(str(item.path)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster_factory(
    redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[int], Cluster]]:
    """cluster_factory(n): the session's n-worker server (started on first use)."""
    clusters: dict[int, Cluster] = {}
    logs = tmp_path_factory.mktemp("mmsvc-clusters")

    def get(workers: int) -> Cluster:
        c = clusters.get(workers)
        if c is not None and c.alive():
            return c
        url = database_url(redis_server.url, CLUSTER_DB[workers])
        flush_database(url)
        c = Cluster(workers, free_port_block(workers + 1), url, logs / f"serve-{workers}.log")
        clusters[workers] = c.start()
        return c

    try:
        yield get
    finally:
        for c in clusters.values():
            c.stop()


@pytest.fixture
def driver2(cluster_factory: Callable[[int], Cluster]) -> Iterator[Driver]:
    d = Driver(cluster_factory(2))
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def driver4(cluster_factory: Callable[[int], Cluster]) -> Iterator[Driver]:
    d = Driver(cluster_factory(4))
    try:
        yield d
    finally:
        d.close()
