"""Python client for the mmsvc gRPC service.

    from mmsvc_client import AsyncMmsvcClient, MmsvcClient, MmsvcError

Both clients expose one method per RPC with the signatures of
:class:`mmsvc.mm.kernel.KernelAPI` (plus ``ping`` and ``file_pages``), return the dataclasses
of :mod:`mmsvc.mm.types`, put a deadline on every call, retry idempotent calls on UNAVAILABLE,
and raise :class:`MmsvcError` (``errno``, ``message``, ``code``) on failure.
"""

from mmsvc_client._base import DEFAULT_TIMEOUT, NO_RETRY, RetryPolicy, TLSOptions
from mmsvc_client.aio import AsyncMmsvcClient
from mmsvc_client.errors import MmsvcError, from_rpc_error
from mmsvc_client.sync import MmsvcClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "AsyncMmsvcClient",
    "MmsvcClient",
    "MmsvcError",
    "RetryPolicy",
    "TLSOptions",
    "from_rpc_error",
]
