"""/proc/lock_stat for an emulated machine: every lock instance's acquisition statistics."""

from __future__ import annotations

from mmsvc.mm.machine import Machine
from mmsvc.mm.types import LockStatRow
from mmsvc.store import keys
from mmsvc.store.redis_store import RedisStore


async def lock_instances(store: RedisStore, m: Machine) -> list[tuple[str, str, str]]:
    """(class, instance, key) of every lock of the machine, in a stable order."""
    out: list[tuple[str, str, str]] = []
    for (n, cg), lv in sorted(m.lruvecs.items(), key=lambda kv: kv[1]):
        out.append(("lruvec_lock", f"node{n}/{cg}", f"{m.lv_key(lv)}:lock"))
        out.append(("page_lock", f"node{n}/{cg}", f"{m.lv_key(lv)}:page_lock"))
    for f in sorted(m.files.values(), key=lambda f: f.fid):
        out.append(("i_mmap_rwsem", f.name, f"{keys.file(m.mid, f.fid)}:i_mmap_rwsem"))
        # the inode lock: ftruncate and hole punch (mm/truncate.py)
        out.append(("i_rwsem", f.name, f"{keys.file(m.mid, f.fid)}:i_rwsem"))
    pids = sorted(int(p) for p in await store.client.smembers(f"{keys.machine(m.mid)}:procs"))
    out += [("mmap_lock", f"pid{p}", f"{keys.mm(m.mid, p)}:mmap_lock") for p in pids]
    out += [("ptl", f"pid{p}", f"{keys.mm(m.mid, p)}:ptl") for p in pids]
    avs = int(await store.client.hget(f"{keys.machine(m.mid)}:ids", "anon_vma") or 0)
    out += [("anon_vma_lock", f"av{a}", f"{keys.anon_vma(m.mid, a)}:lock")
            for a in range(1, avs + 1)]
    return out


async def lock_stat(store: RedisStore, m: Machine) -> list[LockStatRow]:
    inst = await lock_instances(store, m)
    pipe = store.client.pipeline(transaction=False)
    for _, _, key in inst:
        pipe.hgetall(f"{key}:st")
    rows = []
    for (cls, name, _), raw in zip(inst, await pipe.execute(), strict=True):
        if not raw:
            continue
        st = {k.decode(): float(v) for k, v in raw.items()}
        rows.append(LockStatRow(
            lock_class=cls, instance=name,
            con_bounces=int(st.get("con_bounces", 0)), contentions=int(st.get("contentions", 0)),
            waittime_min=max(st.get("wait_min", 0.0), 0.0), waittime_max=st.get("wait_max", 0.0),
            waittime_total=st.get("wait_total", 0.0),
            acq_bounces=int(st.get("acq_bounces", 0)),
            acquisitions=int(st.get("acquisitions", 0)),
            holdtime_min=max(st.get("hold_min", 0.0), 0.0), holdtime_max=st.get("hold_max", 0.0),
            holdtime_total=st.get("hold_total", 0.0),
        ))
    return rows
