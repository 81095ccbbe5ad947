"""mm/rmap.c walks: find every pte mapping a page (spec §1.8, §5.2, §5.3).

A file page is found through its file's i_mmap tree (under i_mmap_rwsem held for read), an
anonymous page through its anon_vma (under the anon_vma lock).  Walkers read vm_flags without
the mmap_lock (§1.7.3): they see whatever single store mlock_vma_pages_range made last, which
is why the VM_IO guard works (§3.6).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from mmsvc.locks import Locks
from mmsvc.mm.errors import KernelError
from mmsvc.mm.machine import Machine
from mmsvc.mm.mm_struct import MmState, Pte, load_mm, pt_install, pt_read, vma_at
from mmsvc.mm.page import PG, PTRS_PER_PMD, SUBPAGE_SHIFT, Page, PTEBit
from mmsvc.mm.swap import Op, Swap
from mmsvc.mm.types import FinalClearance, MigrationDrain, MunlockHookPosition
from mmsvc.mm.vma import VM, VM_SPECIAL, Vma
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text


@dataclass(frozen=True)
class Mapping:
    """One pte that maps the page: the process, its VMA (flags as last stored) and the pte."""

    pid: int
    mm_key: str
    vma: Vma
    pte: Pte


async def pte_maps(store: RedisStore, mm_key: str, vpn: int, lv: int, idx: int) -> bool:
    """Does the pte at vpn (still) map page (lv, idx)?"""
    pte = (await pt_read(store, mm_key, vpn, vpn + 1)).get(vpn)
    return pte is not None and (pte.lv, pte.idx) == (lv, idx)


async def still_locked_mapping(store: RedisStore, mp: Mapping, lv: int, idx: int) -> bool:
    """After an rmap walker mlocked page (lv, idx) for mapping mp (read earlier, without the
    PTL): is mp's pte still that page, in a vma still VM_LOCKED?  Linux decides under the
    PTL, which a zap and a munlock walk (VM_LOCKED cleared first) also take; when this is
    False one of them slipped in between, and the walker munlocks in its place."""
    if not await pte_maps(store, mp.mm_key, mp.pte.vpn, lv, idx):
        return False
    vma = await vma_at(store, mp.mm_key, mp.pte.vpn)
    return vma is not None and vma.locked


async def vma_now(store: RedisStore, mm_key: str, vpn: int, seen: Vma) -> Vma:
    """The vma of an rmap walker's pte as stored now (``seen``: as the walk read it; kept if
    the process is gone).  Linux's walkers read vm_flags under the PTL, which an mlock's
    range walk takes too after storing VM_LOCKED (§3.6): a walker that removed a pte reads
    the flags after the removal, so that page_remove_rmap munlocks a page such a walk
    mlocked in between (a munlock of a page it never mlocked changes nothing, §2.6).
    One HGET when the vma the walk saw still covers vpn (the common case), else a scan."""
    raw = await store.client.hget(f"{mm_key}:vma", str(seen.id))
    if raw is not None:
        vma = Vma.from_json(raw)
        if vma.start <= vpn < vma.end:
            return vma
    return await vma_at(store, mm_key, vpn) or seen


async def set_pte_reading_vma(store: RedisStore, mp: Mapping, new: Pte, expect: Pte, *,
                              stop_if: int = 0) -> tuple[int, Vma]:
    """An rmap walker's pte change under the PTL, with its vma's flags as stored at that
    moment (vma_now), in one atomic step (lua ``ttu_pte``) while the vma the walk saw still
    covers the pte.  Returns (TTU_DONE, TTU_RACED: the pte was not ``expect``, or
    TTU_STOPPED: the vma has a flag of ``stop_if`` - nothing set then -, the vma)."""
    status, raw = await store.fcall(
        "ttu_pte", mp.mm_key, new.vpn, mp.vma.id, int(stop_if), int(new.idx), int(new.lv),
        int(new.bits), int(expect.idx), int(expect.lv), int(expect.bits))
    if int(status) != TTU_MOVED:
        return int(status), Vma.from_json(raw)
    vma = await vma_now(store, mp.mm_key, new.vpn, mp.vma)
    if vma.flags & stop_if:
        return TTU_STOPPED, vma
    if await pt_install(store, mp.mm_key, [new], {new.vpn: expect}):
        return TTU_RACED, vma
    return TTU_DONE, await vma_now(store, mp.mm_key, new.vpn, vma)


# the outcomes of lua ttu_pte: set, the pte raced, the vma has a stop_if flag, the vma moved
TTU_DONE, TTU_RACED, TTU_STOPPED, TTU_MOVED = 0, 1, 2, 3


def rmap_lock_key(m: Machine, page: Page) -> str:
    if page.has(PG.KSM):  # rmap_walk_ksm: the stable node's rmap items (mm/ksm.py)
        return f"{stable_node_key(m, page.mapping)}:lock"
    if page.has(PG.ANON):
        return f"{keys.anon_vma(m.mid, page.mapping)}:lock"
    return f"{keys.file(m.mid, page.mapping)}:i_mmap_rwsem"


def vma_rmap_lock_keys(m: Machine, vma: Vma) -> list[str]:
    """The rmap locks under which walkers find the pages vma maps: the anon_vma locks of
    its chain (its own pages and those it shares with fork relatives) and its file's
    i_mmap_rwsem, in one global order (sorted keys) so that two holders never deadlock."""
    out = [f"{keys.anon_vma(m.mid, av)}:lock" for av in (vma.anon_vma, *vma.anon_parents) if av]
    if vma.file:
        out.append(f"{keys.file(m.mid, vma.file)}:i_mmap_rwsem")
    return sorted(out)


async def anon_vma_add(store: RedisStore, m: Machine, avid: int, pid: int) -> None:
    """anon_vma_prepare / anon_vma_fork: pid's VMAs may map pages of this anon_vma."""
    await store.client.sadd(f"{keys.anon_vma(m.mid, avid)}:pids", pid)


def stable_node_key(m: Machine, nid: int) -> str:
    """A KSM page's stable node (mm/ksm.c): a set of rmap items ``anon_vma|index``, one per
    mapping merged into the page (its anon_vma and linear index there, as rmap_item's
    anon_vma and address), so that fork children sharing that anon_vma are found too."""
    return f"{keys.machine(m.mid)}:ksm:{nid}"


async def stable_node_items(store: RedisStore, m: Machine, nid: int) -> list[tuple[int, int]]:
    raw = await store.client.smembers(stable_node_key(m, nid))
    items = (text(r).split("|") for r in raw)
    return sorted((int(av), int(ix)) for av, ix in items)


async def _rmap_targets(store: RedisStore, m: Machine, page: Page) -> list[Page]:
    """What an rmap walk looks for: the page itself, or for a KSM page (rmap_walk_ksm) one
    anonymous "page" per rmap item of its stable node."""
    if not page.has(PG.KSM):
        return [page]
    return [replace(page, flags=page.flags & ~int(PG.KSM), mapping=av, index=ix)
            for av, ix in await stable_node_items(store, m, page.mapping)]


def _candidates_key(m: Machine, page: Page) -> tuple[str, str]:
    """Where candidate_pids reads (kind, key): in the slot of the page's rmap lock."""
    if page.has(PG.ANON):
        return "smembers", f"{keys.anon_vma(m.mid, page.mapping)}:pids"
    return "hkeys", f"{keys.file(m.mid, page.mapping)}:immap"


async def candidate_pids(store: RedisStore, m: Machine, page: Page) -> list[int]:
    """The processes whose vmas may map page: its anon_vma's, or its file's i_mmap."""
    kind, key = _candidates_key(m, page)
    raw = await (store.client.hkeys(key) if kind == "hkeys" else store.client.smembers(key))
    return sorted({int(text(p)) for p in raw})


async def file_mms(store: RedisStore, m: Machine, fid: int) -> list[MmState]:
    """The live address spaces in file fid's i_mmap, in pid order (exited ones skipped)."""
    pids = {int(text(f)) for f in await store.client.hkeys(f"{keys.file(m.mid, fid)}:immap")}
    out: list[MmState] = []
    for pid in sorted(pids):
        try:
            out.append(await load_mm(store, m, pid))
        except KernelError:
            continue  # exited: its VMAs are gone
    return out


def _covers(vma: Vma, page: Page) -> int | None:
    """The vpn at which vma would map page (vma_address), or None."""
    if page.has(PG.ANON):
        if not vma.may_map_anon(page.mapping):
            return None
    elif vma.file != page.mapping:
        return None
    if not vma.pgoff <= page.index < vma.pgoff + vma.pages:
        return None
    return vma.start + (page.index - vma.pgoff)


class Rmap:
    """rmap_walk on behalf of one CPU."""

    def __init__(self, store: RedisStore, locks: Locks) -> None:
        self.store = store
        self.locks = locks

    @asynccontextmanager
    async def locked(self, m: Machine, page: Page) -> AsyncIterator[list[int] | None]:
        """i_mmap_rwsem (or the anon_vma lock) for read, instrumented like every lock.
        Yields the walk's candidate processes when they came with the grant (one round
        trip for both; pass them to ``mappings``), else None."""
        peek = None if page.has(PG.KSM) else _candidates_key(m, page)
        async with self.locks.hold(rmap_lock_key(m, page), "r", peek=peek) as held:
            pids = None if held.peeked is None else sorted(int(p) for p in held.peeked)
            yield pids

    async def mappings(self, m: Machine, lv: int, idx: int, page: Page,
                       pids: list[int] | None = None) -> list[Mapping]:
        """Every pte mapping (lv, idx); the caller holds the rmap lock (``pids``: the
        candidates its acquisition read, for a page that is not KSM)."""
        out: list[Mapping] = []
        seen: set[tuple[int, int]] = set()
        for target in await _rmap_targets(self.store, m, page):
            if pids is None or page.has(PG.KSM):
                pids = await candidate_pids(self.store, m, target)
            for pid in pids:
                try:
                    mm: MmState = await load_mm(self.store, m, pid)
                except Exception:  # an exited process: nothing of it maps the page
                    continue
                for vma in mm.vmas:
                    vpn = _covers(vma, target)
                    if vpn is None or (pid, vpn) in seen:
                        continue
                    pte = (await pt_read(self.store, mm.key, vpn, vpn + 1)).get(vpn)
                    # a stale rmap item (its pte was COWed, zapped or swapped) maps nothing
                    if pte and not pte.bits & PTEBit.ZERO and (pte.lv, pte.idx) == (lv, idx):
                        seen.add((pid, vpn))
                        out.append(Mapping(pid, mm.key, vma, pte))
        return out


# ------------------------------------------------------------------------- rmap hooks ------
# The page-program ops that adding or removing a mapping implies.  This is where the two
# designs differ most: the rework counts every mapping of a VM_LOCKED vma (§3.2-§3.4), the
# legacy design mlocks new anonymous pages at fault, leaves file pages to populate's FOLL_MLOCK
# pass or to reclaim, and clears PG_mlocked when the last mapping goes (§9.3, §9.6, §9.8).

def _legacy(m: Machine) -> bool:
    return str(m.cfg.protocol) == "legacy"


def mlock_filter(vma: Vma) -> bool:
    """§2.8.1 mlock_vma_page: VM_LOCKED without VM_IO (the mlock walk's guard, §3.6)."""
    return (vma.flags & (VM.LOCKED | VM.IO)) == VM.LOCKED


def munlock_filter(vma: Vma) -> bool:
    """§2.8.2 munlock_vma_page: VM_LOCKED; VM_IO is not checked."""
    return bool(vma.flags & VM.LOCKED)


def new_anon_locked(m: Machine, vma: Vma) -> bool:
    """§2.9: VM_LOCKED and none of VM_SPECIAL -> mlock_new_page, else lru_cache_add.  With
    ``new_anon_checks_vm_special`` off (§10.2.8: Hugh's "overcautious" check dropped),
    VM_LOCKED alone decides: a vma that gained VM_MIXEDMAP after mmap (vm_insert_page sets it
    lazily) then mlocks its new anonymous pages."""
    if not m.cfg.new_anon_checks_vm_special:
        return bool(vma.flags & VM.LOCKED)
    return bool(vma.flags & VM.LOCKED) and not vma.flags & VM_SPECIAL


def page_add_rmap_ops(m: Machine, vma: Vma, ref: int) -> list[list[int | str]]:
    """page_add_{anon,file}_rmap: mapcount and reference, then (rework) mlock_vma_page."""
    if not _legacy(m) and mlock_filter(vma):
        return [["M", ref], ["L", ref]]
    return [["M", ref]]


def page_remove_rmap_ops(m: Machine, vma: Vma, ref: int) -> list[list[int | str]]:
    """page_remove_rmap: (rework) munlock_vma_page at the end, whatever the mapcount (§3.4);
    (legacy) clear_page_mlock when the mapcount reached zero (§9.8)."""
    if _legacy(m):
        return [["U", ref], ["Q", ref]]
    remove: list[list[int | str]] = [["U", ref]]
    if m.cfg.final_clearance == FinalClearance.MAPCOUNT_ZERO:
        # §6.2, §10.1 final_clearance: clear_page_mlock as the last mapping goes, not at the
        # final free; with the hook at the end it beats the batched munlock to PG_mlocked.
        remove.append(["Q", ref])
    if not munlock_filter(vma):
        return remove
    # §3.4.1 munlock_hook_position: "end or beginning? unimportant" [04/13] - but a munlock
    # run at once (batch length 1, mass_only) sees the mapping still counted at the start.
    if m.cfg.munlock_hook_position == MunlockHookPosition.START:
        return [["K", ref], *remove]
    return [*remove, ["K", ref]]


def large_folio_rules(m: Machine) -> bool:
    """Linux 6.5+'s large-folio mlock rules (machine setting ``large_folio_mlock``)."""
    return m.cfg.large_folio_mlock and not _legacy(m)


def pte_unmap_ops(m: Machine, vma: Vma, pte: Pte) -> list[list[int | str]]:
    """page_remove_rmap for whatever the pte maps: a THP subpage's pte mapping is never
    counted (§3.9) - with ``large_folio_mlock`` its removal from a VM_LOCKED vma munlocks
    the THP (Linux 6.5+ __folio_remove_rmap: munlock_vma_folio at every level); a pmd
    mapping or a small page goes through the hook."""
    if pte.is_subpage:
        if large_folio_rules(m) and munlock_filter(vma):
            return [["u", pte.idx], ["K", pte.idx]]
        return [["u", pte.idx]]
    return page_remove_rmap_ops(m, vma, pte.idx)


def subpage_runs(ptes: list[Pte]) -> list[list[Pte]]:
    """The ptes (ascending vpn) cut into runs: consecutive ptes mapping consecutive subpages
    of one THP within one page table (folio_pte_batch, folio_mlock_step) - or one pte
    alone (a small page, a pmd, the zero page)."""
    runs: list[list[Pte]] = []
    for p in ptes:
        last = runs[-1][-1] if runs else None
        if (last is not None and p.is_subpage and last.is_subpage
                and (p.lv, p.idx) == (last.lv, last.idx) and p.vpn == last.vpn + 1
                and p.bits >> SUBPAGE_SHIFT == (last.bits >> SUBPAGE_SHIFT) + 1
                and p.vpn // PTRS_PER_PMD == last.vpn // PTRS_PER_PMD):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def zap_ops(m: Machine, vma: Vma, ptes: list[Pte]) -> list[tuple[int, list[list[int | str]]]]:
    """zap_pte_range's page_remove_rmap calls for removed ptes (ascending vpn): per lruvec,
    the ops of each; a run of one THP's subpage ptes is one folio_remove_rmap_ptes, so with
    ``large_folio_mlock`` it munlocks once, after the run (not per pte: a THP two VM_LOCKED
    vmas mlocked stays mlocked when one of them goes)."""
    out: list[tuple[int, list[list[int | str]]]] = []
    for run in subpage_runs(ptes):
        head = run[0]
        if head.is_subpage:
            ops: list[list[int | str]] = [["u", p.idx] for p in run]
            if large_folio_rules(m) and munlock_filter(vma):
                ops.append(["K", head.idx])
            out.append((head.lv, ops))
        else:
            out.append((head.lv, pte_unmap_ops(m, vma, head)))
    return out


def new_anon_ops(m: Machine, vma: Vma, ref: int) -> list[list[int | str]]:
    """A new anonymous page: page_add_new_anon_rmap, then lru_cache_add_inactive_or_unevictable
    (rework: mlock_new_page, §2.9); legacy: PG_mlocked set now, culled by lru-add (§9.3.3)."""
    if not new_anon_locked(m, vma):
        return [["M", ref], ["C", ref]]
    if _legacy(m):
        return [["M", ref], ["X", ref], ["C", ref]]
    return [["M", ref], ["N", ref]]


async def try_to_unmap_ignore_mlock(store: RedisStore, swap: Swap, m: Machine, lv: int,
                                    idx: int, maps: list[Mapping]) -> int:
    """try_to_unmap(TTU_IGNORE_MLOCK | TTU_SPLIT_HUGE_PMD) of page (lv, idx), whose rmap
    lock the caller holds: every mapping goes, VM_LOCKED or not - a pmd (page_remove_rmap
    compound: a THP's munlock), a subpage's pte (uncounted, §3.9) or a small page's pte
    (page_remove_rmap + munlock_vma_page) - each with its reference, and after each removal
    from a VM_LOCKED vma the local mlock batch is drained (§4.2.2: no mlocked page left in
    a batch to fail the caller's freeze; ``migration_drain`` places that drain as for
    migration).  A mapping that changed meanwhile is not this walk's (page_vma_mapped_walk
    re-checks under the PTL).  Returns the mappings removed."""
    mode = m.cfg.migration_drain
    done = 0
    for mp in maps:
        if mp.pte.is_pmd:
            bits = mp.pte.bits & ~int(PTEBit.PMD)
            gone = int(await store.fcall("pmd_zap", mp.mm_key, mp.pte.pmd, mp.pte.idx,
                                         mp.pte.lv, bits))
        else:
            gone = not await pt_install(store, mp.mm_key, [Pte(mp.pte.vpn, 0, 0, 0)],
                                        {mp.pte.vpn: mp.pte})
        if not gone:
            continue
        done += 1
        # the flags as stored after the removal (an mlock may have walked this pte since)
        vma = await vma_now(store, mp.mm_key, mp.pte.vpn, mp.vma)
        ops: list[Op] = [*pte_unmap_ops(m, vma, mp.pte), ["P", idx]]
        await swap.run(m, lv, ops)
        if mode == MigrationDrain.AFTER_EACH_LOCKED_UNMAP and vma.locked:
            await swap.lru_add_drain(m)  # mlock_drain_local()
    if mode == MigrationDrain.RMAP_WALK_LEVEL and done:
        await swap.lru_add_drain(m)
    return done
