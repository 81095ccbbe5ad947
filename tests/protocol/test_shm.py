"""SysV shared memory and SHM_LOCK (mmsvc/mm/shm.py; spec §1.1.4, §7.1 scanned, X2, S30).

Every scenario ends with the §8.5 checker (the ``run`` fixture): Q2 holds for SHM_LOCK'd pages
on the unevictable LRU without PG_mlocked through X2.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from mmsvc.mm.errors import KernelError
from mmsvc.mm.shm import SHM_LOCK, SHM_UNLOCK
from mmsvc.mm.types import Advice, ProcessSpec
from tests.protocol.world import World, sub

P = 4096


async def shm(w: World, pid: int, name: str, pages: int) -> int:
    """shmget + shmat as mapping ``name`` of pid; returns the shmid."""
    shmid, addr = await w.kernel.shm_create(w.mid, pid, pages)
    w.maps[(pid, name)] = (addr, pages)
    return shmid


async def ctl(w: World, pid: int, shmid: int, cmd: str) -> None:
    await w.kernel.shm_ctl(w.mid, pid, shmid, cmd)


def flags(pages: list[Any]) -> list[tuple[bool, bool, str, int]]:
    return [(p.mlocked, p.unevictable, p.lru_list, p.mlock_count) for p in pages]


def test_s30_shm_locked_page_mlocked_then_munlocked(run: Any) -> None:
    """S30: pages already unevictable by their mapping; mlock counts without culling, munlock
    leaves them on the unevictable LRU; SHM_UNLOCK then rescues them."""

    async def s(w: World) -> None:
        p = await w.proc()
        sid = await shm(w, p, "s", 4)
        await ctl(w, p, sid, SHM_LOCK)
        await w.touch(p, "s")  # new shmem pages: lru_add culls them (§2.1.4)
        await w.drain()
        d = await w.delta()
        assert sub(d, culled=4, mlocked=0, nr_unev=4, nr_mlock=0) == {
            "culled": 4, "mlocked": 0, "nr_unev": 4, "nr_mlock": 0}
        assert flags(await w.pages(p, "s")) == [(False, True, "unevictable", 0)] * 4
        await w.mlock(p, "s")
        d = await w.delta()
        assert sub(d, culled=4, mlocked=4, nr_mlock=4, nr_unev=4) == {
            "culled": 4, "mlocked": 4, "nr_mlock": 4, "nr_unev": 4}  # no Δculled
        assert flags(await w.pages(p, "s")) == [(True, True, "unevictable", 1)] * 4
        await w.munlock(p, "s")
        d = await w.delta()
        assert sub(d, munlocked=4, rescued=0, nr_mlock=0, nr_unev=4) == {
            "munlocked": 4, "rescued": 0, "nr_mlock": 0, "nr_unev": 4}
        assert flags(await w.pages(p, "s")) == [(False, True, "unevictable", 0)] * 4
        await ctl(w, p, sid, SHM_UNLOCK)
        d = await w.delta()
        assert sub(d, scanned=4, rescued=4, nr_unev=0, inactive_anon=4) == {
            "scanned": 4, "rescued": 4, "nr_unev": 0, "inactive_anon": 4}
        assert flags(await w.pages(p, "s")) == [(False, False, "inactive_anon", -1)] * 4

    run(s)


def test_shm_lock_moves_nothing_until_lru_add_or_reclaim_meets_the_pages(run: Any) -> None:
    """SHM_LOCK only marks the mapping: pages on an evictable list stay there; reclaim
    (MADV_PAGEOUT) and putback after an isolation cull them (Δculled), and an mlock culls."""

    async def s(w: World) -> None:
        p = await w.proc()
        sid = await shm(w, p, "s", 6)
        await w.touch(p, "s")
        await w.drain()
        await ctl(w, p, sid, SHM_LOCK)
        d = await w.delta()
        assert sub(d, culled=0, nr_unev=0, inactive_anon=6) == {
            "culled": 0, "nr_unev": 0, "inactive_anon": 6}
        assert flags(await w.pages(p, "s")) == [(False, False, "inactive_anon", -1)] * 6
        # reclaim meets pages 0-1: not evictable -> activate, putback culls them (§5.1.2)
        addr, _ = w.rng(p, "s")
        await w.kernel.madvise(w.mid, p, addr, 2 * P, Advice.MADV_PAGEOUT)
        await w.drain()
        assert (await w.delta())["culled"] == 2
        # an isolation's putback (lru-add) culls pages 2-3
        await w.kernel.isolate(w.mid, p, addr + 2 * P, 2 * P)
        await w.kernel.putback(w.mid, p, addr + 2 * P, 2 * P)
        await w.drain()
        assert (await w.delta())["culled"] == 4
        # mlock of pages 4-5, still on inactive_anon: __mlock_page culls them (§2.4.5)
        await w.mlock(p, "s", 4, 6)
        d = await w.delta()
        assert sub(d, culled=6, mlocked=2, nr_unev=6, inactive_anon=0) == {
            "culled": 6, "mlocked": 2, "nr_unev": 6, "inactive_anon": 0}
        await ctl(w, p, sid, SHM_UNLOCK)
        d = await w.delta()
        # every cached page scanned; the two mlocked ones stay
        assert sub(d, scanned=6, rescued=4, nr_unev=2, inactive_anon=4) == {
            "scanned": 6, "rescued": 4, "nr_unev": 2, "inactive_anon": 4}
        await w.munlock(p, "s", 4, 6)
        d = await w.delta()
        assert sub(d, munlocked=2, rescued=6, nr_unev=0) == {
            "munlocked": 2, "rescued": 6, "nr_unev": 0}

    run(s)


def test_shm_unlock_keeps_mlocked_pages_and_scans_only_cached_ones(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        sid = await shm(w, p, "s", 8)
        await ctl(w, p, sid, SHM_LOCK)
        await w.touch(p, "s", 0, 3)  # 3 of 8 pages in the page cache
        await w.drain()
        await w.mlock(p, "s", 0, 1)  # page 0 mlocked too
        await ctl(w, p, sid, SHM_UNLOCK)
        d = await w.delta()
        assert sub(d, culled=3, mlocked=1, scanned=3, rescued=2, nr_unev=1) == {
            "culled": 3, "mlocked": 1, "scanned": 3, "rescued": 2, "nr_unev": 1}
        pages = await w.pages(p, "s")
        assert flags(pages[:3]) == [(True, True, "unevictable", 1)] + [
            (False, False, "inactive_anon", -1)] * 2
        await w.munlock(p, "s", 0, 1)  # the mapping is evictable again: rescued now
        d = await w.delta()
        assert sub(d, munlocked=1, rescued=3, nr_unev=0) == {
            "munlocked": 1, "rescued": 3, "nr_unev": 0}

    run(s)


def test_shm_lock_and_unlock_are_idempotent(run: Any) -> None:
    """SHM_LOCK of a locked segment charges nothing more; SHM_UNLOCK of an unlocked one does
    not scan (ipc/shm.c returns before shmem_unlock_mapping)."""

    async def s(w: World) -> None:
        p = await w.proc(rlimit_memlock_soft=4 * P, rlimit_memlock_hard=4 * P,
                         cap_ipc_lock=False)
        sid = await shm(w, p, "s", 4)
        await w.touch(p, "s")
        await w.drain()
        await ctl(w, p, sid, SHM_UNLOCK)
        assert (await w.delta())["scanned"] == 0
        await ctl(w, p, sid, SHM_LOCK)
        await ctl(w, p, sid, SHM_LOCK)  # 4 + 4 pages would exceed the limit: not charged
        await ctl(w, p, sid, SHM_UNLOCK)
        await ctl(w, p, sid, SHM_UNLOCK)
        assert sub(await w.delta(), scanned=4, rescued=0) == {"scanned": 4, "rescued": 0}

    run(s)


def test_shm_pages_shared_by_two_processes(run: Any) -> None:
    """Two attaches of one locked segment; both mlock: mlock_count 2, munlocks in turn."""

    async def s(w: World) -> None:
        p1, p2 = await w.proc(), await w.proc()
        sid = await shm(w, p1, "s", 2)
        addr = await w.kernel.shm_attach(w.mid, p2, sid)
        w.maps[(p2, "s")] = (addr, 2)
        await ctl(w, p2, sid, SHM_LOCK)
        await w.touch(p1, "s")
        await w.touch(p2, "s", write=False)  # maps the same page cache pages
        await w.drain()
        await w.mlock(p1, "s")
        await w.mlock(p2, "s")
        assert [pg.mlock_count for pg in await w.pages(p2, "s")] == [2, 2]
        await w.munlock(p1, "s")
        await w.munlock(p2, "s")
        d = await w.delta()
        assert sub(d, culled=2, mlocked=2, munlocked=2, rescued=0, nr_unev=2) == {
            "culled": 2, "mlocked": 2, "munlocked": 2, "rescued": 0, "nr_unev": 2}
        await w.kernel.exit(w.mid, p1)
        await ctl(w, p2, sid, SHM_UNLOCK)
        assert sub(await w.delta(), scanned=2, rescued=2, nr_unev=0) == {
            "scanned": 2, "rescued": 2, "nr_unev": 0}

    run(s)


def test_shm_lock_needs_cap_ipc_lock_or_rlimit(run: Any) -> None:
    """ipc/shm.c: EPERM without CAP_IPC_LOCK and with RLIMIT_MEMLOCK 0; user_shm_lock:
    ENOMEM beyond the limit (the charge is the user's: every segment it locked).  Refused
    calls change nothing."""

    async def s(w: World) -> None:
        p = await w.proc(rlimit_memlock_soft=0, rlimit_memlock_hard=3 * P, cap_ipc_lock=False)
        a = await shm(w, p, "a", 2)
        b = await shm(w, p, "b", 2)
        await w.touch(p, "a")
        await w.drain()
        before = await w.delta()
        with pytest.raises(KernelError) as e:
            await ctl(w, p, a, SHM_LOCK)
        assert e.value.errno == "EPERM"
        await w.kernel.setrlimit(w.mid, p, 3 * P, 3 * P)
        await ctl(w, p, a, SHM_LOCK)  # 2 pages of 3
        with pytest.raises(KernelError) as e:
            await ctl(w, p, b, SHM_LOCK)  # 2 + 2 > 3
        assert e.value.errno == "ENOMEM"
        await ctl(w, p, a, SHM_UNLOCK)  # the charge goes back
        await ctl(w, p, b, SHM_LOCK)
        await ctl(w, p, b, SHM_UNLOCK)
        assert (await w.delta())["scanned"] == before["scanned"] + 2  # a: 2 cached, b: 0
        # a privileged process may lock beyond its limit (and with a zero limit)
        q = await w.proc(rlimit_memlock_soft=0, rlimit_memlock_hard=0)
        await ctl(w, q, a, SHM_LOCK)
        await ctl(w, q, b, SHM_LOCK)
        await ctl(w, q, a, SHM_UNLOCK)
        await ctl(w, q, b, SHM_UNLOCK)

    run(s)


def test_shm_bad_arguments_change_nothing(run: Any) -> None:
    async def s(w: World) -> None:
        p = await w.proc()
        sid = await shm(w, p, "s", 2)
        cases = [
            (w.kernel.shm_ctl(w.mid, p, sid + 99, SHM_LOCK), "EINVAL"),
            (w.kernel.shm_ctl(w.mid, p, sid, "IPC_RMID"), "EINVAL"),
            (w.kernel.shm_ctl(w.mid, 999, sid, SHM_LOCK), "ESRCH"),
            (w.kernel.shm_attach(w.mid, p, sid + 99), "EINVAL"),
            (w.kernel.shm_attach(w.mid, p, sid, 123), "EINVAL"),
            (w.kernel.shm_create(w.mid, p, 0), "EINVAL"),
            (w.kernel.shm_create(w.mid, p, 8192 + 1), "EINVAL"),  # more than the machine
            (w.kernel.shm_create(w.mid, 999, 1), "ESRCH"),
        ]
        for call, errno in cases:
            with pytest.raises(KernelError) as e:
                await call
            assert e.value.errno == errno
        smaps = await w.kernel.smaps(w.mid, p)
        assert len(smaps) == 1
        # no segment was left behind by the refused creates: the next shmid follows sid
        nxt, _ = await w.kernel.shm_create(w.mid, p, 1)
        assert nxt == sid + 1
        assert (await w.delta())["scanned"] == 0

    run(s)


@pytest.mark.asyncio
async def test_shm_over_grpc(redis_server: Any) -> None:
    """ShmCreate / ShmAttach / ShmCtl through a real server: S30's counters, errno mapping,
    validation."""
    from mmsvc.server.app import embedded_server
    from mmsvc_client import AsyncMmsvcClient, MmsvcError

    async with (
        embedded_server(redis_url=redis_server.url) as server,
        AsyncMmsvcClient(f"127.0.0.1:{server.port}") as k,
    ):
        m = await k.create_machine()
        pid = await k.create_process(m)
        other = await k.create_process(m, ProcessSpec(rlimit_memlock_soft=0,
                                                      rlimit_memlock_hard=0, cap_ipc_lock=False))
        shmid, addr = await k.shm_create(m, pid, 4)
        assert addr % P == 0
        await k.shm_ctl(m, pid, shmid, SHM_LOCK)
        await k.fault(m, pid, addr, 4 * P, True)
        await k.drain(m, False)
        await k.mlock(m, pid, addr, 4 * P)
        await k.munlock(m, pid, addr, 4 * P)
        vm = await k.vmstat(m)
        assert [vm[f"unevictable_pgs_{c}"] for c in ("culled", "mlocked", "munlocked", "rescued")
                ] == [4, 4, 4, 0]
        assert vm["nr_unevictable"] == 4
        oaddr = await k.shm_attach(m, other, shmid)
        assert oaddr % P == 0
        with pytest.raises(MmsvcError) as err:  # rlimit 0, no CAP_IPC_LOCK
            await k.shm_ctl(m, other, shmid, SHM_LOCK)
        assert (err.value.errno, err.value.code) == ("EPERM", grpc.StatusCode.PERMISSION_DENIED)
        await k.shm_ctl(m, other, shmid, SHM_UNLOCK)  # unlocking needs no limit
        vm = await k.vmstat(m)
        assert (vm["unevictable_pgs_scanned"], vm["unevictable_pgs_rescued"],
                vm["nr_unevictable"]) == (4, 4, 0)
        for call, errno in (
            (k.shm_ctl(m, pid, shmid + 7, SHM_LOCK), "EINVAL"),   # no such segment
            (k.shm_ctl(m, pid, shmid, "IPC_STAT"), "EINVAL"),     # UNSPECIFIED command
            (k.shm_create(m, pid, 0), "EINVAL"),                  # validation
            (k.shm_create(m, pid, 1, addr=123), "EINVAL"),
            (k.shm_attach(m, pid + 100, shmid), "ESRCH"),
        ):
            with pytest.raises(MmsvcError) as err:
                await call
            assert err.value.errno == errno
        assert not (await k.check(m, True)).violations
        await k.delete_machine(m)
