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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .ops import Call, Outcome


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


# None open: every bug the stateful tests found is fixed (docs/concurrency.md).  Add an entry
# (key, summary, regression test, signature) when a new one is found and cannot be fixed at once.
KNOWN_BUGS: tuple[KnownBug, ...] = ()


def classify(ev: Evidence) -> KnownBug | None:
    """The known bug that explains every problem of this evidence, if any."""
    if os.environ.get("MMSVC_KNOWN_BUGS") == "fail":
        return None
    for bug in KNOWN_BUGS:
        if bug.matches(ev):
            return bug
    return None
