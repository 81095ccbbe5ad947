"""vm_area_struct: VMAs, their flags, splitting and merging (spec §1.7)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, fields, replace


class VM(enum.IntFlag):
    """vm_flags bits, numbered as in include/linux/mm.h."""

    READ = 0x1
    WRITE = 0x2
    EXEC = 0x4
    SHARED = 0x8
    MAYREAD = 0x10
    MAYWRITE = 0x20
    MAYEXEC = 0x40
    MAYSHARE = 0x80
    PFNMAP = 0x400
    LOCKED = 0x2000
    IO = 0x4000
    DONTEXPAND = 0x40000
    LOCKONFAULT = 0x80000
    ACCOUNT = 0x100000
    NORESERVE = 0x200000
    HUGETLB = 0x400000
    MIXEDMAP = 0x10000000


VM_SPECIAL = VM.IO | VM.DONTEXPAND | VM.PFNMAP | VM.MIXEDMAP  # spec glossary
VM_LOCKED_MASK = VM.LOCKED | VM.LOCKONFAULT

# smaps VmFlags mnemonics (fs/proc/task_mmu.c show_smap_vma_flags), in the kernel's order.
_MNEMONICS = (
    (VM.READ, "rd"), (VM.WRITE, "wr"), (VM.EXEC, "ex"), (VM.SHARED, "sh"), (VM.MAYREAD, "mr"),
    (VM.MAYWRITE, "mw"), (VM.MAYEXEC, "me"), (VM.MAYSHARE, "ms"), (VM.PFNMAP, "pf"),
    (VM.LOCKED, "lo"), (VM.IO, "io"), (VM.DONTEXPAND, "de"), (VM.ACCOUNT, "ac"),
    (VM.NORESERVE, "nr"), (VM.HUGETLB, "ht"), (VM.MIXEDMAP, "mm"), (VM.LOCKONFAULT, "lf"),
)


def vm_flag_names(flags: int) -> tuple[str, ...]:
    return tuple(name for bit, name in _MNEMONICS if flags & bit)


@dataclass(frozen=True)
class Vma:
    """One VMA; addresses are virtual page numbers, [start, end)."""

    id: int
    start: int
    end: int
    flags: int
    file: int = 0  # file id; 0 = anonymous
    pgoff: int = 0  # page offset in the file (anonymous: the linear index base)
    anon_vma: int = 0  # anon_vma id: given at the first anonymous fault (anon_vma_prepare)
    # anon_vma_fork: a child's VMA also reaches its parents' anon_vmas (its chain is then not
    # singular, which forbids merging it with a VMA that has no anon_vma)
    anon_parents: tuple[int, ...] = ()
    # vm_ops->close (a SysV shm attach, mmsvc/mm/shm.py): a VMA that may not be removed by a
    # merge, so once split its pieces never merge again (mm/vma.c can_merge_remove_vma)
    vm_ops_close: bool = False

    @property
    def pages(self) -> int:
        return self.end - self.start

    @property
    def is_anon(self) -> bool:
        return self.file == 0

    @property
    def shared(self) -> bool:
        return bool(self.flags & VM.SHARED)

    @property
    def locked(self) -> bool:
        return bool(self.flags & VM.LOCKED)

    def linear_index(self, vpn: int) -> int:
        """Page index in the file (or anon_vma) for vpn (linear_page_index)."""
        return self.pgoff + (vpn - self.start)

    def clip(self, start: int, end: int, new_id: int) -> Vma:
        """The part of this VMA inside [start, end), keeping pgoff consistent."""
        s, e = max(self.start, start), min(self.end, end)
        return replace(self, id=new_id, start=s, end=e, pgoff=self.pgoff + (s - self.start))

    def can_merge_after(self, prev: Vma) -> bool:
        """vma_merge(): prev immediately precedes self with identical flags and backing."""
        return (
            prev.end == self.start
            and prev.flags == self.flags
            and prev.file == self.file
            and mergeable_anon_vma(prev, self)
            and prev.pgoff + prev.pages == self.pgoff
            and not (prev.vm_ops_close or self.vm_ops_close)
        )

    def may_map_anon(self, anon_vma: int) -> bool:
        """Pages of this anon_vma may be mapped here (the VMA's anon_vma_chain)."""
        return anon_vma != 0 and (anon_vma == self.anon_vma or anon_vma in self.anon_parents)

    def to_json(self) -> str:
        # a shallow dict, not asdict(): its recursive copy was a tenth of a fault's CPU time
        # (the one-round-trip fault sends the VMA's JSON to be compared with the stored one,
        # so the output must stay byte for byte what asdict gave)
        d = {f: getattr(self, f) for f in _FIELDS}
        d["anon_parents"] = list(self.anon_parents)
        if not self.vm_ops_close:
            del d["vm_ops_close"]  # the usual case: stored as before
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Vma:
        d = json.loads(raw)
        d["anon_parents"] = tuple(d.get("anon_parents", ()))
        return cls(**d)


_FIELDS = tuple(f.name for f in fields(Vma))


def mergeable_anon_vma(a: Vma, b: Vma) -> bool:
    """is_mergeable_anon_vma: the same anon_vma, or one VMA has none yet and the other's chain
    is singular (it was not made by fork)."""
    if a.anon_vma == b.anon_vma and a.anon_parents == b.anon_parents:
        return True
    if a.anon_vma == 0:
        return not b.anon_parents
    if b.anon_vma == 0:
        return not a.anon_parents
    return False


def anon_vma_compatible(a: Vma, b: Vma) -> bool:
    """anon_vma_compatible: neighbours that could one day merge may share an anon_vma."""
    access = VM.READ | VM.WRITE | VM.EXEC
    first, second = (a, b) if a.start < b.start else (b, a)
    return (first.end == second.start and first.file == second.file
            and not (a.flags ^ b.flags) & ~access
            and first.pgoff + first.pages == second.pgoff)
