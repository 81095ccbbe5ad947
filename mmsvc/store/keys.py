"""Key layout of the page store.

Every key carries a hash tag so that the data one server-side function touches lives in one
Redis Cluster slot (DESIGN.md "Hot paths run next to the data"):

* ``{m<id>}``            machine: config, id counters, registries of processes/files/lruvecs
* ``{m<id>:lv<n>}``      one lruvec (node, memcg): struct-page records, LRU lists, the
                          unevictable "LRU" size, per-lruvec vmstat counters, the lruvec lock and
                          this lruvec's part of every CPU's mlock and lru_add batches
* ``{m<id>:mm<pid>}``    one address space: VMAs, page tables, locked_vm, mmap_lock
* ``{m<id>:f<fid>}``     one file: page cache, i_mmap tree, i_mmap_rwsem
* ``{m<id>:av<id>}``     one anon_vma (the rmap of a family of forked anonymous mappings)
* ``{m<id>:n<node>}``    one NUMA node: free page frames
"""

from __future__ import annotations


def machine(mid: str) -> str:
    return f"{{m{mid}}}"


def lruvec(mid: str, lv: int) -> str:
    return f"{{m{mid}:lv{lv}}}"


def mm(mid: str, pid: int) -> str:
    return f"{{m{mid}:mm{pid}}}"


def file(mid: str, fid: int) -> str:
    return f"{{m{mid}:f{fid}}}"


def anon_vma(mid: str, avid: int) -> str:
    return f"{{m{mid}:av{avid}}}"


def node(mid: str, nid: int) -> str:
    return f"{{m{mid}:n{nid}}}"


MACHINES = "{mmsvc}:machines"
