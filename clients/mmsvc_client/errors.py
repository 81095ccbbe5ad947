"""The client's single exception type, built from the server's google.rpc.ErrorInfo detail."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "mmsvc"


class MmsvcError(Exception):
    """An RPC failed.

    ``errno`` is the errno name the emulated syscall failed with (``"ENOMEM"``...), taken from
    the ErrorInfo ``reason``; ``None`` when the failure did not come from the service (transport
    errors, deadlines: see ``code``).  ``code`` is the gRPC status code, ``metadata`` the
    ErrorInfo metadata (``machine``, ``pid``, ``field`` for validation errors).
    """

    def __init__(
        self,
        errno: str | None,
        message: str,
        code: grpc.StatusCode,
        metadata: dict[str, str] | None = None,
    ) -> None:
        label = errno or code.name
        super().__init__(f"{label}: {message}")
        self.errno = errno
        self.message = message
        self.code = code
        self.metadata = dict(metadata or {})

    @property
    def machine(self) -> str | None:
        return self.metadata.get("machine")

    @property
    def pid(self) -> int | None:
        pid = self.metadata.get("pid")
        return int(pid) if pid is not None else None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.message, self.code, self.metadata))


def _error_info(
    trailing: Iterable[tuple[str, str | bytes]] | None,
) -> error_details_pb2.ErrorInfo | None:
    for key, value in trailing or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == DOMAIN:
                return info
    return None


def from_rpc_error(err: grpc.RpcError) -> MmsvcError:
    """Convert a sync or asyncio ``grpc.RpcError`` into :class:`MmsvcError`."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    trailing_fn = getattr(err, "trailing_metadata", None)
    code: grpc.StatusCode = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    message = (details_fn() if callable(details_fn) else None) or ""
    trailing = trailing_fn() if callable(trailing_fn) else None
    info = _error_info(trailing)
    if info is None:
        return MmsvcError(None, message or str(err), code)
    return MmsvcError(info.reason, message, code, dict(info.metadata))
