"""Emulated machines: NUMA nodes of page frames, memcgs, lruvecs, files and processes.

A machine's static shape (config, lruvec ids, files) is cached per worker in a
:class:`Machine`; everything that changes lives in the store.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from mmsvc.mm.errors import KernelError, einval, esrch
from mmsvc.mm.types import FileSpec, MachineConfig, ProcessSpec, Protocol
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore, text

MAX_NODES = 64
MAX_MEMCGS = 64
MAX_FRAMES_PER_NODE = 1 << 26
MMAP_BASE_VPN = 0x7F0000000  # top-down mmap area starts below 0x7f0000000000
RESERVE_CHUNK = 256  # frames a lruvec takes from its node at a time


@dataclass(frozen=True)
class FileInfo:
    fid: int
    name: str
    pages: int
    kind: str = "tmpfs"  # or "regular"

    @property
    def shmem(self) -> bool:
        return self.kind == "tmpfs"


@dataclass
class Machine:
    """Static shape of one machine as a worker sees it."""

    mid: str
    cfg: MachineConfig
    lruvecs: dict[tuple[int, str], int]  # (node, memcg) -> lruvec id
    files: dict[str, FileInfo] = field(default_factory=dict)

    def lv_of(self, node: int, memcg: str) -> int:
        return self.lruvecs[(node, memcg)]

    def lv_key(self, lv: int) -> str:
        return keys.lruvec(self.mid, lv)

    def lv_identity(self, lv: int) -> tuple[int, str]:
        for ident, i in self.lruvecs.items():
            if i == lv:
                return ident
        raise KeyError(lv)

    def file_by_id(self, fid: int) -> FileInfo:
        for f in self.files.values():
            if f.fid == fid:
                return f
        raise KeyError(fid)

    def knows_files(self, fids: Iterable[int]) -> bool:
        known = {f.fid for f in self.files.values()}
        return all(fid in known for fid in fids if fid)


def validate_config(cfg: MachineConfig) -> None:
    if not 1 <= cfg.nodes <= MAX_NODES:
        raise einval(f"nodes must be 1..{MAX_NODES}")
    if not 1 <= cfg.frames_per_node <= MAX_FRAMES_PER_NODE:
        raise einval(f"frames_per_node must be 1..{MAX_FRAMES_PER_NODE}")
    if not cfg.memcgs or len(cfg.memcgs) > MAX_MEMCGS or len(set(cfg.memcgs)) != len(cfg.memcgs):
        raise einval("memcgs must be 1..64 distinct names")
    if any(not m or "|" in m for m in cfg.memcgs):
        raise einval("memcg names must be non-empty and must not contain '|'")
    if not 1 <= cfg.mlock_batch_len <= 1024 or not 1 <= cfg.lru_add_batch_len <= 1024:
        raise einval("batch lengths must be 1..1024")
    if cfg.swap_pages < 0 or not 1 <= cfg.fault_around_pages <= 512:
        raise einval("swap_pages must be >= 0 and fault_around_pages 1..512")
    if cfg.fault_around_pages & (cfg.fault_around_pages - 1):
        raise einval("fault_around_pages must be a power of two")
    if cfg.hpage_pmd_nr != 512:
        raise einval("hpage_pmd_nr must be 512 (x86-64 with 4 KiB pages)")
    if not 0 <= cfg.task_migrate_permille <= 1000:
        raise einval("task_migrate_permille must be 0..1000")
    validate_tunables(cfg)


def validate_tunables(cfg: MachineConfig) -> None:
    """The §10.1 choices: on/off settings are bools, the others one of their enum's values."""
    for f in dataclasses.fields(MachineConfig):
        value = getattr(cfg, f.name)
        if isinstance(f.default, enum.Enum):
            try:
                type(f.default)(value)
            except ValueError:
                known = ", ".join(str(x) for x in type(f.default))
                raise einval(f"{f.name} must be one of {known}") from None
        elif isinstance(f.default, bool) and not isinstance(value, bool):
            raise einval(f"{f.name} must be a boolean")


def tunables_from_json(conf: dict[str, object]) -> dict[str, object]:
    """The enum-valued settings of a stored config as enums (stored as their values; a
    machine created before a setting existed gets its default)."""
    for f in dataclasses.fields(MachineConfig):
        if isinstance(f.default, enum.Enum) and f.name in conf:
            conf[f.name] = type(f.default)(conf[f.name])
    return conf


async def create_machine(store: RedisStore, cfg: MachineConfig) -> str:
    validate_config(cfg)
    mid = str(await store.client.incr("{mmsvc}:next_machine"))
    mk = keys.machine(mid)
    lvs: dict[str, int] = {}
    pipe = store.client.pipeline(transaction=False)
    lv = 0
    for node in range(cfg.nodes):
        pipe.set(f"{keys.node(mid, node)}:free", cfg.frames_per_node)
        for memcg in cfg.memcgs:
            lvs[f"{node}|{memcg}"] = lv
            pipe.hset(f"{keys.lruvec(mid, lv)}:meta", mapping={"reserve": 0, "top": 0})
            lv += 1
    conf = asdict(cfg)
    conf["memcgs"] = list(cfg.memcgs)
    conf["protocol"] = str(cfg.protocol)
    pipe.hset(f"{mk}:cfg", mapping={"config": json.dumps(conf), "lruvecs": json.dumps(lvs)})
    pipe.sadd(keys.MACHINES, mid)
    await pipe.execute()
    return mid


async def load_machine(store: RedisStore, mid: str) -> Machine:
    mk = keys.machine(mid)
    raw = await store.client.hgetall(f"{mk}:cfg")
    if not raw:
        raise esrch(f"no machine {mid!r}")
    conf = json.loads(raw[b"config"])
    conf["memcgs"] = tuple(conf["memcgs"])
    conf["protocol"] = Protocol(conf["protocol"])
    tunables_from_json(conf)
    lvs_raw: dict[str, int] = json.loads(raw[b"lruvecs"])
    lvs = {(int(k.split("|")[0]), k.split("|", 1)[1]): v for k, v in lvs_raw.items()}
    m = Machine(mid, MachineConfig(**conf), lvs)
    await refresh_files(store, m)
    return m


async def refresh_files(store: RedisStore, m: Machine) -> None:
    """Files are created by any worker (shared anonymous mmaps create one each): reload the
    registry into this cached shape, in place, before anything looks a new one up - a lookup
    that failed half way through a syscall would leave it half applied."""
    for name, val in (await store.client.hgetall(f"{keys.machine(m.mid)}:files")).items():
        fid, pages, kind = text(val).split("|")
        m.files[text(name)] = FileInfo(int(fid), text(name), int(pages), kind)


async def delete_machine(store: RedisStore, mid: str) -> None:
    if not await store.client.sismember(keys.MACHINES, mid):
        raise esrch(f"no machine {mid!r}")
    await store.client.srem(keys.MACHINES, mid)
    # Every key of the machine starts with "{m<mid>" (machine tag or a derived tag); on a
    # cluster they are spread over every primary, which scan_keys visits.
    found = [key async for key in store.scan_keys(f"{{m{mid}[:}}]*")]
    # Calls queued for one of its locks are woken first ("gone": ESRCH), or they would wait
    # for a token nobody will hand them.
    for key in found:
        if key.endswith(b":q"):
            await store.fcall("lk_gone", key[:-2].decode())
    # UNLINK in batches (a cluster client splits a batch by slot), not a round trip per key.
    for i in range(0, len(found), 500):
        await store.client.unlink(*found[i:i + 500])
    # A waiter already handed its token (L:w:<wid>) may not have popped it yet: the unlink
    # took it away, so it is told "gone" instead of waiting a whole lease for it.
    for key in found:
        if b":w:" in key:
            await store.client.rpush(key, "gone")
            await store.client.pexpire(key, 60_000)


async def create_file(store: RedisStore, m: Machine, spec: FileSpec) -> FileInfo:
    if not spec.name or "|" in spec.name or len(spec.name) > 255:
        raise einval("file names must be 1..255 characters without '|'")
    if not 1 <= spec.pages <= m.cfg.frames_per_node * m.cfg.nodes:
        raise einval("file size must be 1 page .. the machine's memory")
    if spec.kind not in ("tmpfs", "regular"):
        raise einval("file kind must be 'tmpfs' or 'regular'")
    mk = keys.machine(m.mid)
    fid = int(await store.client.hincrby(f"{mk}:ids", "file", 1))
    added = await store.client.hsetnx(f"{mk}:files", spec.name,
                                      f"{fid}|{spec.pages}|{spec.kind}")
    if not added:
        raise KernelError("EEXIST", f"file {spec.name!r} exists")
    info = FileInfo(fid, spec.name, spec.pages, spec.kind)
    m.files[spec.name] = info
    return info


async def new_id(store: RedisStore, mid: str, what: str) -> int:
    return int(await store.client.hincrby(f"{keys.machine(mid)}:ids", what, 1))


async def create_process(store: RedisStore, m: Machine, spec: ProcessSpec) -> int:
    if spec.memcg not in m.cfg.memcgs:
        raise einval(f"no memcg {spec.memcg!r}")
    if not 0 <= spec.node < m.cfg.nodes:
        raise einval(f"no node {spec.node}")
    if spec.rlimit_memlock_soft < 0 or spec.rlimit_memlock_hard < spec.rlimit_memlock_soft:
        raise einval("RLIMIT_MEMLOCK soft must be 0..hard")
    pid = await new_id(store, m.mid, "pid")
    await write_new_mm(store, m, pid, spec.memcg, spec.node, spec.rlimit_memlock_soft,
                       spec.rlimit_memlock_hard, spec.cap_ipc_lock)
    return pid


async def write_new_mm(
    store: RedisStore, m: Machine, pid: int, memcg: str, node: int, soft: int, hard: int,
    cap: bool, *, def_flags: int = 0, mlockall: int = 0, locked_vm: int = 0,
    next_vpn: int = MMAP_BASE_VPN,
) -> None:
    info: dict[str, str | int] = {
        "alive": 1, "memcg": memcg, "node": node, "lv": m.lv_of(node, memcg),
        "rlim_soft": soft, "rlim_hard": hard, "cap_ipc_lock": int(cap), "def_flags": def_flags,
        "mlockall": mlockall, "locked_vm": locked_vm, "next_vpn": next_vpn,
    }
    if store.is_cluster:
        # The mm and the machine's process registry are in different slots, which no MULTI
        # spans on a Redis Cluster: write the mm first, so a pid found registered has one.
        await store.client.hset(f"{keys.mm(m.mid, pid)}:info", mapping=info)  # type: ignore[arg-type]
        await store.client.sadd(f"{keys.machine(m.mid)}:procs", pid)
        return
    pipe = store.client.pipeline(transaction=True)
    pipe.hset(f"{keys.mm(m.mid, pid)}:info", mapping=info)  # type: ignore[arg-type]
    pipe.sadd(f"{keys.machine(m.mid)}:procs", pid)
    await pipe.execute()


async def reserve_frames(store: RedisStore, m: Machine, lv: int, need: int) -> bool:
    """Move frames from the lruvec's node to its reserve; False when the node is out."""
    node, _ = m.lv_identity(lv)
    want = max(need, RESERVE_CHUNK)
    free_key = f"{keys.node(m.mid, node)}:free"
    for amount in (want, need):
        left = int(await store.client.decrby(free_key, amount))
        if left >= 0:
            await store.fcall("mm_grant", m.lv_key(lv), amount)
            return True
        await store.client.incrby(free_key, amount)
    return False


async def release_reserve(store: RedisStore, m: Machine, lv: int) -> int:
    """Give a lruvec's unused frames back to its node (after reclaim freed them)."""
    node, _ = m.lv_identity(lv)
    reserve = int(await store.client.hget(f"{m.lv_key(lv)}:meta", "reserve") or 0)
    if reserve <= 0:
        return 0
    try:
        await store.fcall("mm_grant", m.lv_key(lv), -reserve)
    except Exception:  # raced with an allocation: keep it, nothing is lost
        return 0
    await store.client.incrby(f"{keys.node(m.mid, node)}:free", reserve)
    return reserve
