"""The pre-rework design (spec §9): the same scenarios, its own counters and costs."""

from __future__ import annotations

from typing import Any

from mmsvc.mm.types import MLOCK_ONFAULT
from tests.protocol.world import World, sub

LEGACY = {"protocol": "legacy"}


async def rows(w: World) -> dict[tuple[str, str], Any]:
    return {(r.lock_class, r.instance): r for r in await w.kernel.lock_stat(w.mid)}


def test_s5_legacy_exit_re_mlocks_through_page_mlock(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):
            await w.mmap(p, "m", 1, file="f", shared=True)
            await w.mlock(p, "m")
            await w.drain()
        assert (await w.delta())["mlocked"] == 1
        reads_before = w.kernel.legacy.costs.page_mlock_calls
        await w.kernel.exit(w.mid, p1)
        await w.drain()
        # one page_mlock under i_mmap_rwsem (read), one page lock, a re-mlock, no munlock
        assert w.kernel.legacy.costs.page_mlock_calls - reads_before == 1
        d = await w.delta()
        assert (d["mlocked"], d["munlocked"]) == (2, 0)
        await w.kernel.exit(w.mid, p2)
        await w.drain()
        assert sub(await w.delta(), mlocked=2, munlocked=1, rescued=1, nr_mlock=0) == {
            "mlocked": 2, "munlocked": 1, "rescued": 1, "nr_mlock": 0}
        stats = await rows(w)
        assert stats[("page_lock", "node0/root")].acquisitions >= 2

    run(s, **LEGACY)


def test_s34_legacy_munlock_of_a_page_locked_elsewhere(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):
            await w.mmap(p, "m", 1, file="f", shared=True)
            await w.mlock(p, "m")
            await w.drain()
        before = await w.delta()
        await w.munlock(p1, "m")
        after = await w.delta()
        assert (after["mlocked"] - before["mlocked"], after["munlocked"] - before["munlocked"]) \
            == (1, 0)
        await w.drain()
        page = (await w.pages(p2, "m"))[0]
        assert (page.mlocked, page.unevictable) == (True, True)

    run(s, **LEGACY)


def test_s34_new_design_only_decrements_the_count(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 1, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):
            await w.mmap(p, "m", 1, file="f", shared=True)
            await w.mlock(p, "m")
        await w.drain()
        before = await w.delta()
        await w.munlock(p1, "m")
        assert await w.delta() == before
        assert (await w.pages(p2, "m"))[0].mlock_count == 1
        reads = [r for r in await w.kernel.lock_stat(w.mid) if r.lock_class == "i_mmap_rwsem"]
        assert all(r.acquisitions == 2 for r in reads)  # the two links, no read holds

    run(s)


def test_legacy_anon_mlock_and_munmap(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.touch(p, "m")
        await w.mlock(p, "m")
        await w.drain()
        assert sub(await w.delta(), mlocked=4, culled=4, nr_mlock=4, nr_unev=4) == {
            "mlocked": 4, "culled": 4, "nr_mlock": 4, "nr_unev": 4}
        await w.munmap(p, "m")
        await w.drain()
        assert sub(await w.delta(), munlocked=4, rescued=4, nr_mlock=0, nr_unev=0,
                   cleared=0) == {"munlocked": 4, "rescued": 4, "nr_mlock": 0, "nr_unev": 0,
                                  "cleared": 0}

    run(s, **LEGACY)


def test_s35_legacy_lockonfault_mlocks_present_pages_only(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 8)
        await w.touch(p, "m", 0, 3)
        await w.mlock(p, "m", flags=MLOCK_ONFAULT)
        await w.drain()
        assert sub(await w.delta(), mlocked=3, culled=3) == {"mlocked": 3, "culled": 3}
        assert [pg.present for pg in await w.pages(p, "m")] == [True] * 3 + [False] * 5
        await w.touch(p, "m", 3, 5)  # new anon pages in a VM_LOCKED vma: mlocked at fault
        await w.drain()
        assert sub(await w.delta(), mlocked=5, culled=5) == {"mlocked": 5, "culled": 5}

    run(s, **LEGACY)


def test_exit_storm_costs_legacy_vs_rework(run: Any) -> None:
    """S6, small: legacy pays page_mlock read holds and re-mlocks; the rework pays none."""

    async def storm(w: World) -> tuple[dict[str, int], int]:
        await w.file("f", 16, prefill=True)
        procs = [await w.proc() for _ in range(3)]
        for p in procs:
            await w.mmap(p, "m", 16, file="f", shared=True)
            await w.mlock(p, "m")
            await w.drain()
        for p in procs:
            await w.kernel.exit(w.mid, p)
            await w.drain()
        reads = w.kernel.legacy.costs.page_mlock_calls
        return await w.delta(), reads

    legacy, legacy_reads = run(storm, **LEGACY)
    rework, rework_reads = run(storm)
    assert rework_reads == 0 and rework["mlocked"] == 16 and rework["munlocked"] == 16
    # all but the last exiting process re-mlock each page: 16 + 2 * 16
    assert legacy_reads == 32 and legacy["mlocked"] == 48 and legacy["munlocked"] == 16
