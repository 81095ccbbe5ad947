"""A real ``mmsvc serve --workers N`` started as a subprocess, and a driver that talks to it.

* :class:`Cluster` is the server: N worker processes (worker *i* is CPU *i*), all on the shared
  port and worker *i* alone on port+1+i, against a Redis database of the tests' own
  ``redis-server`` (never 6379).  Each cluster gets its own database number, so the FLUSHDB of
  the ``redis_url`` fixture (database 0) never pulls the store from under its workers.
* :class:`Driver` owns one asyncio event loop and one :class:`AsyncMmsvcClient` per worker,
  each pinned to that worker's private port; synchronous code (Hypothesis rules) runs
  coroutines on it with :meth:`Driver.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import redis

from mmsvc_client import AsyncMmsvcClient, MmsvcClient, MmsvcError

T = TypeVar("T")

# Client deadline per call.  The emulator's locks have 30 s leases; a call that takes this long
# is a hang (a deadlock or a lost lock), which the tests report as a failure.
CALL_TIMEOUT = 20.0
START_TIMEOUT = 60.0

# gRPC statuses that mean "the server broke", never an emulated errno.
SERVER_FAULTS = frozenset({
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
})


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int) -> int:
    """A base port such that base .. base+n-1 are free now (never 6379)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        ports = range(base, base + n)
        if base + n < 65000 and 6379 not in ports and all(_port_free(p) for p in ports):
            return base
    raise RuntimeError(f"no block of {n} free ports")


@dataclass
class Cluster:
    """One ``mmsvc serve --workers N`` process tree."""

    workers: int
    base_port: int
    redis_url: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)

    def target(self, cpu: int) -> str:
        """The private address of worker ``cpu`` (port+1+cpu)."""
        return f"127.0.0.1:{self.base_port + 1 + cpu}"

    @property
    def shared_target(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    def start(self) -> Cluster:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmsvc.cli.main", "serve",
             "--listen", self.shared_target, "--redis", self.redis_url,
             "--workers", str(self.workers), "--log-format", "json", "--log-level", "warning"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + START_TIMEOUT
        for cpu in range(self.workers):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mmsvc serve exited early:\n{self.log_tail()}")
                try:
                    with MmsvcClient(self.target(cpu), timeout=2.0) as k:
                        if k.ping() != cpu:
                            raise RuntimeError(f"port of cpu {cpu} answered as another cpu")
                    break
                except MmsvcError as e:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"worker {cpu} did not come up:\n{self.log_tail()}") from e
                    time.sleep(0.1)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def server_errors(self) -> list[str]:
        """Error-level log lines (INTERNAL answers with their exception, worker deaths), each
        summarised as ``event method: ExcType: value @ file:line (innermost frames)``."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        out: list[str] = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("level") != "error":
                continue
            out.append(summarise_error(rec))
        return out


def summarise_error(rec: dict[str, Any]) -> str:
    head = f"{rec.get('event')} {rec.get('method', '')}".strip()
    for exc in rec.get("exception") or []:
        frames = exc.get("frames") or []
        where = " <- ".join(f"{Path(f['filename']).name}:{f['lineno']} {f['name']}"
                            for f in reversed(frames[-4:]))
        head += f": {exc.get('exc_type')}: {exc.get('exc_value')} @ {where}"
    return head


def flush_database(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def database_url(server_url: str, db: int) -> str:
    """The same redis-server, another database number."""
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{db}"


class ServerFault(AssertionError):
    """A call ended with a status that no emulated syscall may produce (INTERNAL, UNKNOWN,
    a deadline: a hang)."""


class Driver:
    """An event loop and one pinned client per worker of a cluster."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.loop = asyncio.new_event_loop()
        self.clients: list[AsyncMmsvcClient] = []
        self.run(self._open())

    async def _open(self) -> None:
        for cpu in range(self.cluster.workers):
            client = AsyncMmsvcClient(self.cluster.target(cpu), timeout=CALL_TIMEOUT)
            await client.wait_ready()
            self.clients.append(client)

    @property
    def workers(self) -> int:
        return self.cluster.workers

    def on(self, cpu: int) -> AsyncMmsvcClient:
        return self.clients[cpu % len(self.clients)]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    async def gather(self, *aws: Awaitable[T]) -> list[T]:
        return list(await asyncio.gather(*aws))

    def close(self) -> None:
        async def shut() -> None:
            for c in self.clients:
                await c.close()

        with contextlib.suppress(Exception):
            self.run(shut())
        self.loop.close()


def fault_message(cluster: Cluster, what: str, err: MmsvcError) -> str:
    return (f"{what}: server fault {err.code.name} ({err.message})\n"
            f"--- server log (tail) ---\n{cluster.log_tail(40)}")


@contextlib.contextmanager
def started(cluster: Cluster) -> Iterator[Cluster]:
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
