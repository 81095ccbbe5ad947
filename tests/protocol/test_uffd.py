"""userfaultfd UFFDIO_COPY (mmsvc/mm/userfaultfd.py; spec §3.3, §3.10, S29).

Every scenario ends with the §8.5 checker (the ``run`` fixture).
"""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.types import MLOCK_ONFAULT, FileSpec
from tests.protocol.world import World, sub

P = 4096


async def copy(w: World, pid: int, name: str, a: int = 0, b: int | None = None) -> int:
    return await w.kernel.uffd_copy(w.mid, pid, *w.rng(pid, name, a, b))


def test_s29_uffd_copy_into_an_anon_vm_locked_vma(run: Any) -> None:
    """S29 (anon): the new page goes through mlock_new_page: Δmlocked 1 at once, Δculled 1
    and cnt 1 after the drain; it never sits on an evictable list."""

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.mlock(p, "m", flags=MLOCK_ONFAULT)  # VM_LOCKED, nothing populated
        assert await copy(w, p, "m", 1, 2) == 1
        pg = (await w.pages(p, "m"))[1]
        assert (pg.present, pg.kind, pg.mlocked, pg.lru) == (True, "a", True, False)
        assert sub(await w.delta(), mlocked=1, culled=0) == {"mlocked": 1, "culled": 0}
        await w.drain()
        pg = (await w.pages(p, "m"))[1]
        assert (pg.unevictable, pg.mlock_count) == (True, 1)
        assert sub(await w.delta(), mlocked=1, culled=1, nr_mlock=1, nr_unev=1,
                   inactive_anon=0) == {
            "mlocked": 1, "culled": 1, "nr_mlock": 1, "nr_unev": 1, "inactive_anon": 0}
        assert [x.present for x in await w.pages(p, "m")] == [False, True, False, False]

    run(s)


async def locked_shmem(w: World) -> int:
    await w.file("f", 2)
    p = await w.proc()
    await w.mmap(p, "m", 2, file="f", shared=True)
    await w.mlock(p, "m", flags=MLOCK_ONFAULT)
    return p


def test_s29_uffd_copy_into_a_shmem_vm_locked_vma_single_drain(run: Any) -> None:
    """S29 (shmem): lru_add entry, then the LRU_PAGE entry of page_add_file_rmap; one drain
    processes lru_add first: cnt 1."""

    async def s(w: World) -> None:
        p = await locked_shmem(w)
        assert await copy(w, p, "m", 0, 1) == 1
        pg = (await w.pages(p, "m"))[0]
        assert (pg.kind, pg.mlocked, pg.lru) == ("f", True, False)
        await w.drain()
        pg = (await w.pages(p, "m"))[0]
        assert (pg.unevictable, pg.mlock_count) == (True, 1)
        assert sub(await w.delta(), mlocked=1, culled=1) == {"mlocked": 1, "culled": 1}
        # the page is in the file's page cache: another mapping finds it there
        assert [x.pfn for x in await w.kernel.file_pages(w.mid, "f")][:1] == [pg.pfn]

    run(s)


def test_s29_uffd_copy_into_shmem_mlock_batch_flushed_first(run: Any) -> None:
    """S29 (shmem), mlock batch flushed first (batch length 1): the entry finds the page off
    the LRU; lru-add culls it with cnt 0 - an undercount, never 2."""

    async def s(w: World) -> None:
        p = await locked_shmem(w)
        await copy(w, p, "m", 0, 1)
        await w.drain()
        pg = (await w.pages(p, "m"))[0]
        assert (pg.mlocked, pg.unevictable, pg.mlock_count) == (True, True, 0)
        report = await w.kernel.check(w.mid, True)
        assert report.ok and report.undercounts == 1

    run(s, mlock_batch_len=1)


def test_uffd_copy_into_unlocked_and_private_shmem_vmas(run: Any) -> None:
    """Unlocked anon: lru_cache_add (inactive_anon after drain).  A private shmem mapping
    gets an anonymous page (mcopy_atomic_pte), not a page cache page."""

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "a", 2)
        await w.file("f", 2)
        await w.mmap(p, "pf", 2, file="f")
        assert await copy(w, p, "a") == 2
        assert await copy(w, p, "pf") == 2
        await w.drain()
        assert [x.kind for x in await w.pages(p, "pf")] == ["a", "a"]
        assert await w.kernel.file_pages(w.mid, "f") == [] or all(
            not x.present for x in await w.kernel.file_pages(w.mid, "f"))
        assert sub(await w.delta(), mlocked=0, inactive_anon=4) == {
            "mlocked": 0, "inactive_anon": 4}

    run(s)


async def snapshot(w: World, pid: int, name: str) -> tuple[Any, ...]:
    return await w.kernel.vmstat(w.mid), await w.pages(pid, name)


def test_uffd_copy_eexist_at_the_first_page_changes_nothing(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.mlock(p, "m", flags=MLOCK_ONFAULT)
        await w.touch(p, "m", 0, 1)
        await w.drain()
        before = await snapshot(w, p, "m")
        with pytest.raises(KernelError) as err:
            await copy(w, p, "m")
        assert err.value.errno == "EEXIST"
        assert await snapshot(w, p, "m") == before

    run(s)


def test_uffd_copy_stops_at_the_first_present_page(run: Any) -> None:
    """As the ioctl: pages before the first present one are copied, then EEXIST."""

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.touch(p, "m", 2, 3)
        with pytest.raises(KernelError) as err:
            await copy(w, p, "m")
        assert err.value.errno == "EEXIST" and "(2 pages copied)" in err.value.message
        assert [x.present for x in await w.pages(p, "m")] == [True, True, True, False]

    run(s)


def test_uffd_copy_shmem_page_already_in_the_page_cache_is_eexist(run: Any) -> None:
    async def s(w: World) -> None:
        p = await locked_shmem(w)
        q = await w.proc()
        await w.mmap(q, "m", 2, file="f", shared=True)
        await w.touch(q, "m", 0, 1, write=False)  # page 0 read into the cache by q
        await w.drain()
        before = await snapshot(w, p, "m")
        with pytest.raises(KernelError) as err:
            await copy(w, p, "m")
        assert err.value.errno == "EEXIST"
        assert await snapshot(w, p, "m") == before

    run(s)


@pytest.mark.parametrize("case,errno", [
    ("regular_file", "EINVAL"), ("misaligned", "EINVAL"), ("zero_length", "EINVAL"),
    ("beyond_vma", "ENOENT"), ("unmapped", "ENOENT"), ("no_process", "ESRCH"),
])
def test_uffd_copy_errors_change_nothing(run: Any, case: str, errno: str) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 2)
        await w.kernel.create_file(w.mid, FileSpec("r", 2, kind="regular"))
        await w.mmap(p, "r", 2, file="r", shared=True)
        addr, length = w.rng(p, "m")
        pid = p
        if case == "regular_file":
            addr, length = w.rng(p, "r")
        elif case == "misaligned":
            addr += 1
        elif case == "zero_length":
            length = 0
        elif case == "beyond_vma":
            length += P
        elif case == "unmapped":
            addr += 1 << 30
        elif case == "no_process":
            pid = 999
        before = await snapshot(w, p, "m")
        with pytest.raises(KernelError) as err:
            await w.kernel.uffd_copy(w.mid, pid, addr, length)
        assert err.value.errno == errno
        assert await snapshot(w, p, "m") == before

    run(s)
