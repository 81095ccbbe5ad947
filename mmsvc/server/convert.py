"""Conversions between protobuf messages and the dataclasses of :mod:`mmsvc.mm.types`.

Shared by the servicers (proto → dataclass for requests, dataclass → proto for responses) and
by the client library (the reverse).
"""

from __future__ import annotations

import dataclasses

from mmsvc.mm.kernel import MigrateResult, ReclaimResult
from mmsvc.mm.types import (
    CheckReport,
    FileSpec,
    FinalClearance,
    LockStatRow,
    MachineConfig,
    MigrationDrain,
    MlockBatchScope,
    MlockCountInitCull,
    MlockCountInitLruAdd,
    MunlockHookPosition,
    PageInfo,
    ProcessSpec,
    ProcStatus,
    Protocol,
    SmapsEntry,
)
from mmsvc.proto_gen.mmsvc.v1 import mm_service_pb2 as pb
from mmsvc.proto_gen.mmsvc.v1 import types_pb2 as tpb

_PROTOCOL_TO_PB = {
    Protocol.REWORK: tpb.PROTOCOL_REWORK,
    Protocol.LEGACY: tpb.PROTOCOL_LEGACY,
}
_PROTOCOL_FROM_PB = {v: k for k, v in _PROTOCOL_TO_PB.items()}

# Spec §10.1 tunables: proto enum value -> dataclass value, per field (UNSPECIFIED = default).
_SWITCH: dict[int, object] = {tpb.SWITCH_ON: True, tpb.SWITCH_OFF: False}
TUNABLES_FROM_PB: dict[str, dict[int, object]] = {
    "vm_io_guard": _SWITCH,
    "reclaim_locked_activate": _SWITCH,
    "migration_newpage_lru_first": _SWITCH,
    "migration_drain": {
        tpb.MIGRATION_DRAIN_AFTER_EACH_LOCKED_UNMAP: MigrationDrain.AFTER_EACH_LOCKED_UNMAP,
        tpb.MIGRATION_DRAIN_OFF: MigrationDrain.OFF,
        tpb.MIGRATION_DRAIN_RMAP_WALK_LEVEL: MigrationDrain.RMAP_WALK_LEVEL,
    },
    "mlock_count_init_lru_add": {
        tpb.MLOCK_COUNT_INIT_LRU_ADD_ZERO: MlockCountInitLruAdd.ZERO,
        tpb.MLOCK_COUNT_INIT_LRU_ADD_BOOL_MLOCKED: MlockCountInitLruAdd.BOOL_MLOCKED,
    },
    "mlock_count_init_cull": {
        tpb.MLOCK_COUNT_INIT_CULL_BOOL_MLOCKED: MlockCountInitCull.BOOL_MLOCKED,
        tpb.MLOCK_COUNT_INIT_CULL_ONE: MlockCountInitCull.ONE,
    },
    "mlock_batch_scope": {
        tpb.MLOCK_BATCH_SCOPE_PER_CPU_ALL: MlockBatchScope.PER_CPU_ALL,
        tpb.MLOCK_BATCH_SCOPE_MASS_ONLY: MlockBatchScope.MASS_ONLY,
    },
    "final_clearance": {
        tpb.FINAL_CLEARANCE_REFCOUNT_ZERO: FinalClearance.REFCOUNT_ZERO,
        tpb.FINAL_CLEARANCE_MAPCOUNT_ZERO: FinalClearance.MAPCOUNT_ZERO,
    },
    "munlock_hook_position": {
        tpb.MUNLOCK_HOOK_POSITION_END: MunlockHookPosition.END,
        tpb.MUNLOCK_HOOK_POSITION_START: MunlockHookPosition.START,
    },
    "stat_refresh_drains_all": _SWITCH,
    "new_anon_checks_vm_special": _SWITCH,
    "thp_pte_holds_in_locked_vma": _SWITCH,
    "thp_anon_fault": _SWITCH,
    "large_folio_mlock": _SWITCH,
}


def _tunable_to_pb(name: str, value: object) -> int:
    return next(k for k, v in TUNABLES_FROM_PB[name].items() if v == value)


FILE_KINDS_FROM_PB = {
    tpb.FILE_KIND_UNSPECIFIED: "tmpfs",
    tpb.FILE_KIND_TMPFS: "tmpfs",
    tpb.FILE_KIND_REGULAR: "regular",
}
FILE_KINDS_TO_PB = {"tmpfs": tpb.FILE_KIND_TMPFS, "regular": tpb.FILE_KIND_REGULAR}

# MachineConfig numeric fields where proto 0 means "default".
_CONFIG_NUMERIC = (
    "nodes",
    "frames_per_node",
    "swap_pages",
    "mlock_batch_len",
    "lru_add_batch_len",
    "fault_around_pages",
    "hpage_pmd_nr",
    "task_migrate_permille",
)


# -- MachineConfig ---------------------------------------------------------------------------


def machine_config_from_pb(msg: tpb.MachineConfig) -> MachineConfig:
    """Proto → dataclass; zero / empty / UNSPECIFIED fields take the dataclass defaults."""
    changes: dict[str, object] = {}
    for name in _CONFIG_NUMERIC:
        value = getattr(msg, name)
        if value:
            changes[name] = int(value)
    if msg.memcgs:
        changes["memcgs"] = tuple(msg.memcgs)
    if msg.thp:
        changes["thp"] = True
    if msg.populate_drain:
        changes["populate_drain"] = True
    if msg.protocol in _PROTOCOL_FROM_PB:
        changes["protocol"] = _PROTOCOL_FROM_PB[msg.protocol]
    if msg.name:
        changes["name"] = msg.name
    for name, values in TUNABLES_FROM_PB.items():
        number = getattr(msg, name)
        if number:  # an unknown number is refused by validate.machine_tunables first
            changes[name] = values[number]
    return dataclasses.replace(MachineConfig(), **changes)  # type: ignore[arg-type]


def machine_config_to_pb(cfg: MachineConfig) -> tpb.MachineConfig:
    msg = _machine_config_to_pb(cfg)
    for name in TUNABLES_FROM_PB:
        setattr(msg, name, _tunable_to_pb(name, getattr(cfg, name)))
    return msg


def _machine_config_to_pb(cfg: MachineConfig) -> tpb.MachineConfig:
    return tpb.MachineConfig(
        nodes=cfg.nodes,
        frames_per_node=cfg.frames_per_node,
        memcgs=list(cfg.memcgs),
        thp=cfg.thp,
        swap_pages=cfg.swap_pages,
        mlock_batch_len=cfg.mlock_batch_len,
        lru_add_batch_len=cfg.lru_add_batch_len,
        protocol=_PROTOCOL_TO_PB[Protocol(cfg.protocol)],
        fault_around_pages=cfg.fault_around_pages,
        hpage_pmd_nr=cfg.hpage_pmd_nr,
        name=cfg.name,
        populate_drain=cfg.populate_drain,
        task_migrate_permille=cfg.task_migrate_permille,
    )


# -- files ---------------------------------------------------------------------------------------


def file_spec_from_pb(req: pb.CreateFileRequest) -> FileSpec:
    return FileSpec(
        name=req.name,
        pages=req.pages,
        prefill=req.prefill,
        kind=FILE_KINDS_FROM_PB.get(req.kind, "tmpfs"),
    )


def file_spec_to_pb(machine: str, spec: FileSpec) -> pb.CreateFileRequest:
    return pb.CreateFileRequest(
        machine=machine,
        name=spec.name,
        pages=spec.pages,
        prefill=spec.prefill,
        kind=FILE_KINDS_TO_PB.get(spec.kind, tpb.FILE_KIND_UNSPECIFIED),
    )


# -- processes ---------------------------------------------------------------------------------


def process_spec_from_pb(req: pb.CreateProcessRequest) -> ProcessSpec:
    default = ProcessSpec()
    return ProcessSpec(
        memcg=req.memcg or default.memcg,
        node=req.node,
        rlimit_memlock_soft=(
            req.rlimit_memlock_soft
            if req.HasField("rlimit_memlock_soft")
            else default.rlimit_memlock_soft
        ),
        rlimit_memlock_hard=(
            req.rlimit_memlock_hard
            if req.HasField("rlimit_memlock_hard")
            else default.rlimit_memlock_hard
        ),
        cap_ipc_lock=req.cap_ipc_lock if req.HasField("cap_ipc_lock") else default.cap_ipc_lock,
    )


def process_spec_to_pb(machine: str, spec: ProcessSpec) -> pb.CreateProcessRequest:
    return pb.CreateProcessRequest(
        machine=machine,
        memcg=spec.memcg,
        node=spec.node,
        rlimit_memlock_soft=spec.rlimit_memlock_soft,
        rlimit_memlock_hard=spec.rlimit_memlock_hard,
        cap_ipc_lock=spec.cap_ipc_lock,
    )


def proc_status_to_pb(st: ProcStatus) -> tpb.ProcStatus:
    return tpb.ProcStatus(
        pid=st.pid,
        alive=st.alive,
        vm_lck_kb=st.vm_lck_kb,
        vm_size_kb=st.vm_size_kb,
        vm_rss_kb=st.vm_rss_kb,
        memcg=st.memcg,
        node=st.node,
        mlockall_flags=st.mlockall_flags,
        cap_ipc_lock=st.cap_ipc_lock,
        rlimit_memlock_soft=st.rlimit_memlock_soft,
        rlimit_memlock_hard=st.rlimit_memlock_hard,
    )


def proc_status_from_pb(msg: tpb.ProcStatus) -> ProcStatus:
    return ProcStatus(
        pid=msg.pid,
        alive=msg.alive,
        vm_lck_kb=msg.vm_lck_kb,
        vm_size_kb=msg.vm_size_kb,
        vm_rss_kb=msg.vm_rss_kb,
        memcg=msg.memcg,
        node=msg.node,
        mlockall_flags=msg.mlockall_flags,
        cap_ipc_lock=msg.cap_ipc_lock,
        rlimit_memlock_soft=msg.rlimit_memlock_soft,
        rlimit_memlock_hard=msg.rlimit_memlock_hard,
    )


# -- pages and VMAs ----------------------------------------------------------------------------


def page_info_to_pb(p: PageInfo) -> tpb.PageInfo:
    return tpb.PageInfo(
        addr=p.addr,
        vma_present=p.vma_present,
        present=p.present,
        kind=p.kind,
        pfn=p.pfn,
        mlocked=p.mlocked,
        unevictable=p.unevictable,
        lru=p.lru,
        active=p.active,
        lru_list=p.lru_list,
        mlock_count=p.mlock_count,
        refcount=p.refcount,
        mapcount=p.mapcount,
        node=p.node,
        memcg=p.memcg,
        vma_locked=p.vma_locked,
        vma_onfault=p.vma_onfault,
        locked=p.locked,
        batch_residue=p.batch_residue,
        ksm=p.ksm,
    )


def page_info_from_pb(m: tpb.PageInfo) -> PageInfo:
    return PageInfo(
        addr=m.addr,
        vma_present=m.vma_present,
        present=m.present,
        kind=m.kind,
        pfn=m.pfn,
        mlocked=m.mlocked,
        unevictable=m.unevictable,
        lru=m.lru,
        active=m.active,
        lru_list=m.lru_list,
        mlock_count=m.mlock_count,
        refcount=m.refcount,
        mapcount=m.mapcount,
        node=m.node,
        memcg=m.memcg,
        vma_locked=m.vma_locked,
        vma_onfault=m.vma_onfault,
        locked=m.locked,
        batch_residue=m.batch_residue,
        ksm=m.ksm,
    )


def smaps_entry_to_pb(e: SmapsEntry) -> tpb.SmapsEntry:
    return tpb.SmapsEntry(
        start=e.start,
        end=e.end,
        size_kb=e.size_kb,
        rss_kb=e.rss_kb,
        locked_kb=e.locked_kb,
        vm_flags=list(e.vm_flags),
    )


def smaps_entry_from_pb(m: tpb.SmapsEntry) -> SmapsEntry:
    return SmapsEntry(
        start=m.start,
        end=m.end,
        size_kb=m.size_kb,
        rss_kb=m.rss_kb,
        locked_kb=m.locked_kb,
        vm_flags=tuple(m.vm_flags),
    )


# -- statistics --------------------------------------------------------------------------------


def lock_stat_row_to_pb(r: LockStatRow) -> tpb.LockStatRow:
    return tpb.LockStatRow(
        lock_class=r.lock_class,
        instance=r.instance,
        con_bounces=r.con_bounces,
        contentions=r.contentions,
        waittime_min=r.waittime_min,
        waittime_max=r.waittime_max,
        waittime_total=r.waittime_total,
        acq_bounces=r.acq_bounces,
        acquisitions=r.acquisitions,
        holdtime_min=r.holdtime_min,
        holdtime_max=r.holdtime_max,
        holdtime_total=r.holdtime_total,
    )


def lock_stat_row_from_pb(m: tpb.LockStatRow) -> LockStatRow:
    return LockStatRow(
        lock_class=m.lock_class,
        instance=m.instance,
        con_bounces=m.con_bounces,
        contentions=m.contentions,
        waittime_min=m.waittime_min,
        waittime_max=m.waittime_max,
        waittime_total=m.waittime_total,
        acq_bounces=m.acq_bounces,
        acquisitions=m.acquisitions,
        holdtime_min=m.holdtime_min,
        holdtime_max=m.holdtime_max,
        holdtime_total=m.holdtime_total,
    )


def check_report_to_pb(r: CheckReport) -> tpb.CheckReport:
    return tpb.CheckReport(
        quiescent=r.quiescent,
        violations=list(r.violations),
        undercounts=r.undercounts,
        known_exceptions=dict(r.known_exceptions),
        pages_checked=r.pages_checked,
        ok=r.ok,
    )


def check_report_from_pb(m: tpb.CheckReport) -> CheckReport:
    return CheckReport(
        quiescent=m.quiescent,
        violations=list(m.violations),
        undercounts=m.undercounts,
        known_exceptions=dict(m.known_exceptions),
        pages_checked=m.pages_checked,
    )


def migrate_result_to_pb(r: MigrateResult) -> pb.MigrateResponse:
    return pb.MigrateResponse(migrated=r.migrated, failed=r.failed, errno=r.errno)


def migrate_result_from_pb(m: pb.MigrateResponse) -> MigrateResult:
    return MigrateResult(migrated=m.migrated, failed=m.failed, errno=m.errno)


def reclaim_result_to_pb(r: ReclaimResult) -> pb.ReclaimResponse:
    return pb.ReclaimResponse(scanned=r.scanned, reclaimed=r.reclaimed, culled=r.culled)


def reclaim_result_from_pb(m: pb.ReclaimResponse) -> ReclaimResult:
    return ReclaimResult(scanned=m.scanned, reclaimed=m.reclaimed, culled=m.culled)
