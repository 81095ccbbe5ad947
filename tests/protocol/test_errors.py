"""Error paths of mlock(2), munlock(2), mmap(2), munmap(2), madvise(2), mlockall(2): the errno
Linux returns, and nothing changed (compared field by field before and after)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_LOCKED,
    MAP_PRIVATE,
    MAP_SHARED,
    MCL_CURRENT,
    MCL_ONFAULT,
    Advice,
    MmapArgs,
)
from tests.protocol.world import P, World


async def snapshot(w: World, pid: int) -> tuple[Any, ...]:
    status = await w.kernel.proc_status(w.mid, pid)
    smaps = await w.kernel.smaps(w.mid, pid)
    pages = await w.pages(pid, "m")
    return (await w.kernel.vmstat(w.mid), status, smaps, pages)


async def setup(w: World, **proc: Any) -> int:
    p = await w.proc(**proc)
    await w.mmap(p, "m", 8)
    await w.touch(p, "m", 0, 4)
    return p


CASES: list[tuple[str, str, dict[str, Any], Callable[[World, int], Awaitable[Any]]]] = [
    ("mlock2 unknown flag", "EINVAL", {},
     lambda w, p: w.kernel.mlock(w.mid, p, *w.rng(p, "m"), 0x2)),
    ("mlock of an unmapped range", "ENOMEM", {},
     lambda w, p: w.kernel.mlock(w.mid, p, 0x10000, 4 * P)),
    ("mlock over RLIMIT_MEMLOCK without CAP_IPC_LOCK", "ENOMEM",
     {"cap_ipc_lock": False, "rlimit_memlock_soft": 4 * P, "rlimit_memlock_hard": 4 * P},
     lambda w, p: w.kernel.mlock(w.mid, p, *w.rng(p, "m"))),
    ("mlock with RLIMIT_MEMLOCK 0 and no CAP_IPC_LOCK", "EPERM",
     {"cap_ipc_lock": False, "rlimit_memlock_soft": 0, "rlimit_memlock_hard": 0},
     lambda w, p: w.kernel.mlock(w.mid, p, *w.rng(p, "m"))),
    ("mlock of a wrapping range", "EINVAL", {},
     lambda w, p: w.kernel.mlock(w.mid, p, (1 << 64) - P, 2 * P)),
    ("munlock of an unmapped range", "ENOMEM", {},
     lambda w, p: w.kernel.munlock(w.mid, p, 0x10000, P)),
    ("mlockall(0)", "EINVAL", {}, lambda w, p: w.kernel.mlockall(w.mid, p, 0)),
    ("mlockall(MCL_ONFAULT) alone", "EINVAL", {},
     lambda w, p: w.kernel.mlockall(w.mid, p, MCL_ONFAULT)),
    ("mlockall(MCL_CURRENT) over the limit", "ENOMEM",
     {"cap_ipc_lock": False, "rlimit_memlock_soft": 4 * P, "rlimit_memlock_hard": 4 * P},
     lambda w, p: w.kernel.mlockall(w.mid, p, MCL_CURRENT)),
    ("mmap of length 0", "EINVAL", {},
     lambda w, p: w.kernel.mmap(w.mid, p, MmapArgs(0))),
    ("mmap without SHARED or PRIVATE", "EINVAL", {},
     lambda w, p: w.kernel.mmap(w.mid, p, MmapArgs(P, 3, MAP_ANONYMOUS))),
    ("mmap with SHARED and PRIVATE", "EINVAL", {},
     lambda w, p: w.kernel.mmap(w.mid, p, MmapArgs(P, 3, MAP_SHARED | MAP_PRIVATE
                                                   | MAP_ANONYMOUS))),
    ("mmap with an unaligned offset", "EINVAL", {},
     lambda w, p: w.kernel.mmap(w.mid, p, MmapArgs(P, 3, MAP_PRIVATE | MAP_ANONYMOUS,
                                                   offset=5))),
    ("mmap with unknown prot bits", "EINVAL", {},
     lambda w, p: w.kernel.mmap(w.mid, p, MmapArgs(P, 0x100, MAP_PRIVATE | MAP_ANONYMOUS))),
    ("mmap of a missing file", "EBADF", {},
     lambda w, p: w.kernel.mmap(w.mid, p, MmapArgs(P, 3, MAP_SHARED, file="nope"))),
    ("MAP_LOCKED over RLIMIT_MEMLOCK", "EAGAIN",
     {"cap_ipc_lock": False, "rlimit_memlock_soft": P, "rlimit_memlock_hard": P},
     lambda w, p: w.kernel.mmap(w.mid, p, MmapArgs(2 * P, 3, MAP_PRIVATE | MAP_ANONYMOUS
                                                   | MAP_LOCKED))),
    ("munmap of an unaligned address", "EINVAL", {},
     lambda w, p: w.kernel.munmap(w.mid, p, w.rng(p, "m")[0] + 1, P)),
    ("munmap of length 0", "EINVAL", {},
     lambda w, p: w.kernel.munmap(w.mid, p, w.rng(p, "m")[0], 0)),
    ("mprotect of a hole", "ENOMEM", {},
     lambda w, p: w.kernel.mprotect(w.mid, p, 0x10000, P, 1)),
    ("madvise DONTNEED on a locked vma", "EINVAL", {},
     lambda w, p: _locked_then(w, p, Advice.MADV_DONTNEED)),
    ("madvise PAGEOUT on a locked vma", "EINVAL", {},
     lambda w, p: _locked_then(w, p, Advice.MADV_PAGEOUT)),
    ("madvise of an unaligned address", "EINVAL", {},
     lambda w, p: w.kernel.madvise(w.mid, p, w.rng(p, "m")[0] + 8, P, Advice.MADV_COLD)),
    ("fault outside any mapping", "EFAULT", {},
     lambda w, p: w.kernel.fault(w.mid, p, 0x10000, P, True)),
    ("mlock of an unknown process", "ESRCH", {},
     lambda w, p: w.kernel.mlock(w.mid, 999, 0x10000, P)),
    ("setrlimit soft above hard", "EINVAL", {},
     lambda w, p: w.kernel.setrlimit(w.mid, p, 2 * P, P)),
    ("unknown capability", "EINVAL", {},
     lambda w, p: w.kernel.drop_capability(w.mid, p, "CAP_SYS_ADMIN")),
]


async def _locked_then(w: World, p: int, advice: Advice) -> None:
    """A locked mapping made before the snapshot is taken (see the test)."""
    await w.kernel.madvise(w.mid, p, *w.rng(p, "locked"), advice)


@pytest.mark.parametrize(("what", "errno", "proc", "call"), CASES, ids=[c[0] for c in CASES])
def test_error_changes_nothing(run: Any, what: str, errno: str, proc: dict[str, Any],
                               call: Callable[[World, int], Awaitable[Any]]) -> None:
    async def s(w: World) -> None:
        p = await setup(w, **proc)
        if "locked vma" in what:
            await w.mmap(p, "locked", 2)
            await w.mlock(p, "locked")
        await w.drain()
        before = await snapshot(w, p)
        with pytest.raises(KernelError) as err:
            await call(w, p)
        assert err.value.errno == errno, err.value
        await w.drain()
        assert await snapshot(w, p) == before

    run(s)


def test_mlock_with_a_hole_in_the_middle_applies_up_to_the_hole_like_linux(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        a = await w.mmap(p, "m", 4)
        await w.kernel.munmap(w.mid, p, a + 2 * P, P)
        with pytest.raises(KernelError) as err:
            await w.kernel.mlock(w.mid, p, a, 4 * P)
        assert err.value.errno == "ENOMEM"
        pages = await w.pages(p, "m")
        assert [pg.vma_locked for pg in pages] == [True, True, False, False]
        assert await w.locked_vm(p) == 2

    run(s)


def test_concurrent_quiescent_checks_share_the_next_one(run: Any, monkeypatch: Any) -> None:
    """Checks with drain_all that arrive while one runs are answered by the next one (it
    starts after all of them arrived): ten concurrent checks quiesce the machine twice."""
    import asyncio

    from mmsvc.mm.syscalls import Kernel

    async def s(w: World) -> None:
        p = await w.proc()
        await w.mmap(p, "m", 4)
        await w.touch(p, "m")
        runs: list[int] = []
        real = Kernel._check_quiescent

        async def counted(self: Any, m: Any) -> Any:
            runs.append(1)
            await asyncio.sleep(0.05)  # long enough for the others to arrive meanwhile
            return await real(self, m)

        monkeypatch.setattr(Kernel, "_check_quiescent", counted)
        reports = await asyncio.gather(*(w.kernel.check(w.mid, True) for _ in range(10)))
        assert all(r.ok and r.quiescent for r in reports)
        assert len(runs) == 2
        await w.kernel.check(w.mid, True)  # a check arriving later runs its own
        assert len(runs) == 3

    run(s)
