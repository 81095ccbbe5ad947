"""Transparent huge pages (spec §3.9, S19): count the pmds, ignore the ptes."""

from __future__ import annotations

from typing import Any

from mmsvc.mm.types import MAP_ANONYMOUS, MAP_LOCKED, MAP_PRIVATE, MmapArgs
from tests.protocol.world import P, World, sub

THP = {"thp": True, "frames_per_node": 8192}
HPAGE = 512
HINT = 0x7E0000000000  # 2 MiB aligned


async def thp_map(w: World, pid: int, name: str, pmds: int, flags: int = 0) -> int:
    addr = await w.kernel.mmap(w.mid, pid, MmapArgs(
        pmds * HPAGE * P, 3, MAP_PRIVATE | MAP_ANONYMOUS | flags, addr=HINT))
    assert addr == HINT
    w.maps[(pid, name)] = (addr, pmds * HPAGE)
    return addr


def test_s19_thp_fault_in_a_locked_vma_is_counted_at_once(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await thp_map(w, p, "m", 1, MAP_LOCKED)  # populated: one THP, pmd-mapped
        # mlock_new_page of a THP head flushes the batch at once: exact before any drain
        d = await w.delta()
        assert sub(d, mlocked=512, culled=512, nr_unev=512, nr_mlock=512) == {
            "mlocked": 512, "culled": 512, "nr_unev": 512, "nr_mlock": 512}
        head = (await w.pages(p, "m"))[0]
        assert (head.mlock_count, head.mapcount) == (1, 1)
        # mprotect of one 4 KiB subrange: vma split -> pmd split -> munlock(compound)
        addr, _ = w.rng(p, "m")
        await w.kernel.mprotect(w.mid, p, addr + 8 * P, P, 1)
        d = await w.delta()
        assert sub(d, munlocked=512, rescued=512, nr_mlock=0, nr_unev=0) == {
            "munlocked": 512, "rescued": 512, "nr_mlock": 0, "nr_unev": 0}
        pages = await w.pages(p, "m")
        assert all(pg.vma_locked and not pg.mlocked for pg in pages)  # lazy: counted nowhere
        report = await w.kernel.check(w.mid, True)
        # M(head) counts pmd mappings only (§8.5): pte mappings are not an undercount
        assert report.ok and report.undercounts == 0

    run(s, **THP)


def test_mlock_walk_counts_a_pmd_once_and_munmap_frees_the_thp(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await thp_map(w, p, "m", 2)
        await w.touch(p, "m", 0, 1)  # one write fault: the whole first pmd
        await w.touch(p, "m", HPAGE + 3, HPAGE + 4)
        free_before = (await w.kernel.meminfo(w.mid))["MemFree"]
        await w.mlock(p, "m")
        assert sub(await w.delta(), mlocked=1024, culled=1024) == {"mlocked": 1024,
                                                                   "culled": 1024}
        assert [pg.mlock_count for pg in await w.pages(p, "m")][::HPAGE] == [1, 1]
        await w.munmap(p, "m")
        await w.drain()
        d = await w.delta()
        assert sub(d, munlocked=1024, rescued=1024, cleared=0, nr_unev=0) == {
            "munlocked": 1024, "rescued": 1024, "cleared": 0, "nr_unev": 0}
        assert (await w.kernel.meminfo(w.mid))["MemFree"] == free_before + 1024 * 4

    run(s, **THP)


def test_fork_then_write_splits_the_pmd_and_copies_one_subpage(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await thp_map(w, p, "m", 1)
        await w.touch(p, "m", 0, 1)
        c = await w.kernel.fork(w.mid, p)
        w.maps[(c, "m")] = w.maps[(p, "m")]
        assert (await w.pages(c, "m"))[0].mapcount == 2  # two pmd mappings of one THP
        await w.touch(p, "m", 5, 6)  # write to the write-protected huge pmd
        await w.drain()
        mine = await w.pages(p, "m")
        theirs = await w.pages(c, "m")
        assert mine[5].pfn != theirs[5].pfn  # the copied subpage
        assert mine[4].pfn == theirs[4].pfn  # the rest still the THP, pte-mapped for p
        await w.kernel.exit(w.mid, c)
        await w.kernel.exit(w.mid, p)
        await w.drain()
        assert (await w.kernel.meminfo(w.mid))["MemFree"] == 8192 * 4

    run(s, **THP)


def test_legacy_mlocks_a_pmd_mapped_thp_mapped_once(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await thp_map(w, p, "m", 1)
        await w.touch(p, "m", 0, 1)
        await w.mlock(p, "m")
        await w.drain()
        assert sub(await w.delta(), mlocked=512, culled=512) == {"mlocked": 512, "culled": 512}
        await w.munlock(p, "m")
        await w.drain()
        assert sub(await w.delta(), munlocked=512, rescued=512, nr_mlock=0) == {
            "munlocked": 512, "rescued": 512, "nr_mlock": 0}

    run(s, **THP, protocol="legacy")
