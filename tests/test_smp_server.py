"""A worker serving two emulated CPUs over gRPC (``mmsvc serve --cpus-per-worker 2``): tasks
that move between them at reschedule points (spec §10.1) take the lruvec lock from both,
which lock_stat shows as bounces; a task that never moves shows none."""

from __future__ import annotations

import pytest

from mmsvc.cli.main import build_parser
from mmsvc.mm.types import MAP_ANONYMOUS, MAP_PRIVATE, LockStatRow, MachineConfig, MmapArgs
from mmsvc.server.app import build_server, redis_kernel_factory
from mmsvc.server.workers import worker_configs
from mmsvc_client import AsyncMmsvcClient, MmsvcError

PAGES = 6000  # two chunks of the mlock walk: a reschedule point between them


def lruvec_bounces(rows: list[LockStatRow]) -> int:
    return sum(r.acq_bounces for r in rows if r.lock_class == "lruvec_lock")


async def mlock_lifetime(k: AsyncMmsvcClient, permille: int) -> tuple[str, list[LockStatRow]]:
    m = await k.create_machine(MachineConfig(task_migrate_permille=permille))
    pid = await k.create_process(m)
    addr = await k.mmap(m, pid, MmapArgs(PAGES * 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS))
    await k.fault(m, pid, addr, PAGES * 4096, True)
    await k.mlock(m, pid, addr, PAGES * 4096)
    await k.munlock(m, pid, addr, PAGES * 4096)
    await k.exit(m, pid)
    report = await k.check(m, True)
    assert report.ok, report.violations
    return m, await k.lock_stat(m)


@pytest.mark.asyncio
async def test_moving_tasks_bounce_the_lruvec_lock_between_the_workers_cpus(
        redis_url: str) -> None:
    server = await build_server(redis_kernel_factory(redis_url, 4, cpus=2), "127.0.0.1:0",
                                None, metrics_poll_interval=None, access_log=False)
    await server.start()
    try:
        async with AsyncMmsvcClient(f"127.0.0.1:{server.port}", timeout=60) as k:
            assert await k.ping() == 4  # the worker's first CPU answers
            _, still = await mlock_lifetime(k, 0)
            m, moving = await mlock_lifetime(k, 1000)
            assert lruvec_bounces(still) == 0, still
            assert lruvec_bounces(moving) > 0, moving
            assert (await k.machine_config(m)).task_migrate_permille == 1000
            await server.metrics.export_from_kernel(server.kernel)
            moves = server.metrics.registry.get_sample_value("mmsvc_task_migrations_total")
            assert moves is not None and moves >= 6  # entry moves alone: 6 task syscalls
            with pytest.raises(MmsvcError) as exc:
                await k.create_machine(MachineConfig(task_migrate_permille=1001))
            assert exc.value.errno == "EINVAL"
    finally:
        await server.stop(None)


def test_cpus_per_worker_numbers_the_cpus_of_each_worker() -> None:
    args = build_parser().parse_args(["serve", "--workers", "2", "--cpus-per-worker", "3",
                                      "--cpu-base", "10", "--listen", "127.0.0.1:7000"])
    configs = worker_configs("redis://h:1/0", args.listen, args.workers, None, "json",
                             cpu_base=args.cpu_base, cpus_per_worker=args.cpus_per_worker)
    assert [(c.cpu, c.cpus) for c in configs] == [(10, 3), (13, 3)]
