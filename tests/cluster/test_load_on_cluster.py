"""A real ``mmsvc serve --workers 2`` on the Redis Cluster under a concurrent load.

Two client OS processes (tests/cluster/load.py), each with several concurrent tasks pinned to
the two workers (CPUs), run mmap / fault / mlock / fork / migrate / munlock / munmap / exit
lifecycles on a 2-node machine while reclaim runs on both nodes.  Then every CPU's batches are
drained and the §8.5 checker must find nothing, every process having exited (Q8); the server
log must hold no error (no CROSSSLOT, no INTERNAL answer), and every primary of the cluster
must have served function calls (the load really was spread over the slots).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest

from mmsvc.mm.types import FileSpec, MachineConfig
from mmsvc_client import MmsvcClient
from tests.concurrency.cluster import Cluster as Serve
from tests.concurrency.cluster import free_port_block, started
from tests.concurrency.invariants import final_violations

from .load import DATA_FILE, DATA_PAGES, SHM_FILE, SHM_PAGES, LoadSpec, client_process, summary
from .redis_cluster import LocalRedisCluster

CLIENT_PROCESSES = 2
# Things a cluster-unaware store would make Redis or redis-py say, and the gRPC status of a
# server-side failure: none may appear in the server log.
LOG_MARKERS = ("CROSSSLOT", "CrossSlot", "non local key", "hash to the same slot",
               "MOVED", "INTERNAL", "Traceback")


def primaries(cluster: LocalRedisCluster) -> list[str]:
    return sorted(a for a, role in cluster.roles().items() if role == "master")


def fcall_calls(cluster: LocalRedisCluster) -> dict[str, int]:
    """address -> FCALLs served so far (INFO commandstats)."""
    out: dict[str, int] = {}
    for address in primaries(cluster):
        with cluster.node(address).client() as c:
            stats = c.info("commandstats")
        out[address] = int(stats.get("cmdstat_fcall", {}).get("calls", 0))
    return out


def machine_keys(cluster: LocalRedisCluster, mid: str) -> dict[str, list[bytes]]:
    """address -> keys of machine ``mid`` on that primary (scanned node by node)."""
    out: dict[str, list[bytes]] = {}
    for address in primaries(cluster):
        with cluster.node(address).client() as c:
            out[address] = list(c.scan_iter(match=f"{{m{mid}[:}}]*", count=1000))
    return out


@pytest.fixture
def serve(redis_cluster: LocalRedisCluster,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    logs = tmp_path_factory.mktemp("serve-on-cluster")
    server = Serve(2, free_port_block(3), redis_cluster.url, logs / "serve.log")
    with started(server):
        yield server


def test_concurrent_load_on_the_cluster(redis_cluster: LocalRedisCluster, serve: Serve) -> None:
    before = fcall_calls(redis_cluster)
    with MmsvcClient(serve.target(0), timeout=30.0) as k:
        mid = k.create_machine(MachineConfig(nodes=2, frames_per_node=4096, name="on-cluster"))
        k.create_file(mid, FileSpec(DATA_FILE, DATA_PAGES, kind="regular"))
        k.create_file(mid, FileSpec(SHM_FILE, SHM_PAGES))

    specs = [LoadSpec([serve.target(0), serve.target(1)], mid, client=i, seed=int(time.time()))
             for i in range(CLIENT_PROCESSES)]
    t0 = time.monotonic()
    with ProcessPoolExecutor(CLIENT_PROCESSES,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(client_process, specs))
    elapsed = time.monotonic() - t0
    print(f"\nload on the cluster: {elapsed:.1f} s, {summary(results)}")

    faults = [f for r in results for f in r.faults]
    assert not faults, "\n".join(faults) + "\n--- server log ---\n" + serve.log_tail()
    assert sum(r.lifecycles for r in results) >= CLIENT_PROCESSES * 3
    assert sum(r.pages["migrated"] for r in results) > 0, "no page was migrated"

    with MmsvcClient(serve.target(1), timeout=60.0) as k:
        k.drain(mid, True)
        report = k.check(mid, True)
        vm = k.vmstat(mid)
        layout = machine_keys(redis_cluster, mid)
        k.delete_machine(mid)
    assert report.ok, report.violations
    assert final_violations(vm, report.known_exceptions.get("X4", 0)) == []

    # Every key carries a tag of this machine; the machine's data is spread over primaries.
    for keys in layout.values():
        for key in keys:
            tag = key[1:key.index(b"}")]
            assert tag == f"m{mid}".encode() or tag.startswith(f"m{mid}:".encode()), key
    assert sum(1 for keys in layout.values() if keys) >= 2, {a: len(k) for a, k in
                                                               layout.items()}
    assert not any(machine_keys(redis_cluster, mid).values()), "delete_machine left keys"

    after = fcall_calls(redis_cluster)
    assert all(after[a] > before.get(a, 0) for a in after), (before, after)

    log = serve.log_path.read_text(errors="replace")
    assert not [m for m in LOG_MARKERS if m in log], serve.log_tail()
    assert serve.server_errors() == []
    assert serve.alive(), "a worker or the supervisor died"

