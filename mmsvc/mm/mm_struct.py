"""mm_struct: an address space as loaded for one syscall under its mmap_lock (spec §1.7)."""

from __future__ import annotations

import bisect
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mmsvc.locks import Held
from mmsvc.mm.errors import KernelError, esrch
from mmsvc.mm.machine import Machine, refresh_files
from mmsvc.mm.page import PTE, PTRS_PER_PMD, PTEBit
from mmsvc.mm.vma import Vma
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore

# PTEBit values as plain ints for the per-pte hot paths: an IntFlag operation builds an enum
# member each time, which made pte tests a third of a 64k-page mlock's Python time.
_PMD = int(PTEBit.PMD)
_SUBPAGE = int(PTEBit.SUBPAGE)
_PRESENT = int(PTEBit.PRESENT)
_SWAP = int(PTEBit.SWAP)
_MIGRATION = int(PTEBit.MIGRATION)  # in a subpage's migration entry bit 7 is no SWAP bit


@dataclass(frozen=True)
class Pte:
    vpn: int
    idx: int
    lv: int
    bits: int

    @property
    def is_pmd(self) -> bool:
        """A pmd mapping of a THP (idx is its head); counted as one mapping (§3.9)."""
        return bool(self.bits & _PMD)

    @property
    def is_subpage(self) -> bool:
        """A pte mapping one subpage of a THP (idx is its head): never counted (§3.9)."""
        return bool(self.bits & _SUBPAGE)

    @property
    def is_swap(self) -> bool:
        """A swap entry: not present, idx names the swap slot (mm/swapfile.py)."""
        return not self.bits & (_PRESENT | _MIGRATION) and bool(self.bits & _SWAP)

    @property
    def pmd(self) -> int:
        return self.vpn // PTRS_PER_PMD


@dataclass
class MmState:
    """Info and VMAs of one process; edits are collected and written back by :func:`save`."""

    pid: int
    key: str
    info: dict[str, int | str]
    vmas: list[Vma]
    removed: set[int] = field(default_factory=set)
    changed: dict[int, Vma] = field(default_factory=dict)
    info_changes: dict[str, int | str] = field(default_factory=dict)
    # Set by the syscall layer: the mmap_lock held, ptes read with it, and whether the last
    # pte install of a fault may release the lock in the same round trip.
    held: Held | None = None
    prefetched: tuple[int, int, dict[int, Pte]] | None = None
    unlock_on_install: bool = False

    def take_prefetched(self, start: int, end: int) -> dict[int, Pte] | None:
        """The ptes read together with the mmap_lock, once, if they cover [start, end)."""
        pre, self.prefetched = self.prefetched, None
        if pre is None or not (pre[0] <= start and end <= pre[1]):
            return None
        return {v: p for v, p in pre[2].items() if start <= v < end}

    def geti(self, name: str) -> int:
        return int(self.info[name])

    def set_info(self, name: str, value: int | str) -> None:
        self.info[name] = value
        self.info_changes[name] = value

    @property
    def lv(self) -> int:
        return self.geti("lv")

    def find(self, vpn: int) -> Vma | None:
        starts = [v.start for v in self.vmas]
        i = bisect.bisect_right(starts, vpn) - 1
        if i >= 0 and self.vmas[i].start <= vpn < self.vmas[i].end:
            return self.vmas[i]
        return None

    def overlapping(self, start: int, end: int) -> list[Vma]:
        return [v for v in self.vmas if v.start < end and v.end > start]

    def covered(self, start: int, end: int) -> bool:
        """True when VMAs cover [start, end) without holes."""
        pos = start
        for v in self.overlapping(start, end):
            if v.start > pos:
                return False
            pos = max(pos, v.end)
        return pos >= end

    def replace_vmas(self, old: list[Vma], new: list[Vma]) -> None:
        for v in old:
            self.vmas.remove(v)
            self.removed.add(v.id)
            self.changed.pop(v.id, None)
        for v in new:
            self.removed.discard(v.id)
            self.changed[v.id] = v
            self.vmas.append(v)
        self.vmas.sort(key=lambda v: v.start)

    def update_vma(self, v: Vma) -> None:
        old = next(x for x in self.vmas if x.id == v.id)
        self.replace_vmas([old], [v])

    @property
    def locked_pages_total(self) -> int:
        return sum(v.pages for v in self.vmas if v.locked)


async def load_mm(store: RedisStore, m: Machine, pid: int, *, allow_dead: bool = False) -> MmState:
    key = keys.mm(m.mid, pid)
    pipe = store.client.pipeline(transaction=False)
    pipe.hgetall(f"{key}:info")
    pipe.hgetall(f"{key}:vma")
    info_raw, vmas_raw = await pipe.execute()
    mm = decode_mm(m, pid, info_raw, vmas_raw, allow_dead=allow_dead)
    await ensure_files(store, m, mm)
    return mm


async def ensure_files(store: RedisStore, m: Machine, mm: MmState) -> None:
    """Every file this address space maps is in the machine's cached shape (refreshed if
    another worker created one since), before the syscall touches anything."""
    if not m.knows_files(v.file for v in mm.vmas):
        await refresh_files(store, m)


def decode_mm(m: Machine, pid: int, info_raw: dict[bytes, bytes] | list[bytes],
              vmas_raw: dict[bytes, bytes] | list[bytes], *, allow_dead: bool = False) -> MmState:
    """An MmState from HGETALL replies (dicts, or flat lists from a function)."""
    key = keys.mm(m.mid, pid)
    if isinstance(info_raw, list):
        info_raw = dict(zip(info_raw[::2], info_raw[1::2], strict=True))
    if isinstance(vmas_raw, list):
        vmas_raw = dict(zip(vmas_raw[::2], vmas_raw[1::2], strict=True))
    if not info_raw:
        raise esrch(f"no process {pid} on machine {m.mid}")
    info: dict[str, int | str] = {}
    for k, v in info_raw.items():
        s = v.decode()
        info[k.decode()] = int(s) if s.lstrip("-").isdigit() else s
    if not allow_dead and not int(info["alive"]):
        raise esrch(f"process {pid} has exited")
    vmas = sorted((Vma.from_json(v) for v in vmas_raw.values()), key=lambda v: v.start)
    return MmState(pid, key, info, vmas)


async def save(store: RedisStore, mm: MmState) -> None:
    """Write back VMA and info edits atomically, fenced by the mmap_lock: if this CPU's hold
    was evicted (its lease ran out: paused, or taken offline as dead) nothing is written and
    the syscall fails with EAGAIN - another CPU may own the address space by now."""
    if not (mm.removed or mm.changed or mm.info_changes):
        return
    edits = json.dumps({
        "removed": [str(i) for i in mm.removed],
        "changed": {str(i): v.to_json() for i, v in mm.changed.items()},
        "info": {k: str(v) for k, v in mm.info_changes.items()},
    })
    lock = mm.held.key if mm.held is not None else ""
    tok = mm.held.token if mm.held is not None else 0
    if not int(await store.fcall("mm_save", mm.key, lock, tok, edits)):
        raise KernelError("EAGAIN", "mmap_lock lease expired (fenced): nothing written")
    mm.removed.clear()
    mm.changed.clear()
    mm.info_changes.clear()


async def vma_at(store: RedisStore, mm_key: str, vpn: int) -> Vma | None:
    """The VMA covering vpn as last stored (an rmap walker's view of vm_flags, read without
    the mmap_lock), or None."""
    for raw in (await store.client.hgetall(f"{mm_key}:vma")).values():
        vma = Vma.from_json(raw)
        if vma.start <= vpn < vma.end:
            return vma
    return None


async def pt_read(store: RedisStore, mm_key: str, start: int, end: int, *,
                  walk: bool = False) -> dict[int, Pte]:
    """Present ptes of [start, end); walk=True for kernel walks that hold each page table's
    lock (counted in lock_stat as class ptl), False for views and the checker."""
    flat = await store.fcall("pt_walk" if walk else "pt_read", mm_key, start, end)
    return {int(flat[i]): Pte(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]))
            for i in range(0, len(flat), 4)}


async def pt_walk(
    store: RedisStore, mm_key: str, start: int, end: int, max_ptes: int = 4096
) -> AsyncIterator[dict[int, Pte]]:
    """walk_page_range: the present ptes of [start, end), a few page tables per round trip,
    visiting only page tables that exist (an unpopulated range costs one call)."""
    pos = start
    while pos < end:
        flat = await store.fcall("pt_walk", mm_key, pos, end, max_ptes)
        resume = int(flat[0])
        ptes = decode_ptes([int(x) for x in flat[1:]])
        if ptes:
            yield ptes
        if resume <= pos:  # pragma: no cover - the function always moves forward
            raise RuntimeError("pt_walk made no progress")
        pos = resume


def decode_ptes(flat: list[int]) -> dict[int, Pte]:
    return {int(flat[i]): Pte(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]))
            for i in range(0, len(flat), 4)}


async def pt_zap(store: RedisStore, mm_key: str, start: int, end: int) -> list[Pte]:
    flat = await store.fcall("pt_zap", mm_key, start, end)
    return [Pte(int(flat[i]), int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]))
            for i in range(0, len(flat), 4)]


async def pt_install(
    store: RedisStore, mm_key: str, new: list[Pte], expect: dict[int, Pte]
) -> list[int]:
    """Install ptes whose current value is the expected one; returns the vpns that raced."""
    if not new:
        return []
    args: list[int] = []
    for p in new:
        e = expect.get(p.vpn)
        args += [int(p.vpn), int(p.idx), int(p.lv), int(p.bits)]
        args += [int(e.idx), int(e.lv), int(e.bits)] if e else [0, 0, 0]
    return [int(v) for v in await store.fcall("pt_install", mm_key, *args)]


def pte_args(new: list[Pte], expect: dict[int, Pte]) -> list[int]:
    args: list[int] = []
    for p in new:
        e = expect.get(p.vpn)
        args += [int(p.vpn), int(p.idx), int(p.lv), int(p.bits)]
        args += [int(e.idx), int(e.lv), int(e.bits)] if e else [0, 0, 0]
    return args


assert PTE.size == 8
