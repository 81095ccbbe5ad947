"""mm/vmstat.c and the /proc views: vmstat, meminfo, status, smaps, pagemap+kpageflags (§7)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from mmsvc.mm.errors import KernelError
from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import read_pages
from mmsvc.mm.mm_struct import MmState, Pte, load_mm, pt_read
from mmsvc.mm.page import (
    LRU,
    LRU_NAMES,
    PG,
    PTRS_PER_PMD,
    SUBPAGE_SHIFT,
    VMSTAT_EVENTS,
    Page,
    PTEBit,
)
from mmsvc.mm.rmap import candidate_pids
from mmsvc.mm.swapfile import nr_swap_pages, swap_info
from mmsvc.mm.types import PageInfo, ProcStatus, SmapsEntry
from mmsvc.mm.vma import VM, Vma, vm_flag_names
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore

PSS_SHIFT = 12


async def lruvec_metas(store: RedisStore, m: Machine) -> dict[int, dict[str, int]]:
    pipe = store.client.pipeline(transaction=False)
    lvs = sorted(m.lruvecs.values())
    for lv in lvs:
        pipe.hgetall(f"{m.lv_key(lv)}:meta")
    out: dict[int, dict[str, int]] = {}
    for lv, raw in zip(lvs, await pipe.execute(), strict=True):
        out[lv] = {k.decode(): int(float(v)) for k, v in raw.items()}
    return out


async def vmstat(store: RedisStore, m: Machine) -> dict[str, int]:
    """Event counters summed over lruvecs, plus nr_mlock and nr_unevictable (§1.5, §7)."""
    metas = await lruvec_metas(store, m)
    out = {name: 0 for name in VMSTAT_EVENTS}
    out["nr_mlock"] = 0
    out["nr_unevictable"] = 0
    for meta in metas.values():
        for name in VMSTAT_EVENTS:
            out[name] += meta.get(f"ev:{name}", 0)
        out["nr_mlock"] += meta.get("nr_mlock", 0)
        out["nr_unevictable"] += meta.get(f"n{LRU.UNEVICTABLE}", 0)
    for lru in (LRU.INACTIVE_ANON, LRU.ACTIVE_ANON, LRU.INACTIVE_FILE, LRU.ACTIVE_FILE):
        out[f"nr_{LRU_NAMES[lru]}"] = sum(meta.get(f"n{int(lru)}", 0) for meta in metas.values())
    if m.cfg.swap_pages:  # pages written to / read from swap (mm/swapfile.py)
        info = await swap_info(store, m)
        out["pswpin"], out["pswpout"] = info.pswpin, info.pswpout
    return out


async def meminfo(store: RedisStore, m: Machine) -> dict[str, int]:
    """/proc/meminfo lines that matter here, in kB."""
    metas = await lruvec_metas(store, m)
    pipe = store.client.pipeline(transaction=False)
    for node in range(m.cfg.nodes):
        pipe.get(f"{keys.node(m.mid, node)}:free")
    free = sum(int(x or 0) for x in await pipe.execute())
    free += sum(meta.get("reserve", 0) for meta in metas.values())

    def total(field: str) -> int:
        return sum(meta.get(field, 0) for meta in metas.values()) * 4

    return {
        "MemTotal": m.cfg.nodes * m.cfg.frames_per_node * 4,
        "MemFree": free * 4,
        "Active(anon)": total(f"n{int(LRU.ACTIVE_ANON)}"),
        "Inactive(anon)": total(f"n{int(LRU.INACTIVE_ANON)}"),
        "Active(file)": total(f"n{int(LRU.ACTIVE_FILE)}"),
        "Inactive(file)": total(f"n{int(LRU.INACTIVE_FILE)}"),
        "Unevictable": total(f"n{int(LRU.UNEVICTABLE)}"),
        "Mlocked": total("nr_mlock"),
        "SwapTotal": m.cfg.swap_pages * 4,
        "SwapFree": (await nr_swap_pages(store, m) if m.cfg.swap_pages else 0) * 4,
    }


async def _ptes_and_pages(
    store: RedisStore, m: Machine, mm: MmState, start: int, end: int
) -> tuple[dict[int, Pte], dict[int, Page]]:
    ptes = await pt_read(store, mm.key, start, end)
    real = [p for p in ptes.values() if not p.bits & PTEBit.ZERO]
    pages = await read_pages(store, m, [(p.lv, p.idx) for p in real])
    return ptes, {p.vpn: pg for p, pg in zip(real, pages, strict=True)}


def page_info(
    m: Machine, vpn: int, vma: Vma | None, pte: Pte | None, page: Page | None
) -> PageInfo:
    addr = vpn << 12
    vma_locked = bool(vma and vma.flags & VM.LOCKED)
    vma_onfault = bool(vma and vma.flags & VM.LOCKONFAULT)
    if pte is None:
        return PageInfo(addr, vma is not None, False, ".", vma_locked=vma_locked,
                        vma_onfault=vma_onfault)
    if pte.bits & PTEBit.ZERO or page is None:
        return PageInfo(addr, vma is not None, True, "z", vma_locked=vma_locked,
                        vma_onfault=vma_onfault)
    return describe_page(m, addr, pte.lv, pte.idx, page, vma is not None, vma_locked, vma_onfault)


def describe_page(m: Machine, addr: int, lv: int, idx: int, page: Page, vma_present: bool,
                  vma_locked: bool = False, vma_onfault: bool = False) -> PageInfo:
    node, memcg = m.lv_identity(lv)
    return PageInfo(
        addr=addr, vma_present=vma_present, present=True,
        kind="a" if page.has(PG.ANON) else "f",
        pfn=(lv << 32) | idx, mlocked=page.has(PG.MLOCKED),
        unevictable=page.has(PG.UNEVICTABLE), lru=page.has(PG.LRU),
        active=page.has(PG.ACTIVE), lru_list=LRU_NAMES[page.lru_list],
        mlock_count=page.mlock_count, refcount=page.refcount, mapcount=page.mapcount,
        node=node, memcg=memcg, vma_locked=vma_locked, vma_onfault=vma_onfault,
        locked=page.has(PG.LOCKED), batch_residue=page.has(PG.RESIDUE),
        ksm=page.has(PG.KSM),
    )


async def page_flags(store: RedisStore, m: Machine, mm: MmState, start: int,
                     end: int) -> list[PageInfo]:
    ptes, pages = await _ptes_and_pages(store, m, mm, start, end)
    return [page_info(m, vpn, mm.find(vpn), ptes.get(vpn), pages.get(vpn))
            for vpn in range(start, end)]


async def smaps(store: RedisStore, m: Machine, mm: MmState) -> list[SmapsEntry]:
    out = []
    subpage_maps: dict[tuple[int, int], Counter[int]] = {}
    for vma in mm.vmas:
        ptes, pages = await _ptes_and_pages(store, m, mm, vma.start, vma.end)
        rss = 0
        pss_locked = 0
        for vpn, page in pages.items():
            rss += 4096
            if vma.flags & VM.LOCKED:
                mapcount = page.mapcount
                if page.has(PG.HEAD):
                    # folio_precise_page_mapcount: the THP's pmd mappings + this subpage's
                    # own ptes (in any address space)
                    pte = ptes[vpn]
                    ref = (pte.lv, pte.idx)
                    if ref not in subpage_maps:
                        subpage_maps[ref] = await _subpage_pte_maps(store, m, ref, page)
                    number = vpn - pte.pmd * PTRS_PER_PMD if pte.is_pmd else \
                        pte.bits >> SUBPAGE_SHIFT
                    mapcount += subpage_maps[ref][number]
                pss_locked += (4096 << PSS_SHIFT) // max(mapcount, 1)
        out.append(SmapsEntry(vma.start << 12, vma.end << 12, vma.pages * 4, rss // 1024,
                              pss_locked >> (10 + PSS_SHIFT), vm_flag_names(vma.flags)))
    return out


async def _subpage_pte_maps(store: RedisStore, m: Machine, ref: tuple[int, int],
                            head: Page) -> Counter[int]:
    """The ptes that map each subpage of THP ``ref``, over every address space its rmap
    reaches (each subpage's own _mapcount; the pmd mappings are the head's mapcount)."""
    counts: Counter[int] = Counter()
    if not head.pte_mapcount:
        return counts
    for pid in await candidate_pids(store, m, head):
        try:
            other = await load_mm(store, m, pid)
        except KernelError:
            continue  # exited
        for vma in other.vmas:
            if not (vma.may_map_anon(head.mapping) if head.has(PG.ANON)
                    else vma.file == head.mapping):
                continue
            base = vma.start + (head.index - vma.pgoff)
            lo, hi = max(base, vma.start), min(base + head.nr_pages, vma.end)
            if lo >= hi:
                continue
            for p in (await pt_read(store, other.key, lo, hi)).values():
                if p.is_subpage and (p.lv, p.idx) == ref:
                    counts[p.bits >> SUBPAGE_SHIFT] += 1
    return counts


def proc_status(mm: MmState, rss_pages: int) -> ProcStatus:
    return ProcStatus(
        pid=mm.pid, alive=bool(mm.geti("alive")), vm_lck_kb=mm.geti("locked_vm") * 4,
        vm_size_kb=sum(v.pages for v in mm.vmas) * 4, vm_rss_kb=rss_pages * 4,
        memcg=str(mm.info["memcg"]), node=mm.geti("node"), mlockall_flags=mm.geti("mlockall"),
        cap_ipc_lock=bool(mm.geti("cap_ipc_lock")), rlimit_memlock_soft=mm.geti("rlim_soft"),
        rlimit_memlock_hard=mm.geti("rlim_hard"),
    )


async def rss_pages(store: RedisStore, mm: MmState) -> int:
    total = 0
    for vma in mm.vmas:
        ptes = await pt_read(store, mm.key, vma.start, vma.end)
        total += sum(1 for p in ptes.values() if not p.bits & PTEBit.ZERO)
    return total


def flatten(items: Iterable[Iterable[PageInfo]]) -> list[PageInfo]:
    return [i for group in items for i in group]
