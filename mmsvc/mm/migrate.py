"""mm/migrate.c: page migration to another node (spec §4, patches 08/13 and 11/13).

For each page: isolate it; unmap every pte into a migration entry (page_remove_rmap with its
munlock hook, then drain the local mlock batch when the vma is VM_LOCKED, §4.2.1); "freeze"
(the refcount must be exactly what isolation and the page cache hold: a reference left in any
CPU's batch makes it fail, §4.1); on success copy to a new page on the target node, put the
new page on the LRU *before* restoring the mappings (so each restored VM_LOCKED pte rebuilds
its mlock_count, §4.2.4), and free the old page; on failure restore the old page's ptes
(undercounting it, §4.2.5) and put it back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mmsvc.mm.errors import KernelError
from mmsvc.mm.legacy import mlock_under_ptl
from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import read_pages
from mmsvc.mm.mm_struct import Pte
from mmsvc.mm.page import PG, Page, PTEBit
from mmsvc.mm.rmap import (
    TTU_DONE,
    Mapping,
    Rmap,
    page_add_rmap_ops,
    page_remove_rmap_ops,
    set_pte_reading_vma,
)
from mmsvc.mm.swap import Op, Swap
from mmsvc.mm.types import MigrationDrain
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore

MIGRATE_PASSES = 3  # migrate_pages retries a page that failed to freeze
COPIED_FLAGS = int(PG.ANON | PG.SWAPBACKED | PG.PAGECACHE | PG.ACTIVE | PG.UNEVICTABLE
                   | PG.DIRTY | PG.UNEVICTABLE_MAPPING | PG.REFERENCED
                   | PG.KSM)  # ksm_migrate_page: the stable node (mapping) moves along


@dataclass
class MigrateStats:
    migrated: int = 0
    failed: int = 0
    busy: int = 0  # could not isolate (EBUSY)


class Migrate:
    def __init__(self, store: RedisStore, swap: Swap, rmap: Rmap) -> None:
        self.store = store
        self.swap = swap
        self.rmap = rmap

    async def migrate_page(self, m: Machine, lv: int, idx: int, target_lv: int,
                           stats: MigrateStats, *, drain: bool = True) -> None:
        res = await self.swap.run(m, lv, [["I", idx]])
        if not res.isolated:
            stats.busy += 1
            return
        if (await self.swap.run(m, lv, [["O", idx]])).failed:
            # folio_trylock failed (a fault is mapping it): -EAGAIN after the passes
            await self.swap.run(m, lv, [["B", idx, 0]])
            stats.failed += 1
            return
        page = (await read_pages(self.store, m, [(lv, idx)]))[0]
        # §10.1 migration_drain: where the local mlock batch is drained ([11/13]).
        mode = m.cfg.migration_drain if drain else MigrationDrain.OFF
        drain = mode != MigrationDrain.OFF
        async with self.rmap.locked(m, page) as pids:
            maps = await self._unmap(m, lv, idx, await self._mappings(m, lv, idx, page, pids),
                                     mode)
            for attempt in range(MIGRATE_PASSES):
                page = (await read_pages(self.store, m, [(lv, idx)]))[0]
                if await self._freeze(m, lv, idx, page):
                    try:
                        await self._move(m, lv, idx, page, target_lv, maps, mode)
                    except BaseException:
                        await self.swap.run(m, lv, [["F", idx, 0, int(PG.FROZEN)]])
                        await self._restore(m, lv, idx, maps, (lv, idx), mode)
                        await self.swap.run(m, lv, [["F", idx, 0, int(PG.LOCKED)],
                                                    ["B", idx, 0]])
                        raise
                    stats.migrated += 1
                    return
                if drain and attempt + 1 < MIGRATE_PASSES:
                    # the retry's restore and unmap drain this CPU (with rmap_walk_level too:
                    # residue a moved task left on another CPU still fails it, S14)
                    await self.swap.lru_add_drain(m)
            page = (await read_pages(self.store, m, [(lv, idx)]))[0]
            await self._restore(m, lv, idx, maps, (lv, idx), mode,
                                mlocked=page.has(PG.MLOCKED))
        await self.swap.run(m, lv, [["F", idx, 0, int(PG.LOCKED)], ["B", idx, 0]])
        stats.failed += 1

    async def _mappings(self, m: Machine, lv: int, idx: int, page: Page,
                        pids: list[int] | None) -> list[Mapping]:
        """The rmap walk of try_to_migrate (the caller holds the rmap lock, whose
        acquisition may have read the candidate processes: ``pids``)."""
        return await self.rmap.mappings(m, lv, idx, page, pids)

    async def _freeze(self, m: Machine, lv: int, idx: int, page: Page) -> bool:
        """folio_ref_freeze: only the isolation reference and the page cache's remain (a
        reference in any CPU's batch, or a fault's, makes it fail, §4.1).  Atomic with the
        count, so a page-cache lookup that comes later fails and retries."""
        expected = 1 + (1 if page.has(PG.PAGECACHE) else 0)
        return not (await self.swap.run(m, lv, [["R", idx, expected]])).failed

    async def _unmap(self, m: Machine, lv: int, idx: int, maps: list[Mapping],
                     mode: MigrationDrain) -> list[Mapping]:
        """try_to_migrate_one for each pte: migration entry, page_remove_rmap, drain (§4.2.1;
        ``rmap_walk_level``: once after the walk, §4.1; ``off``: never).
        Returns the mappings now held by migration entries (a pte that changed meanwhile is
        not ours: page_vma_mapped_walk re-checks it under the PTL)."""
        done: list[Mapping] = []
        for mp in maps:
            entry = Pte(mp.pte.vpn, idx, lv, int(PTEBit.MIGRATION) | (mp.pte.bits & PTEBit.WRITE))
            # the flags as stored when the pte goes (an mlock may have walked it since)
            status, vma = await set_pte_reading_vma(self.store, mp, entry, mp.pte)
            if status != TTU_DONE:
                continue
            done.append(mp)
            await self.swap.run(m, lv, [*page_remove_rmap_ops(m, vma, idx), ["P", idx]])
            if mode == MigrationDrain.AFTER_EACH_LOCKED_UNMAP and vma.locked:
                await self.swap.lru_add_drain(m)  # mlock_drain_local() (11/13)
            # the rmap walk sleeps on its locks, not under a PTL: between two unmaps the task
            # may be moved, which is why 11/13 drains after each one (S14, §10.1)
            self.swap.cond_resched(m)
        if mode == MigrationDrain.RMAP_WALK_LEVEL:
            await self.swap.lru_add_drain(m)  # "at the upper rmap_walk() level" (§4.1)
        return done

    async def _restore(self, m: Machine, lv: int, idx: int, maps: list[Mapping],
                       new: tuple[int, int], mode: MigrationDrain, *,
                       mlocked: bool = False) -> None:
        """remove_migration_ptes: map (new or old) page again; VM_LOCKED: mlock + drain.
        The vma's flags are read now, not at unmap time: an mlock may have stored VM_LOCKED
        (with VM_IO, §3.6) meanwhile, which is what the VM_IO guard is for (S23).
        A failed migration's old page that is still PG_mlocked (``mlocked``) and goes back
        into a vma that is not VM_LOCKED is marked: if a munlock of that vma walked past its
        migration entry, nothing will clear the flag before the page is freed (§8.3 row 14,
        the checker's X3)."""
        nlv, nidx = new
        for mp in maps:
            entry = Pte(mp.pte.vpn, idx, lv, int(PTEBit.MIGRATION) | (mp.pte.bits & PTEBit.WRITE))
            restored = Pte(mp.pte.vpn, nidx, nlv, mp.pte.bits)
            status, vma = await set_pte_reading_vma(self.store, mp, restored, entry)
            if status != TTU_DONE:
                continue  # the mapping was zapped meanwhile
            mp = replace(mp, vma=vma)
            ops = page_add_rmap_ops(m, mp.vma, nidx)  # counts the mapping again (§4.2.4)
            if mlocked and not mp.vma.locked:
                ops.append(["F", nidx, int(PG.RESTORED_MLOCKED), 0])
            await self.swap.run(m, nlv, ops)
            if str(m.cfg.protocol) == "legacy" and mp.vma.locked:
                # legacy remove_migration_pte mlocks explicitly (§9.3.5), under the PTL that
                # a munlock walk of the vma also takes: rechecked after the mlock
                restored_mp = replace(mp, pte=restored)
                await mlock_under_ptl(self.store, self.swap, m, nlv, nidx, restored_mp)
            if mode == MigrationDrain.AFTER_EACH_LOCKED_UNMAP and mp.vma.locked:
                await self.swap.lru_add_drain(m)  # §4.2.3
        if mode == MigrationDrain.RMAP_WALK_LEVEL:
            await self.swap.lru_add_drain(m)

    async def _move(self, m: Machine, lv: int, idx: int, old: Page, target_lv: int,
                    maps: list[Mapping], mode: MigrationDrain) -> None:
        flags = old.flags & COPIED_FLAGS  # PG_mlocked is not transferred (§1.2.2)
        lru_first = m.cfg.migration_newpage_lru_first
        # the new page is locked until its mappings are back (reclaim and faults keep off)
        ops: list[Op] = [["A", flags | int(PG.LOCKED), old.mapping, old.index, old.aux],
                         ["G", -1]]
        if old.has(PG.PAGECACHE):
            ops.append(["G", -1])  # the page cache's reference moves to the new page
        if lru_first:
            ops.append(["C", -1])  # §4.2.4: new page on the LRU before the mappings return
        res = await self.swap.run(m, target_lv, ops)
        new_idx = res.allocs[0]
        if old.has(PG.PAGECACHE):
            fkey = keys.file(m.mid, old.mapping)
            await self.store.client.hset(f"{fkey}:pc", old.index, f"{target_lv}|{new_idx}")
        if maps and lru_first:
            await self.swap.lru_add_drain(m)
        await self._restore(m, lv, idx, maps, (target_lv, new_idx), mode)
        # migration's reference and the new page's lock; before 08/13 (lru_first off) the
        # new page is put back only now: its restored mlocks found it off the LRU, and
        # lru-add culls it with mlock_count 0 - the count is not rebuilt (§4.2.4, §8.2)
        done: list[Op] = [["F", new_idx, 0, int(PG.LOCKED)]]
        if not lru_first:
            done.append(["C", new_idx])  # putback_lru_page(newpage)
        await self.swap.run(m, target_lv, [*done, ["P", new_idx]])
        # The old page: out of the page cache, no longer isolated, last references dropped.
        old_ops: list[Op] = [["F", idx, 0, int(PG.ISOLATED | PG.PAGECACHE | PG.FROZEN
                                                | PG.LOCKED)],
                             ["P", idx]]
        if old.has(PG.PAGECACHE):
            old_ops.append(["P", idx])
        await self.swap.run(m, lv, old_ops)


def check_target(m: Machine, node: int) -> None:
    if not 0 <= node < m.cfg.nodes:
        raise KernelError("EINVAL", f"no node {node}")
