"""Multi-worker serving: one process per emulated CPU.

``mmsvc serve --workers N --listen HOST:PORT`` starts N worker processes (multiprocessing
*spawn*).  Worker ``i`` is CPU ``i``:

* all workers listen on ``HOST:PORT`` with SO_REUSEPORT, so the kernel spreads *connections*
  across them (a gRPC channel is one connection, so all calls of one channel land on one
  worker until it reconnects);
* worker ``i`` also listens on ``HOST:PORT+1+i`` alone, so a client can pin itself to CPU ``i``
  (trace replay does this; so should anything that cares which CPU's batch it fills);
* with ``--metrics-port P`` worker ``i`` serves /metrics on ``P+i``.

The parent supervises: a worker that dies is restarted with the same CPU number (the kernel
drains a dead CPU's batches from the store); SIGINT/SIGTERM stop all workers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.process
import signal
import time
from dataclasses import dataclass
from types import FrameType

from mmsvc.logging import LogFormat, configure_logging, get_logger
from mmsvc.server.app import (
    build_server,
    join_host_port,
    redis_kernel_factory,
    run_until_signalled,
    split_host_port,
)
from mmsvc.server.security import ServerSecurity

log = get_logger("mmsvc.workers")


@dataclass(frozen=True)
class WorkerConfig:
    cpu: int
    redis_url: str
    listen: str
    extra_listen: tuple[str, ...]
    reuse_port: bool
    metrics_port: int | None
    log_format: LogFormat
    log_level: str
    #: TLS / mutual TLS / tenant tokens (file paths only: each worker reads the files itself)
    security: ServerSecurity | None = None
    #: emulated CPUs this worker runs: cpu .. cpu+cpus-1 (server/smp.py)
    cpus: int = 1


def worker_addresses(listen: str, workers: int) -> list[str]:
    """The private address of each worker: port+1+i on the listen host."""
    host, port = split_host_port(listen)
    if workers > 1 and port == 0:
        raise ValueError("--workers > 1 needs an explicit --listen port")
    return [join_host_port(host, port + 1 + i) for i in range(workers)]


def worker_configs(
    redis_url: str,
    listen: str,
    workers: int,
    metrics_port: int | None,
    log_format: LogFormat,
    log_level: str = "info",
    *,
    cpu_base: int = 0,
    security: ServerSecurity | None = None,
    cpus_per_worker: int = 1,
) -> list[WorkerConfig]:
    if workers == 1:
        return [
            WorkerConfig(cpu_base, redis_url, listen, (), False, metrics_port, log_format,
                         log_level, security=security, cpus=cpus_per_worker)
        ]
    private = worker_addresses(listen, workers)
    return [
        WorkerConfig(
            cpu=cpu_base + i * cpus_per_worker,
            cpus=cpus_per_worker,
            redis_url=redis_url,
            listen=listen,
            extra_listen=(private[i],),
            reuse_port=True,
            metrics_port=None if metrics_port is None else metrics_port + i,
            log_format=log_format,
            log_level=log_level,
            security=security,
        )
        for i in range(workers)
    ]


async def serve_worker(cfg: WorkerConfig) -> None:
    server = await build_server(
        redis_kernel_factory(cfg.redis_url, cfg.cpu, cfg.cpus),
        cfg.listen,
        cfg.metrics_port,
        extra_listen=cfg.extra_listen,
        reuse_port=cfg.reuse_port,
        cpu=cfg.cpu,
        security=cfg.security,
    )
    await run_until_signalled(server)


def worker_main(cfg: WorkerConfig) -> None:
    """Entry point of a worker process (also used in-process for a single worker)."""
    configure_logging(cfg.log_format, cfg.log_level)
    asyncio.run(serve_worker(cfg))


def run_workers(configs: list[WorkerConfig], restart_delay: float = 1.0) -> int:
    """Run one process per config and supervise them until SIGINT/SIGTERM; returns 0."""
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    stopping = False

    def start(cfg: WorkerConfig) -> None:
        p = ctx.Process(target=worker_main, args=(cfg,), name=f"mmsvc-cpu{cfg.cpu}")
        p.start()
        procs[cfg.cpu] = p
        log.info(
            "worker_started",
            cpu=cfg.cpu,
            pid=p.pid,
            listen=cfg.listen,
            private=list(cfg.extra_listen),
            metrics_port=cfg.metrics_port,
        )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for cfg in configs:
            start(cfg)
        by_cpu = {cfg.cpu: cfg for cfg in configs}
        while not stopping:
            time.sleep(0.2)
            for cpu, p in list(procs.items()):
                if not p.is_alive() and not stopping:
                    log.error("worker_died", cpu=cpu, exitcode=p.exitcode)
                    time.sleep(restart_delay)
                    start(by_cpu[cpu])
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()  # SIGTERM: graceful stop inside the worker
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for s, handler in old.items():
            signal.signal(s, handler)
    return 0
