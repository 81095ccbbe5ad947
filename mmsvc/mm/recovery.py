"""Recovery of what a dead CPU left half done (run from another CPU while the machine is
stopped: cpu_hotplug.stop_machine).

Linux has no counterpart: a CPU never dies in the middle of a syscall there (a hot-unplugged
CPU's tasks migrate and go on).  A worker process can die anywhere, so its in-flight syscalls
may have stopped between two of their store calls: pages allocated and counted but never
mapped, page locks and isolations never released, a COW claim or migration entry never
replaced, a page-cache slot reserved and never filled.  With every live CPU stopped (no
syscall in flight anywhere) the ground truth is exactly the page tables, the page caches and
the batches, so this recomputes from them what the kernel's counters must be (as the checker
of §8.5 does) and sets them:

* a COW claim or a migration entry names its page: restored as a present pte (the page is
  still there) or dropped (it was freed);
* mapcount = the ptes (pmds) mapping the page; refcount = mappings + page cache + batch
  entries + an Isolate-API isolation + recorded GUP pins (mm/gup.py); a page nobody
  references any more is freed (with the final clearance of §6 when it is still mlocked:
  ``unevictable_pgs_cleared``);
* page locks, freezes and the isolations of dead operations are dropped; a page left off
  every LRU without a pending lru_add goes back through lru_cache_add;
* a page still PG_mlocked (or counted) beyond its VM_LOCKED mappings gets munlock_page
  entries (the interrupted syscall's munlock) - never for the known exception X4;
* page-cache slots still reserved, or naming a page that is gone, are emptied.

Repairs are counted and logged; they change no vmstat event except through the normal paths
(munlock_page, the final clearance, lru-add).
"""

from __future__ import annotations

from collections import Counter

from mmsvc.mm.checker import PageRef, batch_entries, count_mappings, load_lruvec
from mmsvc.mm.filemap import parse_slot, swap_entry
from mmsvc.mm.gup import pin_refs
from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import Programs
from mmsvc.mm.mm_struct import Pte, load_mm, pt_install
from mmsvc.mm.page import PG, SUBPAGE_SHIFT, Page, PTEBit
from mmsvc.mm.rmap import large_folio_rules
from mmsvc.mm.swap import Op, Swap
from mmsvc.mm.swapfile import swap_info
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

STALE_FLAGS = int(PG.LOCKED | PG.FROZEN)


PageKey = tuple[int, bool, int, int]  # lruvec, anonymous, mapping, index


def _page_keys(pages: dict[PageRef, Page]) -> dict[PageKey, int]:
    return {(lv, p.has(PG.ANON), p.mapping, p.index): idx for (lv, idx), p in pages.items()}


def _marker_target(marker: Pte, pages: dict[PageRef, Page],
                   by_key: dict[PageKey, int]) -> Pte | None:
    """The pte a dead CPU's migration entry (or COW claim) maps again: its page, present,
    with what the entry kept (write, a THP subpage's number).  A subpage's entry whose THP
    was split since (split_huge_page died between the split and the remap) maps the small
    page that subpage became - the head, or the tail at the head's index + the number.
    None: the page is gone (the entry is dropped)."""
    page = pages.get((marker.lv, marker.idx))
    if page is None:
        return None
    keep = marker.bits & ~int(PTEBit.MIGRATION)
    if not marker.is_subpage or page.has(PG.HEAD):
        return Pte(marker.vpn, marker.idx, marker.lv, int(PTEBit.PRESENT) | keep)
    small = int(PTEBit.PRESENT) | (marker.bits & int(PTEBit.WRITE))
    sub = marker.bits >> SUBPAGE_SHIFT
    if sub == 0:
        return Pte(marker.vpn, marker.idx, marker.lv, small)
    tail = by_key.get((marker.lv, page.has(PG.ANON), page.mapping, page.index + sub))
    return None if tail is None else Pte(marker.vpn, tail, marker.lv, small)


async def _fix_pmd_marker(store: RedisStore, mm_key: str, marker: Pte, alive: bool) -> int:
    """A dead CPU's pmd migration entry: the THP mapped again by its pmd (the mapping is
    recounted below), or the entry dropped when the THP is gone."""
    stored = marker.bits & ~int(PTEBit.PMD)
    if alive:
        back = int(PTEBit.PRESENT) | (stored & int(PTEBit.WRITE))
        return int(await store.fcall("pmd_install", mm_key, marker.pmd, marker.idx, marker.lv,
                                     back, marker.idx, marker.lv, stored))
    return int(await store.fcall("pmd_zap", mm_key, marker.pmd, marker.idx, marker.lv,
                                 stored))


async def reconcile(store: RedisStore, swap: Swap, m: Machine) -> Counter[str]:
    """Repair machine m after a CPU died in it (every other CPU stopped).  Returns counts."""
    fixed: Counter[str] = Counter()
    pages: dict[PageRef, Page] = {}
    for lv in sorted(m.lruvecs.values()):
        _meta, lv_pages = await load_lruvec(store, m, lv)
        for idx, p in lv_pages.items():
            if p.flags & PG.INUSE:
                pages[(lv, idx)] = p

    # Page tables first: markers of dead COW claims and migrations, then every mapping.
    by_key = _page_keys(pages)
    mapcounts: Counter[PageRef] = Counter()
    pte_maps: Counter[PageRef] = Counter()
    locked: Counter[PageRef] = Counter()
    for raw_pid in await store.client.smembers(f"{keys.machine(m.mid)}:procs"):
        mm = await load_mm(store, m, int(raw_pid), allow_dead=True)
        flat = await store.fcall("pt_markers", mm.key)
        for i in range(0, len(flat), 4):
            vpn, idx, lv, bits = (int(x) for x in flat[i:i + 4])
            marker = Pte(vpn, idx, lv, bits)
            if marker.is_pmd:  # a pmd migration entry (migrate_thp.py)
                fixed["marker_restored" if (lv, idx) in pages else "marker_dropped"] += \
                    await _fix_pmd_marker(store, mm.key, marker, (lv, idx) in pages)
                continue
            back = _marker_target(marker, pages, by_key)
            if back is not None:
                fixed["marker_restored"] += not await pt_install(store, mm.key, [back],
                                                                 {vpn: marker})
            else:
                fixed["marker_dropped"] += not await pt_install(
                    store, mm.key, [Pte(vpn, 0, 0, 0)], {vpn: marker})
        await count_mappings(store, mm, mapcounts, pte_maps, locked, large_folio_rules(m))

    # Page caches: reservations of dead faults, entries naming pages that are gone.
    cache: set[PageRef] = set()
    for f in list(m.files.values()):
        fkey = keys.file(m.mid, f.fid)
        for raw_index, raw_val in (await store.client.hgetall(f"{fkey}:pc")).items():
            val = text(raw_val)
            if swap_entry(val) is not None:
                if val.startswith("busy|"):  # a dead fault was reading it back: undone
                    await store.fcall("pc_commit", fkey, val.split("|")[1], text(raw_index), "")
                    fixed["pagecache_swapin_dropped"] += 1
                continue  # a swapped-out shmem page: its slot holds it
            slot = parse_slot(val)
            if slot is not None:
                cp = pages.get(slot.ref)
                if cp is not None and cp.has(PG.PAGECACHE) and cp.mapping == f.fid \
                        and cp.index == slot.lookup_index(int(text(raw_index))):
                    cache.add(slot.ref)
                    continue
            await store.fcall("pc_delete", fkey, text(raw_index), val)
            fixed["pagecache_slot_emptied"] += 1

    # Batch entries (every CPU's: the dead one's were drained before).
    batch, lru_pending = await batch_entries(store, m)
    pins = await pin_refs(store, m)  # recorded GUP pins hold their references (mm/gup.py)
    # the swap cache holds one reference per page (mm/swapfile.py)
    swapcache = set((await swap_info(store, m)).cache.values()) if m.cfg.swap_pages else set()

    progs = Programs.empty()
    for ref, p in sorted(pages.items()):
        if p.has(PG.TAIL):
            continue
        lv, idx = ref
        clear = p.flags & STALE_FLAGS
        user = p.has(PG.USER_ISOLATED)
        if p.has(PG.ISOLATED) and not user:
            clear |= int(PG.ISOLATED)  # the isolator died: its reference is gone too
            fixed["isolation_dropped"] += 1
        in_cache = ref in cache
        if p.has(PG.PAGECACHE) and not in_cache:
            clear |= int(PG.PAGECACHE)
            fixed["pagecache_flag_dropped"] += 1
        if p.has(PG.SWAPCACHE) and ref not in swapcache:
            clear |= int(PG.SWAPCACHE)  # a swap-in or swap-out died before the cache held it
        expected = (mapcounts[ref] + pte_maps[ref] + int(in_cache) + batch[ref]
                    + int(user and p.has(PG.ISOLATED)) + pins[ref] + int(ref in swapcache))
        if (clear or p.mapcount != mapcounts[ref] or p.pte_mapcount != pte_maps[ref]
                or p.refcount != expected):
            fixed["counts_set"] += 1
            fixed["pages_freed"] += expected == 0
            progs.add(lv, ["J", idx, mapcounts[ref], pte_maps[ref], expected, clear])
        if expected == 0:
            continue
        ops: list[Op] = []
        on_lru = p.has(PG.LRU) or ref in lru_pending or (user and p.has(PG.ISOLATED))
        if not on_lru:
            ops.append(["C", idx])  # lru_cache_add: back on an LRU list
            fixed["lru_added"] += 1
        M = locked[ref]
        x1 = pins[ref] and not mapcounts[ref] and not pte_maps[ref] and not in_cache
        x3 = M == 0 and p.has(PG.RESTORED_MLOCKED)  # Linux keeps it mlocked too (§8.3 row 14)
        if (not p.has(PG.RESIDUE) and not p.has(PG.UNEVICTABLE_MAPPING) and p.has(PG.MLOCKED)
                and not x1 and not x3):  # X1: a pinned page keeps PG_mlocked until unpinned
            count = p.mlock_count if p.mlock_count >= 0 else 1
            extra = max(count - M, 1 if M == 0 else 0)
            ops += [["K", idx] for _ in range(extra)]  # the munlock that never ran
            fixed["munlock_entries"] += extra
        if ops:
            progs.add(lv, *ops)
    await progs.execute(swap, m)
    await swap.lru_add_drain(m)
    return fixed
