"""A job killed mid-write (SIGKILL, as the out-of-memory killer does) leaves no output that looks
complete, and its rerun starts clean: nothing of the killed attempt is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from stmdit.features import open_feature_store, write_feature_store
from stmdit.provenance import atomic_path, stale_temp_siblings, write_json

SRC = Path(__file__).resolve().parents[1] / "src"

# A writer that has written part of its output, says so, and waits to be killed.
STALLED_STORE = """
import sys, time
from pathlib import Path
import numpy as np
from stmdit.features import write_feature_store

out, marker = Path(sys.argv[1]), Path(sys.argv[2])

def batches():
    yield {"embedding": np.ones((8, 4), np.float32)}
    marker.touch()  # half the rows are written
    time.sleep(120)
    yield {"embedding": np.ones((8, 4), np.float32)}

write_feature_store(out, [f"k{i}" for i in range(16)], batches(), {"embedding": (4,)}, {})
"""

STALLED_FILE = """
import sys, time
from pathlib import Path
from stmdit.provenance import atomic_path

out, marker = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_path(out) as tmp:
    tmp.write_text('{"half": ')
    marker.touch()
    time.sleep(120)
    tmp.write_text('{"half": 1}')
"""


def kill_mid_write(script: str, out: Path, tmp_path: Path) -> None:
    marker = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(out), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, "the writer ended before it was killed"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def test_a_store_killed_mid_write_leaves_no_store_and_the_rerun_starts_clean(tmp_path):
    out = tmp_path / "features" / "uni2h.zarr"
    kill_mid_write(STALLED_STORE, out, tmp_path)
    assert not out.exists()  # nothing at the output path: Snakemake sees the job's output missing
    leftovers = stale_temp_siblings(out)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".")  # the killed attempt's temporary

    rows = [{"embedding": np.full((8, 4), i, np.float32)} for i in range(2)]
    write_feature_store(out, [f"k{i}" for i in range(16)], iter(rows), {"embedding": (4,)}, {})
    group = open_feature_store(out)
    assert group["embedding"].shape == (16, 4) and float(group["embedding"][15, 0]) == 1.0
    assert stale_temp_siblings(out) == []  # the rerun removed the killed attempt's temporary
    assert sorted(p.name for p in out.parent.iterdir()) == ["uni2h.zarr"]


def test_a_file_killed_mid_write_leaves_no_file_and_the_rerun_starts_clean(tmp_path):
    out = tmp_path / "eval" / "fid.json"
    kill_mid_write(STALLED_FILE, out, tmp_path)
    assert not out.exists() and len(stale_temp_siblings(out)) == 1
    write_json(out, {"fid": 1.5})
    assert out.read_text().startswith("{") and sorted(p.name for p in out.parent.iterdir()) == ["fid.json"]


def test_an_h5ad_writer_that_fails_leaves_nothing(tmp_path):
    """h5ad writers pick the format by suffix: the temporary keeps it, so nothing is left aside."""
    out = tmp_path / "ptpl" / "demo.h5ad"
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(out) as tmp:
            assert tmp.suffix == ".h5ad" and tmp.name.startswith(".demo.tmp-")
            tmp.write_bytes(b"partial")
            raise OSError("disk full")
    assert list(out.parent.iterdir()) == []


def test_stale_temporaries_are_only_those_of_the_same_output(tmp_path):
    out = tmp_path / "mosaics"
    other = tmp_path / ".mosaics.tmp-0123abcd.zarr"  # the temporary of mosaics.zarr, another output
    other.mkdir()
    mine = tmp_path / ".mosaics.tmp-89abcdef"
    mine.mkdir()
    assert stale_temp_siblings(out) == [mine]
    assert stale_temp_siblings(tmp_path / "mosaics.zarr") == [other]
