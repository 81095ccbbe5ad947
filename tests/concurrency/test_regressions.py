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

@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "cow-fault-race (as of 4ae2e0e): Faults._claim marks the ptes a COW replaces busy with "
    "Pte(vpn, old idx, old lv, MIGRATION) - the SAME marker whichever fault claims - and when "
    "pt_install reports that some pte was already claimed, it 'puts back the ones we did "
    "claim' with pt_install(all cow ptes, expect=busy markers): for the pte the OTHER fault "
    "claimed the marker matches, so the original pte is restored under that fault.  The other "
    "fault has already run the old page's page_remove_rmap + put (they are in the program run "
    "before _install); its install then finds the original pte, undoes only its new page and "
    "raises EAGAIN: the old page is mapped by one pte more than its mapcount/refcount say "
    "(A6; a later unmap underflows).  Both faults answer EAGAIN.  Fix: put back only the ptes "
    "this fault claimed (those not in pt_install's conflicts), or make the marker unique.  "
    "(Before bfe46fb: the old page's rmap removal was skipped (5a20858) or not undone "
    "(d285c0e) when the install raced)"))
def test_cow_fault_race_keeps_old_page_accounting(driver2: Driver) -> None:
    """Parent writes 16 pages and forks; the child write-faults all 16 on cpu1 (claim, a long
    program, install) while it write-faults the last one on cpu0 a little later (same process,
    two CPUs: two threads).  The race that shows the bug ends with both faults backing off
    (one at its claim, one at its install); the original pages' mapcounts must still equal
    their ptes (A6)."""

    async def scenario() -> int:
        k0, k1 = driver2.on(0), driver2.on(1)
        both_backed_off = 0
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
                assert not any(isinstance(r, MmsvcError) and r.errno != "EAGAIN" for r in res)
                v = await violations(k0, mid, False)
                assert v == [], f"attempt {attempt}: {res}: {v}"
                both_backed_off += all(isinstance(r, MmsvcError) for r in res)
                await k0.exit(mid, child)
                await k0.exit(mid, parent)
        return both_backed_off

    if driver2.run(scenario()) == 0:
        pytest.skip("the two faults never both backed off in 60 attempts")


# ------------------------------------------------------- bug: reclaim-restore-double-mlock ---

@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "reclaim-restore-double-mlock: Vmscan.shrink_folio_list reads the isolated pages' records "
    "once before its loop and _shrink_one holds no page lock from that evictability check to "
    "its rmap walk, and file faults take no page lock (Linux: shrink_folio_list holds the folio "
    "lock; filemap_fault locks the page, filemap_map_pages trylocks), so a MAP_LOCKED populate "
    "can map+mlock an isolated page in between: the fault's mlock_page (PG_mlocked, LRU_PAGE "
    "entry on cpu0) and reclaim's 'restore the mlock which got missed' (spec §5.2; a second "
    "LRU_PAGE entry on cpu1) both count the one mapping once the putback has put the page on "
    "the unevictable LRU with mlock_count 0: mlock_count 2 > M(p) = 1, the overcount of Q3 "
    "(spec §8.4; §5.4 assumes reclaim's entry is the only one)"))
def test_reclaim_vs_locked_fault_overcounts(driver2: Driver) -> None:
    """A prefilled regular file on the inactive list; reclaim (cpu1) isolates it while a
    MAP_SHARED|MAP_LOCKED mapping of 4 of its pages is populated (cpu0); then cpu1 drains
    (putback, then reclaim's entry) before cpu0 (the fault's entry)."""

    async def scenario() -> int:
        k0, k1 = driver2.on(0), driver2.on(1)
        culled = 0
        for _attempt in range(30):
            async with machine(k0, mlock_batch_len=31) as mid:
                await k0.create_file(mid, FileSpec("reg", 32, prefill=True, kind="regular"))
                pid = await k0.create_process(mid)
                rec, _addr = await asyncio.gather(
                    k1.reclaim(mid, None, None, 32),
                    k0.mmap(mid, pid, MmapArgs(4 * P, flags=MAP_SHARED | MAP_LOCKED,
                                               file="reg", offset=4 * P)))
                culled += rec.culled
                await k1.drain(mid, True)
                v = await violations(k0, mid, True)
                assert v == [], f"reclaim {rec}: {v}"
        return culled

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

@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "reclaim-vs-fault-pagecache: a file fault looks the page up in the page cache (pc_lookup "
    "returns lv|idx) without taking a reference or the page lock, and Vmscan._remove_from_cache "
    "takes the page out of the cache and drops its references without Linux's refcount freeze "
    "(__remove_mapping: page_ref_freeze(2) fails when someone else holds a reference, and the "
    "page is kept): a read fault racing reclaim maps a page that reclaim, having found no "
    "mapping a moment earlier, then drops from the page cache and the LRU - or frees, and the "
    "fault's map op then hits a free struct page ('page N is free' INTERNAL in Fault/Mlock)"))
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

@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "cross-cpu-residue (spec-level, the emulator follows the spec): a fault in a VM_LOCKED "
    "vma on cpu1 (here MAP_LOCKED's populate, seed profile: no drain) sets PG_mlocked and "
    "leaves an LRU_PAGE entry in cpu1's mlock batch (§2.2.1).  munlock on cpu0 queues the "
    "munlock entry and drains only cpu0 (§3.6 lru_add_drain): the page is on an evictable "
    "list, so __munlock_page clears PG_mlocked; mlock on cpu0 then culls it with "
    "mlock_count = !!PG_mlocked = 1 (§2.4.5); when cpu1's stale entry is finally processed "
    "(any drain of cpu1) the page is on the unevictable LRU with PG_mlocked and §2.4.4 "
    "increments to 2 while M(p) = 1: Q3 overcount (§8.4: after the munlock it stays mlocked "
    "with no locked mapping).  §8.2's lru-add-initialises-0 argument covers one pending entry "
    "on the local CPU, not residue on another (§8.3 rows 11-12 leave 'other corners' open).  "
    "Linux 5.18+ appears to behave the same (mlock_folio always queues, munlock drains the "
    "local CPU).  Decide: an X-class exception in Q3, or munlock draining the other CPUs"))
def test_cross_cpu_residue_overcounts(driver2: Driver) -> None:
    """Sequential, two CPUs: mmap(MAP_SHARED|MAP_LOCKED) of a prefilled file page on cpu1
    (entry left in cpu1's batch), munlock then mlock it on cpu0, drain every CPU: Q3."""

    async def scenario() -> tuple[int, list[str]]:
        k0, k1 = driver2.on(0), driver2.on(1)
        async with machine(k0, mlock_batch_len=15) as mid:
            await k0.create_file(mid, FileSpec("reg", 4, prefill=True, kind="regular"))
            pid = await k0.create_process(mid)
            a = await k1.mmap(mid, pid, MmapArgs(P, flags=MAP_SHARED | MAP_LOCKED, file="reg"))
            await k0.munlock(mid, pid, a, P)
            await k0.mlock(mid, pid, a, P)
            await k0.drain(mid, True)
            count = (await k0.page_flags(mid, pid, a, P))[0].mlock_count
            return count, await violations(k0, mid, True)

    assert driver2.run(scenario()) == (1, [])
