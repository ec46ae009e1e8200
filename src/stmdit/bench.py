"""`stmdit bench <name> ...`: timing benchmarks of pipeline stages, one per registry entry.

A benchmark is a function taking the parsed arguments and returning a dict of measurements (also
printed); `@benchmark(name, arguments)` adds it to `BENCHMARKS` (name -> function) together with a
function adding its arguments. Timings are measured once and printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

Benchmark = Callable[[argparse.Namespace], dict[str, Any]]
BENCHMARKS: dict[str, Benchmark] = {}
BENCHMARK_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def benchmark(name: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register a benchmark function under `name` with its argument declarations."""

    def add(function: Benchmark) -> Benchmark:
        BENCHMARKS[name] = function
        BENCHMARK_ARGUMENTS[name] = arguments
        return function

    return add


# --------------------------------------------------------------------------------------------
# spots: the ingest stage against the time to decode the slide's image once
# --------------------------------------------------------------------------------------------


def _spots_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slide", required=True, type=Path, help="Space Ranger outs/ folder, or an H&E slide image")
    p.add_argument("--image", type=Path, default=None, help="full-resolution image of a Visium slide")
    p.add_argument("--mpp", type=float, default=None, help="um/px of an H&E slide without metadata")


@benchmark("spots", _spots_arguments)
def bench_spots(args: argparse.Namespace) -> dict[str, Any]:
    """Time the spots stage on one slide (default thresholds) against one decode of its image.

    The stage time covers ingest, patches, filters and both writes (into a temporary directory);
    modules are imported before timing (a one-off per process, not per slide)."""
    import pyarrow.parquet  # noqa: F401  (warm imports: not per-slide work)

    from stmdit.spots import run_spots
    from stmdit.visium import patch_image_source, read_rgb_image, read_scalefactors, SCALEFACTORS_FILE

    kind = "visium" if args.slide.is_dir() else "he"
    if kind == "visium":
        import h5py  # noqa: F401  (warm import)

        factors = read_scalefactors(args.slide / SCALEFACTORS_FILE)
        image_path = patch_image_source(args.slide, args.image, factors).path
    else:
        image_path = args.slide

    started = time.perf_counter()
    read_rgb_image(image_path)
    decode_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory(prefix="stmdit-bench-") as tmp:
        started = time.perf_counter()
        table = run_spots(
            "bench", "bench", "bench", kind, args.slide,
            Path(tmp) / "spots.parquet", Path(tmp) / "patches.zarr", image=args.image, mpp=args.mpp,
        )
        stage_s = time.perf_counter() - started
    result = {
        "benchmark": "spots",
        "slide": str(args.slide),
        "kind": kind,
        "image": str(image_path),
        "spots": len(table),
        "kept": int(table["keep"].sum()),
        "stage_s": round(stage_s, 4),
        "decode_s": round(decode_s, 4),
        "patches_per_s": round(len(table) / stage_s, 1),
        "stage_over_decode": round(stage_s / decode_s, 3),
    }
    print(f"spots bench on {args.slide} ({kind}, image {image_path.name})")
    print(f"  spots: {result['spots']} in tissue, {result['kept']} kept")
    print(f"  stage: {stage_s:.3f} s   decode once: {decode_s:.3f} s")
    print(f"  patches/s: {result['patches_per_s']}")
    print(f"  stage / decode: {result['stage_over_decode']} (goal <= 1.5)")
    print(json.dumps(result))
    return result


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    BENCHMARKS[args.benchmark](args)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time a pipeline stage (see `stmdit bench <name> -h`)")
    names = p.add_subparsers(dest="benchmark", required=True, metavar="<name>")
    for name, function in BENCHMARKS.items():
        doc = (function.__doc__ or name).strip().splitlines()[0]
        BENCHMARK_ARGUMENTS[name](names.add_parser(name, help=doc, description=doc))
    p.set_defaults(func=run)
