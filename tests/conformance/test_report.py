"""The fidelity report (``python -m mmsvc.conformance.report`` / ``mmsvc conformance``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmsvc.cli.main import main as mmsvc_main
from mmsvc.conformance import report
from mmsvc.conformance.errors import Disturbed
from mmsvc.store.embedded import EmbeddedRedis

HERE = Path(__file__).parent
KNOWN: dict[str, str] = json.loads((HERE / "known_differences.json").read_text(encoding="utf-8"))
A_MATCH = "s1_mlock_present_anon"
A_KNOWN = sorted(KNOWN)[0] if KNOWN else None  # none left when mmsvc matches every trace


def test_table_rows_and_final_line() -> None:
    outcomes = [
        report.Outcome("same"),
        report.Outcome(
            "other", diffs=[".ops[0].errno: kernel 'ENOMEM' != mmsvc None", ".x"], known="why"
        ),
        report.Outcome("broken", error="MmsvcError: INTERNAL"),
        report.Outcome("fixed", known="was wrong"),
    ]
    lines = report.table(outcomes).splitlines()
    assert lines[0].split() == ["trace", "result", "diffs", "first", "difference"]
    assert lines[1].split() == ["same", "MATCH", "0"]
    assert lines[2].split()[:3] == ["other", "DIFF", "2"]
    assert lines[2].endswith("ops[0].errno: kernel 'ENOMEM' != mmsvc None  [known]")
    assert lines[3].split()[:3] == ["broken", "ERROR", "-"]
    assert "now matches" in lines[4]
    assert lines[-1] == "2 passed, 2 failed"


def test_labels_name_the_snapshot_and_the_op() -> None:
    recorded: dict[str, Any] = {
        "ops": [{"i": 0, "op": "mmap", "proc": "p0"}, {"i": 2, "op": "drain"}],
        "snapshots": [{"label": "start"}],
    }
    assert report._labelled(".snapshots[0].vmstat.x: d", recorded) == (
        ".snapshots[0](start).vmstat.x: d"
    )
    assert report._labelled(".ops[1].errno: d", recorded) == ".ops[1](i=2 drain).errno: d"
    assert report._labelled(".ops[5].errno: d", recorded) == ".ops[5].errno: d"
    assert report._labelled(".scenario: d", recorded) == ".scenario: d"


def test_corpus_excludes_what_mmsvc_cannot_replay() -> None:
    names = {p.stem for p in report.corpus_traces()}
    assert A_MATCH in names
    assert "shm_lock_unlock" in names  # shm_* ops are replayed too (mmsvc/mm/shm.py)


def test_report_replays_and_compares(
    redis_server: EmbeddedRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report.run(names=[A_MATCH], redis_url=redis_server.url) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == [A_MATCH, "MATCH", "0"]
    assert out[-1] == "1 passed, 0 failed"

    if A_KNOWN is None:
        return
    assert report.run(names=[A_MATCH, A_KNOWN], redis_url=redis_server.url) == 1
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith(A_KNOWN))
    assert row.split()[1] == "DIFF" and row.endswith("[known]")
    assert out[-1] == "1 passed, 1 failed"


def test_unknown_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.run(names=["no_such_trace"]) == 2
    assert "no_such_trace" in capsys.readouterr().err


def test_cli_subcommand(redis_server: EmbeddedRedis, capsys: pytest.CaptureFixture[str]) -> None:
    assert mmsvc_main(["conformance", "--redis", redis_server.url, A_MATCH]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 passed, 0 failed"


def test_rerecording_failures_keep_the_old_expectation(
    redis_server: EmbeddedRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--kernel: a trace the host cannot record keeps its expectation; the exit status says so."""
    import mmsvc.conformance.record as record

    calls: list[list[Path]] = []

    def busy_host(paths: list[Path], out_dir: Path) -> list[Path]:
        calls.append(list(paths))
        raise Disturbed("busy", disagreements=0)

    monkeypatch.setattr(record, "record", busy_host)
    monkeypatch.setattr(report, "RETRY_PAUSE_S", 0.0)
    before = (HERE / "expected" / f"{A_MATCH}.json").read_text(encoding="utf-8")
    assert report.run(kernel=True, names=[A_MATCH], redis_url=redis_server.url) == 1
    assert [p.stem for batch in calls for p in batch] == [A_MATCH, A_MATCH]  # one retry
    assert (HERE / "expected" / f"{A_MATCH}.json").read_text(encoding="utf-8") == before
    captured = capsys.readouterr()
    assert f"could not record {A_MATCH}" in captured.err
    assert captured.out.splitlines()[-1] == "1 passed, 0 failed"


def test_rerecord_retries_a_disturbed_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mmsvc.conformance.record as record

    calls: list[str] = []

    def busy_once(paths: list[Path], out_dir: Path) -> list[Path]:
        calls.append(paths[0].stem)
        if len(calls) == 1:
            raise Disturbed("busy", disagreements=0)
        return []

    monkeypatch.setattr(record, "record", busy_once)
    monkeypatch.setattr(report, "RETRY_PAUSE_S", 0.0)
    trace = HERE / "traces" / f"{A_MATCH}.json"
    assert report.rerecord([trace], tmp_path) == []
    assert calls == [A_MATCH, A_MATCH]
    assert f"could not record {A_MATCH}" in capsys.readouterr().err
