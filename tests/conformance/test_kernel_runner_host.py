"""Run the committed traces on the host kernel and check what the spec predicts.

These need root, /proc/kpageflags, a C compiler, two CPUs and a 2 MiB hugetlb page; they skip
with the reason when the host lacks any of it.  Every document comes from run_trace, which only
returns once two clean runs produced identical documents, so each test also checks determinism.
Assertions on the batch length (31) and fault-around (16) are facts of Linux 6.18 and skip on
other kernels.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import pytest

from mmsvc.conformance import build, host, kernel_runner
from mmsvc.conformance.errors import Disturbed, HostUnsupported

TRACES = Path(__file__).with_name("traces")
LINUX_618 = platform.release().startswith("6.18")
needs_618 = pytest.mark.skipif(not LINUX_618, reason="batch/fault-around sizes are 6.18 facts")

Doc = dict[str, Any]


@pytest.fixture(scope="module")
def host_ready() -> None:
    try:
        host.check_host()
        host.choose_cpus()
        build.find_compiler()
        host.ensure_hugetlb_page()
        build.executable()
    except HostUnsupported as exc:
        pytest.skip(f"host cannot run the kernel oracle: {exc}")


_cache: dict[str, Doc] = {}


def oracle(trace: Doc) -> Doc:
    """run_trace, but a host too busy to give two clean runs skips instead of failing.

    Clean runs that disagree still fail: that is a nondeterministic runner (or noise the
    detectors miss), which these tests exist to catch.
    """
    try:
        return kernel_runner.run_trace(trace)
    except Disturbed as exc:
        if exc.disagreements:
            raise
        pytest.skip(f"host too busy for the kernel oracle: {exc}")


@pytest.fixture(scope="module")
def run(host_ready: None) -> Any:
    def _run(name: str) -> Doc:
        if name not in _cache:
            _cache[name] = oracle(json.loads((TRACES / f"{name}.json").read_text()))
        return _cache[name]

    return _run


def snap(doc: Doc, label: str) -> Doc:
    return next(s for s in doc["snapshots"] if s["label"] == label)


def deltas(s: Doc) -> dict[str, int]:
    """Non-zero vmstat deltas with the unevictable_pgs_ prefix dropped."""
    return {k.removeprefix("unevictable_pgs_"): v for k, v in s["vmstat"].items() if v}


def mapping(s: Doc, proc: str, ident: str) -> Doc:
    m: Doc = s["procs"][proc]["mappings"][ident]
    return m


def errors(doc: Doc) -> list[tuple[int, str | None]]:
    return [(o["i"], o["errno"]) for o in doc["ops"] if o["errno"]]


def test_document_layout(run: Any) -> None:
    doc = run("s1_mlock_present_anon")
    assert list(doc) == ["scenario", "runner", "ops", "snapshots"]
    assert doc["runner"] == "kernel"
    assert doc["ops"][0] == {"i": 0, "op": "mmap", "proc": "p0", "errno": None}
    assert {"i": 5, "op": "drain", "errno": None} in doc["ops"]
    assert all(o["op"] != "snapshot" for o in doc["ops"])
    s = doc["snapshots"][0]
    assert list(s) == ["label", "after_op", "vmstat", "procs", "files"]
    assert list(s["vmstat"]) == [
        "unevictable_pgs_culled",
        "unevictable_pgs_scanned",
        "unevictable_pgs_rescued",
        "unevictable_pgs_mlocked",
        "unevictable_pgs_munlocked",
        "unevictable_pgs_cleared",
        "unevictable_pgs_stranded",
    ]
    assert list(s["procs"]["p0"]) == ["alive", "VmLck_kb", "mappings"]
    assert list(mapping(s, "p0", "m")) == [
        "pages", "present", "mlocked", "unevictable", "vma_locked", "vma_onfault", "lru",
        "kind", "smaps",
    ]  # fmt: skip
    assert list(mapping(s, "p0", "m")["smaps"]) == ["size_kb", "rss_kb", "locked_kb", "vmas"]


def test_s1_mlock_of_present_anon_pages(run: Any) -> None:
    doc = run("s1_mlock_present_anon")
    written = snap(doc, "written")
    assert deltas(written) == {}
    # new anon pages of an unlocked VMA wait in the lru_add batch: not on an LRU yet
    assert mapping(written, "p0", "m")["lru"] == "0000"
    locked = snap(doc, "locked")
    # mlock drains after its page walk: culled at once, no drain needed
    assert deltas(locked) == {"mlocked": 4, "culled": 4}
    m = mapping(locked, "p0", "m")
    assert (m["mlocked"], m["unevictable"], m["lru"], m["vma_locked"]) == ("1111",) * 4
    assert locked["procs"]["p0"]["VmLck_kb"] == 16
    assert deltas(snap(doc, "drained")) == {"mlocked": 4, "culled": 4}
    unlocked = snap(doc, "unlocked")
    # the second mlock of a locked range did nothing: mlocks do not nest
    assert deltas(unlocked) == {"mlocked": 4, "culled": 4, "munlocked": 4, "rescued": 4}
    assert unlocked["procs"]["p0"]["VmLck_kb"] == 0
    assert mapping(unlocked, "p0", "m")["unevictable"] == "0000"


def test_s7_mlock_onfault(run: Any) -> None:
    doc = run("s7_mlock_onfault")
    s = snap(doc, "onfault-locked")
    assert deltas(s) == {"mlocked": 3, "culled": 3}
    assert s["procs"]["p0"]["VmLck_kb"] == 32  # locked_vm counts the whole range
    m = mapping(s, "p0", "m")
    assert (m["present"], m["mlocked"], m["vma_onfault"]) == ("11100000", "111.....", "11111111")
    before = snap(doc, "faulted-before-drain")
    assert deltas(before) == {"mlocked": 5, "culled": 3}  # faults queue, they do not drain
    assert mapping(before, "p0", "m")["unevictable"] == "11100..."
    drained = snap(doc, "faulted-drained")
    assert deltas(drained) == {"mlocked": 5, "culled": 5}
    assert mapping(drained, "p0", "m")["unevictable"] == "11111..."


def test_two_shared_file_lockers_one_munlock(run: Any) -> None:
    doc = run("s4_two_shared_file_lockers")
    assert doc["scenario"] == "two_lockers_one_unlock"
    one = snap(doc, "one-locker-left")
    assert deltas(one) == {"mlocked": 8, "culled": 8}  # p0's munlock: count 2 -> 1, no event
    assert one["procs"]["p0"]["VmLck_kb"] == 0
    assert one["procs"]["p1"]["VmLck_kb"] == 32
    assert mapping(one, "p0", "m")["mlocked"] == "11111111"  # the page is still mlocked
    assert mapping(one, "p0", "m")["vma_locked"] == "00000000"
    assert mapping(one, "p1", "m")["smaps"]["locked_kb"] == 16  # 32 kB / mapcount 2
    assert one["files"]["f1"] == {"mlocked": "1" * 8, "unevictable": "1" * 8, "lru": "1" * 8}
    none = snap(doc, "no-locker-left")
    assert deltas(none) == {"mlocked": 8, "culled": 8, "munlocked": 8, "rescued": 8}
    assert none["files"]["f1"] == {"mlocked": "0" * 8, "unevictable": "0" * 8, "lru": "1" * 8}


def test_s21_munmap_of_mlocked_pages(run: Any) -> None:
    doc = run("s21_munmap_mlocked")
    before = snap(doc, "unmapped-before-drain")
    assert deltas(before) == {"mlocked": 4, "culled": 4}  # munmap queues, does not drain
    assert before["procs"]["p0"]["VmLck_kb"] == 0
    assert mapping(before, "p0", "m")["present"] == "xxxx"
    assert mapping(before, "p0", "m")["smaps"]["vmas"] == 0
    after = snap(doc, "unmapped-drained")
    assert deltas(after) == {"mlocked": 4, "culled": 4, "munlocked": 4, "rescued": 4}


def test_s27_fork_and_cow_in_a_locked_vma(run: Any) -> None:
    doc = run("s27_fork_cow_locked")
    forked = snap(doc, "forked")
    assert mapping(forked, "c", "m")["vma_locked"] == "0000"  # VM_LOCKED is not inherited
    assert forked["procs"]["c"]["VmLck_kb"] == 0
    assert mapping(forked, "p0", "m")["smaps"]["locked_kb"] == 8  # pages shared with the child
    cow = snap(doc, "cow-before-drain")
    assert deltas(cow) == {"mlocked": 5, "culled": 4}  # X' queued by mlock_new_page
    assert mapping(cow, "p0", "m")["unevictable"] == "0111"
    assert mapping(cow, "c", "m")["mlocked"] == "1111"  # old X: munlock entry still queued
    drained = snap(doc, "cow-drained")
    assert deltas(drained) == {"mlocked": 5, "culled": 5, "munlocked": 1, "rescued": 1}
    assert mapping(drained, "c", "m")["mlocked"] == "0111"
    gone = snap(doc, "child-gone")
    assert gone["procs"]["c"] == {"alive": False}
    assert mapping(gone, "p0", "m")["smaps"]["locked_kb"] == 16


def test_rlimit_memlock_for_an_unprivileged_process(run: Any) -> None:
    doc = run("rlimit_enomem_unprivileged")
    assert errors(doc) == [(4, "ENOMEM"), (7, "EAGAIN"), (8, "EINVAL"), (12, "EPERM")]
    refused = snap(doc, "refused")
    assert deltas(refused) == {}  # a failed mlock changes nothing
    assert refused["procs"]["p0"]["VmLck_kb"] == 0
    end = snap(doc, "end")
    assert deltas(end) == {"mlocked": 2, "culled": 2}
    assert end["procs"]["p0"]["VmLck_kb"] == 8
    assert mapping(end, "p0", "m")["vma_locked"] == "1100"
    assert mapping(end, "p0", "m")["smaps"]["vmas"] == 2
    assert mapping(end, "p0", "big")["present"] == "xxxx"  # the failed mmap left nothing


def test_einval_paths_change_nothing(run: Any) -> None:
    doc = run("einval_paths")
    assert errors(doc) == [(2, "EINVAL"), (3, "EINVAL"), (4, "EINVAL"), (5, "EINVAL"),
                           (7, "EINVAL")]  # fmt: skip
    assert doc["ops"][6]["errno"] is None  # a zero-length mlock succeeds
    s = snap(doc, "nothing-changed")
    assert deltas(s) == {}
    assert s["procs"]["p0"]["VmLck_kb"] == 0


def test_the_runtime_is_invisible_to_mlockall(run: Any) -> None:
    doc = run("mlockall_empty_world")
    for label in ("start", "mlockall-current", "again"):
        s = snap(doc, label)
        assert deltas(s) == {}
        assert s["procs"]["p0"] == {"alive": True, "VmLck_kb": 0, "mappings": {}}
    future = snap(doc, "future-mapping")
    assert deltas(future) == {"mlocked": 2, "culled": 2}  # MAP_POPULATE-like: populate drains
    assert future["procs"]["p0"]["VmLck_kb"] == 8


@needs_618
def test_mlock_batch_is_processed_at_its_31st_entry(run: Any) -> None:
    doc = run("batch31_onfault_faults")
    assert deltas(snap(doc, "30-faults")) == {"mlocked": 30}
    assert deltas(snap(doc, "31-faults")) == {"mlocked": 31, "culled": 31}
    s = snap(doc, "40-faults")
    assert deltas(s) == {"mlocked": 40, "culled": 31}
    assert mapping(s, "p0", "m")["unevictable"] == "1" * 31 + "0" * 9
    assert deltas(snap(doc, "drained")) == {"mlocked": 40, "culled": 40}


@needs_618
def test_munmap_flushes_only_full_batches(run: Any) -> None:
    doc = run("munmap40_locked_batch")
    assert deltas(snap(doc, "unmapped")) == {
        "mlocked": 40, "culled": 40, "munlocked": 31, "rescued": 31,
    }  # fmt: skip
    assert deltas(snap(doc, "drained")) == {
        "mlocked": 40, "culled": 40, "munlocked": 40, "rescued": 40,
    }  # fmt: skip


@needs_618
def test_read_fault_maps_a_16_page_window(run: Any) -> None:
    doc = run("faultaround_locked_file")
    s = snap(doc, "read-page-5")
    assert deltas(s) == {"mlocked": 16}
    m = mapping(s, "p0", "m")
    assert m["present"] == "1" * 16 + "0" * 24
    assert m["unevictable"] == "0" * 16 + "." * 24  # LRU_PAGE entries still queued
    assert m["lru"] == "1" * 16 + "." * 24
    assert s["files"]["f"]["mlocked"] == "1" * 16 + "0" * 24
    w = snap(doc, "write-page-20")
    assert deltas(w) == {"mlocked": 17}  # a write fault maps only its page
    assert mapping(w, "p0", "m")["present"][16:24] == "00001000"
    d = snap(doc, "drained")
    assert deltas(d) == {"mlocked": 17, "culled": 17}
    assert d["files"]["f"]["unevictable"] == "1" * 16 + "00001" + "0" * 19


def test_shm_lock_and_unlock(run: Any) -> None:
    doc = run("shm_lock_unlock")
    locked = snap(doc, "shm-locked")
    assert deltas(locked) == {}
    assert mapping(locked, "p0", "s")["unevictable"] == "0000"
    munlocked = snap(doc, "munlocked")
    assert deltas(munlocked) == {"mlocked": 4, "culled": 4, "munlocked": 4}  # no rescue
    assert mapping(munlocked, "p0", "s")["unevictable"] == "1111"
    unlocked = snap(doc, "shm-unlocked")
    assert deltas(unlocked) == {
        "mlocked": 4, "culled": 4, "munlocked": 4, "scanned": 4, "rescued": 4,
    }  # fmt: skip


def test_repeated_runs_give_identical_documents(host_ready: None) -> None:
    trace = json.loads((TRACES / "s4_two_shared_file_lockers.json").read_text())
    first = oracle(trace)
    second = oracle(trace)
    assert kernel_runner.dumps(first) == kernel_runner.dumps(second)


def test_snapshots_do_not_perturb_the_scenario(host_ready: None) -> None:
    """The same ops with and without intermediate snapshots end in the same state."""
    trace = json.loads((TRACES / "s4_two_shared_file_lockers.json").read_text())
    ops = [op for op in trace["ops"] if op["op"] != "snapshot"]
    observed = [x for op in ops for x in (op, {"op": "snapshot", "label": "x"})]
    final = {"op": "snapshot", "label": "final"}
    quiet = oracle({**trace, "ops": [*ops, final]})
    busy = oracle({**trace, "ops": [*observed, final]})
    a, b = quiet["snapshots"][-1], busy["snapshots"][-1]
    assert {k: a[k] for k in ("vmstat", "procs", "files")} == {
        k: b[k] for k in ("vmstat", "procs", "files")
    }


def test_cli_prints_results_for_several_traces(
    host_ready: None, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [str(TRACES / "einval_paths.json"), str(TRACES / "s21_munmap_mlocked.json")]
    code = kernel_runner.main(paths)
    captured = capsys.readouterr()
    if code == 2 and "Disturbed" in captured.err and "differs" not in captured.err:
        pytest.skip(f"host too busy for the kernel oracle: {captured.err}")
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert list(out) == ["results"]
    assert [d["scenario"] for d in out["results"]] == ["einval_paths", "s21_munmap_mlocked"]
