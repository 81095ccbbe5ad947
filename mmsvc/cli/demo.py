"""``mmsvc demo``: a short scripted load and a readable report.

Several processes map files and anonymous memory, touch it, mlock and munlock it, fork, exit
and apply a little memory pressure; then the report shows the vmstat deltas, meminfo, the
lock statistics and the consistency checker's verdict.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from rich.console import Console
from tqdm import tqdm

from mmsvc.cli.tables import check_text, lock_stat_table, meminfo_table, vmstat_table
from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_SHARED,
    MCL_CURRENT,
    MCL_FUTURE,
    MLOCK_ONFAULT,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    FileSpec,
    MachineConfig,
    MmapArgs,
)
from mmsvc_client import AsyncMmsvcClient, MmsvcError

RW = PROT_READ | PROT_WRITE


@dataclass
class DemoState:
    machine: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    maps: dict[tuple[str, str], int] = field(default_factory=dict)  # (proc, id) -> addr
    failures: Counter[str] = field(default_factory=Counter)


Step = tuple[str, Callable[[], Awaitable[object]]]


def build_steps(k: AsyncMmsvcClient, st: DemoState, procs: int) -> list[Step]:
    """The scripted load, as (description, coroutine factory) pairs."""
    steps: list[Step] = []
    names = [f"p{i}" for i in range(procs)]

    def add(desc: str, fn: Callable[[], Awaitable[object]]) -> None:
        steps.append((desc, fn))

    def addr(proc: str, mid: str) -> int:
        return st.maps[(proc, mid)]

    def mmap(proc: str, mid: str, pages: int, flags: int, file: str = "") -> Step:
        async def run() -> None:
            args = MmapArgs(length=pages * PAGE_SIZE, prot=RW, flags=flags, file=file)
            st.maps[(proc, mid)] = await k.mmap(st.machine, st.pids[proc], args)

        kind = f"file {file}" if file else "anon"
        return (f"{proc}: mmap {mid} ({pages} pages {kind})", run)

    def touch(proc: str, mid: str, pages: int, write: bool) -> Step:
        async def run() -> None:
            await k.fault(st.machine, st.pids[proc], addr(proc, mid), pages * PAGE_SIZE, write)

        return (f"{proc}: {'write' if write else 'read'} {mid}", run)

    def mlock(proc: str, mid: str, pages: int, flags: int = 0) -> Step:
        async def run() -> None:
            await k.mlock(st.machine, st.pids[proc], addr(proc, mid), pages * PAGE_SIZE, flags)

        name = "mlock2(MLOCK_ONFAULT)" if flags else "mlock"
        return (f"{proc}: {name} {pages} pages of {mid}", run)

    def munlock(proc: str, mid: str, pages: int) -> Step:
        async def run() -> None:
            await k.munlock(st.machine, st.pids[proc], addr(proc, mid), pages * PAGE_SIZE)

        return (f"{proc}: munlock {mid}", run)

    def munmap(proc: str, mid: str, pages: int) -> Step:
        async def run() -> None:
            await k.munmap(st.machine, st.pids[proc], addr(proc, mid), pages * PAGE_SIZE)

        return (f"{proc}: munmap {mid}", run)

    def exit_(proc: str) -> Step:
        async def run() -> None:
            await k.exit(st.machine, st.pids[proc])

        return (f"{proc}: exit", run)

    anon = MAP_PRIVATE | MAP_ANONYMOUS
    for i, p in enumerate(names):
        steps.append(mmap(p, "heap", 64, anon))
        steps.append(touch(p, "heap", 64, True))
        steps.append(mmap(p, "data", 32, MAP_SHARED, "data"))
        steps.append(touch(p, "data", 32, False))
        steps.append(mlock(p, "data", 32))
        steps.append(mlock(p, "heap", 32) if i % 2 == 0 else mlock(p, "heap", 64, MLOCK_ONFAULT))

    p0 = names[0]

    async def fork_child() -> None:
        st.pids["child"] = await k.fork(st.machine, st.pids[p0])
        st.maps[("child", "heap")] = st.maps[(p0, "heap")]
        st.maps[("child", "data")] = st.maps[(p0, "data")]

    add(f"{p0}: fork child", fork_child)
    steps.append(touch("child", "heap", 64, True))
    steps.append(mlock("child", "data", 32))
    steps.append(munlock(p0, "data", 32))
    steps.append(exit_("child"))
    if len(names) > 1:
        p1 = names[1]

        async def munlockall() -> None:
            await k.munlockall(st.machine, st.pids[p1])

        add(f"{p1}: munlockall", munlockall)
    if len(names) > 2:
        p2 = names[2]

        async def mlockall() -> None:
            await k.mlockall(st.machine, st.pids[p2], MCL_CURRENT | MCL_FUTURE)

        add(f"{p2}: mlockall(MCL_CURRENT|MCL_FUTURE)", mlockall)
        steps.append(mmap(p2, "late", 16, anon | MAP_POPULATE))

    async def reclaim() -> None:
        await k.reclaim(st.machine, None, None, 128)

    add("reclaim 128 pages", reclaim)
    last = names[-1]
    steps.append(munmap(last, "heap", 64))
    steps.append(exit_(last))

    async def drain() -> None:
        await k.drain(st.machine, True)

    add("drain all CPUs", drain)
    return steps


async def run_demo(
    k: AsyncMmsvcClient,
    console: Console,
    procs: int = 4,
    batch_size: int = 15,
    progress: bool = True,
) -> bool:
    """Run the scripted load through ``k`` and print the report; True when the checker is OK."""
    st = DemoState()
    st.machine = await k.create_machine(
        MachineConfig(mlock_batch_len=batch_size, lru_add_batch_len=batch_size, name="demo")
    )
    await k.create_file(st.machine, FileSpec("data", 32, prefill=True))
    await k.create_file(st.machine, FileSpec("log", 16, prefill=False))
    for i in range(procs):
        st.pids[f"p{i}"] = await k.create_process(st.machine)
    baseline = await k.vmstat(st.machine)

    steps = build_steps(k, st, procs)
    for desc, fn in tqdm(steps, desc="demo", unit="op", disable=not progress, leave=False):
        try:
            await fn()
        except MmsvcError as e:
            if e.errno is None:
                raise
            st.failures[f"{desc}: {e.errno}"] += 1
        except KeyError:  # an earlier step (e.g. mmap) failed: nothing to act on
            st.failures[f"{desc}: skipped"] += 1

    counters = await k.vmstat(st.machine)
    meminfo = await k.meminfo(st.machine)
    rows = await k.lock_stat(st.machine)
    report = await k.check(st.machine, True)

    console.rule(f"mmsvc demo — machine {st.machine}")
    failed = sum(st.failures.values())
    console.print(
        f"{procs} processes + 1 forked child, {len(steps)} operations "
        f"({failed} failed), mlock batch {batch_size}"
    )
    for what, n in sorted(st.failures.items()):
        console.print(f"  failed: {what}" + (f" ×{n}" if n > 1 else ""))
    console.print(vmstat_table(counters, baseline, title="vmstat (Δ = during the demo)"))
    console.print(meminfo_table(meminfo))
    console.print(lock_stat_table(rows, title="lock_stat (µs)"))
    console.print(check_text(report))
    await k.delete_machine(st.machine)
    return report.ok
