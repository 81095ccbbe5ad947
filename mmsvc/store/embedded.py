"""A private Redis server started as a child process (the "embedded default").

``EmbeddedRedis`` runs ``redis-server`` (from ``$MMSVC_REDIS_SERVER`` or ``PATH``) on a free
port of 127.0.0.1 with persistence off, waits until it answers PING and stops it on exit::

    with EmbeddedRedis() as r:           # or: async with EmbeddedRedis() as r:
        client = redis.Redis.from_url(r.url)

or ``r = EmbeddedRedis().start(); ...; r.stop()``.  Nothing is written outside a private
temporary directory, and the server never listens on anything but the chosen loopback port.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

ENV_EXECUTABLE = "MMSVC_REDIS_SERVER"
INSTALL_HINT = (
    "redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server; "
    "macOS: brew install redis), put it on PATH or set MMSVC_REDIS_SERVER, "
    "or pass --redis URL to use an existing server"
)


class EmbeddedRedisError(RuntimeError):
    """redis-server could not be found or did not start."""


def find_redis_server() -> str:
    """Path of the redis-server executable, or raise :class:`EmbeddedRedisError`."""
    env = os.environ.get(ENV_EXECUTABLE)
    if env:
        if os.access(env, os.X_OK):
            return env
        raise EmbeddedRedisError(f"{ENV_EXECUTABLE}={env} is not an executable")
    found = shutil.which("redis-server")
    if found is None:
        raise EmbeddedRedisError(INSTALL_HINT)
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port != 6379:
            return port


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def server_pid(host: str, port: int, timeout: float = 0.5) -> int | None:
    """``process_id`` from INFO server of the Redis on host:port (None if none answers)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


class EmbeddedRedis:
    """A private redis-server child process on a free loopback port."""

    def __init__(
        self,
        executable: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 10.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.executable = executable
        self.host = host
        self.port = port or 0
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._fixed_port = port is not None

    # -- state --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._proc is None:
            raise EmbeddedRedisError("embedded redis is not running")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> EmbeddedRedis:
        """Start redis-server and wait until it answers PING (retries on a port race)."""
        if self._proc is not None:
            return self
        exe = self.executable or find_redis_server()
        attempts = 1 if self._fixed_port else 5
        last_error = ""
        for _ in range(attempts):
            if not self._fixed_port:
                self.port = free_port(self.host)
            self._dir = tempfile.mkdtemp(prefix="mmsvc-redis-")
            logfile = Path(self._dir) / "redis.log"
            argv = [
                exe,
                "--bind", self.host,
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--dir", self._dir,
                "--logfile", str(logfile),
                *self.extra_args,
            ]
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_ready():
                atexit.register(self.stop)
                return self
            last_error = _tail(logfile)
            self._kill()
        raise EmbeddedRedisError(f"redis-server did not start: {last_error}")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            # ours answering, not some other server that already had the port
            if server_pid(self.host, self.port) == self._proc.pid:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop the server: SIGTERM, wait up to 5 s, then SIGKILL.  Idempotent."""
        if self._proc is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- context managers ---------------------------------------------------------------------

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedRedis:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"url={self.url}" if self._proc is not None else "stopped"
        return f"EmbeddedRedis({state})"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
