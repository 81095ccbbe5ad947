"""Line-protocol client for the C coordinator (scenario_exec).

Why a separate process: the coordinator forks the scenario processes and relays binary commands
to them; this module only speaks its text protocol (see the header of scenario_exec.c) and turns
failures into ExecutorFailure with the executor's stderr attached.
"""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from mmsvc.conformance.errors import ExecutorFailure

REPLY_TIMEOUT_S = 120.0


class Coordinator:
    """One running scenario_exec: a world of scenario processes for one attempt."""

    def __init__(self, exe: Path, driver_cpu: int, scenario_cpu: int, nslots: int) -> None:
        env = dict(os.environ)
        # glibc's rseq area lives in TLS, which the scenario processes unmap (see the C source)
        env["GLIBC_TUNABLES"] = "glibc.pthread.rseq=0"
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self._proc = subprocess.Popen(
            [str(exe), str(driver_cpu), str(scenario_cpu), str(nslots)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def _readline(self) -> str:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0.0))
            if not ready:
                raise ExecutorFailure("scenario_exec did not answer in time")
            chunk = os.read(fd, 65536)
            if not chunk:
                self._proc.wait(timeout=10)
                raise ExecutorFailure(
                    f"scenario_exec exited ({self._proc.returncode}): {self._stderr_text()}"
                )
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def request(self, line: str) -> list[str]:
        """Send one command line; return the words after "ok" (or None-like "dead")."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError as exc:
            raise ExecutorFailure(f"scenario_exec is gone: {self._stderr_text()}") from exc
        words = self._readline().split()
        if not words or words[0] not in ("ok", "dead"):
            raise ExecutorFailure(f"scenario_exec refused {line!r}: {' '.join(words)}")
        return words

    def ok(self, line: str) -> list[str]:
        """Like request, but a dead scenario process is an executor failure."""
        words = self.request(line)
        if words[0] != "ok":
            raise ExecutorFailure(f"scenario process died during {line!r}")
        return words[1:]

    def command(self, slot: int, op: int, *args: int) -> tuple[int, int] | None:
        """Run one runtime op in SLOT: (ret, aux), or None if the process died."""
        if len(args) > 7:
            raise ValueError("at most 7 arguments")
        words = self.request(" ".join(["C", str(slot), str(op), *map(str, args)]))
        if words[0] == "dead":
            return None
        return int(words[1]), int(words[2])

    def close(self) -> None:
        """Kill the scenario processes (coordinator's Q), then make sure it is gone."""
        try:
            if self._proc.poll() is None:
                self.request("Q")
                self._proc.wait(timeout=30)
        except (ExecutorFailure, subprocess.TimeoutExpired, OSError):
            self._proc.kill()
            self._proc.wait(timeout=30)
        finally:
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    stream.close()
            self._stderr.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
