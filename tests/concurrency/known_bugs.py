"""Emulator bugs these tests found and that are not fixed yet, with the signature by which a
random run recognises them.

When a violation is fully explained by a known bug (its signature matches every problem and
the example issued the triggering calls), the state machine stops checking that
example ("tainted") instead of failing, and the test ends with ``pytest.xfail`` naming the bugs
it hit.  Any other violation fails the test as usual.  Each bug has a deterministic-as-possible
reproduction in ``test_regressions.py`` (``xfail(strict=True)``): when a bug is fixed, its
regression test XPASSes (a failure) - delete its entry here and its xfail marker there.

Set ``MMSVC_KNOWN_BUGS=fail`` to make known-bug hits fail like any other violation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmsvc.mm.types import Advice

from .ops import Call, Outcome

_A6_OVER = re.compile(
    r"^(?:after reclaim: )?(?:view )?A6 page (\S+).*: "
    r"(?:mapcount (\d+) != (\d+) ptes|refcount (\d+) != (\d+))")


def _a6_only(problems: Sequence[str]) -> bool:
    """Every problem is an A6 mapcount/refcount mismatch (either direction), or a pte left
    pointing to a freed page (what a lost mapcount/refcount ends in)."""
    return bool(problems) and all(
        _A6_OVER.match(p) or "maps a freed page" in p for p in problems)


FAULTING_CALLS = ("fault(", "mlock(", "mlockall(", "mmap(", "madvise(", "mprotect(")


def _underflow_in(problems: Sequence[str], errors: Sequence[str], calls: Sequence[str]) -> bool:
    """Every problem is a server fault of one of ``calls``, and every new INTERNAL in the log
    is a mapcount/refcount underflow in a page program."""
    internal = [e for e in errors if e.startswith("rpc_internal_error")]
    return bool(problems) and bool(internal) and all(
        any(c in p for c in calls) and "INTERNAL" in p for p in problems) and all(
        "mapcount underflow" in e or "refcount underflow" in e for e in internal)


def _raced_fault(outcomes: Sequence[Outcome]) -> bool:
    return any(o.errno == "EAGAIN" and o.message.startswith("concurrent fault")
               for o in outcomes)


def _same_pid_faults(calls: Sequence[Call]) -> bool:
    """Two calls of one process in the step could fault the same ptes (populate paths swallow
    the EAGAIN of a lost race: mlockall, MAP_POPULATE)."""
    pids = [c.pid for c in calls if c.kind in ("fault", "mlock", "mlockall", "mmap", "madvise",
                                                "mprotect")]
    return len(pids) != len(set(pids))


def _q3_only(problems: Sequence[str]) -> bool:
    return bool(problems) and all(
        re.match(r"^(?:after reclaim: )?(?:view )?Q3 .*(?:overcount|locked mappings)", p)
        for p in problems)


def _reclaimed(outcomes: Sequence[Outcome], problems: Sequence[str] = ()) -> bool:
    """A reclaim ran: a Reclaim or MADV_PAGEOUT call of the window, or the reclaim pass of the
    quiescent check (whose problems are prefixed "after reclaim:")."""
    if any(p.startswith("after reclaim: ") for p in problems):
        return True
    return any(o.ok and (o.call.kind == "reclaim" or (
        o.call.kind == "madvise" and o.call.flags == int(Advice.MADV_PAGEOUT)))
        for o in outcomes)


def _multi_cpu(steps: Sequence[Sequence[Call]]) -> bool:
    """Some process had calls on two different CPUs (its batch entries can be left behind)."""
    cpus: dict[int, set[int]] = {}
    for step in steps:
        for c in step:
            if c.pid:
                cpus.setdefault(c.pid, set()).add(c.cpu)
    return any(len(v) > 1 for v in cpus.values())


def _left_cache_only(problems: Sequence[str]) -> bool:
    return bool(problems) and all(
        "a mapped page left the page cache" in p or "not on any LRU list after a drain" in p
        or re.match(r"^(?:after reclaim: )?view A1: nr_mlock", p) is not None
        or re.match(r"^(?:after reclaim: )?view A3: nr_unevictable", p) is not None
        for p in problems) and any("a mapped page left the page cache" in p for p in problems)


def _reclaim_next_to_fault(step: Sequence[Call]) -> bool:
    """Something that can take a page out of the page cache (reclaim, MADV_PAGEOUT, or a
    migration replacing it) ran next to a faulting call."""
    kinds = {c.kind for c in step}
    return bool(kinds & {"reclaim", "madvise", "migrate"}) and bool(
        kinds & {"fault", "mlock", "mlockall", "mmap", "madvise", "mprotect"})


def _reclaim_raced_fault(ev: Evidence) -> bool:
    """A step ran reclaim (or MADV_PAGEOUT) next to a faulting call, and the damage is a
    mapped page out of the page cache (seen at the next quiescent check), or - in that very
    step - a faulting call hitting a freed page."""
    internal = [e for e in ev.errors if e.startswith("rpc_internal_error")]
    if internal:
        if not all("is free" in e for e in internal):
            return False
        if _reclaim_next_to_fault(ev.last_calls) and all(
                any(c in p for c in FAULTING_CALLS) and "INTERNAL" in p for p in ev.problems):
            return True
        # later fallout of the same race: a pte left pointing to the freed page makes the
        # next unmap of it (munmap, exit, DONTNEED) hit the free struct page
        return any(_reclaim_next_to_fault(step) for step in ev.steps) and all(
            "INTERNAL" in p for p in ev.problems)
    return any(_reclaim_next_to_fault(step) for step in ev.steps) and _left_cache_only(
        ev.problems)


@dataclass(frozen=True)
class Evidence:
    """What a failed check saw: the latest step's outcomes, every outcome of the example, the
    problems reported and the new error lines of the server log."""

    last: Sequence[Outcome]
    history: Sequence[Outcome]
    problems: Sequence[str]
    errors: Sequence[str]
    last_calls: Sequence[Call] = ()
    steps: Sequence[Sequence[Call]] = ()  # every step's calls
    recent: Sequence[Sequence[Call]] = ()  # the steps since the last passing quiescent check
    recent_outcomes: Sequence[Outcome] = ()


@dataclass(frozen=True)
class KnownBug:
    key: str
    summary: str
    regression: str
    matches: Callable[[Evidence], bool]


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        key="cow-fault-race",
        summary="two COW faults of one process on the same pte: a failed claim (Faults._claim) "
                "restores the original pte over the OTHER fault's identical busy marker, "
                "after which that fault's page_remove_rmap of the old page is not undone "
                "when its install fails: the old page is mapped once more than counted (A6, "
                "or a 'mapcount underflow' INTERNAL at a later unmap)",
        regression="test_cow_fault_race_keeps_old_page_accounting",
        matches=lambda ev: (_raced_fault(ev.recent_outcomes)
                            or any(_same_pid_faults(step) for step in ev.recent)) and (
            _a6_only(ev.problems) or _underflow_in(ev.problems, ev.errors, FAULTING_CALLS)),
    ),
    KnownBug(
        key="reclaim-restore-double-mlock",
        summary="reclaim restores a 'missed' mlock the concurrent fault already queued: "
                "vmscan.shrink_folio_list judges evictability on records read before the loop "
                "and holds no page lock up to its rmap walk, and file faults take no page "
                "lock, so fault (PG_mlocked + LRU_PAGE entry) and reclaim (a 2nd LRU_PAGE "
                "entry) both count one mapping after the putback: mlock_count 2 > M(p) 1 (Q3)",
        regression="test_reclaim_vs_locked_fault_overcounts",
        matches=lambda ev: _reclaimed(ev.history, ev.problems) and _q3_only(ev.problems),
    ),
    KnownBug(
        key="cross-cpu-residue",
        summary="(spec-level) an LRU_PAGE entry a fault in a VM_LOCKED vma left in another "
                "CPU's mlock batch survives munlock (which drains the local CPU only) and, "
                "processed after a re-mlock culled the page with count 1, raises mlock_count "
                "to 2 while M(p) = 1 (Q3); the emulator follows §2.2/§2.4/§3.6 here",
        regression="test_cross_cpu_residue_overcounts",
        matches=lambda ev: not _reclaimed(ev.history, ev.problems) and _multi_cpu(ev.steps)
        and _q3_only(ev.problems),
    ),
    KnownBug(
        key="reclaim-vs-fault-pagecache",
        summary="file faults look pages up in the page cache without a reference or the page "
                "lock and Vmscan._remove_from_cache has no refcount freeze: a fault racing "
                "reclaim maps a page reclaim then drops from the page cache and the LRU, or "
                "frees ('page N is free' INTERNAL in the fault); a migration replacing the "
                "page cache page (its freeze succeeds: the fault holds no reference) does "
                "the same",
        regression="test_reclaim_racing_read_fault_uncaches_mapped_page",
        matches=_reclaim_raced_fault,
    ),
)


def classify(ev: Evidence) -> KnownBug | None:
    """The known bug that explains every problem of this evidence, if any."""
    if os.environ.get("MMSVC_KNOWN_BUGS") == "fail":
        return None
    for bug in KNOWN_BUGS:
        if bug.matches(ev):
            return bug
    return None
