"""EmbeddedRedis: starts a private redis-server, answers, stops cleanly."""

from __future__ import annotations

import os

import pytest
import redis

from mmsvc.store.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    find_redis_server,
    free_port,
    ping,
)


@pytest.fixture(autouse=True)
def _need_redis_server() -> None:
    try:
        find_redis_server()
    except EmbeddedRedisError as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))


def test_start_stop_sync() -> None:
    r = EmbeddedRedis().start()
    try:
        assert r.running
        assert r.port != 6379
        assert r.url == f"redis://127.0.0.1:{r.port}/0"
        client = redis.Redis.from_url(r.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        # persistence is off
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        client.close()
        pid = r.pid
        assert pid is not None
    finally:
        r.stop()
    assert not r.running
    assert not ping("127.0.0.1", r.port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    r.stop()  # idempotent


def test_context_manager() -> None:
    with EmbeddedRedis() as r:
        assert ping("127.0.0.1", r.port)
        port = r.port
    assert not ping("127.0.0.1", port)
    with pytest.raises(EmbeddedRedisError):
        _ = r.url


@pytest.mark.asyncio
async def test_async_context_manager() -> None:
    import redis.asyncio as aioredis

    async with EmbeddedRedis() as r:
        client = aioredis.Redis.from_url(r.url)
        assert await client.ping()
        await client.aclose()
    assert not r.running


def test_two_instances_get_different_ports() -> None:
    with EmbeddedRedis() as a, EmbeddedRedis() as b:
        assert a.port != b.port
        assert ping("127.0.0.1", a.port) and ping("127.0.0.1", b.port)


def test_missing_executable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSVC_REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(EmbeddedRedisError):
        EmbeddedRedis().start()
    monkeypatch.delenv("MMSVC_REDIS_SERVER")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EmbeddedRedisError, match="apt-get install redis-server"):
        find_redis_server()


def test_port_in_use_fails_cleanly() -> None:
    with EmbeddedRedis() as a:
        b = EmbeddedRedis(port=a.port, startup_timeout=3)
        with pytest.raises(EmbeddedRedisError):
            b.start()
        assert not b.running
        assert ping("127.0.0.1", a.port)


def test_free_port_is_never_6379() -> None:
    assert all(free_port() != 6379 for _ in range(20))


def test_session_fixture(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0  # flushed for this test
    client.set(f"{key_prefix}x", 1)
    assert not redis_url.endswith(":6379/0")
    client.close()
