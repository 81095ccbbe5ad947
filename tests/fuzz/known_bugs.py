"""Server faults the fuzzer finds whose fix belongs to another part of the code.

Each has a signature: the category (and method) of the fuzzer's failure, a piece of its text,
and for server faults a piece of the server's ``rpc_internal_error`` log line that explains it.
A fuzz run whose failures are all explained (every failure matches a bug and, for bugs with a
log signature, the server log holds at least as many matching lines as there are such
failures) ends with ``pytest.xfail`` naming the bugs; anything else fails.  Each bug has a
reproduction in ``test_regressions.py`` marked ``xfail(strict=True)``: when the bug is fixed,
that test XPASSes (a failure) - delete its marker and the entry here.  Races the fuzzer hit
but that no sequential replay of its trace reproduces have no regression test yet
(``regression=""``): their entry goes when their owner fixes them.

Set ``MMSVC_KNOWN_BUGS=fail`` to make known-bug hits fail like anything else.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from loadtests.fuzz import Failure, FuzzReport


@dataclass(frozen=True)
class KnownBug:
    key: str
    summary: str
    regression: str
    category: str  # the fuzzer's failure category (INTERNAL, hang, ...)
    method: str | None = None  # the RPC that fails (None: any)
    detail: str | None = None  # in the failure's text
    log_signature: str | None = None  # in the server's rpc_internal_error line

    def matches(self, f: Failure) -> bool:
        if self.method is not None and f.method != self.method:
            return False
        if self.detail is not None and self.detail not in f.detail:
            return False
        # an INTERNAL answer to the final Check of every machine is a "check" failure
        return f.category == self.category or (f.category == "check"
                                               and self.category in f.detail)


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        key="long-call",
        summary="a call on the THP + swap machine (fuzz-numa) or the synchronous one "
                "(fuzz-sync) runs past 30 s under the fuzzer's 32 calls in flight, and the "
                "calls queued behind its locks with it (session 4: once in 4 runs; session "
                "5: once in 12 runs, and once 22 calls of machine 4 in one run while tests "
                "ran beside it).  Replayed one at a time a machine's calls take at most "
                "1.5 s each.  SIGUSR1 snapshots of the server (docs/faults.md) during a run "
                "showed the 6-12 s calls (Reclaim, Mmap, Exit) inside their store round "
                "trips, not queued on a lock: calls of hundreds of round trips each (reclaim "
                "reads rmap and vmas per page) on an event loop shared by 32 calls - slow "
                "rather than stuck; fewer round trips per page would cure it.  Session 7: "
                "reclaim went from 15 to 9 round trips per page and anonymous MADV_COLLAPSE "
                "from ~1,500 per pmd to ~10; a run (seed 2030) still ended with drain_all "
                "Checks of the synchronous machine queued one behind another (each "
                "quiesces the whole machine for 2-3 s, ten in flight): concurrent Checks "
                "now share the next one instead of each quiescing the machine",
        regression="",
        category="hang",
    ),
    KnownBug(
        key="q4-race",
        summary="Q4 (PG_mlocked with no VM_LOCKED mapping) on a fuzz machine after the run. "
                "Session 5 found the legacy machine's cause (docs/concurrency.md finding 31: "
                "MADV_DONTNEED_LOCKED zapped VM_LOCKED ptes of shared pages with no legacy "
                "munlock; a 5.17 kernel refuses that advice now) and three PTL orderings of "
                "rmap walkers against mlock (findings 28, 29); kept while fuzz runs with "
                "seed 4 have not shown it gone for long - if it shows again, replay the "
                "trace (loadtests.fuzz --replay TRACE --machine M --check-every 1) to find "
                "the first call that leaves it",
        regression="",
        category="check",
        method="Check",
        detail="PG_mlocked with no VM_LOCKED mapping",
    ),
    KnownBug(
        key="a6-mapcount-race",
        summary="A6 violations (mapcount N != N-1 ptes, refcount one too high) on the 2-node "
                "THP machine with swap and mlock batches of 4: a page keeps a mapping whose "
                "pte is gone; seen in 4 of some 15 runs in session 3 and in 1 of 6 runs "
                "after the lock lease fixes of session 4 (seed 6), never in a sequential "
                "replay: a race in the page-table / rmap paths of mmsvc/mm",
        regression="",
        category="check",
        method="Check",
        detail="violations: A6 page",
    ),
)


def explain(report: FuzzReport, bugs: Sequence[KnownBug] = KNOWN_BUGS,
            ) -> tuple[list[KnownBug], list[Failure]]:
    """The known bugs this run hit, and the failures none of them explains."""
    if os.environ.get("MMSVC_KNOWN_BUGS") == "fail":
        return [], list(report.failures)
    logged = Counter[str]()
    for line in report.server_errors:
        for bug in bugs:
            if (bug.log_signature is not None and line.startswith("rpc_internal_error")
                    and bug.log_signature in line):
                logged[bug.key] += 1
    hit: Counter[str] = Counter()
    unexplained: list[Failure] = []
    for f in report.failures:
        bug = next((b for b in bugs if b.matches(f)), None)
        if bug is not None and (bug.log_signature is None or hit[bug.key] < logged[bug.key]):
            hit[bug.key] += 1
        else:
            unexplained.append(f)
    return [b for b in bugs if hit[b.key]], unexplained
