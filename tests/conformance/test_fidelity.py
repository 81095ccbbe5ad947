"""Fidelity: every recorded host-kernel result is reproduced by mmsvc, field by field.

The expectations in ``expected/`` were recorded on a real Linux kernel with
``python -m mmsvc.conformance.record`` (the release is stored beside each result).  Each trace
is replayed through a real gRPC server over a real redis-server with the Linux 6.18 profile
(batches of 31, populate drains) and the documents must be identical but for the runner name.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from mmsvc.cli.replay import replay_trace
from mmsvc.server.app import embedded_server
from mmsvc.store.embedded import EmbeddedRedis
from mmsvc_client import AsyncMmsvcClient

HERE = Path(__file__).parent
EXPECTED = sorted((HERE / "expected").glob("*.json"))


def differences(kernel: Any, mmsvc: Any, path: str = "") -> list[str]:
    """Field-by-field differences, the runner name aside."""
    if isinstance(kernel, dict) and isinstance(mmsvc, dict):
        out: list[str] = []
        for key in dict.fromkeys([*kernel, *mmsvc]):
            if key == "runner":
                continue
            if key not in kernel or key not in mmsvc:
                out.append(f"{path}.{key}: only in {'kernel' if key in kernel else 'mmsvc'}")
            else:
                out += differences(kernel[key], mmsvc[key], f"{path}.{key}")
        return out
    if isinstance(kernel, list) and isinstance(mmsvc, list):
        out = [f"{path}: {len(kernel)} items != {len(mmsvc)}"] if len(kernel) != len(mmsvc) else []
        for i, (a, b) in enumerate(zip(kernel, mmsvc, strict=False)):
            out += differences(a, b, f"{path}[{i}]")
        return out
    return [] if kernel == mmsvc else [f"{path}: kernel {kernel!r} != mmsvc {mmsvc!r}"]


def test_differences_sees_a_changed_field() -> None:
    a = {"runner": "kernel", "snapshots": [{"vmstat": {"x": 1}}]}
    assert differences(a, {**a, "runner": "mmsvc"}) == []
    b = {"runner": "mmsvc", "snapshots": [{"vmstat": {"x": 2}}]}
    assert differences(a, b) == [".snapshots[0].vmstat.x: kernel 1 != mmsvc 2"]


@pytest.mark.parametrize("expected", EXPECTED, ids=[p.stem for p in EXPECTED])
def test_mmsvc_reproduces_the_kernel(redis_server: EmbeddedRedis, expected: Path) -> None:
    recorded = json.loads(expected.read_text(encoding="utf-8"))
    trace = json.loads((HERE / "traces" / f"{expected.stem}.json").read_text(encoding="utf-8"))

    async def replay() -> dict[str, Any]:
        async with (
            embedded_server(redis_url=redis_server.url) as server,
            AsyncMmsvcClient(f"127.0.0.1:{server.port}") as client,
        ):
            return await replay_trace(client, trace, 31, populate_drain=True)

    doc = asyncio.run(replay())
    diffs = differences(recorded["result"], doc)
    assert not diffs, f"differs from Linux {recorded['kernel']}:\n" + "\n".join(diffs[:20])
