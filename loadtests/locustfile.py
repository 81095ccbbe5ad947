"""Locust load for mmsvc: many processes locking one shared file, then exiting (spec §9.9).

Each Locust user is a stream of emulated processes on one machine: create a process, map the
shared file, mlock it, touch a few private pages, exit - the "exit storm" workload the rework
was made for. Run the same load against a rework machine and a legacy machine and compare
exit latency and lock_stat (i_mmap_rwsem read holds, page locks, lruvec lock contention):

    mmsvc serve --listen 127.0.0.1:50051 --workers 2 &
    MMSVC_PROTOCOL=rework locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s \\
        --host 127.0.0.1:50051 --only-summary
    MMSVC_PROTOCOL=legacy locust -f loadtests/locustfile.py --headless ... (same)

Environment: MMSVC_PROTOCOL (rework|legacy), MMSVC_FILE_PAGES (default 64), MMSVC_BATCH
(mlock batch length, default 15), MMSVC_TASK_MIGRATE_PERMILLE (default 0: with a server run
with --cpus-per-worker K > 1, the probability that a task moves between the worker's CPUs at a
reschedule point, spec §10.1). At the end the machine's lock_stat and vmstat are printed
and the checker is run (drained); the machine is deleted.
Locust's master/worker mode (--master / --worker) spreads users over several processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc.experimental.gevent as grpc_gevent
from locust import User, between, events, task
from locust.env import Environment

from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    FileSpec,
    MachineConfig,
    MmapArgs,
    Protocol,
)
from mmsvc_client import MmsvcClient, MmsvcError

# Locust users are greenlets: without this, grpc's blocking calls would run them one at a time.
grpc_gevent.init_gevent()

T = TypeVar("T")
PAGE = 4096
FILE_PAGES = int(os.environ.get("MMSVC_FILE_PAGES", "64"))
PROTOCOL = os.environ.get("MMSVC_PROTOCOL", "rework")
BATCH = int(os.environ.get("MMSVC_BATCH", "15"))
TASK_MIGRATE_PERMILLE = int(os.environ.get("MMSVC_TASK_MIGRATE_PERMILLE", "0"))
STATE: dict[str, Any] = {}


def _target(host: str | None) -> str:
    return (host or "127.0.0.1:50051").removeprefix("grpc://")


@events.test_start.add_listener
def _create_machine(environment: Environment, **_: Any) -> None:
    with MmsvcClient(_target(environment.host)) as k:
        cfg = MachineConfig(protocol=Protocol(PROTOCOL), mlock_batch_len=BATCH,
                            lru_add_batch_len=BATCH, name=f"locust-{PROTOCOL}",
                            task_migrate_permille=TASK_MIGRATE_PERMILLE)
        mid = k.create_machine(cfg)
        k.create_file(mid, FileSpec("shared", FILE_PAGES, prefill=True))
        STATE["machine"] = mid


@events.test_stop.add_listener
def _report(environment: Environment, **_: Any) -> None:
    mid = STATE.get("machine")
    if mid is None:
        return
    with MmsvcClient(_target(environment.host), timeout=300) as k:
        report = k.check(mid, True)
        vm = k.vmstat(mid)
        print(f"\nmachine {mid} ({PROTOCOL}): checker "
              f"{'OK' if not report.violations else report.violations[:5]}")
        for name in ("unevictable_pgs_mlocked", "unevictable_pgs_munlocked",
                     "unevictable_pgs_culled", "unevictable_pgs_rescued",
                     "unevictable_pgs_stranded", "unevictable_pgs_cleared"):
            print(f"  {name:28} {vm.get(name, 0)}")
        # lock_stat summed per class (per-process locks have one row per process)
        totals: dict[str, list[float]] = {}
        for r in k.lock_stat(mid):
            t = totals.setdefault(r.lock_class, [0, 0, 0.0, 0.0, 0.0, 0])
            t[0] += r.acquisitions
            t[1] += r.contentions
            t[2] += r.waittime_total
            t[3] += r.holdtime_total
            t[4] = max(t[4], r.waittime_max)
            t[5] += r.acq_bounces  # taken on another CPU than the previous holder's
        print(f"  {'lock class':14} {'acquisitions':>12} {'bounces':>8} {'contentions':>11} "
              f"{'wait avg us':>11} {'wait max us':>11} {'hold avg us':>11}")
        for cls, (acq, cont, wait, hold, wmax, bounces) in sorted(totals.items()):
            if acq:
                print(f"  {cls:14} {int(acq):12} {int(bounces):8} {int(cont):11} "
                      f"{wait / cont if cont else 0:11.1f} {wmax:11.1f} {hold / acq:11.1f}")
        k.delete_machine(mid)


class Process(User):
    """One emulated process after another: map the shared file, mlock it, work, exit."""

    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.k = MmsvcClient(_target(self.host), timeout=120)

    def on_stop(self) -> None:
        self.k.close()

    def _call(self, name: str, fn: Callable[[], T]) -> T | None:
        start = time.perf_counter()
        exc: BaseException | None = None
        result: T | None = None
        try:
            result = fn()
        except MmsvcError as e:
            exc = e
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - start) * 1000,
            response_length=0, exception=exc, context={},
        )
        return result

    @task
    def lifetime(self) -> None:
        mid = STATE["machine"]
        pid = self._call("CreateProcess", lambda: self.k.create_process(mid))
        if pid is None:
            return
        shared = self._call("Mmap(shared file)", lambda: self.k.mmap(
            mid, pid, MmapArgs(FILE_PAGES * PAGE, 1, MAP_SHARED, file="shared")))
        if shared is not None:
            self._call("Mlock(shared file)", lambda: self.k.mlock(mid, pid, shared,
                                                                   FILE_PAGES * PAGE))
        anon = self._call("Mmap(anon)", lambda: self.k.mmap(
            mid, pid, MmapArgs(8 * PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS)))
        if anon is not None:
            self._call("Fault(anon)", lambda: self.k.fault(mid, pid, anon, 8 * PAGE, True))
        self._call("Exit", lambda: self.k.exit(mid, pid))
