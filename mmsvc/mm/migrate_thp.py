"""THP migration: migrate_pages of a whole THP (mm/migrate.c with mm/huge_memory.c's
set_pmd_migration_entry / remove_migration_pmd; spec §4, §3.9).

A THP (anonymous, or a file THP of khugepaged.py) moves as one folio, as Linux does when
thp_migration_supported() (x86-64):

1. Isolate and lock the head; under the rmap lock, ``try_to_migrate`` every mapping
   (``huge_memory.thp_mappings``): a pmd mapping becomes a **pmd migration entry** (the
   huge pmd with PRESENT clear: faults find the pmd not empty and retry, walkers see
   nothing) and goes through page_remove_rmap(compound) - a VM_LOCKED vma munlocks the THP
   and, with 11/13, the local batch is drained (§4.2.1); a subpage pte becomes a pte
   migration entry and its removal is never counted (§3.9).
2. Freeze at the isolation reference (and the page cache's); a racing reference fails it,
   retried MIGRATE_PASSES times with drains (§4.1).
3. A new THP on the target node: on the LRU first (§4.2.4, a THP head: flushed at once),
   the page cache's slots repointed for a file THP, then each entry restored to it -
   remove_migration_pmd: page_add_*_rmap(compound) + mlock_vma_page(compound) in a
   VM_LOCKED vma (the count rebuilt, §4.2.4); a subpage pte: an uncounted pte mapping.
4. On failure the old THP's mappings come back the same way (the undercount of §4.2.5).

A pmd migration entry that a munmap / mprotect / MADV_DONTNEED cuts through is split as
__split_huge_pmd does it: an anonymous one into 512 pte migration entries (the zap then
clears the ones in its range; the restore maps the others back as subpage ptes), a file one
is just cleared (a file pmd is not replaced by ptes: refaulted later).  Fork does not copy a
migration entry to the child.  Legacy (5.17): the unmap's page_remove_rmap clears PG_mlocked
with the last mapping (clear_page_mlock) and remove_migration_pmd mlocks the new THP in a
VM_LOCKED vma (mlock_vma_page, rechecked under the PTL).
"""

from __future__ import annotations

from dataclasses import replace

from mmsvc.mm.huge_memory import migration_entry_bits, thp_mappings
from mmsvc.mm.legacy import mlock_under_ptl
from mmsvc.mm.machine import Machine
from mmsvc.mm.migrate import COPIED_FLAGS, Migrate
from mmsvc.mm.mm_struct import Pte, pt_install
from mmsvc.mm.page import AUX_ORDER_MASK, PG, PTRS_PER_PMD, SUBPAGE_SHIFT, Page, PTEBit
from mmsvc.mm.rmap import Mapping, page_add_rmap_ops, page_remove_rmap_ops, vma_now
from mmsvc.mm.swap import Op
from mmsvc.mm.types import MigrationDrain
from mmsvc.store import keys

_PMD = int(PTEBit.PMD)
_MIGRATION = int(PTEBit.MIGRATION)
_WRITE = int(PTEBit.WRITE)


def _subpage_entries(pte: Pte, idx: int, lv: int, nidx: int, nlv: int,
                     ) -> tuple[list[Pte], dict[int, Pte]]:
    """A pmd migration entry that a split turned into 512 pte migration entries: the ptes
    that map the new THP's subpages in their place, and the entries expected there."""
    base = pte.pmd * PTRS_PER_PMD
    keep = pte.bits & (_WRITE | int(PTEBit.DIRTY))
    new, expect = [], {}
    for i in range(PTRS_PER_PMD):
        sub = int(PTEBit.SUBPAGE) | (i << SUBPAGE_SHIFT)
        new.append(Pte(base + i, nidx, nlv, int(PTEBit.PRESENT) | keep | sub))
        expect[base + i] = Pte(base + i, idx, lv, _MIGRATION | (pte.bits & _WRITE) | sub)
    return new, expect


class ThpMigrate(Migrate):
    """migrate_pages for THP heads, on behalf of one CPU: Migrate.migrate_page's isolation,
    passes and failure path, with a THP's rmap walk, entries, restore and new page."""

    async def _mappings(self, m: Machine, lv: int, idx: int, page: Page,
                        pids: list[int] | None) -> list[Mapping]:
        return await thp_mappings(self.store, m, lv, idx, page)

    async def _unmap(self, m: Machine, lv: int, idx: int, maps: list[Mapping],
                     mode: MigrationDrain) -> list[Mapping]:
        """try_to_migrate_one for each mapping; returns those now held by entries."""
        done: list[Mapping] = []
        for mp in maps:
            pte = mp.pte
            entry = migration_entry_bits(pte)
            if pte.is_pmd:  # set_pmd_migration_entry
                stored = pte.bits & ~_PMD
                if not int(await self.store.fcall("pmd_install", mp.mm_key, pte.pmd, idx, lv,
                                                  entry, pte.idx, pte.lv, stored)):
                    continue
            elif await pt_install(self.store, mp.mm_key, [Pte(pte.vpn, idx, lv, entry)],
                                  {pte.vpn: pte}):
                continue
            done.append(mp)
            vma = await vma_now(self.store, mp.mm_key, pte.vpn, mp.vma)
            ops: list[Op] = (page_remove_rmap_ops(m, vma, idx) if pte.is_pmd
                             else [["u", idx]])
            await self.swap.run(m, lv, [*ops, ["P", idx]])
            if pte.is_pmd and mode == MigrationDrain.AFTER_EACH_LOCKED_UNMAP and vma.locked:
                await self.swap.lru_add_drain(m)  # mlock_drain_local() (11/13)
        if mode == MigrationDrain.RMAP_WALK_LEVEL:
            await self.swap.lru_add_drain(m)
        return done

    async def _restore(self, m: Machine, lv: int, idx: int, maps: list[Mapping],
                       new: tuple[int, int], mode: MigrationDrain, *,
                       mlocked: bool = False) -> None:
        """remove_migration_pmd / remove_migration_pte: each entry that is still there maps
        ``new`` (or the old THP again) with its old bits; the vma's flags as stored now."""
        nlv, nidx = new
        for mp in maps:
            pte = mp.pte
            entry = migration_entry_bits(pte)
            if pte.is_pmd:
                if not int(await self.store.fcall("pmd_install", mp.mm_key, pte.pmd, nidx, nlv,
                                                  pte.bits & ~_PMD, idx, lv, entry)):
                    await self._restore_split(m, mp, idx, lv, new)
                    continue  # zapped, or split into pte entries meanwhile
            elif await pt_install(self.store, mp.mm_key, [Pte(pte.vpn, nidx, nlv, pte.bits)],
                                  {pte.vpn: Pte(pte.vpn, idx, lv, entry)}):
                continue
            vma = await vma_now(self.store, mp.mm_key, pte.vpn, mp.vma)
            ops = page_add_rmap_ops(m, vma, nidx) if pte.is_pmd else [["m", nidx]]
            await self.swap.run(m, nlv, ops)
            if pte.is_pmd and vma.locked and str(m.cfg.protocol) == "legacy":
                # legacy remove_migration_pmd: mlock_vma_page(new) in a VM_LOCKED vma, under
                # the PTL a munlock walk takes too (rechecked: mlock_under_ptl)
                restored = Pte(pte.vpn, nidx, nlv, pte.bits)
                await mlock_under_ptl(self.store, self.swap, m, nlv, nidx,
                                      replace(mp, pte=restored))
            if pte.is_pmd and mode == MigrationDrain.AFTER_EACH_LOCKED_UNMAP and vma.locked:
                await self.swap.lru_add_drain(m)  # §4.2.3
        if mode == MigrationDrain.RMAP_WALK_LEVEL:
            await self.swap.lru_add_drain(m)

    async def _restore_split(self, m: Machine, mp: Mapping, idx: int, lv: int,
                             new: tuple[int, int]) -> None:
        """remove_migration_pte for the pte entries a split of the pmd entry left (the
        subpages a zap did not take): each maps its subpage of ``new``, uncounted (§3.9)."""
        nlv, nidx = new
        ptes, expect = _subpage_entries(mp.pte, idx, lv, nidx, nlv)
        raced = set(await pt_install(self.store, mp.mm_key, ptes, expect))
        back = len(ptes) - len(raced)
        if back:
            await self.swap.run(m, nlv, [["m", nidx] for _ in range(back)])

    async def _move(self, m: Machine, lv: int, idx: int, old: Page, target_lv: int,
                    maps: list[Mapping], mode: MigrationDrain) -> None:
        """The new THP: allocated locked on the target, on the LRU before the mappings come
        back (§4.2.4; off: put back after them), the page cache's slots moved to it; the old
        one freed (PG_mlocked is not transferred, §1.2.2)."""
        flags = old.flags & COPIED_FLAGS | int(PG.HEAD)
        lru_first = m.cfg.migration_newpage_lru_first
        ops: list[Op] = [["A", flags | int(PG.LOCKED), old.mapping, old.index,
                          old.aux & AUX_ORDER_MASK], ["G", -1]]
        if old.has(PG.PAGECACHE):
            ops.append(["G", -1])
        if lru_first:
            ops.append(["C", -1])
        new_idx = (await self.swap.run(m, target_lv, ops)).allocs[0]
        if old.has(PG.PAGECACHE):
            await self.store.fcall("pc_move", keys.file(m.mid, old.mapping),
                                   f"{lv}|{idx}|{old.index}", f"{target_lv}|{new_idx}|{old.index}",
                                   *range(old.index, old.index + old.nr_pages))
        await self._restore(m, lv, idx, maps, (target_lv, new_idx), mode)
        done: list[Op] = [["F", new_idx, 0, int(PG.LOCKED)]]
        if not lru_first:
            done.append(["C", new_idx])
        await self.swap.run(m, target_lv, [*done, ["P", new_idx]])
        old_ops: list[Op] = [["F", idx, 0, int(PG.ISOLATED | PG.PAGECACHE | PG.FROZEN
                                                | PG.LOCKED)], ["P", idx]]
        if old.has(PG.PAGECACHE):
            old_ops.append(["P", idx])
        await self.swap.run(m, lv, old_ops)
