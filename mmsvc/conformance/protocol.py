"""Constants shared with scenario_exec.c and the Linux x86-64 ABI values the trace names map to.

Kept in one place so that the C runtime's op codes and the kernel's flag values are not spread
through the driver.  x86-64 only, like the runtime.
"""

from __future__ import annotations

# runtime op codes: keep in sync with the enum in scenario_exec.c
OP_PING = 0
OP_SYS = 1
OP_TOUCH = 2
OP_FORK = 3
OP_EXIT = 4
OP_RLIMIT = 5
OP_DROPCAP = 6
OP_SHMNEW = 7
OP_DRAIN = 8

RLIM_KEEP = -2  # OP_RLIMIT: leave this limit as it is
RLIM_INFINITY = -1  # (unsigned long)-1

# x86-64 syscall numbers
SYS_MMAP = 9
SYS_MPROTECT = 10
SYS_MUNMAP = 11
SYS_MADVISE = 28
SYS_SHMCTL = 31
SYS_MLOCK = 149
SYS_MUNLOCK = 150
SYS_MLOCKALL = 151
SYS_MUNLOCKALL = 152
SYS_MLOCK2 = 325

PAGE = 4096

PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000
MAP_FLAGS = {
    "MAP_LOCKED": 0x2000,
    "MAP_POPULATE": 0x8000,
    "MAP_NORESERVE": 0x4000,
}

MLOCK_FLAGS = {"MLOCK_ONFAULT": 0x1}
MCL_FLAGS = {"MCL_CURRENT": 0x1, "MCL_FUTURE": 0x2, "MCL_ONFAULT": 0x4}

MADV = {
    "MADV_NORMAL": 0,
    "MADV_RANDOM": 1,
    "MADV_SEQUENTIAL": 2,
    "MADV_WILLNEED": 3,
    "MADV_DONTNEED": 4,
    "MADV_FREE": 8,
    "MADV_REMOVE": 9,
    "MADV_DONTFORK": 10,
    "MADV_DOFORK": 11,
    "MADV_WIPEONFORK": 18,
    "MADV_KEEPONFORK": 19,
    "MADV_COLD": 20,
    "MADV_PAGEOUT": 21,
    "MADV_POPULATE_READ": 22,
    "MADV_POPULATE_WRITE": 23,
    "MADV_DONTNEED_LOCKED": 24,
    "MADV_COLLAPSE": 25,
}

SHM_LOCK = 11
SHM_UNLOCK = 12

CAPS = {"CAP_IPC_LOCK": 14, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24}

SIGNALS = {7: "SIGBUS", 11: "SIGSEGV"}

# /proc/kpageflags bits (Documentation/admin-guide/mm/pagemap.rst)
KPF_LRU = 5
KPF_ANON = 12
KPF_UNEVICTABLE = 18
KPF_ZERO_PAGE = 24
KPF_MLOCKED = 33

# the seven event counters of the result document, in the document's order
VMSTAT_KEYS = (
    "unevictable_pgs_culled",
    "unevictable_pgs_scanned",
    "unevictable_pgs_rescued",
    "unevictable_pgs_mlocked",
    "unevictable_pgs_munlocked",
    "unevictable_pgs_cleared",
    "unevictable_pgs_stranded",
)
