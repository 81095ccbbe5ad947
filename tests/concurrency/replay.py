"""Replay a trace the state machine wrote when it failed (``trace-<machine>.json`` next to the
server log; the failure message names it), step by step, with the same calls on the same CPUs,
checking like the state machine does.  A race does not replay the same way every time, so the
replay can be repeated::

    python -m tests.concurrency.replay TRACE.json [--times N] [--quiet]

A private redis-server and a server with as many workers as the trace used are started for
the replay.  The trace format (``dump_trace``): ``{"setup": {...Setup...}, "workers": N,
"steps": [[call, ...], ...]}`` with each call the fields of :class:`ops.Call`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmsvc.mm.types import FileSpec, MmapArgs, ProcessSpec
from mmsvc.store.embedded import EmbeddedRedis

from .cluster import Cluster, Driver, database_url, flush_database, free_port_block
from .invariants import snapshot, view_violations
from .ops import FILE_KINDS, FILE_PAGES, Call, Outcome, Proc, World, apply, execute


def dump_trace(path: Path, setup: Any, workers: int, steps: list[list[Call]]) -> None:
    doc = {"setup": asdict(setup), "workers": workers,
           "steps": [[asdict(c) for c in step] for step in steps]}
    path.write_text(json.dumps(doc, indent=None, separators=(",", ":")))


def load_call(d: dict[str, Any]) -> Call:
    d = dict(d)
    if d.get("mmap") is not None:
        d["mmap"] = MmapArgs(**d["mmap"])
    if d.get("spec") is not None:
        d["spec"] = ProcessSpec(**d["spec"])
    return Call(**d)


async def replay_once(driver: Driver, doc: dict[str, Any], verbose: bool) -> list[str]:
    """Run the trace on a fresh machine; returns the first problems found (empty: none)."""
    from .machine import Setup  # the state machine module imports this one

    setup_d = dict(doc["setup"])
    setup_d["memcgs"] = tuple(setup_d["memcgs"])
    setup_d["prefill"] = tuple(setup_d["prefill"])
    setup_d["procs"] = tuple(tuple(p) for p in setup_d["procs"])
    setup = Setup(**setup_d)
    k = driver.on(0)
    mid = await k.create_machine(setup.config())
    try:
        world = World(mid, setup.nodes, setup.memcgs)
        for (name, pages), prefill in zip(FILE_PAGES.items(), setup.prefill, strict=True):
            await k.create_file(mid, FileSpec(name, pages, prefill=prefill,
                                              kind=FILE_KINDS[name]))
        for i, (node, cg) in enumerate(setup.procs):
            spec = ProcessSpec(memcg=setup.memcgs[cg % len(setup.memcgs)],
                               node=node % setup.nodes)
            world.procs.append(Proc(await driver.on(i).create_process(mid, spec), i))
        for n, step in enumerate(doc["steps"], 1):
            calls = [load_call(c) for c in step]
            results = await asyncio.gather(*(execute(driver.on(c.cpu), mid, c) for c in calls),
                                           return_exceptions=True)
            line = []
            for c, r in zip(calls, results, strict=True):
                if isinstance(r, Outcome):
                    apply(world, r)
                    line.append(r.describe())
                else:
                    line.append(f"{c.describe()} = {type(r).__name__}: {r}")
            if verbose:
                print(f"step {n}: " + " || ".join(line))
            faults = [s for s in line if "Error" in s]
            if faults:
                return [f"step {n}: {f}" for f in faults]
            v = (await driver.on(n).check(mid, False)).violations
            if v:
                if os.environ.get("MMSVC_REPLAY_DUMP"):
                    await dump_mappings(k, mid, world)
                return [f"Check(drain_all=False) after step {n}: {x}" for x in v]
        await driver.on(0).drain(mid, True)
        v = (await driver.on(1).check(mid, True)).violations
        v += view_violations(await snapshot(k, world), world)
        if v:
            return [f"quiescent, after the last step: {x}" for x in v]
        for node in range(setup.nodes):
            await driver.on(node).reclaim(mid, node, None, 64)
        await driver.on(0).drain(mid, True)
        v = (await driver.on(1).check(mid, True)).violations
        v += view_violations(await snapshot(k, world), world)
        return [f"after a reclaim pass: {x}" for x in v]
    finally:
        await k.delete_machine(mid)


async def dump_mappings(k: Any, mid: str, world: World) -> None:
    """MMSVC_REPLAY_DUMP=1: every live process's VMAs and the pages they map."""
    for proc in world.procs:
        try:
            entries = await k.smaps(mid, proc.pid)
        except Exception as exc:
            print(f"  pid {proc.pid}: {exc}")
            continue
        for e in entries:
            print(f"  pid {proc.pid} vma {e.start:#x}-{e.end:#x} {e}")
            for p in await k.page_flags(mid, proc.pid, e.start, e.end - e.start):
                if p.present:
                    print(f"    {p.addr:#x} pfn {p.pfn >> 32}:{p.pfn & 0xffffffff} "
                          f"kind {p.kind} map {p.mapcount} ref {p.refcount}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.concurrency.replay")
    ap.add_argument("trace", type=Path)
    ap.add_argument("--times", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    doc = json.loads(args.trace.read_text())
    with EmbeddedRedis() as redis_server, tempfile.TemporaryDirectory() as tmp:
        url = database_url(redis_server.url, 1)
        flush_database(url)
        cluster = Cluster(int(doc["workers"]), free_port_block(int(doc["workers"]) + 1), url,
                          Path(tmp) / "serve.log").start()
        try:
            driver = Driver(cluster)
            failed = 0
            for i in range(args.times):
                problems = driver.run(replay_once(driver, doc, not args.quiet))
                print(f"replay {i + 1}: " + ("ok" if not problems else "; ".join(problems[:6])))
                failed += bool(problems)
            driver.close()
        finally:
            cluster.stop()
        print(f"{failed}/{args.times} replays found problems")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
