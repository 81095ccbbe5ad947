"""Server interceptors: access log, Prometheus metrics, and a last-resort error guard.

Each interceptor wraps the method handler's behaviour (unary and streaming alike) so that it sees
the final status code of every RPC, including ones ended by ``context.abort()``.  Order them
``[AccessLogInterceptor, MetricsInterceptor, ErrorGuardInterceptor]`` (outermost first): the
guard turns stray exceptions into INTERNAL before the other two record the status.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import grpc.aio

from mmsvc.logging import get_logger
from mmsvc.metrics import ServerMetrics
from mmsvc.server.errors import (
    INTERNAL_MESSAGE,
    INTERNAL_REASON,
    STORE_DOWN,
    build_status,
    request_metadata,
    store_down_status,
)
from mmsvc.server.tenancy import CURRENT_TENANT

Ctx = grpc.aio.ServicerContext[Any, Any]
Behaviour = Callable[..., Any]

access_log = get_logger("mmsvc.access")
error_log = get_logger("mmsvc.server")

_SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)


@dataclass(frozen=True)
class RpcInfo:
    full_method: str  # "/mmsvc.v1.MmService/Mlock"
    service: str  # "mmsvc.v1.MmService"
    method: str  # "Mlock"
    grpc_type: str  # unary | client_stream | server_stream | bidi_stream


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in the stubs


def rpc_info(full_method: str, handler: Handler) -> RpcInfo:
    _, _, rest = full_method.partition("/")
    service, _, method = rest.rpartition("/")
    if handler.request_streaming and handler.response_streaming:
        kind = "bidi_stream"
    elif handler.request_streaming:
        kind = "client_stream"
    elif handler.response_streaming:
        kind = "server_stream"
    else:
        kind = "unary"
    return RpcInfo(full_method, service, method, kind)


def _final_code(context: Ctx, exc: BaseException | None) -> grpc.StatusCode:
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        code: grpc.StatusCode | None = context.code()
        if code is not None:
            return code
        return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base: calls :meth:`finished` once per RPC with its final status code and duration."""

    def started(self, info: RpcInfo) -> None:
        """Called when the behaviour starts."""

    def finished(
        self,
        info: RpcInfo,
        request: object,
        context: Ctx,
        code: grpc.StatusCode,
        seconds: float,
    ) -> None:
        """Called when the behaviour ends (normally, by abort, by exception or cancellation)."""

    async def guard(self, info: RpcInfo, request: object, context: Ctx, exc: Exception) -> None:
        """Called with an exception escaping the behaviour; re-raises by default."""
        raise exc

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        info = rpc_info(handler_call_details.method, handler)
        return self._wrap_handler(handler, info)

    # -- wrapping ------------------------------------------------------------------------------

    def _wrap_handler(self, h: Handler, info: RpcInfo) -> Handler:
        des, ser = h.request_deserializer, h.response_serializer
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(h.unary_unary, info, streaming_request=False),
                request_deserializer=des,
                response_serializer=ser,
            )
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap(h.unary_stream, info, streaming_request=False),
                request_deserializer=des,
                response_serializer=ser,
            )
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(h.stream_unary, info, streaming_request=True),
                request_deserializer=des,
                response_serializer=ser,
            )
        if h.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap(h.stream_stream, info, streaming_request=True),
                request_deserializer=des,
                response_serializer=ser,
            )
        return h  # pragma: no cover - grpc always sets one behaviour

    def _wrap(self, inner: Behaviour, info: RpcInfo, streaming_request: bool) -> Behaviour:
        interceptor = self

        def req_for_log(request: object) -> object:
            return None if streaming_request else request

        if inspect.isasyncgenfunction(inner):

            async def gen_wrapper(request: object, context: Ctx) -> AsyncIterator[object]:
                interceptor.started(info)
                t0 = time.perf_counter()
                exc: BaseException | None = None
                try:
                    try:
                        async for item in inner(request, context):
                            yield item
                    except grpc.aio.AbortError:
                        raise
                    except Exception as e:
                        await interceptor.guard(info, req_for_log(request), context, e)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    interceptor.finished(
                        info,
                        req_for_log(request),
                        context,
                        _final_code(context, exc),
                        time.perf_counter() - t0,
                    )

            return gen_wrapper

        async def wrapper(request: object, context: Ctx) -> object:
            interceptor.started(info)
            t0 = time.perf_counter()
            exc: BaseException | None = None
            try:
                try:
                    result = inner(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await interceptor.guard(info, req_for_log(request), context, e)
                    return None
            except BaseException as e:
                exc = e
                raise
            finally:
                interceptor.finished(
                    info,
                    req_for_log(request),
                    context,
                    _final_code(context, exc),
                    time.perf_counter() - t0,
                )

        return wrapper


class ErrorGuardInterceptor(WrappingInterceptor):
    """Turns any exception escaping a handler into INTERNAL with a generic message.

    The traceback is logged here; the client sees only "internal server error" (grpc's default
    would be UNKNOWN with the exception text in the status details).
    """

    async def guard(self, info: RpcInfo, request: object, context: Ctx, exc: Exception) -> None:
        meta = request_metadata(request)
        if isinstance(exc, STORE_DOWN):
            # the store stayed unreachable longer than the store client's retries: the
            # client may retry (UNAVAILABLE); the log line carries no traceback
            error_log.warning("rpc_store_unavailable", method=info.full_method,
                              error=type(exc).__name__, **meta)
            status = store_down_status(meta)
            await context.abort(status.code, status.details, status.trailing_metadata)
        error_log.error(
            "rpc_internal_error", method=info.full_method, exc_info=exc, **meta
        )
        status = build_status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, INTERNAL_REASON, meta)
        await context.abort(status.code, status.details, status.trailing_metadata)


class AccessLogInterceptor(WrappingInterceptor):
    """One structured log line per RPC: method, code, duration_ms, machine, pid, peer, cpu;
    and ``tenant`` when the server checks tenants (mmsvc.server.tenancy) and admitted one."""

    def __init__(self, cpu: int = 0) -> None:
        self.cpu = cpu

    def finished(
        self,
        info: RpcInfo,
        request: object,
        context: Ctx,
        code: grpc.StatusCode,
        seconds: float,
    ) -> None:
        meta = request_metadata(request)
        try:
            peer = context.peer()
        except Exception:  # pragma: no cover - peer() can fail on a dead call
            peer = ""
        log = access_log.error if code in _SERVER_FAULTS else access_log.info
        tenant = CURRENT_TENANT.get()
        extra = {"tenant": tenant} if tenant is not None else {}
        log(
            "rpc",
            method=info.full_method,
            code=code.name,
            duration_ms=round(seconds * 1000.0, 3),
            machine=meta.get("machine", ""),
            pid=int(meta.get("pid", 0)),
            cpu=self.cpu,
            peer=peer,
            **extra,
        )


class MetricsInterceptor(WrappingInterceptor):
    """grpc_server_started_total / grpc_server_handled_total / grpc_server_handling_seconds."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def started(self, info: RpcInfo) -> None:
        self.metrics.rpc_started(info.grpc_type, info.service, info.method)

    def finished(
        self,
        info: RpcInfo,
        request: object,
        context: Ctx,
        code: grpc.StatusCode,
        seconds: float,
    ) -> None:
        self.metrics.rpc_handled(info.grpc_type, info.service, info.method, code.name, seconds)
