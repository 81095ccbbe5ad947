"""The page store behind Redis AUTH, an ACL user and TLS, and no secret in logs or argv.

Each test starts its own redis-server (never the session one, whose configuration other tests
rely on), turns authentication on, and runs the real kernel over a URL that carries the
credentials.  The multi-worker test runs ``mmsvc serve`` as a child process with mutual TLS and
checks the command lines of the server and its workers and everything they logged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from test_security_tenancy import Pki, make_pki

from mmsvc.cli.main import _store_url
from mmsvc.mm.types import MAP_ANONYMOUS, MAP_PRIVATE, MmapArgs
from mmsvc.server.app import build_server, redis_kernel_factory
from mmsvc.server.security import SecurityError, redact_url, url_password, url_with_password
from mmsvc.store.embedded import EmbeddedRedis, free_port
from mmsvc_client import AsyncMmsvcClient, MmsvcClient, MmsvcError

PASSWORD = "s3cr3t-Pa55/w0rd%"  # '/' and '%' must survive URL encoding
ADMIN_PASSWORD = "admin-only-0x5eed"
USER = "mmsvc"


def quoted(pw: str) -> str:
    from urllib.parse import quote

    return quote(pw, safe="")


def secure(r: EmbeddedRedis) -> None:
    """An ACL user for mmsvc; the default user gets a password (requirepass) of its own."""
    admin = redis.Redis(host=r.host, port=r.port)
    try:
        admin.execute_command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
        admin.config_set("requirepass", ADMIN_PASSWORD)
    finally:
        admin.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-redis"))


@pytest.fixture
def auth_redis() -> Iterator[EmbeddedRedis]:
    r = EmbeddedRedis().start()
    try:
        secure(r)
        yield r
    finally:
        r.stop()


async def kernel_round_trip(url: str) -> None:
    """A real server over ``url``: one machine, one process, one mlock."""
    server = await build_server(
        redis_kernel_factory(url, 0), "127.0.0.1:0", None, metrics_poll_interval=None,
        access_log=False,
    )
    await server.start()
    try:
        async with AsyncMmsvcClient(f"127.0.0.1:{server.port}", timeout=10) as k:
            m = await k.create_machine()
            pid = await k.create_process(m)
            addr = await k.mmap(m, pid, MmapArgs(4096, 3, MAP_PRIVATE | MAP_ANONYMOUS))
            await k.mlock(m, pid, addr, 4096)
            assert (await k.proc_status(m, pid)).vm_lck_kb == 4
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_acl_user_and_requirepass(auth_redis: EmbeddedRedis) -> None:
    hostport = f"{auth_redis.host}:{auth_redis.port}"
    await kernel_round_trip(f"redis://{USER}:{quoted(PASSWORD)}@{hostport}/0")
    await kernel_round_trip(f"redis://:{ADMIN_PASSWORD}@{hostport}/0")  # requirepass

    # Refusals, through the same redis-py URL parsing (not through the store, which retries
    # connection errors - AuthenticationError is one - for half a minute)
    for url in (
        f"redis://{USER}:wrong-{quoted(PASSWORD)}@{hostport}/0",
        f"redis://{hostport}/0",
    ):
        client = aioredis.Redis.from_url(url)
        try:
            with pytest.raises(redis.exceptions.RedisError) as err:
                await client.set("k", "v")
        finally:
            await client.aclose()
        assert isinstance(err.value, redis.exceptions.AuthenticationError) or str(
            err.value
        ).startswith("Authentication required")
        assert PASSWORD not in str(err.value) and quoted(PASSWORD) not in str(err.value)


@pytest.mark.asyncio
async def test_tls_store_with_client_certificate(pki: Pki) -> None:
    tls_port = free_port()
    r = EmbeddedRedis(extra_args=(
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "yes",  # redis requires a client certificate
    ))
    try:
        r.start()
    except Exception as e:  # pragma: no cover - a redis-server built without TLS
        pytest.skip(f"redis-server without TLS support: {e}")
    try:
        secure(r)
        cert, key = pki.client("tenant-a")
        base = f"rediss://{USER}:{quoted(PASSWORD)}@127.0.0.1:{tls_port}/0?ssl_ca_certs={pki.ca}"
        await kernel_round_trip(f"{base}&ssl_certfile={cert}&ssl_keyfile={key}")
        client = aioredis.Redis.from_url(base)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):  # no client certificate
                await client.ping()
        finally:
            await client.aclose()
    finally:
        r.stop()


def test_redact_url() -> None:
    cases = {
        f"redis://{USER}:{quoted(PASSWORD)}@h:1/0": "redis://mmsvc:***@h:1/0",
        f"redis://:{ADMIN_PASSWORD}@h:1/0": "redis://:***@h:1/0",
        "redis://h:1/0": "redis://h:1/0",
        "redis://user@h:1/0": "redis://user@h:1/0",
        f"rediss://u:{PASSWORD}@h:1/0?ssl_ca_certs=/ca.pem&ssl_password={PASSWORD}":
            "rediss://u:***@h:1/0?ssl_ca_certs=/ca.pem&ssl_password=***",
        f"rediss://u:{quoted(PASSWORD)}@h:1/0?ssl_cert_reqs=required":
            "rediss://u:***@h:1/0?ssl_cert_reqs=required",
        f"redis+cluster://u:{PASSWORD}@a:1,b:2/0": "redis+cluster://u:***@a:1,b:2/0",
        "redis://u:p@ss#wo?rd@h:1/0": "redis://u:***@h:1/0",
        "unix://:pw@/run/redis.sock?db=0": "unix://:***@/run/redis.sock?db=0",
        "not a url": "***",
    }
    for url, redacted in cases.items():
        assert redact_url(url) == redacted
    with_pw = url_with_password(f"redis://{USER}@h:1/0", PASSWORD)
    assert with_pw == f"redis://{USER}:{quoted(PASSWORD)}@h:1/0"
    assert redis.connection.parse_url(with_pw)["password"] == PASSWORD
    with pytest.raises(SecurityError):
        url_with_password(with_pw, "again")
    assert url_password(f"redis://u:{PASSWORD}@h:1/0") is not None
    assert url_password("redis://u@h:1/0") is None and url_password("redis://h:1/0") is None


def test_store_url_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def args(**kw: Any) -> SimpleNamespace:
        return SimpleNamespace(**{"redis": None, "redis_password_file": None, **kw})

    monkeypatch.delenv("MMSVC_REDIS_URL", raising=False)
    monkeypatch.delenv("MMSVC_REDIS_PASSWORD", raising=False)
    assert _store_url(args()) is None  # embedded
    monkeypatch.setenv("MMSVC_REDIS_URL", "redis://u@h:1/0")
    assert _store_url(args()) == "redis://u@h:1/0"
    monkeypatch.setenv("MMSVC_REDIS_PASSWORD", PASSWORD)
    assert _store_url(args()) == f"redis://u:{quoted(PASSWORD)}@h:1/0"
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file\n")
    assert _store_url(args(redis_password_file=str(pw_file))) == "redis://u:from-file@h:1/0"
    monkeypatch.delenv("MMSVC_REDIS_URL")
    with pytest.raises(SecurityError):
        _store_url(args())  # a password but no URL


def _free_block(n: int) -> int:
    """A port P such that P..P+n-1 look free."""
    import socket

    for _ in range(50):
        base = free_port()
        ok = base + n < 65535
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return base
    raise RuntimeError("no free port block")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> str:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()


def _wait_ready(target: str, pki: Pki, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mmsvc serve exited"
        try:
            with MmsvcClient(target, timeout=1, tls=pki.tls("tenant-a")) as k:
                k.ping()
                return
        except MmsvcError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing answers on {target}")


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_serve_workers_mtls_password_never_shown(
    auth_redis: EmbeddedRedis, pki: Pki, tmp_path: Path
) -> None:
    """mmsvc serve --workers 2 over an ACL user: the password comes from a file and reaches
    the workers through their spawn pipe; TLS reaches every worker; ownership is shared."""
    pw_file = tmp_path / "redis-password"
    pw_file.write_text(PASSWORD + "\n")
    base = _free_block(3)
    log_path = tmp_path / "serve.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MMSVC_REDIS_URL": f"redis://{USER}@{auth_redis.host}:{auth_redis.port}/0",
        "MMSVC_TLS_CERT": str(pki.server_cert),
        "MMSVC_TLS_KEY": str(pki.server_key),
        "MMSVC_TLS_CLIENT_CA": str(pki.ca),
    }
    env.pop("MMSVC_REDIS_PASSWORD", None)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmsvc.cli.main", "serve", "--listen", f"127.0.0.1:{base}",
             "--workers", "2", "--log-format", "json", "--redis-password-file", str(pw_file)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    try:
        for port in (base + 1, base + 2):
            _wait_ready(f"127.0.0.1:{port}", pki, proc)
        for pid in (proc.pid, *_children(proc.pid)):
            assert PASSWORD not in _cmdline(pid) and quoted(PASSWORD) not in _cmdline(pid)
        assert len(_children(proc.pid)) >= 2  # the workers (and multiprocessing's helper)

        with (
            MmsvcClient(f"127.0.0.1:{base + 1}", tls=pki.tls("tenant-a")) as a0,
            MmsvcClient(f"127.0.0.1:{base + 2}", tls=pki.tls("tenant-a")) as a1,
            MmsvcClient(f"127.0.0.1:{base + 2}", tls=pki.tls("tenant-b")) as b1,
        ):
            assert (a0.ping(), a1.ping()) == (0, 1)
            m = a0.create_machine()
            pid = a0.create_process(m)
            assert a1.proc_status(m, pid).alive  # the owner, on the other worker
            assert b1.list_machines() == []
            with pytest.raises(MmsvcError) as err:
                b1.exit(m, pid)
            assert err.value.errno == "ESRCH"
            assert a1.proc_status(m, pid).alive
        with (
            MmsvcClient(f"127.0.0.1:{base}", timeout=3) as plaintext,
            pytest.raises(MmsvcError),
        ):
            plaintext.ping()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    logs = log_path.read_text()
    assert PASSWORD not in logs and quoted(PASSWORD) not in logs
    assert f'"url": "redis://{USER}:***@' in logs  # the store is named, redacted
    assert '"transport": "mtls"' in logs and '"tenants": "certificate"' in logs
    assert proc.returncode == 0
