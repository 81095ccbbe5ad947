"""mm/ksm.c: merging two identical anonymous pages into one KSM page (spec §3.2.1, S28).

The emulator has no ksmd scanning MADV_MERGEABLE areas and no page contents: a merge request
*is* ksmd deciding that two pages are identical.  It does what try_to_merge_two_pages does
(5.17, after the rework):

1. the first page, unless already a KSM page, becomes one (try_to_merge_one_page with no
   kpage: write_protect_page, then set_page_stable_node; ``PG.KSM``, its mapping becomes its
   stable node, whose rmap items - ``anon_vma|index`` - let rmap walks find every mapping:
   ``rmap.py`` rmap_walk_ksm);
2. the second page is write-protected (write_protect_page: its pte cleared, then the page's
   references must be exactly its mappings + ksmd's own, else the merge fails) and replaced
   (replace_page): ``page_add_anon_rmap(kpage)`` - which since [04/13] reaches
   ``mlock_vma_page`` for KSM pages too (§3.2.1: no explicit mlock after the merge any more,
   §3.2.3) - then the read-only pte of the KSM page, then ``page_remove_rmap(page)`` with its
   ``munlock_vma_page`` (§3.4.2, KSM replace_page caller) and the mapping's ``put_page``: the
   old page is freed when its last reference (the munlock entry's) goes.

A write fault on a KSM page is a COW (do_wp_page never reuses a KSM page, ``memory.py``): a
new anonymous page (mlock_new_page in a VM_LOCKED vma, §3.3) and the KSM page loses that
mapping (munlock in a VM_LOCKED vma, §3.4).  Rmap items are not removed when a mapping goes
(ksmd prunes them on its next scan); walkers check the pte, so a stale item maps nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.kernel import KsmMergeResult
from mmsvc.mm.machine import Machine, new_id
from mmsvc.mm.memory import read_pages
from mmsvc.mm.mm_struct import MmState, Pte, pt_install, pt_read
from mmsvc.mm.page import PG, Page, PTEBit
from mmsvc.mm.rmap import page_add_rmap_ops, page_remove_rmap_ops, stable_node_key
from mmsvc.mm.swap import Op, Swap
from mmsvc.mm.vma import VM, VM_SPECIAL, Vma
from mmsvc.store.redis_store import RedisStore

# ksm_madvise(MADV_MERGEABLE) refuses these VMAs: only private anonymous memory merges
UNMERGEABLE = VM.SHARED | VM_SPECIAL | VM.HUGETLB


@dataclass(frozen=True)
class Target:
    """One side of a merge: the pte mapping a private anonymous page and the page."""

    mm: MmState
    vma: Vma
    pte: Pte
    page: Page

    @property
    def ref(self) -> tuple[int, int]:
        return self.pte.lv, self.pte.idx


async def merge_target(store: RedisStore, m: Machine, mm: MmState, vpn: int) -> Target:
    """The page at vpn, if KSM could merge it: EFAULT for an unmapped address, EINVAL for
    anything but a present private anonymous small page (shared, special or hugetlb VMAs,
    an empty pte, the zero page, a swap entry, a THP - ksmd would split that first)."""
    vma = mm.find(vpn)
    if vma is None:
        raise KernelError("EFAULT", f"address {vpn * 4096:#x} not mapped")
    if vma.flags & UNMERGEABLE:
        raise einval("KSM merges only private anonymous memory (not shared, special, hugetlb)")
    pte = (await pt_read(store, mm.key, vpn, vpn + 1)).get(vpn)
    if pte is None or pte.bits & PTEBit.ZERO:
        raise einval(f"no anonymous page present at {vpn * 4096:#x}")
    if pte.is_pmd or pte.is_subpage:
        raise einval("transparent huge pages are not merged (ksmd splits them first)")
    page = (await read_pages(store, m, [(pte.lv, pte.idx)]))[0]
    if not page.has(PG.ANON) or not page.has(PG.INUSE):
        raise einval(f"the page at {vpn * 4096:#x} is not anonymous")
    return Target(mm, vma, pte, page)


def expected_refs(page: Page) -> int:
    """write_protect_page: page_mapcount + swapcache, without ksmd's own reference."""
    return page.mapcount + (1 if page.has(PG.SWAPCACHE) else 0)


def check_merge(m: Machine, first: Target, second: Target) -> None:
    """Everything that can refuse the merge, before anything changes."""
    if first.ref == second.ref:
        raise einval("both addresses map the same page")
    if second.page.has(PG.KSM):
        raise einval("the second page is already a KSM page (merge it as the first)")
    if str(m.cfg.protocol) == "legacy" and (first.vma.locked or second.vma.locked):
        # pre-rework try_to_merge_one_page munlocked the old page and mlocked the KSM page
        # explicitly (§9.3.5); not emulated
        raise KernelError("ENOTSUP", "KSM merge in a VM_LOCKED vma under the legacy protocol")
    for t in (first, second):
        if t.page.refcount != expected_refs(t.page):
            # ksmd would skip the page this round: pinned, isolated or in a CPU's batch
            raise KernelError("EBUSY", f"page at {t.pte.vpn * 4096:#x} has extra references")


class Ksm:
    """try_to_merge_two_pages on behalf of one CPU (the caller holds both mmap_locks for
    read, and has drained the LRU batches as ksmd does at the start of a scan)."""

    def __init__(self, store: RedisStore, swap: Swap) -> None:
        self.store = store
        self.swap = swap

    async def merge(self, m: Machine, first: Target, second: Target) -> KsmMergeResult:
        check_merge(m, first, second)
        k_lv, k_idx = first.ref
        await self._grab(m, first)
        try:
            await self._grab(m, second)
        except BaseException:
            await self._release(m, first)
            raise
        try:
            new_ksm = not first.page.has(PG.KSM)
            if new_ksm:
                await self._make_ksm_page(m, first)
            try:
                await self._replace_page(m, second, (k_lv, k_idx))
            except BaseException:
                if new_ksm:  # the second page could not be merged: nothing changes
                    await self._unmake_ksm_page(m, first)
                raise
        finally:
            await self._release(m, second)
            await self._release(m, first)
        return KsmMergeResult((k_lv << 32) | k_idx, new_ksm)

    async def _grab(self, m: Machine, t: Target) -> None:
        """ksmd's reference (follow_page) and trylock_page: a page being freed, frozen or
        locked by reclaim/migration is skipped (EAGAIN)."""
        lv, idx = t.ref
        res = await self.swap.run(m, lv, [["pin", idx, 1]])
        if res.failed:
            raise KernelError("EAGAIN", "page being freed or migrated")
        res = await self.swap.run(m, lv, [["O", idx]])
        if res.failed:
            await self.swap.run(m, lv, [["P", idx]])
            raise KernelError("EAGAIN", "page locked by someone else")

    async def _release(self, m: Machine, t: Target) -> None:
        lv, idx = t.ref
        await self.swap.run(m, lv, [["F", idx, 0, int(PG.LOCKED)], ["P", idx]])

    async def _write_protect(self, m: Machine, t: Target, clear: bool) -> Pte:
        """write_protect_page: clear the pte (clear=True: replace_page follows; the pte is
        held busy like a COW's claim) or make it read-only, then check that the page has no
        references beyond its mappings and ksmd's (a GUP pin taken meanwhile): if it has,
        the pte is restored and the merge fails."""
        lv, idx = t.ref
        bits = int(PTEBit.MIGRATION) if clear else t.pte.bits & ~int(PTEBit.WRITE)
        new = Pte(t.pte.vpn, idx, lv, bits)
        if await pt_install(self.store, t.mm.key, [new], {t.pte.vpn: t.pte}):
            raise KernelError("EAGAIN", "the pte changed under the merge")
        page = (await read_pages(self.store, m, [(lv, idx)]))[0]
        if page.refcount != expected_refs(page) + 1:
            await pt_install(self.store, t.mm.key, [t.pte], {t.pte.vpn: new})
            raise KernelError("EAGAIN", "the page gained a reference (pinned) during the merge")
        return new

    async def _make_ksm_page(self, m: Machine, t: Target) -> None:
        """try_to_merge_one_page(page, NULL) + stable_tree_insert: the page's first rmap
        item (its anon_vma and index), then PageKsm with the stable node as its mapping."""
        await self._write_protect(m, t, clear=False)
        nid = await new_id(self.store, m.mid, "ksm")
        await self.store.client.sadd(stable_node_key(m, nid),
                                     f"{t.page.mapping}|{t.page.index}")
        lv, idx = t.ref
        await self.swap.run(m, lv, [["ksm", idx, nid, 1]])

    async def _unmake_ksm_page(self, m: Machine, t: Target) -> None:
        lv, idx = t.ref
        nid = (await read_pages(self.store, m, [t.ref]))[0].mapping
        await self.swap.run(m, lv, [["ksm", idx, t.page.mapping, 0]])
        await self.store.client.delete(stable_node_key(m, nid))
        protected = Pte(t.pte.vpn, idx, lv, t.pte.bits & ~int(PTEBit.WRITE))
        await pt_install(self.store, t.mm.key, [t.pte], {t.pte.vpn: protected})

    async def _replace_page(self, m: Machine, t: Target, kpage: tuple[int, int]) -> None:
        """replace_page: map the KSM page read-only where t's page was (§3.2.1: its anon
        rmap add mlocks it in a VM_LOCKED vma), then page_remove_rmap the old page (§3.4.2:
        munlock in a VM_LOCKED vma) and drop the mapping's reference."""
        busy = await self._write_protect(m, t, clear=True)
        k_lv, k_idx = kpage
        knode = (await read_pages(self.store, m, [kpage]))[0].mapping
        await self.store.client.sadd(stable_node_key(m, knode),
                                     f"{t.page.mapping}|{t.page.index}")
        add: list[Op] = [*page_add_rmap_ops(m, t.vma, k_idx)]
        await self.swap.run(m, k_lv, add)
        ksm_pte = Pte(t.pte.vpn, k_idx, k_lv, int(PTEBit.PRESENT))  # mk_pte: read-only
        await pt_install(self.store, t.mm.key, [ksm_pte], {t.pte.vpn: busy})
        lv, idx = t.ref
        await self.swap.run(m, lv, [*page_remove_rmap_ops(m, t.vma, idx), ["P", idx]])
