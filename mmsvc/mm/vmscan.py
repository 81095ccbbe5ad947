"""mm/vmscan.c: reclaim, which repairs missed mlocks and never scans the unevictable LRU (§5).

shrink_folio_list for each isolated page:
* not evictable (PG_mlocked, unevictable mapping)                -> activate: putback culls it;
* page_referenced finds a VM_LOCKED mapping -> mlock_vma_page, PAGEREF_ACTIVATE (§5.2);
  with ``reclaim_locked_activate`` off the verdict is RECLAIM and try_to_unmap finds the
  VM_LOCKED vma instead, mlocks and fails (§5.3) - the same final state;
* otherwise try_to_unmap; a clean regular-file page then leaves the page cache and is freed.
* an anonymous page, with swap space (``swap_pages``): add_to_swap, try_to_unmap puts a swap
  entry in each pte, pageout writes it, and it leaves the swap cache and is freed
  (mm/swapfile.py).  Without swap space (none, or all slots taken) the anon lists are not
  even scanned, as Linux does; a page MADV_PAGEOUT hands over fails add_to_swap and is
  activated (a THP is split first, "fallback to swap normal pages").
* a shmem page (tmpfs, SysV shm: on the anon lists) is unmapped, then shmem_writeout moves
  it from the page cache to the swap cache - its slot in the page cache names the swap entry
  - and it is written and freed; with no swap slot left it is redirtied and activated.
* an anonymous THP is split first (S18, §5.2.5: mm/huge_memory.py; a pmd-mapped one too,
  TTU_SPLIT_HUGE_PMD), a file THP too (S17): the subpages, small pages now, go through this
  list like the others - the head at once, the tails after it.
Access bits are not emulated: mapped pages count as unreferenced.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mmsvc.mm.huge_memory import HugeMemory
from mmsvc.mm.legacy import mlock_under_ptl
from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import Programs, read_pages
from mmsvc.mm.mm_struct import Pte, pt_read
from mmsvc.mm.page import LRU, PG, SUBPAGE_SHIFT, Page
from mmsvc.mm.rmap import (
    TTU_DONE,
    TTU_RACED,
    TTU_STOPPED,
    Mapping,
    Rmap,
    large_folio_rules,
    mlock_filter,
    pte_unmap_ops,
    set_pte_reading_vma,
    still_locked_mapping,
)
from mmsvc.mm.swap import Op, Swap
from mmsvc.mm.swapfile import (
    delete_from_swap_cache,
    get_swap_page,
    nr_swap_pages,
    swap_duplicate,
    swap_pte,
    swapcache_slot,
)
from mmsvc.mm.vma import VM, Vma
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore

ACTIVATE, KEEP, RECLAIM = "activate", "keep", "reclaim"


@dataclass
class Unmapped:
    """try_to_unmap's outcome: the walk stopped at a VM_LOCKED vma (``locked``), or the
    freeze that followed the removals in their page program failed (``unfrozen``)."""

    locked: bool = False
    unfrozen: bool = False


@dataclass
class ShrinkStats:
    scanned: int = 0
    reclaimed: int = 0
    culled: int = 0  # putbacks of pages found mlocked / VM_LOCKED
    verdicts: Counter[str] = field(default_factory=Counter)


class Vmscan:
    def __init__(self, store: RedisStore, swap: Swap, rmap: Rmap) -> None:
        self.store = store
        self.swap = swap
        self.rmap = rmap
        self.huge = HugeMemory(store, swap)

    async def shrink_lruvec(self, m: Machine, lv: int, nr: int) -> ShrinkStats:
        """shrink_inactive_list on the inactive lists: anon first while swap space is left
        (get_scan_count: can_reclaim_anon_pages), then file."""
        stats = ShrinkStats()
        scan: list[Op] = [["S", int(LRU.INACTIVE_FILE), nr]]
        if m.cfg.swap_pages and await nr_swap_pages(self.store, m) > 0:
            scan.insert(0, ["S", int(LRU.INACTIVE_ANON), nr])
        res = await self.swap.run(m, lv, scan)
        await self.shrink_folio_list(m, lv, res.isolated, stats)
        return stats

    async def shrink_folio_list(self, m: Machine, lv: int, isolated: list[int],
                                stats: ShrinkStats) -> None:
        putback: Programs = Programs.empty()
        while isolated:
            # a THP split on the way appends its tails to the list (split_huge_page_to_list
            # with reclaim's list): they are scanned after the pages before them
            tails: list[int] = []
            await self._shrink_list(m, lv, isolated, stats, putback, tails)
            isolated = tails
        await putback.execute(self.swap, m)

    async def _shrink_list(self, m: Machine, lv: int, isolated: list[int], stats: ShrinkStats,
                           putback: Programs, tails: list[int]) -> None:
        # folio_trylock each page first: a page locked by someone else (a fault mapping it,
        # a migration) is kept.  Everything below looks at the page under its lock, so a
        # fault's mlock of it is either complete (PG_mlocked seen: culled, nothing repaired)
        # or not started (the fault finds the page locked and retries).
        busy = set((await self.swap.run(m, lv, [["O", i] for i in isolated])).failed)
        pages = await read_pages(self.store, m, [(lv, i) for i in isolated])
        for idx, page in zip(isolated, pages, strict=True):
            # "Account the number of base pages even though THP"; a THP split on the way
            # gives back the tails' share, they are scanned after it (5.17 shrink_page_list)
            stats.scanned += page.nr_pages
            if idx in busy:
                verdict = KEEP
            else:
                verdict = await self._shrink_one(m, lv, idx, page, stats, tails)
            stats.verdicts[verdict] += 1
            if verdict == RECLAIM:
                stats.reclaimed += 1
                continue
            if idx not in busy:
                putback.add(lv, ["F", idx, 0, int(PG.LOCKED)])  # folio_unlock
            # putback: lru-add re-decides evictability; an mlocked page is culled (§5.1.2)
            putback.add(lv, ["B", idx, 1 if verdict == ACTIVATE and not self._locked(page)
                             else 0])

    @staticmethod
    def _locked(page: Page) -> bool:
        return page.has(PG.MLOCKED) or page.has(PG.UNEVICTABLE_MAPPING)

    async def _shrink_one(self, m: Machine, lv: int, idx: int, page: Page,
                          stats: ShrinkStats, tails: list[int]) -> str:
        if self._locked(page):
            stats.culled += page.nr_pages
            return ACTIVATE  # "activate_locked": not evictable
        async with self.rmap.locked(m, page) as pids:
            maps = await self.rmap.mappings(m, lv, idx, page, pids)
            # §5.2.2: a pte mapping of a THP in a VM_LOCKED vma is treated as unlocked; only
            # a pmd mapping reports VM_LOCKED (the rework's page_referenced_one, S18) - unless
            # thp_pte_holds_in_locked_vma (the [open] alternative: a pte map holds the THP)
            holds = str(m.cfg.protocol) == "legacy" or m.cfg.thp_pte_holds_in_locked_vma
            locked = [mp for mp in maps if mp.vma.locked and (not mp.pte.is_subpage or holds)]
            if large_folio_rules(m) and not locked:
                # Linux 6.5+ folio_referenced_one: a large folio wholly mapped by the ptes
                # of a VM_LOCKED vma is mlocked there (a partly mapped one is not)
                locked = [mp for mp in maps if mp.vma.locked and mp.pte.is_subpage
                          and await self._wholly_pte_mapped(mp, page)]
            if locked and str(m.cfg.protocol) == "legacy":
                # §9.7: page_referenced_one reports VM_LOCKED -> PAGEREF_RECLAIM; then
                # try_to_unmap_one mlocks the page (locked by reclaim) and fails the unmap.
                await mlock_under_ptl(self.store, self.swap, m, lv, idx, locked[0])
                stats.culled += page.nr_pages
                return KEEP
            if locked and m.cfg.reclaim_locked_activate:
                # §5.2.1 page_referenced_one: "restore the mlock which got missed" - not
                # through a pte mapping of a THP (never mlocked, §3.9): then the THP is only
                # held, activated unsplit and unmlocked (thp_pte_holds_in_locked_vma)
                mp = next((x for x in locked if not x.pte.is_subpage
                           or large_folio_rules(m)), None)
                if mp is None:
                    return ACTIVATE
                if mlock_filter(mp.vma):
                    await self.swap.run(m, lv, [["L", idx]])
                    # Linux does this under the PTL, so a zap of that pte - or a munlock of
                    # the vma, which clears VM_LOCKED first and then walks the ptes under
                    # the same PTL - comes after it and munlocks it.  Here either may have
                    # slipped in between our walk and the mlock: then munlock it ourselves,
                    # in the order Linux would have.
                    if not await still_locked_mapping(self.store, mp, lv, idx):
                        await self.swap.run(m, lv, [["K", idx]])
                stats.culled += page.nr_pages
                return ACTIVATE
            if page.has(PG.HEAD):
                split = await self._split(m, lv, idx, page, tails)
                if split is None:
                    return ACTIVATE  # cannot split (pmd-mapped, pinned): activate_locked
                stats.scanned -= page.nr_pages - 1
                page, maps = split
                if self._locked(page):
                    # the remap mlocked it (a VM_LOCKED vma, S18).  Linux goes on to
                    # add_to_swap and try_to_unmap, which meets VM_LOCKED and fails, and
                    # activate_locked frees the slot again (PageMlocked): the same verdict
                    stats.culled += page.nr_pages
                    return ACTIVATE
            slot = predup = 0
            if page.has(PG.SWAPBACKED) and page.has(PG.ANON):
                slot, predup = await self._add_to_swap(m, lv, idx, page, len(maps))
                if not slot:
                    # add_to_swap fails (no swap space) before any unmap: activate_locked_split
                    return ACTIVATE
            # what follows the unmap runs in the same page program (one round trip): the
            # freeze of __remove_mapping - pageout is synchronous here, nothing happens to
            # the page in between - and for a page that goes without writing, its freeing.
            # A page still mapped (a racing fault) has its mapping's reference too: the
            # freeze fails, the page is kept, as folio_mapped() keeps it in Linux.
            then: list[Op] = []
            if slot:
                then = [["R", idx, 2]]  # isolation + swap cache
            elif page.has(PG.ANON):
                # a lazyfree page (MADV_FREE: anon without PG_swapbacked), now unmapped and
                # clean: discarded, not written anywhere - if only the isolation reference
                # is left (folio_ref_freeze(folio, 1))
                then = [["R", idx, 1], ["F", idx, 0, int(PG.ISOLATED | PG.LOCKED | PG.FROZEN)],
                        ["P", idx]]
            elif page.has(PG.PAGECACHE) and not page.has(PG.SWAPBACKED):
                # __remove_mapping of a clean file page: frozen at reclaim's isolation and
                # the page cache's references (a fault that took one since keeps it)
                then = [["R", idx, 2],
                        ["F", idx, 0, int(PG.PAGECACHE | PG.ISOLATED | PG.LOCKED | PG.FROZEN)],
                        ["P", idx], ["P", idx]]
            elif page.has(PG.PAGECACHE) and m.cfg.swap_pages:
                # shmem with swap space: frozen at the same two references before
                # shmem_writeout moves it from the page cache to the swap cache (a lookup
                # meanwhile finds it frozen and retries; one that took a reference keeps it)
                then = [["R", idx, 2]]
            unmapped = await self._try_to_unmap(m, lv, idx, maps, slot, then, predup)
            if unmapped.locked:
                # reclaim_locked_activate off: PAGEREF_RECLAIM, and try_to_unmap_one met the
                # VM_LOCKED vma, mlocked the page and failed (§5.3): kept, putback culls it
                stats.culled += page.nr_pages
                return KEEP
            if slot:
                if unmapped.unfrozen:
                    return KEEP
                await self._swap_out(m, lv, idx, slot)
                return RECLAIM
            if page.has(PG.SWAPBACKED) and not page.has(PG.ANON):
                if then:
                    if unmapped.unfrozen:
                        return KEEP
                    return await self._shmem_writeout(m, lv, idx, page)
                # shmem: unmapped first, then pageout finds no swap: redirtied, activated,
                # still in the page cache (but no longer mapped) - unless a racing fault
                # mapped it again: kept
                return KEEP if await self._mapped(m, lv, idx) else ACTIVATE
            if not then:
                # truncated (mm/truncate.py), still held by a pin or a batch entry: no
                # mapping to remove it from; whoever holds the last reference frees it
                return KEEP
            if unmapped.unfrozen:
                return KEEP
            if not page.has(PG.ANON):
                await self.store.fcall("pc_delete", keys.file(m.mid, page.mapping),
                                       page.index, f"{lv}|{idx}")
            return RECLAIM

    async def _wholly_pte_mapped(self, mp: Mapping, page: Page) -> bool:
        """Do consecutive ptes of mp's vma map every page of THP ``page``, in order?"""
        first = mp.pte.vpn - (mp.pte.bits >> SUBPAGE_SHIFT)
        if first < mp.vma.start or first + page.nr_pages > mp.vma.end:
            return False
        ptes = await pt_read(self.store, mp.mm_key, first, first + page.nr_pages)
        return all((p := ptes.get(first + i)) is not None and p.is_subpage
                   and (p.lv, p.idx) == (mp.pte.lv, mp.pte.idx)
                   and p.bits >> SUBPAGE_SHIFT == i for i in range(page.nr_pages))

    async def _split(self, m: Machine, lv: int, idx: int, page: Page,
                     tails: list[int]) -> tuple[Page, list[Mapping]] | None:
        """shrink_folio_list's "split pages without a PMD map right away" (5.17, anon THPs,
        only when swap is possible - the anon lists are scanned only then) and "Split file
        THP" (any file THP, before try_to_unmap: its pmd mappings go with the split, so a
        VM_LOCKED one that page_referenced did not report is never found - S17 with
        reclaim_locked_activate off): the head as the small page it became, with its
        mappings, or None (not split).  The caller holds the rmap lock."""
        if page.has(PG.ANON):
            # with no swap at all too: folio_alloc_swap fails, "Fallback to swap normal
            # pages" splits it (MADV_PAGEOUT reaches here without swap; the host kernel
            # splits such a THP), and each subpage then fails alike and is activated
            split = await self.huge.split_huge_page(m, lv, idx)
        else:
            split = await self.huge.split_file_thp(m, lv, idx)
        if split is None:
            return None
        # __split_huge_page queues the tails from the last one down (list_add_tail for
        # i = nr - 1 .. 1): reclaim meets them, and puts them back, in that order
        tails += reversed(split)
        page = (await read_pages(self.store, m, [(lv, idx)]))[0]
        return page, await self.rmap.mappings(m, lv, idx, page)

    async def _add_to_swap(self, m: Machine, lv: int, idx: int, page: Page,
                           nmaps: int) -> tuple[int, int]:
        """add_to_swap: a slot, and the page enters the swap cache (PG_swapcache and the
        cache's reference); a page still in the swap cache keeps its slot.  Returns the
        slot - 0: no swap space (none configured, or full), or a THP (not split for swap
        here) - and how many swap ptes were counted on a new slot already (the
        swap_duplicate of try_to_unmap_one for each of the ``nmaps`` mappings)."""
        if not m.cfg.swap_pages or page.has(PG.HEAD) or page.has(PG.TAIL):
            return 0, 0
        if page.has(PG.SWAPCACHE):
            return await swapcache_slot(self.store, m, lv, idx), 0
        slot = await get_swap_page(self.store, m, lv, idx, nmaps)
        if slot:
            await self.swap.run(m, lv, [["G", idx], ["F", idx, int(PG.SWAPCACHE), 0]])
        return slot, nmaps if slot else 0

    async def _shmem_writeout(self, m: Machine, lv: int, idx: int, page: Page) -> str:
        """shmem_writeout of a shmem page reclaim froze, unmapped: a swap slot (none left:
        unfrozen, redirtied, activated), then the page moves from the page cache to the
        swap cache - its page cache slot names the swap entry (``swap|slot``, one count of
        the slot), the cache's reference becomes the swap cache's - and is written and
        freed as an anonymous page is (_swap_out).  A fault reads it back later
        (memory.py, shmem_swapin_folio); truncation frees the entry (truncate.py)."""
        slot = await get_swap_page(self.store, m, lv, idx, 1)
        if not slot:
            await self.swap.run(m, lv, [["F", idx, 0, int(PG.FROZEN)]])
            return ACTIVATE
        await self.swap.run(m, lv, [["F", idx, int(PG.SWAPCACHE), int(PG.PAGECACHE)]])
        fkey = keys.file(m.mid, page.mapping)
        if not int(await self.store.fcall("pc_swapout", fkey, page.index, f"{lv}|{idx}", slot)):
            # cannot happen while the page is frozen and locked (lookups and truncation
            # back off): undone all the same, the page kept
            await delete_from_swap_cache(self.store, m, slot, (lv, idx))
            await swap_duplicate(self.store, m, slot, -1)
            await self.swap.run(m, lv, [["F", idx, int(PG.PAGECACHE),
                                         int(PG.SWAPCACHE | PG.FROZEN)]])
            return KEEP
        await self._swap_out(m, lv, idx, slot)
        return RECLAIM

    async def _swap_out(self, m: Machine, lv: int, idx: int, slot: int) -> None:
        """pageout (swap_writepage, synchronous here) of the page reclaim froze at its
        isolation + the swap cache's references (a swap-in fault that took one meanwhile
        kept the page), then the rest of __remove_mapping: the page leaves the swap cache -
        its slot stays, the swap ptes name it - and the last references go."""
        await delete_from_swap_cache(self.store, m, slot, (lv, idx), written=True)
        await self.swap.run(m, lv, [
            ["F", idx, 0, int(PG.SWAPCACHE | PG.ISOLATED | PG.LOCKED | PG.FROZEN)],
            ["P", idx], ["P", idx]])

    async def _try_to_unmap(self, m: Machine, lv: int, idx: int, maps: list[Mapping],
                            slot: int = 0, then: list[Op] | None = None,
                            predup: int = 0) -> Unmapped:
        """try_to_unmap_one for each mapping: clear the pte if it still maps the page
        (page_vma_mapped_walk re-checks under the PTL), page_remove_rmap (+ munlock) and put.
        With a swap slot the pte becomes its swap entry, one slot reference each
        (swap_duplicate before set_pte_at; ``predup``: done for the first mappings when the
        slot was allocated, a share not used is given back).  The page-program ops of the
        removals and
        ``then`` run in one program at the end.
        ``locked``: the walk stopped at a VM_LOCKED vma (without TTU_IGNORE_MLOCK, §5.3) -
        only with ``reclaim_locked_activate`` off, else §5.2 kept the page first."""
        ops: list[Op] = []
        for n, mp in enumerate(maps):
            if slot and n >= predup:
                await swap_duplicate(self.store, m, slot)
            new = swap_pte(mp.pte.vpn, slot) if slot else Pte(mp.pte.vpn, 0, 0, 0)
            status, vma = await self._ttu_pte(mp, new)
            if status != TTU_DONE and slot:
                # this pte's share, and on a stop the shares counted for the rest
                unused = 1 + (max(0, predup - n - 1) if status == TTU_STOPPED else 0)
                await swap_duplicate(self.store, m, slot, -unused)
            if status == TTU_STOPPED:
                # §5.3: mlock_vma_page(page, vma, false), stop the walk, report failure; the
                # vmas the walk met before it are unmapped already
                ops += [["L", idx]] if mlock_filter(vma) else []
                if ops:
                    await self.swap.run(m, lv, ops)
                return Unmapped(locked=True)
            if status == TTU_RACED:
                continue  # zapped (or remapped) meanwhile by someone else
            ops += [*pte_unmap_ops(m, vma, mp.pte), ["P", idx]]
        ops += then or []
        if not ops:
            return Unmapped()
        return Unmapped(unfrozen=(await self.swap.run(m, lv, ops)).unfrozen)

    async def _ttu_pte(self, mp: Mapping, new: Pte) -> tuple[int, Vma]:
        """One pte of try_to_unmap_one, with its vma's flags as stored now: Linux reads
        vm_flags under the PTL, which an mlock's walk also takes after storing VM_LOCKED
        (§3.6), so the flags are read with the pte, not as the rmap walk saw them (and an
        mlock that walked this pte since makes page_remove_rmap munlock it: rmap.vma_now).
        A VM_LOCKED vma stops the walk before the pte changes (§5.3)."""
        return await set_pte_reading_vma(self.store, mp, new, mp.pte, stop_if=int(VM.LOCKED))

    async def _mapped(self, m: Machine, lv: int, idx: int) -> bool:
        """page_mapped: a racing fault may have mapped the page again since the unmap."""
        page = (await read_pages(self.store, m, [(lv, idx)]))[0]
        return page.mapcount + page.pte_mapcount > 0
