"""Plain data passed between the gRPC layer, the CLI and the emulated kernel.

These dataclasses are the emulator's whole public surface (see :mod:`mmsvc.mm.kernel`); the
protobuf messages in ``proto/mmsvc/v1`` mirror them one to one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

PAGE_SIZE = 4096
PAGE_SHIFT = 12

# Linux flag values, so that clients can pass the numbers they know from the man pages.
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_LOCKED = 0x2000
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MLOCK_ONFAULT = 0x01
MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4


class Protocol(enum.StrEnum):
    """Which mlock design a machine runs (spec §10.1 ``protocol``)."""

    REWORK = "rework"
    LEGACY = "legacy"


class MigrationDrain(enum.StrEnum):
    """Where migration drains the local mlock batch (spec §10.1 ``migration_drain``, [11/13])."""

    AFTER_EACH_LOCKED_UNMAP = "after_each_locked_unmap"  # the rework: §4.2.1-§4.2.3
    OFF = "off"  # before 11/13: no drain, the entries' references fail the freeze (S14)
    RMAP_WALK_LEVEL = "rmap_walk_level"  # Hugh's first attempt: once per rmap walk


class MlockCountInitLruAdd(enum.StrEnum):
    """mlock_count given by lru-add to a page it culls (§8.2 ``mlock_count_init_lru_add``)."""

    ZERO = "0"  # 10/13
    BOOL_MLOCKED = "bool_mlocked"  # v1 06/13: !!PG_mlocked


class MlockCountInitCull(enum.StrEnum):
    """mlock_count given by __mlock_page's cull (§8.2 ``mlock_count_init_cull``)."""

    BOOL_MLOCKED = "bool_mlocked"  # 10/13: !!PG_mlocked
    ONE = "1"  # v1 06/13


class MlockBatchScope(enum.StrEnum):
    """Which mlock/munlock calls use the per-CPU batch (§10.1 ``mlock_batch_scope``)."""

    PER_CPU_ALL = "per_cpu_all"  # the rework: every caller
    MASS_ONLY = "mass_only"  # only the mlock/munlock range walk; synchronous elsewhere


class FinalClearance(enum.StrEnum):
    """When PG_mlocked left on a page is cleared (§6, §10.1 ``final_clearance``, [05/13])."""

    REFCOUNT_ZERO = "refcount_zero"  # 05/13: at the final free (__page_cache_release)
    MAPCOUNT_ZERO = "mapcount_zero"  # before 05/13: clear_page_mlock when the last map goes


class MunlockHookPosition(enum.StrEnum):
    """Where page_remove_rmap calls munlock_vma_page (§3.4.1, ``munlock_hook_position``)."""

    END = "end"  # 04/13: "end was easier for assertions in testing"
    START = "start"  # before the mapcount is lowered


class Advice(enum.IntEnum):
    """madvise(2) advice values, numbered as in Linux."""

    MADV_DONTNEED = 4
    MADV_FREE = 8
    MADV_COLD = 20
    MADV_PAGEOUT = 21
    MADV_POPULATE_READ = 22
    MADV_POPULATE_WRITE = 23
    MADV_DONTNEED_LOCKED = 24
    MADV_COLLAPSE = 25  # Linux 6.1: khugepaged's collapse, synchronous (mm/khugepaged.py)


@dataclass(frozen=True)
class MachineConfig:
    """An isolated emulated machine (spec §1; tunables of §10.1)."""

    nodes: int = 1
    frames_per_node: int = 262144  # 1 GiB of 4 KiB frames per node
    memcgs: tuple[str, ...] = ("root",)
    thp: bool = False
    swap_pages: int = 0
    mlock_batch_len: int = 15  # PAGEVEC_SIZE in the seed era; 31 on Linux 6.18
    lru_add_batch_len: int = 15
    protocol: Protocol = Protocol.REWORK
    fault_around_pages: int = 16
    hpage_pmd_nr: int = 512
    name: str = ""
    # Linux 6.18 drains the local batches when a populate finishes; the seed kernel did not.
    populate_drain: bool = False
    # Spec §10.1 tunables: the defaults are the rework's choices; the alternatives reproduce
    # the designs the thread considered (docs/api.md "Machine configuration").
    vm_io_guard: bool = True  # §3.6; off reproduces the double count (S23)
    migration_drain: MigrationDrain = MigrationDrain.AFTER_EACH_LOCKED_UNMAP  # §4.2 (S14)
    mlock_count_init_lru_add: MlockCountInitLruAdd = MlockCountInitLruAdd.ZERO  # §8.2
    mlock_count_init_cull: MlockCountInitCull = MlockCountInitCull.BOOL_MLOCKED  # §8.2
    reclaim_locked_activate: bool = True  # §5.2.3; off: PAGEREF_RECLAIM, §5.3 decides
    migration_newpage_lru_first: bool = True  # §4.2.4; off: pre-08 order, count not rebuilt
    mlock_batch_scope: MlockBatchScope = MlockBatchScope.PER_CPU_ALL  # §10.1
    final_clearance: FinalClearance = FinalClearance.REFCOUNT_ZERO  # §6
    munlock_hook_position: MunlockHookPosition = MunlockHookPosition.END  # §3.4.1
    stat_refresh_drains_all: bool = False  # [Hugh->Babka 11/13]: vmstat drains every CPU first
    new_anon_checks_vm_special: bool = True  # §2.9; off: VM_LOCKED alone -> mlock_new_page
    thp_pte_holds_in_locked_vma: bool = False  # §5.2.2 [open]: on, pte maps hold a THP (S18)
    # THP enabled=always: an anonymous write fault on an empty aligned pmd allocates a THP;
    # off: enabled=madvise with no MADV_HUGEPAGE - small pages, THPs only by MADV_COLLAPSE
    thp_anon_fault: bool = True
    # Linux 6.5+'s large-folio mlock rules (off: the rework's §3.9, pte maps never counted):
    # mlock_pte_range mlocks a pte-mapped THP wholly inside the VM_LOCKED vma once, every
    # pte removal from a VM_LOCKED vma munlocks it (once per run of ptes), reclaim mlocks a
    # THP wholly pte-mapped in a VM_LOCKED vma instead of splitting it
    large_folio_mlock: bool = False
    # §10.1: the probability (per mille) that a task moves to another CPU of its worker at a
    # reschedule point (mm/sched.py); 0: tasks stay where they are placed
    task_migrate_permille: int = 0


@dataclass(frozen=True)
class ProcessSpec:
    """A new emulated process (trace-format: CAP_IPC_LOCK held, RLIMIT_MEMLOCK 8 MiB)."""

    memcg: str = "root"
    node: int = 0
    rlimit_memlock_soft: int = 8 << 20
    rlimit_memlock_hard: int = 8 << 20
    cap_ipc_lock: bool = True


@dataclass(frozen=True)
class FileSpec:
    """A file with a page cache.

    ``kind`` "tmpfs" (the default, what traces use): shmem pages, swap-backed, on the anon LRU
    lists; "regular": a disk file's page cache, on the file LRU lists, reclaimable by dropping
    clean pages.
    """

    name: str
    pages: int
    prefill: bool = False
    kind: str = "tmpfs"


@dataclass(frozen=True)
class MmapArgs:
    """mmap(2): ``length`` in bytes; ``file`` names a file of the machine for file mappings."""

    length: int
    prot: int = PROT_READ | PROT_WRITE
    flags: int = MAP_PRIVATE | MAP_ANONYMOUS
    file: str = ""
    offset: int = 0  # bytes, page aligned
    addr: int = 0  # hint (or fixed address with MAP_FIXED)


@dataclass(frozen=True)
class PageInfo:
    """One virtual page as /proc/PID/pagemap + /proc/kpageflags would show it (plus internals)."""

    addr: int
    vma_present: bool  # a VMA covers the address
    present: bool
    kind: str  # "a" anon, "f" page cache, "z" zero page, "." absent
    pfn: int = 0
    mlocked: bool = False
    unevictable: bool = False
    lru: bool = False
    active: bool = False
    lru_list: str = ""  # inactive_anon, active_anon, inactive_file, active_file, unevictable, ""
    mlock_count: int = -1  # -1 when not on the unevictable LRU (no trustworthy count)
    refcount: int = 0
    mapcount: int = 0
    node: int = 0
    memcg: str = ""
    vma_locked: bool = False
    vma_onfault: bool = False
    locked: bool = False  # PG_locked
    batch_residue: bool = False  # PG_RESIDUE: known exception X4
    ksm: bool = False  # PageKsm (kpageflags KPF_KSM): a page merged by KSM (mm/ksm.py)


@dataclass(frozen=True)
class SmapsEntry:
    start: int
    end: int
    size_kb: int
    rss_kb: int
    locked_kb: int
    vm_flags: tuple[str, ...]


@dataclass(frozen=True)
class ProcStatus:
    pid: int
    alive: bool
    vm_lck_kb: int
    vm_size_kb: int
    vm_rss_kb: int
    memcg: str
    node: int
    mlockall_flags: int
    cap_ipc_lock: bool
    rlimit_memlock_soft: int
    rlimit_memlock_hard: int


@dataclass(frozen=True)
class LockStatRow:
    """One row of /proc/lock_stat (times in microseconds)."""

    lock_class: str
    instance: str
    con_bounces: int
    contentions: int
    waittime_min: float
    waittime_max: float
    waittime_total: float
    acq_bounces: int
    acquisitions: int
    holdtime_min: float
    holdtime_max: float
    holdtime_total: float


@dataclass
class CheckReport:
    """Result of the §8.5 consistency checker."""

    quiescent: bool
    violations: list[str] = field(default_factory=list)
    undercounts: int = 0  # Q5 health metric: M(p) >= 1 and not PG_mlocked, or count < M(p)
    known_exceptions: dict[str, int] = field(default_factory=dict)  # X1-X4, "isolated"
    pages_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations
