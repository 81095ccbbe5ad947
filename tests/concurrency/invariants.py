"""Invariant checks over a quiescent machine: the server's checker (spec §8.5) and our own
recomputation of the same invariants from the public views (vmstat, meminfo, status, smaps,
pagemap/kpageflags, the page caches).

Every function returns a list of violation strings (empty = fine); the callers decide how to
fail.  "Quiescent" means: no call in flight (the state machines only check between steps) and
every CPU's batches drained (``Drain(all_cpus=True)``), so no page is isolated or held by a
batch entry.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mmsvc.mm.types import PageInfo, ProcStatus, SmapsEntry
from mmsvc_client import AsyncMmsvcClient, MmsvcError

from .ops import FILE_PAGES, World

P = 4096
EVENTS = ("unevictable_pgs_mlocked", "unevictable_pgs_munlocked", "unevictable_pgs_stranded",
          "unevictable_pgs_cleared")


@dataclass
class Snapshot:
    """Every view of a machine, read while nothing runs."""

    vmstat: dict[str, int]
    meminfo: dict[str, int]
    status: dict[int, ProcStatus] = field(default_factory=dict)
    smaps: dict[int, list[SmapsEntry]] = field(default_factory=dict)
    ptes: dict[int, list[PageInfo]] = field(default_factory=dict)  # pid -> pages of its span
    caches: dict[str, list[PageInfo]] = field(default_factory=dict)  # file -> page cache


async def snapshot(k: AsyncMmsvcClient, world: World) -> Snapshot:
    snap = Snapshot(await k.vmstat(world.machine), await k.meminfo(world.machine))
    for proc in world.live():
        snap.status[proc.pid] = await k.proc_status(world.machine, proc.pid)
        entries = await k.smaps(world.machine, proc.pid)
        snap.smaps[proc.pid] = entries
        if entries:
            lo = min(e.start for e in entries)
            hi = max(e.end for e in entries)
            snap.ptes[proc.pid] = await k.page_flags(world.machine, proc.pid, lo, hi - lo)
    names = list(FILE_PAGES) + [f"dev/zero#{i}" for i in range(1, world.shm_files + 1)]
    for name in names:
        try:
            snap.caches[name] = await k.file_pages(world.machine, name)
        except MmsvcError as e:
            if e.errno != "ENOENT":
                raise
    return snap


def view_violations(snap: Snapshot, world: World) -> list[str]:
    """Q1-Q4, Q7, A1-A3 and A6 recomputed from the views of a quiescent machine."""
    v: list[str] = []
    vm = snap.vmstat
    # A2 / §7.3: mlocked - munlocked - stranded - cleared = nr_mlock
    bal = (vm["unevictable_pgs_mlocked"] - vm["unevictable_pgs_munlocked"]
           - vm["unevictable_pgs_stranded"] - vm["unevictable_pgs_cleared"])
    if bal != vm["nr_mlock"]:
        v.append(f"view A2: mlocked-munlocked-stranded-cleared = {bal} != nr_mlock "
                 f"{vm['nr_mlock']}")
    if snap.meminfo["Mlocked"] != vm["nr_mlock"] * 4:
        v.append(f"view: meminfo Mlocked {snap.meminfo['Mlocked']} kB != nr_mlock "
                 f"{vm['nr_mlock']} pages")
    if snap.meminfo["Unevictable"] != vm["nr_unevictable"] * 4:
        v.append(f"view: meminfo Unevictable {snap.meminfo['Unevictable']} kB != "
                 f"nr_unevictable {vm['nr_unevictable']} pages")

    # Q7 from the views: VmLck = the locked VMAs' sizes; smaps Locked only in locked VMAs.
    for pid, st in snap.status.items():
        entries = snap.smaps.get(pid, [])
        locked_kb = sum(e.size_kb for e in entries if "lo" in e.vm_flags)
        if st.vm_lck_kb != locked_kb:
            v.append(f"view Q7 pid {pid}: VmLck {st.vm_lck_kb} kB != {locked_kb} kB of "
                     "VM_LOCKED vmas in smaps")
        for e in entries:
            if "lo" not in e.vm_flags and e.locked_kb:
                v.append(f"view pid {pid}: smaps Locked {e.locked_kb} kB in an unlocked vma "
                         f"{e.start:#x}")
            if e.locked_kb > e.rss_kb:
                v.append(f"view pid {pid}: smaps Locked {e.locked_kb} kB > Rss {e.rss_kb} kB")
        if sum(e.size_kb for e in entries) != st.vm_size_kb:
            v.append(f"view pid {pid}: VmSize {st.vm_size_kb} != smaps sizes")

    # Every page reachable from a pte or a page cache, with the ptes that map it.
    pages: dict[int, PageInfo] = {}
    maps: Counter[int] = Counter()  # pfn -> ptes
    locked: Counter[int] = Counter()  # pfn -> ptes in VM_LOCKED vmas: M(p)
    where: dict[int, str] = {}
    for pid, infos in snap.ptes.items():
        proc = world.proc(pid)
        for info in infos:
            if not info.present:
                continue
            if not info.vma_present:
                v.append(f"view pid {pid}: pte at {info.addr:#x} outside every vma "
                         f"(kind {info.kind})")
            if info.kind == "z":
                continue
            if info.refcount == 0:  # the struct page is free: the pte outlived its page
                v.append(f"view pid {pid}: pte at {info.addr:#x} maps a freed page "
                         f"{info.pfn:#x} (use after free; mapcount/refcount lost)")
                continue
            pages[info.pfn] = info
            maps[info.pfn] += 1
            where.setdefault(info.pfn, f"pid {pid} {info.addr:#x}")
            if info.vma_locked:
                locked[info.pfn] += 1
            # page cache coherence: a file page mapped here is the cache's page at that index
            covering = [m for m in proc.maps if m.addr <= info.addr < m.end]
            m = covering[0] if len(covering) == 1 else None  # the model is unambiguous
            if m is not None and m.file and info.kind == "f":
                index = m.file_index(info.addr)
                cache = snap.caches.get(m.file, [])
                cached = cache[index] if index < len(cache) else None
                if cached is None or not cached.present or cached.pfn != info.pfn:
                    have = "nothing" if cached is None or not cached.present else \
                        f"pfn {cached.pfn:#x}"
                    v.append(f"view pid {pid}: {info.addr:#x} maps file page {info.pfn:#x} "
                             f"of {m.file}[{index}], but the page cache holds {have} there "
                             f"(a mapped page left the page cache)")
    in_cache: set[int] = set()
    for name, infos in snap.caches.items():
        for i, info in enumerate(infos):
            if info.present:
                in_cache.add(info.pfn)
                pages.setdefault(info.pfn, info)
                where.setdefault(info.pfn, f"{name}[{i}]")

    mlocked = {pfn for pfn, p in pages.items() if p.mlocked}
    unevictable = {pfn for pfn, p in pages.items() if p.lru_list == "unevictable"}
    if len(mlocked) != vm["nr_mlock"]:
        v.append(f"view A1: nr_mlock {vm['nr_mlock']} != {len(mlocked)} reachable pages "
                 "with PG_mlocked")
    if len(unevictable) != vm["nr_unevictable"]:
        v.append(f"view A3: nr_unevictable {vm['nr_unevictable']} != {len(unevictable)} "
                 "reachable pages on the unevictable LRU")
    for pfn, p in sorted(pages.items()):
        name = f"page {pfn:#x} ({where[pfn]})"
        M = locked[pfn]
        if p.lru and p.mlocked and p.lru_list != "unevictable":
            v.append(f"view Q1 {name}: PG_mlocked on the {p.lru_list} list")
        if p.lru_list == "unevictable" and not p.mlocked:
            v.append(f"view Q2 {name}: on the unevictable LRU without PG_mlocked")
        if p.lru_list == "unevictable" and p.mlocked and p.mlock_count > M \
                and not p.batch_residue:  # X4: Linux's cross-CPU residue, not a fault
            v.append(f"view Q3 {name}: mlock_count {p.mlock_count} > {M} locked mappings")
        if p.mlocked and M == 0 and not p.batch_residue:
            v.append(f"view Q4 {name}: PG_mlocked with no VM_LOCKED mapping")
        if p.mapcount != maps[pfn]:
            v.append(f"view A6 {name}: mapcount {p.mapcount} != {maps[pfn]} ptes")
        expect = maps[pfn] + (1 if pfn in in_cache else 0)
        if p.refcount != expect:
            v.append(f"view A6 {name}: refcount {p.refcount} != {maps[pfn]} ptes + "
                     f"{int(pfn in in_cache)} page cache (all CPUs drained)")
        if not p.lru:
            v.append(f"view {name}: not on any LRU list after a drain of every CPU")
    return v


def final_violations(vm: dict[str, int], residue: int = 0) -> list[str]:
    """Q8: every process exited and every CPU drained.  ``residue``: pages the checker
    classified X4 (cross-CPU batch residue): they stay mlocked and unevictable in the page
    cache after the exits, as on Linux."""
    v: list[str] = []
    if vm["nr_mlock"] > residue:
        v.append(f"Q8: all processes exited but nr_mlock = {vm['nr_mlock']} (X4: {residue})")
    if vm["nr_unevictable"] > residue:
        v.append(f"Q8: all processes exited but nr_unevictable = {vm['nr_unevictable']} "
                 f"(X4: {residue})")
    mlocked, munlocked, stranded, cleared = (vm[e] for e in EVENTS)
    if mlocked != munlocked + stranded + cleared + vm["nr_mlock"]:
        v.append(f"Q8: mlocked {mlocked} != munlocked {munlocked} + stranded {stranded} + "
                 f"cleared {cleared} + still mlocked {vm['nr_mlock']}")
    return v
