"""Bad input at scale: a fuzzer for the mmsvc gRPC API against a real server.

    python -m loadtests.fuzz --requests 100000 [--target HOST:PORT] [--seed N]
                             [--concurrency 32] [--redis URL] [--json REPORT.json]
                             [--trace CALLS.jsonl] [--server-log PATH]
    python -m loadtests.fuzz --replay CALLS.jsonl --machine M [--check-every N]

Without ``--target`` a server is started for the run: ``mmsvc serve`` as a child process on a
free loopback port, over ``--redis URL`` or a private embedded ``redis-server``; its log is
scanned for server faults at the end.

What is sent (Hypothesis strategies, generated in a background thread, sent concurrently):

* **valid operations** on a few real machines and processes (mmap, faults, mlock, munlock,
  mprotect, madvise, fork, exit, migrate, reclaim, isolate/putback...), so that the deep code
  paths are reached;
* **adversarial structured requests** for every RPC of ``mmsvc.v1.MmService``, built from the
  proto descriptors: each field is either plausible (a real machine, a live pid, an address
  inside one of its mappings) or adversarial for its type (huge, negative, zero, unaligned,
  wrapping, unknown enum numbers and flag bits, unknown ids, long and odd strings, oversized
  repeated fields);
* **malformed bytes** through a generic unary call with identity serializers, to every method:
  empty bodies, truncated and garbled protobuf, wrong wire types, overlong varints, lengths
  past the end, bad UTF-8, deep groups, random bytes, one oversized body per run;
* **races**: short deadlines (the client gives up mid-call), machines deleted while calls on
  them are in flight, many calls in flight at once;
* **probes** ("nothing half-applied"): now and then one machine is made quiet (its calls
  drained, its batches drained), its state is read (vmstat, meminfo, every process's status,
  smaps and page flags, its files' page caches and, when the store is reachable, its store
  keys), a mutating request that should be refused is sent, and if it is refused with an
  errno after which Linux has changed nothing, the state is read again and must be equal.

At the end the server must answer Health, and ``Check(drain_all=True)`` must be green on every
machine.  The exit status is non-zero on any INTERNAL / UNKNOWN / DATA_LOSS status, a hang (a
call that ran into its deadline), an UNAVAILABLE server, internals leaked in an error message
(a traceback, an exception type), a half-applied call, a server crash, or checker violations.

``--trace`` records every call on the fuzzer's own machines; ``--replay`` sends the calls of
one of them again, one at a time, running the checker as it goes, to find the call after which
a violation first shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import heapq
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio
from google.protobuf import descriptor as pbd
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.internal.conjecture.providers import AVAILABLE_PROVIDERS

from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2 as pb
from mmsvc.proto_gen.mmsvc.v1 import types_pb2 as tpb

PAGE = 4096
U64_MAX = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
U32_MAX = (1 << 32) - 1

SERVICE = pb.DESCRIPTOR.services_by_name["MmService"]
METHODS: dict[str, pbd.MethodDescriptor] = {m.name: m for m in SERVICE.methods}
REQUEST: dict[str, type[Message]] = {
    name: message_factory.GetMessageClass(m.input_type) for name, m in METHODS.items()
}
RESPONSE: dict[str, type[Message]] = {
    name: message_factory.GetMessageClass(m.output_type) for name, m in METHODS.items()
}
METHOD_NAMES = tuple(sorted(METHODS))
#: Hypothesis' own backend spends its generation phase mutating earlier examples (copying parts
#: of one into another: good for finding a bug again, but three requests in four came out as
#: repeats of earlier ones).  The same provider under another name (the documented hook for
#: alternative backends) makes the engine draw every example afresh from its seeded random.
FRESH_BACKEND = "mmsvc-fuzz-fresh"
AVAILABLE_PROVIDERS.setdefault(
    FRESH_BACKEND, "hypothesis.internal.conjecture.providers.HypothesisProvider")
#: Methods that do not exist: the server must answer UNIMPLEMENTED, nothing worse.
UNKNOWN_METHODS = ("/mmsvc.v1.MmService/Frobnicate", "/mmsvc.v2.MmService/Ping")

#: Calls that change a machine (probed for half-applied rejections).
MUTATING = frozenset({
    "CreateFile", "CreateProcess", "Fork", "Exit", "Setrlimit", "DropCapability", "Mmap",
    "Munmap", "Mprotect", "Madvise", "Mlock", "Munlock", "Mlockall", "Munlockall", "Fault",
    "Migrate", "Isolate", "Putback", "Reclaim", "Truncate", "PunchHole", "Pin", "Unpin",
    "KsmMerge", "UffdCopy",
})
#: Rejections after which Linux may legitimately have done part of the work, as (errno, piece
#: of the message; "" for any): the VMA walks stop at a hole (ENOMEM) or at an unsuitable VMA
#: (madvise EINVAL, mprotect EACCES) with the earlier VMAs done; mlock's populate fails
#: (EAGAIN; or EFAULT on a PROT_NONE VMA, which __mlock_posix_error_return turns into ENOMEM)
#: after the VMAs were locked; a fault range stops at the first page it cannot fault.
#: Every other refusal (bad arguments, limits, the work bounds) must have changed nothing.
PARTIAL_OK: dict[str, tuple[tuple[str, str], ...]] = {
    "Mlock": (("ENOMEM", "not fully mapped"), ("ENOMEM", "PROT_NONE"), ("EAGAIN", "")),
    "Munlock": (("ENOMEM", "not fully mapped"),),
    "Mprotect": (("ENOMEM", "not fully mapped"), ("EACCES", "")),
    "Madvise": (("ENOMEM", "not fully mapped"), ("ENOMEM", "hole"), ("EINVAL", "mapping"),
                ("EAGAIN", "")),
    "Fault": (("ENOMEM", ""), ("EFAULT", ""), ("EAGAIN", "")),
    "Mlockall": (("EAGAIN", ""),),
    # GUP faults the range in before it pins: a fault that fails part-way keeps the pages
    # faulted before it (as Fault does), and nothing is pinned
    "Pin": (("ENOMEM", ""), ("EFAULT", "SIGBUS"), ("EAGAIN", "")),
    # UFFDIO_COPY copies page by page: the pages before the first one it cannot fill stay
    "UffdCopy": (("EEXIST", "pages copied"), ("EFAULT", "pages copied"),
                 ("ENOMEM", "pages copied")),
}


def partial_ok(method: str, reason: str, message: str) -> bool:
    return any(reason == errno and piece in message
               for errno, piece in PARTIAL_OK.get(method, ()))
#: Statuses that no request may ever produce.
FAULT_CODES = frozenset({
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
})
#: Things that must never reach a client in an error message.
LEAK_MARKERS = ("Traceback", "<class '", "File \"", "Exception", "Error parsing message",
                "DecodeError", "KeyError", "TypeError", "ValueError", "AttributeError",
                "redis.", "ResponseError", ".lua", "user_function", "script")

CALL_TIMEOUT = 30.0  # a call that takes longer is a hang
SHORT_DEADLINES = (0.0005, 0.002, 0.01, 0.05)
MAX_LIVE_PIDS = 8
MAX_TRACKED_AREAS = 24
MAX_CHURN_MACHINES = 6
REFRESH_EVERY = 50  # requests between two re-reads of a process's mappings
OVERSIZED_BODY = (64 << 20) + 1024  # just over the server's 64 MiB message limit

# ----------------------------------------------------------------------------------------------
# symbolic requests: references resolved against the live state when the request is sent
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineRef:
    """A real machine: ``stable`` (made by the fuzzer, checked at the end), ``churn`` (made by
    a fuzzed CreateMachine, deleted again while calls are in flight) or ``unknown``."""

    pool: str
    slot: int


@dataclass(frozen=True)
class PidRef:
    which: str  # live | dead | other
    slot: int


@dataclass(frozen=True)
class AddrRef:
    """An address relative to one of the process's known mappings."""

    area: int
    edge: str  # start | inside | end | before
    page: int
    byte: int


@dataclass(frozen=True)
class LenRef:
    """The length of one of the process's known mappings, plus ``delta`` bytes."""

    area: int
    delta: int


@dataclass(frozen=True)
class FileRef:
    slot: int


@dataclass(frozen=True)
class MemcgRef:
    slot: int


@dataclass(frozen=True)
class NodeRef:
    slot: int


@dataclass(frozen=True)
class FreshName:
    slot: int


@dataclass(frozen=True)
class Big:
    """An oversized value, built when sent (Hypothesis would be slow to draw it)."""

    what: str  # str | list
    n: int


@dataclass(frozen=True)
class Mutation:
    """How the serialized request is broken before it is sent as raw bytes."""

    kind: str
    a: int = 0
    b: int = 0
    data: bytes = b""


@dataclass(frozen=True)
class Call:
    method: str
    fields: tuple[tuple[str, object], ...]
    kind: str  # valid | adversarial | raw
    mutation: Mutation | None = None
    deadline: float | None = None  # a short client deadline (races the server's work)
    path: str | None = None  # an unknown method path (raw only)


# ----------------------------------------------------------------------------------------------
# Hypothesis strategies
# ----------------------------------------------------------------------------------------------

@functools.cache
def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """``st.integers``, built once (building strategies is most of Hypothesis' cost here)."""
    return st.integers(lo, hi)


@functools.cache
def pick(values: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    """``st.sampled_from``, built once."""
    return st.sampled_from(values)


U64_EDGES = (
    0, 1, 2, 7, 4095, 4096, 4097, 8191, 8192, 1 << 20, (1 << 24) * PAGE, (1 << 24) * PAGE + 1,
    I32_MAX, 1 << 31, U32_MAX, 1 << 32, (1 << 32) + PAGE, 1 << 35, 1 << 36, (1 << 36) + 1,
    0x7F0000000000, 0x7FFFFFFFF000, (1 << 47) - PAGE, (1 << 47) - 1, 1 << 47, (1 << 47) + 1,
    1 << 48, 1 << 52, 1 << 56, (1 << 63) - PAGE, I64_MAX, 1 << 63, U64_MAX - 2 * PAGE + 1,
    U64_MAX - PAGE + 1, U64_MAX - PAGE + 2, U64_MAX - 1, U64_MAX,
)
I64_EDGES = (0, 1, -1, 2, -2, 4096, -4096, 1023, 1024, I32_MAX, I32_MIN, 1 << 32, 1 << 53,
             (1 << 53) + 1, I64_MAX, I64_MIN, I64_MIN + 1)
I32_EDGES = (0, 1, -1, 2, 3, 63, 64, 65, 1023, 1024, 1 << 15, 1 << 16, I32_MAX, I32_MIN)
U32_EDGES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0x20, 0x40, 0x100, 0x2000, 0x4000, 0x8000,
             0x10000, 0x40000, 0x100000, 0x7FFFFFFF, 1 << 31, U32_MAX)
STR_EDGES = ("", "0", "1", "-1", "01", " 1", "1 ", "+1", "1e3", "0x1", "root", "|", "a|b",
             "{m1}", "{mmsvc}:machines", "1}", "{", "1:mm1", "1:cfg", "*", "?", "[a-z]*",
             "\\", "\x00", "a\x00b", "\n", "\u202e", "é", "\U0001f642", "../..", "%s%n",
             "x" * 255, "x" * 256, "x" * 257, "dev/zero#1", "prefill1", "NaN", "null")
#: Big but legal mapping lengths: 64 MiB .. 64 GiB (the most the emulator maps at once).
HUGE_LENGTHS = ((1 << 14) * PAGE, (1 << 16) * PAGE, (1 << 18) * PAGE, (1 << 20) * PAGE,
                (1 << 24) * PAGE)
#: mmap flag words: real combinations (some of them odd) before unknown bits are mixed in.
MAP_COMBOS = (0x22, 0x21, 0x02, 0x01, 0x03, 0x32, 0x31, 0x2022, 0x8022, 0xA022, 0x4022,
              0xC022, 0x2021, 0x8021, 0x8001, 0x8002, 0x2002, 0x2001, 0x20, 0x00, 0x10, 0x12)


@functools.cache
def _u64() -> st.SearchStrategy[int]:
    return st.one_of(
        pick(U64_EDGES),
        ints(0, U64_MAX),
        ints(0, 1 << 20).map(lambda n: n * PAGE),
        ints(1, 64).map(lambda n: U64_MAX - n * PAGE + 1),
    )


@functools.cache
def _i64() -> st.SearchStrategy[int]:
    return st.one_of(pick(I64_EDGES), ints(I64_MIN, I64_MAX))


@functools.cache
def _u32() -> st.SearchStrategy[int]:
    return st.one_of(pick(U32_EDGES), ints(0, U32_MAX))


@functools.cache
def _i32() -> st.SearchStrategy[int]:
    return st.one_of(pick(I32_EDGES), ints(I32_MIN, I32_MAX))


@functools.cache
def _string() -> st.SearchStrategy[object]:
    return st.one_of(
        pick(STR_EDGES),
        st.text(max_size=24),
        pick((Big("str", 1 << 12), Big("str", 1 << 16), Big("str", 1 << 20))),
    )


@functools.cache
def _enum(desc: pbd.EnumDescriptor) -> st.SearchStrategy[int]:
    known = tuple(v.number for v in desc.values)
    return st.one_of(
        pick(known),
        pick((-1, 3, 5, 9, 25, 99, I32_MAX, I32_MIN)),
        ints(I32_MIN, I32_MAX),
    )


@functools.cache
def generic(fd: pbd.FieldDescriptor) -> st.SearchStrategy[object]:
    """An adversarial value for a field, from its descriptor alone."""
    scalar: st.SearchStrategy[object]
    t = fd.type
    if t == pbd.FieldDescriptor.TYPE_STRING:
        scalar = _string()
    elif t in (pbd.FieldDescriptor.TYPE_UINT64, pbd.FieldDescriptor.TYPE_FIXED64):
        scalar = _u64()
    elif t in (pbd.FieldDescriptor.TYPE_INT64, pbd.FieldDescriptor.TYPE_SINT64,
               pbd.FieldDescriptor.TYPE_SFIXED64):
        scalar = _i64()
    elif t in (pbd.FieldDescriptor.TYPE_UINT32, pbd.FieldDescriptor.TYPE_FIXED32):
        scalar = _u32()
    elif t in (pbd.FieldDescriptor.TYPE_INT32, pbd.FieldDescriptor.TYPE_SINT32,
               pbd.FieldDescriptor.TYPE_SFIXED32):
        scalar = _i32()
    elif t == pbd.FieldDescriptor.TYPE_BOOL:
        scalar = st.booleans()
    elif t == pbd.FieldDescriptor.TYPE_ENUM:
        scalar = _enum(fd.enum_type)
    elif t == pbd.FieldDescriptor.TYPE_MESSAGE:
        scalar = message_fields(fd.message_type)
    elif t in (pbd.FieldDescriptor.TYPE_DOUBLE, pbd.FieldDescriptor.TYPE_FLOAT):
        scalar = st.floats(allow_nan=True)
    else:  # bytes
        scalar = st.binary(max_size=32)
    if _is_repeated(fd):
        return st.one_of(
            st.lists(scalar, max_size=6),
            pick((Big("list", 65), Big("list", 1000), Big("list", 100_000))),
        )
    return scalar


@functools.cache
def message_fields(desc: pbd.Descriptor) -> st.SearchStrategy[dict[str, object]]:
    return _message_fields(desc)


def _is_repeated(fd: pbd.FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def _has_presence(fd: pbd.FieldDescriptor) -> bool:
    return bool(fd.has_presence) and fd.type != pbd.FieldDescriptor.TYPE_MESSAGE


@st.composite
def _message_fields(draw: st.DrawFn, desc: pbd.Descriptor) -> dict[str, object]:
    """A nested message (MachineConfig) as a dict of adversarial field values."""
    out: dict[str, object] = {}
    for fd in desc.fields:
        if draw(ints(0, 3)) == 0:
            continue  # left at its default
        out[fd.name] = draw(_config_field(fd) if desc.name == "MachineConfig" else generic(fd))
    return out


@functools.cache
def _config_field(fd: pbd.FieldDescriptor) -> st.SearchStrategy[object]:
    """MachineConfig fields: often small and sane (a machine that gets created), else bad."""
    sane: dict[str, st.SearchStrategy[object]] = {
        "nodes": ints(0, 3),
        "frames_per_node": pick((0, 256, 1024, 4096)),
        "memcgs": st.lists(pick(("root", "a", "b", "c")), max_size=3, unique=True),
        "swap_pages": pick((0, 64, 1024)),
        "mlock_batch_len": ints(0, 31),
        "lru_add_batch_len": ints(0, 31),
        "protocol": pick((0, 1, 2)),
        "fault_around_pages": pick((0, 1, 4, 16)),
        "hpage_pmd_nr": pick((0, 512)),
        "name": pick(("", "fuzz")),
        "thp": st.booleans(),
        "populate_drain": st.booleans(),
    }
    if fd.name in sane:
        return st.one_of(sane[fd.name], sane[fd.name], sane[fd.name], generic(fd))
    return generic(fd)


@functools.cache
def _plausible(name: str, method: str) -> st.SearchStrategy[object] | None:
    """A value that refers to something real (or is in range) for a field of this name."""
    slot = ints(0, 63)
    if name == "machine":
        return st.one_of(
            st.builds(MachineRef, st.just("stable"), slot),
            st.builds(MachineRef, st.just("stable"), slot),
            st.builds(MachineRef, st.just("churn"), slot),
            st.builds(MachineRef, st.just("unknown"), slot),
        )
    if name == "pid":
        return st.one_of(
            st.builds(PidRef, st.just("live"), slot),
            st.builds(PidRef, st.just("live"), slot),
            st.builds(PidRef, pick(("dead", "other")), slot),
        )
    if name == "addr":
        return st.builds(AddrRef, slot, pick(("start", "inside", "end", "before")),
                         ints(0, 300), pick((0, 0, 0, 1, 17, 4095)))
    if name == "length":
        return st.one_of(
            ints(0, 64).map(lambda n: n * PAGE),
            ints(0, 3 * PAGE),
            st.builds(LenRef, slot, pick((0, 0, -PAGE, PAGE, 1, -1, 10 * PAGE))),
        )
    if name == "prot":
        return ints(0, 7)
    if name == "flags":
        if method == "Mmap":
            return pick(MAP_COMBOS)
        if method == "Mlockall":
            return ints(0, 7)
        return ints(0, 1)
    if name == "advice":
        return pick(tuple(v.number for v in tpb.Advice.DESCRIPTOR.values))
    if name == "cap":
        return pick((0, 1))
    if name == "file":
        return st.builds(FileRef, slot)
    if name == "name" and method == "CreateFile":
        return st.one_of(st.builds(FreshName, slot), st.builds(FileRef, slot))
    if name == "memcg":
        return st.builds(MemcgRef, slot)
    if name == "node":
        return st.builds(NodeRef, slot)
    if name == "nr_pages":
        return ints(1, 512)
    if name == "offset":
        return ints(0, 40).map(lambda n: n * PAGE)
    if name == "pages":
        return ints(1, 64)
    if name in ("soft", "hard", "rlimit_memlock_soft", "rlimit_memlock_hard"):
        return pick((0, PAGE, 64 * PAGE, 8 << 20, U64_MAX))
    return None


@st.composite
def adversarial_call(draw: st.DrawFn) -> Call:
    """Any RPC; each field plausible or adversarial for its type (or left unset)."""
    method = draw(pick(METHOD_NAMES))
    desc = METHODS[method].input_type
    fields: list[tuple[str, object]] = []
    for fd in desc.fields:
        choice = draw(ints(0, 9))
        if _has_presence(fd) and choice == 0:
            continue  # an optional field left unset
        plausible = _plausible(fd.name, method)
        if plausible is not None and choice < 6:
            fields.append((fd.name, draw(plausible)))
        elif fd.name == "config":
            fields.append((fd.name, draw(message_fields(fd.message_type))))
        else:
            fields.append((fd.name, draw(generic(fd))))
    deadline = None
    if draw(ints(0, 19)) == 0:
        deadline = draw(pick(SHORT_DEADLINES))
    return Call(method, tuple(fields), "adversarial", deadline=deadline)


# -- valid operations on the real machines ----------------------------------------------------

VALID_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("Mmap", 10), ("Fault", 10), ("Mlock", 9), ("Munlock", 6), ("Mprotect", 4),
    ("Madvise", 6), ("Munmap", 3), ("Mlockall", 2), ("Munlockall", 2), ("Fork", 3),
    ("Exit", 1), ("CreateProcess", 1), ("Migrate", 3), ("Reclaim", 3), ("Drain", 2),
    ("Isolate", 2), ("Putback", 2), ("Setrlimit", 1), ("Vmstat", 1), ("PageFlags", 2),
    ("Smaps", 1), ("ProcStatus", 1), ("CreateFile", 1), ("FilePages", 1), ("Check", 1),
    ("DropCapability", 1), ("LockStat", 1), ("Meminfo", 1),
)
VALID_METHODS = tuple(m for m, w in VALID_WEIGHTS for _ in range(w))


THP_HINT = 0x7E00_0000_0000  # 2 MiB aligned
BIG_FILE = 3  # "h0", the fourth file of the THP machine (setup)
MADV_COLLAPSE = 25


@st.composite
def valid_call(draw: st.DrawFn) -> Call:
    """A sensible call on a stable machine (references resolved when sent)."""
    method = draw(pick(VALID_METHODS))
    slot = ints(0, 63)
    f: dict[str, object] = {
        "machine": MachineRef("stable", draw(slot)),
        "pid": PidRef("live", draw(slot)),
    }
    area = draw(slot)
    start = AddrRef(area, "start", 0, 0)
    inside = AddrRef(area, "inside", draw(ints(0, 64)), 0)
    whole = LenRef(area, draw(pick((0, 0, 0, -PAGE, PAGE))))
    some = draw(ints(1, 16)) * PAGE
    if method == "Mmap":
        flags = draw(pick((0x22, 0x22, 0x22, 0x21, 0x02, 0x01, 0x2022, 0x8022,
                           0x8002, 0x2001, 0xA022)))
        length = draw(ints(1, 48)) * PAGE - draw(pick((0, 0, 100)))
        if draw(ints(0, 49)) == 0:  # now and then a huge one (later calls cover it whole)
            length = draw(pick(HUGE_LENGTHS))
        f.update(length=length, prot=draw(pick((3, 3, 3, 1, 0, 7))), flags=flags)
        if not flags & 0x20:
            f.update(file=FileRef(draw(slot)), offset=draw(ints(0, 8)) * PAGE)
        if draw(ints(0, 9)) == 0:
            # now and then a 2 MiB-aligned shared mapping of one or two THP-sized ranges of a
            # file (the big tmpfs file "h0" when drawn): MADV_COLLAPSE can make file THPs there
            f.update(length=draw(pick((512, 1024))) * PAGE, flags=0x01, offset=0,
                     file=FileRef(draw(pick((BIG_FILE, BIG_FILE, draw(slot))))),
                     prot=draw(pick((3, 1))),
                     addr=THP_HINT + draw(ints(0, 63)) * (2 << 20))
    elif method in ("Fault", "Migrate"):
        f.update(addr=draw(pick((start, inside))),
                 length=draw(pick((whole, some))))
        if method == "Fault":
            f["write"] = draw(st.booleans())
        else:
            f["node"] = NodeRef(draw(slot))
    elif method in ("Mlock", "Munlock", "Mprotect", "Madvise", "Munmap", "Isolate", "Putback",
                    "PageFlags"):
        f.update(addr=draw(pick((start, start, inside))),
                 length=draw(pick((whole, whole, some))))
        if method == "Mlock":
            f["flags"] = draw(pick((0, 0, 1)))
        elif method == "Mprotect":
            f["prot"] = draw(pick((1, 3, 0, 7)))
        elif method == "Madvise":
            f["advice"] = draw(pick((*(a for a in range(4, 26) if a in tpb.Advice.values()),
                                     MADV_COLLAPSE, MADV_COLLAPSE)))
        elif method == "PageFlags":
            f["length"] = some
    elif method == "Mlockall":
        f["flags"] = draw(pick((1, 2, 3, 5, 6, 7)))
    elif method == "CreateProcess":
        del f["pid"]
        f.update(memcg=MemcgRef(draw(slot)), node=NodeRef(draw(slot)))
        if draw(st.booleans()):
            f.update(rlimit_memlock_soft=64 * PAGE, rlimit_memlock_hard=1 << 20,
                     cap_ipc_lock=False)
    elif method == "Setrlimit":
        soft = draw(pick((0, 16 * PAGE, 8 << 20, U64_MAX)))
        f.update(soft=soft, hard=draw(pick((soft, U64_MAX))))
    elif method == "DropCapability":
        f["cap"] = 1
    elif method == "Reclaim":
        del f["pid"]
        f["nr_pages"] = draw(ints(1, 256))
        if draw(st.booleans()):
            f["node"] = NodeRef(draw(slot))
        if draw(st.booleans()):
            f["memcg"] = MemcgRef(draw(slot))
    elif method in ("Drain", "Check"):
        del f["pid"]
        f["all_cpus" if method == "Drain" else "drain_all"] = draw(st.booleans())
    elif method == "CreateFile":
        del f["pid"]
        f.update(name=FreshName(draw(slot)), pages=draw(ints(1, 64)),
                 prefill=draw(st.booleans()), kind=draw(pick((0, 1, 2))))
    elif method == "FilePages":
        del f["pid"]
        f["file"] = FileRef(draw(slot))
    elif method in ("Vmstat", "Meminfo", "LockStat"):
        del f["pid"]
    return Call(method, tuple(f.items()), "valid")


# -- malformed bytes --------------------------------------------------------------------------

RAW_KINDS = ("empty", "random", "truncate", "flip", "insert", "wire_type", "overlong_varint",
             "bad_length", "huge_length", "bad_utf8", "field_zero", "max_field", "deep_groups",
             "unterminated_group", "concat")


@st.composite
def raw_call(draw: st.DrawFn) -> Call:
    """A request serialized, then broken (or raw bytes from scratch)."""
    base = draw(st.one_of(valid_call(), adversarial_call()))
    kind = draw(pick(RAW_KINDS))
    mutation = Mutation(kind, draw(ints(0, 1 << 20)), draw(ints(0, 1 << 16)),
                        draw(st.binary(max_size=48)))
    method = base.method if draw(ints(0, 3)) else draw(pick(METHOD_NAMES))
    path = draw(pick(UNKNOWN_METHODS)) if draw(ints(0, 99)) == 0 else None
    return Call(method, base.fields, "raw", mutation=mutation, path=path)


@st.composite
def any_call(draw: st.DrawFn, valid_pct: int, raw_pct: int) -> Call:
    roll = draw(ints(0, 99))
    if roll < valid_pct:
        return draw(valid_call())
    if roll < valid_pct + raw_pct:
        return draw(raw_call())
    return draw(adversarial_call())


# ----------------------------------------------------------------------------------------------
# wire-format helpers for the malformed bodies
# ----------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    return varint((field_number << 3) | wire_type)


def _pos(x: int, n: int) -> int:
    return x % (n + 1) if n else 0


def mutate(base: bytes, mut: Mutation, desc: pbd.Descriptor) -> bytes:
    """Break ``base`` (a serialized ``desc`` message) as ``mut`` says."""
    numbers = [fd.number for fd in desc.fields] or [1]
    fnum = numbers[mut.a % len(numbers)]
    k = mut.kind
    if k == "empty":
        return b""
    if k == "random":
        return mut.data
    if k == "truncate":
        return base[: _pos(mut.a, max(len(base) - 1, 0))]
    if k == "flip":
        ba = bytearray(base or b"\x00")
        for i, x in enumerate(mut.data[:6] or b"\xff"):
            ba[(mut.a + 7919 * i) % len(ba)] ^= x or 0xFF
        return bytes(ba)
    if k == "insert":
        p = _pos(mut.a, len(base))
        return base[:p] + mut.data + base[p:]
    if k == "wire_type":
        wt = mut.b % 8
        payload = {0: varint(mut.b), 1: mut.data[:8].ljust(8, b"\x01"),
                   2: varint(len(mut.data)) + mut.data, 5: mut.data[:4].ljust(4, b"\x02"),
                   3: b"", 4: b"", 6: mut.data[:3], 7: mut.data[:3]}[wt]
        piece = tag(fnum, wt) + payload
        return piece + base if mut.a % 2 else base + piece
    if k == "overlong_varint":
        return base + tag(fnum, 0) + b"\xff" * 10 + b"\x01"
    if k == "bad_length":
        return base + tag(fnum, 2) + varint(len(mut.data) + 1 + mut.b % 1000) + mut.data
    if k == "huge_length":
        return tag(fnum, 2) + b"\xff\xff\xff\xff\x0f" + mut.data + base
    if k == "bad_utf8":
        strings = [fd.number for fd in desc.fields if fd.type == pbd.FieldDescriptor.TYPE_STRING]
        number = strings[mut.a % len(strings)] if strings else 1
        junk = (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\xe2\x82")
        bad = junk[mut.b % len(junk)]
        return base + tag(number, 2) + varint(len(bad)) + bad
    if k == "field_zero":
        return base + b"\x00" + varint(mut.b)
    if k == "max_field":
        number = ((1 << 29) - 1, 1 << 29, 1 << 31, 19000, 0)[mut.b % 5]
        return base + varint((number << 3) | (mut.a % 6)) + varint(mut.b)
    if k == "deep_groups":
        depth = 50 + mut.b % 400
        return base + tag(fnum + 100, 3) * depth + tag(fnum + 100, 4) * depth
    if k == "unterminated_group":
        return base + tag(fnum, 3) + varint(mut.b)
    if k == "concat":
        return base + base[: _pos(mut.a, len(base))]
    raise ValueError(f"unknown mutation {k}")


# ----------------------------------------------------------------------------------------------
# the live state the references are resolved against
# ----------------------------------------------------------------------------------------------


class RWLock:
    """Many calls on a machine at once, or one probe alone (writer preferred)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            await self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Proc:
    pid: int
    areas: list[tuple[int, int]] = field(default_factory=list)  # mapped [start, end) bytes
    alive: bool = True


@dataclass
class MachineState:
    mid: str
    stable: bool
    nodes: int = 1
    memcgs: list[str] = field(default_factory=lambda: ["root"])
    files: list[str] = field(default_factory=list)
    procs: dict[int, Proc] = field(default_factory=dict)
    lock: RWLock = field(default_factory=RWLock)
    gone: bool = False
    names: int = 0
    probing: bool = False  # a probe has (or waits for) the machine to itself
    # a call on it ran past its deadline: the server may still be running it (kernel calls
    # are shielded from cancellation), so probes, which need the machine quiet, skip it
    hung: bool = False
    gone_at: float = 0.0  # when the fuzzer saw it deleted

    def live(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.alive]

    def dead(self) -> list[Proc]:
        return [p for p in self.procs.values() if not p.alive]


def subtract(areas: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in areas:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out


def page_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


@dataclass
class Resolved:
    """A concrete request and what the world needs to learn from its answer."""

    call: Call
    request: Message | None
    body: bytes | None  # raw calls
    machine: MachineState | None
    proc: Proc | None
    note: dict[str, Any] = field(default_factory=dict)


class World:
    """The machines the fuzzer knows, their processes, mappings and files."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.stable: list[MachineState] = []
        self.churn: list[MachineState] = []
        self.by_id: dict[str, MachineState] = {}

    def add(self, ms: MachineState) -> None:
        (self.stable if ms.stable else self.churn).append(ms)
        self.by_id[ms.mid] = ms

    def forget(self, mid: str) -> None:
        ms = self.by_id.pop(mid, None)
        if ms is not None:
            ms.gone = True
            ms.gone_at = time.perf_counter()
            for pool in (self.stable, self.churn):
                if ms in pool:
                    pool.remove(ms)

    # -- resolution ----------------------------------------------------------------------

    def machine(self, ref: MachineRef, method: str) -> tuple[str, MachineState | None]:
        stable = [m for m in self.stable if not m.gone and not m.probing]
        churn = [m for m in self.churn if not m.gone]
        if ref.pool.startswith("="):  # this very machine (probes)
            ms = self.by_id.get(ref.pool[1:])
            return ref.pool[1:], ms
        if method == "DeleteMachine" and ref.pool == "stable":
            ref = MachineRef("churn", ref.slot)  # the stable machines are kept to the end
        if ref.pool == "stable" and stable:
            ms = stable[ref.slot % len(stable)]
            return ms.mid, ms
        if ref.pool == "churn" and churn:
            ms = churn[ref.slot % len(churn)]
            return ms.mid, ms
        return str(10_000_000 + ref.slot), None  # a machine that does not exist

    def pid(self, ref: PidRef, ms: MachineState | None) -> tuple[int, Proc | None]:
        if ms is None:
            return 1 + ref.slot, None
        pool = ms.live() if ref.which == "live" else ms.dead() if ref.which == "dead" else []
        if pool:
            p = pool[ref.slot % len(pool)]
            return p.pid, p
        top = max(ms.procs, default=0)
        return top + 1000 + ref.slot, None

    def resolve(self, call: Call) -> Resolved:
        known = METHODS[call.method].input_type.fields_by_name
        # (a raw call may reuse the fields of another method's request)
        fields = {k: v for k, v in call.fields if k in known}
        ms: MachineState | None = None
        proc: Proc | None = None
        out: dict[str, object] = {}
        note: dict[str, Any] = {}
        mref = fields.get("machine")
        if isinstance(mref, MachineRef):
            out["machine"], ms = self.machine(mref, call.method)
        pref = fields.get("pid")
        if isinstance(pref, PidRef):
            out["pid"], proc = self.pid(pref, ms)
        if call.kind == "valid" and ms is not None:
            call, fields, proc, out = self._keep_in_bounds(call, fields, ms, proc, out)
        areas = proc.areas if proc is not None else []
        for name, value in fields.items():
            if name in out:
                continue
            out[name] = self._value(value, ms, areas, call.method, note)
        request = REQUEST[call.method](**out)
        body = None
        if call.kind == "raw" and call.mutation is not None:
            body = mutate(request.SerializeToString(), call.mutation,
                          METHODS[call.method].input_type)
        return Resolved(call, request, body, ms, proc, note)

    def _keep_in_bounds(
        self, call: Call, fields: dict[str, object], ms: MachineState, proc: Proc | None,
        out: dict[str, object],
    ) -> tuple[Call, dict[str, object], Proc | None, dict[str, object]]:
        """Valid calls keep the world small: bounded processes and mappings."""
        live = ms.live()
        method = call.method
        if "pid" in fields and not live:
            method = "CreateProcess"
        elif method in ("Fork", "CreateProcess") and len(live) >= MAX_LIVE_PIDS:
            method = "Exit"
        elif method == "Exit" and len(live) <= 2:
            method = "Fork"
        elif method == "Mmap" and proc is not None and len(proc.areas) >= MAX_TRACKED_AREAS:
            method = "Munmap"
        if method == call.method:
            return call, fields, proc, out
        new: dict[str, object] = {"machine": fields["machine"]}
        if method == "CreateProcess":
            out = {"machine": out["machine"]}
            proc = None
        else:
            new["pid"] = fields.get("pid", PidRef("live", 0))
        if method == "Exit" and len(live) > 2:
            # never the first processes: they keep the long-lived mappings
            p = self.rng.choice(live[2:])
            out["pid"], proc = p.pid, p
        if method == "Munmap":
            new.update(addr=AddrRef(self.rng.randrange(64), "start", 0, 0), length=LenRef(0, 0))
        new_call = Call(method, tuple(new.items()), call.kind)
        return new_call, new, proc, out

    def _value(self, value: object, ms: MachineState | None, areas: list[tuple[int, int]],
               method: str, note: dict[str, Any]) -> object:
        if isinstance(value, AddrRef):
            if not areas:
                return 0x7F0000000000 - (value.page + 1) * PAGE + value.byte
            a, b = areas[value.area % len(areas)]
            note["area"] = (a, b)
            if value.edge == "start":
                return a + value.byte
            if value.edge == "inside":
                return a + (value.page * PAGE) % (b - a) + value.byte
            if value.edge == "end":
                return b + value.byte
            return max(a - PAGE, 0) + value.byte
        if isinstance(value, LenRef):
            a, b = note.get("area") or (areas[value.area % len(areas)] if areas else (0, PAGE))
            return max(b - a + value.delta, 0) if method != "PageFlags" else PAGE
        if isinstance(value, FileRef):
            if ms is None or not ms.files:
                return f"nofile{value.slot}"
            return ms.files[value.slot % len(ms.files)]
        if isinstance(value, FreshName):
            if ms is None:
                return f"f{value.slot}"
            ms.names += 1
            return f"fz{ms.names}"
        if isinstance(value, MemcgRef):
            if ms is None:
                return "root"
            return ms.memcgs[value.slot % len(ms.memcgs)]
        if isinstance(value, NodeRef):
            return value.slot % (ms.nodes if ms is not None else 1)
        if isinstance(value, MachineRef):
            return self.machine(value, method)[0]
        if isinstance(value, PidRef):
            return self.pid(value, ms)[0]
        if isinstance(value, Big):
            if value.what == "str":
                return "x" * value.n
            return [f"cg{i}" for i in range(value.n)]
        if isinstance(value, dict):
            return {k: self._value(v, ms, areas, method, note) for k, v in value.items()}
        if isinstance(value, list):
            return [self._value(v, ms, areas, method, note) for v in value]
        return value

    # -- learning from answers ----------------------------------------------------------

    def learn(self, r: Resolved, response: Message) -> None:
        """Update the world after a structured call succeeded."""
        req = r.request
        ms = r.machine
        method = r.call.method
        if method == "CreateMachine":
            assert isinstance(response, pb.CreateMachineResponse)
            assert isinstance(req, pb.CreateMachineRequest)
            cfg = req.config
            new = MachineState(response.machine, stable=False, nodes=cfg.nodes or 1,
                               memcgs=list(cfg.memcgs) or ["root"])
            self.add(new)
            return
        if method == "DeleteMachine":
            assert isinstance(req, pb.DeleteMachineRequest)
            self.forget(req.machine)
            return
        if ms is None:
            return
        if method == "CreateProcess":
            assert isinstance(response, pb.CreateProcessResponse)
            ms.procs[response.pid] = Proc(response.pid)
        elif method == "Fork" and r.proc is not None:
            assert isinstance(response, pb.ForkResponse)
            ms.procs[response.child_pid] = Proc(response.child_pid, list(r.proc.areas))
        elif method == "Exit" and r.proc is not None:
            r.proc.alive = False
            r.proc.areas = []
        elif method == "CreateFile":
            assert isinstance(req, pb.CreateFileRequest)
            if req.name not in ms.files:
                ms.files.append(req.name)
        elif method == "Mmap" and r.proc is not None:
            assert isinstance(response, pb.MmapResponse)
            assert isinstance(req, pb.MmapRequest)
            start, end = response.addr, response.addr + page_up(req.length)
            r.proc.areas = [*subtract(r.proc.areas, start, end), (start, end)]
        elif method == "Munmap" and r.proc is not None:
            assert isinstance(req, pb.MunmapRequest)
            r.proc.areas = subtract(r.proc.areas, req.addr, req.addr + page_up(req.length))

    def refresh(self, ms: MachineState, proc: Proc, smaps: pb.SmapsResponse) -> None:
        proc.areas = [(e.start, e.end) for e in smaps.vmas][-MAX_TRACKED_AREAS * 2:]


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------


@dataclass
class Failure:
    category: str  # INTERNAL | UNKNOWN | DATA_LOSS | hang | unavailable | leak | half-applied
    #                | crash | check | fuzzer
    method: str
    detail: str


@dataclass
class FuzzReport:
    requests: int = 0
    seconds: float = 0.0
    sent: Counter[str] = field(default_factory=Counter)
    raw: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    by_method: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    codes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    no_error_info: Counter[str] = field(default_factory=Counter)
    probes: int = 0
    probes_compared: int = 0
    probe_reasons: Counter[str] = field(default_factory=Counter)
    machines_checked: int = 0
    pages_checked: int = 0
    server_alive: bool = False
    failures: list[Failure] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    leaked_keys: list[str] = field(default_factory=list)
    machines_listed: list[str] = field(default_factory=list)
    seconds_by_method: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    samples: dict[str, str] = field(default_factory=dict)  # first call per method/code/errno
    hang_starts: list[tuple[float, str]] = field(default_factory=list)  # (seconds in, call)
    slowest: list[tuple[float, str]] = field(default_factory=list)

    def timed(self, method: str, seconds: float, what: Callable[[], str]) -> None:
        self.seconds_by_method[method] += seconds
        if len(self.slowest) < 10 or seconds > self.slowest[0][0]:
            heapq.heappush(self.slowest, (seconds, what()))
            if len(self.slowest) > 10:
                heapq.heappop(self.slowest)

    @property
    def ok(self) -> bool:
        return not self.failures and self.server_alive

    def fail(self, category: str, method: str, detail: str) -> None:
        if len(self.failures) < 10_000:
            self.failures.append(Failure(category, method, detail[:2000]))

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "requests_per_second": round(self.requests / self.seconds, 1) if self.seconds else 0,
            "sent": dict(self.sent),
            "raw": dict(self.raw),
            "kinds": dict(self.kinds),
            "codes": dict(self.codes),
            "reasons": dict(self.reasons),
            "by_method": {m: dict(c) for m, c in sorted(self.by_method.items())},
            "probes": self.probes,
            "probes_compared": self.probes_compared,
            "machines_checked": self.machines_checked,
            "pages_checked": self.pages_checked,
            "server_alive": self.server_alive,
            "failures": [dataclasses.asdict(f) for f in self.failures],
            "server_errors": self.server_errors,
            "leaked_keys": self.leaked_keys,
            "machines_listed": self.machines_listed,
            "seconds_by_method": {m: round(t, 3) for m, t in self.seconds_by_method.items()},
            "slowest": sorted(self.slowest, reverse=True),
            "samples": self.samples,
            "hang_starts": sorted(self.hang_starts),
            "ok": self.ok,
        }


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info
    return None


def describe(r: Resolved) -> str:
    if r.body is not None:
        kind = r.call.mutation.kind if r.call.mutation else ""
        more = "..." if len(r.body) > 120 else ""
        return f"{r.call.path or r.call.method} raw[{kind}] {r.body[:120]!r}{more}"
    text = str(r.request).replace("\n", " ").strip() if r.request is not None else ""
    if len(text) > 400:
        text = text[:400] + "..."
    return f"{r.call.method}({text})"


# ----------------------------------------------------------------------------------------------
# the server under test
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:
            return port


class ServerProcess:
    """``mmsvc serve`` as a child process, logging JSON to a file."""

    def __init__(self, redis_url: str, log_path: Path, workers: int = 1,
                 log_level: str = "warning", cpus_per_worker: int = 2) -> None:
        self.redis_url = redis_url
        self.log_path = log_path
        self.workers = workers
        # two CPUs per worker: the machines with task_migrate_permille move tasks between them
        self.cpus_per_worker = cpus_per_worker
        self.log_level = log_level
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmsvc.cli.main", "serve", "--listen", self.target,
             "--redis", self.redis_url, "--workers", str(self.workers),
             "--cpus-per-worker", str(self.cpus_per_worker),
             "--log-format", "json", "--log-level", self.log_level],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def errors(self) -> list[str]:
        """Error-level log lines, each summarised with its exception and innermost frames."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        out: list[str] = []
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                if "Traceback" in line or "Error" in line:
                    out.append(line[:300])
                continue
            if not isinstance(rec, dict) or rec.get("level") not in ("error", "critical"):
                continue
            head = f"{rec.get('event')} {rec.get('method', '')}".strip()
            for exc in rec.get("exception") or []:
                if not isinstance(exc, dict):
                    continue
                frames = exc.get("frames") or []
                where = " <- ".join(f"{Path(f['filename']).name}:{f['lineno']} {f['name']}"
                                    for f in reversed(frames[-4:]))
                head += f": {exc.get('exc_type')}: {exc.get('exc_value')} @ {where}"
            out.append(head)
        return out


async def wait_healthy(target: str, timeout: float, server: ServerProcess | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server is not None and not server.alive():
            raise RuntimeError("the server exited while starting:\n"
                               + "\n".join(server.errors()[-20:]))
        if await healthy(target, 2.0):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no healthy server at {target}")
        await asyncio.sleep(0.2)


async def healthy(target: str, timeout: float = 10.0) -> bool:
    async with grpc.aio.insecure_channel(target) as ch:
        check = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            resp = await check(health_pb2.HealthCheckRequest(service=SERVICE.full_name),
                               timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


# ----------------------------------------------------------------------------------------------
# the fuzzer
# ----------------------------------------------------------------------------------------------


@dataclass
class FuzzConfig:
    requests: int = 100_000
    target: str | None = None
    redis_url: str | None = None
    seed: int = 0
    concurrency: int = 32
    channels: int = 2
    valid_pct: int = 35
    raw_pct: int = 15
    probe_pause: float = 0.05  # seconds between probes; < 0: no probes
    batch: int = 16
    workers: int = 1  # server worker processes, when the fuzzer starts the server
    call_timeout: float = CALL_TIMEOUT
    trace: str | None = None  # JSON lines: every call on the fuzzer's own machines
    server_log: str | None = None  # keep the started server's log here
    server_log_level: str = "warning"
    progress: bool = True
    out: TextIO = sys.stdout


class Fuzzer:
    def __init__(self, cfg: FuzzConfig, target: str, store_url: str | None) -> None:
        self.cfg = cfg
        self.target = target
        self.store_url = store_url
        self.rng = random.Random(cfg.seed)
        self.world = World(self.rng)
        self.report = FuzzReport()
        self.channels: list[grpc.aio.Channel] = []
        self._callables: dict[tuple[int, str, bool], Any] = {}
        self._sent = 0
        self._stop = threading.Event()
        self._redis: Any = None
        self.generator_error: str | None = None
        self.t0 = time.perf_counter()
        self._trace: TextIO | None = open(cfg.trace, "w") if cfg.trace else None  # noqa: SIM115

    # -- plumbing ------------------------------------------------------------------------

    async def open(self) -> None:
        options = [("grpc.max_send_message_length", 128 << 20),
                   ("grpc.max_receive_message_length", 128 << 20)]
        self.channels = [grpc.aio.insecure_channel(self.target, options=options)
                         for _ in range(self.cfg.channels)]
        if self.store_url is not None:
            import redis.asyncio

            self._redis = redis.asyncio.Redis.from_url(self.store_url)

    async def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
        for ch in self.channels:
            await ch.close()
        if self._redis is not None:
            await self._redis.aclose()

    def _callable(self, ch_index: int, path: str, method: str | None) -> Any:
        key = (ch_index, path, method is None)
        fn = self._callables.get(key)
        if fn is None:
            ch = self.channels[ch_index]
            if method is None:
                fn = ch.unary_unary(path)  # identity: bytes in, bytes out
            else:
                fn = ch.unary_unary(path, request_serializer=REQUEST[method].SerializeToString,
                                    response_deserializer=RESPONSE[method].FromString)
            self._callables[key] = fn
        return fn

    async def call(self, method: str, request: Message, timeout: float | None = None) -> Any:
        """A call of the fuzzer's own (setup, probes, checks): errors raise."""
        fn = self._callable(0, f"/{SERVICE.full_name}/{method}", method)
        if self._trace is None or (method not in MUTATING and method not in (
                "CreateMachine", "Drain", "Check")):
            return await fn(request, timeout=timeout or self.cfg.call_timeout)
        t0 = time.perf_counter()
        try:
            resp = await fn(request, timeout=timeout or self.cfg.call_timeout)
        except grpc.aio.AioRpcError as e:
            self._trace_line(t0, getattr(request, "machine", ""), method, "own",
                             request.SerializeToString(), e.code().name, e.details() or "", "")
            raise
        self._trace_line(t0, getattr(request, "machine", ""), method, "own",
                         request.SerializeToString(), "OK", str(resp).replace("\n", " "), "")
        return resp

    def _trace_line(self, t0: float, machine: str, method: str, kind: str, body: bytes,
                    code: str, answer: str, what: str) -> None:
        if self._trace is None:
            return
        line = {"start": round(t0 - self.t0, 4), "end": round(time.perf_counter() - self.t0, 4),
                "machine": machine, "method": method, "kind": kind, "body": body.hex(),
                "code": code, "answer": answer[:200], "call": what[:300]}
        self._trace.write(json.dumps(line) + "\n")

    # -- setup ---------------------------------------------------------------------------

    async def setup(self) -> None:
        configs = [
            tpb.MachineConfig(frames_per_node=8192, task_migrate_permille=300,
                              name="fuzz-rework"),
            tpb.MachineConfig(frames_per_node=8192, protocol=tpb.PROTOCOL_LEGACY,
                              name="fuzz-legacy"),
            tpb.MachineConfig(nodes=2, frames_per_node=8192, memcgs=["root", "a"], thp=True,
                              swap_pages=2048, mlock_batch_len=4, populate_drain=True,
                              large_folio_mlock=tpb.SWITCH_ON, task_migrate_permille=100,
                              name="fuzz-numa"),
            tpb.MachineConfig(frames_per_node=4096, mlock_batch_len=1, lru_add_batch_len=1,
                              swap_pages=512, name="fuzz-sync"),
        ]
        for cfg in configs:
            resp = await self.call("CreateMachine", pb.CreateMachineRequest(config=cfg))
            ms = MachineState(resp.machine, stable=True, nodes=cfg.nodes or 1,
                              memcgs=list(cfg.memcgs) or ["root"])
            self.world.add(ms)
            files = [("t0", 32, True, tpb.FILE_KIND_TMPFS),
                     ("r0", 32, True, tpb.FILE_KIND_REGULAR),
                     ("t1", 256, False, tpb.FILE_KIND_TMPFS)]
            if cfg.thp:  # file THPs (MADV_COLLAPSE) exist only there; elsewhere the big
                # aligned mappings map a small file (legacy munlock of hundreds of mappings
                # of big files is the cost the rework removed: calls of minutes under load)
                files.append(("h0", 1024, True, tpb.FILE_KIND_TMPFS))
            for name, pages, prefill, kind in files:
                await self.call("CreateFile", pb.CreateFileRequest(
                    machine=ms.mid, name=name, pages=pages, prefill=prefill, kind=kind))
                ms.files.append(name)
            for i in range(3):
                req = pb.CreateProcessRequest(machine=ms.mid, node=i % ms.nodes)
                if i == 2:
                    req.rlimit_memlock_soft = 16 * PAGE
                    req.rlimit_memlock_hard = 64 * PAGE
                    req.cap_ipc_lock = False
                pid = (await self.call("CreateProcess", req)).pid
                proc = Proc(pid)
                ms.procs[pid] = proc
                for length, flags, file in ((16 * PAGE, 0x22, ""), (8 * PAGE, 0x21, ""),
                                            (32 * PAGE, 0x01, "t0"), (32 * PAGE, 0x02, "r0")):
                    addr = (await self.call("Mmap", pb.MmapRequest(
                        machine=ms.mid, pid=pid, length=length, prot=3, flags=flags,
                        file=file))).addr
                    proc.areas.append((addr, addr + length))
                await self.call("Fault", pb.FaultRequest(
                    machine=ms.mid, pid=pid, addr=proc.areas[0][0], length=16 * PAGE,
                    write=True))
                if i != 2:
                    await self.call("Mlock", pb.MlockRequest(
                        machine=ms.mid, pid=pid, addr=proc.areas[2][0], length=8 * PAGE))

    # -- generation (a background thread running Hypothesis) -------------------------------

    def _generate(self, out: queue.Queue[list[Call] | None]) -> None:
        cfg = self.cfg
        strategy = st.lists(any_call(cfg.valid_pct, cfg.raw_pct),
                            min_size=cfg.batch, max_size=cfg.batch)
        produced = 0
        round_ = 0
        needed = cfg.requests
        try:
            while produced < needed and not self._stop.is_set():
                left = (needed - produced + cfg.batch - 1) // cfg.batch

                @settings(max_examples=min(left, 500), database=None, deadline=None,
                          phases=[Phase.generate], suppress_health_check=list(HealthCheck),
                          print_blob=False, backend=FRESH_BACKEND)
                @hypothesis_seed(cfg.seed * 1_000_003 + round_)
                @given(strategy)
                def feed(batch: list[Call]) -> None:
                    nonlocal produced
                    if self._stop.is_set() or produced >= needed:
                        return
                    out.put(batch[: needed - produced])
                    produced += len(batch[: needed - produced])

                feed()
                round_ += 1
        except BaseException as e:
            self.generator_error = f"{type(e).__name__}: {e}"
            raise
        finally:
            out.put(None)

    # -- sending ---------------------------------------------------------------------------

    async def run(self) -> FuzzReport:
        loop = asyncio.get_running_loop()
        batches: queue.Queue[list[Call] | None] = queue.Queue(maxsize=64)
        calls: asyncio.Queue[Call | None] = asyncio.Queue(maxsize=self.cfg.concurrency * 4)
        gen = threading.Thread(target=self._generate, args=(batches,), daemon=True,
                               name="fuzz-generator")
        t0 = time.perf_counter()
        gen.start()

        async def feeder() -> None:
            while True:
                batch = await loop.run_in_executor(None, batches.get)
                if batch is None:
                    break
                for c in batch:
                    await calls.put(c)
            for _ in range(self.cfg.concurrency):
                await calls.put(None)

        next_refresh = REFRESH_EVERY
        next_progress = 5000

        async def worker(index: int) -> None:
            nonlocal next_refresh, next_progress
            while True:
                c = await calls.get()
                if c is None:
                    return
                try:
                    await self.send(c, index % len(self.channels))
                except Exception as e:  # a bug of the fuzzer, not of the server
                    where = traceback.extract_tb(e.__traceback__)[-1]
                    self.report.fail("fuzzer", c.method, f"{type(e).__name__}: {e} at line "
                                                         f"{where.lineno}")
                n = self._sent
                if n >= next_refresh:  # (once: the other workers see the new threshold)
                    next_refresh = n + REFRESH_EVERY
                    await self.refresh_some()
                if self.cfg.progress and n >= next_progress:
                    next_progress = n + 5000
                    rate = n / (time.perf_counter() - t0)
                    print(f"  {n} requests, {rate:.0f}/s, {len(self.report.failures)} failures",
                          file=self.cfg.out, flush=True)

        async def prober() -> None:
            """One probe at a time, on one machine at a time, the whole run long."""
            while not done.is_set():
                try:
                    await self.probe()
                except Exception as e:
                    self.report.fail("fuzzer", "probe", f"{type(e).__name__}: {e}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), self.cfg.probe_pause)

        async def workers() -> None:
            try:
                await asyncio.gather(feeder(),
                                     *(worker(i) for i in range(self.cfg.concurrency)))
            finally:
                done.set()

        done = asyncio.Event()
        try:
            tasks = [workers()]
            if self.cfg.probe_pause >= 0:
                tasks.append(prober())
            await asyncio.gather(*tasks)
        finally:
            self._stop.set()
            with contextlib.suppress(queue.Empty):
                while True:
                    batches.get_nowait()
            gen.join(timeout=30)
        await self.oversized()
        self.report.seconds = time.perf_counter() - t0
        if self.generator_error is not None:
            self.report.fail("fuzzer", "-", f"request generation failed: {self.generator_error}")
        elif self.report.requests < self.cfg.requests:
            self.report.fail("fuzzer", "-", f"only {self.report.requests} of "
                                            f"{self.cfg.requests} requests were sent")
        return self.report

    async def send(self, call: Call, ch: int) -> None:
        r = self.world.resolve(call)
        call = r.call  # (a valid call may have been turned into another one)
        if r.machine is None:
            r.machine = self._named_machine(r)
        ms = r.machine
        if ms is not None and ms.stable:
            if call.method == "DeleteMachine":
                # an adversarial id ("1") or a garbled body naming one of the fuzzer's own
                # machines: those stay to the end (churn machines are deleted under load)
                self.report.kinds["skipped"] += 1
                return
            if call.deadline is not None:
                call = dataclasses.replace(call, deadline=None)  # probes must not race one
        lock = ms.lock.shared() if ms is not None else contextlib.nullcontext()
        async with lock:
            await self._send(r, ch, call)

    def _named_machine(self, r: Resolved) -> MachineState | None:
        """The known machine a request names by a plain string (an adversarial id that happens
        to be a real one), or a malformed body still names once decoded."""
        msg: Message | None = r.request
        if r.body is not None:
            try:
                msg = REQUEST[r.call.method].FromString(r.body)
            except (DecodeError, RuntimeError, ValueError):
                return None
        mid = getattr(msg, "machine", None)
        return self.world.by_id.get(mid) if isinstance(mid, str) else None

    async def _send(self, r: Resolved, ch: int, call: Call) -> None:
        method = call.method
        path = call.path or f"/{SERVICE.full_name}/{method}"
        timeout = call.deadline or self.cfg.call_timeout
        rep = self.report
        rep.sent[method] += 1
        rep.kinds[call.kind] += 1
        if r.body is not None:
            rep.raw[method] += 1
        self._sent += 1
        rep.requests += 1
        t0 = time.perf_counter()
        try:
            if r.body is not None:
                await self._callable(ch, path, None)(r.body, timeout=timeout)
                response = None
            else:
                response = await self._callable(ch, path, method)(r.request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            self.record(r, t0, e.code().name, e.details() or "")
            rep.timed(method, time.perf_counter() - t0, lambda: describe(r))
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and call.deadline is None:
                # which call hung first (the others on its process may have waited for it)
                rep.hang_starts.append((round(t0 - self.t0, 3), describe(r)))
            self._record_error(r, call, e, t0)
            return
        self.record(r, t0, "OK", str(response).replace("\n", " ")[:200] if response else "")
        rep.timed(method, time.perf_counter() - t0, lambda: describe(r))
        rep.codes["OK"] += 1
        rep.by_method[method]["OK"] += 1
        if r.body is None and response is not None:
            await self._after_ok(r, response)

    def record(self, r: Resolved, t0: float, code: str, answer: str) -> None:
        """One line of the trace (calls on the fuzzer's own machines only)."""
        if self._trace is None or r.machine is None or not r.machine.stable:
            return
        body = r.body if r.body is not None else (
            r.request.SerializeToString() if r.request is not None else b"")
        self._trace_line(t0, r.machine.mid, r.call.method, r.call.kind, body, code, answer,
                         describe(r))

    def _record_error(self, r: Resolved, call: Call, e: grpc.aio.AioRpcError,
                      t0: float = 0.0) -> None:
        rep = self.report
        method = call.method
        code = e.code()
        rep.codes[code.name] += 1
        rep.by_method[method][code.name] += 1
        info = error_info(e)
        details = e.details() or ""
        if info is not None:
            rep.reasons[info.reason] += 1
        elif call.path is None and code not in (grpc.StatusCode.CANCELLED,
                                                grpc.StatusCode.DEADLINE_EXCEEDED):
            rep.no_error_info[f"{method}:{code.name}"] += 1
        sample = f"{method} {code.name} {info.reason if info is not None else '-'}"
        if sample not in rep.samples:
            rep.samples[sample] = f"{describe(r)[:300]} -> {details[:300]}"
        if code in FAULT_CODES:
            rep.fail(code.name, method, f"{describe(r)} -> {details}")
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and call.deadline is None:
            ms = r.machine
            deleted = ms is not None and ms.gone and ms.gone_at >= t0 - 1.0
            note = " (its machine was deleted while it ran)" if deleted else ""
            if ms is not None:
                ms.hung = True
            rep.fail("hang", method, f"{describe(r)} ran past {self.cfg.call_timeout}s{note}")
        elif code == grpc.StatusCode.UNAVAILABLE:
            rep.fail("unavailable", method, f"{describe(r)} -> {details}")
        sent = describe(r) + "".join(
            v for v in (getattr(r.request, f.name, "") for f in
                        (r.request.DESCRIPTOR.fields if r.request is not None else ()))
            if isinstance(v, str))
        leaked = [m for m in LEAK_MARKERS if m in details and m not in sent]
        if leaked:
            rep.fail("leak", method, f"{describe(r)} -> {code.name} {details!r}")
        if (call.kind == "valid" and info is not None and info.reason == "ESRCH"
                and r.machine is not None and r.proc is not None
                and "machine" not in details.lower()):
            r.proc.alive = False  # it exited (a raw call may have killed it)
        if info is not None and info.reason == "ESRCH" and r.machine is not None \
                and "no machine" in details:
            self.world.forget(r.machine.mid)

    async def _after_ok(self, r: Resolved, response: Message) -> None:
        method = r.call.method
        before = len(self.world.churn)
        self.world.learn(r, response)
        if method == "CreateMachine" and len(self.world.churn) > before:
            # CreateMachine answered OK: keep a few such machines as targets, delete the
            # oldest while calls on it may still be in flight
            while len(self.world.churn) > MAX_CHURN_MACHINES:
                old = self.world.churn[0]
                self.world.forget(old.mid)
                await self._own_call("DeleteMachine", pb.DeleteMachineRequest(machine=old.mid))

    async def _own_call(self, method: str, request: Message) -> Message | None:
        """A call of the fuzzer counted like the others (maintenance)."""
        rep = self.report
        rep.sent[method] += 1
        rep.kinds["maintenance"] += 1
        rep.requests += 1
        try:
            resp: Message = await self.call(method, request)
        except grpc.aio.AioRpcError as e:
            self._record_error(Resolved(Call(method, (), "maintenance"), request, None, None,
                                        None), Call(method, (), "maintenance"), e)
            return None
        rep.codes["OK"] += 1
        rep.by_method[method]["OK"] += 1
        return resp

    async def refresh_some(self) -> None:
        """Re-read one process's mappings (mprotect, MAP_FIXED, raw calls... move them)."""
        pool = [m for m in self.world.stable if not m.gone and not m.hung and m.live()]
        if not pool:
            return
        ms = self.rng.choice(pool)
        proc = self.rng.choice(ms.live())
        smaps = await self._own_call("Smaps", pb.SmapsRequest(machine=ms.mid, pid=proc.pid))
        if isinstance(smaps, pb.SmapsResponse):
            self.world.refresh(ms, proc, smaps)

    async def oversized(self) -> None:
        """One body just over the server's message limit: refused, nothing else."""
        fn = self._callable(0, f"/{SERVICE.full_name}/Mlock", None)
        body = tag(1, 2) + varint(OVERSIZED_BODY) + b"1" * OVERSIZED_BODY
        r = Resolved(Call("Mlock", (), "raw"), None, body[:64], None, None)
        self.report.sent["Mlock"] += 1
        self.report.raw["Mlock"] += 1
        self.report.kinds["raw"] += 1
        self.report.requests += 1
        try:
            await fn(body, timeout=self.cfg.call_timeout)
            self.report.codes["OK"] += 1
            self.report.by_method["Mlock"]["OK"] += 1
        except grpc.aio.AioRpcError as e:
            self._record_error(r, Call("Mlock", (), "raw"), e)

    # -- probes: nothing half-applied -------------------------------------------------------

    async def probe(self) -> None:
        pool = [m for m in self.world.stable if not m.gone and not m.hung and m.live()]
        if not pool:
            return
        ms = self.rng.choice(pool)
        call = self._probe_call(ms)
        ms.probing = True  # new calls go to the other machines meanwhile
        try:
            async with ms.lock.exclusive():
                if not ms.hung:  # a call that hung while we waited may still be running
                    await self._probe(ms, call)
        finally:
            ms.probing = False

    async def _probe(self, ms: MachineState, call: Call) -> None:
        r = self.world.resolve(call)
        if r.machine is not ms or r.request is None:
            return
        await self.call("Drain", pb.DrainRequest(machine=ms.mid, all_cpus=True))
        target = r.proc.pid if r.proc is not None else None
        before = await self.snapshot(ms, target)
        rep = self.report
        rep.probes += 1
        rep.sent[call.method] += 1
        rep.kinds["probe"] += 1
        rep.requests += 1
        self._sent += 1
        t0 = time.perf_counter()
        try:
            response = await self.call(call.method, r.request)
        except grpc.aio.AioRpcError as e:
            self.record(r, t0, e.code().name, e.details() or "")
            self._record_error(r, call, e)
            info = error_info(e)
            reason = info.reason if info is not None else e.code().name
            validation = info is not None and "field" in info.metadata
            if not validation and partial_ok(call.method, reason, e.details() or ""):
                return  # Linux may have done part of it
            if e.code() in FAULT_CODES:
                return  # already a failure; the state may be anything
            after = await self.snapshot(ms, target)
            rep.probes_compared += 1
            rep.probe_reasons[reason] += 1
            diff = diff_snapshots(before, after)
            if diff:
                rep.fail("half-applied", call.method,
                         f"{describe(r)} -> {e.code().name} {reason}: {e.details()!r}; "
                         f"changed: {diff}")
            return
        self.record(r, t0, "OK", str(response).replace("\n", " ")[:200])
        rep.codes["OK"] += 1
        rep.by_method[call.method]["OK"] += 1
        self.world.learn(r, response)

    def _probe_call(self, ms: MachineState) -> Call:
        """A mutating adversarial call on ``ms`` (drawn here: Hypothesis runs elsewhere)."""
        rng = self.rng
        method = rng.choice(sorted(MUTATING))
        desc = METHODS[method].input_type
        slot = rng.randrange(64)
        fields: list[tuple[str, object]] = [("machine", MachineRef("=" + ms.mid, 0))]
        for fd in desc.fields:
            if fd.name == "machine":
                continue
            if fd.name == "pid":
                fields.append(("pid", PidRef("live", slot)))
                continue
            fields.append((fd.name, self._probe_value(fd, method, slot)))
        return Call(method, tuple(fields), "adversarial")

    def _probe_value(self, fd: pbd.FieldDescriptor, method: str, slot: int) -> object:
        rng = self.rng
        name = fd.name
        if name == "addr":
            if rng.random() < 0.5:
                return AddrRef(slot, rng.choice(("start", "inside", "end")), rng.randrange(64),
                               rng.choice((0, 0, 1, 2048)))
            return rng.choice(U64_EDGES)
        if name == "length":
            if rng.random() < 0.4:
                return LenRef(slot, rng.choice((0, PAGE, -PAGE, 1)))
            return rng.choice(U64_EDGES)
        if name in ("prot", "flags"):
            edges = MAP_COMBOS if method == "Mmap" and name == "flags" else (0, 1, 2, 3, 7)
            return rng.choice(edges + U32_EDGES)
        if name == "advice":
            return rng.choice((0, 4, 8, 20, 21, 22, 23, 24, 1, 25, -1, 99))
        if name in ("file", "name"):
            return rng.choice((FileRef(slot), "", "nofile", "x" * 300, "a|b"))
        if name in ("memcg",):
            return rng.choice((MemcgRef(slot), "", "nocg", "|"))
        if name == "node":
            return rng.choice((NodeRef(slot), -1, 64, 1024, I32_MAX, I32_MIN))
        if name == "cap":
            return rng.choice((0, 1, 2, -1, 99))
        if name == "kind":
            return rng.choice((0, 1, 2, 3, -1))
        if name in ("soft", "hard", "rlimit_memlock_soft", "rlimit_memlock_hard", "offset",
                    "pages"):
            return rng.choice(U64_EDGES)
        if name == "nr_pages":
            return rng.choice(I64_EDGES)
        if fd.type == pbd.FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if fd.type == pbd.FieldDescriptor.TYPE_STRING:
            return rng.choice(STR_EDGES)
        return 0

    async def snapshot(self, ms: MachineState, target: int | None) -> dict[str, object]:
        """What a client (and, when reachable, the store) can see of one machine: vmstat,
        meminfo, each process's status and smaps, page flags (every mapping of ``target``,
        the first ones of the others), the files' page caches.  Read in parallel."""
        snap: dict[str, object] = {}
        mid = ms.mid

        async def get(label: str, method: str, request: Message) -> Message | None:
            try:
                resp: Message = await self.call(method, request)
            except grpc.aio.AioRpcError as e:
                snap[label] = f"error {e.code().name} {e.details()}"
                return None
            snap[label] = resp.SerializeToString(deterministic=True)
            return resp

        async def process(pid: int) -> None:
            await get(f"status/{pid}", "ProcStatus", pb.ProcStatusRequest(machine=mid, pid=pid))
            smaps = await get(f"smaps/{pid}", "Smaps", pb.SmapsRequest(machine=mid, pid=pid))
            if not isinstance(smaps, pb.SmapsResponse):
                return
            vmas = smaps.vmas[:32] if pid == target else smaps.vmas[:2]
            await asyncio.gather(*(
                get(f"pages/{pid}/{e.start:x}", "PageFlags",
                    pb.PageFlagsRequest(machine=mid, pid=pid, addr=e.start,
                                        length=min(e.end - e.start, 1024 * PAGE)))
                for e in vmas))

        pids = {p.pid for p in ms.live()} | set(sorted(ms.procs)[:4])
        if target is not None:
            pids.add(target)
        jobs = [get("vmstat", "Vmstat", pb.VmstatRequest(machine=mid)),
                get("meminfo", "Meminfo", pb.MeminfoRequest(machine=mid)),
                *(process(pid) for pid in sorted(pids)),
                *(get(f"file/{name}", "FilePages", pb.FilePagesRequest(machine=mid, file=name))
                  for name in ms.files[:8])]
        await asyncio.gather(*jobs)
        if self._redis is not None:
            snap.update(await store_digest(self._redis, mid))
        return snap

    # -- the end ---------------------------------------------------------------------------

    async def final_checks(self) -> None:
        rep = self.report
        rep.server_alive = await healthy(self.target, 20.0)
        if not rep.server_alive:
            rep.fail("crash", "Health", f"the server at {self.target} does not answer Health")
            return
        try:
            listed = await self.call("ListMachines", pb.ListMachinesRequest())
        except grpc.aio.AioRpcError as e:
            rep.fail("check", "ListMachines", f"{e.code().name}: {e.details()}")
            return
        for mid in listed.machines:
            try:
                resp = await self.call("Check", pb.CheckRequest(machine=mid, drain_all=True),
                                       timeout=300.0)
            except grpc.aio.AioRpcError as e:
                info = error_info(e)
                if info is not None and info.reason == "ESRCH":
                    continue  # deleted meanwhile
                rep.fail("check", "Check", f"machine {mid}: {e.code().name} {e.details()}")
                continue
            rep.machines_checked += 1
            rep.pages_checked += resp.report.pages_checked
            if resp.report.violations:
                shown = "; ".join(resp.report.violations[:5])
                rep.fail("check", "Check",
                         f"machine {mid}: {len(resp.report.violations)} violations: {shown}")
        for ms in self.world.stable:
            if ms.gone or ms.mid not in listed.machines:
                rep.fail("check", "ListMachines", f"stable machine {ms.mid} disappeared")
        if self._redis is not None:
            # (listed again: machines deleted meanwhile by calls still finishing are gone)
            now = await self.call("ListMachines", pb.ListMachinesRequest())
            rep.leaked_keys = await leaked_keys(self._redis, set(now.machines))
            rep.machines_listed = list(now.machines)


# ----------------------------------------------------------------------------------------------
# store-level comparison (when the fuzzer knows the store)
# ----------------------------------------------------------------------------------------------

#: Keys and hash fields that change without any state change: id counters (a refused call may
#: draw an id), locks and their statistics, the CPUs that touched the machine.
NOISE_SUFFIXES = (":ids", ":cpus", ":lockstat", ":lock_stat", ":mmap_lock", ":i_mmap_rwsem",
                  ":lru_lock", ":lock", ":tok", ":lease")
NOISE_PARTS = (":once:", ":ls:", ":lk:", "lockstat", "lock_stat", ":mmap_lock", "_rwsem",
               ":lru_lock", ":w:", "hotplug", ":lease")


def _noise(key: str) -> bool:
    return key.endswith(NOISE_SUFFIXES) or any(p in key for p in NOISE_PARTS)


async def store_digest(client: Any, mid: str) -> dict[str, object]:
    """A digest of every store key of one machine (two pipelined round trips)."""
    keys = [raw async for raw in client.scan_iter(match=f"{{m{mid}[:}}]*", count=1000)
            if not _noise(raw.decode(errors="replace"))]
    pipe = client.pipeline(transaction=False)
    for raw in keys:
        pipe.type(raw)
    kinds = [k.decode() for k in await pipe.execute()]
    readers = {"hash": "hgetall", "set": "smembers", "list": "lrange", "string": "get",
               "zset": "zrange"}
    pipe = client.pipeline(transaction=False)
    for raw, kind in zip(keys, kinds, strict=True):
        if kind == "list":
            pipe.lrange(raw, 0, -1)
        elif kind == "zset":
            pipe.zrange(raw, 0, -1, withscores=True)
        elif kind in readers:
            getattr(pipe, readers[kind])(raw)
        else:
            pipe.type(raw)
    out: dict[str, object] = {}
    for raw, value in zip(keys, await pipe.execute(), strict=True):
        if isinstance(value, dict):
            value = sorted(value.items())
        elif isinstance(value, set):
            value = sorted(value)
        out[f"store {raw.decode(errors='replace')}"] = hashlib.sha1(
            repr(value).encode()).hexdigest()
    return out


async def leaked_keys(client: Any, machines: set[str]) -> list[str]:
    """Keys of machines that no longer exist (a delete raced with calls that wrote after)."""
    out: list[str] = []
    async for raw in client.scan_iter(match="{m*", count=1000):
        key = raw.decode(errors="replace")
        if key.startswith("{mmsvc}"):
            continue
        mid = key[2:].split("}", 1)[0].split(":", 1)[0]
        if mid not in machines:
            out.append(key)
    return sorted(out)


def diff_snapshots(before: dict[str, object], after: dict[str, object]) -> str:
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    parts: list[str] = []
    for k in changed[:8]:
        b, a = before.get(k), after.get(k)
        if k == "vmstat" and isinstance(b, bytes) and isinstance(a, bytes):
            vb = pb.VmstatResponse.FromString(b).counters
            va = pb.VmstatResponse.FromString(a).counters
            deltas = {n: va.get(n, 0) - vb.get(n, 0) for n in set(vb) | set(va)
                      if va.get(n, 0) != vb.get(n, 0)}
            parts.append(f"vmstat {deltas}")
        else:
            parts.append(k)
    return ", ".join(parts) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")


# ----------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------


async def run_fuzz(cfg: FuzzConfig) -> FuzzReport:
    """Start what is needed, fuzz, check, stop; returns the report (see FuzzReport.ok)."""
    out = cfg.out
    redis_server: Any = None
    server: ServerProcess | None = None
    tmp = tempfile.TemporaryDirectory(prefix="mmsvc-fuzz-")
    try:
        store_url = cfg.redis_url
        if cfg.target is None:
            if store_url is None:
                from mmsvc.store.embedded import EmbeddedRedis

                redis_server = EmbeddedRedis().start()
                store_url = redis_server.url
            server = ServerProcess(store_url, Path(tmp.name) / "server.log", cfg.workers,
                                   cfg.server_log_level)
            server.start()
            target = server.target
            await wait_healthy(target, 60.0, server)
        else:
            target = cfg.target
        print(f"fuzzing {target}: {cfg.requests} requests, seed {cfg.seed}, "
              f"{cfg.concurrency} in flight", file=out, flush=True)
        fuzzer = Fuzzer(cfg, target, store_url)
        await fuzzer.open()
        try:
            await fuzzer.setup()
            report = await fuzzer.run()
            if server is not None and not server.alive():
                status = server.proc.returncode if server.proc else "?"
                report.fail("crash", "-", f"the server process exited (status {status})")
            await fuzzer.final_checks()
        finally:
            await fuzzer.close()
        if server is not None:
            report.server_errors = server.errors()
            if not server.alive():
                report.server_alive = False
        return report
    finally:
        if server is not None:
            server.stop()
            if cfg.server_log:
                shutil.copyfile(server.log_path, cfg.server_log)
        if redis_server is not None:
            redis_server.stop()
        tmp.cleanup()


def print_report(report: FuzzReport, out: TextIO) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out, width=160, force_terminal=False, color_system=None,
                      markup=False, highlight=False, emoji=False)
    codes = [c for c, _ in report.codes.most_common()]
    table = Table(title="requests per method and status", box=box.SIMPLE, title_justify="left")
    table.add_column("method")
    table.add_column("sent", justify="right")
    table.add_column("raw", justify="right")
    for c in codes:
        table.add_column(c, justify="right")
    for method in sorted(report.sent):
        row = [method, str(report.sent[method]), str(report.raw[method])]
        row += [str(report.by_method[method][c] or "") for c in codes]
        table.add_row(*row)
    table.add_row("total", str(sum(report.sent.values())), str(sum(report.raw.values())),
                  *[str(report.codes[c]) for c in codes])
    console.print(table)
    reasons = Table(title="errno reasons (ErrorInfo)", box=box.SIMPLE, title_justify="left")
    reasons.add_column("reason")
    reasons.add_column("count", justify="right")
    for r, n in report.reasons.most_common():
        reasons.add_row(r, str(n))
    console.print(reasons)
    rate = report.requests / report.seconds if report.seconds else 0.0
    console.print(
        f"requests: {report.requests}  time: {report.seconds:.1f} s  rate: {rate:.0f} req/s  "
        f"kinds: {dict(report.kinds)}")
    console.print(
        f"probes: {report.probes} ({report.probes_compared} refused calls compared: "
        f"{dict(report.probe_reasons)})  machines checked: {report.machines_checked} "
        f"({report.pages_checked} pages)  server alive: {report.server_alive}")
    slow = ", ".join(f"{m} {t:.1f}s" for m, t in sorted(
        report.seconds_by_method.items(), key=lambda kv: -kv[1])[:6])
    console.print(f"time in calls by method: {slow}")
    for t, what in sorted(report.slowest, reverse=True)[:5]:
        console.print(f"  slow {t:.2f}s {what[:300]}")
    for start, what in sorted(report.hang_starts)[:3]:
        console.print(f"  first hangs: started at {start:.1f}s: {what[:300]}")
    if report.no_error_info:
        console.print(f"statuses without ErrorInfo: {dict(report.no_error_info)}")
    if report.leaked_keys:
        console.print(f"store keys of deleted machines: {len(report.leaked_keys)}: "
                      f"{', '.join(report.leaked_keys[:8])}")
    if report.server_errors:
        faults = Counter(line for line in report.server_errors
                         if line.startswith(("rpc_internal_error", "worker_died")))
        console.print(f"server error log lines: {len(report.server_errors)}, "
                      f"server faults: {sum(faults.values())}")
        for line, n in faults.most_common(12):
            console.print(f"  {n} x {line[:700]}")
    if report.failures:
        by_cat = Counter(f.category for f in report.failures)
        console.print(f"FAILURES: {dict(by_cat)}")
        seen: set[tuple[str, str]] = set()
        for f in report.failures:
            key = (f.category, f.method)
            if key in seen:
                continue
            seen.add(key)
            console.print(f"  [{f.category}] {f.method}: {f.detail[:800]}")
    console.print("RESULT: " + ("OK" if report.ok else "FAILED"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--target", default=None, metavar="HOST:PORT",
                   help="a running server (default: start one)")
    p.add_argument("--redis", default=None, metavar="URL",
                   help="the store of the started server (default: a private redis-server); "
                        "with --target, the server's store (enables store-level probes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    p.add_argument("--channels", type=int, default=2, help="gRPC channels (connections)")
    p.add_argument("--workers", type=int, default=1, help="worker processes of a started server")
    p.add_argument("--valid-pct", type=int, default=35)
    p.add_argument("--raw-pct", type=int, default=15)
    p.add_argument("--probe-pause", type=float, default=0.05, metavar="SECONDS",
                   help="pause between two probes for half-applied calls; < 0: no probes")
    p.add_argument("--timeout", type=float, default=CALL_TIMEOUT,
                   help="deadline of each call; running past it is a hang")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="write every call on the fuzzer's own machines (JSON lines: start, "
                        "end, machine, method, body in hex, status) for replays")
    p.add_argument("--server-log", default=None, metavar="PATH",
                   help="keep the log of the started server")
    p.add_argument("--server-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"),
                   help="log level of the started server (info: one access log line per call)")
    p.add_argument("--replay", default=None, metavar="TRACE",
                   help="instead of fuzzing: replay the calls of --machine from a --trace file, "
                        "one at a time, checking as it goes")
    p.add_argument("--machine", default="1", help="the traced machine to replay")
    p.add_argument("--check-every", type=int, default=1, metavar="N",
                   help="replay: run the checker after every N successful mutating calls")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


async def replay(path: str, machine: str, target: str | None, redis_url: str | None,
                 check_every: int, out: TextIO) -> int:
    """Replay the calls of one machine of a ``--trace`` file, one at a time in the order they
    ended, on a fresh machine; run the checker every ``check_every`` mutating calls and stop
    at the first violation.  Returns 1 when a violation or a server fault shows up."""
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    created = [x for x in lines if x["method"] == "CreateMachine"
               and f'machine: "{machine}"' in x["answer"]]
    # in the order the calls ended (the trace's order): a call's effect precedes its answer
    calls = created[:1] + [x for x in lines if x["machine"] == machine]
    redis_server: Any = None
    server: ServerProcess | None = None
    tmp = tempfile.TemporaryDirectory(prefix="mmsvc-replay-")
    try:
        if target is None:
            if redis_url is None:
                from mmsvc.store.embedded import EmbeddedRedis

                redis_server = EmbeddedRedis().start()
                redis_url = redis_server.url
            server = ServerProcess(redis_url, Path(tmp.name) / "server.log")
            server.start()
            target = server.target
            await wait_healthy(target, 60.0, server)
        async with grpc.aio.insecure_channel(target) as ch:
            mid = ""
            mutations = 0
            for i, x in enumerate(calls):
                method = x["method"]
                body = bytes.fromhex(x["body"])
                try:
                    msg = REQUEST[method].FromString(body)
                    if hasattr(msg, "machine") and mid:
                        setattr(msg, "machine", mid)  # noqa: B010
                    body = msg.SerializeToString()
                except DecodeError:
                    pass  # a malformed body: sent as it was
                fn: Any = ch.unary_unary(f"/{SERVICE.full_name}/{method}")
                try:
                    raw = await fn(body, timeout=CALL_TIMEOUT)
                    code, answer = "OK", str(RESPONSE[method].FromString(raw)).replace("\n", " ")
                except grpc.aio.AioRpcError as e:
                    code, answer = e.code().name, e.details() or ""
                if method == "CreateMachine" and code == "OK":
                    mid = pb.CreateMachineResponse.FromString(raw).machine
                same = "" if code == x["code"] else f"   (traced: {x['code']} {x['answer'][:80]})"
                print(f"{i:5} {x['call'][:110]} -> {code} {answer[:60]}{same}", file=out)
                if code in ("INTERNAL", "UNKNOWN"):
                    return 1
                if method in MUTATING and code == "OK":
                    mutations += 1
                    if mutations % check_every == 0:
                        resp = await ch.unary_unary(
                            f"/{SERVICE.full_name}/Check",
                            request_serializer=pb.CheckRequest.SerializeToString,
                            response_deserializer=pb.CheckResponse.FromString,
                        )(pb.CheckRequest(machine=mid, drain_all=True), timeout=300)
                        if resp.report.violations:
                            print("VIOLATIONS after call", i, ":", *resp.report.violations[:10],
                                  sep="\n  ", file=out)
                            return 1
            print("replayed", len(calls), "calls: no violation", file=out)
            return 0
    finally:
        if server is not None:
            server.stop()
        if redis_server is not None:
            redis_server.stop()
        tmp.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmsvc.logging import configure_logging

    configure_logging("console", "error", stream=sys.stderr)
    if args.replay:
        return asyncio.run(replay(args.replay, args.machine, args.target, args.redis,
                                  args.check_every, sys.stdout))
    cfg = FuzzConfig(
        requests=args.requests, target=args.target, redis_url=args.redis, seed=args.seed,
        concurrency=args.concurrency, channels=args.channels, workers=args.workers,
        valid_pct=args.valid_pct, raw_pct=args.raw_pct, probe_pause=args.probe_pause,
        call_timeout=args.timeout, progress=not args.quiet, trace=args.trace,
        server_log=args.server_log, server_log_level=args.server_log_level,
    )
    report = asyncio.run(run_fuzz(cfg))
    print_report(report, sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
