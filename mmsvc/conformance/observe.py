"""Read what Linux lets you observe, in the shapes of the result document.

Everything here only reads /proc: pagemap and smaps walk page tables under mmap_lock without
touching LRU state, kpageflags reads page flags, status and vmstat read counters.  It runs in the
driver process on the driver CPU while every scenario process is blocked in read(), so a snapshot
changes nothing it observes.  File page-cache observation is done by the C coordinator (it must
map the file; see cmd_observe in scenario_exec.c) and only decoded here.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from mmsvc.conformance.protocol import (
    KPF_ANON,
    KPF_LRU,
    KPF_MLOCKED,
    KPF_UNEVICTABLE,
    KPF_ZERO_PAGE,
    PAGE,
    VMSTAT_KEYS,
)

PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1


def read_vmstat() -> dict[str, int]:
    """The seven unevictable_pgs_* counters (system wide, summed over CPUs by the kernel)."""
    values: dict[str, int] = {}
    with open("/proc/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key in VMSTAT_KEYS:
                values[key] = int(value)
    missing = [k for k in VMSTAT_KEYS if k not in values]
    if missing:
        raise OSError(f"/proc/vmstat lacks {missing}")
    return values


def vmstat_delta(now: dict[str, int], base: dict[str, int]) -> dict[str, int]:
    return {k: now[k] - base[k] for k in VMSTAT_KEYS}


@dataclass
class Vma:
    start: int
    end: int
    sizes_kb: dict[str, int] = field(default_factory=dict)
    flags: frozenset[str] = frozenset()


def parse_smaps(text: str) -> list[Vma]:
    """Parse /proc/PID/smaps into VMAs with their kB fields and VmFlags."""
    vmas: list[Vma] = []
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = head.split("-")
            vmas.append(Vma(int(lo, 16), int(hi, 16)))
        elif head == "VmFlags:" and vmas:
            vmas[-1].flags = frozenset(line.split()[1:])
        elif head.endswith(":") and vmas:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                vmas[-1].sizes_kb[head[:-1]] = int(parts[1])
    return vmas


def read_vmlck_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    raise OSError(f"/proc/{pid}/status has no VmLck")


class KpageFlags:
    """Random access to /proc/kpageflags (root only)."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/kpageflags", os.O_RDONLY)

    def get(self, pfn: int) -> int:
        data = os.pread(self._fd, 8, pfn * 8)
        if len(data) != 8:
            raise OSError(f"kpageflags has no pfn {pfn:#x}")
        value: int = struct.unpack("<Q", data)[0]
        return value

    def close(self) -> None:
        os.close(self._fd)


def _bit(flags: int, bit: int) -> str:
    return "1" if flags >> bit & 1 else "0"


def _kind(flags: int) -> str:
    if flags >> KPF_ZERO_PAGE & 1:
        return "z"
    return "a" if flags >> KPF_ANON & 1 else "f"


def mapping_view(
    addr: int, pages: int, vmas: list[Vma], pagemap: bytes, kpf: KpageFlags
) -> dict[str, Any]:
    """Per-page strings and smaps sums of one mapping's original range (trace-format.md)."""
    starts = [v.start for v in vmas]
    cols: dict[str, list[str]] = {
        k: []
        for k in ("present", "mlocked", "unevictable", "vma_locked", "vma_onfault", "lru", "kind")
    }
    for i in range(pages):
        va = addr + i * PAGE
        j = bisect.bisect_right(starts, va) - 1
        vma = vmas[j] if j >= 0 and vmas[j].start <= va < vmas[j].end else None
        if vma is None:
            for col in cols.values():
                col.append("x")
            continue
        entry: int = struct.unpack_from("<Q", pagemap, i * 8)[0]
        cols["vma_locked"].append("1" if "lo" in vma.flags else "0")
        cols["vma_onfault"].append("1" if "lf" in vma.flags else "0")
        if entry & PM_PRESENT and entry & PM_PFN_MASK:
            flags = kpf.get(entry & PM_PFN_MASK)
            cols["present"].append("1")
            cols["mlocked"].append(_bit(flags, KPF_MLOCKED))
            cols["unevictable"].append(_bit(flags, KPF_UNEVICTABLE))
            cols["lru"].append(_bit(flags, KPF_LRU))
            cols["kind"].append(_kind(flags))
        else:
            cols["present"].append("0")
            for k in ("mlocked", "unevictable", "lru", "kind"):
                cols[k].append(".")
    end = addr + pages * PAGE
    inside = [v for v in vmas if v.start < end and v.end > addr]
    view: dict[str, Any] = {"pages": pages}
    for k in ("present", "mlocked", "unevictable", "vma_locked", "vma_onfault", "lru", "kind"):
        view[k] = "".join(cols[k])
    view["smaps"] = {
        "size_kb": sum(v.sizes_kb.get("Size", 0) for v in inside),
        "rss_kb": sum(v.sizes_kb.get("Rss", 0) for v in inside),
        "locked_kb": sum(v.sizes_kb.get("Locked", 0) for v in inside),
        "vmas": len(inside),
    }
    return view


def proc_view(pid: int, mappings: list[tuple[str, int, int]], kpf: KpageFlags) -> dict[str, Any]:
    """Snapshot of one live process: VmLck and each (id, addr, pages) mapping."""
    vmlck = read_vmlck_kb(pid)
    with open(f"/proc/{pid}/smaps") as f:
        vmas = parse_smaps(f.read())
    views: dict[str, Any] = {}
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        for ident, addr, pages in mappings:
            pagemap = os.pread(fd, pages * 8, addr // PAGE * 8) if pages > 0 else b""
            if len(pagemap) != pages * 8:
                raise OSError(f"short pagemap read for pid {pid}")
            views[ident] = mapping_view(addr, pages, vmas, pagemap, kpf)
    finally:
        os.close(fd)
    return {"alive": True, "VmLck_kb": vmlck, "mappings": views}


def file_view(tokens: list[str]) -> dict[str, str]:
    """Decode the coordinator's per-page kpageflags tokens ("-" = not in the page cache)."""
    cols: dict[str, list[str]] = {"mlocked": [], "unevictable": [], "lru": []}
    for tok in tokens:
        if tok == "-":
            for col in cols.values():
                col.append(".")
            continue
        flags = int(tok, 16)
        cols["mlocked"].append(_bit(flags, KPF_MLOCKED))
        cols["unevictable"].append(_bit(flags, KPF_UNEVICTABLE))
        cols["lru"].append(_bit(flags, KPF_LRU))
    return {k: "".join(v) for k, v in cols.items()}
