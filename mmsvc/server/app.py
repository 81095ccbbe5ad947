"""Server assembly: the gRPC server of one worker (= one emulated CPU).

:func:`build_server` wires a KernelAPI object into a ``grpc.aio`` server with the MmService,
grpc.health.v1, server reflection, the interceptors and (optionally) a Prometheus endpoint.
:func:`redis_kernel_factory` is the single place where the real kernel is constructed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from mmsvc.logging import get_logger
from mmsvc.metrics import MetricsHTTPServer, ServerMetrics
from mmsvc.mm.kernel import KernelAPI
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2 as pb
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2_grpc as pb_grpc
from mmsvc.server.decode import DecodeGuardInterceptor
from mmsvc.server.interceptors import (
    AccessLogInterceptor,
    ErrorGuardInterceptor,
    MetricsInterceptor,
)
from mmsvc.server.security import ServerSecurity
from mmsvc.server.servicer import MmServicer
from mmsvc.server.tenancy import OwnershipStore, Tenancy, ownership_for

log = get_logger("mmsvc.server")

KernelFactory = Callable[[], KernelAPI | Awaitable[KernelAPI]]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["MmService"].full_name
#: Largest request/response (a PageFlags or FilePages answer can be large).
MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_POLL_SECONDS = 15.0


def redis_kernel_factory(redis_url: str, cpu: int, cpus: int = 1) -> KernelFactory:
    """The real kernel: ``mmsvc.mm.syscalls.Kernel(store, cpu)`` over a RedisStore; with
    ``cpus`` > 1 the CPUs cpu .. cpu+cpus-1 of one worker (server/smp.py).

    Imported lazily so that the server layer imports (and its tests run) on its own.
    """

    async def factory() -> KernelAPI:
        from mmsvc.mm.syscalls import Kernel
        from mmsvc.server.shield import ShieldedKernel
        from mmsvc.server.smp import SmpKernel, smp_kernels
        from mmsvc.store.redis_store import RedisStore

        store = await RedisStore.connect(redis_url)
        kernel: Kernel | SmpKernel
        if cpus > 1:
            kernel = SmpKernel(smp_kernels(store, list(range(cpu, cpu + cpus))))
        else:
            kernel = Kernel(store, cpu)
        await kernel.cpu_online()  # lease + hot-unplug of dead CPUs (mm/cpu_hotplug.py)
        return cast(KernelAPI, ShieldedKernel(kernel))

    return factory


def split_host_port(address: str) -> tuple[str, int]:
    """``"127.0.0.1:50051"`` / ``"[::]:50051"`` → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _maybe_close(obj: object) -> None:
    for name in ("aclose", "close"):
        fn = getattr(obj, name, None)
        if callable(fn):
            result = fn()
            if inspect.isawaitable(result):
                await result
            return


class MmsvcServer(grpc.aio.Server):
    """A ``grpc.aio.Server`` that also owns the kernel, health state and metrics endpoint.

    ``start()`` starts gRPC, marks health SERVING and starts the metrics endpoint (and its
    kernel-statistics poller); ``stop()`` undoes all of it and closes the kernel.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        kernel: KernelAPI,
        servicer: MmServicer,
        health: HealthServicer,
        ports: Sequence[int],
        metrics: ServerMetrics,
        metrics_port: int | None,
        metrics_addr: str,
        metrics_poll_interval: float | None,
        *,
        security: ServerSecurity | None = None,
    ) -> None:
        self._server = server
        self.security = security if security is not None else ServerSecurity()
        self.kernel = kernel
        self.servicer = servicer
        self.health = health
        self.ports = list(ports)
        self.metrics = metrics
        self._metrics_port = metrics_port
        self._metrics_addr = metrics_addr
        self._metrics_poll_interval = metrics_poll_interval
        self._metrics_http: MetricsHTTPServer | None = None
        self._poller: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        """The first (shared) listening port."""
        return self.ports[0]

    def running_syscalls(self, older_than: float = 0.0) -> list[dict[str, Any]]:
        """The kernel's syscalls running longer than ``older_than`` s (ShieldedKernel.running)."""
        running = getattr(self.kernel, "running", None)
        return list(running(older_than)) if callable(running) else []

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port (after start), or None when metrics are off."""
        return self._metrics_http.port if self._metrics_http is not None else None

    # grpc.aio.Server ----------------------------------------------------------------------

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        port = self._server.add_insecure_port(address)
        self.ports.append(port)
        return port

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        port = self._server.add_secure_port(address, server_credentials)
        self.ports.append(port)
        return port

    async def start(self) -> None:
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self._metrics_port is not None:
            self._metrics_http = self.metrics.serve(self._metrics_port, self._metrics_addr)
            if self._metrics_poll_interval:
                self._poller = asyncio.create_task(
                    self.metrics.poll_kernel(self.kernel, self._metrics_poll_interval)
                )
        log.info(
            "server_started",
            ports=self.ports,
            cpu=self.servicer.cpu,
            metrics_port=self.metrics_port,
            transport=self.security.mode,
            tenants=self.security.tenant_source or "single",
        )

    async def stop(self, grace: float | None) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.close)
            self._metrics_http = None
        finish = getattr(self.kernel, "finish_running", None)
        if finish is not None:
            await finish()  # syscalls whose RPC was cancelled still complete
        await _maybe_close(self.kernel)
        store = getattr(self.kernel, "store", None)
        if store is not None:
            await _maybe_close(store)
        log.info("server_stopped", cpu=self.servicer.cpu)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)


async def build_server(
    kernel_factory: KernelFactory,
    listen: str,
    metrics_port: int | None,
    *,
    extra_listen: Sequence[str] = (),
    reuse_port: bool = False,
    cpu: int | None = None,
    metrics_addr: str | None = None,
    metrics_poll_interval: float | None = DEFAULT_METRICS_POLL_SECONDS,
    access_log: bool = True,
    security: ServerSecurity | None = None,
    ownership: OwnershipStore | None = None,
) -> MmsvcServer:
    """Build (not start) the gRPC server of one worker.

    ``listen`` is ``HOST:PORT`` (port 0 picks a free one; see ``server.port``), ``extra_listen``
    more addresses (a worker's private port).  ``reuse_port`` sets SO_REUSEPORT so that several
    worker processes can share ``listen``; it is off by default so that a second server cannot
    silently share a port with a running one.  ``metrics_port`` (0 = free port) enables
    /metrics on ``metrics_addr`` (default: the listen host) and a poller exporting vmstat,
    meminfo and lock_stat every ``metrics_poll_interval`` seconds (None: push only).

    ``security`` (docs/security.md): a certificate and key put every address on TLS, a client
    CA makes it mutual TLS; with mutual TLS or tenant tokens every call is checked against the
    owner of the machine it names, recorded in ``ownership`` (default: the kernel's Redis
    store, or memory for a kernel without one).  Without it: plaintext, one implicit tenant.
    """
    security = security if security is not None else ServerSecurity()
    credentials = security.server_credentials()  # bad files fail here, before the kernel
    resolver = security.tenant_resolver()
    made = kernel_factory()
    kernel: KernelAPI = await made if inspect.isawaitable(made) else made
    the_cpu = cpu if cpu is not None else int(getattr(kernel, "cpu", 0))

    metrics = ServerMetrics(cpu=the_cpu)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if access_log:
        interceptors.append(AccessLogInterceptor(cpu=the_cpu))
    # DecodeGuard innermost: undecodable bodies are INVALID_ARGUMENT (mmsvc/server/decode.py)
    interceptors += [MetricsInterceptor(metrics), ErrorGuardInterceptor(), DecodeGuardInterceptor()]

    options = [
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)

    tenancy = (
        Tenancy(resolver, ownership if ownership is not None else ownership_for(kernel))
        if resolver is not None
        else None
    )
    servicer = MmServicer(kernel, cpu=the_cpu, tenancy=tenancy)
    pb_grpc.add_MmServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )

    ports: list[int] = []
    for address in (listen, *extra_listen):
        try:
            if credentials is not None:
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from e
        ports.append(port)

    host, _ = split_host_port(listen)
    return MmsvcServer(
        server,
        kernel,
        servicer,
        health,
        ports,
        metrics,
        metrics_port,
        metrics_addr if metrics_addr is not None else host,
        metrics_poll_interval,
        security=security,
    )


def log_running_syscalls(server: MmsvcServer, older_than: float = 1.0) -> None:
    running = server.running_syscalls(older_than)
    log.warning("syscalls_running", count=len(running))
    for call in running:
        log.warning("syscall_running", **call)


async def run_until_signalled(server: MmsvcServer, grace: float = 5.0) -> None:
    """Start ``server`` and serve until SIGINT/SIGTERM, then stop gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        # kill -USR1 <worker>: log the syscalls running for more than a second and where
        # each one waits (a hung call's lock, its store command)
        loop.add_signal_handler(signal.SIGUSR1, log_running_syscalls, server)
    await server.start()
    try:
        # (not wait_for_termination(): cancelling it would cancel grpc's own shutdown future)
        await stop.wait()
        log.info("server_stopping", grace_s=grace)
    finally:
        await server.stop(grace)


@contextlib.asynccontextmanager
async def embedded_server(
    kernel_factory: KernelFactory | None = None,
    redis_url: str | None = None,
    cpu: int = 0,
) -> AsyncIterator[MmsvcServer]:
    """An in-process server on a free loopback port, for ``replay`` and ``demo``.

    Without ``kernel_factory`` the real kernel is used, over ``redis_url`` or, without that, a
    private :class:`~mmsvc.store.embedded.EmbeddedRedis`.
    """
    from mmsvc.store.embedded import EmbeddedRedis

    redis: EmbeddedRedis | None = None
    try:
        if kernel_factory is None:
            if redis_url is None:
                redis = EmbeddedRedis().start()
                redis_url = redis.url
            kernel_factory = redis_kernel_factory(redis_url, cpu)
        server = await build_server(
            kernel_factory,
            "127.0.0.1:0",
            None,
            cpu=cpu,
            access_log=False,
        )
        await server.start()
        try:
            yield server
        finally:
            await server.stop(1.0)
    finally:
        if redis is not None:
            redis.stop()
