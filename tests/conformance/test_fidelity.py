"""Fidelity: every recorded host-kernel result is reproduced by mmsvc, field by field.

The expectations in ``expected/`` were recorded on a real Linux kernel with
``python -m mmsvc.conformance.record`` (the release is stored beside each result).  Each trace
is replayed through a real gRPC server over a real redis-server with the Linux 6.18 profile
(batches of 31, populate drains) and the documents must be identical but for the runner name.

Traces listed in ``known_differences.json`` (trace name -> diagnosis) are expected to fail:
they are marked ``xfail(strict=True)`` with the diagnosis as the reason, so a fix in mmsvc makes
them XPASS and fail loudly until the entry is removed.  ``python -m mmsvc.conformance.report``
prints the same comparison as a table.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from mmsvc.cli.replay import replay_trace
from mmsvc.conformance import report
from mmsvc.conformance.compare import differences
from mmsvc.server.app import embedded_server
from mmsvc.store.embedded import EmbeddedRedis
from mmsvc_client import AsyncMmsvcClient

HERE = Path(__file__).parent
TRACES = sorted((HERE / "traces").glob("*.json"))
EXPECTED = sorted((HERE / "expected").glob("*.json"))
KNOWN: dict[str, str] = json.loads((HERE / "known_differences.json").read_text(encoding="utf-8"))


def _case(path: Path) -> Any:
    marks = []
    if path.stem in KNOWN:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[path.stem]))
    return pytest.param(path, id=path.stem, marks=marks)


def test_differences_sees_a_changed_field() -> None:
    a = {"runner": "kernel", "snapshots": [{"vmstat": {"x": 1}}]}
    assert differences(a, {**a, "runner": "mmsvc"}) == []
    b = {"runner": "mmsvc", "snapshots": [{"vmstat": {"x": 2}}]}
    assert differences(a, b) == [".snapshots[0].vmstat.x: kernel 1 != mmsvc 2"]
    assert differences({"ops": [1, 2]}, {"ops": [1]}) == [".ops: 2 items != 1"]
    assert differences({"a": 1}, {"b": 1}) == [".a: only in kernel", ".b: only in mmsvc"]


def test_every_trace_names_its_origin() -> None:
    for path in TRACES:
        trace = json.loads(path.read_text(encoding="utf-8"))
        origin = trace.get("origin")
        assert isinstance(origin, list) and origin, f"{path.name}: no origin"
        assert all(isinstance(o, str) and o for o in origin), path.name


def test_the_corpus_is_recorded() -> None:
    """Every trace mmsvc can replay has a kernel expectation, and only those."""
    corpus = {p.stem for p in report.corpus_traces(HERE / "traces")}
    recorded = {p.stem for p in EXPECTED}
    assert corpus == recorded, (
        f"not recorded: {sorted(corpus - recorded)}; no trace: {sorted(recorded - corpus)}"
    )
    assert len(corpus) >= 60


def test_known_differences_name_recorded_traces() -> None:
    recorded = {p.stem for p in EXPECTED}
    assert set(KNOWN) <= recorded, sorted(set(KNOWN) - recorded)
    assert all(isinstance(v, str) and v.strip() for v in KNOWN.values())


@pytest.mark.parametrize("expected", [_case(p) for p in EXPECTED])
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
