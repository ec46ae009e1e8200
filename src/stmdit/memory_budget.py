"""How much memory this process may still take, and one clear error when a job's estimate exceeds it:
the smallest of the address-space limit (`ulimit -v`, `prlimit --as`) left over the process's current
size, the cgroup's limit left over its usage, and the system's available memory."""

from __future__ import annotations

import resource
from pathlib import Path

from stmdit.errors import InputError

GB = 1e9


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes() -> int | None:
    """Bytes this process can still allocate, or None when nothing limits it that we can read."""
    limits = []
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        size_kb = _proc_status_kb("VmSize") or 0
        limits.append(soft - 1024 * size_kb)
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            limits.append(limit - usage)
            break
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(1024 * int(line.split()[1]))
    except (OSError, ValueError, IndexError):
        pass
    return max(0, min(limits)) if limits else None


def require(path: str | Path | None, needed: float, what: str) -> None:
    """InputError naming `path` when `needed` bytes (for `what`) exceed what this process may take."""
    available = available_bytes()
    if available is not None and needed > available:
        raise InputError(path, f"{what} needs about {needed / GB:.1f} GB of memory; {available / GB:.1f} GB are "
                               "available to this job (give it more memory, e.g. a larger mem_mb)")


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's CPU / CUDA allocator failing (a RuntimeError, torch.OutOfMemoryError)."""
    text = str(exc)
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))


def out_of_memory(path: str | Path | None, needed: float, what: str) -> InputError:
    """The one-line error for running out of memory while doing `what` on `path`."""
    return InputError(path, f"out of memory: {what} needs about {needed / GB:.1f} GB for its data (estimated), "
                            "on top of the interpreter and torch; give the job more memory, e.g. a larger mem_mb")
