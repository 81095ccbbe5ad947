"""The mmsvc command line: argument parsing, worker/port layout, and each command end to end."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from mmsvc.cli.main import build_parser, main
from mmsvc.server.app import split_host_port
from mmsvc.server.workers import worker_addresses, worker_configs
from mmsvc.store.embedded import free_port
from mmsvc_client import MmsvcClient, MmsvcError

# -- parsing ----------------------------------------------------------------------------------


def test_serve_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert args.listen == "127.0.0.1:50051"
    assert args.redis is None
    assert args.workers == 1
    assert args.metrics_port is None
    assert args.log_format == "auto"


def test_serve_options() -> None:
    args = build_parser().parse_args(
        ["serve", "--listen", "0.0.0.0:7000", "--redis", "redis://h:1/0", "--workers", "4",
         "--metrics-port", "9100", "--log-format", "json"]
    )
    assert (args.listen, args.redis, args.workers, args.metrics_port, args.log_format) == (
        "0.0.0.0:7000", "redis://h:1/0", 4, 9100, "json"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--workers", "0"],
        ["serve", "--metrics-port", "70000"],
        ["serve", "--log-format", "xml"],
        ["stat", "--machine", "m"],  # --target required
        ["check", "--target", "h:1"],  # --machine required
        ["replay"],  # a trace is required
        ["replay", "t.json", "--batch-size", "0"],
        [],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2


def test_replay_options() -> None:
    args = build_parser().parse_args(["replay", "a.json", "b.json", "--batch-size", "31"])
    assert args.traces == ["a.json", "b.json"]
    assert args.batch_size == 31
    assert args.target is None
    default = build_parser().parse_args(["replay", "a.json"])
    assert (default.batch_size, default.profile) == (None, "seed")  # the profile decides: 15
    linux = build_parser().parse_args(["replay", "a.json", "--profile", "linux-6.18"])
    assert linux.profile == "linux-6.18"


def test_worker_port_layout() -> None:
    assert worker_addresses("127.0.0.1:50051", 3) == [
        "127.0.0.1:50052", "127.0.0.1:50053", "127.0.0.1:50054"
    ]
    assert worker_addresses("[::]:7000", 1) == ["[::]:7001"]
    with pytest.raises(ValueError):
        worker_addresses("127.0.0.1:0", 2)
    cfgs = worker_configs("redis://x", "127.0.0.1:50051", 2, 9100, "json")
    assert [(c.cpu, c.listen, c.extra_listen, c.reuse_port, c.metrics_port) for c in cfgs] == [
        (0, "127.0.0.1:50051", ("127.0.0.1:50052",), True, 9100),
        (1, "127.0.0.1:50051", ("127.0.0.1:50053",), True, 9101),
    ]
    (single,) = worker_configs("redis://x", "127.0.0.1:50051", 1, None, "auto")
    assert single.extra_listen == () and not single.reuse_port


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:1") == ("127.0.0.1", 1)
    assert split_host_port("[::1]:80") == ("::1", 80)
    assert split_host_port(":80") == ("0.0.0.0", 80)
    with pytest.raises(ValueError):
        split_host_port("localhost")


# -- commands against the fake kernel ---------------------------------------------------------


@pytest.mark.asyncio
async def test_stat_check_ping(fake_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{fake_server.port}"
    assert await asyncio.to_thread(main, ["ping", "--target", target]) == 0
    assert "pong from cpu 0" in capsys.readouterr().out

    assert await asyncio.to_thread(main, ["stat", "--target", target, "--machine", "m1"]) == 0
    out = capsys.readouterr().out
    assert "unevictable_pgs_mlocked" in out and "unevictable_pgs_stranded" in out
    assert "Mlocked" in out and "MemTotal" in out
    assert "lruvec->lru_lock" in out

    assert await asyncio.to_thread(main, ["check", "--target", target, "--machine", "m1"]) == 0
    assert "checker: OK" in capsys.readouterr().out


@pytest.mark.asyncio
async def test_command_errors_are_reported(
    fake_server: Any, fake_kernel: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmsvc.mm.errors import KernelError
    from mmsvc.mm.types import CheckReport

    fake_kernel.fail["vmstat"] = KernelError("ESRCH", "no machine m7")
    target = f"127.0.0.1:{fake_server.port}"
    assert await asyncio.to_thread(main, ["stat", "--target", target, "--machine", "m7"]) == 1
    assert "ESRCH: no machine m7" in capsys.readouterr().err

    async def failing_check(machine: str, drain_all: bool) -> CheckReport:
        return CheckReport(quiescent=True, violations=["Q1: page 5 mlocked but unmapped"])

    fake_kernel.check = failing_check
    assert await asyncio.to_thread(main, ["check", "--target", target, "--machine", "m1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "Q1: page 5" in out


# -- commands against the real kernel ---------------------------------------------------------


def test_demo_real_kernel(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["demo", "--redis", redis_url, "--no-progress", "--procs", "3"])
    out = capsys.readouterr().out
    assert "mmsvc demo" in out
    assert "unevictable_pgs_mlocked" in out
    assert "MemTotal" in out
    assert "lock_stat" in out
    assert "checker:" in out
    assert rc in (0, 1)  # 1 = the checker found violations (reported above)


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with MmsvcClient(f"127.0.0.1:{port}", timeout=1) as k:
                k.ping()
                return
        except MmsvcError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing answers on port {port}")


def _free_block(n: int) -> int:
    """A port P such that P..P+n-1 look free."""
    for _ in range(50):
        base = free_port()
        if base + n < 65535 and all(_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port block")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_serve_two_workers(redis_url: str) -> None:
    """Two worker processes: shared port + one private port each (cpu 0 and cpu 1)."""
    base = _free_block(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsvc.cli.main", "serve", "--listen", f"127.0.0.1:{base}",
         "--redis", redis_url, "--workers", "2", "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for port in (base, base + 1, base + 2):
            _wait_port(port)
        with MmsvcClient(f"127.0.0.1:{base + 1}") as k0, MmsvcClient(f"127.0.0.1:{base + 2}") as k1:
            assert k0.ping() == 0
            assert k1.ping() == 1
            machine = k0.create_machine()
            assert machine in k1.list_machines()  # one store behind both CPUs
        with MmsvcClient(f"127.0.0.1:{base}") as shared:
            assert shared.ping() in (0, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert _is_free(base + 1) and _is_free(base + 2)
