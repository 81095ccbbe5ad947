"""Unit tests of the kernel runner's pure parts (no root, no kernel access needed).

The runtime relocation check needs a C compiler and readelf and skips without them.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from mmsvc.conformance import build, kernel_runner, neighbours, observe
from mmsvc.conformance import trace as T
from mmsvc.conformance.errors import HostUnsupported, ScenarioError
from mmsvc.conformance.executor import errno_name

TRACES = Path(__file__).with_name("traces")

SMAPS = """\
100000000000-100000002000 rw-p 00000000 00:00 0
Size:                  8 kB
Rss:                   4 kB
Locked:                4 kB
VmFlags: rd wr mr mw me ac lo
100000003000-100000004000 rw-p 00000000 00:00 0
Size:                  4 kB
Rss:                   0 kB
Locked:                0 kB
VmFlags: rd wr mr mw me ac lo lf
7f0000000000-7f0000200000 rwxs 00000000 00:11 1                          /anon_hugepage (deleted)
Size:               2048 kB
VmFlags: rd wr ex sh mr mw me ms de ht
"""


class FakeKpf(observe.KpageFlags):
    """kpageflags stand-in: pfn -> flags from a dict."""

    def __init__(self, flags: dict[int, int]) -> None:
        self.flags = flags

    def get(self, pfn: int) -> int:
        return self.flags[pfn]

    def close(self) -> None:
        pass


def test_parse_smaps_reads_ranges_sizes_and_flags() -> None:
    vmas = observe.parse_smaps(SMAPS)
    assert [(v.start, v.end) for v in vmas] == [
        (0x100000000000, 0x100000002000),
        (0x100000003000, 0x100000004000),
        (0x7F0000000000, 0x7F0000200000),
    ]
    assert vmas[0].sizes_kb == {"Size": 8, "Rss": 4, "Locked": 4}
    assert "lo" in vmas[1].flags and "lf" in vmas[1].flags
    assert "ht" in vmas[2].flags


def test_mapping_view_builds_per_page_strings() -> None:
    vmas = observe.parse_smaps(SMAPS)
    present = 1 << 63
    mlocked_unevictable_lru_anon = (1 << 33) | (1 << 18) | (1 << 5) | (1 << 12)
    zero = 1 << 24
    kpf = FakeKpf({0x10: mlocked_unevictable_lru_anon, 0x20: zero})
    # page 0 mlocked anon, page 1 absent, page 2 has no VMA, page 3 the zero page
    pagemap = struct.pack("<4Q", present | 0x10, 0, 0, present | 0x20)
    view = observe.mapping_view(0x100000000000, 4, vmas, pagemap, kpf)
    assert view == {
        "pages": 4,
        "present": "10x1",
        "mlocked": "1.x0",
        "unevictable": "1.x0",
        "vma_locked": "11x1",
        "vma_onfault": "00x1",
        "lru": "1.x0",
        "kind": "a.xz",
        "smaps": {"size_kb": 12, "rss_kb": 4, "locked_kb": 4, "vmas": 2},
    }


def test_file_view_decodes_tokens() -> None:
    lru_only = f"{1 << 5:x}"
    locked = f"{(1 << 33) | (1 << 18) | (1 << 5):x}"
    assert observe.file_view([locked, lru_only, "-"]) == {
        "mlocked": "10.",
        "unevictable": "10.",
        "lru": "11.",
    }


def test_flag_and_prot_decoding() -> None:
    assert T.flag_bits(["MLOCK_ONFAULT"], {"MLOCK_ONFAULT": 1}, "x") == 1
    assert T.flag_bits(6, {}, "x") == 6
    assert T.flag_bits(None, {}, "x") == 0
    with pytest.raises(ScenarioError):
        T.flag_bits(["MCL_NOPE"], {"MCL_CURRENT": 1}, "x")
    assert T.prot_bits(None) == 3
    assert T.prot_bits("r") == 1
    assert T.prot_bits("none") == 0
    with pytest.raises(ScenarioError):
        T.prot_bits("rq")
    assert T.page_range({}, 8) == (0, 8)
    assert T.page_range({"from": 2, "to": 3}, 8) == (2, 3)


def test_errno_names() -> None:
    assert errno_name(0) is None
    assert errno_name(0x100000000000) is None
    assert errno_name(-12) == "ENOMEM"
    assert errno_name(-22) == "EINVAL"


def test_neighbour_filter_needs_cpu_runtime_and_faults() -> None:
    N = neighbours.Task
    before = {
        10: N(10, "idle-daemon", 1, 100, 5),
        11: N(11, "allocator", 1, 100, 5),
        12: N(12, "other-cpu", 0, 100, 5),
        13: N(13, "ours", 1, 100, 5),
        14: N(14, "driver-thread", 1, 100, 5),
    }
    after = {
        10: N(10, "idle-daemon", 1, 900, 5),  # ran, but allocated nothing
        11: N(11, "allocator", 1, 900, 9),
        12: N(12, "other-cpu", 0, 900, 9),
        13: N(13, "ours", 1, 900, 9),
        14: N(14, "driver-thread", 1, 900, 9),
        15: N(15, "newborn", 1, 50, 3),
    }
    found = neighbours.foreign_runs(before, after, 1, our_tgids={13}, our_tids={14})
    assert [f.split("[")[0] for f in found] == ["allocator", "newborn"]


def test_validate_rejects_malformed_traces() -> None:
    with pytest.raises(ScenarioError):
        T.validate({"ops": []})
    with pytest.raises(ScenarioError):
        T.validate({"name": "x", "ops": [{}]})
    with pytest.raises(ScenarioError):
        T.validate({"name": "x", "procs": ["p0", "p0"], "ops": []})


@pytest.mark.parametrize("path", sorted(TRACES.glob("*.json")), ids=lambda p: p.stem)
def test_committed_traces_are_valid_and_cite_an_origin(path: Path) -> None:
    data = T.load(path)
    assert isinstance(data.get("origin"), list) and data["origin"]
    assert all(isinstance(o, str) and o for o in data["origin"])


def test_dumps_keeps_the_spec_key_order() -> None:
    doc = {"scenario": "s", "runner": "kernel", "ops": [], "snapshots": []}
    assert kernel_runner.dumps(doc) == (
        '{"scenario": "s", "runner": "kernel", "ops": [], "snapshots": []}'
    )
    assert list(json.loads(kernel_runner.dumps(doc))) == list(doc)


def _outside_refs(source: Path, tmp_path: Path) -> list[str]:
    """Relocation targets of section mmrt that live in another section."""
    try:
        cc = build.find_compiler()
    except HostUnsupported as exc:
        pytest.skip(str(exc))
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed")
    obj = tmp_path / (source.stem + ".o")
    subprocess.run(build.build_command(cc, obj, source, compile_only=True), check=True)

    def read(flag: str) -> str:
        return subprocess.run([readelf, flag, str(obj)], capture_output=True, text=True).stdout

    index = next(
        line.split("]")[0].strip(" [")
        for line in read("-SW").splitlines()
        if line.split("]")[-1].split()[:1] == ["mmrt"]
    )
    ndx = {}
    for line in read("-sW").splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0].rstrip(":").isdigit():
            ndx[parts[7]] = parts[6]
    block = read("-rW").split("Relocation section '.relammrt'")
    if len(block) == 1:
        return []  # no relocations at all
    targets = [
        parts[4]
        for parts in map(str.split, block[1].split("Relocation section")[0].splitlines()[2:])
        if len(parts) >= 5
    ]
    assert targets, "could not parse the runtime's relocations"
    return [t for t in targets if ndx.get(t) != index]


def test_runtime_section_is_self_contained(tmp_path: Path) -> None:
    """The code copied into the hugetlb page may only refer to itself (PC-relative)."""
    assert _outside_refs(build.SOURCE, tmp_path) == []


def test_runtime_check_catches_a_string_constant(tmp_path: Path) -> None:
    text = build.SOURCE.read_text()
    needle = "    rep->aux = 0;\n"
    assert needle in text
    bad = tmp_path / "bad_exec.c"
    bad.write_text(text.replace(needle, '    rep->aux = (long)"uses .rodata";\n', 1))
    assert _outside_refs(bad, tmp_path) != []
