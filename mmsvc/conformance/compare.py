"""Field-by-field comparison of two result documents (trace-format.md), the runner name aside.

Shared by ``tests/conformance/test_fidelity.py`` and ``python -m mmsvc.conformance.report``.
"""

from __future__ import annotations

from typing import Any


def differences(kernel: Any, mmsvc: Any, path: str = "") -> list[str]:
    """Every differing field as ``"<path>: kernel <a> != mmsvc <b>"``, in document order.

    ``path`` is a JSON-ish path (``.snapshots[0].vmstat.unevictable_pgs_culled``).  The top-level
    ``runner`` key is ignored; a key present on one side only and lists of different lengths are
    reported too (the common prefix of two lists is still compared item by item).
    """
    if isinstance(kernel, dict) and isinstance(mmsvc, dict):
        out: list[str] = []
        for key in dict.fromkeys([*kernel, *mmsvc]):
            if key == "runner" and not path:
                continue
            if key not in kernel or key not in mmsvc:
                out.append(f"{path}.{key}: only in {'kernel' if key in kernel else 'mmsvc'}")
            else:
                out += differences(kernel[key], mmsvc[key], f"{path}.{key}")
        return out
    if isinstance(kernel, list) and isinstance(mmsvc, list):
        out = [f"{path}: {len(kernel)} items != {len(mmsvc)}"] if len(kernel) != len(mmsvc) else []
        for i, (a, b) in enumerate(zip(kernel, mmsvc, strict=False)):
            out += differences(a, b, f"{path}[{i}]")
        return out
    return [] if kernel == mmsvc else [f"{path}: kernel {kernel!r} != mmsvc {mmsvc!r}"]
