"""Regression traces of what the stateful tests found (docs/concurrency.md, known_bugs.py).

Each test replays the op sequence of one finding against a real 2-worker server.  Where the
finding is a race, the racing calls are issued together on two CPUs and the attempt is repeated
until the race is observed (its outcome shows it: an EAGAIN, a cull...), checking after every
attempt; a test whose race never happened is skipped rather than passed, so that a strict xfail
cannot XPASS by luck.  Emulator bugs are ``xfail(strict=True)`` with the diagnosis: when one
is fixed its test XPASSes, which fails the run - remove the marker (and the known_bugs.py entry).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_LOCKED,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MCL_CURRENT,
    Advice,
    FileSpec,
    MachineConfig,
    MmapArgs,
)
from mmsvc_client import AsyncMmsvcClient, MmsvcError

from .cluster import Driver
from .invariants import snapshot, view_violations
from .ops import Mapping, Proc, World

P = 4096


@asynccontextmanager
async def machine(k: AsyncMmsvcClient, **cfg: object) -> AsyncIterator[str]:
    conf: dict[str, object] = {"frames_per_node": 2048, **cfg}
    mid = await k.create_machine(MachineConfig(**conf))  # type: ignore[arg-type]
    try:
        yield mid
    finally:
        await k.delete_machine(mid)


async def violations(k: AsyncMmsvcClient, mid: str, drain_all: bool) -> list[str]:
    return (await k.check(mid, drain_all)).violations


# ------------------------------------------------------------------ bug: cow-fault-race ------

# Found: cow-fault-race: Faults._claim marks the ptes a COW replaces busy with the SAME marker
# whichever fault claims, and a claim that lost a race "put back" all its ptes - also the one
# the OTHER fault had claimed - so that fault's old page stayed mapped once more than counted
# (A6, later a mapcount underflow).  Fixed in fc18aa6 (a lost claim puts back only its own
# ptes); since faults retry a lost race, both faults now complete: the test stresses the race.
def test_cow_fault_race_keeps_old_page_accounting(driver2: Driver) -> None:
    """Parent writes 16 pages and forks; the child write-faults all 16 on cpu1 (claim, a long
    program, install) while it write-faults the last one on cpu0 a little later (same process,
    two CPUs: two threads).  The original pages' mapcounts must still equal their ptes (A6)
    after every attempt, and both faults succeed (a lost race is retried)."""

    async def scenario() -> None:
        k0, k1 = driver2.on(0), driver2.on(1)
        async with machine(k0, frames_per_node=16384) as mid:
            for attempt in range(60):
                parent = await k0.create_process(mid)
                a = await k0.mmap(mid, parent, MmapArgs(16 * P))
                await k0.fault(mid, parent, a, 16 * P, True)
                child = await k0.fork(mid, parent)

                async def last_page_later(delay: float, child: int = child, a: int = a) -> int:
                    await asyncio.sleep(delay)
                    return await k0.fault(mid, child, a + 15 * P, P, True)

                res = await asyncio.gather(k1.fault(mid, child, a, 16 * P, True),
                                           last_page_later(0.0005 * (attempt % 10)),
                                           return_exceptions=True)
                assert not any(isinstance(r, BaseException) for r in res), res
                v = await violations(k0, mid, False)
                assert v == [], f"attempt {attempt}: {res}: {v}"
                await k0.exit(mid, child)
                await k0.exit(mid, parent)
            assert await violations(k0, mid, True) == []

    driver2.run(scenario())


# Found: file-cow-race (after the page-lock work made the window wider): a COW of a file page
# in a private mapping (do_cow_fault / wp_page_copy from _file_map) did not claim the pte as
# _anon does, so two racing write faults both removed the file page's mapping and only one
# installed: the page was mapped by one pte more than its mapcount said (A6).  Fixed: _file_map
# claims COW ptes like _anon.
def test_file_cow_race_keeps_file_page_accounting(driver2: Driver) -> None:
    """A private writable mapping of a prefilled file, read-faulted; then two write faults of
    the whole range at once on two CPUs (two threads), 20 times: A6 after each attempt."""

    async def scenario() -> None:
        k0, k1 = driver2.on(0), driver2.on(1)
        async with machine(k0) as mid:
            await k0.create_file(mid, FileSpec("reg", 16, prefill=True, kind="regular"))
            for attempt in range(20):
                pid = await k0.create_process(mid)
                a = await k0.mmap(mid, pid, MmapArgs(16 * P, flags=MAP_PRIVATE, file="reg"))
                await k0.fault(mid, pid, a, 16 * P, False)
                res = await asyncio.gather(k0.fault(mid, pid, a, 16 * P, True),
                                           k1.fault(mid, pid, a, 16 * P, True),
                                           return_exceptions=True)
                assert not any(isinstance(r, BaseException) for r in res), res
                v = await violations(k0, mid, False)
                assert v == [], f"attempt {attempt}: {res}: {v}"
                await k0.exit(mid, pid)
            assert await violations(k0, mid, True) == []

    driver2.run(scenario())


# ------------------------------------------------------- bug: reclaim-restore-double-mlock ---

# Found: reclaim-restore-double-mlock: shrink_folio_list read the isolated pages' records once
# and held no page lock from that evictability check to its rmap walk, and file faults took no
# page lock, so a MAP_LOCKED populate could map+mlock an isolated page in between: the fault's
# mlock_page and reclaim's "restore the mlock which got missed" (§5.2) both counted the one
# mapping (Q3 overcount).  Fixed: PG_locked - reclaim trylocks each page before looking at it,
# filemap faults lock the page from the cache lookup until it is mapped and mlocked.
def test_reclaim_vs_locked_fault_overcounts(driver2: Driver) -> None:
    """A prefilled regular file on the inactive list; reclaim (cpu1) isolates it while a
    MAP_SHARED|MAP_LOCKED mapping of 4 of its pages is populated (cpu0); then cpu1 drains
    (putback, then reclaim's entry) before cpu0 (the fault's entry)."""

    async def scenario() -> int:
        k0, k1 = driver2.on(0), driver2.on(1)
        met = 0
        for _attempt in range(30):
            async with machine(k0, mlock_batch_len=31) as mid:
                await k0.create_file(mid, FileSpec("reg", 32, prefill=True, kind="regular"))
                pid = await k0.create_process(mid)
                rec, _addr = await asyncio.gather(
                    k1.reclaim(mid, None, None, 32),
                    k0.mmap(mid, pid, MmapArgs(4 * P, flags=MAP_SHARED | MAP_LOCKED,
                                               file="reg", offset=4 * P)))
                met += rec.scanned - rec.reclaimed  # kept or culled: it met the mapping
                await k1.drain(mid, True)
                v = await violations(k0, mid, True)
                assert v == [], f"reclaim {rec}: {v}"
        return met

    if driver2.run(scenario()) == 0:
        pytest.skip("reclaim never met the locked mapping in 30 attempts")


# --------------------------------------------------------- bug: mlock-split-loses-i_mmap ----

# Found: mlock-split-loses-i_mmap: Mlock._split (mlock_fixup) replaces a file vma by pieces
# without updating the file's i_mmap tree (Mmap.split_at calls _i_mmap_update); the first piece
# keeps the old vma id, so munmap of it deletes the process' only i_mmap entry 'pid|id' while the
# other piece still maps the file; rmap._candidate_pids then never visits the process, reclaim's
# try_to_unmap finds no pte, and vmscan removes the still mapped pages from the page cache and
# drops them from the LRU (it does not re-check page_mapped after try_to_unmap, as Linux does)
# Fixed in bfe46fb (i_mmap keeps the processes mapping a file); kept as a regression test.
def test_mlock_split_then_munmap_hides_mapping_from_reclaim(driver2: Driver) -> None:
    """Sequential (one CPU): map 8 pages of a regular file shared, fault them, mlock the last
    4 (split), munmap the first 4, munlock the rest, reclaim: the 4 mapped pages must stay in
    the page cache and on the LRU."""

    async def scenario() -> list[str]:
        k = driver2.on(0)
        async with machine(k) as mid:
            await k.create_file(mid, FileSpec("reg", 8, kind="regular"))
            pid = await k.create_process(mid)
            a = await k.mmap(mid, pid, MmapArgs(8 * P, flags=MAP_SHARED, file="reg"))
            await k.fault(mid, pid, a, 8 * P, False)
            await k.mlock(mid, pid, a + 4 * P, 4 * P)
            await k.munmap(mid, pid, a, 4 * P)
            await k.munlock(mid, pid, a + 4 * P, 4 * P)
            await k.drain(mid, True)
            await k.reclaim(mid, None, None, 32)
            world = World(mid, 1, ("root",), [Proc(pid, 0, [
                Mapping("b", a + 4 * P, 4, "reg", 4, True)])])
            return (await violations(k, mid, True)) + view_violations(
                await snapshot(k, world), world)

    assert driver2.run(scenario()) == []


# ------------------------------------------------------- bug: migrate-unreferenced-pages ----

# Found: migrate-unreferenced-pages: Kernel.migrate collects (lv, idx) of the range from pt_read
# under mmap_lock(read) and isolates each page later (Migrate.migrate_page op 'I') without having
# taken a reference (Linux add_page_for_migration: follow_page(FOLL_GET) under the PTL, then
# isolate, then put); MADV_DONTNEED on another CPU also holds only mmap_lock(read) and frees the
# pages in between, and mm_pages fails on the free struct page ('page N of {m..:lv0} is free'):
# INTERNAL - or, if the frame was reused meanwhile, migrates an unrelated page. madvise
# COLD/PAGEOUT (Madvise._each_page/_pageout) have the same gap
# Fixed in bfe46fb/4ae2e0e (migration re-checks ptes; isolation by address tolerates freed
# pages); kept as a regression test.
def test_migrate_racing_dontneed_hits_freed_page(driver2: Driver) -> None:
    """Write 4 anon pages, then migrate them to node 1 on cpu1 while MADV_DONTNEED zaps them on
    cpu0 (the second process keeps the machine's other state irrelevant)."""

    async def scenario() -> None:
        k0, k1 = driver2.on(0), driver2.on(1)
        async with machine(k0, nodes=2) as mid:
            pid = await k0.create_process(mid)
            for _attempt in range(30):
                a = await k0.mmap(mid, pid, MmapArgs(4 * P))
                await k0.fault(mid, pid, a, 4 * P, True)
                res = await asyncio.gather(
                    k1.migrate(mid, pid, a, 4 * P, 1),
                    k0.madvise(mid, pid, a, 4 * P, Advice.MADV_DONTNEED),
                    return_exceptions=True)
                faults = [r for r in res if isinstance(r, MmsvcError)
                          and r.errno in (None, "INTERNAL")]
                assert faults == [], f"server fault: {faults}"
                assert await violations(k0, mid, True) == []

    driver2.run(scenario())


# -------------------------------------------------------- bug: anon-index-truncated ---------

# Found: anon-index-truncated: an anonymous page's index is its vpn (mmap.py: anonymous pgoff =
# start, linear_index = vpn), ~0x7eff_ffff_f for mmap's top-down area, but the struct page record
# stores index as a u32 (page.py RECORD '<IiiiiIII'); rmap._covers compares the truncated
# page.index with vma.pgoff and never matches, so rmap walks of anonymous pages find no mapping:
# every migration of an anon page fails (refcount never freezes, EAGAIN), and reclaim could never
# unmap a lazyfree (MADV_FREE) page
# Fixed in bfe46fb (64-bit record index); kept as a regression test.
def test_anon_pages_migrate(driver2: Driver) -> None:
    """Sequential: 4 written private anon pages migrate to node 1."""

    async def scenario() -> tuple[int, int, list[int]]:
        k = driver2.on(0)
        async with machine(k, nodes=2) as mid:
            pid = await k.create_process(mid)
            a = await k.mmap(mid, pid, MmapArgs(4 * P))
            await k.fault(mid, pid, a, 4 * P, True)
            res = await k.migrate(mid, pid, a, 4 * P, 1)
            nodes = [p.node for p in await k.page_flags(mid, pid, a, 4 * P)]
            assert await violations(k, mid, True) == []
            return res.migrated, res.failed, nodes

    assert driver2.run(scenario()) == (4, 0, [1, 1, 1, 1])


# -------------------------------------------------- bug: mlock-populate-hole-eagain ---------

# Found: mlock-populate-hole-eagain: Kernel.mlock drops mmap_lock(write) after do_mlock and takes
# it for read to populate (as Linux does), so a munmap queued on the lock runs in between;
# Mlock.populate(ignore_errors=False) then raises ENOMEM at the hole and mlock maps it to EAGAIN.
# Linux's __mm_populate skips holes (find_vma_intersection; break/continue, ret stays 0): mlock
# returns 0 with the remaining range locked and populated
# Fixed in bfe46fb (populate skips holes); kept as a regression test.
def test_mlock_racing_munmap_reports_no_eagain(driver2: Driver) -> None:
    """mlock of 4 pages on cpu0 while cpu1 unmaps the third one.  Allowed: 0 (munmap after
    mlock or between its two phases) or ENOMEM (munmap first); never EAGAIN."""

    async def scenario() -> None:
        k0, k1 = driver2.on(0), driver2.on(1)
        async with machine(k0) as mid:
            pid = await k0.create_process(mid)
            for _attempt in range(20):
                a = await k0.mmap(mid, pid, MmapArgs(4 * P))
                res, _ = await asyncio.gather(k0.mlock(mid, pid, a, 4 * P),
                                              k1.munmap(mid, pid, a + 2 * P, P),
                                              return_exceptions=True)
                assert not isinstance(res, BaseException) or (
                    isinstance(res, MmsvcError) and res.errno == "ENOMEM"), f"mlock: {res!r}"
            assert await violations(k0, mid, True) == []

    driver2.run(scenario())


# ---------------------------------------------------- bug: lazyfree-reclaim-frees-mapped-page

# Found: lazyfree-reclaim-frees-mapped-page: MADV_FREE moves an exclusive anon page to the
# inactive file list (op 'Z' clears PG_swapbacked); Vmscan._shrink_one then finds no mapping (the
# anon rmap never matches, see test_anon_pages_migrate), skips the unmap and calls
# _remove_from_cache, which HDELs an index of a *file* keyed by the anon_vma id and puts twice
# (isolation + a page cache reference an anon page never had): the page is freed while its pte
# still maps it. Linux: try_to_unmap clears the pte of a clean lazyfree page (MADV_FREE discard),
# and __remove_mapping is for page cache pages only. The server checker does not see it: it only
# inspects in-use pages, and the stale pte points to a free one (the views show mapcount 0 /
# refcount 0 / off the LRU)
# Fixed in bfe46fb (lazyfree discard); kept as a regression test.
def test_lazyfree_page_reclaimed_while_mapped(driver2: Driver) -> None:
    """Sequential: write 4 anon pages, drain (onto the anon LRU), MADV_FREE them (to the file
    LRU), reclaim."""

    async def scenario() -> list[str]:
        k = driver2.on(0)
        async with machine(k) as mid:
            pid = await k.create_process(mid)
            a = await k.mmap(mid, pid, MmapArgs(4 * P))
            await k.fault(mid, pid, a, 4 * P, True)
            await k.drain(mid, True)
            await k.madvise(mid, pid, a, 4 * P, Advice.MADV_FREE)
            await k.reclaim(mid, None, None, 32)
            world = World(mid, 1, ("root",), [Proc(pid, 0, [Mapping("a", a, 4, "", 0, False)])])
            return (await violations(k, mid, True)) + view_violations(
                await snapshot(k, world), world)

    assert driver2.run(scenario()) == []


# ------------------------------------------------------------ bug: unmap-ignores-pte-race ---

# Found: unmap-ignores-pte-race: Vmscan._try_to_unmap installs an empty pte with
# pt_install(expect=the pte its rmap walk read) and ignores the conflict it returns, then runs
# page_remove_rmap + put for that mapping anyway; an exit on another CPU zapped the pte (and did
# U/P itself) in between: 'mmsvc: mapcount underflow' in mm_pages -> INTERNAL, and the pages
# reclaim had isolated stay isolated (A6). Migrate._unmap has the same pattern. Linux:
# try_to_unmap_one's page_vma_mapped_walk re-checks under the PTL that the pte still maps the page
# Fixed in bfe46fb (unmap re-checks ptes); kept as a regression test.
def test_reclaim_racing_exit_double_unmaps(driver2: Driver) -> None:
    """A process maps 32 pages of a prefilled regular file (read faults, drained); reclaim on
    cpu1 walks them while the process exits on cpu0 after a delay swept over the attempts, so
    that the exit's zap lands inside reclaim's walk."""

    async def scenario() -> None:
        k0, k1 = driver2.on(0), driver2.on(1)
        for attempt in range(31):
            async with machine(k0) as mid:
                await k0.create_file(mid, FileSpec("reg", 32, prefill=True, kind="regular"))
                pid = await k0.create_process(mid)
                a = await k0.mmap(mid, pid, MmapArgs(32 * P, flags=MAP_SHARED, file="reg"))
                await k0.fault(mid, pid, a, 32 * P, False)
                await k0.drain(mid, True)

                async def exit_later(delay: float, pid: int = pid, mid: str = mid) -> None:
                    await asyncio.sleep(delay)
                    await k0.exit(mid, pid)

                res = await asyncio.gather(k1.reclaim(mid, None, None, 32),
                                           exit_later(0.003 * attempt), return_exceptions=True)
                faults = [r for r in res if isinstance(r, MmsvcError)]
                assert faults == [], f"attempt {attempt}: {faults}"
                assert await violations(k0, mid, True) == []

    driver2.run(scenario())


# ---------------------------------------------------------- bug: putback-steals-isolation ---

# Found: putback-steals-isolation: Kernel.putback puts back every page of the range that has
# PG_ISOLATED, whoever isolated it; a Putback racing reclaim on another CPU takes reclaim's
# isolated pages (lru_cache_add entry + put of reclaim's isolation reference) and reclaim then
# frees them from the page cache: 'page N of {m..:lv0} is free' INTERNAL in Putback, and the
# lru_add entry left for a freed page makes every later drain/Check INTERNAL. Linux isolators put
# back only the pages they isolated (by page, on their private list); the API needs Isolate to
# hand out what it isolated and Putback to take exactly that
# Fixed in 4ae2e0e (Putback only returns what Isolate took); kept as a regression test.
def test_putback_racing_reclaim_steals_its_isolation(driver2: Driver) -> None:
    """A process maps 32 pages of a prefilled regular file; reclaim (cpu1) isolates them
    while a Putback of the range (cpu0, a delay swept over the attempts) runs."""

    async def scenario() -> None:
        k0, k1 = driver2.on(0), driver2.on(1)
        for attempt in range(20):
            async with machine(k0) as mid:
                await k0.create_file(mid, FileSpec("reg", 32, prefill=True, kind="regular"))
                pid = await k0.create_process(mid)
                a = await k0.mmap(mid, pid, MmapArgs(32 * P, flags=MAP_SHARED, file="reg"))
                await k0.fault(mid, pid, a, 32 * P, False)
                await k0.drain(mid, True)

                async def putback_later(delay: float, pid: int = pid, mid: str = mid,
                                        a: int = a) -> int:
                    await asyncio.sleep(delay)
                    return await k0.putback(mid, pid, a, 32 * P)

                res = await asyncio.gather(k1.reclaim(mid, None, None, 32),
                                           putback_later(0.002 * attempt),
                                           return_exceptions=True)
                faults = [r for r in res if isinstance(r, MmsvcError)]
                assert faults == [], f"attempt {attempt}: {res}"
                try:
                    v = await violations(k0, mid, True)
                except MmsvcError as e:
                    v = [f"Check: {e}"]
                assert v == [], f"attempt {attempt}: {res}"

    driver2.run(scenario())


# ------------------------------------------------------ checker: A6 ignores isolators -------

# Found: checker-a6-isolation: check_machine's A6 expects refcount == ptes + page cache + batch
# entries and has no term for isolation (spec §8.5 A6 lists isolators), so a page held by an
# Isolate (or by reclaim/migration in flight) is reported as 'A6 refcount N+1 != N'; it should
# count one reference per PG_ISOLATED page (and, in a quiescent check, report a page still
# isolated as such rather than as a refcount error)
# Fixed in 4ae2e0e (the checker counts isolators' references); kept as a regression test.
def test_checker_counts_isolation_reference(driver2: Driver) -> None:
    """Sequential: 2 written anon pages, drained, isolated: Check(drain_all=False) must pass
    (the 'always' invariants hold while a page is isolated)."""

    async def scenario() -> list[str]:
        k = driver2.on(0)
        async with machine(k) as mid:
            pid = await k.create_process(mid)
            a = await k.mmap(mid, pid, MmapArgs(2 * P))
            await k.fault(mid, pid, a, 2 * P, True)
            await k.drain(mid, True)
            assert await k.isolate(mid, pid, a, 2 * P) == 2
            v = await violations(k, mid, False)
            await k.putback(mid, pid, a, 2 * P)
            return v

    assert driver2.run(scenario()) == []


# ------------------------------------------------------ bug: reclaim-vs-fault-pagecache -----

# Found: reclaim-vs-fault-pagecache: a file fault's page cache lookup took no reference and
# reclaim's _remove_from_cache had no refcount freeze (Linux __remove_mapping:
# folio_ref_freeze(2) fails when someone else holds a reference), so a read fault racing
# reclaim mapped a page that reclaim then dropped from the page cache and the LRU, or freed
# ('page N is free' INTERNAL).  Fixed: the lookup's folio_try_get (page op T: fails on a freed,
# frozen or reused page; the fault retries) and folio_ref_freeze (op R) in reclaim and
# migration.
def test_reclaim_racing_read_fault_uncaches_mapped_page(driver2: Driver) -> None:
    """A prefilled regular file on the inactive list, mapped shared but not faulted; reclaim
    (cpu1) scans it while the process read-faults the whole range (cpu0, a delay swept over
    the attempts).  Afterwards every mapped page must be the page cache's and on the LRU."""

    async def scenario() -> None:
        k0, k1 = driver2.on(0), driver2.on(1)
        for attempt in range(30):
            async with machine(k0, fault_around_pages=1) as mid:
                await k0.create_file(mid, FileSpec("reg", 32, prefill=True, kind="regular"))
                pid = await k0.create_process(mid)
                a = await k0.mmap(mid, pid, MmapArgs(32 * P, flags=MAP_SHARED, file="reg"))

                async def fault_later(delay: float, pid: int = pid, mid: str = mid,
                                      a: int = a) -> int:
                    await asyncio.sleep(delay)
                    return await k0.fault(mid, pid, a, 32 * P, False)

                res = await asyncio.gather(k1.reclaim(mid, None, None, 32),
                                           fault_later(0.001 * attempt), return_exceptions=True)
                assert not any(isinstance(r, MmsvcError) for r in res), f"attempt {attempt}: {res}"
                world = World(mid, 1, ("root",),
                              [Proc(pid, 0, [Mapping("a", a, 32, "reg", 0, True)])])
                v = await violations(k0, mid, True)
                v += view_violations(await snapshot(k0, world), world)
                assert v == [], f"attempt {attempt}: {res}"

    driver2.run(scenario())


# ---------------------------------------------------------- bug: populate-race-eagain -------

def test_populate_racing_fault_does_not_fail_the_syscall(driver2: Driver) -> None:
    """mmap(MAP_POPULATE) of 16 pages at a hint on cpu0 while cpu1 write-faults the range as
    soon as it exists; then mlockall(MCL_CURRENT) on cpu0 while cpu1 write-faults a fresh
    16-page mapping.  Neither syscall may fail.  (Fixed bug populate-race-eagain: a fault
    that loses a pte race is now retried inside Faults.fault_range, as the CPU re-executes
    the access and GUP retries the page.)"""

    async def scenario() -> None:
        k0, k1 = driver2.on(0), driver2.on(1)
        async with machine(k0, frames_per_node=16384) as mid:
            for attempt in range(40):
                pid = await k0.create_process(mid)
                hint = 0x7E0000000000 + attempt * 0x100000

                async def fault_when_mapped(pid: int = pid, hint: int = hint) -> object:
                    for _ in range(200):
                        try:
                            return await k1.fault(mid, pid, hint, 16 * P, True)
                        except MmsvcError as e:
                            if e.errno != "EFAULT":
                                return e
                    return None

                flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE
                res, _ = await asyncio.gather(
                    k0.mmap(mid, pid, MmapArgs(16 * P, flags=flags, addr=hint)),
                    fault_when_mapped(), return_exceptions=True)
                left = len(await k0.smaps(mid, pid))
                assert not isinstance(res, BaseException), (
                    f"attempt {attempt}: mmap(MAP_POPULATE): {res!r}, vmas left: {left}")

                a = await k0.mmap(mid, pid, MmapArgs(16 * P))
                res2, _ = await asyncio.gather(k0.mlockall(mid, pid, MCL_CURRENT),
                                               k1.fault(mid, pid, a, 16 * P, True),
                                               return_exceptions=True)
                assert not isinstance(res2, BaseException), (
                    f"attempt {attempt}: mlockall(MCL_CURRENT): {res2!r}")
                await k0.exit(mid, pid)
            assert await violations(k0, mid, True) == []

    driver2.run(scenario())


# ------------------------------------------ spec: cross-CPU batch residue overcounts (Q3) ---

# Spec-level finding cross-cpu-residue: a fault in a VM_LOCKED vma on cpu1 (MAP_LOCKED's
# populate, seed profile: no drain) sets PG_mlocked and leaves an LRU_PAGE entry in cpu1's mlock
# batch (§2.2.1).  munlock on cpu0 drains only cpu0 (§3.6): the page is on an evictable list,
# __munlock_page clears PG_mlocked; mlock on cpu0 culls it with mlock_count = !!PG_mlocked = 1
# (§2.4.5); cpu1's stale entry, processed later, raises it to 2 while M(p) = 1.  Linux 5.18+
# does the same (mlock_folio always queues, munlock drains the local CPU): this is the "new way
# of stranding" of §8.3 row 12.  Decision: emulate it faithfully; the munlock tags the entries
# it leaves behind, a count they raise marks the page, and the checker reports it as the
# derived known exception X4 instead of a Q3/Q4 violation (docs/concurrency.md).
def test_cross_cpu_residue_overcounts(driver2: Driver) -> None:
    """Sequential, two CPUs: mmap(MAP_SHARED|MAP_LOCKED) of a prefilled file page on cpu1
    (entry left in cpu1's batch), munlock then mlock it on cpu0, drain every CPU: Q3."""

    async def scenario() -> tuple[int, list[str], dict[str, int], list[str], int]:
        k0, k1 = driver2.on(0), driver2.on(1)
        async with machine(k0, mlock_batch_len=15) as mid:
            await k0.create_file(mid, FileSpec("reg", 4, prefill=True, kind="regular"))
            pid = await k0.create_process(mid)
            a = await k1.mmap(mid, pid, MmapArgs(P, flags=MAP_SHARED | MAP_LOCKED, file="reg"))
            await k0.munlock(mid, pid, a, P)
            await k0.mlock(mid, pid, a, P)
            await k0.drain(mid, True)
            count = (await k0.page_flags(mid, pid, a, P))[0].mlock_count
            rep = await k0.check(mid, True)
            # munlock then leaves the page cache page mlocked and unevictable with no locked
            # mapping, and so does the exit (§8.4's "thing that must never happen", which
            # Linux shares here): still X4, never a violation
            await k0.munlock(mid, pid, a, P)
            await k0.exit(mid, pid)
            after = await k0.check(mid, True)
            return (count, rep.violations, rep.known_exceptions.get("X4", 0),
                    after.violations, after.known_exceptions.get("X4", 0))

    assert driver2.run(scenario()) == (2, [], 1, [], 1)
