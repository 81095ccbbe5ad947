"""mm/memory.c: page faults, COW, fault-around and zapping (spec §3.2-§3.4, §3.7, §3.8).

The rmap hooks of the rework are emitted here as page-program ops: every pte added to a
VM_LOCKED vma is followed by ``mlock_vma_page`` (op ``L``), every new anonymous page goes
through ``lru_cache_add_inactive_or_unevictable`` (``N`` or ``C``), and every pte removed is
followed by ``munlock_vma_page`` (``K``), whether or not mapcount reached zero (§3.4.1).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import NoReturn

from mmsvc.locks import Held, Locks
from mmsvc.mm.errors import KernelError
from mmsvc.mm.filemap import FilePmd, Slot, drop_reservations, map_ops, parse_slot, slot_bits
from mmsvc.mm.machine import FileInfo, Machine, new_id, refresh_files
from mmsvc.mm.mm_struct import MmState, Pte, pt_install, pt_read, pt_zap, pte_args
from mmsvc.mm.page import PG, PTRS_PER_PMD, SUBPAGE_SHIFT, Page, PTEBit
from mmsvc.mm.rmap import (
    anon_vma_add,
    large_folio_rules,
    new_anon_ops,
    page_add_rmap_ops,
    page_remove_rmap_ops,
    pte_unmap_ops,
    zap_ops,
)
from mmsvc.mm.swap import FastFault, InstallAfter, Op, OutOfFrames, Swap, rebase_ops
from mmsvc.mm.swapfile import (
    add_to_swap_cache,
    free_swap_and_cache,
    lookup_swap_cache,
    shmem_swapin_done,
    swap_count,
    swap_pte,
    swap_ptes,
)
from mmsvc.mm.vma import VM, Vma, anon_vma_compatible
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore

ANON_FLAGS = int(PG.ANON | PG.SWAPBACKED)
FAULT_RETRY_SECONDS = 15.0  # > 2 CPU leases + a stop_machine


class FaultRace(KernelError):
    """A fault lost the race for a pte (or a page being read in): retried, like Linux."""

    def __init__(self, message: str) -> None:
        super().__init__("EAGAIN", message)
SHMEM_CACHE_FLAGS = int(PG.SWAPBACKED | PG.PAGECACHE)
FILE_CACHE_FLAGS = int(PG.PAGECACHE)
HPAGE_ORDER = 9  # HPAGE_PMD_NR = 512 (x86-64, 4 KiB pages)
THP_FLAGS = int(PG.ANON | PG.SWAPBACKED | PG.HEAD)


def cache_flags(shmem: bool) -> int:
    """A new page cache page: shmem pages are swap-backed (anon LRU lists)."""
    return SHMEM_CACHE_FLAGS if shmem else FILE_CACHE_FLAGS


@dataclass
class ProgramStopped(KernelError):
    """A multi-lruvec program ran out of frames after its first ``at`` ops (counted across
    its runs) had run and allocated ``allocated``: what the kernel would have completed
    before the failing allocation is done; the caller keeps that progress."""

    def __init__(self, message: str, at: int, allocated: list[int]) -> None:
        super().__init__("ENOMEM", message)
        self.at = at
        self.allocated = allocated


@dataclass
class Programs:
    """Page-program ops grouped into runs of one lruvec, kept in kernel order."""

    runs: list[tuple[int, list[Op]]]

    @classmethod
    def empty(cls) -> Programs:
        return cls([])

    def add(self, lv: int, *ops: Op) -> None:
        if self.runs and self.runs[-1][0] == lv:
            self.runs[-1][1].extend(ops)
        else:
            self.runs.append((lv, list(ops)))

    def mark(self) -> int:
        """Position after the ops added so far (a flat op count over the runs)."""
        return sum(len(ops) for _, ops in self.runs)

    async def execute(self, swap: Swap, m: Machine) -> list[int]:
        """Run every run in order; returns the pages allocated, numbered as the ops' -k.
        Out of frames part-way: ProgramStopped says how far it got."""
        allocated: list[int] = []
        at = 0
        for lv, ops in self.runs:
            local = rebase_ops(ops, allocated)
            try:
                allocated.extend((await swap.run(m, lv, local)).allocs)
            except OutOfFrames as exc:
                raise ProgramStopped(exc.message, at + exc.done,
                                     allocated + exc.allocs) from exc
            at += len(ops)
        return allocated

    async def execute_and_install(self, swap: Swap, m: Machine, install: InstallAfter | None,
                                  ) -> tuple[list[int], list[int] | None]:
        """execute(); a one-run program with ``install`` also sets the ptes in its call when
        it runs to its end there: returns the allocations and the install's conflicts (None:
        not installed, the caller installs)."""
        if install is None or len(self.runs) != 1:
            return await self.execute(swap, m), None
        lv, ops = self.runs[0]
        try:
            res = await swap.run(m, lv, ops, install)
        except OutOfFrames as exc:
            raise ProgramStopped(exc.message, exc.done, exc.allocs) from exc
        return res.allocs, res.installed

    async def finish(self, swap: Swap, m: Machine, start: int, end: int,
                     allocated: list[int]) -> bool:
        """Run the ops [start, end) of a stopped program (the rest of one page's fault) up to
        its next allocation, which would fail too; True when that was all of them."""
        flat = [(lv, op) for lv, ops in self.runs for op in ops][start:end]
        cut = next((i for i, (_, op) in enumerate(flat) if op[0] == "A"), len(flat))
        rest = Programs.empty()
        for lv, op in flat[:cut]:
            rest.add(lv, *rebase_ops([op], allocated))
        await rest.execute(swap, m)
        return cut == len(flat)


async def read_pages(store: RedisStore, m: Machine, refs: list[tuple[int, int]]) -> list[Page]:
    """Decoded records of (lv, idx) pages (one call per lruvec)."""
    by_lv: dict[int, list[int]] = defaultdict(list)
    for lv, idx in refs:
        by_lv[lv].append(idx)
    found: dict[tuple[int, int], Page] = {}
    for lv, idxs in by_lv.items():
        raw = await store.fcall("mm_records", m.lv_key(lv), *idxs)
        for idx, rec in zip(idxs, raw, strict=True):
            found[(lv, idx)] = Page.decode(rec)
    return [found[r] for r in refs]


class Faults:
    """handle_mm_fault for ranges of one VMA, on behalf of one CPU."""

    def __init__(self, store: RedisStore, swap: Swap) -> None:
        self.store = store
        self.swap = swap
        # legacy: COW in a VM_LOCKED vma munlocks the old page with page_mlock (§9.7)
        self.legacy_cow: Callable[[Machine, list[tuple[int, int]]], Awaitable[None]] | None = None

    async def fault_range(
        self, m: Machine, mm: MmState, vma: Vma, start: int, end: int, write: bool
    ) -> int:
        """Fault every page of [start, end) of vma, ascending; returns pages newly mapped.

        A fault that loses a race for a pte (another thread of the process faulted it) backs
        off and is retried, as the CPU re-executes the faulting access (and GUP retries the
        page): callers never see the race."""
        deadline = time.monotonic() + FAULT_RETRY_SECONDS
        attempt = 0
        while True:
            try:
                return await self._fault_range(m, mm, vma, start, end, write)
            except FaultRace:
                # Linux waits (lock_page, migration_entry_wait); a page held by a CPU that
                # died is released when a survivor takes that CPU offline (~ the CPU lease)
                attempt += 1
                if time.monotonic() > deadline:
                    raise
                vma = mm.find(start) or vma
                await asyncio.sleep(min(0.001 * attempt, 0.05))

    async def _fault_range(
        self, m: Machine, mm: MmState, vma: Vma, start: int, end: int, write: bool
    ) -> int:
        if write and not vma.flags & VM.WRITE:
            raise KernelError("EFAULT", "write fault on a mapping without PROT_WRITE")
        if not vma.flags & (VM.READ | VM.WRITE):
            raise KernelError("EFAULT", "fault on a PROT_NONE mapping")
        ptes = mm.take_prefetched(start, end)
        if ptes is None:
            ptes = await pt_read(self.store, mm.key, start, end, walk=True)
        if write and not vma.shared and vma.anon_vma == 0:
            vma = await self.anon_vma_prepare(m, mm, vma)
        # swap entries are not present: pt_read does not report them (mm/swapfile.py)
        if (m.cfg.swap_pages and vma.anon_vma and not vma.shared
                and await self.do_swap_page(m, mm, vma, start, end, write)):
            ptes = await pt_read(self.store, mm.key, start, end, walk=True)
        if vma.is_anon:
            done = 0
            if m.cfg.thp and write:
                done, ptes = await self._huge_anon(m, mm, vma, start, end, ptes)
            return done + await self._anon(m, mm, vma, start, end, write, ptes)
        return await self._file(m, mm, vma, start, end, write, ptes)

    async def do_swap_page(self, m: Machine, mm: MmState, vma: Vma, start: int,
                           end: int, write: bool) -> int:
        """do_swap_page for each swap entry of [start, end), ascending; returns how many.

        The page is found in the swap cache (a fork sibling read it in, or reclaim has not
        freed it yet) or read into a new one, then mapped with page_add_anon_rmap - not
        page_add_new_anon_rmap: in a VM_LOCKED vma its rmap hook mlocks the page (§3.2.1, the
        swap-in caller), then a new page goes to lru_cache_add.  A write fault maps it
        writable when this pte is its only user (reuse_swap_page); otherwise it is mapped
        read-only and the write goes on as do_wp_page: a copy (COW after fork).  The swap
        pte's slot reference goes last (swap_free, then try_to_free_swap)."""
        entries = await swap_ptes(self.store, mm.key, start, end)
        for vpn, slot in entries.items():
            await self._swap_in_one(m, mm, vma, vpn, slot, write)
        return len(entries)

    async def _swap_in_one(self, m: Machine, mm: MmState, vma: Vma, vpn: int,
                           slot: int, write: bool) -> None:
        exclusive = write and await swap_count(self.store, m, slot) == 1
        cached = await lookup_swap_cache(self.store, m, slot)
        if cached is not None:
            lv, idx = cached
            # the lookup's reference: fails on a page reclaim froze to free it
            res = await self.swap.run(m, lv, [["pin", idx, 1]])
            page = None if res.failed else (await read_pages(self.store, m, [cached]))[0]
            if page is None or not page.has(PG.SWAPCACHE):
                if page is not None:
                    await self.swap.run(m, lv, [["P", idx]])
                raise FaultRace("swap cache page being freed")
            exclusive = exclusive and page.mapcount == 0
            ops: list[Op] = [*page_add_rmap_ops(m, vma, idx), ["P", idx]]
        else:
            # swapin_readahead -> __read_swap_cache_async: a new page in the swap cache
            lv = mm.lv
            root = vma.anon_parents[-1] if vma.anon_parents else vma.anon_vma
            flags = ANON_FLAGS | int(PG.SWAPCACHE)
            new = Programs([(lv, [["A", flags, root, vma.linear_index(vpn), 0], ["G", -1]])])
            idx = (await new.execute(self.swap, m))[0]
            if await add_to_swap_cache(self.store, m, slot, lv, idx) != (lv, idx):
                # the new page's only reference is the one it took for the swap cache (an
                # allocation holds none: lru_cache_add takes the page's first): it is freed
                await self.swap.run(m, lv, [["F", idx, 0, int(PG.SWAPCACHE)], ["P", idx]])
                raise FaultRace("swap entry read in or freed by someone else")
            # mapped (+ mlock_vma_page), then lru_cache_add takes the allocation's reference
            ops = [*page_add_rmap_ops(m, vma, idx), ["C", idx]]
        await self.swap.run(m, lv, ops)
        bits = int(PTEBit.PRESENT | PTEBit.DIRTY | (PTEBit.WRITE if exclusive else 0))
        if await pt_install(self.store, mm.key, [Pte(vpn, idx, lv, bits)],
                            {vpn: swap_pte(vpn, slot)}):
            await self.swap.run(m, lv, [*page_remove_rmap_ops(m, vma, idx), ["P", idx]])
            raise FaultRace("concurrent fault on a swap entry")
        await free_swap_and_cache(self.store, self.swap, m, [slot])

    async def anon_vma_prepare(self, m: Machine, mm: MmState, vma: Vma) -> Vma:
        """The first anonymous page of a VMA needs an anon_vma: a compatible neighbour's
        (find_mergeable_anon_vma, if its chain is singular) or a new one."""
        avid = 0
        for other in mm.vmas:
            if (other.id != vma.id and other.anon_vma and not other.anon_parents
                    and anon_vma_compatible(vma, other)):
                avid = other.anon_vma
                break
        if avid == 0:
            avid = await new_id(self.store, m.mid, "anon_vma")
        await anon_vma_add(self.store, m, avid, mm.pid)
        vma = replace(vma, anon_vma=avid)
        mm.vmas = [vma if v.id == vma.id else v for v in mm.vmas]
        # under the mmap_lock for read: only this VMA's anon_vma field changes (one store)
        await self.store.client.hset(f"{mm.key}:vma", str(vma.id), vma.to_json())
        return vma

    # ------------------------------------------------------------------ THP (§3.9) -------
    async def _huge_anon(
        self, m: Machine, mm: MmState, vma: Vma, start: int, end: int, ptes: dict[int, Pte]
    ) -> tuple[int, dict[int, Pte]]:
        """do_huge_pmd_anonymous_page for each empty, aligned pmd of the VMA that the write
        fault touches; a write to a write-protected huge pmd (after fork) reuses the THP if
        nothing else references it, else splits the pmd and falls back to pte COW
        (do_huge_pmd_wp_page).  Returns the ptes to go on with."""
        done = 0
        first, last = start // PTRS_PER_PMD, (end - 1) // PTRS_PER_PMD
        by_pmd = ptes_by_pmd(ptes)
        for pmd in range(first, last + 1):
            base = pmd * PTRS_PER_PMD
            in_pmd = by_pmd.get(pmd, [])
            if in_pmd and in_pmd[0].is_pmd and not in_pmd[0].bits & PTEBit.WRITE:
                if not await self._reuse_huge_pmd(m, mm, pmd, in_pmd[0]):
                    await split_huge_pmd(self.store, self.swap, m, mm, vma, pmd)
                continue
            if (in_pmd or base < vma.start or base + PTRS_PER_PMD > vma.end
                    or not m.cfg.thp_anon_fault):  # enabled=madvise: no THP at fault
                continue
            full = await pt_read(self.store, mm.key, base, base + PTRS_PER_PMD)
            if full:
                continue  # a page table exists (pmd_none fails): small pages
            ops: list[Op] = [["A", THP_FLAGS, vma.anon_vma, vma.linear_index(base), HPAGE_ORDER],
                             *new_anon_ops(m, vma, -1)]
            head = (await Programs([(mm.lv, ops)]).execute(self.swap, m))[0]
            bits = int(PTEBit.PRESENT | PTEBit.WRITE | PTEBit.DIRTY)
            installed = int(await self.store.fcall("pmd_install", mm.key, pmd, head, mm.lv, bits,
                                                   0, 0, 0))
            if not installed:
                undo = Programs([(mm.lv, [*page_remove_rmap_ops(m, vma, head), ["P", head]])])
                await undo.execute(self.swap, m)
                raise FaultRace("concurrent fault on a huge pmd")
            done += PTRS_PER_PMD
        if done or any(p.is_pmd for p in ptes.values()):
            ptes = await pt_read(self.store, mm.key, start, end, walk=True)
        return done, ptes


    async def _exclusive_thps(self, m: Machine, mm: MmState, wp: list[Pte],
                              records: dict[int, Page]) -> set[tuple[int, int]]:
        """Linux 6.18's wp_can_reuse_anon_folio for a large folio (``large_folio_mlock``:
        the 6.5+ large-folio rules): a write to a read-only pte of a THP subpage reuses it
        when this address space alone maps the THP, by more than one mapping, and nothing
        else holds a reference (large mapcount == refcount); under the rework (5.18) a THP
        subpage is always copied."""
        out: set[tuple[int, int]] = set()
        if not large_folio_rules(m):
            return out
        seen: set[tuple[int, int]] = set()
        for pte in wp:
            ref = (pte.lv, pte.idx)
            if not pte.is_subpage or ref in seen:
                continue
            seen.add(ref)
            page = records[pte.vpn]
            total = page.mapcount + page.pte_mapcount
            if (total <= 1 or page.refcount != total or not page.has(PG.ANON)
                    or page.has(PG.SWAPCACHE)):
                continue
            first = pte.vpn - (pte.bits >> SUBPAGE_SHIFT)
            mine = sum(1 for p in (await pt_read(self.store, mm.key, first,
                                                 first + page.nr_pages)).values()
                       if p.is_subpage and (p.lv, p.idx) == ref)
            if mine == total:
                out.add(ref)
        return out

    async def _reuse_huge_pmd(self, m: Machine, mm: MmState, pmd: int, pte: Pte) -> bool:
        """do_huge_pmd_wp_page's reuse: a THP whose only reference is this pmd's mapping (the
        fork relative that shared it has COWed its copy or gone) is made writable in place -
        the host kernel then mlocks it by the mlock walk instead of copying 512 pages."""
        page = (await read_pages(self.store, m, [(pte.lv, pte.idx)]))[0]
        if page.refcount != 1 or page.has(PG.SWAPCACHE) or page.has(PG.KSM):
            return False  # unlock_fallback
        bits = int(pte.bits & ~PTEBit.PMD)
        writable = bits | int(PTEBit.WRITE | PTEBit.DIRTY)
        return bool(int(await self.store.fcall("pmd_install", mm.key, pmd, pte.idx, pte.lv,
                                               writable, pte.idx, pte.lv, bits)))

    # -------------------------------------------------------------- anonymous private -----
    async def _anon(
        self, m: Machine, mm: MmState, vma: Vma, start: int, end: int, write: bool,
        ptes: dict[int, Pte],
    ) -> int:
        progs = Programs.empty()
        installs: list[tuple[int, int | None, int]] = []  # vpn, new page slot or None, bits
        expect: dict[int, Pte] = {}
        wp_reuse: list[Pte] = []
        cow_old: list[tuple[int, int]] = []
        new_count = 0
        wr, zero = int(PTEBit.WRITE), int(PTEBit.ZERO)  # ints: IntFlag ops per pte are slow
        to_check = [p for vpn, p in ptes.items() if write and not p.bits & wr
                    and not p.bits & zero and not p.is_pmd]
        records = dict(zip(
            [p.vpn for p in to_check],
            await read_pages(self.store, m, [(p.lv, p.idx) for p in to_check]),
            strict=True,
        ))
        exclusive_thps = await self._exclusive_thps(m, mm, to_check, records)
        spans: list[tuple[int, int]] = []  # each install's ops in progs
        reuse_at: list[int] = []  # progs position of each wp_reuse
        for vpn in range(start, end):
            cur = ptes.get(vpn)
            begin = progs.mark()
            if cur is not None and not write:
                continue
            if cur is not None and (cur.bits & wr or cur.is_pmd):
                continue
            if cur is None and not write:
                # Read fault on private anon: the shared zero page (no struct page work).
                installs.append((vpn, None, int(PTEBit.PRESENT | PTEBit.ZERO)))
                spans.append((begin, begin))
                continue
            if cur is not None and not cur.bits & zero:
                page = records[vpn]
                # a KSM page is never reused: do_wp_page copies it (mm/ksm.py, COW break)
                if ((page.mapcount == 1 and page.refcount == 1 and page.has(PG.ANON)
                        and not page.has(PG.KSM) and not cur.is_subpage)
                        or (cur.lv, cur.idx) in exclusive_thps):
                    wp_reuse.append(cur)  # do_wp_page: reuse the only reference
                    reuse_at.append(begin)
                    continue
                cow_old.append((cur.lv, cur.idx))
            if cur is not None:
                expect[vpn] = cur
            new_count += 1
            add_new_anon_page(progs, m, mm, vma, vpn, new_count)
            if cur is not None and not cur.bits & PTEBit.ZERO:
                # wp_page_copy: the new page first, then the old page loses this mapping
                # (§3.4.2 COW caller) and its reference, before the next page's fault
                progs.add(cur.lv, *pte_unmap_ops(m, vma, cur), ["P", cur.idx])
            installs.append((vpn, new_count, int(PTEBit.PRESENT | PTEBit.WRITE | PTEBit.DIRTY)))
            spans.append((begin, progs.mark()))
        # COW replaces a mapped page: claim its pte first (the PTL a racing fault on the same
        # pte would wait for), so that only one fault removes the old page's mapping.
        originals = dict(expect)
        expect = await self._claim(mm, expect)
        fused = self._install_after(m, mm, progs, *anon_ptes(mm, installs, wp_reuse, None,
                                                              expect))
        try:
            allocs, installed = await progs.execute_and_install(self.swap, m, fused)
        except ProgramStopped as stop:
            # Out of memory part-way: the pages before the failing allocation stay mapped
            reached = await keep_progress(self.swap, m, progs, stop, spans)
            installs = installs[:reached]
            limit = spans[reached][0] if reached < len(spans) else stop.at
            wp_reuse = [p for p, at in zip(wp_reuse, reuse_at, strict=True) if at <= limit]
            vpns = {vpn for vpn, _, _ in installs}
            await self._unclaim(mm, {v: p for v, p in expect.items() if v not in vpns},
                                originals)
            expect = {v: p for v, p in expect.items() if v in vpns}
            cow_old = [(p.lv, p.idx) for v, p in originals.items()
                       if v in vpns and not p.bits & PTEBit.ZERO]
            await self._map_anon_pages(m, mm, vma, installs, wp_reuse, stop.allocated, expect,
                                       cow_old)
            raise KernelError("ENOMEM", stop.message) from stop
        except BaseException:
            await self._unclaim(mm, expect, originals)
            raise
        if installed is not None:  # the program's call also set the ptes
            new_ptes, _, fresh = anon_ptes(mm, installs, wp_reuse, allocs, expect)
            await self._after_fused_install(m, mm, vma, new_ptes, fresh, installed)
            return new_count
        await self._map_anon_pages(m, mm, vma, installs, wp_reuse, allocs, expect, cow_old)
        return new_count

    async def fault_fast(self, m: Machine, mm: MmState, vma: Vma, vpn: int,
                         lease_ms: int) -> bool:
        """A write fault on one page of private anonymous memory, as the worker last saw the
        address space (``mm``, no lock held): built as do_anonymous_page would on an empty pte,
        then sent with the checks that make it right (the VMA unchanged, the pte still none,
        mmap_lock free) as one call (``fault_fast``).  False: a check failed and nothing was
        done - the caller faults the usual way.  One page only, so that an allocation
        failure can only be the program's first op (nothing to keep or undo)."""
        progs = Programs.empty()
        add_new_anon_page(progs, m, mm, vma, vpn, 1)
        bits = int(PTEBit.PRESENT | PTEBit.WRITE | PTEBit.DIRTY)
        new = [Pte(vpn, -1, mm.lv, bits)]
        fast = FastFault(mm.key, "r", vma.id, vma.to_json(), pte_args(new, {}), lease_ms)
        lv, ops = progs.runs[0]
        try:
            res = await self.swap.run(m, lv, ops, fast)
        except BaseException:
            if fast.taken and not fast.released:  # the lock it took goes with the error
                await self.swap.locks.release(self._fast_held(mm, fast))
            raise
        if res.fast == "miss":
            return False
        if res.fast == "done":
            return True
        # 'held': the program went on in later calls; set the pte and release the lock here
        mm.held = self.swap.locks.track(self._fast_held(mm, fast))
        mm.unlock_on_install = True
        fast.released = True
        try:
            await self._install(m, mm, vma, [Pte(vpn, res.allocs[0], mm.lv, bits)], {},
                                {vpn}, last=True)
        finally:
            if mm.held is not None:  # raced: still held
                await self.swap.locks.release(mm.held)
                mm.held = None
        return True

    @staticmethod
    def _fast_held(mm: MmState, fast: FastFault) -> Held:
        tok, bounce = fast.taken[0]
        return Held(f"{mm.key}:mmap_lock", fast.mode, tok, False, bounce, 0.0,
                    time.perf_counter())  # tracked by the caller while it holds it

    def _install_after(self, m: Machine, mm: MmState, progs: Programs, new: list[Pte],
                       expect: dict[int, Pte], fresh: set[int]) -> InstallAfter | None:
        """The fault's last install can go with its page program (one round trip, the
        store's ``mm_pages_install``) when the program is one lruvec's, the store is a single
        Redis and this install also releases mmap_lock (a one-VMA fault, the common case).
        The legacy design's COW munlock (after the install) keeps the two steps apart."""
        if (self.store.is_cluster or len(progs.runs) != 1 or not mm.unlock_on_install
                or mm.held is None or str(m.cfg.protocol) == "legacy"):
            return None
        return InstallAfter(mm.key, self.swap.locks.release_args(mm.held), pte_args(new, expect))

    async def _after_fused_install(self, m: Machine, mm: MmState, vma: Vma, new: list[Pte],
                                   fresh: set[int], raced: list[int]) -> None:
        """What _install does after pt_install_unlock, for a fused program + install."""
        if raced == [-1] or not raced:
            if mm.held is not None:
                Locks.untrack(mm.held)
            mm.held = None  # released by the install, or evicted: nothing to release
            if raced == [-1]:
                raise KernelError("EAGAIN", "mmap_lock lease expired (fenced): nothing mapped")
            return
        await self._back_off(m, vma, new, fresh, raced)

    async def _map_anon_pages(
        self, m: Machine, mm: MmState, vma: Vma, installs: list[tuple[int, int | None, int]],
        wp_reuse: list[Pte], allocs: list[int], expect: dict[int, Pte],
        cow_old: list[tuple[int, int]],
    ) -> None:
        new_ptes, expect, fresh = anon_ptes(mm, installs, wp_reuse, allocs, expect)
        await self._install(m, mm, vma, new_ptes, expect, fresh, last=True)
        await self._legacy_cow(m, vma, cow_old)

    # ---------------------------------------------------------------- file / shmem -------
    async def _file(
        self, m: Machine, mm: MmState, vma: Vma, start: int, end: int, write: bool,
        ptes: dict[int, Pte],
    ) -> int:
        f = m.file_by_id(vma.file)
        fkey = keys.file(m.mid, vma.file)
        cow = write and not vma.shared
        if m.cfg.thp:
            ptes = await self._file_pmds(m, mm, vma, start, end, write, ptes)
        wanted: list[int] = []  # vpns needing a fault
        for vpn in range(start, end):
            cur = ptes.get(vpn)
            if cur is None or (write and not cur.bits & PTEBit.WRITE):
                wanted.append(vpn)
        if not wanted:
            return 0
        # Fault-around (read faults only): map what the page cache already has in the
        # aligned window around each faulting page (do_fault_around).
        around: set[int] = set()
        if not write and m.cfg.fault_around_pages > 1:
            fa = m.cfg.fault_around_pages
            lo = max(vma.start, start - start % fa)
            hi = min(vma.end, end + (-end) % fa)
            if lo < start or hi > end:  # the window reaches beyond the faulting range
                ptes = {**await pt_read(self.store, mm.key, lo, hi, walk=True), **ptes}
            for vpn in wanted:
                base = vpn - (vpn % fa)
                for v in range(max(base, vma.start), min(base + fa, vma.end)):
                    if v not in ptes and vma.linear_index(v) < f.pages:
                        around.add(v)
        beyond = [v for v in wanted if vma.linear_index(v) >= f.pages]
        if beyond and await self._resized(m, f):
            # ftruncate on another CPU grew the file since this one cached its size
            return await self._file(m, mm, vma, start, end, write, ptes)
        if beyond:
            # ascending faults: the pages before the first one beyond EOF are mapped
            eof = min(beyond)
            if eof > start:
                await self._file(m, mm, vma, start, eof, write, {
                    v: p for v, p in ptes.items() if v < eof})
            raise KernelError("EFAULT", "SIGBUS: access beyond the end of the file")
        owner = uuid.uuid4().hex[:12]
        indices = sorted({vma.linear_index(v) for v in wanted})
        looked = await self.store.fcall("pc_lookup_flags", fkey, owner, *indices)
        # the mapping's flags with the reservations: SHM_LOCK's PG_UNEVICTABLE_MAPPING (shm.py)
        mapping_flags = int(looked.pop())
        cache: dict[int, Slot | None] = {}
        swapped: dict[int, int] = {}  # file index -> the swap slot its page is read back from
        reserved = [i for i, v in zip(indices, looked, strict=True)
                    if v == b"new" or v.startswith(b"swapin|")]
        for index, val in zip(indices, looked, strict=True):
            s = val.decode()
            if s == "eof":
                # i_size shrank under us (ftruncate on another CPU, mm/truncate.py): refresh
                # the cached size and fault again, which then raises SIGBUS where it must
                await self._drop_reservations(fkey, owner, reserved)
                await self._resized(m, f)
                raise FaultRace("file truncated during the fault")
            if s == "busy":
                await self._drop_reservations(fkey, owner, reserved)
                raise FaultRace("page cache page is being read in by another task")
            if s.startswith("swapin|"):
                # shmem_swapin_folio: a swapped-out shmem page, read back into a new page
                # (pswpin) that takes the swap entry's place in the page cache
                swapped[index] = int(s[7:])
                cache[index] = None
                continue
            cache[index] = None if s == "new" else parse_slot(s)
        around_idx = sorted({vma.linear_index(v) for v in around} - set(cache))
        mine = [i for i, v in cache.items() if v is None]
        try:
            if around_idx:
                peek = await self.store.fcall("pc_peek", fkey, *around_idx)
                around_cache = {i: slot for i, v in zip(around_idx, peek, strict=True)
                                if v and (slot := parse_slot(v)) is not None}
            else:
                around_cache = {}
            hits = {i: v for i, v in cache.items() if v is not None}
            lost = await self._grab(m, vma.file, {**around_cache, **hits})
            around_cache = {i: v for i, v in around_cache.items() if i not in lost}
            if lost & hits.keys():
                await self._release(m, _pages({i: v for i, v in {**around_cache, **hits}.items()
                                               if i not in lost}))
                raise FaultRace("page cache page locked, being freed or migrated")
        except BaseException:
            await self._drop_reservations(fkey, owner, mine)
            raise
        try:
            return await self._file_map(m, mm, vma, fkey, owner, wanted, around, cache,
                                        around_cache, write, cow, ptes, mapping_flags,
                                        swapped)
        except BaseException:
            await self._drop_reservations(fkey, owner, mine)
            raise

    async def _file_pmds(self, m: Machine, mm: MmState, vma: Vma, start: int, end: int,
                         write: bool, ptes: dict[int, Pte]) -> dict[int, Pte]:
        """The pmd level of a file fault (filemap.py): an empty pmd whose aligned range the
        page cache holds as a THP is mapped by the pmd itself (do_set_pmd); a write to a
        read-only file pmd splits it (do_huge_pmd_wp_page's fallback: COW or mkwrite at the
        pte level).  Returns the ptes of [start, end) as they are now."""
        fp = FilePmd(self.store, self.swap)
        changed = False
        by_pmd = ptes_by_pmd(ptes)
        for pmd in range(start // PTRS_PER_PMD, (end - 1) // PTRS_PER_PMD + 1):
            in_pmd = by_pmd.get(pmd, [])
            huge = next((p for p in in_pmd if p.is_pmd), None)
            if huge is not None:
                if write and not huge.bits & PTEBit.WRITE:
                    changed |= await split_huge_pmd(self.store, self.swap, m, mm, vma, pmd)
                continue
            if in_pmd or (write and not vma.shared):
                continue  # a page table exists, or do_cow_fault: small anonymous copies
            changed |= await fp.map_pmd(m, mm, vma, pmd, write)
        if changed:
            ptes = await pt_read(self.store, mm.key, start, end, walk=True)
        return ptes

    async def _resized(self, m: Machine, f: FileInfo) -> bool:
        """Reload the file registry (sizes change with ftruncate, mm/truncate.py); True when
        f's size is not what this CPU had cached."""
        await refresh_files(self.store, m)
        return m.file_by_id(f.fid).pages != f.pages

    async def _grab(self, m: Machine, fid: int, found: dict[int, Slot]) -> set[int]:
        """filemap_get_folio + lock_page for pages the page cache lookups found (the lookup
        holds no reference): a reference and PG_locked on each, in file order.  Returns the
        file indices whose page was freed, frozen or reused meanwhile, or is locked by someone
        else (reclaim, migration, another fault): the faulting page then retries, as
        filemap_fault waits on the page lock; a fault-around page is skipped, as
        filemap_map_pages' trylock does.  A file THP is taken once, whichever of its
        subpages are wanted."""
        by_lv: dict[int, list[Op]] = defaultdict(list)
        where: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in sorted(found):
            slot = found[index]
            if slot.ref not in where:
                by_lv[slot.lv].append(slot.grab_op(fid, index))
            where[slot.ref].append(index)
        lost: set[int] = set()
        for lv, ops in by_lv.items():
            res = await self.swap.run(m, lv, ops)
            for idx in res.failed:
                lost.update(where[(lv, idx)])
        return lost

    async def _release(self, m: Machine, pages: list[tuple[int, int]]) -> None:
        """unlock_page + folio_put of pages _grab took."""
        progs = Programs.empty()
        for lv, idx in pages:
            progs.add(lv, ["F", idx, 0, int(PG.LOCKED)], ["P", idx])
        await progs.execute(self.swap, m)

    async def _drop_reservations(self, fkey: str, owner: str, indices: list[int]) -> None:
        """Give up page cache slots this fault reserved but did not fill."""
        await drop_reservations(self.store, fkey, owner, indices)

    async def _file_map(
        self, m: Machine, mm: MmState, vma: Vma, fkey: str, owner: str, wanted: list[int],
        around: set[int], cache: dict[int, Slot | None],
        around_cache: dict[int, Slot], write: bool, cow: bool, ptes: dict[int, Pte],
        mapping_flags: int = 0, swapped: dict[int, int] | None = None,
    ) -> int:
        lv = mm.lv
        progs = Programs.empty()
        slots = 0
        new_cache: dict[int, int] = {}  # file index -> alloc slot
        installs: list[tuple[int, tuple[int, int] | int, int]] = []
        spans: list[tuple[int, int]] = []  # each install's ops in progs
        expect: dict[int, Pte] = {}
        cow_old: dict[int, tuple[int, int]] = {}  # vpn -> the page a COW copy replaces
        map_bits = int(PTEBit.PRESENT | (PTEBit.WRITE if vma.shared and vma.flags & VM.WRITE
                                         else 0))
        for vpn in sorted(set(wanted) | around):
            index = vma.linear_index(vpn)
            cur = ptes.get(vpn)
            begin = progs.mark()
            if vpn in around and vpn not in wanted:
                hit = around_cache.get(index)
                if hit is None:
                    continue
                progs.add(hit.lv, *map_ops(m, vma, hit))
                installs.append((vpn, hit.ref, slot_bits(hit, index, map_bits)))
                spans.append((begin, progs.mark()))
                continue
            page = cache[index]
            if page is None and index not in new_cache:
                # Read the page into the page cache: a new shmem page via the lru_add batch.
                slots += 1
                new_cache[index] = slots
                progs.add(lv, ["A", cache_flags(m.file_by_id(vma.file).shmem) | mapping_flags,
                               vma.file, index, 0],
                          ["G", -slots],
                          ["C", -slots])
            if cur is not None and vma.shared:
                # wp on a shared mapping: make the pte writable (no new mapping).
                installs.append((vpn, (cur.lv, cur.idx), cur.bits | PTEBit.WRITE))
                spans.append((begin, progs.mark()))
                expect[vpn] = cur
                continue
            if cow:
                # do_cow_fault / wp_page_copy: a private anonymous copy of the file page.
                slots += 1
                progs.add(lv, ["A", ANON_FLAGS, vma.anon_vma, index, 0],
                          *new_anon_ops(m, vma, -slots))
                if cur is not None:  # then the file page loses this mapping (wp_page_copy)
                    expect[vpn] = cur
                    progs.add(cur.lv, *pte_unmap_ops(m, vma, cur), ["P", cur.idx])
                    cow_old[vpn] = (cur.lv, cur.idx)
                installs.append((vpn, slots, int(PTEBit.PRESENT | PTEBit.WRITE | PTEBit.DIRTY)))
                spans.append((begin, progs.mark()))
                continue
            bits = map_bits | (PTEBit.DIRTY if write else 0)
            if page is not None:
                progs.add(page.lv, *map_ops(m, vma, page))
                installs.append((vpn, page.ref, slot_bits(page, index, bits)))
            else:
                progs.add(lv, *page_add_rmap_ops(m, vma, -new_cache[index]))
                installs.append((vpn, new_cache[index], bits))
            spans.append((begin, progs.mark()))
        # The pages _grab locked and referenced: unlocked once mapped and mlocked (finish_fault
        # then unlock_page), so that reclaim, which locks the page before it looks at
        # PG_mlocked and the rmap, sees the fault's mlock and repairs nothing twice (§5.2).
        grabbed = _pages({**around_cache, **cache})
        for glv, gidx in grabbed:
            progs.add(glv, ["F", gidx, 0, int(PG.LOCKED)], ["P", gidx])
        # A COW replaces a mapped page: claim its pte first, as _anon does, so that of two
        # racing faults only one removes the file page's mapping.
        originals = dict(expect)
        try:
            if cow:
                expect = await self._claim(mm, expect)
        except BaseException:
            await self._release(m, grabbed)
            raise
        try:
            allocs = await progs.execute(self.swap, m)
        except ProgramStopped as stop:
            # Out of memory part-way: the pages faulted before the failing allocation stay
            # mapped (GUP's progress; fault-around's ptes), the rest is not touched.
            reached = await keep_progress(self.swap, m, progs, stop, spans)
            await self._release(m, grabbed)  # the program's final unlocks did not run
            done = installs[:reached]
            vpns = {vpn for vpn, _, _ in done}
            await self._unclaim(mm, {v: p for v, p in expect.items() if v not in vpns},
                                originals)
            await self._map_file_pages(m, mm, vma, fkey, owner, done, new_cache,
                                       stop.allocated, {v: p for v, p in expect.items()
                                                        if v in vpns}, ptes, swapped)
            await self._legacy_cow(m, vma, [old for v, old in cow_old.items() if v in vpns])
            raise KernelError("ENOMEM", stop.message) from stop
        except BaseException:
            await self._unclaim(mm, expect, originals)
            await self._release(m, grabbed)
            raise
        mapped = await self._map_file_pages(m, mm, vma, fkey, owner, installs, new_cache,
                                            allocs, expect, ptes, swapped)
        await self._legacy_cow(m, vma, list(cow_old.values()))
        return mapped

    async def _legacy_cow(self, m: Machine, vma: Vma, old: list[tuple[int, int]]) -> None:
        """Legacy wp_page_copy in a VM_LOCKED vma: the old page (a file page, or the anonymous
        copy a fork shares) is munlocked once this mapping of it is gone (§9.7), as in _anon:
        else it stays PG_mlocked for mappings that are not locked (Q4)."""
        if self.legacy_cow is not None and old and vma.locked and \
                str(m.cfg.protocol) == "legacy":
            await self.legacy_cow(m, old)

    async def _map_file_pages(
        self, m: Machine, mm: MmState, vma: Vma, fkey: str, owner: str,
        installs: list[tuple[int, tuple[int, int] | int, int]], new_cache: dict[int, int],
        allocs: list[int], expect: dict[int, Pte], ptes: dict[int, Pte],
        swapped: dict[int, int] | None = None,
    ) -> int:
        """Publish the pages read into the page cache, then set the ptes (finish_fault).
        A page read back from swap (``swapped``) frees its swap entry once published."""
        lv = mm.lv
        publish: list[int | str] = []
        read_back: list[int] = []
        for index, slot in new_cache.items():
            if slot <= len(allocs):
                publish += [index, f"{lv}|{allocs[slot - 1]}"]
                if swapped and index in swapped:
                    read_back.append(swapped[index])
        if publish:
            await self.store.fcall("pc_commit", fkey, owner, *publish)
        if read_back:
            await shmem_swapin_done(self.store, self.swap, m, read_back)
        new_ptes = []
        for vpn, ref, bits in installs:
            if isinstance(ref, tuple):
                new_ptes.append(Pte(vpn, ref[1], ref[0], bits))
            else:
                new_ptes.append(Pte(vpn, allocs[ref - 1], lv, bits))
        mapped_new = {vpn for vpn, ref, _ in installs
                      if not (vma.shared and ptes.get(vpn) is not None)}
        await self._install(m, mm, vma, new_ptes, expect, mapped_new, last=True)
        return len(new_ptes)

    async def _claim(self, mm: MmState, expect: dict[int, Pte]) -> dict[int, Pte]:
        """Mark ptes that a COW replaces as busy (not present); EAGAIN if one changed.
        Returns the new expectations (the busy ptes)."""
        cow = {v: p for v, p in expect.items() if not p.bits & PTEBit.ZERO}
        if not cow:
            return expect
        busy = {v: Pte(v, p.idx, p.lv, int(PTEBit.MIGRATION)) for v, p in cow.items()}
        raced = set(await pt_install(self.store, mm.key, list(busy.values()), cow))
        if raced:
            # someone changed one of them: put back only the ones this fault claimed (the
            # others may be another fault's claims)
            mine = [v for v in busy if v not in raced]
            await pt_install(self.store, mm.key, [cow[v] for v in mine],
                             {v: busy[v] for v in mine})
            raise FaultRace("concurrent fault on a copy-on-write page")
        return {**expect, **busy}

    async def _unclaim(self, mm: MmState, busy: dict[int, Pte],
                       originals: dict[int, Pte]) -> None:
        """The fault failed (no memory): the claimed ptes map their old pages again."""
        claimed = {v: p for v, p in busy.items() if p.bits == PTEBit.MIGRATION}
        if claimed:
            await pt_install(self.store, mm.key, [originals[v] for v in claimed], claimed)

    async def _install(self, m: Machine, mm: MmState, vma: Vma, new: list[Pte],
                       expect: dict[int, Pte], mapped: set[int], *, last: bool) -> None:
        """set_pte_at under the PTL; a fault that raced with another on the same pte backs off,
        dropping the mapping it had prepared (the kernel's pte_same() check)."""
        if last and mm.unlock_on_install and mm.held is not None:
            held, mm.held = mm.held, None  # the lock goes with the install ...
            raced = [int(v) for v in await self.store.fcall(
                "pt_install_unlock", mm.key, *self.swap.locks.release_args(held),
                *pte_args(new, expect))]
            if raced == [-1]:
                Locks.untrack(held)
                raise KernelError("EAGAIN", "mmap_lock lease expired (fenced): nothing mapped")
            if raced:
                mm.held = held  # ... unless it raced: then it is still held (a retry follows)
            else:
                Locks.untrack(held)
        else:
            raced = await pt_install(self.store, mm.key, new, expect)
        if raced:
            await self._back_off(m, vma, new, mapped, raced)

    async def _back_off(self, m: Machine, vma: Vma, new: list[Pte], mapped: set[int],
                        raced: list[int]) -> NoReturn:
        """A fault that lost the pte race (pte_same() failed) drops the mappings it had
        prepared for the ptes it did not set, and retries."""
        undo = Programs.empty()
        for p in new:
            if p.vpn in raced and p.vpn in mapped and not p.bits & PTEBit.ZERO:
                undo.add(p.lv, *pte_unmap_ops(m, vma, p), ["P", p.idx])
        await undo.execute(self.swap, m)
        raise FaultRace(f"concurrent fault on {len(raced)} pages")


def ptes_by_pmd(ptes: dict[int, Pte]) -> dict[int, list[Pte]]:
    """The ptes of a range grouped by pmd, in address order (one pass, not one per pmd)."""
    out: dict[int, list[Pte]] = defaultdict(list)
    for vpn in sorted(ptes):
        out[vpn // PTRS_PER_PMD].append(ptes[vpn])
    return out


def _pages(slots: dict[int, Slot | None]) -> list[tuple[int, int]]:
    """The pages a fault's lookups found, each once (a file THP fills many slots)."""
    return list(dict.fromkeys(s.ref for s in slots.values() if s is not None))


def add_new_anon_page(progs: Programs, m: Machine, mm: MmState, vma: Vma, vpn: int,
                      slot: int) -> None:
    """do_anonymous_page / wp_page_copy: a new anonymous page (the program's slot-th
    allocation), page_add_new_anon_rmap + lru_cache_add_inactive_or_unevictable."""
    progs.add(mm.lv, ["A", ANON_FLAGS, vma.anon_vma, vma.linear_index(vpn), 0],
              *new_anon_ops(m, vma, -slot))


def anon_ptes(mm: MmState, installs: list[tuple[int, int | None, int]], wp_reuse: list[Pte],
              allocs: list[int] | None, expect: dict[int, Pte],
              ) -> tuple[list[Pte], dict[int, Pte], set[int]]:
    """An anonymous fault's new ptes (allocs None: page -k names the k-th page its program
    allocates), what each must replace, and the vpns that map a new page."""
    new_ptes = [
        Pte(vpn, 0 if slot is None else (allocs[slot - 1] if allocs is not None else -slot),
            0 if slot is None else mm.lv, bits)
        for vpn, slot, bits in installs
    ]
    new_ptes += [Pte(p.vpn, p.idx, p.lv, p.bits | PTEBit.WRITE | PTEBit.DIRTY)
                 for p in wp_reuse]
    expect = {**expect, **{p.vpn: p for p in wp_reuse}}
    return new_ptes, expect, {vpn for vpn, slot, _ in installs if slot is not None}


async def keep_progress(swap: Swap, m: Machine, progs: Programs, stop: ProgramStopped,
                        spans: list[tuple[int, int]]) -> int:
    """How many of a stopped fault's page installs (their op spans, in order) ran.  The one
    the stop split is finished first when its allocation ran: a page cache page read in for
    a COW fault that then found no memory for the copy stays in the page cache unmapped."""
    reached = 0
    for begin, end in spans:
        ran = end <= stop.at or (
            begin < stop.at and await progs.finish(swap, m, stop.at, end, stop.allocated))
        if not ran:
            break
        reached += 1
    return reached


async def split_huge_pmd(store: RedisStore, swap: Swap, m: Machine, mm: MmState | str,
                         vma: Vma, pmd: int) -> bool:
    """__split_huge_pmd_locked (§3.4.3): the THP's pmd mapping becomes 512 pte mappings of its
    subpages, which are never counted; removing the pmd mapping is "effectively
    page_remove_rmap(page, vma, true)", so a VM_LOCKED vma munlocks the THP (an immediate
    flush: a THP head) - not with ``large_folio_mlock`` (Linux 6.5+).  A file THP's pmd just
    goes (FilePmd.zap_pmd): no ptes replace it.
    ``mm``: the address space, or its key (rmap walkers hold no MmState)."""
    mm_key = mm if isinstance(mm, str) else mm.key
    if not vma.is_anon:
        base = pmd * PTRS_PER_PMD
        pte = (await pt_read(store, mm_key, base, base + 1)).get(base)
        if pte is None or not pte.is_pmd:
            await store.fcall("pmd_split", mm_key, pmd, "file")  # a pmd migration entry
            return False
        return await FilePmd(store, swap).zap_pmd(m, vma, mm_key, pte)
    res = await store.fcall("pmd_split", mm_key, pmd)
    if not res:
        return False
    idx, lv = int(res[0]), int(res[1])
    ops: list[Op] = [["m", idx] for _ in range(PTRS_PER_PMD)]
    remove = page_remove_rmap_ops(m, vma, idx)
    if large_folio_rules(m):
        # Linux 6.5+: the mapping moves from the pmd to the ptes without a munlock - the THP
        # stays mlocked until its ptes go or a munlock walk meets them (the host kernel
        # keeps an mlocked THP mlocked through an mprotect of part of it)
        remove = [op for op in remove if op[0] != "K"]
    ops += [*remove, ["P", idx]]
    await Programs([(lv, ops)]).execute(swap, m)
    return True


async def split_huge_pmds_around(store: RedisStore, swap: Swap, m: Machine, mm: MmState,
                                 start: int, end: int) -> None:
    """vma_adjust_trans_huge: a range boundary inside a huge pmd splits that pmd."""
    for vpn in {start, end}:
        if vpn % PTRS_PER_PMD == 0:
            continue
        vma = mm.find(vpn) or mm.find(vpn - 1)
        if vma is not None:
            await split_huge_pmd(store, swap, m, mm, vma, vpn // PTRS_PER_PMD)


async def zap_range(
    store: RedisStore, swap: Swap, m: Machine, mm: MmState, vma: Vma, start: int, end: int
) -> int:
    """zap_pte_range + tlb flush: remove ptes; page_remove_rmap (+ munlock), then the puts."""
    for vpn in {start, end}:  # a zap that cuts through a huge pmd splits it first
        if vpn % PTRS_PER_PMD:
            await split_huge_pmd(store, swap, m, mm, vma, vpn // PTRS_PER_PMD)
    removed = await pt_zap(store, mm.key, start, end)
    # swap entries: zap_pte_range's free_swap_and_cache (mm/swapfile.py)
    swapped = [p.idx for p in removed if p.is_swap]
    removed = [p for p in removed if not p.is_swap]
    rmap = Programs.empty()
    puts = Programs.empty()
    real = sorted((p for p in removed if not p.bits & PTEBit.ZERO), key=lambda p: p.vpn)
    for lv, ops in zap_ops(m, vma, real):  # §3.4.1 (a pmd: compound)
        rmap.add(lv, *ops)
    for p in real:
        puts.add(p.lv, ["P", p.idx])
    await rmap.execute(swap, m)
    await puts.execute(swap, m)
    await free_swap_and_cache(store, swap, m, swapped)
    return len(removed)
