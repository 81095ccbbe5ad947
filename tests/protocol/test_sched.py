"""Tasks moving between the CPUs of one worker at reschedule points (spec §10.1,
mm/sched.py, server/smp.py).  With two CPUs and ``task_migrate_permille`` 1000 a task moves
at every reschedule point, so each scenario is deterministic."""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.mlock import WALK_CHUNK
from mmsvc.mm.types import MachineConfig, MmapArgs, ProcessSpec
from mmsvc.server.smp import SmpKernel
from mmsvc.store import keys
from tests.protocol.world import World

P = 4096


def smp(w: World) -> SmpKernel:
    return SmpKernel([w.kernels[c] for c in sorted(w.kernels)])


async def mlock_batch(w: World, cpu: int) -> list[bytes]:
    m = await w.kernel.machine(w.mid)
    lv = m.lv_of(0, "root")
    return list(await w.store.client.lrange(f"{m.lv_key(lv)}:mlb:{cpu}", 0, -1))


def test_mlock_walk_leaves_the_first_page_tables_entries_on_the_cpu_it_left(run: Any) -> None:
    """mlock of two page-table chunks: the walk moves after the first (§10.1), queues the
    second chunk on CPU 1 and drains CPU 1 at its end (mlock_vma_pages_range); the first
    chunk's last entry (4096 = 273 x 15 + 1) stays queued on CPU 0 - mlocked (PG_mlocked is
    set at enqueue, §2.2.1) but still on its evictable LRU until CPU 0 drains."""

    async def s(w: World) -> None:
        k = smp(w)
        pages = 2 * WALK_CHUNK
        pid = await k.create_process(w.mid, ProcessSpec())
        addr = await k.mmap(w.mid, pid, MmapArgs(length=pages * P))
        await k.fault(w.mid, pid, addr, pages * P, True)
        await k.drain(w.mid, False)
        before = k.runqueues.placements[(w.mid, pid)]
        await k.mlock(w.mid, pid, addr, pages * P)
        # moves: at entry (the walk starts on the other CPU), between the walk's two chunks
        # (back), before the populate of the VMA (the other CPU again)
        start = 1 - before
        assert k.runqueues.placements[(w.mid, pid)] == start
        assert len(await mlock_batch(w, start)) == 1
        assert await mlock_batch(w, before) == []  # drained at the walk's end
        flags = await k.page_flags(w.mid, pid, addr, pages * P)
        waiting = [p for p in flags if p.lru_list != "unevictable"]
        assert len(waiting) == 1 and waiting[0].mlocked
        await k.drain(w.mid, False)  # this worker's CPUs: both
        flags = await k.page_flags(w.mid, pid, addr, pages * P)
        assert all(p.lru_list == "unevictable" and p.mlock_count == 1 for p in flags)

    run(s, frames_per_node=3 * WALK_CHUNK, task_migrate_permille=1000, worker_cpus=2)


def test_a_task_that_never_moves_leaves_no_batch_behind(run: Any) -> None:
    """The same mlock with task_migrate_permille 0: one CPU, drained by the walk's end."""

    async def s(w: World) -> None:
        k = smp(w)
        pages = 2 * WALK_CHUNK
        pid = await k.create_process(w.mid, ProcessSpec())
        cpu = k.runqueues.place(w.mid, pid)
        addr = await k.mmap(w.mid, pid, MmapArgs(length=pages * P))
        await k.fault(w.mid, pid, addr, pages * P, True)
        await k.mlock(w.mid, pid, addr, pages * P)
        assert k.runqueues.placements[(w.mid, pid)] == cpu
        assert await mlock_batch(w, 0) == [] and await mlock_batch(w, 1) == []
        assert k.runqueues.migrations == 0

    run(s, frames_per_node=3 * WALK_CHUNK, worker_cpus=2)


def test_tasks_move_at_syscall_entry_and_a_child_starts_where_its_parent_is(run: Any) -> None:
    async def s(w: World) -> None:
        k = smp(w)
        pid = await k.create_process(w.mid, ProcessSpec())
        where = []
        for _ in range(3):
            await k.setrlimit(w.mid, pid, 1 << 20, 1 << 20)  # no reschedule point inside
            where.append(k.runqueues.placements[(w.mid, pid)])
        assert where[0] != where[1] != where[2]  # 2 CPUs: every entry moves the task
        await k.proc_status(w.mid, pid)  # a view of the task, read by another one
        assert k.runqueues.placements[(w.mid, pid)] == where[2]
        child = await k.fork(w.mid, pid)
        assert k.runqueues.placements[(w.mid, child)] == k.runqueues.placements[(w.mid, pid)]
        await k.exit(w.mid, child)
        assert (w.mid, child) not in k.runqueues.placements

    run(s, task_migrate_permille=1000, worker_cpus=2)


def test_every_cpu_of_the_worker_joins_a_machine_one_of_them_serves(run: Any) -> None:
    """lru_add_drain_all() reaches the CPUs in the machine's set: a task placed on one CPU
    of the worker may move to any other, so they join together."""

    async def s(w: World) -> None:
        cpus = {int(c) for c in await w.store.client.smembers(f"{keys.machine(w.mid)}:cpus")}
        assert cpus == {0, 1}

    run(s, worker_cpus=2)


def test_task_migrate_permille_is_checked(run: Any) -> None:
    async def s(w: World) -> None:
        with pytest.raises(KernelError) as exc:
            await w.kernel.create_machine(MachineConfig(task_migrate_permille=1001))
        assert exc.value.errno == "EINVAL"

    run(s)
