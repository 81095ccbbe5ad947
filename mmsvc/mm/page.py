"""struct page, as the emulator stores it (spec §1.1-§1.3).

A page is a fixed 36-byte record in its lruvec's slot: flags, refcount, mapcount, the LRU slot
(``prev``/``next`` list links; on the unevictable "LRU" ``prev`` holds ``mlock_count``, exactly as
the rework overlays it, §1.3), the mapping (file id or anon_vma id) and the index in it.

The constants below are the single definition: :func:`lua_header` renders them for the Redis
function library so the Lua and Python sides can never disagree.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# flags, refcount, mapcount, prev (or mlock_count), next, mapping, index (64-bit: an anonymous
# page's index is its virtual page number), aux
RECORD = struct.Struct("<IiiiiIQI")
RECORD_SIZE = RECORD.size
CHUNK_PAGES = 256  # records per store string
PTE = struct.Struct("<IHH")
PTE_SIZE = PTE.size
PTRS_PER_PMD = 512


class PG(enum.IntFlag):
    """Page flags.  Names follow include/linux/page-flags.h."""

    LRU = 1 << 0
    ACTIVE = 1 << 1
    UNEVICTABLE = 1 << 2
    MLOCKED = 1 << 3
    ANON = 1 << 4  # PageAnon: mapping is an anon_vma
    SWAPBACKED = 1 << 5  # anon and shmem: lives on the anon LRU lists
    REFERENCED = 1 << 6
    ISOLATED = 1 << 7  # emulator marker: off the LRU in someone's private list (spec §2.1.1)
    HEAD = 1 << 8
    TAIL = 1 << 9
    INUSE = 1 << 10  # the record is allocated (refcount > 0 or being freed)
    PAGECACHE = 1 << 11  # in a file's page cache (holds one reference)
    DIRTY = 1 << 12
    UNEVICTABLE_MAPPING = 1 << 13  # mapping_unevictable(): SHM_LOCK / ramfs (spec §1.1.4, X2)
    USER_ISOLATED = 1 << 14  # emulator marker: isolated through the Isolate API (its Putback)
    LOCKED = 1 << 15  # PG_locked: the page lock (file faults, reclaim, migration)
    FROZEN = 1 << 16  # refcount frozen (folio_ref_freeze): lookups without a reference fail
    # emulator marker: mlock_count was set or raised by an LRU_PAGE entry that was still queued
    # on another CPU when a munlock cleared PG_mlocked (cross-CPU batch residue, §8.3 rows
    # 11-12): Linux overcounts there too; the checker classifies such a page (X4)
    RESIDUE = 1 << 17
    # emulator marker: PG_mlocked survived a failed migration's restore into a vma that is not
    # VM_LOCKED - the munlock-vs-unmap race of §8.3 row 14, where a munlock walk finds a
    # migration entry instead of the pte and the restore does not mlock: Linux keeps
    # PG_mlocked with no locked mapping there too; the checker classifies such a page (X3).
    # Cleared with PG_mlocked.
    RESTORED_MLOCKED = 1 << 18
    # PG_swapcache: in the swap cache (mm/swap_state.c), holding one reference; the slot is
    # found through the swap area's reverse map (mm/swapfile.py), not in the record
    SWAPCACHE = 1 << 20
    # PageKsm (mm/ksm.c): an anonymous page shared by merging; ``mapping`` is its stable node
    # (the id of its record in ``{m<id>}:ksm``), whose rmap items name every mapping (ksm.py)
    KSM = 1 << 21


class LRU(enum.IntEnum):
    """The five lists of a lruvec (spec §1.4); UNEVICTABLE has a size but no list."""

    INACTIVE_ANON = 0
    ACTIVE_ANON = 1
    INACTIVE_FILE = 2
    ACTIVE_FILE = 3
    UNEVICTABLE = 4
    NONE = 5


LRU_NAMES = {
    LRU.INACTIVE_ANON: "inactive_anon",
    LRU.ACTIVE_ANON: "active_anon",
    LRU.INACTIVE_FILE: "inactive_file",
    LRU.ACTIVE_FILE: "active_file",
    LRU.UNEVICTABLE: "unevictable",
    LRU.NONE: "",
}


class PTEBit(enum.IntFlag):
    PRESENT = 1
    WRITE = 2  # pte is writable (COW broken / shared writable)
    ZERO = 4  # maps the shared zero page (vm_normal_page() says "no page")
    DIRTY = 8
    MIGRATION = 16  # a migration entry (not present): idx/lv name the page being migrated
    PMD = 32  # a pmd mapping of a THP (pt_read reports it for each virtual page of the pmd)
    SUBPAGE = 64  # a pte mapping subpage (bits >> SUBPAGE_SHIFT) of THP head idx
    # a swap entry (not present): idx is the swap slot (mm/swapfile.py).  Only meaningful
    # with PRESENT clear: in a present SUBPAGE pte bit 7 is part of the subpage number.
    SWAP = 128


# A pte mapping a subpage of a THP keeps the subpage's number in the pte's high bits.
SUBPAGE_SHIFT = 7
AUX_ORDER_MASK = 0xFF  # struct page aux: compound order of a THP head (bits 0-7) ...
AUX_PTEMAP_SHIFT = 8  # ... and the number of pte mappings of its subpages (bits 8-31)


VMSTAT_EVENTS = (
    "unevictable_pgs_culled",
    "unevictable_pgs_scanned",
    "unevictable_pgs_rescued",
    "unevictable_pgs_mlocked",
    "unevictable_pgs_munlocked",
    "unevictable_pgs_cleared",
    "unevictable_pgs_stranded",
)


@dataclass(frozen=True)
class Page:
    """A decoded struct page record."""

    flags: int
    refcount: int
    mapcount: int
    prev: int  # list link, or mlock_count on the unevictable LRU
    next: int
    mapping: int
    index: int
    aux: int

    @classmethod
    def decode(cls, raw: bytes) -> Page:
        return cls(*RECORD.unpack(raw))

    def has(self, flag: PG) -> bool:
        return bool(self.flags & flag)

    @property
    def lru_list(self) -> LRU:
        if not self.flags & PG.LRU:
            return LRU.NONE
        if self.flags & PG.UNEVICTABLE:
            return LRU.UNEVICTABLE
        base = LRU.INACTIVE_ANON if self.flags & PG.SWAPBACKED else LRU.INACTIVE_FILE
        return LRU(base + (1 if self.flags & PG.ACTIVE else 0))

    @property
    def nr_pages(self) -> int:
        return 1 << (self.aux & AUX_ORDER_MASK) if self.flags & PG.HEAD else 1

    @property
    def pte_mapcount(self) -> int:
        """THP head: pte mappings of its subpages (``mapcount`` counts pmd mappings)."""
        return self.aux >> AUX_PTEMAP_SHIFT if self.flags & PG.HEAD else 0

    @property
    def mlock_count(self) -> int:
        """Only meaningful on the unevictable LRU (spec §1.3.3); -1 elsewhere."""
        if self.flags & PG.LRU and self.flags & PG.UNEVICTABLE:
            return self.prev
        return -1


def lua_header() -> str:
    """Constants for the Redis function library, rendered from this module."""
    lines = [f"local PG_{f.name} = {int(f.value)}" for f in PG]
    lines += [f"local LRU_{lru.name} = {int(lru.value)}" for lru in LRU]
    lines += [f"local PTE_{b.name} = {int(b.value)}" for b in PTEBit]
    lines += [
        f"local RECORD_SIZE = {RECORD_SIZE}",
        f"local CHUNK_PAGES = {CHUNK_PAGES}",
        f"local PTE_SIZE = {PTE_SIZE}",
        f"local PTRS_PER_PMD = {PTRS_PER_PMD}",
        f"local SUBPAGE_SHIFT = {SUBPAGE_SHIFT}",
        f"local AUX_PTEMAP_SHIFT = {AUX_PTEMAP_SHIFT}",
        "local RECORD_FMT = '<I4i4i4i4i4I4I8I4'",
        "local PTE_FMT = '<I4I2I2'",
    ]
    return "\n".join(lines) + "\n"
