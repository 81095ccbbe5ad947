"""Structured logging for mmsvc (structlog).

``configure_logging()`` picks the renderer: JSON lines when the output stream is not a TTY
(containers, CI, log shippers), a coloured console layout when it is.  Every module gets its
logger with :func:`get_logger`; the gRPC access log uses ``component="mmsvc.access"``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    fmt: LogFormat = "auto",
    level: str | int = "info",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and the stdlib root logger) for this process.

    ``fmt="auto"`` renders JSON unless ``stream`` (default: stdout) is a TTY.  Safe to call more
    than once; the last call wins.
    """
    out = stream if stream is not None else sys.stdout
    if isinstance(level, str):
        level = _LEVELS.get(level.lower(), logging.INFO)
    if fmt == "auto":
        isatty = getattr(out, "isatty", None)
        fmt = "console" if callable(isatty) and isatty() else "json"

    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        colors = _isatty(out)
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors,
            exception_formatter=(
                structlog.dev.RichTracebackFormatter(show_locals=False)
                if colors
                else structlog.dev.plain_traceback
            ),
        )

    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        # structured tracebacks, without local variables (they may hold request data)
        processors.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    processors.append(renderer)

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(
            file=_NeverFailingStream(out)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    # grpc and other libraries log through the stdlib: send them to the same stream.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mmsvc", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._mmsvc = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))


class _NeverFailingStream:
    """A log stream whose failures never reach the caller: a log line that cannot be written
    (the stream was closed, a broken pipe) must not fail the RPC that logged it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (ValueError, OSError):
            return 0

    def flush(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


def get_logger(name: str, **initial: Any) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger tagged with ``component=name`` (lazy: follows reconfiguration)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(
        component=name, **initial
    )
    return logger


def _default_configuration() -> None:
    """Until the application calls :func:`configure_logging`: INFO and up to stderr (never
    stdout, which belongs to command output such as ``mmsvc replay``'s JSON)."""
    if not structlog.is_configured():
        configure_logging("auto", "info", stream=sys.stderr)


_default_configuration()

