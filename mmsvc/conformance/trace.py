"""Loading a scenario file and decoding its field conventions (trace-format.md).

Why a module of its own: the op table's defaults (proc "p0", whole-mapping ranges, prot "rw",
flag lists or ints) are shared by every op handler and are where a runner most easily drifts
from the spec, so they are decoded in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmsvc.conformance.errors import ScenarioError

Op = Mapping[str, Any]


def load(path: str | Path) -> dict[str, Any]:
    """Read a scenario file and check its overall shape."""
    with open(path) as f:
        data = json.load(f)
    validate(data)
    return dict(data)


def validate(trace: Any) -> None:
    if not isinstance(trace, dict):
        raise ScenarioError("a trace is a JSON object")
    if not isinstance(trace.get("name"), str):
        raise ScenarioError("trace needs a string 'name'")
    if not isinstance(trace.get("ops"), list):
        raise ScenarioError("trace needs an 'ops' list")
    procs = trace.get("procs", ["p0"])
    if not isinstance(procs, list) or not all(isinstance(p, str) for p in procs):
        raise ScenarioError("'procs' must be a list of names")
    if len(set(procs)) != len(procs):
        raise ScenarioError("duplicate names in 'procs'")
    files = trace.get("files", {})
    if not isinstance(files, dict):
        raise ScenarioError("'files' must be an object")
    for name, spec in files.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("pages"), int):
            raise ScenarioError(f"file {name!r} needs integer 'pages'")
    for k, op in enumerate(trace["ops"]):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise ScenarioError(f"op {k} needs an 'op' name")


def proc_of(op: Op) -> str:
    proc = op.get("proc", "p0")
    if not isinstance(proc, str):
        raise ScenarioError(f"bad proc {proc!r}")
    return proc


def page_range(op: Op, pages: int) -> tuple[int, int]:
    """[from, to) in pages relative to the mapping start; default the whole mapping."""
    lo = op.get("from", 0)
    hi = op.get("to", pages)
    if not isinstance(lo, int) or not isinstance(hi, int):
        raise ScenarioError(f"from/to must be integers in {dict(op)}")
    return lo, hi


def flag_bits(value: Any, table: Mapping[str, int], what: str) -> int:
    """A flags field: an int, one name, or a list of names from TABLE."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ScenarioError(f"bad {what} {value!r}")
    if isinstance(value, int):
        return value
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list):
        raise ScenarioError(f"bad {what} {value!r}")
    bits = 0
    for name in names:
        if isinstance(name, int) and not isinstance(name, bool):
            bits |= name
        elif isinstance(name, str) and name in table:
            bits |= table[name]
        else:
            raise ScenarioError(f"unknown {what} {name!r}")
    return bits


def prot_bits(value: Any) -> int:
    """'rw' (default), 'r', 'w', 'x' combinations or 'none'."""
    if value is None:
        value = "rw"
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ScenarioError(f"bad prot {value!r}")
    if value == "none":
        return 0
    bits = 0
    for ch in value:
        if ch not in "rwx":
            raise ScenarioError(f"bad prot {value!r}")
        bits |= {"r": 1, "w": 2, "x": 4}[ch]
    return bits


def count_forks(trace: Mapping[str, Any]) -> int:
    return sum(1 for op in trace["ops"] if op.get("op") == "fork")
