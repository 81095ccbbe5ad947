"""Redis access for the emulated kernel: one client, the function library, typed calls."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from mmsvc.mm.library import LIBRARY_NAME, library_source


class RedisStore:
    """The page store.  Functions of the library are called with :meth:`fcall`."""

    def __init__(self, client: aioredis.Redis, url: str) -> None:
        self.client = client
        self.url = url

    @classmethod
    async def connect(cls, url: str, *, max_connections: int = 256) -> RedisStore:
        client = aioredis.Redis.from_url(
            url, decode_responses=False, max_connections=max_connections
        )
        store = cls(client, url)
        await store.load_library()
        return store

    async def load_library(self) -> None:
        """Load (or replace) the function library; idempotent, safe from many workers."""
        source = library_source()
        try:
            await self.client.function_load(source, replace=True)
        except ResponseError as exc:  # pragma: no cover - a bug in the Lua sources
            raise RuntimeError(f"loading the {LIBRARY_NAME} library failed: {exc}") from exc

    async def fcall(self, name: str, key: str, *args: Any) -> Any:
        return await self.client.fcall(name, 1, key, *args)

    async def close(self) -> None:
        await self.client.aclose()


def text(value: bytes | str) -> str:
    """A reply as str (the client returns bytes; typing allows both)."""
    return value.decode() if isinstance(value, bytes) else value
