"""mm/huge_memory.c split_huge_page_to_list for anonymous THPs (spec §2.10, §3.9, §5.2.5, S18).

A THP is one struct page record here (its head; aux = order, pte mappings of its subpages
counted apart, §3.9).  Splitting it follows Linux:

1. ``can_split_folio``: no reference beyond its mappings and the caller's isolation.
2. ``unmap_folio``: every pte mapping of a subpage becomes a migration entry.  Such a pte was
   never counted (§3.9), so nothing is munlocked.  Only pte-mapped THPs are split here: a
   pmd mapping would need TTU_SPLIT_HUGE_PMD first (the caller keeps such a THP).
3. Freeze at the isolation reference; ``__split_huge_page`` (``lua/huge_memory.lua``): each
   tail gets a record of its own, a small page with the head's flags (PG_mlocked and
   PG_unevictable included, 5.17+), on the isolator's list or next to the head on its LRU.
4. ``remap_page``: ``remove_migration_ptes`` restores each pte, now mapping a small page:
   ``page_add_anon_rmap`` + ``mlock_vma_page`` in a VM_LOCKED vma (§2.8: no longer
   PageTransCompound, so it counts: Δmlocked +1 per subpage, S18), then the drain of
   §4.2.3.  Last, the split's reference on each tail goes: a subpage nobody maps is freed.

Failing the freeze (a racing reference) restores the THP's own pte mappings: nothing split.
"""

from __future__ import annotations

from collections import defaultdict

from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import read_pages, split_huge_pmd
from mmsvc.mm.mm_struct import Pte, load_mm, pt_install, pt_read
from mmsvc.mm.page import PG, PTRS_PER_PMD, SUBPAGE_SHIFT, Page, PTEBit
from mmsvc.mm.rmap import (
    Mapping,
    candidate_pids,
    mlock_filter,
    try_to_unmap_ignore_mlock,
    vma_now,
)
from mmsvc.mm.swap import Op, Swap
from mmsvc.mm.types import MigrationDrain
from mmsvc.mm.vma import Vma
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore

_PTE_FLAGS = (1 << SUBPAGE_SHIFT) - 1  # a subpage pte's bits below its subpage number


def subpage_of(pte: Pte) -> int:
    """Which subpage of its THP a pte maps (0 for a pmd mapping: the head)."""
    return pte.bits >> SUBPAGE_SHIFT if pte.is_subpage else 0


async def thp_mappings(store: RedisStore, m: Machine, lv: int, idx: int,
                       page: Page) -> list[Mapping]:
    """rmap_walk of a THP: every pte of a subpage and every pmd (once, at its first
    address) that maps it in each VMA of its anon_vma or file over the THP's range.  The
    caller holds the anon_vma lock or i_mmap_rwsem."""
    out: list[Mapping] = []
    for pid in await candidate_pids(store, m, page):
        try:
            mm = await load_mm(store, m, pid)
        except Exception:  # an exited process: nothing of it maps the page
            continue
        for vma in mm.vmas:
            lo = max(page.index, vma.pgoff)
            hi = min(page.index + page.nr_pages, vma.pgoff + vma.pages)
            if lo >= hi:
                continue
            if not (vma.may_map_anon(page.mapping) if page.has(PG.ANON)
                    else vma.file == page.mapping):
                continue
            ptes = await pt_read(store, mm.key, vma.start + lo - vma.pgoff,
                                 vma.start + hi - vma.pgoff)
            out += [Mapping(pid, mm.key, vma, p) for p in ptes.values()
                    if (p.lv, p.idx) == (lv, idx) and not p.bits & PTEBit.ZERO
                    and not (p.is_pmd and p.vpn % PTRS_PER_PMD)]
    return out


_SUBPAGE_NUMBER = int(PTEBit.SUBPAGE) | ~((1 << SUBPAGE_SHIFT) - 1)


def migration_entry_bits(pte: Pte) -> int:
    """A migration entry's bits in place of pte (set_pte_at / set_pmd_migration_entry): not
    present, write permission kept for the restore, and a subpage's number (CPU-death
    recovery maps the entry back by it)."""
    keep = int(PTEBit.WRITE) | (_SUBPAGE_NUMBER if pte.is_subpage else 0)
    return int(PTEBit.MIGRATION) | (pte.bits & keep)


def _entry(lv: int, idx: int, pte: Pte) -> Pte:
    """The migration entry set_pte_at puts in place of a subpage's pte (try_to_migrate_one)."""
    return Pte(pte.vpn, idx, lv, migration_entry_bits(pte))


class HugeMemory:
    """split_huge_page on behalf of one CPU (reclaim, migration)."""

    def __init__(self, store: RedisStore, swap: Swap) -> None:
        self.store = store
        self.swap = swap

    async def split_huge_page(self, m: Machine, lv: int, idx: int) -> list[int] | None:
        """Split the isolated, locked anonymous THP (lv, idx); returns its tails' records
        (subpages 1 .. nr-1, unlocked and isolated like the head), or None when it cannot be
        split now (-EAGAIN/-EBUSY: references beyond its mappings and the isolation): then
        nothing changed.  The caller holds the anon_vma lock."""
        head = (await read_pages(self.store, m, [(lv, idx)]))[0]
        if not head.has(PG.HEAD) or not head.has(PG.ANON):
            return None
        if head.refcount != head.mapcount + head.pte_mapcount + 1:
            return None  # can_split_folio: extra pins (a batch entry, GUP)
        await self._split_pmds(m, lv, idx, head)
        maps = await self._unmap_folio(m, lv, idx, head)
        res = await self.swap.run(m, lv, [["R", idx, 1], ["split", idx]])
        if res.failed:  # a reference taken meanwhile: remap_page(folio) as it was
            await self._remap(m, lv, idx, maps, None)
            return None
        tails = res.allocs
        await self._remap(m, lv, idx, maps, tails)
        # split_huge_page_to_list's end: the tails are unlocked and the split's reference
        # on each is dropped (the isolator's stays with the page on its list)
        await self.swap.run(m, lv, [op for t in tails
                                    for op in (["F", t, 0, int(PG.LOCKED)], ["P", t])])
        return tails

    async def split_file_thp(self, m: Machine, lv: int, idx: int) -> list[int] | None:
        """split_huge_page_to_list of a file THP (lv, idx), locked by the caller, who holds a
        reference (its isolation or its lookup) and i_mmap_rwsem.  unmap_folio for a file
        page is try_to_unmap(TTU_SPLIT_HUGE_PMD | TTU_IGNORE_MLOCK): every pmd and subpage
        pte goes - a pmd in a VM_LOCKED vma munlocks the THP - and nothing is remapped: "a
        file THP is left unmapped and its pages are counted again when refaulted" (§5.2.5).
        Then the freeze at the page cache's reference and the caller's, __split_huge_page
        (each tail a page cache page with the cache's reference, still locked), the cache
        slots repointed (pc_split) while every subpage is locked, and the tails unlocked
        with the split's reference dropped.  Returns the tails (subpages 1 .. nr-1), or None
        when a racing reference fails the freeze: the THP stays whole (and unmapped)."""
        head = (await read_pages(self.store, m, [(lv, idx)]))[0]
        if not head.has(PG.HEAD) or head.has(PG.ANON):
            return None
        maps = await thp_mappings(self.store, m, lv, idx, head)
        await try_to_unmap_ignore_mlock(self.store, self.swap, m, lv, idx, maps)
        res = await self.swap.run(m, lv, [["R", idx, 2], ["split", idx]])
        if res.failed:
            return None
        tails = res.allocs
        await self.store.fcall("pc_split", keys.file(m.mid, head.mapping),
                               f"{lv}|{idx}|{head.index}", *tails)
        await self.swap.run(m, lv, [op for t in tails
                                    for op in (["F", t, 0, int(PG.LOCKED)], ["P", t])])
        return tails

    async def _split_pmds(self, m: Machine, lv: int, idx: int, head: Page) -> None:
        """unmap_folio's TTU_SPLIT_HUGE_PMD: each pmd mapping of the THP becomes 512 pte
        mappings first (__split_huge_pmd_locked: page_remove_rmap(compound) - a VM_LOCKED
        vma munlocks the THP, §3.4.3 - and the ptes are never counted, §3.9)."""
        if not head.mapcount:
            return
        for mp in await thp_mappings(self.store, m, lv, idx, head):
            if mp.pte.is_pmd:
                vma = await vma_now(self.store, mp.mm_key, mp.pte.vpn, mp.vma)
                await split_huge_pmd(self.store, self.swap, m, mp.mm_key, vma, mp.pte.pmd)

    async def _unmap_folio(self, m: Machine, lv: int, idx: int, head: Page) -> list[Mapping]:
        """try_to_migrate(TTU_SPLIT_HUGE_PMD) of a pte-mapped THP: each pte becomes a
        migration entry; its removal is uncounted (§3.9: ptes of a THP are ignored).
        Returns the mappings now held by migration entries."""
        maps = await thp_mappings(self.store, m, lv, idx, head)
        done: list[Mapping] = []
        by_mm: dict[str, list[Mapping]] = defaultdict(list)
        for mp in maps:
            by_mm[mp.mm_key].append(mp)
        for mm_key, mps in by_mm.items():
            entries = [_entry(lv, idx, mp.pte) for mp in mps]
            raced = set(await pt_install(self.store, mm_key, entries,
                                         {mp.pte.vpn: mp.pte for mp in mps}))
            done += [mp for mp in mps if mp.pte.vpn not in raced]
        ops: list[Op] = [op for _ in done for op in (["u", idx], ["P", idx])]
        if ops:
            await self.swap.run(m, lv, ops)
        return done

    async def _remap(self, m: Machine, lv: int, idx: int, maps: list[Mapping],
                     tails: list[int] | None) -> None:
        """remove_migration_ptes: each entry back to its subpage - after a split a small page
        (``page_add_anon_rmap`` + ``mlock_vma_page`` in a VM_LOCKED vma, S18), without one the
        THP's uncounted pte mapping again.  The vma's flags are read now (§1.7.3).  The
        drain of §4.2.3 runs once after each address space's ptes, not after each pte: the
        pages are off the LRU, so __mlock_page does the same either way."""
        by_mm: dict[str, list[Mapping]] = defaultdict(list)
        for mp in maps:
            by_mm[mp.mm_key].append(mp)
        for mm_key, mps in by_mm.items():
            vmas = await self._vmas_now(m, mps)
            new: list[Pte] = []
            ops: list[Op] = []
            for mp in mps:
                k = subpage_of(mp.pte)
                if tails is None:
                    new.append(mp.pte)
                    continue
                target = idx if k == 0 else tails[k - 1]
                new.append(Pte(mp.pte.vpn, target, lv,
                               mp.pte.bits & _PTE_FLAGS & ~int(PTEBit.SUBPAGE)))
            expect = {mp.pte.vpn: _entry(lv, idx, mp.pte) for mp in mps}
            raced = set(await pt_install(self.store, mm_key, new, expect))
            locked = False
            for pte in new:
                if pte.vpn in raced:
                    continue  # zapped meanwhile (zap_pte_range dropped the entry)
                vma = vmas[pte.vpn]
                if tails is None:
                    ops += [["m", idx]]  # the THP's pte mapping again: uncounted (§3.9)
                    continue
                ops += [["M", pte.idx]]
                if str(m.cfg.protocol) == "legacy":
                    ops += [["Y", pte.idx]] if vma.locked else []  # §9.3.5
                elif mlock_filter(vma):
                    ops += [["L", pte.idx]]  # §2.8.1: a small page now, S18
                    locked = True
            if ops:
                await self.swap.run(m, lv, ops)
            if locked and m.cfg.migration_drain != MigrationDrain.OFF:
                await self.swap.lru_add_drain(m)  # §4.2.3 mlock_drain_local()

    async def _vmas_now(self, m: Machine, mps: list[Mapping]) -> dict[int, Vma]:
        """Each pte's vma as last stored (an mlock may have set VM_LOCKED meanwhile); the one
        seen at unmap time if the process is gone."""
        try:
            mm = await load_mm(self.store, m, mps[0].pid)
        except Exception:  # an exited process: its ptes are gone too (the restore races)
            return {mp.pte.vpn: mp.vma for mp in mps}
        return {mp.pte.vpn: next((v for v in mm.vmas if v.start <= mp.pte.vpn < v.end),
                                 mp.vma) for mp in mps}

