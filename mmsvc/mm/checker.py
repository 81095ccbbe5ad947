"""The consistency checker of spec §8.5: A1-A8 always, Q1-Q8 when quiescent; S1-S3 for the
swap area on a machine with swap (mm/swapfile.py).

It reads the whole machine (every struct page, list, batch, page table and VMA) and recomputes
what the counters and counts must be.  Violations are reported, never repaired.
"""

from __future__ import annotations

from collections import Counter

from mmsvc.mm.filemap import page_cache
from mmsvc.mm.gup import pin_refs
from mmsvc.mm.machine import Machine
from mmsvc.mm.mm_struct import MmState, load_mm, pt_read
from mmsvc.mm.page import (
    CHUNK_PAGES,
    LRU,
    PG,
    PTRS_PER_PMD,
    RECORD_SIZE,
    VMSTAT_EVENTS,
    Page,
    PTEBit,
)
from mmsvc.mm.rmap import large_folio_rules
from mmsvc.mm.swapfile import check_swap
from mmsvc.mm.types import CheckReport
from mmsvc.mm.vma import VM
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

PageRef = tuple[int, int]  # (lruvec id, index)


async def load_lruvec(
    store: RedisStore, m: Machine, lv: int
) -> tuple[dict[str, int], dict[int, Page]]:
    """A lruvec's metadata and pages, read in one atomic call."""
    res = await store.fcall("mm_dump", m.lv_key(lv))
    flat = res[0]
    meta = {text(flat[i]): int(float(flat[i + 1])) for i in range(0, len(flat), 2)}
    top = meta.get("top", 0)
    pages: dict[int, Page] = {}
    for c, raw in enumerate(res[1:]):
        raw = raw or b""
        for i in range(len(raw) // RECORD_SIZE):
            idx = c * CHUNK_PAGES + i
            if idx < top:
                pages[idx] = Page.decode(raw[i * RECORD_SIZE:(i + 1) * RECORD_SIZE])
    return meta, pages


async def batch_entries(store: RedisStore,
                        m: Machine) -> tuple[Counter[PageRef], set[PageRef]]:
    """Every CPU's pending batch entries: references per page, and the pages waiting in an
    lru_add batch (they will be put on an LRU list)."""
    refs: Counter[PageRef] = Counter()
    lru_pending: set[PageRef] = set()
    cpus = [text(c) for c in await store.client.smembers(f"{keys.machine(m.mid)}:cpus")]
    for lv in m.lruvecs.values():
        for cpu in cpus:
            for which in ("mlb", "lab"):
                for e in await store.client.lrange(f"{m.lv_key(lv)}:{which}:{cpu}", 0, -1):
                    ref = (lv, int(text(e).split("|")[0]))
                    refs[ref] += 1
                    if which == "lab":
                        lru_pending.add(ref)
    return refs, lru_pending


async def count_mappings(store: RedisStore, mm: MmState, mapcounts: Counter[PageRef],
                         pte_maps: Counter[PageRef], locked: Counter[PageRef],
                         large_folio: bool = False) -> None:
    """Add mm's mappings from its page tables: pte mappings of small pages and pmds of THPs
    (mapcounts), pte mappings of THP subpages (pte_maps), and M(p): those in VM_LOCKED vmas
    outside a VM_IO window (locked) - with ``large_folio`` (Linux 6.5+ rules) each such vma
    whose ptes map part of a THP counts once for it too (its mlock walk counted it once)."""
    for vma in mm.vmas:
        in_locked_vma: set[PageRef] = set()
        for pte in (await pt_read(store, mm.key, vma.start, vma.end)).values():
            ref = (pte.lv, pte.idx)
            if pte.bits & PTEBit.ZERO:
                continue
            if pte.is_subpage:  # a pte mapping of a THP subpage: never counted (§3.9)
                pte_maps[ref] += 1
                if large_folio and (vma.flags & (VM.LOCKED | VM.IO)) == VM.LOCKED:
                    in_locked_vma.add(ref)
                continue
            if pte.is_pmd and pte.vpn % PTRS_PER_PMD:
                continue  # one pmd mapping, reported for each of its 512 pages
            mapcounts[ref] += 1
            if (vma.flags & (VM.LOCKED | VM.IO)) == VM.LOCKED:
                locked[ref] += 1
        locked.update(in_locked_vma)


async def check_machine(store: RedisStore, m: Machine, *, quiescent: bool) -> CheckReport:
    rep = CheckReport(quiescent=quiescent)
    v = rep.violations
    metas: dict[int, dict[str, int]] = {}
    pages: dict[PageRef, Page] = {}
    for lv in sorted(m.lruvecs.values()):
        metas[lv], lv_pages = await load_lruvec(store, m, lv)
        for idx, p in lv_pages.items():
            pages[(lv, idx)] = p
    live = {ref: p for ref, p in pages.items() if p.flags & PG.INUSE}
    rep.pages_checked = len(live)

    # References each page must hold: mappings, page cache, batch entries (A6).
    batch_refs, _lru_pending = await batch_entries(store, m)
    pins = await pin_refs(store, m)  # GUP pins' references (mm/gup.py)
    caches = {f: await page_cache(store, m, f.fid) for f in list(m.files.values())}
    # swap slots vs swap ptes and shmem entries, the swap cache's pages (S1-S3, swapfile.py)
    shmem_entries = [e for _, swapped in caches.values() for e in swapped]
    swapcache = (await check_swap(store, m, live, v, shmem_entries) if m.cfg.swap_pages
                 else set())
    pending = sum(batch_refs.values())
    cache_refs: set[PageRef] = set()
    for f, (slots, _) in caches.items():
        for index, slot in slots.items():
            cache_refs.add(slot.ref)  # a file THP holds one reference for all its slots
            cp = pages.get(slot.ref)
            if slot.is_thp and (cp is None or not cp.has(PG.HEAD) or cp.index != slot.base
                                or not cp.index <= index < cp.index + cp.nr_pages):
                v.append(f"A6 file {f.name} slot {index}: names THP {slot.ref} that does "
                         "not cover it")

    # M(p): ptes in VM_LOCKED vmas outside a VM_IO window; mapcounts from page tables.
    locked_maps: Counter[PageRef] = Counter()
    mapcounts: Counter[PageRef] = Counter()  # pte mappings of small pages, pmds of THPs
    pte_maps: Counter[PageRef] = Counter()  # pte mappings of THP subpages
    pids = [int(p) for p in await store.client.smembers(f"{keys.machine(m.mid)}:procs")]
    any_alive = False
    for pid in pids:
        mm = await load_mm(store, m, pid, allow_dead=True)
        any_alive = any_alive or bool(mm.geti("alive"))
        if quiescent and mm.geti("alive") and mm.geti("locked_vm") != mm.locked_pages_total:  # Q7
            v.append(f"Q7 pid {pid}: locked_vm {mm.geti('locked_vm')} != "
                     f"{mm.locked_pages_total} pages in VM_LOCKED vmas")
        await count_mappings(store, mm, mapcounts, pte_maps, locked_maps,
                             large_folio_rules(m))

    # A1 / A3 per lruvec (one zone per node: nr_mlock summed per node).
    mlock_by_node: Counter[int] = Counter()
    meta_mlock_by_node: Counter[int] = Counter()
    for lv, meta in metas.items():
        node, _ = m.lv_identity(lv)
        meta_mlock_by_node[node] += meta.get("nr_mlock", 0)
        sizes: Counter[int] = Counter()
        for (plv, _), p in live.items():
            if plv == lv and p.flags & PG.LRU:
                sizes[int(p.lru_list)] += p.nr_pages
            if plv == lv and p.flags & PG.MLOCKED:
                mlock_by_node[node] += p.nr_pages
        for lru in LRU:
            if lru == LRU.NONE:
                continue
            if meta.get(f"n{int(lru)}", 0) != sizes[int(lru)]:
                v.append(f"A3 lruvec {lv} list {lru.name}: size {meta.get(f'n{int(lru)}', 0)} "
                         f"!= {sizes[int(lru)]} pages on it")
        _check_links(lv, meta, live, v)
        lv_mlocked = sum(p.nr_pages for (plv, _), p in live.items()
                         if plv == lv and p.flags & PG.MLOCKED)
        if meta.get("nr_mlock", 0) != lv_mlocked:
            v.append(f"A1 lruvec {lv}: nr_mlock {meta.get('nr_mlock', 0)} != {lv_mlocked} "
                     "PG_mlocked pages")
        used = sum(p.nr_pages for (plv, _), p in live.items() if plv == lv)
        if meta.get("used", 0) != used:
            v.append(f"A6 lruvec {lv}: {meta.get('used', 0)} frames accounted, {used} in use")
    for node in range(m.cfg.nodes):
        if mlock_by_node[node] != meta_mlock_by_node[node]:
            v.append(f"A1 node {node}: nr_mlock {meta_mlock_by_node[node]} != "
                     f"{mlock_by_node[node]} PG_mlocked pages")
    ev = Counter({name: sum(meta.get(f"ev:{name}", 0) for meta in metas.values())
                  for name in VMSTAT_EVENTS})
    balance = (ev["unevictable_pgs_mlocked"] - ev["unevictable_pgs_munlocked"]
               - ev["unevictable_pgs_stranded"] - ev["unevictable_pgs_cleared"])
    total_mlocked = sum(mlock_by_node.values())
    legacy = str(m.cfg.protocol) == "legacy"  # §8.5: A2, A5, Q3 (and Q9) do not apply
    if balance != total_mlocked and not legacy:  # A2 (§7.3)
        v.append(f"A2 mlocked-munlocked-stranded-cleared = {balance} != {total_mlocked} "
                 "PG_mlocked pages")

    for ref, p in live.items():
        lv, idx = ref
        name = f"page {lv}:{idx}"
        lru_unev = p.has(PG.LRU) and p.has(PG.UNEVICTABLE)
        if lru_unev and p.has(PG.ACTIVE):
            v.append(f"A4 {name}: active and unevictable on the LRU")
        if lru_unev and p.prev < 0 and not legacy:
            v.append(f"A5 {name}: mlock_count {p.prev} < 0")
        if p.has(PG.MLOCKED) and p.has(PG.TAIL):
            v.append(f"A7 {name}: PG_mlocked on a THP tail")
        isolated = 1 if p.has(PG.ISOLATED) else 0  # the isolator's reference (§8.5 A6)
        if isolated:
            rep.known_exceptions["isolated"] = rep.known_exceptions.get("isolated", 0) + 1
        expected = (mapcounts[ref] + pte_maps[ref] + (1 if ref in cache_refs else 0)
                    + batch_refs[ref] + isolated + pins[ref] + (1 if ref in swapcache else 0))
        if p.mapcount != mapcounts[ref]:
            v.append(f"A6 {name}: mapcount {p.mapcount} != {mapcounts[ref]} ptes")
        if p.pte_mapcount != pte_maps[ref]:
            v.append(f"A6 {name}: THP pte mapcount {p.pte_mapcount} != {pte_maps[ref]} ptes")
        if p.refcount != expected:
            v.append(f"A6 {name}: refcount {p.refcount} != {expected} "
                     f"(maps {mapcounts[ref]}, cache {int(ref in cache_refs)}, "
                     f"batches {batch_refs[ref]}, pins {pins[ref]})")
        if not quiescent:
            continue
        if p.has(PG.LOCKED) or p.has(PG.FROZEN):
            # "ensure nothing is ... in progress" (§8.5): a page lock or freeze left behind
            # belongs to an operation that never finished
            v.append(f"Q6 {name}: PG_locked/frozen ({p.flags & (PG.LOCKED | PG.FROZEN):#x}) "
                     "with nothing in progress")
        M = locked_maps[ref]
        if p.has(PG.LRU) and p.has(PG.MLOCKED) and not p.has(PG.UNEVICTABLE):
            v.append(f"Q1 {name}: mlocked page on an evictable list")
        if lru_unev and not p.has(PG.MLOCKED) and not p.has(PG.UNEVICTABLE_MAPPING):
            v.append(f"Q2 {name}: stranded on the unevictable LRU without PG_mlocked")
        over = lru_unev and p.has(PG.MLOCKED) and p.prev > M and not legacy
        orphan = p.has(PG.MLOCKED) and M == 0 and not p.has(PG.UNEVICTABLE_MAPPING)
        if ((over or orphan) and pins[ref] and not mapcounts[ref] and not pte_maps[ref]
                and ref not in cache_refs and ref not in swapcache):
            # X1 (§8.5): unmapped, out of the page cache, held only by a GUP pin - truncation
            # or hole punch racing munlock (S20, §3.6): PG_mlocked and a stale count until
            # the unpin frees the page, which then counts `cleared` (§6.4, §8.3 row 10)
            rep.known_exceptions["X1"] = rep.known_exceptions.get("X1", 0) + 1
            continue
        if (over or orphan) and p.has(PG.RESIDUE):
            # X4 [derived]: the count was raised by an LRU_PAGE entry left on another CPU
            # when a munlock cleared PG_mlocked (§8.3 rows 11-12, "a new way of stranding"):
            # Linux does the same; reported as a known exception, not as an emulator fault
            rep.known_exceptions["X4"] = rep.known_exceptions.get("X4", 0) + 1
            continue
        if orphan and p.has(PG.RESTORED_MLOCKED):
            # X3 [derived]: a munlock walk met a migration entry where the pte was, and the
            # failed migration restored it into the unlocked vma without an mlock (§8.3 row
            # 14): Linux keeps PG_mlocked until the page is freed too - a known gap
            rep.known_exceptions["X3"] = rep.known_exceptions.get("X3", 0) + 1
            continue
        if over:
            v.append(f"Q3 {name}: mlock_count {p.prev} > {M} locked mappings (overcount)")
        if orphan:
            v.append(f"Q4 {name}: PG_mlocked with no VM_LOCKED mapping")
        if M >= 1 and (not p.has(PG.MLOCKED) or (lru_unev and p.prev < M and not legacy)):
            rep.undercounts += 1  # Q5: allowed, reclaim repairs it
    for ref in sorted((mapcounts.keys() | pte_maps.keys()) - live.keys()):
        v.append(f"A6 page {ref[0]}:{ref[1]}: mapped by {mapcounts[ref] + pte_maps[ref]} "
                 "ptes but free (maps a freed page)")
    for ref, p in pages.items():
        if not p.flags & PG.INUSE and p.flags:
            v.append(f"A8 free page {ref}: flags {p.flags:#x} left set")
    if quiescent:
        if pending:
            v.append(f"Q6 {pending} batch entries still pending after drain")
        residue = sum(p.nr_pages for p in live.values()  # X3 and X4, counted above
                      if p.has(PG.MLOCKED) and p.flags & (PG.RESIDUE | PG.RESTORED_MLOCKED))
        if not any_alive and total_mlocked - residue:
            v.append(f"Q8 all processes exited but {total_mlocked - residue} pages are mlocked")
    return rep


def _check_links(lv: int, meta: dict[str, int], live: dict[PageRef, Page], v: list[str]) -> None:
    """Walk each evictable list from its head: every linked page must be on that list."""
    for lru in (LRU.INACTIVE_ANON, LRU.ACTIVE_ANON, LRU.INACTIVE_FILE, LRU.ACTIVE_FILE):
        seen: set[int] = set()
        prev = -1
        idx = meta.get(f"h{int(lru)}", -1)
        while idx >= 0:
            p = live.get((lv, idx))
            if p is None or idx in seen:
                v.append(f"A4 lruvec {lv} list {lru.name}: broken link at {idx}")
                break
            if p.lru_list != lru or p.prev != prev:
                v.append(f"A4 lruvec {lv} list {lru.name}: page {idx} linked but on "
                         f"{p.lru_list.name} (prev {p.prev} != {prev})")
            seen.add(idx)
            prev, idx = idx, p.next
        if meta.get(f"t{int(lru)}", -1) != prev:
            v.append(f"A4 lruvec {lv} list {lru.name}: tail {meta.get(f't{int(lru)}', -1)} "
                     f"!= last linked {prev}")
