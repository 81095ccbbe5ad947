"""mm/truncate.c: ftruncate and hole punching (spec §3.4.2, §3.6, §6, S20).

* ``ftruncate`` (truncate_setsize + truncate_pagecache): i_size is set first, so that a fault
  from then on raises SIGBUS beyond it (the page cache lookup reads the new size in the same
  step: ``pc_lookup``); then ``unmap_mapping_range(even_cows = 1)`` (private COW copies of the
  truncated range go too), ``truncate_inode_pages_range``, and a second unmap for copies a
  racing fault made.  Growing a file only sets i_size.
* ``punch_hole`` (fallocate FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: shmem_fallocate and
  truncate_pagecache_range of a regular file): ``unmap_mapping_range(even_cows = 0)`` - a
  private mapping keeps its COW copies - then ``truncate_inode_pages_range``.

Each pte is removed through the zap path, so removing it from a VM_LOCKED vma munlocks
(§3.4.1).  A munlock that already cleared VM_LOCKED but whose walk has not reached the pte yet
is the race of §3.6 / §8.3 row 3: the zap does not munlock, the walk finds nothing, and the page
keeps PG_mlocked until its last reference goes, when the final clearance (§6) counts it
``cleared``.  A page leaving the page cache drops the cache's reference; one still referenced
(a batch entry, a GUP pin: mm/gup.py) lives on off the cache until that reference goes (X1).

Locks as Linux: i_rwsem (write) around the whole operation, i_mmap_rwsem for write around each
unmap_mapping_range (the rmap is stable: no VMA of the file is linked or unlinked meanwhile),
the page lock on each page while it leaves the cache (a fault mapping it holds it, so the page
is either mapped before - and unmapped here - or looked up after, and then not found).
"""

from __future__ import annotations

import asyncio
import time

from mmsvc.locks import Locks
from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.filemap import FilePmd, Slot, parse_slot, swap_entry
from mmsvc.mm.huge_memory import HugeMemory, thp_mappings
from mmsvc.mm.machine import FileInfo, Machine, refresh_files
from mmsvc.mm.memory import Programs, read_pages, split_huge_pmd, zap_range
from mmsvc.mm.mm_struct import MmState, Pte, load_mm, pt_install, pt_read
from mmsvc.mm.page import PG, PTRS_PER_PMD, Page, PTEBit
from mmsvc.mm.rmap import Rmap, try_to_unmap_ignore_mlock, vma_now, zap_ops
from mmsvc.mm.swap import Swap
from mmsvc.mm.swapfile import free_swap_and_cache
from mmsvc.mm.vma import Vma
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

LOCK_WAIT_SECONDS = 15.0  # lock_page waits; a page held by a dead CPU is freed by its recovery


class Truncate:
    """Truncation and hole punching on behalf of one CPU."""

    def __init__(self, store: RedisStore, swap: Swap, locks: Locks, rmap: Rmap) -> None:
        self.store = store
        self.swap = swap
        self.locks = locks
        self.rmap = rmap
        self.pmds = FilePmd(store, swap)
        self.huge = HugeMemory(store, swap)

    # ------------------------------------------------------------------ entry points ----
    async def ftruncate(self, m: Machine, f: FileInfo, size: int) -> None:
        """do_truncate -> shmem_setattr / truncate_setsize + truncate_pagecache."""
        fkey = keys.file(m.mid, f.fid)
        async with self.locks.hold(f"{fkey}:i_rwsem", "w"):
            await refresh_files(self.store, m)  # the size another CPU set last
            old = m.file_by_id(f.fid).pages
            await self._set_size(m, f, size)
            if size >= old:
                return  # growing: pages beyond the old end are read in by later faults
            await self.unmap_mapping_range(m, f, size, old, even_cows=True)
            await self.truncate_inode_pages_range(m, f, size, old)
            # "unmap again to remove racily COWed private pages" (truncate_pagecache)
            await self.unmap_mapping_range(m, f, size, old, even_cows=True)

    async def punch_hole(self, m: Machine, f: FileInfo, start: int, length: int) -> None:
        """fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): the file keeps its size; the
        pages of [start, start + length) go (a later fault reads in a fresh page)."""
        fkey = keys.file(m.mid, f.fid)
        async with self.locks.hold(f"{fkey}:i_rwsem", "w"):
            await refresh_files(self.store, m)
            end = min(start + length, m.file_by_id(f.fid).pages)
            if start >= end:
                return
            await self.unmap_mapping_range(m, f, start, end, even_cows=False)
            await self.truncate_inode_pages_range(m, f, start, end)

    async def _set_size(self, m: Machine, f: FileInfo, size: int) -> None:
        """i_size_write: the page cache's copy first (faults check it atomically with their
        lookup), then the registry every CPU caches."""
        await self.store.client.set(f"{keys.file(m.mid, f.fid)}:isize", size)
        await self.store.client.hset(f"{keys.machine(m.mid)}:files", f.name,
                                     f"{f.fid}|{size}|{f.kind}")
        await refresh_files(self.store, m)

    # ------------------------------------------------------------- unmap_mapping_range --
    async def unmap_mapping_range(self, m: Machine, f: FileInfo, first: int, last: int, *,
                                  even_cows: bool) -> int:
        """Zap the ptes of file pages [first, last) in every VMA of every process mapping the
        file (the i_mmap tree), under i_mmap_rwsem for write.  even_cows: anonymous COW
        copies in private mappings go too (truncation), else they stay (hole punch).
        Returns the ptes removed."""
        fkey = keys.file(m.mid, f.fid)
        removed = 0
        async with self.locks.hold(f"{fkey}:i_mmap_rwsem", "w"):
            pids = sorted(int(text(p)) for p in await self.store.client.hkeys(f"{fkey}:immap"))
            for pid in pids:
                try:
                    mm = await load_mm(self.store, m, pid)
                except KernelError:
                    continue  # exited: its VMAs are gone
                for vma in mm.vmas:
                    lo, hi = max(first, vma.pgoff), min(last, vma.pgoff + vma.pages)
                    if vma.file != f.fid or lo >= hi:
                        continue
                    vstart, vend = vma.start + lo - vma.pgoff, vma.start + hi - vma.pgoff
                    if even_cows or vma.shared:
                        removed += await zap_range(self.store, self.swap, m, mm, vma, vstart,
                                                   vend)
                    else:
                        removed += await self._zap_file_ptes(m, mm, vma, vstart, vend)
        return removed

    async def _zap_file_ptes(self, m: Machine, mm: MmState, vma: Vma, start: int,
                             end: int) -> int:
        """zap_pte_range with details.even_cows = 0: only ptes of page cache pages; the
        private anonymous copies (PageAnon) stay mapped (should_zap_folio).  A file THP's
        pmd the range cuts through is split first (its mapping just goes: filemap.py); one
        inside the range goes whole."""
        for vpn in {start, end}:
            if vpn % PTRS_PER_PMD:
                await split_huge_pmd(self.store, self.swap, m, mm, vma, vpn // PTRS_PER_PMD)
        ptes = [p for p in (await pt_read(self.store, mm.key, start, end)).values()
                if not p.bits & PTEBit.ZERO and not (p.is_pmd and p.vpn % PTRS_PER_PMD)]
        pages = await read_pages(self.store, m, [(p.lv, p.idx) for p in ptes])
        return await self._zap(m, [(mm.key, vma, p) for p, page in
                                   zip(ptes, pages, strict=True) if not page.has(PG.ANON)])

    async def _zap(self, m: Machine, maps: list[tuple[str, Vma, Pte]]) -> int:
        """Clear each pte that still maps what it mapped (under its PTL), then
        page_remove_rmap (+ munlock, §3.4) and put the mapping's reference."""
        rmap, puts = Programs.empty(), Programs.empty()
        done = 0
        gone: dict[tuple[str, int], tuple[Vma, list[Pte]]] = {}  # per address space and vma
        for mm_key, vma, pte in maps:
            if pte.is_pmd:  # a file THP's pmd (zap_huge_pmd)
                done += await self.pmds.zap_pmd(m, await vma_now(self.store, mm_key, pte.vpn,
                                                                 vma), mm_key, pte)
                continue
            if await pt_install(self.store, mm_key, [Pte(pte.vpn, 0, 0, 0)], {pte.vpn: pte}):
                continue  # zapped meanwhile (munmap, reclaim): theirs
            done += 1
            vma = await vma_now(self.store, mm_key, pte.vpn, vma)
            gone.setdefault((mm_key, vma.id), (vma, []))[1].append(pte)
            puts.add(pte.lv, ["P", pte.idx])
        for vma, ptes in gone.values():
            for lv, ops in zap_ops(m, vma, sorted(ptes, key=lambda p: p.vpn)):
                rmap.add(lv, *ops)
        await rmap.execute(self.swap, m)
        await puts.execute(self.swap, m)
        return done

    # ------------------------------------------------------- truncate_inode_pages_range --
    async def truncate_inode_pages_range(self, m: Machine, f: FileInfo, first: int,
                                         last: int) -> int:
        """Every page cache page of [first, last): locked (find_lock_entries), unmapped if a
        racing fault mapped it (unmap_mapping_folio), removed from the cache
        (filemap_remove_folio), unlocked; the cache's reference and the lookup's go.
        Returns the pages removed."""
        fkey = keys.file(m.mid, f.fid)
        entries = await self.store.client.hgetall(f"{fkey}:pc")
        indices = sorted(i for i in (int(text(k)) for k in entries) if first <= i < last)
        removed = 0
        for index in indices:
            removed += await self._truncate_one(m, f, fkey, index, (first, last))
        return removed

    async def _truncate_one(self, m: Machine, f: FileInfo, fkey: str, index: int,
                            span: tuple[int, int]) -> int:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        attempt = 0
        while True:
            raw = await self.store.client.hget(f"{fkey}:pc", index)
            if raw is None:
                return 0  # gone meanwhile (reclaim freed it)
            swapped = swap_entry(raw)
            if swapped is not None and text(raw).startswith("swap|"):
                # shmem_undo_range: a swapped-out page's entry goes (shmem_free_swap)
                if int(await self.store.fcall("pc_swap_drop", fkey, index, swapped)):
                    await free_swap_and_cache(self.store, self.swap, m, [swapped])
                    return 0
                continue  # read back meanwhile: look again
            slot = parse_slot(raw)
            if slot is not None:
                lv, idx = slot.ref
                res = await self.swap.run(m, lv, [slot.grab_op(f.fid, index)])
                if not res.failed:
                    break
            # being read in, locked (a fault, reclaim, migration) or frozen: lock_page waits
            attempt += 1
            if time.monotonic() > deadline:
                raise KernelError("EAGAIN", f"page {index} of {f.name!r} stayed locked")
            await asyncio.sleep(min(0.001 * attempt, 0.05))
        page = (await read_pages(self.store, m, [(lv, idx)]))[0]
        if slot.is_thp:
            return await self._truncate_thp(m, f, fkey, index, span, slot, page)
        if page.mapcount or page.pte_mapcount:
            async with self.rmap.locked(m, page):  # unmap_mapping_folio
                maps = await self.rmap.mappings(m, lv, idx, page)
                await self._zap(m, [(mp.mm_key, mp.vma, mp.pte) for mp in maps])
        await self.store.fcall("pc_delete", fkey, index, f"{lv}|{idx}")
        # the cache's reference, then the lookup's: the last one frees the page (§6), unless
        # a pin or a batch entry still holds it (X1)
        await self.swap.run(m, lv, [["F", idx, 0, int(PG.PAGECACHE | PG.LOCKED)],
                                    ["P", idx], ["P", idx]])
        return 1


    async def _truncate_thp(self, m: Machine, f: FileInfo, fkey: str, index: int,
                            span: tuple[int, int], slot: Slot, page: Page) -> int:
        """A file THP found at ``index``, locked and referenced: inside the truncated range
        it leaves the cache whole (its pmds and subpage ptes a racing fault made go first);
        cut by the range's end it is split (truncate_inode_partial_folio) and the pages
        are truncated one by one - a THP that cannot be split now (a racing reference)
        stays whole in the cache, as Linux keeps the folio and zeroes the range."""
        lv, idx = slot.ref
        base = page.index
        first, last = span
        if first <= base and base + page.nr_pages <= last:
            if page.mapcount or page.pte_mapcount:
                async with self.rmap.locked(m, page):
                    maps = await thp_mappings(self.store, m, lv, idx, page)
                    await try_to_unmap_ignore_mlock(self.store, self.swap, m, lv, idx, maps)
            await self.store.fcall("pc_delete_all", fkey, slot.value(),
                                   *range(base, base + page.nr_pages))
            await self.swap.run(m, lv, [["F", idx, 0, int(PG.PAGECACHE | PG.LOCKED)],
                                        ["P", idx], ["P", idx]])
            return page.nr_pages
        async with self.rmap.locked(m, page):
            tails = await self.huge.split_file_thp(m, lv, idx)
        await self.swap.run(m, lv, [["F", idx, 0, int(PG.LOCKED)], ["P", idx]])
        if tails is None:
            return 0
        return await self._truncate_one(m, f, fkey, index, span)


def check_size(m: Machine, pages: int, what: str) -> None:
    """Sizes a file may take: 0 .. the machine's memory (create_file's bound)."""
    if not 0 <= pages <= m.cfg.frames_per_node * m.cfg.nodes:
        raise einval(f"{what} must be 0..{m.cfg.frames_per_node * m.cfg.nodes} pages")

