"""File THPs: MADV_COLLAPSE's collapse_file (S32, 12/13), pmd mappings of a file THP, and S17
on a file THP (13/13).

The figures of S32 are the host kernel's: on Linux 6.18, mlock of 512 prefilled shmem pages
in a 2 MiB-aligned shared mapping, then MADV_COLLAPSE, counted
unevictable_pgs_stranded +512 (each small page munlocked while isolated), then mlocked +512
and culled +512 (the new THP pmd-mapped in the caller's VM_LOCKED vma: mlock of a THP head,
flushed at once), and a munlock then munlocked +512, rescued +512.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.filemap import FilePmd
from mmsvc.mm.types import MAP_LOCKED, MAP_SHARED, Advice, FileSpec, MmapArgs
from tests.protocol.test_thp import HINT, HPAGE, THP
from tests.protocol.world import P, World, race_once, sub

COLLAPSE = Advice.MADV_COLLAPSE


async def file_map(w: World, pid: int, name: str, *, prot: int = 3, flags: int = 0,
                   hint: int = HINT, pmds: int = 1, offset: int = 0) -> int:
    """A shared mapping of file "f" (``pmds`` THP-sized ranges from page ``offset``), at an
    aligned address unless told otherwise."""
    addr = await w.kernel.mmap(w.mid, pid, MmapArgs(pmds * HPAGE * P, prot, MAP_SHARED | flags,
                                                    "f", offset * P, addr=hint))
    assert addr == hint
    w.maps[(pid, name)] = (addr, pmds * HPAGE)
    return addr


async def collapse(w: World, pid: int, name: str) -> None:
    await w.kernel.madvise(w.mid, pid, *w.rng(pid, name), COLLAPSE)


async def one_thp(w: World, pid: int, name: str) -> int:
    """The range is one file THP: the pfn of its head."""
    pages = await w.pages(pid, name)
    assert {pg.kind for pg in pages} == {"f"}
    pfns = {pg.pfn for pg in pages}
    assert len(pfns) == 1, f"{len(pfns)} pages, not one THP"
    return pfns.pop()


def test_s32_collapse_of_mlocked_shmem_pages_matches_linux(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", HPAGE, prefill=True)
        p = await w.proc()
        await file_map(w, p, "m")
        await w.mlock(p, "m")
        await w.drain()
        d0 = await w.delta()
        assert sub(d0, mlocked=HPAGE, culled=HPAGE, stranded=0) == {
            "mlocked": HPAGE, "culled": HPAGE, "stranded": 0}
        before = {pg.pfn for pg in await w.pages(p, "m")}
        assert len(before) == HPAGE
        await collapse(w, p, "m")
        d1 = await w.delta()
        # each small page: unmapped from the VM_LOCKED vma while isolated -> stranded; the
        # THP: pmd-mapped in the caller's VM_LOCKED vma -> mlocked and culled whole, at once
        assert {k: d1[k] - d0[k] for k in ("stranded", "mlocked", "culled", "munlocked",
                                          "cleared")} == {
            "stranded": HPAGE, "mlocked": HPAGE, "culled": HPAGE, "munlocked": 0, "cleared": 0}
        assert sub(d1, nr_mlock=HPAGE, nr_unev=HPAGE) == {"nr_mlock": HPAGE, "nr_unev": HPAGE}
        pfn = await one_thp(w, p, "m")
        assert pfn not in before
        head = (await w.pages(p, "m"))[0]
        assert (head.mlocked, head.unevictable, head.mlock_count, head.mapcount) == (
            True, True, 1, 1)
        smaps = await w.kernel.smaps(w.mid, p)
        assert sum(e.locked_kb for e in smaps) == HPAGE * 4
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 0, report.violations
        await w.munlock(p, "m")
        d2 = await w.delta()
        assert {k: d2[k] - d1[k] for k in ("munlocked", "rescued")} == {
            "munlocked": HPAGE, "rescued": HPAGE}
        assert sub(d2, nr_mlock=0, nr_unev=0) == {"nr_mlock": 0, "nr_unev": 0}
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **THP)


def test_s32_other_lockers_refault_the_thp_by_its_pmd_and_count_it(run: Any) -> None:
    """Two VM_LOCKED sharers: the collapse unmaps both (one strand per page: the second
    munlock finds PG_mlocked clear), maps the THP in the caller; the other process's next
    fault maps it by its pmd too - "the new THP, when later pmd-mapped by a fault in the
    VM_LOCKED vma, is mlocked (compound)": mlock_count 2, nothing counted twice."""

    async def s(w: World) -> None:
        await w.file("f", HPAGE, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        await file_map(w, p1, "m")
        await file_map(w, p2, "m")
        await w.mlock(p1, "m")
        await w.mlock(p2, "m")
        await w.drain()
        d0 = await w.delta()
        await collapse(w, p1, "m")
        d1 = await w.delta()
        assert {k: d1[k] - d0[k] for k in ("stranded", "mlocked", "culled")} == {
            "stranded": HPAGE, "mlocked": HPAGE, "culled": HPAGE}
        assert not any(pg.present for pg in await w.pages(p2, "m"))
        await w.touch(p2, "m", 7, 8, write=False)  # one read fault: the whole pmd
        assert all(pg.present for pg in await w.pages(p2, "m"))
        d2 = await w.delta()
        assert {k: d2[k] - d1[k] for k in ("mlocked", "culled")} == {"mlocked": 0, "culled": 0}
        head = (await w.pages(p2, "m"))[0]
        assert (head.mapcount, head.mlock_count) == (2, 2)
        assert await one_thp(w, p2, "m") == await one_thp(w, p1, "m")
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 0, report.violations
        await w.kernel.exit(w.mid, p1)
        await w.kernel.exit(w.mid, p2)
        d3 = await w.delta()
        assert {k: d3[k] - d2[k] for k in ("munlocked", "rescued", "cleared")} == {
            "munlocked": HPAGE, "rescued": HPAGE, "cleared": 0}
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **THP)


def test_unaligned_mappings_map_the_thp_by_uncounted_ptes(run: Any) -> None:
    """A mapping of the THP's range that is not 2 MiB aligned cannot hold its pmd: each
    fault maps one subpage by a pte, never counted (§3.9) - mlock walks skip them."""

    async def s(w: World) -> None:
        await w.file("f", HPAGE, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        await file_map(w, p1, "m")
        await collapse(w, p1, "m")
        await file_map(w, p2, "m", hint=HINT + 4 * HPAGE * P + 16 * P, flags=MAP_LOCKED)
        d = await w.delta()
        assert sub(d, mlocked=0, culled=0) == {"mlocked": 0, "culled": 0}
        pages = await w.pages(p2, "m")
        assert all(pg.present and pg.vma_locked and not pg.mlocked for pg in pages)
        assert pages[0].mapcount == 1  # p1's pmd; p2's ptes are not counted
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 0, report.violations
        await w.kernel.exit(w.mid, p2)
        assert sub(await w.delta(), munlocked=0) == {"munlocked": 0}
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **THP)


async def missed_file_thp_mlock(w: World) -> tuple[int, int]:
    """S17's start on a file THP: a regular file's THP pmd-mapped by two VM_LOCKED vmas
    (mlock_count 2), isolated while one munlocks: munlock_page "assumes that was the last
    mlock" and clears PG_mlocked; putback puts it on inactive_file."""
    await w.kernel.create_file(w.mid, FileSpec("f", HPAGE, True, kind="regular"))
    p1, p2 = await w.proc(), await w.proc()
    await file_map(w, p1, "m", prot=1)  # read-only: a regular file collapses (not written)
    await file_map(w, p2, "m", prot=1)
    await collapse(w, p1, "m")
    await w.touch(p2, "m", 0, 1, write=False)
    await w.mlock(p1, "m")
    await w.mlock(p2, "m")
    await w.drain()
    assert (await w.pages(p2, "m"))[0].mlock_count == 2
    assert await w.kernel.isolate(w.mid, p1, *w.rng(p1, "m")) == 1
    await w.munlock(p1, "m")
    await w.kernel.putback(w.mid, p1, *w.rng(p1, "m"))
    await w.drain()
    head = (await w.pages(p2, "m"))[0]
    assert (head.mlocked, head.lru_list, head.vma_locked, head.mapcount) == (
        False, "inactive_file", True, 2)
    return p1, p2


def test_s17_reclaim_mlocks_a_locked_pmd_mapped_file_thp_whole(run: Any) -> None:
    async def s(w: World) -> None:
        _p1, p2 = await missed_file_thp_mlock(w)
        base = await w.delta()
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        d = await w.delta()
        assert (d["mlocked"] - base["mlocked"], d["culled"] - base["culled"]) == (HPAGE, HPAGE)
        assert (res.scanned, res.reclaimed, res.culled) == (HPAGE, 0, HPAGE)
        await one_thp(w, p2, "m")  # not split
        head = (await w.pages(p2, "m"))[0]
        assert (head.mlocked, head.unevictable, head.lru_list) == (True, True, "unevictable")
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations

    run(s, **THP)


def test_s17_without_13_13_the_file_thp_is_split_and_reclaimed(run: Any) -> None:
    """``reclaim_locked_activate`` off: the verdict is RECLAIM and the file THP is split
    before the mlock is discovered - the split unmaps with TTU_IGNORE_MLOCK - and its clean
    pages are dropped: the waste 13/13 removes.  The VM_LOCKED mapping refaults them."""

    async def s(w: World) -> None:
        _p1, p2 = await missed_file_thp_mlock(w)
        base = await w.delta()
        res = await w.kernel.reclaim(w.mid, None, None, HPAGE)
        d = await w.delta()
        assert (d["mlocked"] - base["mlocked"], d["culled"] - base["culled"]) == (0, 0)
        assert (res.scanned, res.reclaimed) == (HPAGE, HPAGE)
        assert not any(pg.present for pg in await w.pages(p2, "m"))
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        await w.touch(p2, "m", 0, 2, write=False)  # refaulted: small pages, each mlocked
        await w.drain()
        d2 = await w.delta()
        assert (d2["mlocked"] - d["mlocked"], d2["culled"] - d["culled"]) == (2, 2)
        assert (await w.kernel.check(w.mid, True)).ok

    run(s, **THP, reclaim_locked_activate=False)


def test_truncation_and_hole_punch_of_a_file_thp(run: Any) -> None:
    """A hole punched inside a file THP splits it (truncate_inode_partial_folio) and drops
    the punched pages; a truncation that covers a whole THP drops it whole.  Its VM_LOCKED
    pmd mapping munlocks it as it goes."""

    async def s(w: World) -> None:
        await w.file("f", 2 * HPAGE, prefill=True)
        p = await w.proc()
        await file_map(w, p, "m", pmds=2, flags=MAP_LOCKED)
        await collapse(w, p, "m")
        await w.drain()
        d0 = await w.delta()
        assert sub(d0, nr_mlock=2 * HPAGE, nr_unev=2 * HPAGE) == {
            "nr_mlock": 2 * HPAGE, "nr_unev": 2 * HPAGE}
        await w.kernel.punch_hole(w.mid, "f", 8, 8)
        await w.drain()
        pages = await w.pages(p, "m")
        assert [pg.present for pg in pages[:HPAGE]].count(False) == HPAGE  # pmd gone
        files = await w.kernel.file_pages(w.mid, "f")
        assert [pg.present for pg in files[:HPAGE]].count(False) == 8
        assert len({pg.pfn for pg in files[:HPAGE] if pg.present}) == HPAGE - 8  # split
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        await w.kernel.truncate(w.mid, "f", HPAGE)  # the second THP goes whole
        await w.drain()
        files = await w.kernel.file_pages(w.mid, "f")
        assert len(files) == HPAGE
        d1 = await w.delta()
        assert d1["cleared"] - d0["cleared"] == 0
        assert sub(d1, nr_mlock=0) == {"nr_mlock": 0}
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations

    run(s, **THP)


@pytest.mark.parametrize("case", ["thp_off", "legacy", "anon", "unaligned", "writable_regular"])
def test_collapse_errors_change_nothing(run: Any, case: str) -> None:
    async def s(w: World) -> None:
        if case == "writable_regular":
            await w.kernel.create_file(w.mid, FileSpec("f", HPAGE, True, kind="regular"))
        else:
            await w.file("f", 2 * HPAGE, prefill=True)
        p = await w.proc()
        if case == "anon":
            await w.mmap(p, "m", HPAGE)
        elif case == "unaligned":  # the aligned 2 MiB maps file pages 16 .. 527
            await file_map(w, p, "m", offset=16)
        else:
            await file_map(w, p, "m")
        await w.touch(p, "m", write=False)
        await w.drain()
        before = await w.pages(p, "m")
        d0 = await w.delta()
        with pytest.raises(KernelError) as err:
            await collapse(w, p, "m")
        assert err.value.errno == "EINVAL"
        assert await w.pages(p, "m") == before
        assert await w.delta() == d0
        assert (await w.kernel.check(w.mid, True)).ok

    cfg: dict[str, Any] = dict(THP)
    if case == "thp_off":
        cfg["thp"] = False
    if case == "legacy":
        cfg["protocol"] = "legacy"
    run(s, **cfg)


@pytest.mark.parametrize("rival", ["fault", "mlock", "munmap", "reclaim", "collapse"])
def test_collapse_racing_another_cpu_keeps_the_invariants(run: Any, rival: str) -> None:
    """MADV_COLLAPSE on CPU 0 while CPU 1 faults, mlocks, unmaps, reclaims or collapses the
    same range: whichever wins each page, the collapse either completes or fails with EAGAIN
    having put everything back, and after a full drain the checker finds nothing."""

    async def s(w: World) -> None:
        await w.kernel.create_file(w.mid, FileSpec("f", HPAGE, True, kind="regular"))
        p1, p2 = await w.proc(), await w.proc()
        await file_map(w, p1, "m", prot=1, flags=MAP_LOCKED)
        await file_map(w, p2, "m", prot=1)
        await w.touch(p2, "m", 0, 64, write=False)
        other = w.on(1)
        a2, n2 = w.rng(p2, "m")
        rivals = {
            "fault": lambda: other.fault(w.mid, p2, a2, n2, False),
            "mlock": lambda: other.mlock(w.mid, p2, a2, n2),
            "munmap": lambda: other.munmap(w.mid, p2, a2, n2),
            "reclaim": lambda: other.reclaim(w.mid, None, None, 256),
            "collapse": lambda: other.madvise(w.mid, p2, a2, n2, COLLAPSE),
        }
        results = await asyncio.gather(collapse(w, p1, "m"), rivals[rival](),
                                       return_exceptions=True)
        for r in results:
            assert r is None or isinstance(r, (int, KernelError)) or hasattr(r, "scanned"), r
            if isinstance(r, KernelError):
                assert r.errno == "EAGAIN", r
        await w.drain_all()
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        await w.kernel.exit(w.mid, p1)
        await w.kernel.exit(w.mid, p2)
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        assert (await w.delta())["nr_mlock"] == 0

    run(s, **THP)


class CpuDied(BaseException):
    """The collapsing CPU stops dead: no rollback, no unlock (SIGKILL of its worker)."""


@pytest.mark.parametrize("phase", ["_take", "_publish", "_finish"])
def test_a_cpu_dying_mid_collapse_is_repaired_by_recovery(run: Any, monkeypatch: Any,
                                                          phase: str) -> None:
    """The worker collapsing dies after a phase (pages locked, isolated and frozen; the
    THP published; the small pages half freed): the CPU that takes it offline drains its
    batches and reconciles (mm/recovery.py) - page locks, freezes and isolations dropped,
    references recounted, pages nobody holds freed - and the checker is green."""

    async def s(w: World) -> None:
        await w.file("f", HPAGE, prefill=True)
        p = await w.proc()
        await file_map(w, p, "m", flags=MAP_LOCKED)
        await w.drain()
        kh = w.kernel.khugepaged
        real = getattr(kh, phase)

        async def dies_after(*args: Any) -> None:
            await real(*args)
            raise CpuDied

        async def no_rollback(*args: Any) -> None:
            return None

        monkeypatch.setattr(kh, phase, dies_after)
        monkeypatch.setattr(kh, "_rollback", no_rollback)
        with pytest.raises(CpuDied):
            await collapse(w, p, "m")
        survivor = w.on(1)
        await survivor.drain(w.mid, True)  # the dead CPU's batches, drained from CPU 1
        await survivor.recover_dead_cpu(w.mid, 0)
        report = await survivor.check(w.mid, True)
        assert report.ok, report.violations
        await survivor.exit(w.mid, p)
        report = await survivor.check(w.mid, True)
        assert report.ok, report.violations
        assert (await w.delta())["nr_mlock"] == 0

    run(s, **THP)


def test_a_fault_that_finds_a_thp_split_since_its_lookup_retries(run: Any,
                                                                 monkeypatch: Any) -> None:
    """The page cache lookup named a file THP; a hole punched on CPU 1 splits it before the
    fault takes the page (folio_try_get's re-check): the slot's head is a small page now,
    so the fault must not map it as the THP's subpage - it retries and maps the small page
    the slot names now."""

    async def s(w: World) -> None:
        await w.file("f", HPAGE, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        await file_map(w, p1, "m")
        await collapse(w, p1, "m")
        await w.munmap(p1, "m")
        await file_map(w, p2, "m", hint=HINT + 16 * P)  # unaligned: subpage ptes
        race_once(monkeypatch, w.kernel.faults, "_grab",
                  lambda: w.on(1).punch_hole(w.mid, "f", 8, 1), before=True)
        await w.touch(p2, "m", 5, 6, write=False)
        pages = await w.pages(p2, "m")
        files = await w.kernel.file_pages(w.mid, "f")
        assert pages[5].pfn == files[5].pfn != files[0].pfn  # the small page, not the head
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations

    run(s, **THP)


def test_random_pairs_of_operations_around_file_thps_keep_the_invariants(run: Any) -> None:
    """30 rounds of two random operations at once on two CPUs over a file that MADV_COLLAPSE
    keeps turning into THPs (collapse, faults, mlock, munlock, munmap + mmap, reclaim, hole
    punch, migration), with the checker after each round (fixed choices, free
    interleaving): any error but EAGAIN/ENOMEM, or any violation, fails."""
    import random

    async def s(w: World) -> None:
        outcomes: Counter[tuple[str, str]] = Counter()
        rng = random.Random(int(os.environ.get("MMSVC_THP_SEED", "6")))
        await w.kernel.create_file(w.mid, FileSpec("f", 2 * HPAGE, True, kind="tmpfs"))
        p1, p2 = await w.proc(), await w.proc()
        await file_map(w, p1, "m", pmds=2, flags=MAP_LOCKED)
        await file_map(w, p2, "m", pmds=2, hint=HINT + 8 * HPAGE * P)

        def op(cpu: int) -> Any:
            k = w.on(cpu)
            p = rng.choice((p1, p2))
            a, n = w.rng(p, "m")
            lo = rng.randrange(2 * HPAGE)
            part = (a + lo * P, min(rng.choice((1, 16, HPAGE)), 2 * HPAGE - lo) * P)
            choices = {
                "collapse": lambda: k.madvise(w.mid, p, a, n, COLLAPSE),
                "fault": lambda: k.fault(w.mid, p, *part, False),
                "mlock": lambda: k.mlock(w.mid, p, *part),
                "munlock": lambda: k.munlock(w.mid, p, *part),
                "reclaim": lambda: k.reclaim(w.mid, None, None, 600),
                "punch": lambda: k.punch_hole(w.mid, "f", lo, rng.choice((1, 8))),
                "migrate": lambda: k.migrate(w.mid, p, *part, 0),
            }
            name = rng.choice(sorted(choices))
            return name, choices[name]()

        for rnd in range(int(os.environ.get("MMSVC_THP_ROUNDS", "30"))):
            (n1, c1), (n2, c2) = op(0), op(1)
            results = await asyncio.gather(c1, c2, return_exceptions=True)
            for name, r in zip((n1, n2), results, strict=True):
                outcomes[(name, type(r).__name__ if isinstance(r, BaseException) else "ok")] += 1
                if isinstance(r, KernelError):
                    assert r.errno in ("EAGAIN", "ENOMEM"), (rnd, name, r)
                else:
                    assert not isinstance(r, BaseException), (rnd, name, r)
            report = await w.kernel.check(w.mid, True)
            assert report.ok, (rnd, n1, n2, report.violations)
        assert outcomes[("collapse", "ok")] > 0, outcomes  # the test reaches collapse_file
        await w.kernel.exit(w.mid, p1)
        await w.kernel.exit(w.mid, p2)
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        assert (await w.delta())["nr_mlock"] == 0

    run(s, **THP, nodes=2)


def test_a_pte_install_under_a_pmd_mapped_meanwhile_backs_off(run: Any,
                                                              monkeypatch: Any) -> None:
    """Two threads of one process fault the same 2 MiB: CPU 1 finds the pmd empty but cannot
    take the THP for a pmd mapping (here: patched to fail once), and while it goes the pte
    way, CPU 0 maps the THP by its pmd.  CPU 1's ptes must not land under that pmd (it is
    not pmd_none any more: the pte install conflicts); it retries and finds the pmd."""

    async def s(w: World) -> None:
        await w.file("f", HPAGE, prefill=True)
        p1, p = await w.proc(), await w.proc()
        await file_map(w, p1, "m")
        await collapse(w, p1, "m")
        await w.munmap(p1, "m")
        await file_map(w, p, "m", flags=0)
        cpu1 = w.on(1)
        real = FilePmd.map_pmd
        calls: list[int] = []

        async def first_fails(self: FilePmd, *args: Any) -> bool:
            if self.swap is cpu1.swap and not calls:
                calls.append(1)
                await w.kernel.fault(w.mid, p, w.rng(p, "m")[0], P, False)  # CPU 0: the pmd
                return False
            return await real(self, *args)

        monkeypatch.setattr(FilePmd, "map_pmd", first_fails)
        await cpu1.fault(w.mid, p, w.rng(p, "m")[0] + 5 * P, P, False)
        assert calls
        pages = await w.pages(p, "m")
        assert all(pg.present for pg in pages) and pages[0].mapcount == 1
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations

    run(s, **THP, fault_around_pages=1)  # (fault-around would re-read the pmd first)
