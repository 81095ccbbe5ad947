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
        key="process-stall",
        summary="every call on one process of a small fuzz machine (4096 or 8192 frames, "
                "swap) runs past 30 s: its mmap_lock was held for minutes (lock_stat "
                "hold_max 242 s, wait_max 237 s, evictions), and waiters then drain the store "
                "client's connection pool (Check: UNAVAILABLE).  Seen in about 1 fuzz run in 3 "
                "during session 3 (first in a run before swap was used), never in a "
                "sequential replay; not diagnosed: the next session's first task "
                "(docs/status.md)",
        regression="",
        category="hang",
    ),
    KnownBug(
        key="process-stall-store",
        summary="the Check after a process-stall (see above) finds the store client's pool "
                "exhausted: UNAVAILABLE page store unavailable",
        regression="",
        category="check",
        method="Check",
        detail="page store unavailable",
    ),
    KnownBug(
        key="process-stall-check",
        summary="the Check (drain_all) of a machine with a stalled process (see process-stall) "
                "gives up: ABORTED the machine never became quiescent",
        regression="",
        category="check",
        method="Check",
        detail="never became quiescent",
    ),
    KnownBug(
        key="swap-refcount-underflow",
        summary="INTERNAL 'refcount underflow' from mm_pages in Madvise or Fault on the THP "
                "machine with swap (a swap-in racing MADV_PAGEOUT/reclaim: mmsvc/mm/swapfile.py, "
                "memory.py do_swap_page, vmscan.py); seen in 3 of some 8 runs",
        regression="",
        category="INTERNAL",
        log_signature="refcount underflow",
    ),
    KnownBug(
        key="swap-cache-leak",
        summary="the same race's page left with PG_swapcache outside the swap cache and one "
                "reference too many (checker S2 + A6 on the THP machine with swap)",
        regression="",
        category="check",
        method="Check",
        detail="PG_swapcache but not in the swap cache",
    ),
    KnownBug(
        key="a6-mapcount-race",
        summary="A6 violations (mapcount N != N-1 ptes, refcount one too high) on the 2-node "
                "THP machine with swap and mlock batches of 4: a page keeps a mapping whose "
                "pte is gone; seen in 4 of some 15 runs (also with the kernel of commit "
                "986b5e3 alone), never in a sequential replay of the trace (a race in the "
                "page-table / rmap paths of mmsvc/mm)",
        regression="",
        category="check",
        method="Check",
        detail="violations: A6 page",
    ),
    KnownBug(
        key="legacy-q4-race",
        summary="Q4 violations (PG_mlocked with no VM_LOCKED mapping) on the legacy-protocol "
                "machine after a fuzz run, seen once (also with the kernel of commit 986b5e3 "
                "alone): a race of the legacy munlock paths (mmsvc/mm/legacy.py)",
        regression="",
        category="check",
        method="Check",
        detail="PG_mlocked with no VM_LOCKED mapping",
    ),
    KnownBug(
        key="freed-page-program",
        summary="a page program acts on a freed page: ResponseError 'page N of {m:lv} is "
                "free' from mm_pages (INTERNAL on Exit; seen once, a race in mmsvc/mm).  The "
                "mlock/munlock walks' variant of it is fixed (docs/concurrency.md finding 16); "
                "the Exit one is not reproduced yet",
        regression="",
        category="INTERNAL",
        log_signature="is free script: mm_pages",
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
