"""stmdit.memory: freed batch-sized buffers leave the process instead of staying in glibc's heap."""

from __future__ import annotations

import subprocess
import sys

import pytest

FRAGMENTING = """
import sys
import numpy as np
from stmdit.memory import return_large_blocks_to_os
if sys.argv[1] == "fixed":
    assert return_large_blocks_to_os()
a = np.ones((8 << 20) // 8); del a   # glibc raises its mmap threshold to 8 MB when this is freed
keep = []
for _ in range(40):   # then 8 MB buffers come from the heap, each followed by a small block that stays
    b = np.ones((8 << 20) // 8); keep.append(np.ones(64)); del b
    c = np.ones((8 << 20) // 8 + 1000); keep.append(np.ones(64)); del c
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_a_fixed_mmap_threshold_returns_freed_batch_buffers():
    def rss_kb(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FRAGMENTING, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    default, fixed = rss_kb("default"), rss_kb("fixed")
    assert default - fixed > 8_000, (default, fixed)   # at least one 8 MB buffer no longer held
