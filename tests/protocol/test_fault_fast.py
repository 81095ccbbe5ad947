"""The one-round-trip anonymous fault (Faults.fault_fast, lua `fault_fast`).

A CPU that faulted an address space in before builds the next one-page write fault from what
it saw, without taking mmap_lock first; the store runs it only if the VMA and the pte are
still what that CPU saw and mmap_lock is free, else nothing happens and the fault goes the
usual way.  These tests change the address space from another CPU behind the first one's
back: the fault must behave as if it had looked again.
"""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.errors import KernelError

from .world import World


def count_fast_calls(w: World, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The replies of the fault_fast calls CPU 0 makes ('miss', 'held' or 'done')."""
    seen: list[str] = []
    real = w.kernel.store.fcall2

    async def spy(name: str, key: str, key2: str, *args: Any) -> Any:
        reply = await real(name, key, key2, *args)
        if name == "fault_fast":
            seen.append(reply[0].decode())
        return reply

    monkeypatch.setattr(w.kernel.store, "fcall2", spy)
    return seen


def fast(w: World, *replies: str) -> list[str]:
    """What count_fast_calls must have seen: nothing on a Redis Cluster (no fast path)."""
    return [] if w.kernel.store.is_cluster else list(replies)


def test_a_write_fault_on_known_anon_memory_is_one_call(run: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "a", 4)
        await w.touch(p, "a", 0, 1)  # the usual way: this CPU now knows the address space
        calls = count_fast_calls(w, monkeypatch)
        await w.touch(p, "a", 1, 4)
        assert calls == fast(w, "done", "done", "done")
        assert [pg.present and pg.kind == "a" for pg in await w.pages(p, "a")] == [True] * 4

    run(s)


def test_a_vma_unmapped_by_another_cpu_is_not_faulted(run: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "a", 4)
        await w.touch(p, "a", 0, 1)
        addr, _ = w.rng(p, "a", 1, 4)
        await w.on(1).munmap(w.mid, p, addr, 3 * 4096)
        calls = count_fast_calls(w, monkeypatch)
        with pytest.raises(KernelError) as err:
            await w.touch(p, "a", 2, 3)
        assert err.value.errno == "EFAULT"
        assert calls == fast(w, "miss")

    run(s)


def test_a_vma_made_read_only_by_another_cpu_refuses_the_write(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "a", 4)
        await w.touch(p, "a", 0, 1)
        await w.on(1).mprotect(w.mid, p, *w.rng(p, "a"), 1)  # PROT_READ
        calls = count_fast_calls(w, monkeypatch)
        with pytest.raises(KernelError) as err:
            await w.touch(p, "a", 1, 2)
        assert err.value.errno == "EFAULT"
        assert calls == fast(w, "miss")

    run(s)


def test_a_page_another_cpu_faulted_meanwhile_is_not_mapped_twice(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "a", 4)
        await w.touch(p, "a", 0, 1)
        await w.touch(p, "a", 1, 2, cpu=1)
        before = (await w.pages(p, "a"))[1].pfn
        calls = count_fast_calls(w, monkeypatch)
        assert await w.kernel.fault(w.mid, p, *w.rng(p, "a", 1, 2), True) == 0
        assert calls == fast(w, "miss")
        page = (await w.pages(p, "a"))[1]
        assert (page.pfn, page.mapcount) == (before, 1)

    run(s)
