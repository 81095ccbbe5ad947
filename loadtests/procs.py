"""Real processes for fault injection: a durable redis-server that can be killed and restarted
on the same port and data directory, and single-worker ``mmsvc serve`` processes (one CPU
each, so that one can be SIGKILLed, SIGSTOPped or resumed without a supervisor stepping in).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from mmsvc_client import MmsvcClient, MmsvcError

START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_range(n: int) -> int:
    """A port p with p..p+n-1 free (best effort: checked, not reserved)."""
    for _ in range(200):
        base = free_port()
        if base + n >= 65000:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range")


def end_process(proc: subprocess.Popen[bytes], graceful: bool, timeout: float) -> None:
    """SIGTERM and wait (SIGKILL after ``timeout``), or SIGKILL at once."""
    if graceful:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


@dataclass
class DurableRedis:
    """redis-server with AOF, ``appendfsync always`` (the durable profile)."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DurableRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = (self.data_dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--protected-mode", "no", "--daemonize", "no"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as r:
                    if r.ping():
                        return self
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync beyond what appendfsync always did."""
        self._end(graceful=False)

    def stop(self) -> None:
        self._end(graceful=True)

    def _end(self, graceful: bool) -> None:
        if self.proc is not None:
            end_process(self.proc, graceful, timeout=10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


@dataclass
class Worker:
    """``mmsvc serve --workers 1 --cpu-base CPU``: one emulated CPU in its own process (or
    ``cpus`` of them)."""

    cpu: int
    redis_url: str
    port: int
    log_path: Path
    lease_ms: int = 1500
    cpus: int = 1  # CPUs of the worker: cpu .. cpu+cpus-1 (--cpus-per-worker)
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Worker:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmsvc.cli.main", "serve", "--workers", "1",
             "--cpu-base", str(self.cpu), "--listen", self.target, "--redis", self.redis_url,
             "--cpu-lease-ms", str(self.lease_ms), "--cpus-per-worker", str(self.cpus),
             "--log-format", "json",
             "--log-level", "info"],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.cpu} exited early:\n{self.log_tail()}")
            try:
                with MmsvcClient(self.target, timeout=2.0) as k:
                    if k.ping() == self.cpu:
                        return self
            except MmsvcError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker {self.cpu} did not come up:\n{self.log_tail()}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused worker must see the SIGTERM
            end_process(self.proc, True, timeout=20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
