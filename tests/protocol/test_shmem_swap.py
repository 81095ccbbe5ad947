"""Swap of shmem pages (tmpfs files, SysV shm): reclaim's shmem_writeout puts the swap entry
in the page cache slot, a fault reads the page back (shmem_swapin_folio), truncation frees
the entry (shmem_undo_range); SHM_LOCKed and mlocked pages are never swapped (spec §5)."""

from __future__ import annotations

from typing import Any

from mmsvc.mm.swapfile import swap_info
from mmsvc.store import keys
from tests.protocol.test_shm import SHM_LOCK, ctl, shm
from tests.protocol.world import World, sub

SWAP = {"swap_pages": 64}


async def used(w: World) -> tuple[int, dict[int, int], int]:
    """(slots in use, slot -> count, pages in the swap cache)."""
    info = await swap_info(w.store, await w.kernel.machine(w.mid))
    return info.used, info.counts, len(info.cache)


async def entries(w: World, name: str = "f") -> dict[int, str]:
    f = (await w.kernel.machine(w.mid)).files[name]
    raw = await w.store.client.hgetall(f"{keys.file(w.mid, f.fid)}:pc")
    return {int(k): v.decode() for k, v in raw.items()}


async def mapped_tmpfs(w: World, pages: int) -> int:
    await w.file("f", pages, prefill=True)
    p = await w.proc()
    await w.mmap(p, "m", pages, file="f", shared=True)
    await w.touch(p, "m", write=False)
    await w.drain()
    return p


def test_reclaim_swaps_out_shmem_and_a_fault_reads_it_back(run: Any) -> None:
    async def s(w: World) -> None:
        p = await mapped_tmpfs(w, 4)
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert (res.scanned, res.reclaimed, res.culled) == (4, 4, 0)
        assert [pg.present for pg in await w.pages(p, "m")] == [False] * 4
        assert [pg.present for pg in await w.kernel.file_pages(w.mid, "f")] == [False] * 4
        assert sorted((await entries(w)).values()) == ["swap|1", "swap|2", "swap|3", "swap|4"]
        assert await used(w) == (4, {1: 1, 2: 1, 3: 1, 4: 1}, 0)
        assert sub(await w.kernel.vmstat(w.mid), pswpout=4, pswpin=0) == {
            "pswpout": 4, "pswpin": 0}
        assert (await w.kernel.check(w.mid, True)).ok
        # a read fault reads back the faulting page only: fault-around skips swap entries
        await w.touch(p, "m", 1, 2, write=False)
        assert [pg.present for pg in await w.pages(p, "m")] == [False, True, False, False]
        page = (await w.pages(p, "m"))[1]
        assert (page.kind, page.mapcount, page.lru_list) == ("f", 1, "")  # in the lru_add batch
        assert sub(await w.kernel.vmstat(w.mid), pswpin=1) == {"pswpin": 1}
        assert (await used(w))[0] == 3  # its slot was freed
        await w.touch(p, "m", write=False)
        assert (await used(w))[0] == 0 and not any(
            v.startswith("swap|") for v in (await entries(w)).values())
        await w.drain()
        assert sub(await w.delta(), inactive_anon=4) == {"inactive_anon": 4}

    run(s, **SWAP)


def test_truncation_frees_the_swap_entries(run: Any) -> None:
    async def s(w: World) -> None:
        p = await mapped_tmpfs(w, 6)
        await w.kernel.munmap(w.mid, p, *w.rng(p, "m"))
        await w.kernel.reclaim(w.mid, None, None, 32)
        assert (await used(w))[0] == 6
        await w.kernel.truncate(w.mid, "f", 2)
        assert await used(w) == (2, {1: 1, 2: 1}, 0)
        assert sorted(await entries(w)) == [0, 1]
        await w.kernel.truncate(w.mid, "f", 0)
        assert await used(w) == (0, {}, 0)

    run(s, **SWAP)


def test_locked_shmem_is_never_swapped(run: Any) -> None:
    """An mlocked tmpfs page and a SHM_LOCKed segment's pages are unevictable: reclaim never
    scans them (the unevictable list), and pages on the way there are culled."""

    async def s(w: World) -> None:
        p = await mapped_tmpfs(w, 2)
        await w.mlock(p, "m")
        sid = await shm(w, p, "s", 2)
        await ctl(w, p, sid, SHM_LOCK)
        await w.touch(p, "s")
        await w.drain()
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert res.reclaimed == 0
        assert await used(w) == (0, {}, 0)
        assert all(pg.present for pg in await w.pages(p, "m") + await w.pages(p, "s"))

    run(s, **SWAP)


def test_swap_full_keeps_the_shmem_page_in_the_cache(run: Any) -> None:
    async def s(w: World) -> None:
        p = await mapped_tmpfs(w, 3)
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert (res.scanned, res.reclaimed) == (3, 2)  # two slots: the third is activated
        assert await used(w) == (2, {1: 1, 2: 1}, 0)
        await w.drain()
        cached = [pg for pg in await w.kernel.file_pages(w.mid, "f") if pg.present]
        assert [(pg.lru_list, pg.mapcount) for pg in cached] == [("active_anon", 0)]
        await w.touch(p, "m", write=False)
        assert await used(w) == (0, {}, 0)

    run(s, swap_pages=2)


def test_a_failed_read_back_puts_the_swap_entry_back(run: Any, monkeypatch: Any) -> None:
    """A fault that reserved a swapped-out page to read it back and then failed gives the
    slot its swap entry again (pc_commit of an empty value): nothing lost, nothing leaked;
    the next fault reads it back."""
    from mmsvc.mm.errors import KernelError
    from mmsvc.mm.memory import Faults

    async def s(w: World) -> None:
        p = await mapped_tmpfs(w, 4)
        await w.kernel.reclaim(w.mid, None, None, 32)
        before = await entries(w)
        assert before[0].startswith("swap|")
        real = Faults._file_map
        failed: list[int] = []

        async def fail_once(self: Any, *args: Any, **kw: Any) -> int:
            if not failed:
                failed.append(1)
                raise KernelError("ENOMEM", "staged: no frame for the page read back")
            return await real(self, *args, **kw)

        monkeypatch.setattr(Faults, "_file_map", fail_once)
        try:
            await w.touch(p, "m", 0, 1, write=False)
        except KernelError as exc:
            assert exc.errno == "ENOMEM"
        assert failed and await entries(w) == before
        assert (await used(w))[0] == 4
        assert (await w.kernel.check(w.mid, True)).ok
        await w.touch(p, "m", 0, 1, write=False)
        assert (await w.pages(p, "m"))[0].present and (await used(w))[0] == 3

    run(s, **SWAP)
