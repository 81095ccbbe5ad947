"""Execute one attempt of a trace on the host kernel through the C coordinator.

Why this shape: the op table of trace-format.md maps almost one-to-one onto syscalls made by
the scenario process itself (OP_SYS); the few ops that need more (touch, fork, exit, rlimit,
capabilities, SysV shm, drain) have their own runtime ops.  Mapping addresses are chosen here:
every mapping gets its own 2 MiB aligned slot with a gap after it, so scenario mappings never
merge, and a 16-page fault-around window is aligned to the mapping start.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any

from mmsvc.conformance import observe
from mmsvc.conformance import protocol as P
from mmsvc.conformance import trace as T
from mmsvc.conformance.coordinator import Coordinator
from mmsvc.conformance.errors import ExecutorFailure, ScenarioError, Unsupported
from mmsvc.conformance.host import check_thp_host

MAP_BASE = 0x1000_0000_0000  # 16 TiB: far below the mmap base, above any binary
SLOT_ALIGN = 2 << 20
GAP_PAGES = 16


@dataclass
class Mapping:
    addr: int
    pages: int
    shmid: int | None = None


@dataclass
class Proc:
    name: str
    slot: int
    alive: bool = True
    pid: int = 0
    mappings: dict[str, Mapping] = field(default_factory=dict)


def errno_name(ret: int) -> str | None:
    """Negative raw syscall return -> errno name; anything else -> None (success)."""
    if ret >= 0 or ret < -4095:
        return None
    return errno.errorcode.get(-ret, f"E{-ret}")


class Execution:
    """State of one attempt: processes, mappings, files; runs ops and takes snapshots."""

    def __init__(self, coord: Coordinator, trace: dict[str, Any]) -> None:
        self.coord = coord
        self.trace = trace
        self.procs: dict[str, Proc] = {}
        self.files: dict[str, tuple[int, int, bool]] = {}  # name -> (fd, pages, prefill)
        self._next_addr = MAP_BASE
        self._next_slot = 1
        self.baseline: dict[str, int] = {}
        self.drainer_pid = 0

    def our_pids(self) -> set[int]:
        """Every process of this attempt (for the neighbour scan)."""
        return {self.coord.pid, self.drainer_pid, *(p.pid for p in self.procs.values())}

    # ---- world set-up (before the baseline) ----
    def setup(self) -> None:
        if self.trace.get("thp"):
            check_thp_host()
        for name, spec in self.trace.get("files", {}).items():
            prefill = bool(spec.get("prefill", False))
            fd = int(self.coord.ok(f"F {int(spec['pages'])} {int(prefill)}")[0])
            self.files[name] = (fd, int(spec["pages"]), prefill)
        self.coord.ok("D")  # prefilled pages: out of the driver CPU's lru_add batch
        self.drainer_pid = int(self.coord.ok("S 0")[0])
        for name in self.trace.get("procs", ["p0"]):
            slot = self._take_slot()
            thp = " 1" if self.trace.get("thp") else ""  # "thp": true (docs/conformance.md)
            pid = int(self.coord.ok(f"S {slot}{thp}")[0])
            self.procs[name] = Proc(name, slot, pid=pid)
        self.coord.ok("R")  # batches start empty

    def _take_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def _alloc(self, pages: int) -> int:
        addr = self._next_addr
        span = (max(pages, 0) + GAP_PAGES) * P.PAGE
        self._next_addr += (span + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN
        return addr

    # ---- helpers ----
    def _proc(self, op: T.Op) -> Proc:
        name = T.proc_of(op)
        proc = self.procs.get(name)
        if proc is None or not proc.alive:
            raise ScenarioError(f"op {dict(op)} names a process that does not exist (now)")
        return proc

    def _mapping(self, proc: Proc, op: T.Op) -> Mapping:
        ident = op.get("id")
        if not isinstance(ident, str) or ident not in proc.mappings:
            raise ScenarioError(f"{proc.name} has no mapping {ident!r}")
        return proc.mappings[ident]

    def _span(self, proc: Proc, op: T.Op, *, extra: bool = False) -> tuple[int, int]:
        m = self._mapping(proc, op)
        lo, hi = T.page_range(op, m.pages)
        length = (hi - lo) * P.PAGE + (int(op.get("extra_bytes", 0)) if extra else 0)
        return m.addr + lo * P.PAGE, length

    def _run(self, proc: Proc, op: int, *args: int) -> tuple[int, int]:
        res = self.coord.command(proc.slot, op, *args)
        if res is None:
            raise ExecutorFailure(f"scenario process {proc.name} died unexpectedly")
        return res

    def _sys(self, proc: Proc, nr: int, *args: int) -> str | None:
        return errno_name(self._run(proc, P.OP_SYS, nr, *args)[0])

    # ---- ops: each returns the errno name or None ----
    def do(self, op: T.Op) -> str | None:
        name = op["op"]
        handler = getattr(self, "op_" + name, None)
        if handler is None:
            raise Unsupported(f"op {name!r} is not supported by the kernel runner")
        result: str | None = handler(op)
        return result

    def op_mmap(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        ident, pages = op.get("id"), op.get("pages")
        if not isinstance(ident, str) or not isinstance(pages, int):
            raise ScenarioError(f"mmap needs id and pages: {dict(op)}")
        kind = op.get("kind", "anon")
        flags = P.MAP_SHARED if op.get("shared", False) else P.MAP_PRIVATE
        flags |= P.MAP_FIXED_NOREPLACE | T.flag_bits(op.get("flags"), P.MAP_FLAGS, "mmap flag")
        fd = -1
        if kind == "anon":
            flags |= P.MAP_ANONYMOUS
        elif kind == "file":
            fname = op.get("file")
            if fname not in self.files:
                raise ScenarioError(f"mmap of unknown file {fname!r}")
            fd = self.files[fname][0]
        else:
            raise ScenarioError(f"bad mmap kind {kind!r}")
        addr = self._alloc(pages)
        proc.mappings[ident] = Mapping(addr, pages)
        offset = int(op.get("offset", 0)) * P.PAGE
        return self._sys(
            proc, P.SYS_MMAP, addr, pages * P.PAGE, T.prot_bits(op.get("prot")), flags, fd, offset
        )

    def op_touch(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        m = self._mapping(proc, op)
        lo, hi = T.page_range(op, m.pages)
        write = 1 if op.get("write", True) else 0
        sig, _done = self._run(proc, P.OP_TOUCH, m.addr + lo * P.PAGE, max(hi - lo, 0), write)
        return P.SIGNALS.get(sig, f"SIG{sig}") if sig else None

    def op_mlock(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        addr, length = self._span(proc, op, extra=True)
        flags = T.flag_bits(op.get("flags"), P.MLOCK_FLAGS, "mlock2 flag")
        if op.get("onfault"):
            flags |= P.MLOCK_FLAGS["MLOCK_ONFAULT"]
        syscall = op.get("syscall", "mlock2" if ("flags" in op or "onfault" in op) else "mlock")
        if syscall == "mlock":
            if flags:
                raise ScenarioError("mlock(2) takes no flags; use syscall mlock2")
            return self._sys(proc, P.SYS_MLOCK, addr, length)
        if syscall != "mlock2":
            raise ScenarioError(f"bad mlock syscall {syscall!r}")
        return self._sys(proc, P.SYS_MLOCK2, addr, length, flags)

    def op_munlock(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        return self._sys(proc, P.SYS_MUNLOCK, *self._span(proc, op, extra=True))

    def op_mlockall(self, op: T.Op) -> str | None:
        flags = T.flag_bits(op.get("flags"), P.MCL_FLAGS, "mlockall flag")
        return self._sys(self._proc(op), P.SYS_MLOCKALL, flags)

    def op_munlockall(self, op: T.Op) -> str | None:
        return self._sys(self._proc(op), P.SYS_MUNLOCKALL)

    def op_munmap(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        return self._sys(proc, P.SYS_MUNMAP, *self._span(proc, op))

    def op_madvise(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        advice = op.get("advice")
        if isinstance(advice, int) and not isinstance(advice, bool):
            value = advice
        elif isinstance(advice, str) and advice in P.MADV:
            value = P.MADV[advice]
        else:
            raise ScenarioError(f"unknown madvise advice {advice!r}")
        return self._sys(proc, P.SYS_MADVISE, *self._span(proc, op), value)

    def op_mprotect(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        return self._sys(proc, P.SYS_MPROTECT, *self._span(proc, op), T.prot_bits(op.get("prot")))

    def op_fork(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        child = op.get("child")
        if not isinstance(child, str) or child in self.procs:
            raise ScenarioError(f"fork needs a new child name, got {child!r}")
        slot = self._take_slot()
        ret, _ = self._run(proc, P.OP_FORK, slot)
        if ret < 0:
            return errno_name(ret)
        self.coord.ok(f"P {slot} {ret}")
        self.procs[child] = Proc(
            child,
            slot,
            pid=ret,
            mappings={k: Mapping(m.addr, m.pages, m.shmid) for k, m in proc.mappings.items()},
        )
        return None

    def op_exit(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        self.coord.ok(f"X {proc.slot}")
        proc.alive = False
        return None

    def op_drain(self, op: T.Op) -> str | None:
        self.coord.ok("R")
        return None

    def op_setrlimit(self, op: T.Op) -> str | None:
        def limit(key: str) -> int:
            if key not in op:
                return P.RLIM_KEEP
            value = op[key]
            if value is None or value == "unlimited" or value == -1:
                return P.RLIM_INFINITY
            if not isinstance(value, int) or value < 0:
                raise ScenarioError(f"bad {key} {value!r}")
            return value

        proc = self._proc(op)
        ret, _ = self._run(proc, P.OP_RLIMIT, limit("soft_bytes"), limit("hard_bytes"))
        return errno_name(ret)

    def op_drop_cap(self, op: T.Op) -> str | None:
        cap = op.get("cap", "CAP_IPC_LOCK")
        if cap not in P.CAPS:
            raise ScenarioError(f"unknown capability {cap!r}")
        ret, _ = self._run(self._proc(op), P.OP_DROPCAP, P.CAPS[cap])
        return errno_name(ret)

    def op_shm_create(self, op: T.Op) -> str | None:
        proc = self._proc(op)
        ident, pages = op.get("id"), op.get("pages")
        if not isinstance(ident, str) or not isinstance(pages, int):
            raise ScenarioError(f"shm_create needs id and pages: {dict(op)}")
        addr = self._alloc(pages)
        shmid, attached = self._run(proc, P.OP_SHMNEW, addr, pages * P.PAGE)
        proc.mappings[ident] = Mapping(addr, pages, shmid if shmid >= 0 else None)
        return errno_name(shmid) or errno_name(attached)

    def _shmctl(self, op: T.Op, cmd: int) -> str | None:
        proc = self._proc(op)
        m = self._mapping(proc, op)
        if m.shmid is None:
            raise ScenarioError(f"mapping {op.get('id')!r} is not a SysV segment")
        return self._sys(proc, P.SYS_SHMCTL, m.shmid, cmd, 0)

    def op_shm_lock(self, op: T.Op) -> str | None:
        return self._shmctl(op, P.SHM_LOCK)

    def op_shm_unlock(self, op: T.Op) -> str | None:
        return self._shmctl(op, P.SHM_UNLOCK)

    # ---- observation ----
    def snapshot(self, label: str, after_op: int) -> dict[str, Any]:
        vmstat = observe.vmstat_delta(observe.read_vmstat(), self.baseline)
        procs: dict[str, Any] = {}
        kpf = observe.KpageFlags()
        try:
            for name, proc in self.procs.items():
                if not proc.alive:
                    procs[name] = {"alive": False}
                    continue
                maps = [(k, m.addr, m.pages) for k, m in proc.mappings.items()]
                procs[name] = observe.proc_view(proc.pid, maps, kpf)
        finally:
            kpf.close()
        files: dict[str, Any] = {}
        for fname, (fd, pages, prefill) in self.files.items():
            if prefill:
                tokens = self.coord.ok(f"O {fd} {pages}") if pages > 0 else []
                files[fname] = observe.file_view(tokens)
        return {
            "label": label,
            "after_op": after_op,
            "vmstat": vmstat,
            "procs": procs,
            "files": files,
        }
