"""Fidelity report: replay every trace that has a kernel expectation on mmsvc and compare.

    python -m mmsvc.conformance.report [--kernel] [NAME ...]
    mmsvc conformance [--kernel] [NAME ...]

Each trace of ``tests/conformance/traces/`` with an expectation in ``tests/conformance/expected/``
(recorded on the host kernel by ``python -m mmsvc.conformance.record``) is replayed through an
embedded mmsvc server (private redis-server) with the Linux 6.18 profile, exactly like
``tests/conformance/test_fidelity.py``, and the documents are compared field by field.  One row
per trace: ``MATCH``, or ``DIFF`` with the number of differing fields and the first one
(``known`` when the trace is listed in ``tests/conformance/known_differences.json``), or
``ERROR`` when the replay itself failed.  The last line is exactly ``N passed, M failed``.

``--kernel`` first re-records the expectations of every corpus trace (all traces mmsvc can
replay: every op of the format, ``shm_*`` included) from the host kernel; a trace the kernel
runner cannot run (busy host: ``Disturbed``) is tried once more after the others, and if it
still fails keeps its old expectation and makes the exit status non-zero.

Exit status: 0 when every trace matches, 1 otherwise, 2 on usage errors or an unusable host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmsvc.conformance.compare import differences

#: tests/conformance of the source tree (as in mmsvc.conformance.record, imported lazily here
#: because it pulls in the kernel runner)
CORPUS = Path(__file__).resolve().parents[2] / "tests" / "conformance"
TRACES = CORPUS / "traces"
EXPECTED = CORPUS / "expected"
KNOWN = CORPUS / "known_differences.json"
#: ops the kernel runner supports but mmsvc does not (none since SysV shm: mmsvc/mm/shm.py)
MMSVC_UNSUPPORTED_OPS: frozenset[str] = frozenset()
#: the Linux 6.18 profile of ``mmsvc replay --profile linux-6.18``
BATCH_SIZE = 31
#: pause before recording again the traces a busy host made the kernel runner give up on
RETRY_PAUSE_S = 5.0


@dataclass
class Outcome:
    """The comparison of one trace."""

    name: str
    diffs: list[str] = field(default_factory=list)
    error: str | None = None
    known: str | None = None  # the known_differences.json diagnosis, if listed

    @property
    def passed(self) -> bool:
        return self.error is None and not self.diffs


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def known_differences(path: Path = KNOWN) -> dict[str, str]:
    """``{trace name: diagnosis}`` of the traces mmsvc is known to get wrong."""
    if not path.exists():
        return {}
    data = load_json(path)
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ValueError(f"{path}: expected an object of trace name -> diagnosis")
    return dict(data)


def replayable(trace: Mapping[str, Any]) -> bool:
    """True when every op of the trace is one mmsvc implements."""
    return not any(op.get("op") in MMSVC_UNSUPPORTED_OPS for op in trace.get("ops", []))


def corpus_traces(traces_dir: Path = TRACES) -> list[Path]:
    """The traces mmsvc can replay (the fidelity corpus), sorted by file name."""
    return [p for p in sorted(traces_dir.glob("*.json")) if replayable(load_json(p))]


def expected_files(expected_dir: Path = EXPECTED) -> list[Path]:
    return sorted(expected_dir.glob("*.json"))


async def replay_all(
    traces: Sequence[Mapping[str, Any]], redis_url: str | None = None
) -> list[dict[str, Any] | str]:
    """Replay each trace on a fresh machine of one embedded server; an error becomes a string.

    Without ``redis_url`` the server runs over a private embedded redis-server.
    """
    from mmsvc.cli.replay import replay_trace
    from mmsvc.server.app import embedded_server
    from mmsvc_client import AsyncMmsvcClient

    out: list[dict[str, Any] | str] = []
    async with (
        embedded_server(redis_url=redis_url) as server,
        AsyncMmsvcClient(f"127.0.0.1:{server.port}") as client,
    ):
        for trace in traces:
            try:
                out.append(await replay_trace(client, trace, BATCH_SIZE, populate_drain=True))
            except Exception as e:  # a replay failure is a result of the report
                out.append(f"{type(e).__name__}: {e}")
    return out


def compare(
    expected: Sequence[Path],
    traces_dir: Path = TRACES,
    known: Mapping[str, str] | None = None,
    redis_url: str | None = None,
) -> list[Outcome]:
    """Replay the trace of every expectation file and compare it with the recorded document."""
    known = known_differences() if known is None else known
    outcomes = [Outcome(p.stem, known=known.get(p.stem)) for p in expected]
    traces: list[Mapping[str, Any]] = []
    runnable: list[tuple[Outcome, Mapping[str, Any]]] = []
    for outcome, path in zip(outcomes, expected, strict=True):
        trace_path = traces_dir / path.name
        if not trace_path.exists():
            outcome.error = f"no trace {trace_path.name}"
            continue
        trace = load_json(trace_path)
        traces.append(trace)
        runnable.append((outcome, load_json(path)["result"]))
    docs = asyncio.run(replay_all(traces, redis_url))
    for (outcome, recorded), doc in zip(runnable, docs, strict=True):
        if isinstance(doc, str):
            outcome.error = doc
        else:
            outcome.diffs = [_labelled(d, recorded) for d in differences(recorded, doc)]
    return outcomes


def _labelled(diff: str, recorded: Mapping[str, Any]) -> str:
    """Name the item a path starts in: ``.snapshots[1](label)...``, ``.ops[3](i=4 mlock p0)...``."""
    match = re.match(r"\.(snapshots|ops)\[(\d+)\]", diff)
    if match is None:
        return diff
    items = recorded.get(match.group(1), [])
    index = int(match.group(2))
    if index >= len(items):
        return diff
    item = items[index]
    if match.group(1) == "snapshots":
        name = str(item.get("label", ""))
    else:
        name = " ".join(
            str(x)
            for x in (f"i={item.get('i')}", item.get("op"), item.get("proc"))
            if x is not None
        )
    return f"{match.group(0)}({name}){diff[match.end() :]}"


def table(outcomes: Sequence[Outcome]) -> str:
    """The report: one row per trace, then ``N passed, M failed``."""
    width = max([len("trace"), *(len(o.name) for o in outcomes)])
    rows = [f"{'trace':<{width}}  {'result':<6}  {'diffs':>5}  first difference"]
    for o in outcomes:
        if o.error is not None:
            result, count, first = "ERROR", "-", o.error
        elif o.diffs:
            result, count, first = "DIFF", str(len(o.diffs)), o.diffs[0].lstrip(".")
        else:
            result, count, first = "MATCH", "0", ""
        if o.known is not None:
            first = f"{first}  [known]" if first else "[known difference: now matches]"
        rows.append(f"{o.name:<{width}}  {result:<6}  {count:>5}  {first}".rstrip())
    passed = sum(o.passed for o in outcomes)
    rows.append(f"{passed} passed, {len(outcomes) - passed} failed")
    return "\n".join(rows)


def rerecord(paths: Sequence[Path], expected_dir: Path = EXPECTED, retries: int = 1) -> list[str]:
    """Record each trace's kernel document; returns the names that could not be recorded.

    A trace the kernel runner gives up on (``Disturbed``: a busy host) is tried again after
    the others, ``retries`` more times, ``RETRY_PAUSE_S`` apart; its old expectation is kept
    if it still fails.
    """
    from mmsvc.conformance.errors import HostUnsupported, KernelRunnerError
    from mmsvc.conformance.record import record

    pending = list(paths)
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(RETRY_PAUSE_S)
        failed: list[Path] = []
        for path in pending:
            try:
                record([path], expected_dir)
            except HostUnsupported:
                raise
            except KernelRunnerError as e:
                print(f"could not record {path.stem}: {type(e).__name__}: {e}", file=sys.stderr)
                failed.append(path)
        pending = failed
        if not pending:
            break
    return [p.stem for p in pending]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmsvc.conformance.report",
        description="Replay every trace with a kernel expectation on mmsvc (Linux 6.18 "
        "profile) and report MATCH or the differing fields.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="first re-record the expectations from the host kernel (root, Linux x86-64)",
    )
    parser.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="page store of the embedded mmsvc server (default: a private redis-server)",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="trace names (file stems) to report on (default: every expectation)",
    )


def run(kernel: bool = False, names: Sequence[str] = (), redis_url: str | None = None) -> int:
    """The report; returns the exit status."""
    from mmsvc.conformance.errors import HostUnsupported
    from mmsvc.store.embedded import EmbeddedRedisError

    record_failures: list[str] = []
    if kernel:
        paths = corpus_traces()
        if names:
            paths = [p for p in paths if p.stem in names]
        started = time.monotonic()
        try:
            record_failures = rerecord(paths)
        except HostUnsupported as e:
            print(f"cannot run the kernel oracle here: {e}", file=sys.stderr)
            return 2
        print(
            f"recorded {len(paths) - len(record_failures)} of {len(paths)} traces from the "
            f"host kernel in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
        )
    expected = expected_files()
    if names:
        unknown = sorted(set(names) - {p.stem for p in expected})
        if unknown:
            print(f"no expectation for: {', '.join(unknown)}", file=sys.stderr)
            return 2
        expected = [p for p in expected if p.stem in names]
    started = time.monotonic()
    try:
        outcomes = compare(expected, redis_url=redis_url)
    except EmbeddedRedisError as e:
        print(f"cannot start the mmsvc server: {e}", file=sys.stderr)
        return 2
    print(table(outcomes))
    print(
        f"replayed {len(outcomes)} traces on mmsvc in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return 0 if all(o.passed for o in outcomes) and not record_failures else 1


def main(argv: Sequence[str] | None = None) -> int:
    from mmsvc.logging import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging("auto", "warning", stream=sys.stderr)  # stdout is the report
    return run(args.kernel, args.names, args.redis)


if __name__ == "__main__":
    raise SystemExit(main())
