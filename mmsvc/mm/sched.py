"""kernel/sched, as far as mlock cares: which CPU a task runs on, and its moves between CPUs at
reschedule points (spec §10.1 "task CPU-migration probability at reschedule points", §1.9).

A task adds to the batches of the CPU it runs on; when it is moved between two steps of one
syscall, the entries of the first steps stay queued on the CPU it left.  That is what made
migration fail in [11/13] (a munlock queued on the old CPU holds the page's reference, so the
freeze fails) and what leaves the cross-CPU residue of §8.3 rows 11-12.

A worker process runs one or more CPUs (``mmsvc serve --cpus-per-worker``).  A task moves
only between the CPUs of the worker serving its syscall: their batches are in this process,
where taking a batch (``CpuBatches.lock``) is the local_lock/preempt_disable it stands for.
"""

from __future__ import annotations

import random
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass
class TaskPlacement:
    """The CPU a task runs on; ``migrations`` counts its moves (se.nr_migrations)."""

    cpu: int
    migrations: int = 0


#: The task of the syscall running in this asyncio task (None: not placed - the CPU whose
#: kernel object runs the code is the task's CPU, as with one CPU per worker).  Mutable, so
#: that whoever placed the task reads where the syscall left it.
TASK: ContextVar[TaskPlacement | None] = ContextVar("mmsvc_task", default=None)


class RunQueues:
    """The CPUs of one worker process, and where its tasks ran last."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.cpus: list[int] = []
        self.placements: dict[tuple[str, int], int] = {}  # (machine, pid) -> CPU
        self.migrations = 0  # every move of every task (a metric)

    def add(self, cpu: int) -> None:
        if cpu not in self.cpus:
            self.cpus.append(cpu)

    def place(self, machine: str, pid: int) -> int:
        """The CPU a task runs on at syscall entry: where it ran last, or, for a task this
        worker has not run yet, a CPU chosen by its pid (spread like a scheduler would)."""
        cpu = self.placements.get((machine, pid))
        if cpu is None or cpu not in self.cpus:
            cpu = self.cpus[pid % len(self.cpus)]
        return cpu

    def moves(self, permille: int) -> bool:
        """A reschedule point: does the task move (probability permille/1000)?"""
        return len(self.cpus) > 1 and permille > 0 and self.rng.randrange(1000) < permille

    def move(self, task: TaskPlacement) -> int:
        """Move the task to another of these CPUs (uniformly), return the new CPU."""
        others = [c for c in self.cpus if c != task.cpu]
        task.cpu = self.rng.choice(others)
        task.migrations += 1
        self.migrations += 1
        return task.cpu

    def forget(self, machine: str, pid: int | None = None) -> None:
        """A task exited (pid) or its machine was deleted (no pid)."""
        if pid is not None:
            self.placements.pop((machine, pid), None)
            return
        for key in [k for k in self.placements if k[0] == machine]:
            del self.placements[key]
