"""The host-kernel runner ("oracle"): run a trace with real syscalls, print the result document.

Why repeated runs: the unevictable_pgs_* counters are system wide and the per-CPU batches can be
touched by anything that runs on the scenario CPU, so a single run proves nothing.  Each attempt
brackets the scenario with two quiet windows (the counters must not move while every scenario
process is idle) and a result is accepted only when `agree` consecutive clean attempts produce
identical documents.  Otherwise Disturbed is raised.

Usage: python -m mmsvc.conformance.kernel_runner TRACE.json [TRACE.json ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmsvc.conformance import build, host, neighbours, observe
from mmsvc.conformance import trace as T
from mmsvc.conformance.coordinator import Coordinator
from mmsvc.conformance.errors import Disturbed, KernelRunnerError, ScenarioError
from mmsvc.conformance.executor import Execution
from mmsvc.conformance.protocol import VMSTAT_KEYS

QUIET_S = 0.05
MAX_SLOTS = 30  # scenario_exec.c: (2 MiB - 64 KiB) / 64 KiB slots, one is the drainer


@dataclass(frozen=True)
class Options:
    attempts: int = 10
    agree: int = 2
    quiet_s: float = QUIET_S
    backoff_s: float = 0.1  # after a disturbed attempt, doubling up to 1.6 s
    scenario_cpu: int | None = None
    driver_cpu: int | None = None


@dataclass
class Attempt:
    document: dict[str, Any]
    disturbance: str | None
    seconds: float


def _quiet_window(seconds: float) -> str | None:
    before = observe.read_vmstat()
    time.sleep(seconds)
    after = observe.read_vmstat()
    moved = {k: after[k] - before[k] for k in VMSTAT_KEYS if after[k] != before[k]}
    return f"counters moved while idle: {moved}" if moved else None


def run_once(
    trace: dict[str, Any], exe: Path, cpus: host.Cpus, quiet_s: float = QUIET_S
) -> Attempt:
    """One attempt: set up the world, run every op, snapshot where asked, tear down."""
    nslots = 1 + len(trace.get("procs", ["p0"])) + T.count_forks(trace)
    if nslots > MAX_SLOTS:
        raise ScenarioError(f"at most {MAX_SLOTS - 1} processes per trace")
    start = time.monotonic()
    ops: list[dict[str, Any]] = []
    snapshots: list[dict[str, Any]] = []
    with host.pinned(cpus.driver), Coordinator(exe, cpus.driver, cpus.scenario, nslots) as coord:
        ex = Execution(coord, trace)
        tasks_before = neighbours.scan_user_tasks()
        ex.setup()
        disturbance = _quiet_window(quiet_s)
        ex.baseline = observe.read_vmstat()
        for k, op in enumerate(trace["ops"]):
            if op["op"] == "snapshot":
                snapshots.append(ex.snapshot(str(op.get("label", "")), k - 1))
                continue
            err = ex.do(op)
            entry: dict[str, Any] = {"i": k, "op": op["op"]}
            if op["op"] != "drain":
                entry["proc"] = T.proc_of(op)
            entry["errno"] = err
            ops.append(entry)
        disturbance = disturbance or _quiet_window(quiet_s)
        foreign = neighbours.foreign_runs(
            tasks_before,
            neighbours.scan_user_tasks(),
            cpus.scenario,
            ex.our_pids(),
            {threading.get_native_id()},
        )
        if foreign and not disturbance:
            disturbance = "other tasks faulted on the scenario CPU: " + ", ".join(foreign[:5])
    doc = {"scenario": trace["name"], "runner": "kernel", "ops": ops, "snapshots": snapshots}
    return Attempt(doc, disturbance, time.monotonic() - start)


def run_trace(trace: dict[str, Any], options: Options | None = None) -> dict[str, Any]:
    """Run until `agree` consecutive clean attempts give the same document; return it."""
    opts = options or Options()
    T.validate(trace)
    host.check_host()
    cpus = host.choose_cpus(opts.scenario_cpu, opts.driver_cpu)
    host.ensure_hugetlb_page()
    exe = build.executable()
    notes: list[str] = []
    streak: list[dict[str, Any]] = []
    disagreements = busy = 0
    for n in range(opts.attempts):
        attempt = run_once(trace, exe, cpus, opts.quiet_s)
        if attempt.disturbance:
            notes.append(f"attempt {n}: {attempt.disturbance}")
            time.sleep(opts.backoff_s * 2 ** min(busy, 4))
            busy += 1
            continue
        busy = 0
        if streak and attempt.document != streak[-1]:
            notes.append(f"attempt {n}: document differs from the previous clean one")
            disagreements += 1
            streak = []
        streak.append(attempt.document)
        if len(streak) >= opts.agree:
            return attempt.document
    raise Disturbed(
        f"{trace['name']}: no {opts.agree} agreeing clean runs in "
        f"{opts.attempts} attempts: " + "; ".join(notes),
        disagreements,
    )


def run_file(path: str | Path, options: Options | None = None) -> dict[str, Any]:
    return run_trace(T.load(path), options)


def dumps(doc: dict[str, Any], indent: int | None = None) -> str:
    """Serialise with the spec's key order (insertion order) and json's default separators."""
    return json.dumps(doc, indent=indent)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmsvc.conformance.kernel_runner",
        description="Run mmsvc traces on the host Linux kernel and print the result documents.",
    )
    parser.add_argument("traces", nargs="+", help="scenario files (trace-format.md)")
    parser.add_argument("--attempts", type=int, default=Options.attempts)
    parser.add_argument(
        "--agree", type=int, default=Options.agree, help="identical clean runs required (default 2)"
    )
    parser.add_argument("--scenario-cpu", type=int)
    parser.add_argument("--driver-cpu", type=int)
    parser.add_argument("--indent", type=int, help="pretty-print with this indent")
    args = parser.parse_args(argv)
    opts = Options(
        attempts=args.attempts,
        agree=args.agree,
        scenario_cpu=args.scenario_cpu,
        driver_cpu=args.driver_cpu,
    )
    try:
        docs = [run_file(p, opts) for p in args.traces]
    except KernelRunnerError as exc:
        print(f"kernel_runner: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    out = docs[0] if len(docs) == 1 else {"results": docs}
    print(dumps(out, args.indent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
