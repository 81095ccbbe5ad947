"""rich renderings of the kernel's views (vmstat, meminfo, lock_stat, checker report).

Times are microseconds, as in /proc/lock_stat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich import box
from rich.table import Table
from rich.text import Text

from mmsvc.mm.types import CheckReport, LockStatRow

#: Counters the mlock protocol is about; always shown (spec §7.1).
UNEVICTABLE_COUNTERS = (
    "unevictable_pgs_culled",
    "unevictable_pgs_scanned",
    "unevictable_pgs_rescued",
    "unevictable_pgs_mlocked",
    "unevictable_pgs_munlocked",
    "unevictable_pgs_cleared",
    "unevictable_pgs_stranded",
)


def vmstat_table(
    counters: Mapping[str, int],
    baseline: Mapping[str, int] | None = None,
    show_all: bool = False,
    title: str = "vmstat",
) -> Table:
    """Counters (and their deltas against ``baseline``): the unevictable_* ones always, the
    rest when non-zero (or changed), every one with ``show_all``."""
    table = Table(title=title, title_justify="left")
    table.add_column("counter")
    table.add_column("value", justify="right")
    if baseline is not None:
        table.add_column("Δ", justify="right")
    names = list(UNEVICTABLE_COUNTERS)
    for name in sorted(counters):
        if name in UNEVICTABLE_COUNTERS:
            continue
        changed = baseline is not None and counters[name] != baseline.get(name, 0)
        if show_all or counters[name] or changed:
            names.append(name)
    for name in names:
        value = counters.get(name, 0)
        row = [name, str(value)]
        if baseline is not None:
            delta = value - baseline.get(name, 0)
            row.append(f"{delta:+d}" if delta else "0")
        table.add_row(*row)
    return table


#: /proc/meminfo's own order for the fields the emulator reports.
MEMINFO_ORDER = (
    "MemTotal",
    "MemFree",
    "Active(anon)",
    "Inactive(anon)",
    "Active(file)",
    "Inactive(file)",
    "Unevictable",
    "Mlocked",
)


def meminfo_table(fields: Mapping[str, int], title: str = "meminfo") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("field")
    table.add_column("kB", justify="right")
    rank = {name: i for i, name in enumerate(MEMINFO_ORDER)}
    for name in sorted(fields, key=lambda n: (rank.get(n, len(rank)), n)):
        table.add_row(name, str(fields[name]))
    return table


def _us(value: float) -> str:
    return f"{value:.2f}"


def lock_stat_table(
    rows: Sequence[LockStatRow], title: str = "lock_stat", wide: bool = False
) -> Table:
    """/proc/lock_stat rows, most contended first (times in µs).

    The default view fits 80 columns (contentions, wait avg/max, acquisitions, hold avg/max);
    ``wide`` shows every /proc/lock_stat column.
    """
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("class name", no_wrap=True)
    table.add_column("instance", no_wrap=True)
    columns: tuple[str, ...]
    if wide:
        columns = (
            "con-bounces", "contentions", "waittime-min", "waittime-max", "waittime-total",
            "waittime-avg", "acq-bounces", "acquisitions", "holdtime-min", "holdtime-max",
            "holdtime-total", "holdtime-avg",
        )
    else:
        columns = ("contentions", "wait avg", "wait max", "acquisitions", "hold avg", "hold max")
        # narrow headers: 80 columns must do
        columns = tuple(c.replace("contentions", "cont").replace("acquisitions", "acq")
                        for c in columns)
    for col in columns:
        table.add_column(col, justify="right")
    ordered = sorted(rows, key=lambda r: (-r.contentions, -r.acquisitions, r.lock_class))
    for r in ordered:
        wait_avg = r.waittime_total / r.contentions if r.contentions else 0.0
        hold_avg = r.holdtime_total / r.acquisitions if r.acquisitions else 0.0
        if wide:
            cells = [
                str(r.con_bounces), str(r.contentions), _us(r.waittime_min),
                _us(r.waittime_max), _us(r.waittime_total), _us(wait_avg),
                str(r.acq_bounces), str(r.acquisitions), _us(r.holdtime_min),
                _us(r.holdtime_max), _us(r.holdtime_total), _us(hold_avg),
            ]
        else:
            cells = [
                str(r.contentions), _us(wait_avg), _us(r.waittime_max),
                str(r.acquisitions), _us(hold_avg), _us(r.holdtime_max),
            ]
        table.add_row(r.lock_class, r.instance, *cells)
    return table


def check_text(report: CheckReport) -> Text:
    verdict = Text("OK", style="bold green") if report.ok else Text("FAILED", style="bold red")
    text = Text("checker: ")
    text.append_text(verdict)
    text.append(
        f"  pages checked {report.pages_checked}, quiescent {report.quiescent}, "
        f"undercounts {report.undercounts}"
    )
    if report.known_exceptions:
        known = ", ".join(f"{k}={v}" for k, v in sorted(report.known_exceptions.items()))
        text.append(f", known exceptions {known}")
    for violation in report.violations:
        text.append(f"\n  violation: {violation}", style="red")
    return text
