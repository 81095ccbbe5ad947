"""The Hypothesis state machine: random concurrent op batches from several emulated processes
through several workers, with the spec §8.5 invariants checked between steps.

A *step* resolves 2-6 abstract ops against the model and issues them at once
(``asyncio.gather``), each on the worker it names, so calls of different processes - and of the
same process, like threads - run concurrently on different CPUs.  Errno failures are outcomes;
INTERNAL/UNKNOWN statuses and hangs fail the example.  A failure that a known bug explains
(known_bugs.py) stops checking the example instead, and the run ends ``xfail``.

Checks:
* after every step: ``Check(drain_all=False)`` - the "always" invariants A1-A8 (the batches may
  hold entries: A6 counts their references);
* every :data:`QUIESCE_EVERY` steps, after a step that asks for it (1 in 4), and at
  teardown: ``Drain(all_cpus=True)`` on one worker, ``Check(drain_all=True)`` on another (Q1-Q8),
  then the same invariants recomputed from the views (invariants.py), sometimes after a
  reclaim pass;
* teardown: every process exits (concurrently), then Q8.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, Phase, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from mmsvc.mm.types import MAP_ANONYMOUS, MAP_SHARED, FileSpec, MachineConfig, ProcessSpec
from mmsvc_client import MmsvcError

from .cluster import Driver
from .invariants import final_violations, snapshot, view_violations
from .known_bugs import Evidence, classify
from .ops import (
    FILE_KINDS,
    FILE_PAGES,
    AbstractOp,
    Call,
    Outcome,
    Proc,
    ServerFaultError,
    Tally,
    World,
    abstract_ops,
    apply,
    exclusive_fork,
    exclusive_isolation,
    execute,
    resolve,
)
from .replay import dump_trace

QUIESCE_EVERY = 4


@dataclass(frozen=True)
class Setup:
    """The machine an example runs on."""

    nodes: int
    memcgs: tuple[str, ...]
    mlock_batch_len: int
    lru_add_batch_len: int
    frames_per_node: int
    fault_around_pages: int
    populate_drain: bool
    prefill: tuple[bool, bool]
    procs: tuple[tuple[int, int], ...]  # (node, memcg index)

    def config(self) -> MachineConfig:
        return MachineConfig(
            nodes=self.nodes, memcgs=self.memcgs, frames_per_node=self.frames_per_node,
            mlock_batch_len=self.mlock_batch_len, lru_add_batch_len=self.lru_add_batch_len,
            fault_around_pages=self.fault_around_pages, populate_drain=self.populate_drain,
            name="concurrency",
        )


def setups(nodes: tuple[int, ...] = (1, 2)) -> st.SearchStrategy[Setup]:
    return st.builds(
        Setup,
        nodes=st.sampled_from(nodes),
        memcgs=st.sampled_from([("root",), ("root", "A")]),
        mlock_batch_len=st.sampled_from([15, 4, 1, 31]),
        lru_add_batch_len=st.sampled_from([15, 3, 1]),
        frames_per_node=st.sampled_from([2048, 2048, 2048, 192]),
        fault_around_pages=st.sampled_from([16, 1, 4]),
        populate_drain=st.booleans(),
        prefill=st.tuples(st.booleans(), st.booleans()),
        procs=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2,
                       max_size=3).map(tuple),
    )


@dataclass
class RunLog:
    """What a whole run (all examples) found."""

    tally: Tally = field(default_factory=Tally)
    failures: list[str] = field(default_factory=list)
    known_hits: Counter[str] = field(default_factory=Counter)
    examples: int = 0
    steps: int = 0


class ConcurrencyMachine(RuleBasedStateMachine):
    """Subclassed per run with the driver (and the setups to draw from) filled in.

    Failures are not raised into Hypothesis: a concurrent run does not replay the same way, so
    Hypothesis' shrinking and its re-run of the failing example would only end in a ``Flaky``
    error.  The first failure is recorded in :attr:`log` with its resolved trace, the remaining
    examples do nothing, and :func:`run_machine` fails the test with it.
    """

    driver: ClassVar[Driver]
    setup_strategy: ClassVar[st.SearchStrategy[Setup]] = setups()
    log: ClassVar[RunLog]

    def __init__(self) -> None:
        super().__init__()
        self.world: World | None = None
        self.setup: Setup | None = None
        self.steps = 0
        self.since_quiesce = 0
        self.trace: list[str] = []
        self.last: list[Outcome] = []  # outcomes of the latest step
        self.last_calls: list[Call] = []  # calls of the latest step (faulted ones too)
        self.all_calls: list[list[Call]] = []  # every step's calls, for the trace file
        self.recent: list[list[Call]] = []  # steps since the last passing quiescent check
        self.recent_outcomes: list[Outcome] = []
        self.history: list[Outcome] = []  # every outcome of the example
        self.broken = bool(self.log.failures)
        self.errors_seen = 0

    # -- helpers ---------------------------------------------------------------------------

    @property
    def w(self) -> World:
        assert self.world is not None
        return self.world

    def _log(self, line: str) -> None:
        self.trace.append(line)
        note(line)

    def fail(self, what: str, problems: list[str]) -> None:
        self.broken = True
        errors = self.driver.cluster.server_errors()[self.errors_seen:]
        bug = classify(Evidence(self.last, self.history, problems, errors, self.last_calls,
                                self.all_calls, self.recent, self.recent_outcomes))
        if bug is not None:
            self.log.known_hits[bug.key] += 1
            self._log(f"{what}: known bug {bug.key}: {problems[:4]}")
            return
        msg = [f"{what}: {len(problems)} problem(s)", *("  " + p for p in problems[:40])]
        trace = self.driver.cluster.log_path.parent / f"trace-{self.w.machine}.json"
        dump_trace(trace, self.setup, self.driver.workers, self.all_calls)
        msg += [f"--- replay: python -m tests.concurrency.replay {trace} --times 10 ---"]
        msg += ["--- setup ---", f"  {self.setup}", "--- trace (resolved) ---"]
        msg += ["  " + t for t in self.trace]
        if errors:
            msg += ["--- server errors ---", *("  " + e for e in errors[-10:])]
        self.log.failures.append("\n".join(msg))

    # -- rules -----------------------------------------------------------------------------

    @initialize(setup=st.runner().flatmap(lambda self: self.setup_strategy))
    def start(self, setup: Setup) -> None:
        if self.broken:
            return
        self.setup = setup
        self.log.examples += 1
        self.errors_seen = len(self.driver.cluster.server_errors())
        self.driver.run(self._start(setup))

    async def _start(self, setup: Setup) -> None:
        k = self.driver.on(0)
        mid = await k.create_machine(setup.config())
        self.world = World(mid, setup.nodes, setup.memcgs)
        for (name, pages), prefill in zip(FILE_PAGES.items(), setup.prefill, strict=True):
            await k.create_file(mid, FileSpec(name, pages, prefill=prefill,
                                              kind=FILE_KINDS[name]))
        for i, (node, cg) in enumerate(setup.procs):
            spec = ProcessSpec(memcg=setup.memcgs[cg % len(setup.memcgs)],
                               node=node % setup.nodes)
            pid = await self.driver.on(i).create_process(mid, spec)
            self.w.procs.append(Proc(pid, i % self.driver.workers))
        self._log(f"machine {mid}: {setup}")

    @rule(ops=st.lists(abstract_ops(), min_size=2, max_size=6), then=st.integers(0, 7))
    def step(self, ops: list[AbstractOp], then: int) -> None:
        """Issue the ops at once; ``then`` 0: quiesce and check now, 1: also reclaim first."""
        if self.broken:
            return
        calls = exclusive_isolation(exclusive_fork(
            [resolve(op, self.w, self.driver.workers) for op in ops]))
        for c in calls:
            if c.kind == "mmap" and c.mmap is not None and (
                    c.mmap.flags & MAP_SHARED and c.mmap.flags & MAP_ANONYMOUS):
                self.w.shm_files += 1

        async def run() -> list[Outcome | BaseException]:
            return list(await asyncio.gather(
                *(execute(self.driver.on(c.cpu), self.w.machine, c) for c in calls),
                return_exceptions=True))

        self.last_calls = calls
        self.all_calls.append(calls)
        self.recent.append(calls)
        results = self.driver.run(run())
        self.steps += 1
        self.log.steps += 1
        self.last = [r for r in results if isinstance(r, Outcome)]
        self.history += self.last
        self.recent_outcomes += self.last
        self.since_quiesce += 1
        faults: list[str] = []
        lines = []
        for c, r in zip(calls, results, strict=True):
            if isinstance(r, Outcome):
                apply(self.w, r)
                self.log.tally.add(r)
                event(f"{c.kind}: {'ok' if r.ok else r.errno}")
                lines.append(r.describe())
            elif isinstance(r, ServerFaultError):
                faults.append(str(r))
                lines.append(f"{c.describe()} = SERVER FAULT")
            else:
                faults.append(f"{c.describe()}: {type(r).__name__}: {r}")
                lines.append(f"{c.describe()} = {type(r).__name__}")
        self._log(f"step {self.steps}: " + " || ".join(lines))
        if faults:
            self.fail(f"step {self.steps}", faults)
            return
        if then <= 1:
            self._quiesce(self.steps, reclaim=then == 1)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def always(self) -> None:
        if self.world is None or self.broken:
            return
        k = self.driver.on(self.steps)
        try:
            violations = self.driver.run(k.check(self.w.machine, False)).violations
        except MmsvcError as e:
            violations = [f"Check(drain_all=False) on cpu {self.steps % self.driver.workers}: "
                          f"{e.code.name}: {e.message}"]
        if violations:
            self.fail(f"Check(drain_all=False) after step {self.steps}", violations)
            return
        if self.since_quiesce >= QUIESCE_EVERY:
            self._quiesce(self.steps, reclaim=self.steps % 2 == 0)

    def _quiesce(self, cpu: int, reclaim: bool) -> None:
        self.since_quiesce = 0
        try:
            problems = self.driver.run(self._quiesced_problems(cpu, reclaim))
        except MmsvcError as e:
            problems = [f"quiescent check (drain/check/views): {e.code.name}: {e.message}"]
        if not problems:
            self.recent, self.recent_outcomes = [], []
        else:
            self.fail(f"quiescent check after step {self.steps} (cpu {cpu % self.driver.workers}"
                      f"{', reclaim pass' if reclaim else ''})", problems)

    async def _quiesced_problems(self, cpu: int, reclaim: bool) -> list[str]:
        d, w = self.driver, self.w
        await d.on(cpu).drain(w.machine, True)
        report = await d.on(cpu + 1).check(w.machine, True)
        problems = list(report.violations)
        if problems:
            return problems
        snap = await snapshot(d.on(cpu), w)
        problems += view_violations(snap, w)
        if problems or not reclaim:
            return problems
        # reclaim repairs undercounts (§5); nothing it does may break an invariant
        for node in range(w.nodes):
            await d.on(cpu + node).reclaim(w.machine, node, None, 64)
        await d.on(cpu).drain(w.machine, True)
        report = await d.on(cpu + 1).check(w.machine, True)
        problems += [f"after reclaim: {p}" for p in report.violations]
        if not problems:
            snap = await snapshot(d.on(cpu), w)
            problems += [f"after reclaim: {p}" for p in view_violations(snap, w)]
        return problems

    def teardown(self) -> None:
        if self.world is None:
            return
        try:
            if not self.broken:
                self._quiesce(self.steps, reclaim=False)
            if not self.broken:
                try:
                    problems = self.driver.run(self._exit_all())
                except MmsvcError as e:
                    problems = [f"teardown: {e.code.name}: {e.message}"]
                if problems:
                    self.fail("after every process exited", problems)
        finally:
            with contextlib.suppress(MmsvcError):
                self.driver.run(self.driver.on(0).delete_machine(self.w.machine))

    async def _exit_all(self) -> list[str]:
        d, w = self.driver, self.w
        live = w.live()
        results = await asyncio.gather(
            *(d.on(i).exit(w.machine, p.pid) for i, p in enumerate(live)),
            return_exceptions=True)
        problems = [f"exit of pid {p.pid}: {r}" for p, r in zip(live, results, strict=True)
                    if isinstance(r, BaseException)]
        self._log("teardown: exit " + ", ".join(str(p.pid) for p in live))
        await d.on(1).drain(w.machine, True)
        report = await d.on(0).check(w.machine, True)
        problems += report.violations
        problems += final_violations(await d.on(1).vmstat(w.machine),
                                     report.known_exceptions.get("X4", 0))
        return problems


def machine_class(driver: Driver,
                  strategy: st.SearchStrategy[Setup] | None = None) -> type[ConcurrencyMachine]:
    """A ConcurrencyMachine bound to a driver (Hypothesis instantiates it per example)."""
    attrs: dict[str, object] = {"driver": driver, "log": RunLog()}
    if strategy is not None:
        attrs["setup_strategy"] = strategy
    return type(f"ConcurrencyMachine{driver.workers}", (ConcurrencyMachine,), attrs)


def run_machine(driver: Driver, *, examples: int, steps: int,
                strategy: st.SearchStrategy[Setup] | None = None) -> RunLog:
    """Run the state machine; fail the test on the first violation (with its trace), xfail
    it when only known bugs (known_bugs.py) were hit."""
    cls = machine_class(driver, strategy)
    run_state_machine_as_test(cls, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
        database=None))
    log = cls.log
    outcomes = ", ".join(f"{k}={n}" for k, n in sorted(log.tally.outcomes.items()))
    hits = ", ".join(f"{k} x{n}" for k, n in log.known_hits.items()) or "none"
    print(f"\n{driver.workers} workers: {log.examples} examples, {log.steps} steps; known bugs "
          f"hit (examples stopped): {hits}; outcomes: {outcomes}")
    if log.failures:
        pytest.fail(log.failures[0], pytrace=False)
    if log.known_hits:
        pytest.xfail(f"known emulator bugs hit (see known_bugs.py): {hits}")
    return log
