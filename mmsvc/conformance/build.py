"""Compile scenario_exec.c on demand with the system C compiler.

Why on demand: the executable depends on the host (libc, compiler) and must never be a Python
process, so it is built from the packaged source the first time the runner needs it and cached,
keyed by a hash of the source, the flags and the compiler's identity.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mmsvc.conformance.errors import HostUnsupported

SOURCE = Path(__file__).with_name("scenario_exec.c")

# The runtime section must be position independent and must not touch TLS (no stack
# protector), constant pools (no jump tables, general registers only) or libc helpers (no
# builtins turned into memset/memcpy calls).  tests/conformance checks the relocations.
CFLAGS = (
    "-O2",
    "-fPIE",
    "-pie",
    "-fno-jump-tables",
    "-fno-stack-protector",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
    "-fno-reorder-blocks-and-partition",
    "-fcf-protection=none",
    "-mgeneral-regs-only",
    "-U_FORTIFY_SOURCE",
    "-Wall",
    "-Wextra",
)


def find_compiler() -> str:
    """Return the C compiler to use ($CC, else cc, else gcc) or raise HostUnsupported."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    raise HostUnsupported("no C compiler found (set $CC or install cc/gcc)")


def cache_dir() -> Path:
    """Per-user cache directory for the compiled executable."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "mmsvc-conformance"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"mmsvc-conformance-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compiler_identity(cc: str) -> bytes:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostUnsupported(f"C compiler {cc} does not run: {exc}") from exc
    return cc.encode() + b"\0" + out.stdout


def build_command(
    cc: str, output: Path, source: Path = SOURCE, *, compile_only: bool = False
) -> list[str]:
    """The compiler command line (compile_only builds an object file, for the tests)."""
    flags = [f for f in CFLAGS if not (compile_only and f == "-pie")]
    return [cc, *flags, *(["-c"] if compile_only else []), "-o", str(output), str(source)]


def executable() -> Path:
    """Path of the compiled scenario executor, building it if the cache lacks it."""
    cc = find_compiler()
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(
        source + b"\0" + "\0".join(CFLAGS).encode() + b"\0" + _compiler_identity(cc)
    ).hexdigest()[:20]
    directory = cache_dir()
    target = directory / f"scenario_exec-{digest}"
    if target.exists():
        return target
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".build-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            proc = subprocess.run(
                build_command(cc, tmp), capture_output=True, text=True, check=False, timeout=300
            )
            if proc.returncode != 0:
                raise HostUnsupported(f"compiling scenario_exec.c failed:\n{proc.stderr}")
            tmp.chmod(0o755)
            tmp.replace(target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return target
