"""ftruncate and hole punching (mm/truncate.py): spec S20, §3.4.2, §3.6, §6, X1 of §8.5."""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.types import FileSpec
from tests.protocol.world import P, World, sub


def race_truncation_into_munlock(w: World, file: str, size: int) -> None:
    """S20's interleaving: munlock has stored the VMA flags without VM_LOCKED (§3.6 step 1)
    and, before its walk reaches the pte, another CPU truncates the file."""
    real_walk = w.kernel.mlocks.walk_vma

    async def walk(m: Any, mm: Any, vma: Any, lock: bool) -> None:
        if not lock:
            await w.on(1).truncate(w.mid, file, size)
        await real_walk(m, mm, vma, lock)

    w.kernel.mlocks.walk_vma = walk  # type: ignore[method-assign]


async def mlocked_file_page(w: World) -> int:
    await w.file("f", 1, prefill=True)
    p = await w.proc()
    await w.mmap(p, "m", 1, file="f", shared=True)
    await w.mlock(p, "m")
    await w.drain()
    [page] = await w.pages(p, "m")
    assert (page.mlocked, page.unevictable, page.mlock_count) == (True, True, 1)
    return p


def test_s20_truncation_racing_munlock_is_cleared_at_free(run: Any) -> None:
    async def s(w: World) -> None:
        p = await mlocked_file_page(w)
        before = await w.delta()
        race_truncation_into_munlock(w, "f", 0)
        await w.munlock(p, "m")
        await w.drain_all()
        d = await w.delta()
        # the zap saw no VM_LOCKED (no munlock), the walk found no pte: the page kept
        # PG_mlocked until the page cache's reference, its last, went (§6.1.2)
        assert d["cleared"] - before["cleared"] == 1
        assert d["munlocked"] - before["munlocked"] == 0
        assert (before["nr_mlock"], before["nr_unev"], d["nr_mlock"], d["nr_unev"]) == (
            1, 1, 0, 0)
        assert [pg.present for pg in await w.pages(p, "m")] == [False]
        with pytest.raises(KernelError) as exc:  # beyond the new EOF: SIGBUS
            await w.kernel.fault(w.mid, p, w.rng(p, "m")[0], P, False)
        assert exc.value.errno == "EFAULT" and "SIGBUS" in exc.value.message

    run(s)


def test_s20_with_a_pin_the_page_is_cleared_only_at_unpin(run: Any) -> None:
    async def s(w: World) -> None:
        p = await mlocked_file_page(w)
        pin = await w.kernel.pin(w.mid, p, *w.rng(p, "m"), False)
        assert pin.pages == 1
        before = await w.delta()
        race_truncation_into_munlock(w, "f", 0)
        await w.munlock(p, "m")
        await w.drain_all()
        d = await w.delta()
        # X1: unmapped, out of the page cache, held by the pin: still mlocked + unevictable
        assert sub(d, cleared=before["cleared"], munlocked=before["munlocked"], nr_mlock=1,
                   nr_unev=1) == {"cleared": before["cleared"],
                                  "munlocked": before["munlocked"], "nr_mlock": 1, "nr_unev": 1}
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        assert report.known_exceptions.get("X1") == 1
        assert await w.kernel.unpin(w.mid, p, pin.pin_id) == 1
        d = await w.delta()
        assert d["cleared"] - before["cleared"] == 1
        assert d["munlocked"] - before["munlocked"] == 0
        assert (d["nr_mlock"], d["nr_unev"]) == (0, 0)

    run(s)


def test_truncate_of_pages_mlocked_by_two_processes(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 4, prefill=True)
        pids = [await w.proc(), await w.proc()]
        for p in pids:
            await w.mmap(p, "m", 4, file="f", shared=True)
            await w.mlock(p, "m")
        await w.drain()
        assert [pg.mlock_count for pg in await w.pages(pids[0], "m")] == [2, 2, 2, 2]
        before = await w.delta()
        await w.kernel.truncate(w.mid, "f", 1)
        # the zaps of VM_LOCKED ptes munlock (§3.4.1): 2 entries per page, each holding a
        # reference, so the pages outlive the page cache until the batch is processed
        assert (await w.delta())["nr_mlock"] == 4
        await w.drain()
        d = await w.delta()
        assert {k: d[k] - before[k] for k in ("munlocked", "rescued", "cleared")} == {
            "munlocked": 3, "rescued": 3, "cleared": 0}
        assert (d["nr_mlock"], d["nr_unev"]) == (1, 1)
        for p in pids:
            assert [pg.present for pg in await w.pages(p, "m")] == [True, False, False, False]
            assert await w.locked_vm(p) == 4  # the VMAs stay VM_LOCKED
        assert [pg.present for pg in await w.kernel.file_pages(w.mid, "f")] == [True]
        with pytest.raises(KernelError) as exc:
            await w.kernel.fault(w.mid, pids[1], w.rng(pids[1], "m", 2, 3)[0], P, False)
        assert exc.value.errno == "EFAULT"

    run(s)


def test_truncate_unmaps_private_cow_copies_hole_punch_keeps_them(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 4, prefill=True)
        p = await w.proc()
        await w.mmap(p, "priv", 4, file="f")
        await w.mmap(p, "sh", 4, file="f", shared=True)
        await w.touch(p, "priv", 0, 4, write=False)
        await w.touch(p, "priv", 1, 3, write=True)  # COW copies of pages 1 and 2
        await w.touch(p, "sh", write=False)
        await w.drain()
        kinds = [pg.kind for pg in await w.pages(p, "priv")]
        assert kinds == ["f", "a", "a", "f"]
        # hole punch (even_cows = 0): page cache pages go from every mapping, COW copies stay
        await w.kernel.punch_hole(w.mid, "f", 1, 2)
        assert [pg.kind for pg in await w.pages(p, "priv")] == ["f", "a", "a", "f"]
        assert [pg.present for pg in await w.pages(p, "sh")] == [True, False, False, True]
        assert [pg.present for pg in await w.kernel.file_pages(w.mid, "f")] == [
            True, False, False, True]
        # the file keeps its size: a fault in the hole reads a fresh page in
        await w.touch(p, "sh", 2, 3, write=False)
        assert [pg.present for pg in await w.kernel.file_pages(w.mid, "f")] == [
            True, False, True, True]
        # truncation (even_cows = 1): the private copies go as well
        await w.kernel.truncate(w.mid, "f", 1)
        assert [pg.kind for pg in await w.pages(p, "priv")] == ["f", ".", ".", "."]
        assert [pg.present for pg in await w.pages(p, "sh")] == [True, False, False, False]

    run(s)


def test_hole_punch_of_mlocked_shmem_pages_munlocks_them(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 4, prefill=True)
        p = await w.proc()
        await w.mmap(p, "m", 4, file="f", shared=True)
        await w.mlock(p, "m")
        await w.drain()
        before = await w.delta()
        await w.kernel.punch_hole(w.mid, "f", 2, 100)  # beyond EOF: clipped to the size
        await w.drain()
        d = await w.delta()
        assert {k: d[k] - before[k] for k in ("munlocked", "rescued", "cleared")} == {
            "munlocked": 2, "rescued": 2, "cleared": 0}
        assert (d["nr_mlock"], d["nr_unev"]) == (2, 2)
        # the hole reads back as new pages, mlocked by the fault in the VM_LOCKED vma (§3.2)
        await w.touch(p, "m", 2, 4, write=False)
        await w.drain()
        assert [pg.mlock_count for pg in await w.pages(p, "m")] == [1, 1, 1, 1]
        assert len(await w.kernel.file_pages(w.mid, "f")) == 4

    run(s)


def test_ftruncate_grows_a_file(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 2)
        p = await w.proc()
        await w.mmap(p, "m", 4, file="f", shared=True)
        with pytest.raises(KernelError) as exc:
            await w.kernel.fault(w.mid, p, w.rng(p, "m", 3, 4)[0], P, True)
        assert exc.value.errno == "EFAULT" and "SIGBUS" in exc.value.message
        await w.kernel.truncate(w.mid, "f", 4)
        await w.touch(p, "m", 3, 4, cpu=1)  # CPU 1 caches the size: 4 pages
        assert [pg.present for pg in await w.pages(p, "m")] == [False, False, False, True]
        # CPU 1's cached size is stale after this: its page cache lookup reads i_size and
        # says EOF, the fault refreshes the size and raises SIGBUS
        await w.kernel.truncate(w.mid, "f", 2)
        with pytest.raises(KernelError) as exc:
            await w.on(1).fault(w.mid, p, w.rng(p, "m", 2, 3)[0], P, True)
        assert "SIGBUS" in exc.value.message
        assert [pg.present for pg in await w.kernel.file_pages(w.mid, "f")] == [False, False]
        await w.on(1).truncate(w.mid, "f", 3)
        assert await w.kernel.fault(w.mid, p, w.rng(p, "m", 2, 3)[0], P, True) == 1
        assert len(await w.kernel.file_pages(w.mid, "f")) == 3

    run(s)


def test_truncate_of_a_regular_file_unmaps_mlocked_cow_copies(run: Any) -> None:
    async def s(w: World) -> None:
        await w.kernel.create_file(w.mid, FileSpec("r", 4, True, "regular"))
        p = await w.proc()
        await w.mmap(p, "m", 4, file="r")
        await w.mlock(p, "m")  # populate write-faults a private writable range: COW copies
        await w.drain()
        assert [pg.kind for pg in await w.pages(p, "m")] == ["a"] * 4
        await w.kernel.truncate(w.mid, "r", 0)
        await w.drain()
        d = await w.delta()
        assert (d["nr_mlock"], d["nr_unev"], d["inactive_file"], d["cleared"]) == (0, 0, 0, 0)
        assert d["munlocked"] == 4

    run(s)


@pytest.mark.parametrize("call, errno", [
    (lambda k, mid: k.truncate(mid, "nope", 0), "ENOENT"),
    (lambda k, mid: k.truncate(mid, "f", -1), "EINVAL"),
    (lambda k, mid: k.truncate(mid, "f", 1 << 40), "EINVAL"),
    (lambda k, mid: k.punch_hole(mid, "f", 0, 0), "EINVAL"),
    (lambda k, mid: k.punch_hole(mid, "f", -1, 1), "EINVAL"),
    (lambda k, mid: k.punch_hole(mid, "nope", 0, 1), "ENOENT"),
])
def test_truncate_errors_change_nothing(run: Any, call: Any, errno: str) -> None:
    async def s(w: World) -> None:
        await w.file("f", 4, prefill=True)
        p = await w.proc()
        await w.mmap(p, "m", 4, file="f", shared=True)
        await w.mlock(p, "m")
        snap = (await w.kernel.vmstat(w.mid), await w.pages(p, "m"),
                await w.kernel.file_pages(w.mid, "f"))
        with pytest.raises(KernelError) as exc:
            await call(w.kernel, w.mid)
        assert exc.value.errno == errno
        assert snap == (await w.kernel.vmstat(w.mid), await w.pages(p, "m"),
                        await w.kernel.file_pages(w.mid, "f"))

    run(s)


def test_truncate_lock_stat_shows_i_mmap_rwsem_writes(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 2, prefill=True)
        p = await w.proc()
        await w.mmap(p, "m", 2, file="f", shared=True)
        await w.touch(p, "m", write=False)
        rows = {(r.lock_class, r.instance): r for r in await w.kernel.lock_stat(w.mid)}
        before = rows[("i_mmap_rwsem", "f")].acquisitions
        await w.kernel.truncate(w.mid, "f", 0)
        rows = {(r.lock_class, r.instance): r for r in await w.kernel.lock_stat(w.mid)}
        assert rows[("i_mmap_rwsem", "f")].acquisitions >= before + 2  # two unmap passes
        assert rows[("i_rwsem", "f")].acquisitions == 1

    run(s)

