"""The pre-rework design (spec §9), for A/B comparison on the same machine model and load.

No mlock_count: PG_mlocked means "some VM_LOCKED vma maps this page, as last determined".
Locking a range is populate's FOLL_MLOCK pass, one page at a time under the page lock with a
per-page lru_add_drain (§9.3); unlocking a range (munlock, munlockall, and munmap/exit of a
VM_LOCKED vma) visits every address and, for pages still mapped elsewhere, asks the rmap with
``page_mlock`` under i_mmap_rwsem held for read (§9.4, §9.5).  Those read holds, the page
locks and the re-mlocks are the costs the rework removed (§9.9); every one of them goes
through the store's instrumented locks, so lock_stat shows them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mmsvc.locks import Locks
from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import read_pages
from mmsvc.mm.mm_struct import MmState, Pte, pt_walk
from mmsvc.mm.page import PG, Page, PTEBit
from mmsvc.mm.rmap import Mapping, Rmap, pte_maps, still_locked_mapping
from mmsvc.mm.swap import Swap
from mmsvc.mm.vma import Vma
from mmsvc.store.redis_store import RedisStore

PAGEVEC_SIZE = 15
WALK_CHUNK = 4096


@dataclass
class LegacyCosts:
    """What a legacy munlock did (the observables of §9.9)."""

    lookups: int = 0  # addresses visited by munlock_vma_pages_range
    page_mlock_calls: int = 0
    vma_visits: int = 0


def page_lock_key(m: Machine, lv: int, idx: int) -> str:
    return f"{m.lv_key(lv)}:page_lock:{idx}"


def page_lock_stats(m: Machine, lv: int) -> str:
    """Page locks are counted per lruvec, as one lock_stat row (class page_lock)."""
    return f"{m.lv_key(lv)}:page_lock"


class Legacy:
    def __init__(self, store: RedisStore, swap: Swap, locks: Locks, rmap: Rmap) -> None:
        self.store = store
        self.swap = swap
        self.locks = locks
        self.rmap = rmap
        self.costs = LegacyCosts()

    @asynccontextmanager
    async def page_locked(self, m: Machine, lv: int, idx: int) -> AsyncIterator[None]:
        """lock_page(): sleeping, queued, instrumented."""
        async with self.locks.hold(page_lock_key(m, lv, idx), "w", page_lock_stats(m, lv)):
            yield

    # ------------------------------------------------------------- §9.3 mlock a range ---
    async def populate_mlock(self, m: Machine, mm: MmState, vma: Vma, start: int,
                             end: int) -> None:
        """FOLL_MLOCK: each present small page of a VM_LOCKED vma, under trylock_page, with
        lru_add_drain() per page, gets the legacy mlock_vma_page (§9.3.2)."""
        if not vma.locked:
            return
        async for ptes in pt_walk(self.store, mm.key, start, end, WALK_CHUNK):
            thps = await self._pmd_heads(m, ptes)
            for vpn in sorted(ptes):
                p = ptes[vpn]
                if p.bits & PTEBit.ZERO or p.is_subpage:
                    continue  # no page->mapping (zero page); pte-mapped THPs are skipped
                # §9.3.2: a pmd-mapped THP only if mapped once (no DoubleMap), by its head
                if p.is_pmd and (vpn % 512 or thps.get((p.lv, p.idx), 2) != 1):
                    continue
                held = await self.locks.try_acquire(page_lock_key(m, p.lv, p.idx), "w",
                                                    page_lock_stats(m, p.lv))
                if held is None:
                    continue  # "vmscan will handle it later"
                ident = identity(vma, vpn)
                try:
                    await self.swap.lru_add_drain(m)
                    # the page's identity, re-checked where the page is: follow_page's
                    # reference under the PTL; a page freed or reused since is skipped
                    res = await self.swap.run(m, p.lv, [["Y", p.idx, *ident]])
                finally:
                    await self.locks.release(held)
                if not res.failed and not await pte_maps(self.store, mm.key, vpn, p.lv, p.idx):
                    # follow_page mlocks under the PTL, which an rmap walker's zap of this
                    # pte (reclaim, migration, truncation) also takes: it came before the
                    # walk (no page) or after the mlock.  Here it slipped in between, so the
                    # page is munlocked as that zap, after the mlock, would have it: checked
                    # for other VM_LOCKED mappings (page_mlock) like any munlock.
                    await self.munlock_page(m, p.lv, p.idx, ident)

    async def _pmd_heads(self, m: Machine, ptes: dict[int, Pte]) -> dict[tuple[int, int], int]:
        """Total mappings (pmd + pte) of the THP heads mapped by pmds among ptes."""
        heads = list(dict.fromkeys((p.lv, p.idx) for p in ptes.values() if p.is_pmd))
        pages = await read_pages(self.store, m, heads)
        return {h: pg.mapcount + pg.pte_mapcount for h, pg in zip(heads, pages, strict=True)}

    # ----------------------------------------------------------- §9.4 munlock a range ---
    async def munlock_range(self, m: Machine, mm: MmState, vma: Vma, start: int,
                            end: int) -> None:
        """munlock_vma_pages_range of [start, end) in vma: its VM_LOCKED is already cleared
        (§9.4.1).  follow_page takes each page with a reference under the PTL; here the
        walk read the ptes first, so each page op carries the page's identity (``W``/``Y``
        with index and mapping): a page freed or reused since is skipped."""
        self.costs.lookups += end - start  # one follow_page per address, populated or not
        async for ptes in pt_walk(self.store, mm.key, start, end, WALK_CHUNK):
            # §9.4.3: a THP head gets the single-page munlock; tails (and pte-mapped
            # subpages) are skipped
            for p in sorted(ptes.values(), key=lambda p: p.vpn):
                if p.is_pmd and p.vpn % 512 == 0:
                    await self.munlock_page(m, p.lv, p.idx, identity(vma, p.vpn))
            small = [ptes[v] for v in sorted(ptes) if not ptes[v].is_pmd
                     and not ptes[v].is_subpage]
            for batch in _pagevecs(small):
                await self._munlock_pagevec(m, vma, batch)

    async def _munlock_pagevec(self, m: Machine, vma: Vma, batch: list[Pte]) -> None:
        lv = batch[0].lv
        # Phase 1, under the lruvec lock: clear PG_mlocked, isolate (or count and release).
        res = await self.swap.run(m, lv, [["W", p.idx, *identity(vma, p.vpn)] for p in batch])
        pages = await read_pages(self.store, m, [(lv, i) for i in res.isolated])
        # Phase 2: each isolated page under its (sleeping) page lock.
        for idx, page in zip(res.isolated, pages, strict=True):
            async with self.page_locked(m, lv, idx):
                await self._munlock_isolated(m, lv, idx, page)

    async def _munlock_isolated(self, m: Machine, lv: int, idx: int, page: Page) -> None:
        if page.mapcount <= 1 and not page.has(PG.UNEVICTABLE_MAPPING):
            # fast path: straight back to an evictable list, munlocked (+ rescued) (phase 3)
            await self.swap.run(m, lv, [["V", idx]])
            return
        if page.mapcount > 1:
            await self.page_mlock(m, lv, idx, page)
        # "if the page is still not PG_mlocked count MUNLOCKED"; putback re-decides the LRU
        await self.swap.run(m, lv, [["E", idx], ["B", idx, 0]])

    async def page_mlock(self, m: Machine, lv: int, idx: int, page: Page) -> bool:
        """§9.5: under the rmap lock held for read, find a VM_LOCKED vma still mapping the
        page and re-mlock it (counted as a new ``mlocked`` event)."""
        self.costs.page_mlock_calls += 1
        async with self.rmap.locked(m, page):
            for mp in await self.rmap.mappings(m, lv, idx, page):
                self.costs.vma_visits += 1
                if mp.vma.locked:
                    return await mlock_under_ptl(self.store, self.swap, m, lv, idx, mp)
        return False

    async def munlock_page(self, m: Machine, lv: int, idx: int,
                           ident: tuple[int, int] | None = None) -> None:
        """Legacy single-page munlock_vma_page (THP heads of the munlock walk, with the
        identity the walk read; COW of a page in a VM_LOCKED vma, §9.7)."""
        async with self.page_locked(m, lv, idx):
            res = await self.swap.run(m, lv, [["W", idx, *(ident or ())]])
            for i in res.isolated:
                page = (await read_pages(self.store, m, [(lv, i)]))[0]
                if page.mapcount > 1:
                    await self.page_mlock(m, lv, i, page)
                await self.swap.run(m, lv, [["E", i], ["B", i, 0]])

    async def cow_munlock(self, m: Machine, old: list[tuple[int, int]]) -> None:
        for lv, idx in old:
            page = (await read_pages(self.store, m, [(lv, idx)]))[0]
            if page.flags & PG.INUSE and page.has(PG.MLOCKED):
                # the fault dropped its own mapping of the old page: another unmap may free
                # it before the munlock, which then skips it (the identity read here)
                ident = (page.index, -1 if page.has(PG.ANON) else page.mapping)
                await self.munlock_page(m, lv, idx, ident)


async def mlock_under_ptl(store: RedisStore, swap: Swap, m: Machine, lv: int, idx: int,
                          mp: Mapping) -> bool:
    """Legacy mlock_vma_page of a page the rmap walk found mapped by a VM_LOCKED vma
    (page_mlock §9.5.2, try_to_unmap_one §9.7: the page is locked and isolated by the caller;
    remove_migration_pte §9.3.5: the new page, locked).

    Linux rechecks VM_LOCKED and the pte under the PTL and mlocks before it unlocks it, so a
    munlock of that vma (VM_LOCKED cleared first, §9.4.1, then each pte visited under the same
    PTL) either comes before the recheck or after the mlock - and then clears PG_mlocked again.
    Here the walk read the vma and pte earlier: if the vma lost VM_LOCKED or the pte its page
    since, that munlock may already have passed this page, so the mlock is undone as its
    phase 1 would have done it after us (test-and-clear, isolation fails: stranded or
    munlocked).  Returns whether the page stays mlocked."""
    await swap.run(m, lv, [["Y", idx]])
    if await still_locked_mapping(store, mp, lv, idx):
        return True
    res = await swap.run(m, lv, [["W", idx]])
    if res.isolated:  # it was on an LRU (a migration's new page): phase 1 took it off
        await swap.run(m, lv, [["B", i, 0] for i in res.isolated])
    return False


def identity(vma: Vma, vpn: int) -> tuple[int, int]:
    """What a page mapped at vpn in vma must be (index, file; -1: anonymous vma) for a page
    op of a walk that read the pte earlier (walk_target in lua/memory.lua)."""
    return vma.linear_index(vpn), vma.file if vma.file else -1


def _pagevecs(ptes: list[Pte]) -> list[list[Pte]]:
    """§9.4.4: runs of present small pages of one page table and one zone, at most 15."""
    out: list[list[Pte]] = []
    for p in ptes:
        if p.bits & PTEBit.ZERO:
            continue
        cur = out[-1] if out else None
        if (cur is not None and len(cur) < PAGEVEC_SIZE and cur[-1].vpn + 1 == p.vpn
                and cur[-1].vpn // 512 == p.vpn // 512 and cur[-1].lv == p.lv):
            cur.append(p)
        else:
            out.append([p])
    return out
