"""Every protocol scenario of tests/protocol, run as it is on the Redis Cluster.

The scenarios' ``run`` fixture builds a World (Kernel + RedisStore) on ``protocol_redis.url``;
conftest.py points that at the session's cluster, so the same tests, with their parameters and
their checker verdicts, exercise the cluster client: FCALL routed by key to the primary of its
slot, multi-node pipelines, MULTI on one slot, SCAN over every primary (delete_machine).  A Lua
function reaching a key outside its slot fails here (Redis refuses it on a cluster).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import tests.protocol


def _scenario_modules() -> list[ModuleType]:
    """Every tests/protocol/test_*.py module (new ones are picked up too)."""
    return [importlib.import_module(f"tests.protocol.{info.name}")
            for info in pkgutil.iter_modules(tests.protocol.__path__)
            if info.name.startswith("test_")]


def _reexport(modules: list[ModuleType]) -> list[str]:
    """Bind every ``test_*`` function of ``modules`` here, where pytest collects it with this
    directory's fixtures."""
    names: list[str] = []
    for mod in modules:
        for name, obj in vars(mod).items():
            if name.startswith("test_") and callable(obj):
                assert name not in globals(), f"two protocol tests named {name}"
                globals()[name] = obj
                names.append(name)
    return names


REEXPORTED = _reexport(_scenario_modules())


def test_protocol_scenarios_are_collected_here() -> None:
    assert len(REEXPORTED) >= 30, REEXPORTED
