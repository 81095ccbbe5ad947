"""The gRPC layer: thin servicers over the emulated kernel, health, reflection, interceptors."""

from mmsvc.server.app import (
    KernelFactory,
    MmsvcServer,
    build_server,
    embedded_server,
    redis_kernel_factory,
)

__all__ = [
    "KernelFactory",
    "MmsvcServer",
    "build_server",
    "embedded_server",
    "redis_kernel_factory",
]
