"""Prometheus metrics: gRPC server metrics plus the emulated kernel's own statistics.

Metric names follow the go-grpc-prometheus conventions so that stock dashboards work:

* ``grpc_server_started_total{grpc_type,grpc_service,grpc_method}``
* ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``
* ``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}`` (histogram)

Kernel statistics are exported from snapshots pushed through :meth:`ServerMetrics.export_vmstat`,
:meth:`ServerMetrics.export_meminfo` and :meth:`ServerMetrics.export_lock_stat` (the server also
polls them periodically, see :meth:`ServerMetrics.poll_kernel`):

* ``mmsvc_vmstat{machine,counter}`` — /proc/vmstat values (gauge: the store owns the counter)
* ``mmsvc_meminfo{machine,field}`` — /proc/meminfo values (kB)
* ``mmsvc_lock_contentions_total``, ``mmsvc_lock_acquisitions_total``,
  ``mmsvc_lock_con_bounces_total``, ``mmsvc_lock_acq_bounces_total``,
  ``mmsvc_lock_wait_seconds_total``, ``mmsvc_lock_hold_seconds_total``,
  ``mmsvc_lock_wait_max_seconds``, ``mmsvc_lock_hold_max_seconds``
  — all labelled ``{machine,lock_class,instance}``; from /proc/lock_stat rows.

Every :class:`ServerMetrics` has its own registry, so several servers can live in one process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mmsvc.logging import get_logger
from mmsvc.mm.types import LockStatRow

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from mmsvc.mm.kernel import KernelAPI

log = get_logger("mmsvc.metrics")

# Emulated syscalls take from ~100 µs (Ping) to seconds (a large mlock over Redis).
HANDLING_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)

_US = 1e-6


class KernelStatsCollector(Collector):
    """Serves the latest pushed vmstat / meminfo / lock_stat snapshots per machine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vmstat: dict[str, dict[str, int]] = {}
        self._meminfo: dict[str, dict[str, int]] = {}
        self._lock_stat: dict[str, list[LockStatRow]] = {}

    def set_vmstat(self, machine: str, counters: Mapping[str, int]) -> None:
        with self._lock:
            self._vmstat[machine] = dict(counters)

    def set_meminfo(self, machine: str, fields: Mapping[str, int]) -> None:
        with self._lock:
            self._meminfo[machine] = dict(fields)

    def set_lock_stat(self, machine: str, rows: Sequence[LockStatRow]) -> None:
        with self._lock:
            self._lock_stat[machine] = list(rows)

    def forget(self, machine: str) -> None:
        with self._lock:
            self._vmstat.pop(machine, None)
            self._meminfo.pop(machine, None)
            self._lock_stat.pop(machine, None)

    def machines(self) -> set[str]:
        with self._lock:
            return set(self._vmstat) | set(self._meminfo) | set(self._lock_stat)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            vmstat = {m: dict(c) for m, c in self._vmstat.items()}
            meminfo = {m: dict(c) for m, c in self._meminfo.items()}
            lock_stat = {m: list(r) for m, r in self._lock_stat.items()}

        vm = GaugeMetricFamily(
            "mmsvc_vmstat", "/proc/vmstat of an emulated machine", labels=["machine", "counter"]
        )
        for machine, counters in sorted(vmstat.items()):
            for name, value in sorted(counters.items()):
                vm.add_metric([machine, name], float(value))
        yield vm

        mi = GaugeMetricFamily(
            "mmsvc_meminfo",
            "/proc/meminfo of an emulated machine (kB)",
            labels=["machine", "field"],
        )
        for machine, fields in sorted(meminfo.items()):
            for name, value in sorted(fields.items()):
                mi.add_metric([machine, name], float(value))
        yield mi

        yield from _lock_stat_metrics(lock_stat)


def _lock_stat_metrics(lock_stat: Mapping[str, Sequence[LockStatRow]]) -> Iterator[Metric]:
    labels = ["machine", "lock_class", "instance"]
    counters = {
        "contentions": CounterMetricFamily(
            "mmsvc_lock_contentions", "lock_stat contentions", labels=labels
        ),
        "acquisitions": CounterMetricFamily(
            "mmsvc_lock_acquisitions", "lock_stat acquisitions", labels=labels
        ),
        "con_bounces": CounterMetricFamily(
            "mmsvc_lock_con_bounces", "lock_stat con-bounces", labels=labels
        ),
        "acq_bounces": CounterMetricFamily(
            "mmsvc_lock_acq_bounces", "lock_stat acq-bounces", labels=labels
        ),
        "wait": CounterMetricFamily(
            "mmsvc_lock_wait_seconds", "lock_stat waittime-total", labels=labels
        ),
        "hold": CounterMetricFamily(
            "mmsvc_lock_hold_seconds", "lock_stat holdtime-total", labels=labels
        ),
    }
    wait_max = GaugeMetricFamily(
        "mmsvc_lock_wait_max_seconds", "lock_stat waittime-max", labels=labels
    )
    hold_max = GaugeMetricFamily(
        "mmsvc_lock_hold_max_seconds", "lock_stat holdtime-max", labels=labels
    )
    for machine, rows in sorted(lock_stat.items()):
        for r in rows:
            lv = [machine, r.lock_class, r.instance]
            counters["contentions"].add_metric(lv, float(r.contentions))
            counters["acquisitions"].add_metric(lv, float(r.acquisitions))
            counters["con_bounces"].add_metric(lv, float(r.con_bounces))
            counters["acq_bounces"].add_metric(lv, float(r.acq_bounces))
            counters["wait"].add_metric(lv, r.waittime_total * _US)
            counters["hold"].add_metric(lv, r.holdtime_total * _US)
            wait_max.add_metric(lv, r.waittime_max * _US)
            hold_max.add_metric(lv, r.holdtime_max * _US)
    yield from counters.values()
    yield wait_max
    yield hold_max


@dataclass
class MetricsHTTPServer:
    """A running /metrics endpoint."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class ServerMetrics:
    """gRPC server metrics plus the kernel-statistics hook, in a private registry."""

    def __init__(self, cpu: int = 0, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        rpc_labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            rpc_labels,
            registry=self.registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            [*rpc_labels, "grpc_code"],
            registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            rpc_labels,
            buckets=HANDLING_BUCKETS,
            registry=self.registry,
        )
        self.worker = Gauge(
            "mmsvc_worker_cpu", "The emulated CPU this worker process is", registry=self.registry
        )
        self.worker.set(cpu)
        self.task_migrations = Counter(
            "mmsvc_task_migrations",
            "Moves of tasks between this worker's CPUs at reschedule points (spec 10.1)",
            registry=self.registry,
        )
        self._migrations_seen = 0
        self.kernel_stats = KernelStatsCollector()
        self.registry.register(self.kernel_stats)

    # -- gRPC hooks (called by mmsvc.server.interceptors) ------------------------------------

    def rpc_started(self, grpc_type: str, service: str, method: str) -> None:
        self.started.labels(grpc_type, service, method).inc()

    def rpc_handled(
        self, grpc_type: str, service: str, method: str, code: str, seconds: float
    ) -> None:
        self.handled.labels(grpc_type, service, method, code).inc()
        self.handling_seconds.labels(grpc_type, service, method).observe(seconds)

    # -- kernel statistics hook ---------------------------------------------------------------

    def export_vmstat(self, machine: str, counters: Mapping[str, int]) -> None:
        """Publish a machine's /proc/vmstat snapshot."""
        self.kernel_stats.set_vmstat(machine, counters)

    def export_meminfo(self, machine: str, fields: Mapping[str, int]) -> None:
        """Publish a machine's /proc/meminfo snapshot."""
        self.kernel_stats.set_meminfo(machine, fields)

    def export_lock_stat(self, machine: str, rows: Sequence[LockStatRow]) -> None:
        """Publish a machine's /proc/lock_stat rows."""
        self.kernel_stats.set_lock_stat(machine, rows)

    def forget_machine(self, machine: str) -> None:
        """Stop exporting a (deleted) machine."""
        self.kernel_stats.forget(machine)

    async def export_from_kernel(self, kernel: KernelAPI) -> None:
        """Pull vmstat, meminfo and lock_stat of every machine from ``kernel`` once."""
        moved = getattr(kernel, "task_migrations", None)  # a worker of several CPUs
        if isinstance(moved, int) and moved > self._migrations_seen:
            self.task_migrations.inc(moved - self._migrations_seen)
            self._migrations_seen = moved
        machines = await kernel.list_machines()
        for gone in self.kernel_stats.machines() - set(machines):
            self.forget_machine(gone)
        for machine in machines:
            self.export_vmstat(machine, await kernel.vmstat(machine))
            self.export_meminfo(machine, await kernel.meminfo(machine))
            self.export_lock_stat(machine, await kernel.lock_stat(machine))

    async def poll_kernel(self, kernel: KernelAPI, interval: float) -> None:
        """Run :meth:`export_from_kernel` every ``interval`` seconds until cancelled."""
        while True:
            try:
                await self.export_from_kernel(kernel)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("metrics_poll_failed", exc_info=True)
            await asyncio.sleep(interval)

    # -- HTTP endpoint --------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "0.0.0.0") -> MetricsHTTPServer:
        """Serve ``/metrics`` on ``addr:port`` (port 0 picks a free port) in a thread."""
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        return MetricsHTTPServer(server, thread)
