"""Record the host kernel's result documents as the expectations mmsvc must reproduce.

    python -m mmsvc.conformance.record [TRACE.json ...]   (default: every trace in the corpus)

Each trace's document is written to ``tests/conformance/expected/<name>.json`` together with
the kernel release it came from; ``tests/conformance/test_fidelity.py`` replays the trace on
mmsvc with the Linux 6.18 profile and requires an identical document.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

from mmsvc.conformance.kernel_runner import run_file

CORPUS = Path(__file__).resolve().parents[2] / "tests" / "conformance"


def record(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        doc = run_file(path)
        target = out_dir / f"{path.stem}.json"
        target.write_text(json.dumps({"kernel": platform.release(), "result": doc},
                                     indent=1) + "\n", encoding="utf-8")
        written.append(target)
        print(f"recorded {path.name} -> {target.name}", file=sys.stderr)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    paths = [Path(a) for a in args] or sorted((CORPUS / "traces").glob("*.json"))
    record(paths, CORPUS / "expected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
