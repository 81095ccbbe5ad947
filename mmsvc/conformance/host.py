"""Host prerequisites and CPU placement for the kernel runner.

Why: the oracle needs root (pagemap pfns, kpageflags, capset), x86-64 (the runtime's raw
syscalls), two CPUs (one for the scenario, one for everything else), a compiler and one 2 MiB
hugetlb page (where the scenario runtime lives).  Checking all of it up front turns a confusing
failure half-way through a trace into one HostUnsupported with a reason.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass

from mmsvc.conformance.errors import HostUnsupported

OVERCOMMIT = "/proc/sys/vm/nr_overcommit_hugepages"
HUGEPAGES_2M = "/sys/kernel/mm/hugepages/hugepages-2048kB"


@dataclass(frozen=True)
class Cpus:
    driver: int
    scenario: int


def check_host() -> None:
    """Raise HostUnsupported unless this machine can run the oracle at all."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise HostUnsupported("the kernel runner needs Linux on x86-64")
    if os.geteuid() != 0:
        raise HostUnsupported("the kernel runner needs root (pagemap pfns, kpageflags)")
    try:
        with open("/proc/kpageflags", "rb") as f:
            f.read(8)
    except OSError as exc:
        raise HostUnsupported(f"/proc/kpageflags is not readable: {exc}") from exc
    if not os.path.isdir(HUGEPAGES_2M):
        raise HostUnsupported("no 2 MiB hugetlb support (hugetlbfs) in this kernel")
    if not os.path.isdir("/dev/shm"):
        raise HostUnsupported("/dev/shm (tmpfs) is missing")


SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
ANON_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _setting(path: str, what: str) -> str:
    try:
        with open(path) as f:
            setting = f.read()
    except OSError as exc:
        raise HostUnsupported(f"no {what} THP support ({path}): {exc}") from exc
    return setting[setting.find("[") + 1:setting.find("]")]


def check_thp_host() -> None:
    """A trace with "thp": true (MADV_COLLAPSE) needs THPs that appear only when the trace
    makes them: shmem_enabled ``never`` or ``advise`` - with ``always`` the prefill would
    already write huge pages, with ``deny`` MADV_COLLAPSE is refused - and anonymous
    ``enabled`` not ``always`` (write faults would map THPs; mmsvc's replay makes small
    pages there, its ``thp_anon_fault`` off)."""
    chosen = _setting(SHMEM_THP, "shmem")
    if chosen not in ("never", "advise"):
        raise HostUnsupported(f"shmem_enabled is [{chosen}]: THP traces need never or advise")
    chosen = _setting(ANON_THP, "anonymous")
    if chosen == "always":
        raise HostUnsupported("transparent_hugepage/enabled is [always]: THP traces need "
                              "madvise or never")


def choose_cpus(scenario: int | None = None, driver: int | None = None) -> Cpus:
    """Scenario CPU defaults to the highest allowed CPU, the driver to the lowest other one."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise HostUnsupported("the kernel runner needs two CPUs (scenario + driver)")
    scen = allowed[-1] if scenario is None else scenario
    drv = next(c for c in allowed if c != scen) if driver is None else driver
    if scen == drv or scen not in allowed or drv not in allowed:
        raise HostUnsupported(f"bad CPU choice: scenario {scen}, driver {drv}, allowed {allowed}")
    return Cpus(driver=drv, scenario=scen)


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run the calling thread on CPU for the duration (so it stays off the scenario CPU)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def ensure_hugetlb_page() -> None:
    """Make sure one 2 MiB hugetlb page can be had for the runtime region.

    A free pooled page or headroom for a surplus page is enough.  Otherwise raise
    vm.nr_overcommit_hugepages by one: surplus pages are allocated on demand and go back to the
    buddy allocator when the executor exits, so this costs no memory while no run is active.
    """
    free = _read_int(f"{HUGEPAGES_2M}/free_hugepages")
    surplus = _read_int(f"{HUGEPAGES_2M}/surplus_hugepages")
    overcommit = _read_int(OVERCOMMIT)
    if free >= 1 or overcommit - surplus >= 1:
        return
    try:
        with open(OVERCOMMIT, "w") as f:
            f.write(str(surplus + 1))
    except OSError as exc:
        raise HostUnsupported(f"cannot raise {OVERCOMMIT}: {exc}") from exc
