"""Detect other user tasks that ran on the scenario CPU during an attempt.

Why: the per-CPU lru_add and mlock batches are shared by everything that runs on a CPU.  A
neighbour that only faults pages there never moves the unevictable counters, yet it flushes the
lru_add batch and changes what a snapshot sees (e.g. the `lru` bit of fresh anon pages), and it
does so the same way in every run, so comparing runs cannot catch it.  Scanning the tasks before
and after the attempt can: a foreign user task whose last CPU is the scenario CPU and whose
sum_exec_runtime grew has run there.

Limits: kernel threads are ignored (kworker/vmstat_update runs on every busy CPU and is
harmless; a remote lru_add_drain_all also runs in a kworker and is only caught when it moves a
counter), and a task that ran on the scenario CPU and then migrated away, or was born and died
within the attempt, is missed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class Task:
    tgid: int
    comm: str
    cpu: int
    runtime_ns: int
    faults: int


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def scan_user_tasks() -> dict[int, Task]:
    """tid -> Task for every user-space thread (kernel threads skipped)."""
    tasks: dict[int, Task] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            stat = _read(f"/proc/{pid}/task/{tid}/stat")
            sched = _read(f"/proc/{pid}/task/{tid}/schedstat")
            if not stat or not sched:
                continue
            comm = stat[stat.find("(") + 1 : stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[6]) & PF_KTHREAD:
                continue
            faults = int(fields[7]) + int(fields[9])  # minflt + majflt
            tasks[int(tid)] = Task(int(pid), comm, int(fields[36]), int(sched.split()[0]), faults)
    return tasks


def foreign_runs(
    before: dict[int, Task],
    after: dict[int, Task],
    cpu: int,
    our_tgids: set[int],
    our_tids: set[int],
) -> list[str]:
    """Describe the foreign tasks that ran and faulted on CPU between the two scans.

    our_tgids are whole processes of the attempt (coordinator, scenario processes); our_tids
    are single threads (the driver thread: other threads of the driver's process are not
    pinned, so they count as neighbours).
    """
    found = []
    for tid, now in after.items():
        if now.tgid in our_tgids or tid in our_tids:
            continue
        old = before.get(tid)
        ran = now.runtime_ns - (old.runtime_ns if old else 0)
        faults = now.faults - (old.faults if old else 0)
        on_cpu = now.cpu == cpu or (old is not None and old.cpu == cpu)
        if ran > 0 and faults > 0 and on_cpu:
            found.append(f"{now.comm}[{tid}] ran {ran // 1000} us, {faults} faults")
    return found
