"""How a process hands freed memory back to the system (glibc's allocator; no-ops elsewhere).

glibc serves an allocation from its heap unless it is larger than the mmap threshold, and raises that
threshold to the size of every mmapped block freed (up to 32 MiB). A job that frees and allocates
batch-sized buffers (tens of MB) all the time ends up serving them from the heap, whose freed holes
stay resident: DeepSpot's training at 37,630 spots peaked at 5.37 GB that way, and at 4.96 GB with a
fixed threshold (`stmdit bench scale`'s run, notes of issue 16). deepspot-train and deepspot-predict set it;
other commands keep glibc's default (their cost with it, e.g. page faults per step in training, is unmeasured).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
LARGE_BLOCK_BYTES = 4 << 20


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_large_blocks_to_os(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve every allocation of at least `threshold` bytes with its own mapping, returned to the system
    when freed, for the rest of the process (a fixed threshold: glibc no longer raises it). Left as it
    is when the user set MALLOC_MMAP_THRESHOLD_; True when the setting took effect."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    libc = _libc()
    try:
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except AttributeError:  # not glibc
        return False


def release_freed_memory() -> None:
    """Hand memory freed by large arrays back to the system (glibc keeps freed heap pages otherwise,
    and the peak RSS grows with every slide read); a no-op where malloc_trim does not exist."""
    libc = _libc()
    try:
        if libc is not None:
            libc.malloc_trim(0)
    except AttributeError:
        pass
