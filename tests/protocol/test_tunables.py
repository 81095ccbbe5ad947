"""Spec §10.1 tunables: each alternative reproduces the design the thread considered, and each
test fails when its setting is ignored (the defaults are covered by test_rework_scenarios.py).

Interleavings that need two CPUs at a precise point (S14, S23) are driven step by step: the
racing operation is paused at a named step (an asyncio.Event) while the other one runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.migrate import MigrateStats
from mmsvc.mm.mm_struct import load_mm
from mmsvc.mm.page import PG
from mmsvc.mm.sched import TASK, TaskPlacement
from mmsvc.mm.types import (
    MCL_FUTURE,
    MCL_ONFAULT,
    MLOCK_ONFAULT,
    FileSpec,
    FinalClearance,
    MachineConfig,
    MigrationDrain,
    MlockBatchScope,
    MlockCountInitCull,
    MlockCountInitLruAdd,
    MunlockHookPosition,
    PageInfo,
)
from mmsvc.mm.vma import VM
from mmsvc.store.embedded import EmbeddedRedis
from tests.protocol.world import World, sub


def run_unchecked(server: EmbeddedRedis, scenario: Callable[[World], Awaitable[None]],
                  **cfg: object) -> None:
    """Like the ``run`` fixture, for scenarios whose point is what the checker reports."""

    async def main() -> None:
        world = await World.create(server.url, **cfg)
        try:
            await scenario(world)
        finally:
            await world.close()

    asyncio.run(main())


def ref(page: PageInfo) -> tuple[int, int]:
    return page.pfn >> 32, page.pfn & 0xFFFFFFFF


async def violations(w: World) -> list[str]:
    return (await w.kernel.check(w.mid, True)).violations


# ------------------------------------------------------------------ vm_io_guard (S23) ------

async def mlock_racing_migration_restore(w: World) -> tuple[int, int]:
    """S23: the page's pte in p1's vma V is a migration entry when mlock(V) starts; the
    migration (CPU 1, started through p2's unlocked mapping) restores it between mlock's
    VM_LOCKED store and its walk.  Returns (p1, p2); the page is migrated to node 1."""
    await w.file("f", 1, prefill=True)
    p1, p2 = await w.proc(), await w.proc()
    await w.mmap(p1, "v", 1, file="f", shared=True)
    await w.mmap(p2, "w", 1, file="f", shared=True)
    await w.touch(p1, "v", write=False)
    await w.touch(p2, "w", write=False)
    await w.drain()
    m = await w.on(1).machine(w.mid)  # CPU 1 serves the machine (drain_all reaches it)
    lv, idx = ref((await w.pages(p2, "w"))[0])

    migrator = w.on(1).migrator
    unmapped, in_window = asyncio.Event(), asyncio.Event()
    freeze = migrator._freeze

    async def freeze_in_window(*args: Any) -> bool:
        unmapped.set()  # both ptes are migration entries now
        await in_window.wait()
        return await freeze(*args)

    migrator._freeze = freeze_in_window  # type: ignore[method-assign]
    stats = MigrateStats()
    migration = asyncio.create_task(
        migrator.migrate_page(m, lv, idx, m.lv_of(1, "root"), stats))
    await unmapped.wait()

    mlocks = w.kernel.mlocks
    walk = mlocks.walk_vma

    async def walk_after_restore(*args: Any) -> None:
        in_window.set()  # VM_LOCKED (and VM_IO, with the guard) is stored: let it restore
        await migration
        await walk(*args)

    mlocks.walk_vma = walk_after_restore  # type: ignore[method-assign]
    await w.mlock(p1, "v")
    assert (stats.migrated, stats.failed) == (1, 0)
    assert (await w.pages(p1, "v"))[0].node == 1
    return p1, p2


def test_s23_vm_io_guard_keeps_the_restore_from_counting(run: Any) -> None:
    async def s(w: World) -> None:
        p1, _ = await mlock_racing_migration_restore(w)
        await w.drain_all()
        page = (await w.pages(p1, "v"))[0]
        # the mlock filter declined inside the VM_IO window; the walk counted the pte once
        assert (page.mlocked, page.unevictable, page.mlock_count) == (True, True, 1)
        await w.munlock(p1, "v")
        await w.drain_all()
        page = (await w.pages(p1, "v"))[0]
        assert (page.mlocked, page.unevictable) == (False, False)

    run(s, nodes=2)


def test_s23_without_the_vm_io_guard_the_page_is_double_counted(
        protocol_redis: EmbeddedRedis) -> None:
    async def s(w: World) -> None:
        p1, _ = await mlock_racing_migration_restore(w)
        await w.drain_all()
        page = (await w.pages(p1, "v"))[0]
        assert (page.mlocked, page.mlock_count) == (True, 2)  # restore + walk: M(p) = 1
        await w.munlock(p1, "v")
        await w.drain_all()
        page = (await w.pages(p1, "v"))[0]
        # "left unevictable indefinitely though the area is munlocked" (§3.6, §8.4)
        assert (page.mlocked, page.unevictable, page.mlock_count, page.vma_locked) == (
            True, True, 1, False)
        found = await violations(w)
        assert any(v.startswith("Q3 ") for v in found), found
        assert any(v.startswith("Q4 ") for v in found), found

    run_unchecked(protocol_redis, s, nodes=2, vm_io_guard=False)


# --------------------------------------------------------------- migration_drain (S14) ------

async def locked_twice(w: World) -> tuple[int, PageInfo]:
    """S13's page: mapped by two VM_LOCKED vmas of one process, mlock_count 2."""
    await w.file("f", 1, prefill=True)
    p = await w.proc()
    await w.mmap(p, "a", 1, file="f", shared=True)
    await w.mmap(p, "b", 1, file="f", shared=True)
    await w.mlock(p, "a")
    await w.mlock(p, "b")
    await w.drain()
    page = (await w.pages(p, "a"))[0]
    assert page.mlock_count == 2
    return p, page


async def migrate_without_lru_cache_disable(w: World, page: PageInfo) -> MigrateStats:
    """migrate_pages as compaction or NUMA balancing call it: no lru_cache_disable()
    (move_pages(2) disables the LRU caches, which flushes every entry at once)."""
    m = await w.kernel.machine(w.mid)
    lv, idx = ref(page)
    stats = MigrateStats()
    await w.kernel.migrator.migrate_page(m, lv, idx, m.lv_of(1, "root"), stats)
    return stats


def test_s14_without_migration_drains_the_freeze_fails_every_retry(run: Any) -> None:
    async def s(w: World) -> None:
        p, page = await locked_twice(w)
        stats = await migrate_without_lru_cache_disable(w, page)
        assert (stats.migrated, stats.failed) == (0, 1)  # EAGAIN after every pass
        await w.drain_all()
        old = (await w.pages(p, "a"))[0]
        # still the old page; the queued munlocks ran after the restore had re-set
        # PG_mlocked: they clear it (count 0, "assume that was the last mlock", §2.6.3)
        assert (old.pfn, old.node, old.mlocked, old.lru_list) == (
            page.pfn, 0, False, "inactive_anon")
        assert (await w.kernel.check(w.mid, True)).undercounts == 1  # M = 2: allowed (Q5)

    run(s, nodes=2, migration_drain=MigrationDrain.OFF)


def test_s14_rmap_walk_level_drain_is_enough_when_the_task_stays(run: Any) -> None:
    async def s(w: World) -> None:
        p, page = await locked_twice(w)
        stats = await migrate_without_lru_cache_disable(w, page)
        assert (stats.migrated, stats.failed) == (1, 0)
        await w.drain_all()
        new = (await w.pages(p, "a"))[0]
        assert (new.node, new.mlocked, new.mlock_count) == (1, True, 2)

    run(s, nodes=2, migration_drain=MigrationDrain.RMAP_WALK_LEVEL)


@pytest.mark.parametrize("mode,migrated", [
    (MigrationDrain.RMAP_WALK_LEVEL, 0),  # residue on CPU 1 fails the freeze (S14)
    (MigrationDrain.AFTER_EACH_LOCKED_UNMAP, 1),  # 11/13: each unmap drained where it ran
])
def test_s14_task_moved_between_unmaps(run: Any, mode: MigrationDrain, migrated: int) -> None:
    """The migrating task runs on one of a worker's two CPUs and moves at every reschedule
    point (task_migrate_permille 1000, §10.1): after the first unmap (CPU 0) the second one
    queues its munlock on CPU 1, and the walk-level drain runs back on CPU 0."""

    async def s(w: World) -> None:
        p, page = await locked_twice(w)
        task = TaskPlacement(0)
        token = TASK.set(task)
        try:
            stats = await migrate_without_lru_cache_disable(w, page)
        finally:
            TASK.reset(token)
        assert task.migrations == 2  # after each of the two unmaps
        assert (stats.migrated, stats.failed) == (migrated, 1 - migrated)
        await w.drain_all()
        now = (await w.pages(p, "a"))[0]
        # migrated: count rebuilt on the new page; failed: CPU 1's residue munlock ran last
        # (stranded, then rescued by the putback: an allowed undercount)
        assert (now.node, now.mlocked, now.mlock_count) == (
            (1, True, 2) if migrated else (0, False, -1))

    run(s, nodes=2, migration_drain=mode, task_migrate_permille=1000, worker_cpus=2)


# ------------------------------------------------------ migration_newpage_lru_first ------

def test_migration_newpage_lru_first_off_does_not_rebuild_the_count(run: Any) -> None:
    """Pre-08/13 order: the restored mappings mlock a new page that is not on the LRU yet
    (the entries find it off the LRU), then putback culls it with mlock_count 0 (§4.2.4)."""

    async def s(w: World) -> None:
        p, _ = await locked_twice(w)
        res = await w.kernel.migrate(w.mid, p, *w.rng(p, "a"), 1)
        assert (res.migrated, res.failed) == (1, 0)
        await w.drain()
        new = (await w.pages(p, "a"))[0]
        assert (new.node, new.mlocked, new.unevictable, new.mlock_count) == (1, True, True, 0)
        report = await w.kernel.check(w.mid, True)
        assert report.undercounts == 1  # M = 2, allowed (Q5): reclaim would repair it

    run(s, nodes=2, migration_newpage_lru_first=False)


# ------------------------------------------------------------ mlock_count_init_* (§8.2) ------

def test_init_lru_add_bool_mlocked_overcounts_s12_order_a(protocol_redis: EmbeddedRedis) -> None:
    """v1 06/13: lru-add culls with !!PG_mlocked = 1, then the queued LRU_PAGE entry makes it
    2 with one locked mapping - the overcount 10/13 avoids by initialising 0."""

    async def s(w: World) -> None:
        await w.file("f", 1)
        p = await w.proc()
        await w.kernel.mlockall(w.mid, p, MCL_FUTURE | MCL_ONFAULT)
        await w.mmap(p, "m", 1, file="f", shared=True)
        await w.touch(p, "m", write=False)  # lru_add entry, then LRU_PAGE entry
        await w.drain()
        page = (await w.pages(p, "m"))[0]
        assert (page.unevictable, page.mlock_count) == (True, 2)
        found = await violations(w)
        assert any(v.startswith("Q3 ") for v in found), found

    run_unchecked(protocol_redis, s, mlock_count_init_lru_add=MlockCountInitLruAdd.BOOL_MLOCKED)


@pytest.mark.parametrize("init,count", [
    (MlockCountInitCull.BOOL_MLOCKED, 0),
    (MlockCountInitCull.ONE, 1),
])
def test_init_cull_when_a_munlock_cleared_pg_mlocked_first(
        run: Any, init: MlockCountInitCull, count: int) -> None:
    """__mlock_page culls a page whose PG_mlocked another CPU's munlock cleared meanwhile;
    its mapping is unevictable (SHM_LOCK-like, X2), so it is culled all the same, with
    mlock_count !!PG_mlocked = 0 (10/13) or 1 (v1 06/13)."""

    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p = await w.proc()
        await w.kernel.mlockall(w.mid, p, MCL_FUTURE | MCL_ONFAULT)
        await w.mmap(p, "m", 1, file="f", shared=True)
        page = (await w.kernel.file_pages(w.mid, "f"))[0]
        lv, idx = ref(page)
        m = await w.kernel.machine(w.mid)
        await w.kernel.swap.run(m, lv, [["F", idx, int(PG.UNEVICTABLE_MAPPING), 0]])
        await w.touch(p, "m", write=False)  # LRU_PAGE entry queued on CPU 0
        await w.munlock(p, "m", cpu=1)  # CPU 1: "assume that was the last mlock"
        page = (await w.pages(p, "m"))[0]
        assert (page.mlocked, page.unevictable) == (False, False)
        await w.drain()  # CPU 0's entry: not evictable, not yet unevictable -> cull
        page = (await w.pages(p, "m"))[0]
        assert (page.mlocked, page.unevictable, page.mlock_count) == (False, True, count)

    run(s, mlock_count_init_cull=init)


# ------------------------------------------------------------ reclaim_locked_activate ------

@pytest.mark.parametrize("activate,unlocked_mapped", [(True, True), (False, False)])
def test_reclaim_locked_activate(run: Any, activate: bool, unlocked_mapped: bool) -> None:
    """S16 with an unlocked mapper first in rmap order.  On (13/13): page_referenced_one
    restores the missed mlock and the verdict is ACTIVATE: nothing is unmapped.  Off:
    PAGEREF_RECLAIM; try_to_unmap_one unmaps the unlocked mapping, meets the VM_LOCKED vma,
    mlocks the page and fails (§5.3): same mlock state, one mapping fewer."""

    async def s(w: World) -> None:
        await w.kernel.create_file(w.mid, FileSpec("data", 1, kind="regular"))
        p0 = await w.proc()
        await w.mmap(p0, "m", 1, file="data", shared=True)
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):
            await w.kernel.mlockall(w.mid, p, MCL_FUTURE | MCL_ONFAULT)
            await w.mmap(p, "m", 1, file="data", shared=True)
        await w.touch(p0, "m", write=False)
        await w.touch(p1, "m", write=False)
        await w.touch(p2, "m", write=False)
        await w.on(1).munmap(w.mid, p1, *w.rng(p1, "m"))  # the missed mlock of S16
        await w.drain(cpu=1)
        await w.drain(cpu=0)
        page = (await w.pages(p2, "m"))[0]
        assert (page.mlocked, page.lru_list) == (False, "inactive_file")
        res = await w.kernel.reclaim(w.mid, None, None, 10)
        assert (res.scanned, res.reclaimed, res.culled) == (1, 0, 1)
        await w.drain()
        page = (await w.pages(p2, "m"))[0]
        assert (page.mlocked, page.unevictable, page.mlock_count) == (True, True, 1)
        assert (await w.pages(p0, "m"))[0].present is unlocked_mapped
        assert page.mapcount == (2 if unlocked_mapped else 1)

    run(s, reclaim_locked_activate=activate)


# -------------------------------------------------------------------- mlock_batch_scope ------

@pytest.mark.parametrize("scope,unev_before_drain", [
    (MlockBatchScope.PER_CPU_ALL, 0),  # S2: NEW_PAGE entries wait in CPU 0's batch
    (MlockBatchScope.MASS_ONLY, 4),  # faults are not the range walk: synchronous
])
def test_mlock_batch_scope_faults(run: Any, scope: MlockBatchScope,
                                  unev_before_drain: int) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.mlock(p, "m")  # populate faults: mlock_new_page
        assert sub(await w.delta(), nr_mlock=4, nr_unev=unev_before_drain) == {
            "nr_mlock": 4, "nr_unev": unev_before_drain}
        await w.munmap(p, "m")  # zap: munlock_page from page_remove_rmap
        d = await w.delta()
        assert d["munlocked"] == (4 if scope == MlockBatchScope.MASS_ONLY else 0)

    run(s, mlock_batch_scope=scope)


def test_mlock_batch_scope_mass_only_still_batches_the_walk(run: Any) -> None:
    """S24 with mass_only: the mlock walk over 20 present pages flushes when the 15th entry
    is queued and at the trailing drain - 2 lruvec lock acquisitions, not 20."""

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 20)
        await w.touch(p, "m")
        await w.drain()
        before = {r.instance: r.acquisitions for r in await w.kernel.lock_stat(w.mid)
                  if r.lock_class == "lruvec_lock"}
        await w.mlock(p, "m")
        after = {r.instance: r.acquisitions for r in await w.kernel.lock_stat(w.mid)
                 if r.lock_class == "lruvec_lock"}
        assert after["node0/root"] - before["node0/root"] == 2
        assert (await w.delta())["culled"] == 20

    run(s, mlock_batch_scope=MlockBatchScope.MASS_ONLY)


# ------------------------------------------------------------------------- validation ------

@pytest.mark.parametrize("bad", [
    {"migration_drain": "sometimes"},
    {"mlock_batch_scope": "global"},
    {"mlock_count_init_cull": "2"},
    {"vm_io_guard": "off"},
    {"final_clearance": "never"},
    {"munlock_hook_position": "middle"},
    {"stat_refresh_drains_all": 1},
    {"new_anon_checks_vm_special": "no"},
    {"thp_pte_holds_in_locked_vma": "yes"},
    {"thp_anon_fault": "no"},
    {"large_folio_mlock": 1},
])
def test_unknown_tunable_values_are_einval(protocol_redis: EmbeddedRedis,
                                           bad: dict[str, object]) -> None:
    async def main() -> None:
        world = await World.create(protocol_redis.url)
        try:
            before = await world.kernel.list_machines()
            with pytest.raises(KernelError) as exc:
                await world.kernel.create_machine(MachineConfig(**bad))  # type: ignore[arg-type]
            assert exc.value.errno == "EINVAL"
            assert await world.kernel.list_machines() == before  # nothing created
        finally:
            await world.close()

    asyncio.run(main())


def test_tunables_survive_the_store_and_the_proto(protocol_redis: EmbeddedRedis) -> None:
    from mmsvc.mm.syscalls import Kernel
    from mmsvc.proto_gen.mmsvc.v1 import types_pb2 as tpb
    from mmsvc.server import convert, validate

    cfg = MachineConfig(vm_io_guard=False, migration_drain=MigrationDrain.RMAP_WALK_LEVEL,
                        mlock_count_init_lru_add=MlockCountInitLruAdd.BOOL_MLOCKED,
                        mlock_count_init_cull=MlockCountInitCull.ONE,
                        reclaim_locked_activate=False, migration_newpage_lru_first=False,
                        mlock_batch_scope=MlockBatchScope.MASS_ONLY,
                        final_clearance=FinalClearance.MAPCOUNT_ZERO,
                        munlock_hook_position=MunlockHookPosition.START,
                        stat_refresh_drains_all=True, new_anon_checks_vm_special=False,
                        thp_pte_holds_in_locked_vma=True, thp_anon_fault=False,
                        large_folio_mlock=True)
    assert convert.machine_config_from_pb(convert.machine_config_to_pb(cfg)) == cfg
    assert convert.machine_config_from_pb(tpb.MachineConfig()) == MachineConfig()
    with pytest.raises(validate.ValidationError):
        validate.machine_tunables(tpb.MachineConfig(migration_drain=7))  # type: ignore[arg-type]
    with pytest.raises(validate.ValidationError):
        validate.machine_tunables(tpb.MachineConfig(final_clearance=3))  # type: ignore[arg-type]

    async def stored() -> None:
        world = await World.create(protocol_redis.url, **vars(cfg))
        try:  # another CPU (worker) loads the machine from the store
            assert await Kernel(world.store, 5).machine_config(world.mid) == cfg
        finally:
            await world.close()

    asyncio.run(stored())


# ---------------------------------------------------- final_clearance, munlock_hook_position ------

async def munmap_mlocked(w: World, pages: int = 4) -> dict[str, int]:
    """mlock present anon pages, drain, munmap, drain: the counters the munmap moved."""
    p = await w.proc()
    await w.mmap(p, "m", pages)
    await w.touch(p, "m")
    await w.mlock(p, "m")
    await w.drain()
    before = await w.delta()
    assert sub(before, nr_mlock=pages, nr_unev=pages) == {"nr_mlock": pages, "nr_unev": pages}
    await w.munmap(p, "m")
    await w.drain()
    after = await w.delta()
    return {k: after[k] - before[k] for k in ("munlocked", "stranded", "cleared", "rescued",
                                             "nr_mlock", "nr_unev")}


@pytest.mark.parametrize("clearance,munlocked,cleared", [
    (FinalClearance.REFCOUNT_ZERO, 4, 0),  # §6.3: munmap counts munlocked, never cleared
    (FinalClearance.MAPCOUNT_ZERO, 0, 4),  # §6.2: clear_page_mlock beats the batched munlock
])
def test_final_clearance(run: Any, clearance: FinalClearance, munlocked: int,
                         cleared: int) -> None:
    """§6.2: with the munlock batched at the end of page_remove_rmap, PG_mlocked is still set
    when the mapcount reaches 0, so a mapcount-zero clearance takes over the munlocking and
    ruins the `cleared` integrity signal [05/13]; the balance identity (§7.3) holds either way."""

    async def s(w: World) -> None:
        d = await munmap_mlocked(w)
        assert sub(d, munlocked=munlocked, cleared=cleared, stranded=0, nr_mlock=-4,
                   nr_unev=-4) == {"munlocked": munlocked, "cleared": cleared, "stranded": 0,
                                   "nr_mlock": -4, "nr_unev": -4}

    run(s, final_clearance=clearance)


@pytest.mark.parametrize("position,munlocked,cleared", [
    (MunlockHookPosition.END, 0, 4),  # mapcount 0 first: clear_page_mlock clears PG_mlocked
    (MunlockHookPosition.START, 4, 0),  # munlock runs while the mapping is still counted
])
def test_munlock_hook_position_with_synchronous_munlock(
        run: Any, position: MunlockHookPosition, munlocked: int, cleared: int) -> None:
    """§3.4.1: with batch length 1 the munlock runs inside page_remove_rmap.  At the start it
    sees the mapping still counted (mapcount 1) and munlocks; at the end the mapcount is
    already 0, so a mapcount-zero clearance (§6.2, clear_page_mlock) got there first."""

    async def s(w: World) -> None:
        d = await munmap_mlocked(w)
        assert sub(d, munlocked=munlocked, cleared=cleared) == {"munlocked": munlocked,
                                                               "cleared": cleared}

    run(s, munlock_hook_position=position, final_clearance=FinalClearance.MAPCOUNT_ZERO,
        mlock_batch_len=1)


# --------------------------------------------------------------- stat_refresh_drains_all ------

@pytest.mark.parametrize("drains,unev", [(False, 0), (True, 4)])
def test_stat_refresh_drains_all(run: Any, drains: bool, unev: int) -> None:
    """S2 on CPU 1, vmstat read on CPU 0: the NEW_PAGE entries wait in CPU 1's batch (nr_mlock
    already 4, nr_unevictable 0) unless reading vmstat drains every CPU first [Hugh->Babka
    11/13]."""

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.mlock(p, "m", cpu=1)
        assert sub(await w.delta(), nr_mlock=4, nr_unev=unev, culled=unev) == {
            "nr_mlock": 4, "nr_unev": unev, "culled": unev}

    run(s, stat_refresh_drains_all=drains)


# ------------------------------------------------------------ new_anon_checks_vm_special ------

@pytest.mark.parametrize("checks,mlocked", [(True, False), (False, True)])
def test_new_anon_checks_vm_special(run: Any, checks: bool, mlocked: bool) -> None:
    """§2.9: a VM_LOCKED vma that gained VM_MIXEDMAP after mmap (a driver's vm_insert_page
    sets it lazily, past mmap_region's VM_SPECIAL check) faults a new anonymous page: the
    rework's lru_cache_add_inactive_or_unevictable declines to mlock it; without the
    VM_SPECIAL check (§10.2.8, "overcautious" [04/13]) VM_LOCKED alone decides."""

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1)
        await w.mlock(p, "m", flags=MLOCK_ONFAULT)  # VM_LOCKED, nothing populated
        m = await w.kernel.machine(w.mid)
        mm = await load_mm(w.store, m, p)
        vma = mm.vmas[0]
        assert vma.flags & VM.LOCKED
        special = replace(vma, flags=vma.flags | VM.MIXEDMAP)
        await w.store.client.hset(f"{mm.key}:vma", str(vma.id), special.to_json())
        await w.touch(p, "m")
        await w.drain()
        page = (await w.pages(p, "m"))[0]
        assert (page.mlocked, page.unevictable) == (mlocked, mlocked)
        assert (await w.delta())["mlocked"] == int(mlocked)
        await w.munmap(p, "m")  # page_remove_rmap of a VM_LOCKED vma munlocks either way

    run(s, new_anon_checks_vm_special=checks)
