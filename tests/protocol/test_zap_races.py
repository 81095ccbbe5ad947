"""A zap meeting a migration entry (zap_pte_range, spec §4): the entry is cleared, not left
for the migration's restore to map the page again."""

from __future__ import annotations

from typing import Any

from mmsvc.mm.types import Advice
from tests.protocol.world import World, race_once


def test_dontneed_during_a_migration_drops_the_migration_entry(run: Any,
                                                               monkeypatch: Any) -> None:
    """MADV_DONTNEED of p2's pte while a migration (through p1) holds it as a migration
    entry: Linux's zap_pte_range clears the entry (its mapping was removed when it was set),
    and remove_migration_pte, finding the pte changed, maps nothing - p2's page is gone
    after the migration, as after any DONTNEED.  Before the fix the zap skipped the entry
    and the restore mapped the new page back into p2."""

    async def s(w: World) -> None:
        await w.file("f", 2, prefill=True)
        p1, p2 = await w.proc(), await w.proc()
        for p in (p1, p2):
            await w.mmap(p, "m", 2, file="f", shared=True)
            await w.touch(p, "m", write=False)
        await w.drain()
        race_once(monkeypatch, w.kernel.migrator, "_freeze",
                  lambda: w.on(1).madvise(w.mid, p2, *w.rng(p2, "m", 0, 1),
                                          Advice.MADV_DONTNEED), before=True)
        res = await w.kernel.migrate(w.mid, p1, *w.rng(p1, "m", 0, 1), 1)
        assert (res.migrated, res.failed) == (1, 0)
        assert [pg.present for pg in await w.pages(p2, "m")] == [False, True]
        p1_page = (await w.pages(p1, "m"))[0]
        assert (p1_page.node, p1_page.mapcount) == (1, 1)
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations

    run(s, nodes=2)
