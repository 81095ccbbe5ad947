"""An mlock/munlock range walk racing an rmap walker that frees the page it read.

Linux's mlock_pte_range holds the page table lock while it mlocks or munlocks each page, and
try_to_migrate_one / try_to_unmap_one take the same lock: a page whose pte another CPU zapped
is simply not seen.  In mmsvc the walk reads the ptes, then runs the page program: a page
freed in between must be skipped, not touched (it used to end the munlock with INTERNAL
"page N is free": the load test on the cluster and the fuzzer hit it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

import mmsvc.mm.mlock as mlock_module
from mmsvc.mm.mm_struct import Pte

from .world import World


def test_munlock_walk_skips_pages_a_migration_freed(run: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async def s(w: World) -> None:
        await w.file("f", 4, prefill=True)
        a, b = await w.proc(), await w.proc()
        for p in (a, b):
            await w.mmap(p, "f", 4, file="f", shared=True)
            await w.mlock(p, "f")
        await w.drain_all()
        before = {pg.pfn for pg in await w.pages(a, "f")}
        real_walk = mlock_module.pt_walk
        raced: list[int] = []

        async def walk_then_migrate(store: Any, key: str, start: int, end: int,
                                    max_ptes: int = 4096) -> AsyncIterator[dict[int, Pte]]:
            async for ptes in real_walk(store, key, start, end, max_ptes):
                if not raced and key.endswith(f"mm{a}}}"):
                    # another CPU migrates the pages through b's mapping: the rmap replaces
                    # a's ptes too and the old pages are freed before a's walk reaches them
                    res = await w.on(1).migrate(w.mid, b, *w.rng(b, "f"), 1)
                    raced.append(res.migrated)
                yield ptes

        monkeypatch.setattr(mlock_module, "pt_walk", walk_then_migrate)
        await w.munlock(a, "f")
        assert raced == [4]
        mine, theirs = await w.pages(a, "f"), await w.pages(b, "f")
        assert not {pg.pfn for pg in mine} & before  # new pages on node 1
        assert [pg.node for pg in mine] == [1] * 4
        await w.drain_all()
        theirs = await w.pages(b, "f")
        assert all(pg.mlocked for pg in theirs)  # b still locks them (count rebuilt, §4.2)

    run(s, nodes=2)
