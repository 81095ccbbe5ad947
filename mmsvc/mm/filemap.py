"""mm/filemap.c, the Python side: page cache slots and file THPs mapped by their pmd.

The page cache of a file is a hash of slots (``lua/filemap.lua``): ``"lv|idx"`` for a small
page, ``"busy|owner"`` while a fault reads a page in, ``"lv|head|base"`` in each of the
512 slots of a file THP (khugepaged.py makes them; ``base`` is the head's index, so that a
lookup knows which subpage it found without reading the record), and for a shmem page that
reclaim swapped out ``"swap|slot"`` (``"busy|owner|slot"`` while a fault reads it back).

A file THP is mapped like an anonymous one (spec §3.9): by a pmd when the vma can hold it
(``do_set_pmd`` / ``filemap_map_pmd``: the aligned 2 MiB of the vma map the THP's aligned
range and the pmd is empty), counted once on the head - ``page_add_file_rmap(compound=true)``,
so a VM_LOCKED vma mlocks all of it with an immediate flush (a THP head, §2.2.1.3) - or by
ptes of its subpages, which are never counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmsvc.mm.machine import Machine
from mmsvc.mm.mm_struct import MmState, Pte
from mmsvc.mm.page import PG, PTRS_PER_PMD, SUBPAGE_SHIFT, PTEBit
from mmsvc.mm.rmap import page_add_rmap_ops, page_remove_rmap_ops
from mmsvc.mm.swap import Op, Swap
from mmsvc.mm.vma import VM, Vma
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

HPAGE_PMD_NR = PTRS_PER_PMD


@dataclass(frozen=True)
class Slot:
    """A page cache slot that holds a page: small (base None) or a file THP's subpage."""

    lv: int
    idx: int
    base: int | None = None  # the THP head's index

    @property
    def ref(self) -> tuple[int, int]:
        return self.lv, self.idx

    @property
    def is_thp(self) -> bool:
        return self.base is not None

    def value(self) -> str:
        return f"{self.lv}|{self.idx}" if self.base is None else \
            f"{self.lv}|{self.idx}|{self.base}"

    def lookup_index(self, index: int) -> int:
        """The index folio_try_get's re-check compares with the record's: the head's."""
        return index if self.base is None else self.base

    def grab_op(self, fid: int, index: int, lock: bool = True) -> list[int | str]:
        """Page op T for this slot's page found at ``index``: a reference (and the page
        lock) unless the page was freed, frozen, reused - or split since the lookup (a
        THP slot must still name a THP head, a small slot a small page)."""
        return ["T", self.idx, fid, self.lookup_index(index), int(lock), int(self.is_thp)]


def parse_slot(raw: str | bytes) -> Slot | None:
    """A slot's value; None while a page is being read in (``busy|owner``) or for a
    swapped-out shmem page (``swap|slot``: swap_entry)."""
    val = text(raw)
    if val.startswith(("busy|", "swap|")):
        return None
    parts = val.split("|")
    if len(parts) == 3:
        return Slot(int(parts[0]), int(parts[1]), int(parts[2]))
    return Slot(int(parts[0]), int(parts[1]))


def swap_entry(raw: str | bytes) -> int | None:
    """The swap slot of a swapped-out shmem page's entry (``swap|slot``: the xarray's swap
    value entry, or ``busy|owner|slot`` while a fault reads it back), else None."""
    val = text(raw)
    if val.startswith("swap|"):
        return int(val[5:])
    parts = val.split("|")
    if parts[0] == "busy" and len(parts) == 3:
        return int(parts[2])
    return None


async def cached_pages(store: RedisStore, m: Machine, fid: int) -> dict[int, Slot]:
    """Every filled slot of a file's page cache, by index."""
    return (await page_cache(store, m, fid))[0]


async def page_cache(store: RedisStore, m: Machine,
                     fid: int) -> tuple[dict[int, Slot], list[int]]:
    """A file's page cache in one read: its filled slots by index, and the swap slots its
    swapped-out shmem pages' entries name."""
    raw = await store.client.hgetall(f"{keys.file(m.mid, fid)}:pc")
    out: dict[int, Slot] = {}
    swapped: list[int] = []
    for k, v in raw.items():
        slot = parse_slot(v)
        if slot is not None:
            out[int(text(k))] = slot
        elif (entry := swap_entry(v)) is not None:
            swapped.append(entry)
    return out, swapped


async def drop_reservations(store: RedisStore, fkey: str, owner: str,
                            indices: list[int]) -> None:
    """Give up page cache slots ``owner`` reserved (``busy|owner``) but did not fill."""
    args: list[int | str] = []
    for i in indices:
        args += [i, ""]
    if args:
        await store.fcall("pc_commit", fkey, owner, *args)


def slot_bits(slot: Slot, index: int, bits: int) -> int:
    """The bits of a pte mapping ``index`` through ``slot``: for a file THP, the subpage's
    pte (SUBPAGE, its number in the high bits; never counted, §3.9)."""
    if slot.base is None:
        return int(bits)
    return int(bits) | int(PTEBit.SUBPAGE) | ((index - slot.base) << SUBPAGE_SHIFT)


def map_ops(m: Machine, vma: Vma, slot: Slot) -> list[Op]:
    """The rmap ops of one new pte mapping slot's page: page_add_file_rmap for a small page
    (with its mlock, §3.2), the uncounted pte mapping of a subpage for a THP (§3.9)."""
    if slot.is_thp:
        return [["m", slot.idx]]
    return page_add_rmap_ops(m, vma, slot.idx)


def pmd_bits(vma: Vma, write: bool) -> int:
    bits = int(PTEBit.PRESENT)
    if vma.shared and vma.flags & VM.WRITE:
        bits |= int(PTEBit.WRITE)
    if write:
        bits |= int(PTEBit.DIRTY)
    return bits


def pmd_suitable(vma: Vma, pmd: int) -> int | None:
    """transhuge_vma_suitable: the file index the aligned 2 MiB at ``pmd`` maps, when the
    vma covers all of it and that index is THP-aligned; else None."""
    base = pmd * PTRS_PER_PMD
    if base < vma.start or base + PTRS_PER_PMD > vma.end or vma.file <= 0:
        return None
    index = vma.linear_index(base)
    return index if index % HPAGE_PMD_NR == 0 else None


class FilePmd:
    """do_set_pmd and the file side of __split_huge_pmd, on behalf of one CPU."""

    def __init__(self, store: RedisStore, swap: Swap) -> None:
        self.store = store
        self.swap = swap

    async def map_pmd(self, m: Machine, mm: MmState, vma: Vma, pmd: int, write: bool) -> bool:
        """Map the file THP of the aligned 2 MiB at ``pmd`` with the pmd itself, if the page
        cache holds one there and the pmd is empty (no page table).  The THP is taken with
        a reference and its page lock (filemap_fault's lock_page; a locked or frozen THP -
        reclaim, a split, a collapse - is left to the pte path, which waits).  True when
        mapped: mapcount + 1 on the head and, in a VM_LOCKED vma, mlock_vma_page(compound),
        flushed at once (a THP head)."""
        index = pmd_suitable(vma, pmd)
        if index is None or not m.cfg.thp:
            return False
        fkey = keys.file(m.mid, vma.file)
        raw = (await self.store.fcall("pc_peek", fkey, index))[0]
        slot = parse_slot(raw) if raw else None
        if slot is None or slot.base != index:
            return False
        got = await self.swap.run(m, slot.lv, [slot.grab_op(vma.file, index)])
        if got.failed:
            return False
        # page_add_file_rmap before the pmd is set (an rmap walker that meets the pmd finds
        # it counted), its mlock once it is set; a pmd that is not empty any more undoes it
        add = page_add_rmap_ops(m, vma, slot.idx)
        unlock: list[Op] = [["F", slot.idx, 0, int(PG.LOCKED)], ["P", slot.idx]]
        installed = 0
        try:
            await self.swap.run(m, slot.lv, add[:1])
            try:
                installed = int(await self.store.fcall(
                    "pmd_install", mm.key, pmd, slot.idx, slot.lv, pmd_bits(vma, write),
                    0, 0, 0))
            finally:
                done: list[Op] = add[1:] if installed else [["U", slot.idx], ["P", slot.idx]]
                await self.swap.run(m, slot.lv, done)
        finally:
            await self.swap.run(m, slot.lv, unlock)
        return bool(installed)

    async def zap_pmd(self, m: Machine, vma: Vma, mm_key: str, pte: Pte) -> bool:
        """Remove a file THP's pmd mapping (the file branch of __split_huge_pmd_locked, and
        try_to_unmap's TTU_SPLIT_HUGE_PMD): page_remove_rmap(compound=true) - a VM_LOCKED
        vma munlocks the THP, flushed at once - and the pmd's reference.  No ptes take its
        place: later faults map the subpages again.  False when the pmd changed meanwhile."""
        bits = pte.bits & ~int(PTEBit.PMD)
        if not int(await self.store.fcall("pmd_zap", mm_key, pte.pmd, pte.idx, pte.lv, bits)):
            return False
        await self.swap.run(m, pte.lv, [*page_remove_rmap_ops(m, vma, pte.idx),
                                        ["P", pte.idx]])
        return True
