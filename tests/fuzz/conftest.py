"""Fixtures of the fuzz tests.

* ``real_client`` (function, async): an :class:`AsyncMmsvcClient` on an in-process server with
  the real kernel over the test session's ``redis-server`` (``redis_url``, tests/conftest.py).

The fuzzer itself lives in ``loadtests/fuzz.py`` (``python -m loadtests.fuzz``); the repository
root is put on ``sys.path`` so that the tests can import it.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from mmsvc.server.app import embedded_server
from mmsvc_client import AsyncMmsvcClient

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest_asyncio.fixture
async def real_client(redis_url: str) -> AsyncIterator[AsyncMmsvcClient]:
    async with (
        embedded_server(redis_url=redis_url) as server,
        AsyncMmsvcClient(f"127.0.0.1:{server.port}", timeout=60) as client,
    ):
        yield client
