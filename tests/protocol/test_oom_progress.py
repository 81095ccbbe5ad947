"""Out of memory part-way through a fault (docs/concurrency.md finding 15).

A fault over several pages runs one page program per lruvec: the pages already in the page
cache (charged to another memcg, or on another node) are mapped by one program, the new pages
allocated by the next.  When that allocation finds no frame, the kernel keeps the progress it
made (GUP's populate maps page after page; fault-around's ptes stay): the pages before the
failing one are mapped, the rest is untouched, and no page counts a mapping it has no pte
for.  The run fixture's checker (A6: mapcount == ptes) is the main assertion.
"""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.types import MAP_LOCKED

from .world import World


async def fill_node(w: World, node: int, memcg: str, pages: int) -> int:
    """Use up a node's frames with mlocked anonymous pages, one fault at a time, so that
    nothing on it can be reclaimed; returns how many were faulted."""
    hog = await w.proc(node=node, memcg=memcg)
    await w.mmap(hog, "hog", pages, flags=MAP_LOCKED)
    for n in range(pages):
        try:
            await w.touch(hog, "hog", n, n + 1)
        except KernelError as exc:
            assert exc.errno == "ENOMEM"
            return n
    raise AssertionError("the node never ran out of frames")


def test_file_fault_keeps_the_cached_pages_it_mapped(run: Any) -> None:
    async def s(w: World) -> None:
        await w.file("f", 16)
        owner = await w.proc(memcg="root")
        await w.mmap(owner, "f", 8, file="f", shared=True)
        await w.mlock(owner, "f")  # pages 0-7 in the page cache, charged to root, unevictable
        await fill_node(w, 0, "A", 256)
        p = await w.proc(memcg="A")
        await w.mmap(p, "f", 16, file="f", shared=True)
        with pytest.raises(KernelError) as err:
            # one write fault over 16 pages: 0-7 found in the cache (root's lruvec), 8-15 to
            # be read in on A's lruvec, which has no frame left
            await w.kernel.fault(w.mid, p, *w.rng(p, "f"), True)
        assert err.value.errno == "ENOMEM"
        pages = await w.pages(p, "f")
        assert [pg.present for pg in pages] == [True] * 8 + [False] * 8
        assert [pg.mapcount for pg in pages[:8]] == [2] * 8

    run(s, frames_per_node=96, memcgs=("root", "A"))


def test_populate_under_mlockall_keeps_what_it_mapped(run: Any) -> None:
    async def s(w: World) -> None:
        from mmsvc.mm.types import MCL_CURRENT

        await w.file("f", 16)
        owner = await w.proc(memcg="root")
        await w.mmap(owner, "f", 8, file="f", shared=True)
        await w.mlock(owner, "f")
        await fill_node(w, 0, "A", 256)
        p = await w.proc(memcg="A")
        await w.mmap(p, "f", 16, file="f", shared=True)
        await w.kernel.mlockall(w.mid, p, MCL_CURRENT)  # populate errors are ignored
        pages = await w.pages(p, "f")
        assert [pg.present for pg in pages] == [True] * 8 + [False] * 8
        assert all(pg.mlocked for pg in pages[:8])

    run(s, frames_per_node=96, memcgs=("root", "A"))


def test_cow_fault_keeps_the_copies_it_made(run: Any) -> None:
    async def s(w: World) -> None:
        parent = await w.proc(node=0)
        await w.mmap(parent, "a", 4)
        await w.touch(parent, "a")
        addr, length = w.rng(parent, "a", 1, 2)
        await w.kernel.migrate(w.mid, parent, addr, length, 1)  # page 1 on node 1, 0/2/3 on 0
        child = await w.kernel.fork(w.mid, parent)
        w.maps[(child, "a")] = w.maps[(parent, "a")]
        await fill_node(w, 0, "root", 256)
        # free exactly two frames on node 0: the child's COW of pages 0 and 1 gets them, page
        # 2's copy finds none (runs: node 0 alloc, node 1 unmap, node 0 alloc, ...)
        hog = max(pid for pid in (parent, child)) + 1
        await w.munmap(hog, "hog", 0, 2)
        await w.drain()  # the munlocked pages leave the mlock batch and are freed
        with pytest.raises(KernelError) as err:
            await w.kernel.fault(w.mid, child, *w.rng(child, "a"), True)
        assert err.value.errno == "ENOMEM"
        mine = await w.pages(child, "a")
        theirs = await w.pages(parent, "a")
        assert [c.pfn != p.pfn for c, p in zip(mine, theirs, strict=True)] == [
            True, True, False, False]
        assert [c.mapcount for c in mine] == [1, 1, 2, 2]

    run(s, frames_per_node=96, nodes=2)
