"""fork meeting a migration (spec §4, §1.7.4): the child must end up mapping every page the
parent mapped, the migrated one included.

Linux copies a migration entry into the child (copy_nonpresent_pte) and remove_migration_ptes
finds both through the rmap walk.  Here a migration's entries exist only while it holds the
page's rmap lock, and fork copies a VMA's page tables under the rmap locks of that VMA
(taken for write, as anon_vma_fork and the i_mmap insertion take them): the fork waits for
the migration and copies the new page's pte."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.protocol.world import World, race_once


def test_fork_during_a_migration_copies_the_migrated_page(run: Any, monkeypatch: Any) -> None:
    async def s(w: World) -> None:
        parent = await w.proc()
        await w.mmap(parent, "m", 2)
        await w.touch(parent, "m")
        sibling = await w.kernel.fork(w.mid, parent)  # shares both pages (COW)
        w.maps[(sibling, "m")] = w.maps[(parent, "m")]
        await w.drain()
        forks: list[asyncio.Task[int]] = []

        async def start_fork() -> None:
            # the parent forks on another CPU while the migration (through the sibling)
            # holds page 0 of both as migration entries
            forks.append(asyncio.create_task(w.on(1).fork(w.mid, parent)))
            await asyncio.sleep(0.2)

        race_once(monkeypatch, w.kernel.migrator, "_freeze", start_fork, before=True)
        res = await w.kernel.migrate(w.mid, sibling, *w.rng(sibling, "m", 0, 1), 1)
        assert (res.migrated, res.failed) == (1, 0)
        child = await forks[0]
        w.maps[(child, "m")] = w.maps[(parent, "m")]
        for pid in (parent, sibling, child):
            pages = await w.pages(pid, "m")
            assert [pg.present for pg in pages] == [True, True], pid
            assert (pages[0].node, pages[0].mapcount) == (1, 3), pid
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations

    run(s, nodes=2)
