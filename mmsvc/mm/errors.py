"""Errno-style failures of emulated syscalls.

Every failure the API can report is a :class:`KernelError` carrying the errno name Linux would
return.  The server maps these to gRPC status codes; nothing else may escape to a client.
"""

from __future__ import annotations

ERRNO_NAMES = frozenset(
    {"EINVAL", "ENOMEM", "EPERM", "EAGAIN", "ESRCH", "EBUSY", "EFAULT", "EACCES", "ENOENT",
     "EEXIST", "EOVERFLOW", "ENODEV", "ENOSPC", "E2BIG", "EBADF", "ENOTSUP"}
)


class KernelError(Exception):
    """An emulated syscall failed with ``errno`` (e.g. ``"ENOMEM"``); state is unchanged."""

    def __init__(self, errno: str, message: str) -> None:
        if errno not in ERRNO_NAMES:
            raise ValueError(f"unknown errno name {errno!r}")
        super().__init__(f"{errno}: {message}")
        self.errno = errno
        self.message = message


def einval(message: str) -> KernelError:
    return KernelError("EINVAL", message)


def esrch(message: str) -> KernelError:
    return KernelError("ESRCH", message)


def enomem(message: str) -> KernelError:
    return KernelError("ENOMEM", message)


def eperm(message: str) -> KernelError:
    return KernelError("EPERM", message)
