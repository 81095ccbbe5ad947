"""errno → gRPC status mapping and rich error details.

Every non-OK status the mmsvc service returns carries a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer with one ``google.rpc.ErrorInfo``:
``domain="mmsvc"``, ``reason=<errno name>`` (``"INTERNAL"`` for server faults) and metadata
``machine`` / ``pid`` (when the request had them).  Request-validation failures also carry a
``google.rpc.BadRequest`` naming the offending field.  docs/api.md documents the table below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import grpc
import grpc.aio
import redis.exceptions
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "mmsvc"
INTERNAL_REASON = "INTERNAL"
INTERNAL_MESSAGE = "internal server error"
#: Longest request value echoed into ErrorInfo metadata.  Ids are at most 256 characters (longer
#: ones are refused); the status details travel in a trailer, and a client refuses trailers
#: above 16 KiB (the call then ends RESOURCE_EXHAUSTED without any ErrorInfo).
MAX_ECHO_CHARS = 256
#: Longest status message (messages name at most a few bounded request values).
MAX_MESSAGE_CHARS = 1024

ERRNO_TO_CODE: Mapping[str, grpc.StatusCode] = {
    "EINVAL": grpc.StatusCode.INVALID_ARGUMENT,
    "EFAULT": grpc.StatusCode.INVALID_ARGUMENT,
    "E2BIG": grpc.StatusCode.INVALID_ARGUMENT,
    "EOVERFLOW": grpc.StatusCode.OUT_OF_RANGE,
    "ENOMEM": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "ENOSPC": grpc.StatusCode.RESOURCE_EXHAUSTED,
    # EAGAIN: "could not be done now, the same call may succeed later" (mlock could not lock
    # some pages, a page was busy during migration).  ABORTED rather than UNAVAILABLE: clients
    # and proxies retry UNAVAILABLE transparently, and these calls are not idempotent.
    "EAGAIN": grpc.StatusCode.ABORTED,
    "EPERM": grpc.StatusCode.PERMISSION_DENIED,
    "EACCES": grpc.StatusCode.PERMISSION_DENIED,
    "ESRCH": grpc.StatusCode.NOT_FOUND,
    "ENOENT": grpc.StatusCode.NOT_FOUND,
    "EBADF": grpc.StatusCode.NOT_FOUND,
    "EBUSY": grpc.StatusCode.FAILED_PRECONDITION,
    "ENODEV": grpc.StatusCode.FAILED_PRECONDITION,
    "EEXIST": grpc.StatusCode.ALREADY_EXISTS,
    "ENOTSUP": grpc.StatusCode.UNIMPLEMENTED,
}


#: The page store stayed unreachable longer than the store client's retries (a Redis restart
#: or failover that outlasts them): the call may be retried, UNAVAILABLE with reason EAGAIN.
STORE_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
              redis.exceptions.BusyLoadingError)
STORE_DOWN_MESSAGE = "page store unavailable"


def store_down_status(metadata: Mapping[str, str] | None = None) -> grpc.Status:
    return build_status(grpc.StatusCode.UNAVAILABLE, STORE_DOWN_MESSAGE, "EAGAIN", metadata)


def code_for_errno(errno: str) -> grpc.StatusCode:
    """The gRPC status code for an errno name (UNKNOWN for names not in the table)."""
    return ERRNO_TO_CODE.get(errno, grpc.StatusCode.UNKNOWN)


def _pack(msg: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(msg)
    return detail


def build_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    field: str | None = None,
) -> grpc.Status:
    """A ``grpc.Status`` whose trailers carry ``google.rpc.Status`` with an ErrorInfo."""
    message = _bounded(message, MAX_MESSAGE_CHARS)
    meta = {k: _bounded(v, MAX_ECHO_CHARS) for k, v in (metadata or {}).items()}
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=meta)
    details = [_pack(info)]
    if field is not None:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
            ]
        )
        details.append(_pack(bad))
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=details
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _bounded(text: str, limit: int) -> str:
    """``text``, cut to ``limit`` characters with a note of its real length."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text)} characters)"
    return text[: max(limit - len(note), 0)] + note


def request_metadata(request: object) -> dict[str, str]:
    """``machine`` and ``pid`` of a request, for ErrorInfo metadata and logs (a machine id
    longer than :data:`MAX_ECHO_CHARS`, which validation refuses, is cut)."""
    meta: dict[str, str] = {}
    machine = getattr(request, "machine", None)
    if isinstance(machine, str) and machine:
        meta["machine"] = _bounded(machine, MAX_ECHO_CHARS)
    pid = getattr(request, "pid", None)
    if isinstance(pid, int) and pid:
        meta["pid"] = str(pid)
    return meta


async def abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    """``context.abort()`` with ``status``; always raises.

    A call can end before its status is sent: its deadline passed while the request waited to
    be served, or the client went away.  grpc then fails the abort with an internal
    ``ExecuteBatchError``, which the interceptors would take for a server fault (an
    ``rpc_internal_error`` log line, an UNKNOWN in the metrics, "Abort already called" when
    the guard aborts again).  There is nobody left to tell: the call is reported CANCELLED.
    """
    try:
        await context.abort(status.code, status.details, status.trailing_metadata)
    except grpc.aio.AbortError:
        raise
    except Exception:
        if not context.done():
            raise
        raise asyncio.CancelledError("the call ended before its status was sent") from None
