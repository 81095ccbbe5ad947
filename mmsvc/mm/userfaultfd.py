"""mm/userfaultfd.c: UFFDIO_COPY into a range of a process (spec §3.3, §3.10, S29).

``__mcopy_atomic`` fills missing pages of a range registered for missing faults, one page
at a time, each with a newly allocated page:

* a private mapping (anonymous, or a private shmem mapping): ``mcopy_atomic_pte`` - a new
  anonymous page, then ``mfill_atomic_install_pte``: ``page_add_new_anon_rmap`` +
  ``lru_cache_add_inactive_or_unevictable`` (§2.9: ``mlock_new_page`` in a VM_LOCKED vma,
  §3.3 "userfaultfd copy into anon vmas");
* a shared shmem mapping: ``shmem_mfill_atomic_pte`` - the page enters the page cache and is
  ``lru_cache_add``-ed (the lru_add batch) *before* ``page_add_file_rmap``, which in a
  VM_LOCKED vma mlocks it (an LRU_PAGE entry, §3.2.2, §3.10): a single drain processes the
  lru_add batch first (mlock_count 1), a mlock batch flushed first finds the page off the LRU
  (count 0, an undercount, as S12).

Both reuse the fault path's page programs (``memory.py``/``rmap.py``): no protocol here.

Registration is not a separate call: the emulator delivers no missing faults (a fault on the
range is served as without userfaultfd), so UFFDIO_REGISTER would change nothing observable
but its checks, which the copy makes itself: the range must lie in one VMA
(``find_dst_vma``: ENOENT) that userfaultfd can register (``vma_can_userfault``: anonymous or
shmem, not VM_SPECIAL/hugetlb: EINVAL).  Pages have no contents, so there is no source range.

Like the ioctl, the copy stops at the first page that is not missing (a pte, a swap entry, a
shmem page already in the page cache): the pages before it are copied, then EEXIST (the
ioctl's ``uffdio_copy.copy``, the bytes copied, is in the error message).  EFAULT beyond the
end of a shmem file, ENOMEM when out of memory, likewise after the pages before.
"""

from __future__ import annotations

import uuid

from mmsvc.mm.errors import KernelError, einval
from mmsvc.mm.machine import Machine
from mmsvc.mm.memory import FaultRace, Faults, Programs, add_new_anon_page, cache_flags
from mmsvc.mm.mm_struct import MmState, Pte, pt_read
from mmsvc.mm.page import PTEBit
from mmsvc.mm.rmap import page_add_rmap_ops
from mmsvc.mm.swap import Op, Swap
from mmsvc.mm.swapfile import swap_ptes
from mmsvc.mm.vma import VM, VM_SPECIAL, Vma
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore


def dst_vma(mm: MmState, start: int, end: int) -> Vma:
    """find_dst_vma + vma_can_userfault for [start, end)."""
    vma = mm.find(start)
    if vma is None or end > vma.end:
        raise KernelError("ENOENT", "destination range not within one mapping")
    if vma.flags & (VM_SPECIAL | VM.HUGETLB):
        raise einval("userfaultfd cannot register VM_SPECIAL or hugetlb mappings")
    return vma


class Userfaultfd:
    """UFFDIO_COPY on behalf of one CPU (the caller holds mmap_lock for read)."""

    def __init__(self, store: RedisStore, swap: Swap, faults: Faults) -> None:
        self.store = store
        self.swap = swap
        self.faults = faults

    async def copy(self, m: Machine, mm: MmState, start: int, end: int) -> int:
        """Fill [start, end) with new pages; returns the pages copied (see the module doc
        for the errors, raised after the pages before the failing one are copied)."""
        vma = dst_vma(mm, start, end)
        shmem = vma.shared
        if not vma.is_anon and not m.file_by_id(vma.file).shmem:
            raise einval("userfaultfd cannot register a regular file mapping")
        stop, why = await self._first_busy(m, mm, vma, start, end)
        if not shmem and vma.anon_vma == 0 and stop > start:
            vma = await self.faults.anon_vma_prepare(m, mm, vma)
        copied = 0
        for vpn in range(start, stop):
            try:
                if shmem:
                    await self._shmem_page(m, mm, vma, vpn)
                else:
                    await self._anon_page(m, mm, vma, vpn)
            except KernelError as exc:
                if isinstance(exc, FaultRace):  # a racing fault filled the pte first
                    exc = KernelError("EEXIST", f"page at {vpn * 4096:#x} present")
                raise KernelError(exc.errno, f"{exc.message} ({copied} pages copied)") from exc
            copied += 1
        if why is not None:
            raise KernelError(why[0], f"{why[1]} ({copied} pages copied)")
        return copied

    async def _first_busy(self, m: Machine, mm: MmState, vma: Vma, start: int, end: int,
                          ) -> tuple[int, tuple[str, str] | None]:
        """Where the copy will stop: the first page that is not missing (EEXIST) or, for a
        shared shmem mapping, beyond the end of the file (EFAULT)."""
        busy = set(await pt_read(self.store, mm.key, start, end))
        if m.cfg.swap_pages:
            busy |= set(await swap_ptes(self.store, mm.key, start, end))
        limit = end
        why: tuple[str, str] | None = None
        if vma.shared:
            f = m.file_by_id(vma.file)
            beyond = [v for v in range(start, end) if vma.linear_index(v) >= f.pages]
            if beyond:
                limit = beyond[0]
                why = ("EFAULT", f"page at {limit * 4096:#x} beyond the end of the file")
            indices = [vma.linear_index(v) for v in range(start, limit)]
            if indices:
                found = await self.store.fcall("pc_peek", keys.file(m.mid, vma.file), *indices)
                busy |= {start + i for i, hit in enumerate(found) if hit}
        first = min((v for v in busy if v < limit), default=None)
        if first is not None:
            return first, ("EEXIST", f"page at {first * 4096:#x} present")
        return limit, why

    async def _anon_page(self, m: Machine, mm: MmState, vma: Vma, vpn: int) -> None:
        """mcopy_atomic_pte: a new anonymous page, mapped dirty and writable if VM_WRITE."""
        progs = Programs.empty()
        add_new_anon_page(progs, m, mm, vma, vpn, 1)
        idx = (await progs.execute(self.swap, m))[0]
        bits = PTEBit.PRESENT | PTEBit.DIRTY | (PTEBit.WRITE if vma.flags & VM.WRITE else 0)
        await self.faults._install(m, mm, vma, [Pte(vpn, idx, mm.lv, int(bits))], {}, {vpn},
                                   last=False)

    async def _shmem_page(self, m: Machine, mm: MmState, vma: Vma, vpn: int) -> None:
        """shmem_mfill_atomic_pte: a new page in the page cache via the lru_add batch, then
        mfill_atomic_install_pte's page_add_file_rmap (+ mlock_vma_page, §3.10)."""
        fkey = keys.file(m.mid, vma.file)
        index = vma.linear_index(vpn)
        owner = uuid.uuid4().hex[:12]
        looked = await self.store.fcall("pc_lookup_flags", fkey, owner, index)
        mapping_flags = int(looked.pop())  # SHM_LOCK's mark (shm.py)
        state = looked[0].decode()
        if state == "eof":
            raise KernelError("EFAULT", f"page at {vpn * 4096:#x} beyond the end of the file")
        if state != "new":  # read in or being read in meanwhile: shmem_add_to_page_cache
            raise KernelError("EEXIST", f"page at {vpn * 4096:#x} present")
        lv = mm.lv
        ops: list[Op] = [["A", cache_flags(True) | mapping_flags, vma.file, index, 0],
                         ["G", -1], ["C", -1], *page_add_rmap_ops(m, vma, -1)]
        try:
            idx = (await Programs([(lv, ops)]).execute(self.swap, m))[0]
        except BaseException:
            await self.faults._drop_reservations(fkey, owner, [index])
            raise
        await self.store.fcall("pc_commit", fkey, owner, index, f"{lv}|{idx}")
        bits = PTEBit.PRESENT | PTEBit.DIRTY | (PTEBit.WRITE if vma.flags & VM.WRITE else 0)
        await self.faults._install(m, mm, vma, [Pte(vpn, idx, lv, int(bits))], {}, {vpn},
                                   last=False)
