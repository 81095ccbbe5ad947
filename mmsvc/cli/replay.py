"""Trace replay (spec: trace-format.md): run a scenario, print what Linux would show.

:func:`replay_trace` executes one scenario through anything with the client's surface (the
:class:`mmsvc_client.AsyncMmsvcClient`, or a kernel object in tests) and returns the result
document with exactly the keys, key order and string encodings of the trace format.

Conventions the format leaves open (also in docs/api.md):

* every mapping is placed with an address hint, 2 MiB aligned, with at least a 2 MiB gap to the
  next one, so scenario mappings never merge and fault-around windows align with the mapping;
* ``i`` and ``after_op`` are indexes into the scenario's ``ops`` list; ``after_op`` is the index
  of the last non-snapshot op before the snapshot (-1 if none);
* an op naming a process that does not exist (its fork failed) reports ``ESRCH``; an op on a
  mapping id whose mmap failed reports ``EINVAL`` (neither reaches the kernel);
* ``shm_create`` is shmget(IPC_PRIVATE) + shmat at the next address hint (the segment is the
  mapping ``id``); ``shm_lock`` / ``shm_unlock`` are shmctl SHM_LOCK / SHM_UNLOCK of that
  mapping's segment.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmsvc.mm.errors import KernelError
from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_LOCKED,
    MAP_NORESERVE,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MCL_CURRENT,
    MCL_FUTURE,
    MCL_ONFAULT,
    MLOCK_ONFAULT,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    Advice,
    FileSpec,
    MachineConfig,
    MmapArgs,
    PageInfo,
    ProcessSpec,
    ProcStatus,
    SmapsEntry,
)
from mmsvc_client import MmsvcError

#: Failures that are results (the errno of an emulated syscall): from the client, or from a
#: kernel object used directly.
SyscallError = (MmsvcError, KernelError)

RUNNER = "mmsvc"
DEFAULT_BATCH_SIZE = 15
VMSTAT_KEYS = (
    "unevictable_pgs_culled",
    "unevictable_pgs_scanned",
    "unevictable_pgs_rescued",
    "unevictable_pgs_mlocked",
    "unevictable_pgs_munlocked",
    "unevictable_pgs_cleared",
    "unevictable_pgs_stranded",
)
PROTS = {"rw": PROT_READ | PROT_WRITE, "r": PROT_READ, "w": PROT_WRITE, "none": 0}
MMAP_FLAGS = {
    "MAP_LOCKED": MAP_LOCKED,
    "MAP_POPULATE": MAP_POPULATE,
    "MAP_NORESERVE": MAP_NORESERVE,
}
MLOCK_FLAGS = {"MLOCK_ONFAULT": MLOCK_ONFAULT}
MCL_FLAGS = {"MCL_CURRENT": MCL_CURRENT, "MCL_FUTURE": MCL_FUTURE, "MCL_ONFAULT": MCL_ONFAULT}
ADVICE = {a.name: a for a in Advice}
RLIM_INFINITY = (1 << 64) - 1
UNSUPPORTED_OPS: frozenset[str] = frozenset()  # every op of the format is replayed

# Placement of scenario mappings (see module docstring).
MAP_BASE = 0x10_0000_0000
MAP_ALIGN = 2 << 20


class ReplayError(ValueError):
    """The trace is malformed (unknown op, missing field...)."""


class Target(Protocol):
    """What replay needs: the client's (= KernelAPI's) methods."""

    async def create_machine(self, cfg: MachineConfig) -> str: ...
    async def delete_machine(self, machine: str) -> None: ...
    async def create_file(self, machine: str, spec: FileSpec) -> None: ...
    async def create_process(self, machine: str, spec: ProcessSpec) -> int: ...
    async def fork(self, machine: str, pid: int) -> int: ...
    async def exit(self, machine: str, pid: int) -> None: ...
    async def setrlimit(self, machine: str, pid: int, soft: int, hard: int) -> None: ...
    async def drop_capability(self, machine: str, pid: int, cap: str) -> None: ...
    async def mmap(self, machine: str, pid: int, args: MmapArgs) -> int: ...
    async def munmap(self, machine: str, pid: int, addr: int, length: int) -> None: ...
    async def mprotect(
        self, machine: str, pid: int, addr: int, length: int, prot: int
    ) -> None: ...
    async def madvise(
        self, machine: str, pid: int, addr: int, length: int, advice: Advice
    ) -> None: ...
    async def mlock(self, machine: str, pid: int, addr: int, length: int, flags: int) -> None: ...
    async def munlock(self, machine: str, pid: int, addr: int, length: int) -> None: ...
    async def mlockall(self, machine: str, pid: int, flags: int) -> None: ...
    async def munlockall(self, machine: str, pid: int) -> None: ...
    async def fault(self, machine: str, pid: int, addr: int, length: int, write: bool) -> int: ...
    async def drain(self, machine: str, all_cpus: bool) -> None: ...
    async def vmstat(self, machine: str) -> dict[str, int]: ...
    async def proc_status(self, machine: str, pid: int) -> ProcStatus: ...
    async def smaps(self, machine: str, pid: int) -> list[SmapsEntry]: ...
    async def page_flags(
        self, machine: str, pid: int, addr: int, length: int
    ) -> list[PageInfo]: ...
    async def file_pages(self, machine: str, file: str) -> list[PageInfo]: ...
    async def shm_create(
        self, machine: str, pid: int, pages: int, addr: int = 0
    ) -> tuple[int, int]: ...
    async def shm_ctl(self, machine: str, pid: int, shmid: int, cmd: str) -> None: ...


class _OpFailed(Exception):
    """An op failed without reaching the kernel (see the module docstring)."""

    def __init__(self, errno: str) -> None:
        super().__init__(errno)
        self.errno = errno


@dataclass
class _Mapping:
    addr: int
    pages: int
    shmid: int | None = None  # a SysV segment (shm_create)


@dataclass
class _Proc:
    name: str
    pid: int
    alive: bool = True
    mappings: dict[str, _Mapping] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # ids whose mmap failed
    failed_pages: dict[str, int] = field(default_factory=dict)  # their requested sizes


def _flag_bits(value: Any, names: Mapping[str, int], what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ReplayError(f"{what}: expected a list of names or an int, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        value = [value]
    bits = 0
    for name in value:
        if name not in names:
            raise ReplayError(f"{what}: unknown flag {name!r}")
        bits |= names[name]
    return bits


def _rlimit(value: Any) -> int:
    if value in (-1, "unlimited", "infinity", "RLIM_INFINITY"):
        return RLIM_INFINITY
    if not isinstance(value, int) or value < 0:
        raise ReplayError(f"setrlimit: bad limit {value!r}")
    return value


def _bit(flag: bool) -> str:
    return "1" if flag else "0"


def page_strings(pages: Sequence[PageInfo]) -> dict[str, str]:
    """The per-page strings of one mapping, in the trace format's key order."""
    out: dict[str, list[str]] = {
        k: [] for k in ("present", "mlocked", "unevictable", "vma_locked", "vma_onfault", "lru",
                        "kind")
    }
    for p in pages:
        if not p.vma_present:
            for chars in out.values():
                chars.append("x")
            continue
        out["present"].append(_bit(p.present))
        for key, flag in (("mlocked", p.mlocked), ("unevictable", p.unevictable), ("lru", p.lru)):
            out[key].append(_bit(flag) if p.present else ".")
        out["vma_locked"].append(_bit(p.vma_locked))
        out["vma_onfault"].append(_bit(p.vma_onfault))
        out["kind"].append(p.kind if p.present else ".")
    return {k: "".join(v) for k, v in out.items()}


def file_strings(pages: Sequence[PageInfo], length: int) -> dict[str, str]:
    """A prefilled file's page-cache bits: ``mlocked``, ``unevictable``, ``lru``."""
    out: dict[str, list[str]] = {"mlocked": [], "unevictable": [], "lru": []}
    for i in range(length):
        p = pages[i] if i < len(pages) else None
        present = p is not None and p.present
        out["mlocked"].append(_bit(p.mlocked) if p is not None and present else ".")
        out["unevictable"].append(_bit(p.unevictable) if p is not None and present else ".")
        out["lru"].append(_bit(p.lru) if p is not None and present else ".")
    return {k: "".join(v) for k, v in out.items()}


def smaps_sum(entries: Sequence[SmapsEntry], start: int, end: int) -> dict[str, int]:
    """Sum of smaps Size/Rss/Locked over the VMAs inside ``[start, end)``, and their count."""
    inside = [e for e in entries if e.start >= start and e.end <= end]
    return {
        "size_kb": sum(e.size_kb for e in inside),
        "rss_kb": sum(e.rss_kb for e in inside),
        "locked_kb": sum(e.locked_kb for e in inside),
        "vmas": len(inside),
    }


class Replayer:
    """Executes one scenario against ``target``."""

    def __init__(self, target: Target, trace: Mapping[str, Any], batch_size: int,
                 populate_drain: bool = False,
                 settings: Mapping[str, object] | None = None) -> None:
        self.populate_drain = populate_drain
        self.settings = dict(settings or {})
        self.k = target
        self.trace = trace
        self.batch_size = batch_size
        self.machine = ""
        self.procs: dict[str, _Proc] = {}
        self.files: dict[str, int] = {}  # prefilled files: name -> pages
        self.baseline: dict[str, int] = {}
        self.next_hint = MAP_BASE

    async def run(self, keep_machine: bool = False) -> dict[str, Any]:
        name = self.trace.get("name", "")
        cfg = MachineConfig(
            thp=bool(self.trace.get("thp", False)),  # the format's extension "thp": true
            # as on a host with THP enabled=madvise: anonymous THPs only by MADV_COLLAPSE
            thp_anon_fault=False,
            # the linux-6.18 profile (populate drains): Linux 6.5+'s large-folio mlock rules
            large_folio_mlock=self.populate_drain,
            mlock_batch_len=self.batch_size,
            lru_add_batch_len=self.batch_size,
            name=f"replay:{name}"[:256],
            populate_drain=self.populate_drain,
        )
        # --set: machine settings on top of the profile and the batch size (§10.1 tunables)
        cfg = dataclasses.replace(cfg, **self.settings)  # type: ignore[arg-type]
        self.machine = await self.k.create_machine(cfg)
        try:
            await self._setup()
            ops_out: list[dict[str, Any]] = []
            snapshots: list[dict[str, Any]] = []
            for i, op in enumerate(self._ops()):
                kind = op.get("op")
                if kind == "snapshot":
                    # "after_op": the index of the op just before the snapshot
                    snapshots.append(await self._snapshot(str(op.get("label", "")), i - 1))
                    continue
                ops_out.append(await self._op(i, op))
            return {
                "scenario": name,
                "runner": RUNNER,
                "ops": ops_out,
                "snapshots": snapshots,
            }
        finally:
            if not keep_machine:
                await self.k.delete_machine(self.machine)

    def _ops(self) -> list[Mapping[str, Any]]:
        ops = self.trace.get("ops", [])
        if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
            raise ReplayError("ops must be a list of objects")
        return ops

    # -- world set-up ---------------------------------------------------------------------

    async def _setup(self) -> None:
        files = self.trace.get("files", {}) or {}
        if not isinstance(files, dict):
            raise ReplayError("files must be an object")
        for fname, spec in files.items():
            pages = int(spec.get("pages", 0))
            prefill = bool(spec.get("prefill", False))
            await self.k.create_file(self.machine, FileSpec(fname, pages, prefill))
            if prefill:
                self.files[fname] = pages
        for pname in self.trace.get("procs", ["p0"]) or ["p0"]:
            pid = await self.k.create_process(self.machine, ProcessSpec())
            self.procs[str(pname)] = _Proc(str(pname), pid)
        # "Batches start empty": flush whatever set-up left in this CPU's batches.
        await self.k.drain(self.machine, False)
        self.baseline = await self.k.vmstat(self.machine)

    # -- ops --------------------------------------------------------------------------------

    async def _op(self, i: int, op: Mapping[str, Any]) -> dict[str, Any]:
        kind = str(op.get("op"))
        pname = str(op.get("proc", "p0"))
        entry: dict[str, Any] = {"i": i, "op": kind}
        if kind != "drain":
            entry["proc"] = pname
        errno: str | None = None
        try:
            await self._execute(kind, pname, op)
        except SyscallError as e:
            if e.errno is None or e.errno == "INTERNAL":  # transport, deadline, server bug
                raise
            errno = e.errno
        except _OpFailed as e:
            errno = e.errno
        entry["errno"] = errno
        return entry

    def _proc(self, pname: str) -> _Proc:
        proc = self.procs.get(pname)
        if proc is None:
            raise _OpFailed("ESRCH")
        return proc

    def _range(self, proc: _Proc, op: Mapping[str, Any]) -> tuple[int, int]:
        """(addr, length in bytes) of ``from``/``to`` of the op's mapping."""
        mid = str(op.get("id", ""))
        m = proc.mappings.get(mid)
        if m is None:
            if mid in proc.failed:
                raise _OpFailed("EINVAL")
            raise ReplayError(f"op {op.get('op')}: process {proc.name} has no mapping {mid!r}")
        lo = int(op.get("from", 0))
        hi = int(op.get("to", m.pages))
        if not 0 <= lo <= hi <= m.pages:
            raise ReplayError(f"op {op.get('op')}: bad page range [{lo}, {hi}) of {mid!r}")
        return m.addr + lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE

    async def _execute(self, kind: str, pname: str, op: Mapping[str, Any]) -> None:
        k, machine = self.k, self.machine
        if kind == "drain":
            await k.drain(machine, False)
            return
        if kind in UNSUPPORTED_OPS:
            raise _OpFailed("ENOSYS")
        proc = self._proc(pname)
        pid = proc.pid
        if kind == "mmap":
            await self._mmap(proc, op)
        elif kind == "touch":
            addr, length = self._range(proc, op)
            if length:
                await k.fault(machine, pid, addr, length, bool(op.get("write", True)))
        elif kind == "mlock":
            addr, length = self._range(proc, op)
            length += int(op.get("extra_bytes", 0))
            flags = _flag_bits(op.get("flags"), MLOCK_FLAGS, "mlock flags")
            if op.get("onfault"):
                flags |= MLOCK_ONFAULT
            if op.get("syscall", "mlock2" if flags else "mlock") == "mlock":
                flags = 0  # mlock(2) has no flags argument
            await k.mlock(machine, pid, addr, length & (RLIM_INFINITY), flags)
        elif kind == "munlock":
            addr, length = self._range(proc, op)
            length += int(op.get("extra_bytes", 0))
            await k.munlock(machine, pid, addr, length & RLIM_INFINITY)
        elif kind == "mlockall":
            await k.mlockall(machine, pid, _flag_bits(op.get("flags"), MCL_FLAGS, "mlockall"))
        elif kind == "munlockall":
            await k.munlockall(machine, pid)
        elif kind == "munmap":
            addr, length = self._range(proc, op)
            await k.munmap(machine, pid, addr, length)
        elif kind == "madvise":
            addr, length = self._range(proc, op)
            raw = op.get("advice")
            advice = ADVICE.get(str(raw))
            if advice is None and isinstance(raw, int) and not isinstance(raw, bool):
                if raw in {int(a) for a in ADVICE.values()}:
                    advice = next(a for a in ADVICE.values() if int(a) == raw)
                else:
                    raise _OpFailed("EINVAL")  # madvise(2) with an unknown advice value
            if advice is None:
                raise ReplayError(f"madvise: unknown advice {raw!r}")
            await k.madvise(machine, pid, addr, length, advice)
        elif kind == "mprotect":
            addr, length = self._range(proc, op)
            await k.mprotect(machine, pid, addr, length, self._prot(op))
        elif kind == "fork":
            child = op.get("child")
            if not child:
                raise ReplayError("fork: missing child")
            child_pid = await k.fork(machine, pid)
            self.procs[str(child)] = _Proc(
                str(child),
                child_pid,
                mappings=copy.deepcopy(proc.mappings),
                failed=set(proc.failed),
            )
        elif kind == "exit":
            await k.exit(machine, pid)
            proc.alive = False
        elif kind == "setrlimit":
            soft = _rlimit(op.get("soft_bytes"))
            hard = _rlimit(op.get("hard_bytes", op.get("soft_bytes")))
            await k.setrlimit(machine, pid, soft, hard)
        elif kind == "drop_cap":
            await k.drop_capability(machine, pid, str(op.get("cap", "CAP_IPC_LOCK")))
        elif kind == "shm_create":
            await self._shm_create(proc, op)
        elif kind in ("shm_lock", "shm_unlock"):
            self._range(proc, op)  # the mapping must exist (EINVAL if its create failed)
            shmid = proc.mappings[str(op.get("id", ""))].shmid
            if shmid is None:
                raise ReplayError(f"{kind}: mapping {op.get('id')!r} is not a SysV segment")
            await k.shm_ctl(machine, pid, shmid,
                            "SHM_LOCK" if kind == "shm_lock" else "SHM_UNLOCK")
        else:
            raise ReplayError(f"unknown op {kind!r}")

    @staticmethod
    def _prot(op: Mapping[str, Any]) -> int:
        prot = op.get("prot", "rw")
        if isinstance(prot, int) and not isinstance(prot, bool):
            return prot
        if prot not in PROTS:
            raise ReplayError(f"unknown prot {prot!r}")
        return PROTS[str(prot)]

    async def _mmap(self, proc: _Proc, op: Mapping[str, Any]) -> None:
        mid = str(op.get("id", ""))
        pages = int(op.get("pages", 0))
        kind = op.get("kind", "anon")
        if kind not in ("anon", "file"):
            raise ReplayError(f"mmap: unknown kind {kind!r}")
        flags = MAP_SHARED if op.get("shared", False) else MAP_PRIVATE
        if kind == "anon":
            flags |= MAP_ANONYMOUS
        flags |= _flag_bits(op.get("flags"), MMAP_FLAGS, "mmap flags")
        length = pages * PAGE_SIZE
        hint = self.next_hint
        self.next_hint += (length + 2 * MAP_ALIGN - 1) // MAP_ALIGN * MAP_ALIGN
        args = MmapArgs(
            length=length,
            prot=self._prot(op),
            flags=flags,
            file=str(op.get("file", "")) if kind == "file" else "",
            offset=int(op.get("offset", 0)) * PAGE_SIZE,
            addr=hint,
        )
        proc.mappings.pop(mid, None)
        try:
            addr = await self.k.mmap(self.machine, proc.pid, args)
        except SyscallError:
            proc.failed.add(mid)
            proc.failed_pages[mid] = pages
            raise
        proc.failed.discard(mid)
        proc.failed_pages.pop(mid, None)
        proc.mappings[mid] = _Mapping(addr, pages)

    async def _shm_create(self, proc: _Proc, op: Mapping[str, Any]) -> None:
        mid = str(op.get("id", ""))
        pages = int(op.get("pages", 0))
        hint = self.next_hint
        self.next_hint += (pages * PAGE_SIZE + 2 * MAP_ALIGN - 1) // MAP_ALIGN * MAP_ALIGN
        proc.mappings.pop(mid, None)
        try:
            shmid, addr = await self.k.shm_create(self.machine, proc.pid, pages, hint)
        except SyscallError:
            proc.failed.add(mid)
            proc.failed_pages[mid] = pages
            raise
        proc.failed.discard(mid)
        proc.failed_pages.pop(mid, None)
        proc.mappings[mid] = _Mapping(addr, pages, shmid)

    # -- snapshots -------------------------------------------------------------------------

    async def _snapshot(self, label: str, after_op: int) -> dict[str, Any]:
        k, machine = self.k, self.machine
        vm = await k.vmstat(machine)
        vmstat = {key: vm.get(key, 0) - self.baseline.get(key, 0) for key in VMSTAT_KEYS}
        procs: dict[str, Any] = {}
        for proc in self.procs.values():
            procs[proc.name] = await self._proc_snapshot(proc)
        files: dict[str, Any] = {}
        for fname, pages in self.files.items():
            files[fname] = file_strings(await k.file_pages(machine, fname), pages)
        return {
            "label": label,
            "after_op": after_op,
            "vmstat": vmstat,
            "procs": procs,
            "files": files,
        }

    async def _proc_snapshot(self, proc: _Proc) -> dict[str, Any]:
        if not proc.alive:
            return {"alive": False}
        try:
            status = await self.k.proc_status(self.machine, proc.pid)
        except SyscallError as e:
            if e.errno == "ESRCH":
                return {"alive": False}
            raise
        if not status.alive:
            return {"alive": False}
        smaps = await self.k.smaps(self.machine, proc.pid)
        mappings: dict[str, Any] = {}
        for mid, m in proc.mappings.items():
            length = m.pages * PAGE_SIZE
            pages = (
                await self.k.page_flags(self.machine, proc.pid, m.addr, length) if m.pages else []
            )
            mappings[mid] = {
                "pages": m.pages,
                **page_strings(pages),
                "smaps": smaps_sum(smaps, m.addr, m.addr + length),
            }
        for mid, npages in proc.failed_pages.items():
            # a mapping whose mmap failed: no VMA covers any of its pages
            gone = "x" * npages
            mappings[mid] = {
                "pages": npages, "present": gone, "mlocked": gone, "unevictable": gone,
                "vma_locked": gone, "vma_onfault": gone, "lru": gone, "kind": gone,
                "smaps": {"size_kb": 0, "rss_kb": 0, "locked_kb": 0, "vmas": 0},
            }
        return {"alive": True, "VmLck_kb": status.vm_lck_kb, "mappings": mappings}


async def replay_trace(
    target: Target,
    trace: Mapping[str, Any],
    batch_size: int = DEFAULT_BATCH_SIZE,
    keep_machine: bool = False,
    populate_drain: bool = False,
    settings: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """Run one scenario on a fresh machine and return its result document.  ``settings``:
    MachineConfig fields (see :func:`parse_setting`) applied on top of the others."""
    return await Replayer(target, trace, batch_size, populate_drain,
                          settings).run(keep_machine)


async def replay_traces(
    target: Target,
    traces: Sequence[Mapping[str, Any]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    populate_drain: bool = False,
    settings: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """One document for one trace, ``{"results": [...]}`` for several."""
    results = [await replay_trace(target, t, batch_size, populate_drain=populate_drain,
                                  settings=settings)
               for t in traces]
    if len(results) == 1:
        return results[0]
    return {"results": results}


_BOOLS = {"on": True, "true": True, "1": True, "yes": True,
          "off": False, "false": False, "0": False, "no": False}
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(MachineConfig)}


def parse_setting(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` for ``replay --set``: KEY a MachineConfig field (docs/api.md "Machine
    configuration"), VALUE parsed against its type - on/off for switches, an enum's value
    (``mapcount_zero``, ``rmap_walk_level``), an integer, or comma-separated memcgs.
    ValueError with the accepted values otherwise."""
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    f = _CONFIG_FIELDS.get(key)
    if not sep or f is None:
        known = ", ".join(_CONFIG_FIELDS)
        raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of {known}")
    default = getattr(MachineConfig(), key)
    if isinstance(default, bool):
        if raw.lower() not in _BOOLS:
            raise ValueError(f"{key}={raw!r}: expected on or off")
        return key, _BOOLS[raw.lower()]
    if isinstance(default, enum.Enum):
        values = {str(v.value): v for v in type(default)}
        if raw not in values:
            raise ValueError(f"{key}={raw!r}: expected one of {', '.join(values)}")
        return key, values[raw]
    if isinstance(default, int):
        try:
            return key, int(raw, 0)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected an integer") from None
    if isinstance(default, tuple):
        names = tuple(x.strip() for x in raw.split(",") if x.strip())
        if not names:
            raise ValueError(f"{key}={raw!r}: expected comma-separated names")
        return key, names
    return key, raw


def load_trace(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        trace = json.load(f)
    if not isinstance(trace, dict):
        raise ReplayError(f"{path}: a trace is a JSON object")
    return trace


def dumps(doc: Mapping[str, Any], indent: int | None = 2) -> str:
    return json.dumps(doc, indent=indent, ensure_ascii=False)
