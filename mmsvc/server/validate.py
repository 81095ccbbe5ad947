"""Request validation, done before the kernel is called.

The checks are the ones Linux makes at syscall entry (page alignment where the syscall requires
it, known flag bits, mlockall's flag rules, soft <= hard) plus the bounds this service needs to
stay responsive (length <= 2**47, ranges that do not wrap, bounded view sizes, non-empty ids).
A failure becomes INVALID_ARGUMENT with ErrorInfo reason ``EINVAL`` and a BadRequest naming the
field; the kernel is not called.
"""

from __future__ import annotations

from collections.abc import Container

from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_FIXED,
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
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
)
from mmsvc.proto_gen.mmsvc.v1 import types_pb2 as tpb
from mmsvc.server.convert import TUNABLES_FROM_PB

U64 = 1 << 64
#: Largest length accepted for any range (x86-64 user address space: 128 TiB).
MAX_LENGTH = 1 << 47
#: Largest PageFlags range, in pages (keeps a response well under the message size limit).
MAX_VIEW_PAGES = 1 << 15
#: Largest file, in pages (1 TiB).
MAX_FILE_PAGES = 1 << 28
MAX_ID_LEN = 256
MAX_NODES = 1024
MAX_BATCH_LEN = 4096

PROT_MASK = PROT_READ | PROT_WRITE | PROT_EXEC
MAP_TYPE = MAP_SHARED | MAP_PRIVATE  # 0x03 is MAP_SHARED_VALIDATE
MAP_MASK = MAP_TYPE | MAP_FIXED | MAP_ANONYMOUS | MAP_LOCKED | MAP_NORESERVE | MAP_POPULATE
MLOCK_MASK = MLOCK_ONFAULT
MCL_MASK = MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT


class ValidationError(Exception):
    """A request field is invalid; maps to INVALID_ARGUMENT / EINVAL."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ValidationError(field, message)


def machine_id(value: str, field: str = "machine") -> None:
    require(bool(value), field, "must not be empty")
    require(len(value) <= MAX_ID_LEN, field, f"longer than {MAX_ID_LEN} characters")


def name(value: str, field: str) -> None:
    machine_id(value, field)


def pid(value: int, field: str = "pid") -> None:
    require(value > 0, field, "must be a positive process id")


def page_aligned(value: int, field: str) -> None:
    require(value % PAGE_SIZE == 0, field, f"must be a multiple of {PAGE_SIZE}")


def byte_range(
    addr: int,
    length: int,
    *,
    align_addr: bool,
    allow_zero: bool,
    max_length: int = MAX_LENGTH,
) -> None:
    """``[addr, addr+length)``: aligned start if required, bounded, not wrapping."""
    if align_addr:
        page_aligned(addr, "addr")
    require(allow_zero or length > 0, "length", "must be > 0")
    require(length <= max_length, "length", f"must be <= {max_length}")
    # the kernel rounds the end up to a page: that must not wrap either
    end = addr + length
    end_rounded = (end + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    require(end_rounded < U64, "length", "addr + length wraps around")


def bits(value: int, mask: int, field: str) -> None:
    require(value & ~mask == 0, field, f"unknown bits 0x{value & ~mask:x}")


def enum_value(value: int, known: Container[int], field: str) -> None:
    require(value != 0, field, "must be set (UNSPECIFIED)")
    require(value in known, field, f"unknown value {value}")


def machine_tunables(config: tpb.MachineConfig) -> None:
    """Spec §10.1 settings of a MachineConfig: 0 (the default) or a value of its enum."""
    for name, values in TUNABLES_FROM_PB.items():
        number = getattr(config, name)
        if number:
            enum_value(number, values, f"config.{name}")


def prot(value: int, field: str = "prot") -> None:
    bits(value, PROT_MASK, field)


def mmap_flags(flags: int, field: str = "flags") -> None:
    bits(flags, MAP_MASK, field)
    require(flags & MAP_TYPE != 0, field, "needs MAP_SHARED or MAP_PRIVATE")


def mlockall_flags(flags: int, field: str = "flags") -> None:
    # mm/mlock.c: if (!flags || (flags & ~(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)) ||
    #                 flags == MCL_ONFAULT) return -EINVAL;
    require(flags != 0, field, "must not be 0")
    bits(flags, MCL_MASK, field)
    require(flags != MCL_ONFAULT, field, "MCL_ONFAULT needs MCL_CURRENT or MCL_FUTURE")


def bounded(value: int, lo: int, hi: int, field: str) -> None:
    require(lo <= value <= hi, field, f"must be in [{lo}, {hi}]")


def power_of_two(value: int, field: str) -> None:
    require(value > 0 and value & (value - 1) == 0, field, "must be a power of two")
