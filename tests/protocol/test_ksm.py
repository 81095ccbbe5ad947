"""KSM merge (mmsvc/mm/ksm.py; spec §3.2.1, §3.4.2, S28).

Every scenario ends with the §8.5 checker (the ``run`` fixture).
"""

from __future__ import annotations

from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.types import PageInfo
from tests.protocol.world import World, sub

P = 4096


async def two_locked_pages(w: World) -> tuple[int, int]:
    """P1's page K and P2's page B, each written and mlocked in its own VM_LOCKED vma."""
    p1, p2 = await w.proc(), await w.proc()
    for p, name in ((p1, "k"), (p2, "b")):
        await w.mmap(p, name, 1)
        await w.touch(p, name)
        await w.mlock(p, name)
    await w.drain_all()
    return p1, p2


async def merge(w: World, p1: int, n1: str, p2: int, n2: str) -> Any:
    return await w.kernel.ksm_merge(w.mid, p1, w.rng(p1, n1)[0], p2, w.rng(p2, n2)[0])


async def page(w: World, pid: int, name: str) -> PageInfo:
    return (await w.pages(pid, name))[0]


def test_s28_ksm_merge_in_a_vm_locked_vma(run: Any) -> None:
    """S28: mapping K in B's VM_LOCKED vma goes through page_add_anon_rmap, which reaches
    mlock_vma_page for KSM pages (cnt 2, no Δmlocked); removing B's mapping munlocks B
    (Δmunlocked 1, Δrescued 1) and B is freed."""

    async def s(w: World) -> None:
        p1, p2 = await two_locked_pages(w)
        b_pfn = (await page(w, p2, "b")).pfn
        assert sub(await w.delta(), mlocked=2, culled=2) == {"mlocked": 2, "culled": 2}
        res = await merge(w, p1, "k", p2, "b")
        assert res.new_ksm_page
        await w.drain()
        d = await w.delta()
        assert sub(d, mlocked=2, munlocked=1, rescued=1, cleared=0, nr_mlock=1, nr_unev=1,
                   inactive_anon=0) == {
            "mlocked": 2, "munlocked": 1, "rescued": 1, "cleared": 0, "nr_mlock": 1,
            "nr_unev": 1, "inactive_anon": 0}  # B freed: on no list any more
        k1, k2 = await page(w, p1, "k"), await page(w, p2, "b")
        assert k1.pfn == k2.pfn == res.kpfn != b_pfn
        assert (k2.ksm, k2.mlocked, k2.unevictable, k2.mlock_count, k2.mapcount) == (
            True, True, True, 2, 2)

    run(s)


def test_merge_into_an_existing_ksm_page_counts_each_locked_mapping(run: Any) -> None:
    """A third locked page merged into the KSM page: cnt 3; the KSM page is kept."""

    async def s(w: World) -> None:
        p1, p2 = await two_locked_pages(w)
        await merge(w, p1, "k", p2, "b")
        p3 = await w.proc()
        await w.mmap(p3, "c", 1)
        await w.touch(p3, "c")
        await w.mlock(p3, "c")
        await w.drain_all()
        res = await merge(w, p1, "k", p3, "c")
        assert not res.new_ksm_page
        await w.drain()
        assert (await page(w, p3, "c")).mlock_count == 3
        assert sub(await w.delta(), mlocked=3, munlocked=2, rescued=2, nr_mlock=1) == {
            "mlocked": 3, "munlocked": 2, "rescued": 2, "nr_mlock": 1}

    run(s)


def test_cow_breaks_ksm_sharing_in_locked_vmas(run: Any) -> None:
    """A write to a KSM page copies it (do_wp_page never reuses a KSM page): the copy is
    mlock_new_page'd (§3.3), the KSM page loses the mapping (munlock, §3.4); the last
    writer's COW munlocks and frees it."""

    async def s(w: World) -> None:
        p1, p2 = await two_locked_pages(w)
        res = await merge(w, p1, "k", p2, "b")
        await w.drain()
        await w.touch(p2, "b")  # COW: new page; K cnt 2 -> 1, no counter change for K
        await w.drain()
        b = await page(w, p2, "b")
        assert (b.pfn != res.kpfn, b.ksm, b.mlocked, b.mlock_count) == (True, False, True, 1)
        k = await page(w, p1, "k")
        assert (k.ksm, k.mlock_count, k.mapcount) == (True, 1, 1)
        assert sub(await w.delta(), mlocked=3, culled=3, munlocked=1) == {
            "mlocked": 3, "culled": 3, "munlocked": 1}
        await w.touch(p1, "k")  # the last mapping goes: K munlocked, rescued, freed
        await w.drain()
        assert (await page(w, p1, "k")).pfn != res.kpfn
        assert sub(await w.delta(), mlocked=4, munlocked=2, rescued=2, cleared=0, nr_mlock=2,
                   nr_unev=2, inactive_anon=0) == {
            "mlocked": 4, "munlocked": 2, "rescued": 2, "cleared": 0, "nr_mlock": 2,
            "nr_unev": 2, "inactive_anon": 0}

    run(s)


def test_cow_breaks_ksm_sharing_in_unlocked_vmas(run: Any) -> None:
    """Unlocked vmas: the merge and the COW change no mlock counter; the copy goes to the
    lru_add batch, the KSM page stays with its other mapping."""

    async def s(w: World) -> None:
        p1, p2 = await w.proc(), await w.proc()
        for p, name in ((p1, "k"), (p2, "b")):
            await w.mmap(p, name, 1)
            await w.touch(p, name)
        await w.drain_all()
        res = await merge(w, p1, "k", p2, "b")
        await w.drain()
        assert (await w.delta())["inactive_anon"] == 1  # B freed
        await w.touch(p2, "b")
        await w.drain()
        b, k = await page(w, p2, "b"), await page(w, p1, "k")
        assert (b.pfn != res.kpfn, b.ksm, b.lru_list) == (True, False, "inactive_anon")
        assert (k.pfn, k.ksm, k.mapcount, k.mlocked) == (res.kpfn, True, 1, False)
        d = await w.delta()
        assert sub(d, mlocked=0, munlocked=0, inactive_anon=2) == {
            "mlocked": 0, "munlocked": 0, "inactive_anon": 2}

    run(s)


def test_munmap_and_exit_of_ksm_sharers(run: Any) -> None:
    """munmap of one sharer lowers the count (no counter change); the last sharer's exit
    munlocks the KSM page (Δmunlocked, Δrescued) and frees it; Δcleared 0."""

    async def s(w: World) -> None:
        p1, p2 = await two_locked_pages(w)
        await merge(w, p1, "k", p2, "b")
        await w.drain()
        await w.munmap(p2, "b")
        await w.drain()
        k = await page(w, p1, "k")
        assert (k.mlock_count, k.mapcount) == (1, 1)
        assert sub(await w.delta(), munlocked=1, nr_mlock=1) == {"munlocked": 1, "nr_mlock": 1}
        await w.kernel.exit(w.mid, p1)
        await w.drain()
        assert sub(await w.delta(), munlocked=2, rescued=2, cleared=0, nr_mlock=0, nr_unev=0,
                   inactive_anon=0) == {
            "munlocked": 2, "rescued": 2, "cleared": 0, "nr_mlock": 0, "nr_unev": 0,
            "inactive_anon": 0}

    run(s)


def test_migrating_a_ksm_page_finds_every_mapping_through_the_stable_node(run: Any) -> None:
    """rmap_walk_ksm: migration unmaps the KSM page from both processes (its anon_vma would
    find only the first) and rebuilds cnt 2 on the new page, which stays a KSM page."""

    async def s(w: World) -> None:
        p1, p2 = await two_locked_pages(w)
        res = await merge(w, p1, "k", p2, "b")
        await w.drain()
        out = await w.kernel.migrate(w.mid, p1, *w.rng(p1, "k"), 1)
        assert out.migrated == 1
        await w.drain_all()
        k1, k2 = await page(w, p1, "k"), await page(w, p2, "b")
        assert k1.pfn == k2.pfn != res.kpfn
        assert (k2.ksm, k2.mlock_count, k2.mapcount, k2.node) == (True, 2, 2, 1)

    run(s, nodes=2)


def test_fork_child_shares_the_ksm_page_uncounted(run: Any) -> None:
    """fork copies the KSM page's pte (page_dup_rmap: not counted, the child vma is not
    VM_LOCKED); the child's COW leaves the parent's count alone."""

    async def s(w: World) -> None:
        p1, p2 = await two_locked_pages(w)
        res = await merge(w, p1, "k", p2, "b")
        await w.drain()
        child = await w.kernel.fork(w.mid, p1)
        w.maps[(child, "k")] = w.maps[(p1, "k")]
        assert (await page(w, child, "k")).pfn == res.kpfn
        await w.touch(child, "k")
        await w.drain()
        k = await page(w, p1, "k")
        assert (k.mlock_count, k.mapcount) == (2, 2)
        assert (await page(w, child, "k")).pfn != res.kpfn

    run(s)


async def state(w: World, *who: tuple[int, str]) -> tuple[Any, ...]:
    return (await w.kernel.vmstat(w.mid),
            *[await w.pages(pid, name) for pid, name in who])


@pytest.mark.parametrize("case", ["same_page", "second_is_ksm", "shared", "not_present",
                                  "unmapped", "zero_page", "pinned"])
def test_merge_errors_change_nothing(run: Any, case: str) -> None:
    async def s(w: World) -> None:
        p1, p2 = await two_locked_pages(w)
        a = (p1, w.rng(p1, "k")[0])
        b = (p2, w.rng(p2, "b")[0])
        errno = "EINVAL"
        if case == "same_page":
            b = a
        elif case == "second_is_ksm":
            p3 = await w.proc()
            await w.mmap(p3, "c", 1)
            await w.touch(p3, "c")
            await w.drain_all()
            await merge(w, p1, "k", p2, "b")
            a = (p3, w.rng(p3, "c")[0])
        elif case == "shared":
            await w.mmap(p2, "s", 1, shared=True)
            await w.touch(p2, "s")
            b = (p2, w.rng(p2, "s")[0])
        elif case == "not_present":
            await w.mmap(p2, "e", 1)
            b = (p2, w.rng(p2, "e")[0])
        elif case == "unmapped":
            b = (p2, w.rng(p2, "b")[0] + 64 * P)
            errno = "EFAULT"
        elif case == "zero_page":
            await w.mmap(p2, "z", 1)
            await w.touch(p2, "z", write=False)
            b = (p2, w.rng(p2, "z")[0])
        elif case == "pinned":
            await w.kernel.pin(w.mid, p2, *w.rng(p2, "b"), True)
            errno = "EBUSY"
        await w.drain_all()
        before = await state(w, (p1, "k"), (p2, "b"))
        with pytest.raises(KernelError) as err:
            await w.kernel.ksm_merge(w.mid, *a, *b)
        assert err.value.errno == errno
        assert await state(w, (p1, "k"), (p2, "b")) == before

    run(s)


def test_mlock_and_munlock_walks_reach_a_ksm_page_merged_from_another_address(run: Any) -> None:
    """mlock_pte_range mlocks whatever page the pte maps; a KSM page keeps the index of the
    page it was made from, so through another process's mapping at another address its
    index is not that address's linear index.  The walks' freed-page check (finding 16)
    must not take it for a reused page: mlock of P2's range mlocks it, munlock munlocks it
    (before the fix both skipped it: a missed mlock, then Q4 after the munlock)."""

    async def s(w: World) -> None:
        p1, p2 = await w.proc(), await w.proc()
        await w.mmap(p2, "pad", 3)  # B's address differs from K's
        for p, name in ((p1, "k"), (p2, "b")):
            await w.mmap(p, name, 1)
            await w.touch(p, name)
        await w.drain_all()
        assert w.rng(p1, "k")[0] != w.rng(p2, "b")[0]
        await merge(w, p1, "k", p2, "b")
        # read-only: mlock's populate would break COW of a writable private mapping (§3.7.2)
        await w.kernel.mprotect(w.mid, p2, *w.rng(p2, "b"), 1)
        await w.mlock(p2, "b")
        await w.drain()
        k = await page(w, p2, "b")
        assert (k.ksm, k.mlocked, k.unevictable, k.mlock_count) == (True, True, True, 1)
        await w.munlock(p2, "b")
        await w.drain()
        k = await page(w, p2, "b")
        assert (k.mlocked, k.unevictable) == (False, False)

    run(s)
