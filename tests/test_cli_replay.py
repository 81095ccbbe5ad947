"""Trace replay: the result document's exact layout, against a small model kernel; then the
same through gRPC (``mmsvc replay --target``) and with the real kernel (embedded server)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from mmsvc.cli.main import main
from mmsvc.cli.replay import (
    MAP_ALIGN,
    ReplayError,
    file_strings,
    page_strings,
    replay_trace,
    replay_traces,
    smaps_sum,
)
from mmsvc.mm.errors import KernelError
from mmsvc.mm.kernel import KernelAPI
from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MLOCK_ONFAULT,
    PAGE_SIZE,
    Advice,
    FileSpec,
    MachineConfig,
    MmapArgs,
    PageInfo,
    ProcessSpec,
    ProcStatus,
    SmapsEntry,
)
from mmsvc.server.app import build_server
from mmsvc_client import AsyncMmsvcClient

EXAMPLE = {
    "name": "two_lockers_one_unlock",
    "description": "free text",
    "origin": ["where it comes from"],
    "tags": ["file"],
    "files": {"f1": {"pages": 8, "prefill": True}},
    "procs": ["p0", "p1"],
    "ops": [
        {"op": "mmap", "proc": "p0", "id": "m", "pages": 8, "kind": "file", "file": "f1",
         "shared": True},
        {"op": "mmap", "proc": "p1", "id": "m", "pages": 8, "kind": "file", "file": "f1",
         "shared": True},
        {"op": "mlock", "proc": "p0", "id": "m"},
        {"op": "mlock", "proc": "p1", "id": "m"},
        {"op": "munlock", "proc": "p0", "id": "m"},
        {"op": "snapshot", "label": "one-locker-left"},
    ],
}


class ModelKernel(KernelAPI):
    """A deliberately tiny mm model: per-page VMA flags and presence, mlock = populate + lock.

    Enough to produce every field of the result document; not a kernel."""

    def __init__(self) -> None:
        self.cpu = 0
        self.machines: dict[str, MachineConfig] = {}
        self.files: dict[str, int] = {}
        self.procs: dict[int, dict[int, dict[str, Any]]] = {}  # pid -> page addr -> state
        self.alive: dict[int, bool] = {}
        self.locked_files: set[int] = set()
        self.counters = {"unevictable_pgs_mlocked": 0, "unevictable_pgs_munlocked": 0}
        self.next_pid = 1
        self.calls: list[str] = []

    async def create_machine(self, cfg: MachineConfig) -> str:
        self.machines["m1"] = cfg
        return "m1"

    async def delete_machine(self, machine: str) -> None:
        self.calls.append("delete_machine")

    async def create_file(self, machine: str, spec: FileSpec) -> None:
        self.files[spec.name] = spec.pages

    async def create_process(self, machine: str, spec: ProcessSpec) -> int:
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.procs[pid] = {}
        self.alive[pid] = True
        return pid

    def _mm(self, pid: int) -> dict[int, dict[str, Any]]:
        if not self.alive.get(pid):
            raise KernelError("ESRCH", "no such process")
        return self.procs[pid]

    async def fork(self, machine: str, pid: int) -> int:
        child = await self.create_process(machine, ProcessSpec())
        self.procs[child] = {
            a: {**st, "locked": False, "onfault": False} for a, st in self._mm(pid).items()
        }
        return child

    async def exit(self, machine: str, pid: int) -> None:
        self._mm(pid)
        self.alive[pid] = False

    async def mmap(self, machine: str, pid: int, args: MmapArgs) -> int:
        mm = self._mm(pid)
        kind = "a" if args.flags & MAP_ANONYMOUS else "f"
        for i in range(args.length // PAGE_SIZE):
            mm[args.addr + i * PAGE_SIZE] = {
                "present": False, "locked": False, "onfault": False, "kind": kind,
                "findex": args.offset // PAGE_SIZE + i, "file": args.file,
            }
        return args.addr

    def _pages(self, pid: int, addr: int, length: int) -> list[dict[str, Any]]:
        mm = self._mm(pid)
        start = addr // PAGE_SIZE * PAGE_SIZE
        end = addr + length
        out = []
        a = start
        while a < end:
            if a not in mm:
                raise KernelError("ENOMEM", "range not mapped")
            out.append(mm[a])
            a += PAGE_SIZE
        return out

    async def munmap(self, machine: str, pid: int, addr: int, length: int) -> None:
        mm = self._mm(pid)
        for a in range(addr, addr + length, PAGE_SIZE):
            mm.pop(a, None)

    async def fault(self, machine: str, pid: int, addr: int, length: int, write: bool) -> int:
        pages = self._pages(pid, addr, length)
        for st in pages:
            st["present"] = True
        return len(pages)

    async def mlock(self, machine: str, pid: int, addr: int, length: int, flags: int = 0) -> None:
        for st in self._pages(pid, addr, length):
            st["locked"] = True
            st["onfault"] = bool(flags & MLOCK_ONFAULT)
            if not st["onfault"]:
                st["present"] = True
                self.counters["unevictable_pgs_mlocked"] += 1

    async def munlock(self, machine: str, pid: int, addr: int, length: int) -> None:
        for st in self._pages(pid, addr, length):
            if st["locked"] and st["present"]:
                self.counters["unevictable_pgs_munlocked"] += 1
            st["locked"] = st["onfault"] = False

    async def madvise(
        self, machine: str, pid: int, addr: int, length: int, advice: Advice
    ) -> None:
        if advice == Advice.MADV_DONTNEED:
            for st in self._pages(pid, addr, length):
                if st["locked"]:
                    raise KernelError("EINVAL", "locked")
                st["present"] = False

    async def drain(self, machine: str, all_cpus: bool) -> None:
        self.calls.append("drain")

    async def setrlimit(self, machine: str, pid: int, soft: int, hard: int) -> None:
        self.calls.append(f"setrlimit {soft} {hard}")

    async def vmstat(self, machine: str) -> dict[str, int]:
        return dict(self.counters)

    async def proc_status(self, machine: str, pid: int) -> ProcStatus:
        mm = self.procs[pid]
        return ProcStatus(pid, self.alive[pid], 4 * sum(st["locked"] for st in mm.values()), 0, 0,
                          "root", 0, 0, True, 8 << 20, 8 << 20)

    async def smaps(self, machine: str, pid: int) -> list[SmapsEntry]:
        # one "VMA" per run of contiguous pages with the same lock flag
        out: list[SmapsEntry] = []
        for a in sorted(self._mm(pid)):
            st = self.procs[pid][a]
            rss = 4 if st["present"] else 0
            locked = rss if st["locked"] else 0
            if out and out[-1].end == a and ("lo" in out[-1].vm_flags) == st["locked"]:
                last = out[-1]
                out[-1] = SmapsEntry(last.start, a + PAGE_SIZE, last.size_kb + 4,
                                     last.rss_kb + rss, last.locked_kb + locked, last.vm_flags)
            else:
                flags = ("rd", "wr", "lo") if st["locked"] else ("rd", "wr")
                out.append(SmapsEntry(a, a + PAGE_SIZE, 4, rss, locked, flags))
        return out

    def _locked_file_pages(self, name: str) -> set[int]:
        out = set()
        for pid, mm in self.procs.items():
            if self.alive[pid]:
                out |= {st["findex"] for st in mm.values()
                        if st["file"] == name and st["locked"] and st["present"]}
        return out

    async def page_flags(self, machine: str, pid: int, addr: int, length: int) -> list[PageInfo]:
        mm = self.procs[pid]
        out = []
        for a in range(addr, addr + length, PAGE_SIZE):
            st = mm.get(a)
            if st is None:
                out.append(PageInfo(addr=a, vma_present=False, present=False, kind="."))
                continue
            locked = st["present"] and (
                st["locked"] or (st["kind"] == "f" and
                                 st["findex"] in self._locked_file_pages(st["file"]))
            )
            out.append(PageInfo(
                addr=a, vma_present=True, present=st["present"],
                kind=st["kind"] if st["present"] else ".", mlocked=locked,
                unevictable=locked, lru=st["present"], vma_locked=st["locked"],
                vma_onfault=st["onfault"],
            ))
        return out

    async def file_pages(self, machine: str, name: str) -> list[PageInfo]:
        locked = self._locked_file_pages(name)
        return [
            PageInfo(addr=i * PAGE_SIZE, vma_present=True, present=True, kind="f",
                     mlocked=i in locked, unevictable=i in locked, lru=True)
            for i in range(self.files[name])
        ]


@pytest.mark.asyncio
async def test_example_trace_document_layout() -> None:
    k = ModelKernel()
    doc = await replay_trace(k, EXAMPLE, batch_size=31)
    assert k.machines["m1"].mlock_batch_len == 31
    assert k.machines["m1"].lru_add_batch_len == 31
    assert k.calls[0] == "drain"  # batches start empty
    assert k.calls[-1] == "delete_machine"
    assert list(doc) == ["scenario", "runner", "ops", "snapshots"]
    assert doc["scenario"] == "two_lockers_one_unlock"
    assert doc["runner"] == "mmsvc"
    assert doc["ops"] == [
        {"i": 0, "op": "mmap", "proc": "p0", "errno": None},
        {"i": 1, "op": "mmap", "proc": "p1", "errno": None},
        {"i": 2, "op": "mlock", "proc": "p0", "errno": None},
        {"i": 3, "op": "mlock", "proc": "p1", "errno": None},
        {"i": 4, "op": "munlock", "proc": "p0", "errno": None},
    ]
    assert [list(op) for op in doc["ops"]] == [["i", "op", "proc", "errno"]] * 5
    (snap,) = doc["snapshots"]
    assert list(snap) == ["label", "after_op", "vmstat", "procs", "files"]
    assert snap["label"] == "one-locker-left"
    assert snap["after_op"] == 4
    assert list(snap["vmstat"]) == [
        "unevictable_pgs_culled", "unevictable_pgs_scanned", "unevictable_pgs_rescued",
        "unevictable_pgs_mlocked", "unevictable_pgs_munlocked", "unevictable_pgs_cleared",
        "unevictable_pgs_stranded",
    ]
    assert snap["vmstat"]["unevictable_pgs_mlocked"] == 16
    assert snap["vmstat"]["unevictable_pgs_munlocked"] == 8
    p0, p1 = snap["procs"]["p0"], snap["procs"]["p1"]
    assert list(p0) == ["alive", "VmLck_kb", "mappings"]
    assert p0["VmLck_kb"] == 0 and p1["VmLck_kb"] == 32
    m0 = p0["mappings"]["m"]
    assert list(m0) == ["pages", "present", "mlocked", "unevictable", "vma_locked",
                        "vma_onfault", "lru", "kind", "smaps"]
    assert m0 == {
        "pages": 8, "present": "11111111", "mlocked": "11111111", "unevictable": "11111111",
        "vma_locked": "00000000", "vma_onfault": "00000000", "lru": "11111111",
        "kind": "ffffffff", "smaps": {"size_kb": 32, "rss_kb": 32, "locked_kb": 0, "vmas": 1},
    }
    assert list(m0["smaps"]) == ["size_kb", "rss_kb", "locked_kb", "vmas"]
    assert p1["mappings"]["m"]["vma_locked"] == "11111111"
    assert p1["mappings"]["m"]["smaps"]["locked_kb"] == 32
    assert snap["files"] == {
        "f1": {"mlocked": "11111111", "unevictable": "11111111", "lru": "11111111"}
    }
    assert list(snap["files"]["f1"]) == ["mlocked", "unevictable", "lru"]
    json.dumps(doc)  # serialisable


@pytest.mark.asyncio
async def test_ranges_errors_fork_exit_and_x() -> None:
    trace = {
        "name": "mixed",
        "procs": ["p0"],
        "ops": [
            {"op": "snapshot", "label": "empty"},
            {"op": "mmap", "id": "a", "pages": 4, "kind": "anon"},
            {"op": "touch", "id": "a", "from": 0, "to": 2},
            {"op": "mlock", "id": "a", "from": 1, "to": 3, "flags": ["MLOCK_ONFAULT"]},
            {"op": "madvise", "id": "a", "from": 1, "to": 2, "advice": "MADV_DONTNEED"},
            {"op": "fork", "child": "c"},
            {"op": "munmap", "id": "a", "from": 3, "to": 4},
            {"op": "drain"},
            {"op": "setrlimit", "soft_bytes": 0, "hard_bytes": -1},
            {"op": "snapshot", "label": "after"},
            {"op": "exit", "proc": "c"},
            {"op": "touch", "proc": "c", "id": "a"},
            {"op": "touch", "proc": "ghost", "id": "a"},
            {"op": "shm_lock", "proc": "ghost", "id": "s"},
            {"op": "snapshot", "label": "end"},
            {"op": "snapshot", "label": "end2"},
        ],
    }
    doc = await replay_trace(ModelKernel(), trace)
    ops = {op["i"]: op for op in doc["ops"]}
    assert ops[4]["errno"] == "EINVAL"  # MADV_DONTNEED on a locked page (model rule)
    assert ops[7] == {"i": 7, "op": "drain", "errno": None}  # drain has no proc
    assert ops[11]["errno"] == "ESRCH"  # the child exited
    assert ops[12]["errno"] == "ESRCH"  # no such process
    assert ops[13]["errno"] == "ESRCH"  # shm ops are replayed: no such process
    empty, after, end, end2 = doc["snapshots"]
    assert empty["after_op"] == -1
    assert empty["procs"] == {"p0": {"alive": True, "VmLck_kb": 0, "mappings": {}}}
    assert after["after_op"] == 8
    # after_op: the index of the op just before the snapshot (a snapshot included)
    assert (end["after_op"], end2["after_op"]) == (13, 14)
    a = after["procs"]["p0"]["mappings"]["a"]
    assert a["present"] == "110x"
    assert a["mlocked"] == "01.x"
    assert a["vma_locked"] == "011x"
    assert a["vma_onfault"] == "011x"
    assert a["kind"] == "aa.x"
    assert a["smaps"]["vmas"] == 2
    child = after["procs"]["c"]["mappings"]["a"]
    assert child["vma_locked"] == "0000"  # VM_LOCKED is not inherited
    assert child["present"] == "1100"
    assert end["procs"]["c"] == {"alive": False}
    assert list(after["procs"]) == ["p0", "c"]


@pytest.mark.asyncio
async def test_mappings_get_aligned_disjoint_hints() -> None:
    k = ModelKernel()
    trace = {"name": "t", "ops": [
        {"op": "mmap", "id": "a", "pages": 3, "kind": "anon"},
        {"op": "mmap", "id": "b", "pages": 600, "kind": "anon", "flags": ["MAP_POPULATE"]},
        {"op": "mmap", "id": "c", "pages": 1, "kind": "anon", "shared": True, "prot": "r"},
    ]}
    await replay_trace(k, trace)
    starts = sorted(a for a in k.procs[1] if (a - PAGE_SIZE) not in k.procs[1])
    assert len(starts) == 3
    assert all(s % MAP_ALIGN == 0 for s in starts)
    assert starts[1] - starts[0] >= 3 * PAGE_SIZE + MAP_ALIGN
    assert starts[2] - starts[1] >= 600 * PAGE_SIZE + MAP_ALIGN


@pytest.mark.asyncio
async def test_bad_traces_raise() -> None:
    for bad_op in (
        {"op": "frobnicate"},
        {"op": "touch", "id": "nope"},
        {"op": "madvise", "id": "a", "advice": "MADV_BOGUS"},
        {"op": "mmap", "id": "z", "pages": 1, "kind": "weird"},
    ):
        trace = {"name": "bad", "ops": [{"op": "mmap", "id": "a", "pages": 1}, bad_op]}
        with pytest.raises(ReplayError):
            await replay_trace(ModelKernel(), trace)


@pytest.mark.asyncio
async def test_several_traces_give_results_list() -> None:
    doc = await replay_traces(ModelKernel(), [EXAMPLE, {**EXAMPLE, "name": "second"}])
    assert list(doc) == ["results"]
    assert [r["scenario"] for r in doc["results"]] == ["two_lockers_one_unlock", "second"]


def test_string_helpers() -> None:
    pages = [
        PageInfo(0, True, True, "a", mlocked=True, unevictable=True, lru=True, vma_locked=True),
        PageInfo(1, True, False, ".", vma_locked=True, vma_onfault=True),
        PageInfo(2, False, False, "."),
        PageInfo(3, True, True, "z"),
    ]
    assert page_strings(pages) == {
        "present": "10x1", "mlocked": "1.x0", "unevictable": "1.x0", "vma_locked": "11x0",
        "vma_onfault": "01x0", "lru": "1.x0", "kind": "a.xz",
    }
    assert file_strings([PageInfo(0, True, True, "f", lru=True)], 3) == {
        "mlocked": "0..", "unevictable": "0..", "lru": "1.."
    }
    entries = [SmapsEntry(0, 8192, 8, 8, 8, ()), SmapsEntry(8192, 16384, 8, 4, 0, ()),
               SmapsEntry(16384, 20480, 4, 4, 4, ())]
    assert smaps_sum(entries, 0, 16384) == {"size_kb": 16, "rss_kb": 12, "locked_kb": 8,
                                            "vmas": 2}


@pytest.mark.asyncio
async def test_replay_command_through_grpc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    k = ModelKernel()
    server = await build_server(lambda: k, "127.0.0.1:0", None, access_log=False)
    await server.start()
    try:
        path = tmp_path / "t.json"
        path.write_text(json.dumps(EXAMPLE))
        target = f"127.0.0.1:{server.port}"
        rc = await asyncio.to_thread(
            main, ["replay", str(path), "--target", target, "--batch-size", "31", "--indent", "-1"]
        )
        assert rc == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1
        doc = json.loads(out)
        direct = await replay_trace(ModelKernel(), EXAMPLE, 31)
        assert doc == direct
        assert out.strip() == json.dumps(direct)  # same bytes, same key order
        # a trace file that is not JSON: exit 2, message on stderr
        bad = tmp_path / "bad.json"
        bad.write_text("{nope")
        rc = await asyncio.to_thread(main, ["replay", str(bad), "--target", target])
        assert rc == 2
        assert "mmsvc replay" in capsys.readouterr().err
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_client_satisfies_replay_target() -> None:
    # static check in spirit: the client has every method replay needs
    from mmsvc.cli.replay import Target

    needed = {n for n in dir(Target) if not n.startswith("_")}
    assert needed <= set(dir(AsyncMmsvcClient))


def test_replay_real_kernel_embedded(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mmsvc replay`` without --target: in-process server over the real kernel."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps(EXAMPLE))
    rc = main(["replay", str(path), "--redis", redis_url])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == ["scenario", "runner", "ops", "snapshots"]
    assert [op["errno"] for op in doc["ops"]] == [None] * 5
    snap = doc["snapshots"][0]
    assert set(snap["procs"]) == {"p0", "p1"}
    m = snap["procs"]["p1"]["mappings"]["m"]
    assert len(m["present"]) == 8 and m["vma_locked"] == "11111111"
    assert snap["procs"]["p1"]["VmLck_kb"] == 32
    assert snap["procs"]["p0"]["VmLck_kb"] == 0
    assert set(snap["files"]) == {"f1"}


@pytest.mark.asyncio
async def test_replay_set_machine_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--set KEY=VALUE`` (repeatable) reaches the replayed machine through gRPC, on top of
    --profile and --batch-size; an unknown key or value is a CLI error (exit 2)."""
    from mmsvc.mm.types import FinalClearance, MigrationDrain

    k = ModelKernel()
    server = await build_server(lambda: k, "127.0.0.1:0", None, access_log=False)
    await server.start()
    try:
        path = tmp_path / "t.json"
        path.write_text(json.dumps(EXAMPLE))
        target = f"127.0.0.1:{server.port}"
        rc = await asyncio.to_thread(main, [
            "replay", str(path), "--target", target, "--profile", "linux-6.18",
            "--set", "vm_io_guard=off", "--set", "migration_drain=off",
            "--set", "final_clearance=mapcount_zero", "--set", "lru_add_batch_len=7",
            "--set", "stat_refresh_drains_all=on"])
        assert rc == 0
        capsys.readouterr()
        cfg = k.machines["m1"]
        assert (cfg.vm_io_guard, cfg.migration_drain, cfg.final_clearance) == (
            False, MigrationDrain.OFF, FinalClearance.MAPCOUNT_ZERO)
        assert cfg.stat_refresh_drains_all is True
        # the profile's settings stay, a --set overrides the batch length it chose
        assert (cfg.populate_drain, cfg.mlock_batch_len, cfg.lru_add_batch_len) == (True, 31, 7)
        for bad, why in [("vm_io_guard=maybe", "expected on or off"),
                         ("migration_drain=sometimes", "after_each_locked_unmap"),
                         ("no_such_setting=1", "KEY one of"),
                         ("mlock_batch_len=many", "expected an integer"),
                         ("vm_io_guard", "KEY=VALUE")]:
            with pytest.raises(SystemExit) as exit_:
                main(["replay", str(path), "--target", target, "--set", bad])
            assert exit_.value.code == 2
            assert why in capsys.readouterr().err
    finally:
        await server.stop(None)
