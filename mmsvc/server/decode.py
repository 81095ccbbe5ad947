"""Request bodies that cannot be decoded: INVALID_ARGUMENT / EINVAL, never UNKNOWN.

grpc decodes a request with the method's deserializer before any handler, and before the
behaviour of any interceptor, runs.  A body that is not a valid protobuf message of the
method's request type (truncated or garbled bytes, a bad UTF-8 string, an overlong varint, a
length past the end, an unterminated group...) makes the deserializer raise, and grpc answers
UNKNOWN with the exception text ("Unexpected <class 'DecodeError'>: Error parsing message...").

:class:`DecodeGuardInterceptor` wraps the deserializer of every unary-request method so that a
failure yields an :class:`Undecodable` marker instead of an exception; its behaviour answers
the marker with INVALID_ARGUMENT, ErrorInfo reason ``EINVAL`` and a plain message, the way
:mod:`mmsvc.server.validate` refuses a bad field.  Register it last (innermost): the other
interceptors keep the handler's deserializer, so the tolerant one is the one grpc uses, and
they see the final INVALID_ARGUMENT like any other status.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import grpc.aio

from mmsvc.logging import get_logger
from mmsvc.server.errors import abort, build_status

Ctx = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the stubs

log = get_logger("mmsvc.server")

REASON = "EINVAL"


@dataclass(frozen=True)
class Undecodable:
    """Stands for a request body the method's deserializer refused."""

    method: str  # "/mmsvc.v1.MmService/Mlock"
    why: str


def _why(exc: Exception) -> str:
    """A plain reason (the protobuf library's message names its own internals)."""
    text = str(exc)
    if "UTF-8" in text:
        return "a string field is not valid UTF-8"
    if "recursion" in text.lower() or "depth" in text.lower():
        return "the message nests too deeply"
    return "the body is not a valid protobuf encoding"


def tolerant(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    """``deserializer`` returning :class:`Undecodable` instead of raising."""

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, and whatever a deserializer may raise
            return Undecodable(method, _why(exc))

    return decode


def undecodable_status(request: Undecodable) -> grpc.Status:
    message = f"cannot decode the request of {request.method}: {request.why}"
    return build_status(grpc.StatusCode.INVALID_ARGUMENT, message, REASON)


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable request bodies become INVALID_ARGUMENT / EINVAL (see the module doc)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # streamed requests are decoded message by message: left alone
        method = handler_call_details.method
        if isinstance(method, bytes):  # pragma: no cover - grpc passes str
            method = method.decode(errors="replace")
        des = tolerant(handler.request_deserializer, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary),
                request_deserializer=des,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream),
                request_deserializer=des,
                response_serializer=handler.response_serializer,
            )
        return handler  # pragma: no cover - a unary request has one of the two


async def _refuse(request: Undecodable, context: Ctx) -> None:
    log.debug("rpc_undecodable", method=request.method, why=request.why)
    await abort(context, undecodable_status(request))


def _guard_unary(inner: Callable[..., Any]) -> Callable[..., Any]:
    async def behaviour(request: Any, context: Ctx) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        result = inner(request, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    return behaviour


def _guard_stream(inner: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(inner):
        return _guard_unary(inner)  # a coroutine that answers with context.write()

    async def behaviour(request: Any, context: Ctx) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        async for item in inner(request, context):
            yield item

    return behaviour
