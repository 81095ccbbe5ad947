"""Settings shared by the asyncio and the blocking client."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from mmsvc.mm.types import PAGE_SIZE
from mmsvc.server.validate import MAX_VIEW_PAGES

#: Default deadline of every call, in seconds.
DEFAULT_TIMEOUT = 60.0
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
#: PageFlags requests are split into chunks of this many bytes.
PAGE_FLAGS_CHUNK = MAX_VIEW_PAGES * PAGE_SIZE


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent calls (views, Drain, Ping, Check, GetMachine, ListMachines).

    Only UNAVAILABLE is retried (the server was not reached or restarted); ``attempts`` counts
    the first call.  Backoff is exponential with full jitter.
    """

    attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    retry_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def backoff(self, attempt: int) -> float:
        """Sleep before retry number ``attempt`` (1-based)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(0, cap)


NO_RETRY = RetryPolicy(attempts=1)


def page_chunks(addr: int, length: int) -> list[tuple[int, int]]:
    """Split ``[addr, addr+length)`` into PageFlags-sized pieces."""
    if length <= PAGE_FLAGS_CHUNK:
        return [(addr, length)]
    out = []
    off = 0
    while off < length:
        n = min(PAGE_FLAGS_CHUNK, length - off)
        out.append((addr + off, n))
        off += n
    return out
