"""Operations the state machines issue, the client-side model they are resolved against, and
their execution over gRPC.

Hypothesis draws :class:`AbstractOp` values: small integers that only name *which* process,
mapping, page range and variant to use.  At the start of a step each one is resolved against
the :class:`World` model (the processes and mappings the client knows of) into a
:class:`Call` with concrete pids and addresses; the calls of a step then run concurrently, each
on the worker (CPU) its op names.  Abstract ops shrink well and a resolved step prints as a
readable trace line (:meth:`Call.describe`).

The model is a guide for picking plausible arguments, not an oracle: the invariants are checked
against the server's own views and checker (``invariants.py``).  It is updated from successful
calls only (mmap's address, munmap's hole, fork's child, exit).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import strategies as st

from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_LOCKED,
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
    MmapArgs,
    ProcessSpec,
)
from mmsvc_client import AsyncMmsvcClient, MmsvcError

from .cluster import SERVER_FAULTS

P = PAGE_SIZE
MAX_PROCS = 8  # live processes
MAX_MAPS = 6  # mappings per process

# kinds, with their drawing weights; earlier kinds are what examples shrink towards
KIND_WEIGHTS: dict[str, int] = {
    "fault": 6,
    "mmap": 5,
    "mlock": 5,
    "munlock": 4,
    "munmap": 3,
    "mprotect": 2,
    "madvise": 3,
    "mlockall": 2,
    "munlockall": 2,
    "fork": 2,
    "exit": 1,
    "spawn": 1,
    "migrate": 2,
    "reclaim": 2,
    "drain": 2,
    "isolate": 1,
}
KINDS = [k for k, w in KIND_WEIGHTS.items() for _ in range(w)]

MLOCKALL_FLAGS = (
    MCL_CURRENT,
    MCL_FUTURE,
    MCL_CURRENT | MCL_FUTURE,
    MCL_CURRENT | MCL_ONFAULT,
    MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT,
)
ADVICES = (
    Advice.MADV_DONTNEED,
    Advice.MADV_COLD,
    Advice.MADV_POPULATE_WRITE,
    Advice.MADV_POPULATE_READ,
    Advice.MADV_DONTNEED_LOCKED,
    Advice.MADV_PAGEOUT,
    Advice.MADV_FREE,
)
PROTS = (PROT_READ | PROT_WRITE, PROT_READ, 0)

# mmap variants: (file, shared, MAP_LOCKED)
MMAP_VARIANTS: tuple[tuple[str, bool, bool], ...] = (
    ("", False, False),
    ("", False, True),
    ("", True, False),
    ("tmp", True, False),
    ("reg", True, False),
    ("reg", False, False),
    ("tmp", False, True),
    ("reg", True, True),
)
FILE_PAGES = {"tmp": 32, "reg": 32}
FILE_KINDS = {"tmp": "tmpfs", "reg": "regular"}


@dataclass(frozen=True)
class AbstractOp:
    """One operation as Hypothesis draws it (meaning of the fields depends on ``kind``)."""

    kind: str
    cpu: int  # worker; taken modulo the number of workers
    proc: int  # which live process (modulo)
    target: int  # which of its mappings (modulo)
    start: int  # first page of the range inside the mapping (modulo its size)
    npages: int  # pages (clipped to the mapping, unless ``arg2`` says overrun)
    arg: int  # variant: mmap kind, mlock2 flags, advice, prot, mlockall flags, node, write
    arg2: int  # secondary variant: MAP_POPULATE / read-only mmap, range overrun


def abstract_ops() -> st.SearchStrategy[AbstractOp]:
    return st.builds(
        AbstractOp,
        kind=st.sampled_from(KINDS),
        cpu=st.integers(0, 3),
        proc=st.integers(0, MAX_PROCS - 1),
        target=st.integers(0, MAX_MAPS - 1),
        start=st.integers(0, 15),
        npages=st.integers(1, 16),
        arg=st.integers(0, 7),
        arg2=st.integers(0, 7),
    )


@dataclass
class Mapping:
    """A mapping as the client knows it: [addr, addr + pages*P) of ``file`` from ``offset``."""

    name: str
    addr: int
    pages: int
    file: str  # "" anonymous
    offset: int  # in pages
    shared: bool

    @property
    def end(self) -> int:
        return self.addr + self.pages * P

    def file_index(self, addr: int) -> int:
        return self.offset + (addr - self.addr) // P


@dataclass
class Proc:
    pid: int
    cpu_hint: int = 0
    maps: list[Mapping] = field(default_factory=list)
    alive: bool = True


@dataclass
class World:
    """What the client knows of one emulated machine."""

    machine: str
    nodes: int
    memcgs: tuple[str, ...]
    procs: list[Proc] = field(default_factory=list)
    shm_files: int = 0  # MAP_SHARED|MAP_ANONYMOUS mappings made (each an unnamed shmem file)
    names: int = 0

    def live(self) -> list[Proc]:
        return [p for p in self.procs if p.alive]

    def proc(self, pid: int) -> Proc:
        return next(p for p in self.procs if p.pid == pid)

    def new_name(self) -> str:
        self.names += 1
        return f"m{self.names}"

    def punch(self, pid: int, addr: int, end: int) -> None:
        """munmap [addr, end) from the model."""
        proc = self.proc(pid)
        out: list[Mapping] = []
        for m in proc.maps:
            if m.end <= addr or m.addr >= end:
                out.append(m)
                continue
            if m.addr < addr:
                out.append(replace(m, pages=(addr - m.addr) // P))
            if m.end > end:
                out.append(replace(m, name=self.new_name(), addr=end, pages=(m.end - end) // P,
                                   offset=m.file_index(end)))
        proc.maps = out


@dataclass
class Call:
    """A resolved operation: what exactly is sent, on which CPU."""

    kind: str
    cpu: int
    pid: int = 0
    addr: int = 0
    length: int = 0
    flags: int = 0
    mapping: str = ""
    node: int | None = None
    mmap: MmapArgs | None = None
    spec: ProcessSpec | None = None
    detail: str = ""

    def describe(self) -> str:
        rng = ""
        if self.length:
            rng = f" {self.mapping}@{self.addr:#x}+{self.length // P}p"
        return f"cpu{self.cpu} {self.kind}(pid {self.pid}{rng}{self.detail})"


def _range(op: AbstractOp, m: Mapping) -> tuple[int, int]:
    start = op.start % m.pages
    n = 1 + (op.npages - 1) % (m.pages - start)
    if op.arg2 == 7:
        n += 2  # overrun past the end of the mapping: partial-range error paths
    return m.addr + start * P, n * P


def resolve(op: AbstractOp, world: World, workers: int) -> Call:
    """Turn an abstract op into a concrete call against the current model."""
    cpu = op.cpu % workers
    live = world.live()
    kind = op.kind
    if not live or (kind == "spawn" and len(live) < MAX_PROCS):
        node = op.arg % world.nodes
        memcg = world.memcgs[op.arg2 % len(world.memcgs)]
        return Call("spawn", cpu, spec=ProcessSpec(memcg=memcg, node=node),
                    detail=f" node {node} memcg {memcg}")
    proc = live[op.proc % len(live)]
    if kind == "spawn":
        kind = "fork"
    if kind == "fork" and len(live) >= MAX_PROCS:
        kind = "exit"
    if kind == "exit" and len(live) <= 1:
        kind = "munlockall"
    if kind == "mmap" and len(proc.maps) >= MAX_MAPS:
        kind = "munmap"
    needs_map = kind in ("fault", "mlock", "munlock", "munmap", "mprotect", "madvise", "migrate",
                         "isolate")
    if needs_map and not proc.maps:
        kind = "mmap"
    pid = proc.pid
    if kind == "mmap":
        file, shared, locked = MMAP_VARIANTS[op.arg % len(MMAP_VARIANTS)]
        pages = op.npages
        offset = 0
        if file:
            pages = min(pages, FILE_PAGES[file])
            offset = op.start % (FILE_PAGES[file] - pages + 1)
        flags = (MAP_SHARED if shared else MAP_PRIVATE) | (0 if file else MAP_ANONYMOUS)
        if locked:
            flags |= MAP_LOCKED
        if op.arg2 in (1, 2):
            flags |= MAP_POPULATE
        prot = PROT_READ if op.arg2 == 3 else PROT_READ | PROT_WRITE
        args = MmapArgs(length=pages * P, prot=prot, flags=flags, file=file, offset=offset * P)
        what = f"{'shared' if shared else 'private'} {file or 'anon'}"
        extras = [x for x, on in (("LOCKED", locked), ("POPULATE", bool(flags & MAP_POPULATE)),
                                  ("RO", prot == PROT_READ)) if on]
        detail = f" {what} {pages}p off {offset}" + (" " + "|".join(extras) if extras else "")
        return Call("mmap", cpu, pid, mmap=args, detail=detail)
    if kind in ("mlockall", "munlockall", "fork", "exit"):
        flags = MLOCKALL_FLAGS[op.arg % len(MLOCKALL_FLAGS)] if kind == "mlockall" else 0
        return Call(kind, cpu, pid, flags=flags, detail=f" flags {flags}" if flags else "")
    if kind == "reclaim":
        which = op.arg % (world.nodes + 1)
        target: int | None = None if which == world.nodes else which
        return Call("reclaim", cpu, node=target, length=0, flags=op.npages * 4,
                    detail=f" node {target} nr {op.npages * 4}")
    if kind == "drain":
        return Call("drain", cpu)
    m = proc.maps[op.target % len(proc.maps)]
    addr, length = _range(op, m)
    call = Call(kind, cpu, pid, addr, length, mapping=m.name)
    if kind == "fault":
        call.flags = op.arg % 2
        call.detail = " write" if call.flags else " read"
    elif kind == "mlock":
        call.flags = MLOCK_ONFAULT if op.arg % 2 else 0
        call.detail = " ONFAULT" if call.flags else ""
    elif kind == "mprotect":
        call.flags = PROTS[op.arg % len(PROTS)]
        call.detail = f" prot {call.flags}"
    elif kind == "madvise":
        call.flags = int(ADVICES[op.arg % len(ADVICES)])
        call.detail = f" {Advice(call.flags).name}"
    elif kind == "migrate":
        call.node = op.arg % world.nodes
        call.detail = f" to node {call.node}"
    elif kind == "isolate":
        call.flags = op.arg  # ms the pages stay isolated
        call.detail = f" for {op.arg} ms, then putback"
    return call


def exclusive_fork(calls: list[Call]) -> list[Call]:
    """A forked process keeps its address space for the step: the model copies the parent's
    mappings into the child, which is only right if no mmap/munmap of the parent raced the
    fork.  Such calls become faults of the same range (or drains)."""
    forking = {c.pid for c in calls if c.kind == "fork"}
    out: list[Call] = []
    for c in calls:
        if c.pid in forking and c.kind in ("mmap", "munmap"):
            c = (replace(c, kind="fault", flags=0, detail=f" read (instead of {c.kind})")
                 if c.kind == "munmap" else
                 Call("drain", c.cpu, detail=f" (instead of mmap of pid {c.pid})"))
        out.append(c)
    return out


def exclusive_isolation(calls: list[Call]) -> list[Call]:
    """An isolate window has its process to itself for the step: its Putback finds the
    isolated pages through the process's ptes (the API has no other way to name them), so a
    munmap, exit, MADV_DONTNEED or COW fault of that process in the same step would leave them
    isolated for good.  Other calls of the process become drains of their CPU."""
    isolating = {c.pid for c in calls if c.kind == "isolate"}
    out: list[Call] = []
    seen: set[int] = set()
    for c in calls:
        if c.pid in isolating and (c.kind != "isolate" or c.pid in seen):
            c = Call("drain", c.cpu, detail=f" (instead of {c.kind} of pid {c.pid})")
        elif c.kind == "isolate":
            seen.add(c.pid)
        out.append(c)
    return out


@dataclass
class Outcome:
    call: Call
    ok: bool
    errno: str | None = None
    value: Any = None
    message: str = ""

    def describe(self) -> str:
        res = "ok" if self.ok else f"{self.errno} ({self.message})"
        if self.ok and self.value is not None:
            res += f" -> {self.value!r}"
        return f"{self.call.describe()} = {res}"


class ServerFaultError(AssertionError):
    """INTERNAL/UNKNOWN (or a hang) from a call: never acceptable."""


async def execute(client: AsyncMmsvcClient, machine: str, c: Call) -> Outcome:
    """Run one call; errno failures are outcomes, server faults raise ServerFaultError."""
    try:
        value: Any = None
        if c.kind == "spawn":
            value = await client.create_process(machine, c.spec)
        elif c.kind == "mmap":
            assert c.mmap is not None
            value = await client.mmap(machine, c.pid, c.mmap)
            value = hex(value)
        elif c.kind == "fault":
            value = await client.fault(machine, c.pid, c.addr, c.length, bool(c.flags))
        elif c.kind == "mlock":
            await client.mlock(machine, c.pid, c.addr, c.length, c.flags)
        elif c.kind == "munlock":
            await client.munlock(machine, c.pid, c.addr, c.length)
        elif c.kind == "munmap":
            await client.munmap(machine, c.pid, c.addr, c.length)
        elif c.kind == "mprotect":
            await client.mprotect(machine, c.pid, c.addr, c.length, c.flags)
        elif c.kind == "madvise":
            await client.madvise(machine, c.pid, c.addr, c.length, c.flags)
        elif c.kind == "mlockall":
            await client.mlockall(machine, c.pid, c.flags)
        elif c.kind == "munlockall":
            await client.munlockall(machine, c.pid)
        elif c.kind == "fork":
            value = await client.fork(machine, c.pid)
        elif c.kind == "exit":
            await client.exit(machine, c.pid)
        elif c.kind == "migrate":
            assert c.node is not None
            r = await client.migrate(machine, c.pid, c.addr, c.length, c.node)
            value = (r.migrated, r.failed, r.errno)
        elif c.kind == "reclaim":
            r2 = await client.reclaim(machine, c.node, None, c.flags)
            value = (r2.scanned, r2.reclaimed, r2.culled)
        elif c.kind == "drain":
            await client.drain(machine, False)
        elif c.kind == "isolate":
            isolated = await client.isolate(machine, c.pid, c.addr, c.length)
            await asyncio.sleep(c.flags / 1000)
            value = (isolated, await client.putback(machine, c.pid, c.addr, c.length))
        else:  # pragma: no cover
            raise AssertionError(f"unknown call kind {c.kind}")
    except MmsvcError as e:
        if e.code in SERVER_FAULTS or e.errno in (None, "INTERNAL"):
            raise ServerFaultError(f"{c.describe()}: {e.code.name}: {e.message}") from e
        return Outcome(c, False, e.errno, message=e.message)
    return Outcome(c, True, None, value)


def apply(world: World, out: Outcome) -> None:
    """Update the model from a successful call."""
    c = out.call
    if not out.ok:
        return
    if c.kind == "spawn":
        world.procs.append(Proc(int(out.value), c.cpu))
    elif c.kind == "mmap":
        assert c.mmap is not None
        proc = world.proc(c.pid)
        shared = bool(c.mmap.flags & MAP_SHARED)
        if shared and not c.mmap.file:
            world.shm_files += 1
        proc.maps.append(Mapping(world.new_name(), int(str(out.value), 16),
                                 c.mmap.length // P, c.mmap.file, c.mmap.offset // P, shared))
    elif c.kind == "munmap":
        world.punch(c.pid, c.addr, c.addr + c.length)
    elif c.kind == "fork":
        parent = world.proc(c.pid)
        world.procs.append(Proc(int(out.value), c.cpu,
                                [replace(m, name=world.new_name()) for m in parent.maps]))
    elif c.kind == "exit":
        world.proc(c.pid).alive = False
        world.proc(c.pid).maps = []


@dataclass
class Tally:
    """Outcome statistics of a run (printed by the tests, summarised in docs)."""

    outcomes: Counter[str] = field(default_factory=Counter)

    def add(self, out: Outcome) -> None:
        self.outcomes[f"{out.call.kind}:{'ok' if out.ok else out.errno}"] += 1
