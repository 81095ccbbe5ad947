"""GUP pins (mm/gup.py): FOLL_PIN | FOLL_LONGTERM references that block migration's and
reclaim's refcount freeze and keep pages alive past munmap, exit and truncation (spec §4.1,
§5, §6, S15, S20, §8.3 row 10)."""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.gup import GUP_PIN_COUNTING_BIAS
from mmsvc.mm.types import MAP_ANONYMOUS, MAP_PRIVATE, FileSpec, MmapArgs
from tests.protocol.world import P, World


def test_pin_adds_the_pin_bias_and_unpin_removes_it(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        pin = await w.kernel.pin(w.mid, p, *w.rng(p, "m", 1, 3), True)  # faults them in
        assert pin.pages == 2
        await w.drain()  # the new pages' lru_add entries hold a reference each
        refs = [pg.refcount for pg in await w.pages(p, "m")]
        assert refs == [0, 1 + GUP_PIN_COUNTING_BIAS, 1 + GUP_PIN_COUNTING_BIAS, 0]
        report = await w.kernel.check(w.mid, True)  # A6 counts the pins
        assert report.ok, report.violations
        assert await w.kernel.unpin(w.mid, p, pin.pin_id) == 2
        assert [pg.refcount for pg in await w.pages(p, "m")] == [0, 1, 1, 0]
        with pytest.raises(KernelError) as exc:  # released once
            await w.kernel.unpin(w.mid, p, pin.pin_id)
        assert exc.value.errno == "ENOENT"

    run(s)


def test_migration_of_a_pinned_page_fails_and_succeeds_after_unpin(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 1)
        await w.mlock(p, "m")
        await w.drain()
        pin = await w.kernel.pin(w.mid, p, *w.rng(p, "m"), True)
        res = await w.kernel.migrate(w.mid, p, *w.rng(p, "m"), 1)
        # the freeze fails (§4.1): EAGAIN; restored undercounted (§4.2.5, S15)
        assert (res.migrated, res.failed, res.errno) == (0, 1, "EAGAIN")
        [page] = await w.pages(p, "m")
        assert (page.node, page.mlocked, page.unevictable) == (0, True, True)
        await w.kernel.unpin(w.mid, p, pin.pin_id)
        res = await w.kernel.migrate(w.mid, p, *w.rng(p, "m"), 1)
        assert (res.migrated, res.failed, res.errno) == (1, 0, "")
        [page] = await w.pages(p, "m")
        assert (page.node, page.mlocked, page.mlock_count) == (1, True, 1)

    run(s, nodes=2)


def test_reclaim_keeps_a_pinned_page(run: Any) -> None:
    async def s(w: World) -> None:
        await w.kernel.create_file(w.mid, FileSpec("r", 2, True, "regular"))
        p = await w.proc()
        await w.mmap(p, "m", 2, file="r", shared=True)
        await w.touch(p, "m", write=False)
        await w.drain()
        pin = await w.kernel.pin(w.mid, p, *w.rng(p, "m", 0, 1), False)
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        # try_to_unmap unmaps both; __remove_mapping's freeze fails on the pinned one
        assert (res.scanned, res.reclaimed) == (2, 1)
        assert [pg.present for pg in await w.kernel.file_pages(w.mid, "r")] == [True, False]
        await w.kernel.unpin(w.mid, p, pin.pin_id)
        await w.drain()  # the kept page was put back through the lru_add batch
        res = await w.kernel.reclaim(w.mid, None, None, 32)
        assert res.reclaimed == 1
        assert [pg.present for pg in await w.kernel.file_pages(w.mid, "r")] == [False, False]

    run(s)


def test_munmap_leaves_a_pinned_page_alive_until_unpin(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 2)
        await w.mlock(p, "m")
        pin = await w.kernel.pin(w.mid, p, *w.rng(p, "m"), True)
        await w.munmap(p, "m")
        await w.drain()
        d = await w.delta()
        # munmap munlocked normally (§3.8): munlocked + rescued, never cleared; the pin keeps
        # the pages, now evictable and unmapped
        assert (d["munlocked"], d["rescued"], d["cleared"], d["nr_mlock"]) == (2, 2, 0, 0)
        assert d["inactive_anon"] == 2
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        assert await w.kernel.unpin(w.mid, p, pin.pin_id) == 2
        d = await w.delta()
        assert (d["inactive_anon"], d["cleared"]) == (0, 0)

    run(s)


def test_exit_releases_the_process_pins(run: Any) -> None:
    async def s(w: World) -> None:
        p, q = await w.proc(), await w.proc()
        await w.mmap(p, "m", 3)
        await w.mmap(q, "m", 1)
        await w.kernel.pin(w.mid, p, *w.rng(p, "m", 0, 2), True)
        await w.kernel.pin(w.mid, p, *w.rng(p, "m", 1, 3), True)  # page 1 pinned twice
        other = await w.kernel.pin(w.mid, q, *w.rng(q, "m"), True)
        await w.drain()
        assert [pg.refcount for pg in await w.pages(p, "m")] == [
            1 + GUP_PIN_COUNTING_BIAS, 1 + 2 * GUP_PIN_COUNTING_BIAS, 1 + GUP_PIN_COUNTING_BIAS]
        await w.kernel.exit(w.mid, p)
        await w.drain()
        d = await w.delta()
        assert d["inactive_anon"] == 1  # q's pinned page only
        with pytest.raises(KernelError) as exc:  # q's pin is not p's to release
            await w.kernel.unpin(w.mid, p, other.pin_id)
        assert exc.value.errno == "ENOENT"
        await w.kernel.unpin(w.mid, q, other.pin_id)

    run(s)


def test_pin_errors_change_nothing(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 2)
        await w.mmap(p, "ro", 1, prot=1)
        before = (await w.kernel.vmstat(w.mid), await w.pages(p, "m"))
        addr, length = w.rng(p, "m")
        cases = [
            (w.kernel.pin(w.mid, p, addr, length + P, True), "EFAULT"),  # runs into a hole
            (w.kernel.pin(w.mid, p, *w.rng(p, "ro"), True), "EFAULT"),  # FOLL_WRITE, RO
            (w.kernel.pin(w.mid, p, addr + 1, P, True), "EINVAL"),
            (w.kernel.pin(w.mid, p, addr, 0, True), "EINVAL"),
            (w.kernel.pin(w.mid, 999, addr, P, True), "ESRCH"),
            (w.kernel.unpin(w.mid, p, 12345), "ENOENT"),
            (w.kernel.unpin(w.mid, 999, 1), "ESRCH"),
        ]
        for call, errno in cases:
            with pytest.raises(KernelError) as exc:
                await call
            assert exc.value.errno == errno
        assert before == (await w.kernel.vmstat(w.mid), await w.pages(p, "m"))

    run(s)


def test_read_pin_of_untouched_anonymous_memory_pins_nothing(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        addr = await w.kernel.mmap(w.mid, p, MmapArgs(2 * P, 3, MAP_PRIVATE | MAP_ANONYMOUS))
        pin = await w.kernel.pin(w.mid, p, addr, 2 * P, False)
        assert pin.pages == 0  # the shared zero page: vm_normal_page() has no page here
        await w.kernel.unpin(w.mid, p, pin.pin_id)

    run(s)


def test_munlock_racing_a_failed_migration_is_the_known_gap_x3(run: Any,
                                                               monkeypatch: Any) -> None:
    """Spec §8.3 row 14 (X3): p2's munlock stores its vma's flags without VM_LOCKED; then a
    migration replaces p2's pte of a shared file page by a migration entry (the vma is not
    locked any more: no munlock); p2's munlock walk finds no present pte there; the migration
    fails (a pin) and restores the pte into the unlocked vma without an mlock.  The page keeps
    PG_mlocked with no locked mapping, as on Linux: the checker reports it as the known
    exception X3, not as a Q4 violation; the page is cleared when freed."""
    import asyncio

    from mmsvc.mm.migrate import Migrate
    from mmsvc.mm.mlock import Mlock

    async def s(w: World) -> None:
        p1, p2 = await w.sharers(mlock=(1,))
        pin = await w.kernel.pin(w.mid, p1, *w.rng(p1, "m"), False)
        unmap, walk = Migrate._unmap, Mlock.walk_vma
        unmapped, walked = asyncio.Event(), asyncio.Event()

        async def unmap_then_wait(self: Migrate, *args: Any, **kw: Any) -> Any:
            done = await unmap(self, *args, **kw)
            unmapped.set()
            await walked.wait()  # the restore comes after p2's walk
            return done

        migration: list[Any] = []

        async def migrate_under_the_walk(self: Mlock, *args: Any, **kw: Any) -> None:
            if not migration:
                migration.append(asyncio.ensure_future(
                    w.on(1).migrate(w.mid, p1, *w.rng(p1, "m"), 1)))
                await unmapped.wait()
            await walk(self, *args, **kw)
            walked.set()

        monkeypatch.setattr(Migrate, "_unmap", unmap_then_wait)
        monkeypatch.setattr(Mlock, "walk_vma", migrate_under_the_walk)
        await w.munlock(p2, "m")
        res = await migration[0]
        assert (res.migrated, res.failed) == (0, 1)
        [page] = await w.pages(p2, "m")
        assert page.present and page.mlocked and not page.vma_locked  # X3
        await w.drain_all()
        report = await w.kernel.check(w.mid, True)
        assert report.ok, report.violations
        assert report.known_exceptions.get("X3") == 1
        await w.kernel.unpin(w.mid, p1, pin.pin_id)
        for p in (p1, p2):
            await w.kernel.exit(w.mid, p)
        await w.kernel.truncate(w.mid, "f", 0)
        await w.drain_all()
        assert (await w.kernel.vmstat(w.mid))["nr_mlock"] == 0  # cleared at free (§6)

    run(s, nodes=2)
