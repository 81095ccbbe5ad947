"""mm/swapfile.c + mm/swap_state.c: the machine's swap area and its swap cache.

A machine has ``swap_pages`` slots (0: no swap, and then nothing here is ever called).  The
store side is ``lua/swapfile.lua`` under the machine's tag (``{m<id>}:swap*``):

* a slot's count is the number of swap ptes naming it (swap_map[]; fork shares an entry:
  swap_duplicate) - or 1 for a swapped-out shmem page, whose page cache slot names it
  (``swap|slot``: vmscan.py writes shmem pages out, memory.py reads them back, truncation
  frees the entry) -; the swap cache maps a slot to the page read in or being written out
  (SWAP_HAS_CACHE, PG_swapcache, one page reference);
* reclaim (vmscan.py) allocates a slot and adds the page to the swap cache (add_to_swap),
  replaces each pte by a swap entry (try_to_unmap_one), writes the page (pswpout) and frees it
  from the swap cache (__remove_mapping);
* a fault on a swap entry (memory.py ``do_swap_page``) finds the page in the swap cache or reads
  it into a new one (pswpin) and maps it with page_add_anon_rmap (§3.2.1);
* the last swap pte of a slot going (swap-in, zap) frees the slot; a page still in the swap
  cache for it leaves the cache then (free_swap_and_cache / try_to_free_swap; this emulator
  frees swap as eagerly as Linux does when swap is full, ``vm_swap_full()``) - unless reclaim
  (or migration) holds the page locked or frozen: then the page and its slot stay cached and
  their owner frees them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mmsvc.mm.machine import Machine
from mmsvc.mm.mm_struct import Pte, load_mm, pt_install
from mmsvc.mm.page import PG, Page, PTEBit
from mmsvc.mm.swap import Swap
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

PageRef = tuple[int, int]  # (lruvec id, index)


def swap_key(m: Machine) -> str:
    return f"{keys.machine(m.mid)}:swap"


def swap_pte(vpn: int, slot: int) -> Pte:
    """The non-present pte that names a swap slot (pte_to_swp_entry's inverse)."""
    return Pte(vpn, slot, 0, int(PTEBit.SWAP))


def _ref(lv: int, idx: int) -> str:
    return f"{lv}|{idx}"


def _parse(ref: bytes | str) -> PageRef:
    lv, idx = text(ref).split("|")
    return int(lv), int(idx)


@dataclass
class SwapInfo:
    total: int
    used: int  # allocated slots (swap ptes or the swap cache name them)
    pswpin: int
    pswpout: int
    counts: dict[int, int]  # slot -> swap ptes
    cache: dict[int, PageRef]  # slot -> page in the swap cache


async def swap_ptes(store: RedisStore, mm_key: str, start: int, end: int) -> dict[int, int]:
    """vpn -> slot of the swap entries in [start, end)."""
    flat = await store.fcall("pt_swap_read", mm_key, start, end)
    return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


async def get_swap_page(store: RedisStore, m: Machine, lv: int, idx: int,
                        dups: int = 0) -> int:
    """add_to_swap's slot: allocated and the page entered in the swap cache; 0 if full.
    ``dups``: swap ptes about to name it (swap_duplicate of each, done at once)."""
    return int(await store.fcall("swap_alloc", swap_key(m), m.cfg.swap_pages, _ref(lv, idx),
                                 dups))


async def nr_swap_pages(store: RedisStore, m: Machine) -> int:
    """get_nr_swap_pages: free slots (never handed out, or freed)."""
    k = swap_key(m)
    pipe = store.client.pipeline(transaction=False)
    pipe.hget(k, "top")
    pipe.llen(f"{k}:free")
    top, free = await pipe.execute()
    return m.cfg.swap_pages - int(top or 0) + int(free)


async def swap_count(store: RedisStore, m: Machine, slot: int) -> int:
    """__swap_count: the swap ptes naming slot."""
    return int(await store.client.hget(f"{swap_key(m)}:map", str(slot)) or 0)


async def swap_duplicate(store: RedisStore, m: Machine, slot: int, n: int = 1) -> None:
    await store.fcall("swap_dup", swap_key(m), slot, n)


async def swapcache_slot(store: RedisStore, m: Machine, lv: int, idx: int) -> int:
    """folio->swap of a PG_swapcache page (0 if it left the cache)."""
    return int(await store.client.hget(f"{swap_key(m)}:rev", _ref(lv, idx)) or 0)


async def lookup_swap_cache(store: RedisStore, m: Machine, slot: int) -> PageRef | None:
    raw = await store.client.hget(f"{swap_key(m)}:cache", str(slot))
    return None if raw is None else _parse(raw)


async def add_to_swap_cache(store: RedisStore, m: Machine, slot: int, lv: int,
                            idx: int) -> PageRef | None:
    """A page read in for slot enters the swap cache: returns the cached page (this one, or
    one a racing swap-in added first), None when the slot went free meanwhile."""
    raw = await store.fcall("swap_cache_add", swap_key(m), slot, _ref(lv, idx))
    return _parse(raw) if text(raw) else None


async def delete_from_swap_cache(store: RedisStore, m: Machine, slot: int, ref: PageRef, *,
                                 written: bool = False) -> bool:
    """The page leaves the swap cache (its slot goes free if no swap pte names it); False when
    it was not slot's cached page.  Its PG_swapcache and the cache's reference are the
    caller's to drop (reclaim does that itself, on the frozen page)."""
    return bool(int(await store.fcall("swap_cache_del", swap_key(m), slot, _ref(*ref),
                                      1 if written else 0)))


async def try_to_free_swap(store: RedisStore, swap: Swap, m: Machine, slot: int,
                           ref: PageRef) -> bool:
    """free_swap_and_cache's folio_free_swap for a slot no swap pte names any more: the page
    leaves the swap cache - only with a reference (folio_try_get fails on a page reclaim froze
    to free it) and its lock (folio_trylock fails while reclaim or migration works on it).
    Otherwise the page stays cached, the slot with it, and its owner frees both
    (__remove_mapping, or a later reclaim): deleting it under reclaim would put the frozen
    page's references twice."""
    lv, idx = ref
    if (await swap.run(m, lv, [["pin", idx, 1]])).failed:
        return False
    if (await swap.run(m, lv, [["O", idx]])).failed:
        await swap.run(m, lv, [["P", idx]])
        return False
    if not await delete_from_swap_cache(store, m, slot, ref):
        await swap.run(m, lv, [["F", idx, 0, int(PG.LOCKED)], ["P", idx]])  # reused meanwhile
        return False
    await swap.run(m, lv, [["F", idx, 0, int(PG.SWAPCACHE | PG.LOCKED)], ["P", idx], ["P", idx]])
    return True


async def free_swap_and_cache(store: RedisStore, swap: Swap, m: Machine,
                              slots: list[int]) -> None:
    """swap_free for swap entries that went (zap of a swap pte, swap-in); a slot left with only
    its swap cache page is freed with it (try_to_free_swap)."""
    if not slots:
        return
    flat = await store.fcall("swap_free", swap_key(m), *slots)
    for i in range(0, len(flat), 2):
        await try_to_free_swap(store, swap, m, int(flat[i]), _parse(flat[i + 1]))


async def copy_swap_ptes(store: RedisStore, m: Machine, parent_key: str, child_key: str,
                         start: int, end: int) -> None:
    """fork's copy_nonpresent_pte: the child gets the parent's swap entries of [start, end),
    each slot one more reference (swap_duplicate, before the pte is set)."""
    if not m.cfg.swap_pages:
        return
    entries = await swap_ptes(store, parent_key, start, end)
    for slot in entries.values():
        await swap_duplicate(store, m, slot)
    await pt_install(store, child_key, [swap_pte(v, s) for v, s in entries.items()], {})


async def shmem_swapin_done(store: RedisStore, swap: Swap, m: Machine,
                            slots: list[int]) -> None:
    """shmem_swapin_folio's end for pages read back from these slots and published in the
    page cache: pswpin counted, each page cache swap entry's count freed (swap_free; a slot
    left with only a swap cache page - a reclaim still writing it out - goes with it)."""
    flat = await store.fcall("swap_read", swap_key(m), *slots)
    for i in range(0, len(flat), 2):
        await try_to_free_swap(store, swap, m, int(flat[i]), _parse(flat[i + 1]))


async def swap_info(store: RedisStore, m: Machine) -> SwapInfo:
    """The area's state for views (meminfo, vmstat) and the checker (§8.5)."""
    k = swap_key(m)
    pipe = store.client.pipeline(transaction=False)
    pipe.hgetall(k)
    pipe.hgetall(f"{k}:map")
    pipe.hgetall(f"{k}:cache")
    head, counts, cache = await pipe.execute()
    h = {text(a): int(b) for a, b in head.items()}
    slots = {int(a): int(b) for a, b in counts.items()}
    cached = {int(a): _parse(b) for a, b in cache.items()}
    return SwapInfo(m.cfg.swap_pages, len(slots.keys() | cached.keys()), h.get("pswpin", 0),
                    h.get("pswpout", 0), slots, cached)


async def check_swap(store: RedisStore, m: Machine, live: dict[PageRef, Page],
                     v: list[str], shmem_entries: list[int]) -> set[PageRef]:
    """§8.5 for the swap area (S1-S3); returns the pages the swap cache holds (one reference
    each, A6).  S1: every slot's count is the number of swap ptes naming it (and page cache
    entries of swapped-out shmem pages: ``shmem_entries``), and every swap pte names an
    allocated slot; S2: the swap cache and PG_swapcache agree; S3: slots in use never
    exceed swap_pages."""
    info = await swap_info(store, m)
    ptes: Counter[int] = Counter()
    pids = [int(p) for p in await store.client.smembers(f"{keys.machine(m.mid)}:procs")]
    for pid in pids:
        mm = await load_mm(store, m, pid, allow_dead=True)
        for vma in mm.vmas:
            ptes.update((await swap_ptes(store, mm.key, vma.start, vma.end)).values())
    ptes.update(shmem_entries)
    for slot in sorted(ptes.keys() | info.counts.keys()):
        if ptes[slot] != info.counts.get(slot, 0) or slot not in info.counts:
            v.append(f"S1 swap slot {slot}: count {info.counts.get(slot, 'free')} != "
                     f"{ptes[slot]} swap ptes and shmem swap entries")
    for slot in sorted(info.cache.keys() - info.counts.keys()):
        v.append(f"S2 swap slot {slot}: in the swap cache but not allocated")
    cached = set(info.cache.values())
    for slot, ref in sorted(info.cache.items()):
        page = live.get(ref)
        if page is None or not page.has(PG.SWAPCACHE):
            v.append(f"S2 swap slot {slot}: cached page {ref[0]}:{ref[1]} is not PG_swapcache")
    for ref, page in sorted(live.items()):
        if page.has(PG.SWAPCACHE) and ref not in cached:
            v.append(f"S2 page {ref[0]}:{ref[1]}: PG_swapcache but not in the swap cache")
    if info.used > m.cfg.swap_pages:
        v.append(f"S3 {info.used} swap slots in use > swap_pages {m.cfg.swap_pages}")
    return cached
