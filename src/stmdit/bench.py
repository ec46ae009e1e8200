"""`stmdit bench <name> ...`: timing benchmarks of pipeline stages (and `auc-null`, a measurement
of Table 2's nulls), one per registry entry.

A benchmark is a function taking the parsed arguments and returning a dict of measurements (also
printed); `@benchmark(name, arguments)` adds it to `BENCHMARKS` (name -> function) together with a
function adding its arguments. Timings are measured once and printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from stmdit.regimes import PAPER_S_GE, PAPER_S_UNI

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
# spots-scale: the spots step's peak memory on large tiled pyramidal slides
# --------------------------------------------------------------------------------------------


def _spots_scale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source-image", type=Path, default=Path(__file__).resolve().parents[2] / "resources"
                   / "cmu_small_region.svs", help="the real H&E the slides are tiled from")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the generated slides (a temporary folder inside it, deleted afterwards)")
    p.add_argument("--visium-px", type=int, default=25_024, help="side of the Visium full-resolution image")
    p.add_argument("--visium-mpp", type=float, default=0.27, help="um/px of the Visium image (~5,000 spots)")
    p.add_argument("--he-width", type=int, default=80_000, help="width of the H&E-only slide (px)")
    p.add_argument("--he-height", type=int, default=62_528, help="height of the H&E-only slide (5.0 gigapixels)")
    p.add_argument("--he-mpp", type=float, default=0.25, help="um/px of the H&E-only slide (40x)")
    p.add_argument("--keep", action="store_true", help="keep the generated slides and outputs")


# Forks and execs the command from a fresh, small interpreter and writes the child's own peak RSS
# (KiB) to argv[1]. Linux carries the parent's peak RSS into a forked child's ru_maxrss across exec,
# so measuring from this (large) process directly would report our own peak instead.
_PEAK_RSS_RUNNER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], log_path: Path) -> tuple[int, float, float]:
    """Run a command as a grandchild process; its exit status, wall seconds and its own peak RSS (MB)."""
    import subprocess
    import sys

    import stmdit

    package_root = str(Path(stmdit.__file__).resolve().parents[1])  # the child imports this same stmdit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    peak_file = log_path.with_suffix(".peak_rss_kib")
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        code = subprocess.run([sys.executable, "-c", _PEAK_RSS_RUNNER, str(peak_file), *command], stdout=log_file,
                              stderr=subprocess.STDOUT, env=env).returncode
    wall_s = time.perf_counter() - started
    return code, wall_s, int(peak_file.read_text()) / 1024  # ru_maxrss: KiB on Linux


@benchmark("spots-scale", _spots_scale_arguments)
def bench_spots_scale(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of `stmdit spots` on (a) a Visium-like folder with a full-resolution tiled pyramidal
    JPEG TIFF of --visium-px square and (b) an H&E-only 40x slide of --he-width x --he-height px.

    Both slides are the real CMU H&E mirror-tiled (stmdit.bigslide), written tile by tile; the step runs
    as a separate process (default thresholds) and its own peak RSS is read from wait4's rusage."""
    import shutil
    import sys

    from stmdit.bigslide import MirroredTissue, read_source, write_pyramidal_tiff, write_visium_folder
    from stmdit.spots_table import read_spots_table

    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stmdit-spots-scale-", dir=args.work))
    source = read_source(args.source_image)
    result: dict[str, Any] = {"benchmark": "spots-scale", "work": str(work), "cases": {}}
    try:
        cases = {}
        started = time.perf_counter()
        visium_tissue = MirroredTissue(source, args.visium_px, args.visium_px, tissue_fraction=0.95)
        image = write_pyramidal_tiff(work / "visium_fullres.tif", visium_tissue, args.visium_mpp)
        write_visium_folder(work / "visium" / "outs", visium_tissue, args.visium_mpp)
        cases["visium"] = (["--kind", "visium", "--path", str(work / "visium" / "outs"), "--image", str(image)],
                           image, args.visium_px, args.visium_px)
        he = write_pyramidal_tiff(work / "he_40x.tif", MirroredTissue(source, args.he_width, args.he_height),
                                  args.he_mpp)
        cases["he"] = (["--kind", "he", "--path", str(he)], he, args.he_width, args.he_height)
        result["generate_s"] = round(time.perf_counter() - started, 1)
        print(f"spots-scale: slides written in {result['generate_s']} s under {work}")
        for name, (slide_args, image_path, width, height) in cases.items():
            out = work / f"out_{name}"
            command = [sys.executable, "-m", "stmdit", "spots", "--sample", name, "--donor", "d", "--cohort", "c",
                       *slide_args, "--out-spots", str(out / "spots.parquet"), "--out-patches",
                       str(out / "patches.zarr")]
            code, wall_s, peak_mb = run_measured(command, work / f"{name}.log")
            if code != 0:
                raise RuntimeError(f"stmdit spots failed on {name}: see {work / f'{name}.log'}")
            table = read_spots_table(out / "spots.parquet", ["keep"])
            case = {
                "image": f"{width} x {height} px ({width * height / 1e9:.2f} gigapixels)",
                "image_file_mb": round(image_path.stat().st_size / 2**20, 1),
                "spots": len(table), "kept": int(table["keep"].sum()),
                "wall_s": round(wall_s, 1), "peak_rss_mb": round(peak_mb, 1),
                "whole_level0_rgb_mb": round(width * height * 3 / 2**20, 1),
            }
            result["cases"][name] = case
            print(f"  {name}: {case['image']}, {case['spots']} spots ({case['kept']} kept): peak RSS"
                  f" {case['peak_rss_mb']:,.0f} MB (level 0 as one RGB array: {case['whole_level0_rgb_mb']:,.0f} MB),"
                  f" {case['wall_s']} s")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


# --------------------------------------------------------------------------------------------
# dag: planning the paper configuration
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _dag_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", type=Path, default=REPO / "workflow" / "paper" / "config.yaml")
    p.add_argument("--slides", type=int, default=18)
    p.add_argument("--donors", type=int, default=7)
    p.add_argument("--he-slides", type=int, default=4, help="slides of the H&E-only OOD cohort")


def paper_sheet(root: Path, slides: int, donors: int, he_slides: int, cohort: str, ood_cohort: str) -> Path:
    """A sample sheet of `slides` Visium slides over `donors` donors (+ H&E-only slides), with the
    files a dry run checks for (placeholders: planning reads no data)."""
    rows = ["sample\tdonor\tcohort\tkind\tpath\timage\tlabels\tmpp"]
    for i in range(slides):
        outs = root / f"slide{i:02d}" / "outs"
        (outs / "spatial").mkdir(parents=True)
        for name in ("filtered_feature_bc_matrix.h5", "spatial/scalefactors_json.json"):
            (outs / name).touch()
        image, labels = root / f"slide{i:02d}" / "image.tif", root / f"slide{i:02d}" / "labels.csv"
        image.touch()
        labels.touch()
        rows.append(f"S{i:02d}\tD{i % donors}\t{cohort}\tvisium\t{outs}\t{image}\t{labels}\t")
    for i in range(he_slides):
        slide = root / f"tcga{i:02d}.svs"
        slide.touch()
        rows.append(f"T{i:02d}\tTD{i}\t{ood_cohort}\the\t{slide}\t\t\t0.25")
    sheet = root / "samples.tsv"
    sheet.write_text("\n".join(rows) + "\n")
    return sheet


COMMAND_LINE_LIMIT = 100 * 1024  # bytes: under Linux's 128 KiB limit on one argument (bash -c "...")


def longest_shell_command(dry_run_output: str) -> tuple[int, str]:
    """(bytes, rule) of the longest `Shell command:` a `snakemake -n -p` printed."""
    import re

    longest, rule, current = 0, "", ""
    for line in dry_run_output.splitlines():
        match = re.match(r"(?:local)?rule (\w+):$", line)
        if match:
            current = match[1]
        elif line.startswith("Shell command: "):
            size = len(line[len("Shell command: "):].encode())
            if size > longest:
                longest, rule = size, current
    return longest, rule


def plan_on_generated_sheet(configfile: Path, slides: int, donors: int, he_slides: int) -> tuple[str, float]:
    """(output, seconds) of `snakemake all -n -p --forceall` for `configfile` on a generated sheet of
    `slides` Visium slides (+ `he_slides` H&E-only), the first donor as the test donor."""
    import subprocess
    import sys

    import yaml

    config = yaml.safe_load(Path(configfile).read_text())
    cohort, ood = config["train"]["cohort"], (config["train"].get("ood_cohorts") or ["OOD"])[0]
    with tempfile.TemporaryDirectory(prefix="stmdit-dag-") as tmp:
        sheet = paper_sheet(Path(tmp), slides, donors, he_slides, cohort, ood)
        # the generated sheet and its test donor, layered on the configuration (a second --configfile)
        overlay = Path(tmp) / "bench.yaml"
        overlay.write_text(yaml.safe_dump({"samples": str(sheet), "split": {"test_donors": {cohort: ["D0"]}}}))
        command = [str(Path(sys.executable).parent / "snakemake"), "all", "-n", "-p", "--forceall",
                   "--cores", "1", "--configfile", str(configfile), str(overlay)]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        plan_s = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"snakemake -n failed for {configfile}:\n{result.stderr[-4000:]}")
    return result.stdout + result.stderr, plan_s


@benchmark("dag", _dag_arguments)
def bench_dag(args: argparse.Namespace) -> dict[str, Any]:
    """Plan (snakemake -n -p) a configuration on a generated sheet; print the planning time, the job
    count and the longest job command line (each job's shell command, as Snakemake formats it)."""
    import re

    out, plan_s = plan_on_generated_sheet(args.configfile, args.slides, args.donors, args.he_slides)
    stats = out[out.index("Job stats:"):] if "Job stats:" in out else out
    stats = stats[:stats.index("\n\n")] if "\n\n" in stats else stats
    total = re.search(r"^total\s+(\d+)", stats, re.MULTILINE)
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE) if m[1] != "total"}
    longest, longest_rule = longest_shell_command(out)
    result_dict = {"benchmark": "dag", "configfile": str(args.configfile), "slides": args.slides,
                   "donors": args.donors, "jobs": int(total[1]) if total else sum(jobs.values()),
                   "plan_s": round(plan_s, 2), "longest_command_bytes": longest,
                   "longest_command_rule": longest_rule, "command_limit_bytes": COMMAND_LINE_LIMIT,
                   "jobs_per_rule": jobs}
    print(f"dag bench: {args.configfile} on {args.slides} slides / {args.donors} donors (+{args.he_slides} H&E)")
    print(f"  planned {result_dict['jobs']} jobs in {plan_s:.2f} s (goal < 30 s at 1,000 slides), printing every"
          " job's command")
    print(f"  longest command line: {longest:,} bytes ({longest_rule}; limit {COMMAND_LINE_LIMIT:,} bytes)")
    print(json.dumps(result_dict))
    return result_dict


# --------------------------------------------------------------------------------------------
# auc-null: what inputs without information score in Table 2, on a cohort's real-tile features
# --------------------------------------------------------------------------------------------


def _auc_null_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expression", required=True, type=Path, help="cohort h5ad (layers['counts'])")
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--uni", required=True, type=Path, help="UNI2-h features of the real tiles")
    p.add_argument("--midnight", required=True, type=Path, help="Midnight features of the real tiles")
    p.add_argument("--impl", choices=("smoke", "real"), default="smoke", help="encoders of the noise tiles")
    p.add_argument("--weights-uni", default=None)
    p.add_argument("--weights-midnight", default=None)
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--mlp-hidden", default="64,64")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples and null permutations")
    p.add_argument("--n-shuffles", type=int, default=100, help="shuffles whose CI coverage of 0 is counted")
    p.add_argument("--seed", type=int, default=42)


@benchmark("auc-null", _auc_null_arguments)
def bench_auc_null(args: argparse.Namespace) -> dict[str, Any]:
    """Table 2's nulls on real-tile features: noise tiles, one fixed shuffle, the permutation null.

    Fits the Oracle and Midnight+MLP on the train spots as `stmdit auc` does, then scores the real
    test tiles, pure-noise tiles of the test spots (through the encoders), the single shuffle at
    --seed (the null before it was measured as a distribution) and the permutation null; and
    counts how often the bootstrap CI of a fresh shuffle covers 0 over --n-shuffles shuffles."""
    import numpy as np

    from stmdit import evaluate, metrics, split_table
    from stmdit.encoders import load_encoder

    train_keys = split_table.split_keys(args.split, split_table.TRAIN)
    test_keys = split_table.split_keys(args.split, split_table.TEST)
    train_expression = evaluate.read_expression_log1p(args.expression, train_keys)
    test_expression = evaluate.read_expression_log1p(args.expression, test_keys)
    hvgs = evaluate.hvg_columns(args.expression)
    tiles = np.stack([evaluate.noise_tile(args.seed, row, args.tile_size) for row in range(len(test_keys))])

    def fit_oracle(features):
        return metrics.fit_oracle(features, train_expression[:, hvgs], seed=args.seed)

    def fit_mlp(features):
        hidden = evaluate.parse_int_list(args.mlp_hidden, "--mlp-hidden")
        return metrics.fit_midnight_mlp(features, train_expression, hidden_layer_sizes=hidden, seed=args.seed)

    def interval(entry):
        return {"auc": round(entry["auc"], 4), "lo": round(entry["lo"], 4), "hi": round(entry["hi"], 4)}

    results: dict[str, Any] = {"benchmark": "auc-null", "n_train": len(train_keys), "n_test": len(test_keys),
                               "n_boot": args.n_boot, "impl": args.impl}
    for name, encoder, path, weights, fit, truth in (
        ("oracle", "uni2h", args.uni, args.weights_uni, fit_oracle, test_expression[:, hvgs]),
        ("midnight_mlp", "midnight", args.midnight, args.weights_midnight, fit_mlp, test_expression),
    ):
        regressor = fit(evaluate.read_features(path, train_keys).embedding)
        real = evaluate.read_features(path, test_keys).embedding
        noise = load_encoder(encoder, args.impl, weights=weights, device="cpu").encode(tiles)["embedding"]
        shuffled = real[np.random.default_rng(args.seed).permutation(len(real))]
        scored = metrics.transcriptomic_fidelity(regressor, truth, real, {"fixed_shuffle": shuffled},
                                                 n_boot=args.n_boot, seed=args.seed, n_perm=args.n_boot,
                                                 controls={"noise_tiles": noise})
        true_by_k = {k: metrics._dense_columns(truth, regressor.gene_rank[:k]) for k in regressor.ks}
        predictions = regressor.predict_by_k(real)
        covered, aucs = 0, []
        for s in range(args.n_shuffles):
            order = np.random.default_rng(10_000 + s).permutation(len(real))
            permuted = {k: p[order] for k, p in predictions.items()}
            entry = metrics.fidelity_curve(permuted, true_by_k)
            entry.update(metrics.bootstrap_auc(permuted, true_by_k, n_boot=args.n_boot, seed=s))
            covered += entry["lo"] <= 0.0 <= entry["hi"]
            aucs.append(entry["auc"])
        null = scored["null"]["empirical"]
        results[name] = {
            "real": interval(scored["real"]), "noise_tiles": interval(scored["null"]["noise_tiles"]),
            "fixed_shuffle": interval(scored["generated"]["fixed_shuffle"]),
            "permutation_null": {**interval(null), "sd": round(null["sd"], 4)},
            "shuffles": {"n": args.n_shuffles, "mean_auc": round(float(np.mean(aucs)), 4),
                         "sd_auc": round(float(np.std(aucs)), 4), "ci_covers_0": covered},
        }
        print(f"{name}: " + "; ".join(f"{key} {value}" for key, value in results[name].items()))
    print(json.dumps(results))
    return results


# --------------------------------------------------------------------------------------------
# fid: the FID bootstrap against its floor, two Gram products per replicate
# --------------------------------------------------------------------------------------------


def _fid_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-spots", type=int, default=11_776, help="test spots (the paper's FID set: 11,776)")
    p.add_argument("--dim", type=int, default=768, help="feature width (H0-mini: 768)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (the floor: 2 Gram products each)")
    p.add_argument("--threads", type=int, default=2, help="BLAS threads of both timings")
    p.add_argument("--seed", type=int, default=42)


@benchmark("fid", _fid_arguments)
def bench_fid(args: argparse.Namespace) -> dict[str, Any]:
    """FID bootstrap time against its floor: 2 x n_boot Gram products X^T X (n_spots x dim, float64).

    Both are timed in this one run on random correlated features: the Gram products on --threads
    BLAS threads (half before the bootstrap, half after), the bootstrap with --threads replicates
    at once. The floor is what any exact method that recomputes two covariances per replicate
    pays; the bootstrap adds the per-replicate Frechet distance (Cholesky, a triangular product,
    symmetric eigenvalues)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from stmdit import metrics

    rng = np.random.default_rng(args.seed)
    mixing = rng.normal(size=(args.dim, args.dim)) / np.sqrt(args.dim)
    real = rng.normal(size=(args.n_spots, args.dim)) @ mixing
    gen = rng.normal(size=(args.n_spots, args.dim)) @ mixing + 0.1
    def gram_products(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            real.T @ real
        return time.perf_counter() - started

    with threadpool_limits(limits=args.threads):
        floor_s = gram_products(args.n_boot)  # half the floor before the bootstrap, half after:
        started = time.perf_counter()         # a machine whose load drifts weighs on both alike
        result = metrics.fid_bootstrap(real, gen, n_boot=args.n_boot, seed=args.seed, threads=args.threads)
        bootstrap_s = time.perf_counter() - started
        floor_s += gram_products(args.n_boot)
    results = {"benchmark": "fid", "n_spots": args.n_spots, "dim": args.dim, "n_boot": args.n_boot,
               "threads": args.threads, "floor_s": floor_s, "bootstrap_s": bootstrap_s,
               "ratio": round(bootstrap_s / floor_s, 3), "fid_mean": result["mean"], "lo": result["lo"],
               "hi": result["hi"]}
    print(f"floor ({2 * args.n_boot} Gram products of {args.n_spots} x {args.dim} float64): {floor_s:.2f} s; "
          f"FID bootstrap ({args.n_boot} replicates): {bootstrap_s:.2f} s; ratio {bootstrap_s / floor_s:.2f}")
    print(json.dumps(results))
    return results


# --------------------------------------------------------------------------------------------
# midnight-mlp: the Midnight+MLP fit, sklearn against torch, extrapolated to the paper's size
# --------------------------------------------------------------------------------------------


def _midnight_mlp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2000, help="train spots fitted here (a fraction of --paper-rows)")
    p.add_argument("--features", type=int, default=3072, help="feature width (Midnight: 3072)")
    p.add_argument("--genes", type=int, default=19_338, help="target genes (protein-coding: 19,338)")
    p.add_argument("--hidden", default="1024,1024")
    p.add_argument("--epochs", type=int, default=2, help="epochs fitted here (max_iter)")
    p.add_argument("--impls", default="sklearn,torch")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--density", type=float, default=0.2, help="fraction of non-zero targets")
    p.add_argument("--paper-rows", type=int, default=92_000)
    p.add_argument("--paper-epochs", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


@benchmark("midnight-mlp", _midnight_mlp_arguments)
def bench_midnight_mlp(args: argparse.Namespace) -> dict[str, Any]:
    """Midnight+MLP fit time per impl on --rows x --features -> --genes, scaled to the paper's size.

    Fits --epochs epochs on random features and sparse log-expression-like targets, and scales the
    measured time per epoch linearly in rows and epochs: seconds x (paper_rows / rows) x
    (paper_epochs / epochs). An epoch is a pass of 200-row mini-batches, so its cost is linear in
    rows; the fixed setup (densifying, scaling) is included, which makes the estimate a slight
    overestimate."""
    import warnings

    import numpy as np
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    from stmdit import evaluate, metrics

    rng = np.random.default_rng(args.seed)
    features = rng.normal(size=(args.rows, args.features)).astype(np.float32)
    target = sp.random(args.rows, args.genes, density=args.density, format="csr", dtype=np.float32, random_state=rng)
    target.data = np.log1p(target.data * 20).astype(np.float32)
    hidden = evaluate.parse_int_list(args.hidden, "--hidden")
    scale = (args.paper_rows / args.rows) * (args.paper_epochs / args.epochs)
    results: dict[str, Any] = {"benchmark": "midnight-mlp", "rows": args.rows, "features": args.features,
                               "genes": args.genes, "hidden": list(hidden), "epochs": args.epochs,
                               "paper_rows": args.paper_rows, "paper_epochs": args.paper_epochs}
    with threadpool_limits(limits=args.threads):
        for impl in args.impls.split(","):
            if impl == "torch":
                import torch

                torch.set_num_threads(args.threads)
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ConvergenceWarning: a few epochs on purpose
                metrics.fit_midnight_mlp(features, target, hidden_layer_sizes=hidden, max_iter=args.epochs,
                                         seed=args.seed, impl=impl, device=args.device)
            seconds = time.perf_counter() - started
            results[impl] = {"fit_s": seconds, "per_epoch_s": seconds / args.epochs,
                             "paper_estimate_h": seconds * scale / 3600,
                             "device": args.device if impl == "torch" else "cpu"}
            print(f"{impl}: {seconds:.1f} s for {args.epochs} epochs of {args.rows} x {args.features} -> {args.genes}; "
                  f"estimated {seconds * scale / 3600:.2f} h for {args.paper_epochs} epochs of {args.paper_rows} rows")
    print(json.dumps(results))
    return results


# --------------------------------------------------------------------------------------------
# mlp-auc: Midnight+MLP fits of each impl scored on the same real test tiles
# --------------------------------------------------------------------------------------------


def _mlp_auc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expression", required=True, type=Path, help="cohort h5ad (layers['counts'])")
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--midnight", required=True, type=Path, help="Midnight features of the real tiles")
    p.add_argument("--fitted", required=True, nargs="+", metavar="IMPL=JOBLIB",
                   help="Midnight+MLP fits (stmdit eval-regressor --mlp-impl IMPL); the first is the reference")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over test spots")
    p.add_argument("--seed", type=int, default=42)


@benchmark("mlp-auc", _mlp_auc_arguments)
def bench_mlp_auc(args: argparse.Namespace) -> dict[str, Any]:
    """Midnight+MLP fits of different impls (sklearn, torch) scored as `stmdit auc` scores them on the
    cohort's real test tiles: each AUC with its bootstrap interval (the same resamples for every fit),
    its fit time, and whether it lies within the first fit's interval."""
    from stmdit import evaluate, metrics, split_table
    from stmdit.cli import parse_named_paths
    from stmdit.errors import InputError

    fitted = parse_named_paths(args.fitted, "--fitted", metrics.MLP_IMPLS)
    test_keys = split_table.split_keys(args.split, split_table.TEST)
    results: dict[str, Any] = {"benchmark": "mlp-auc", "n_test": len(test_keys), "n_boot": args.n_boot,
                               "seed": args.seed, "fits": {}}
    reference = None
    for impl, path in fitted.items():
        payload = evaluate.load_regressor(path, "midnight_mlp")
        if payload["provenance"]["params"]["impl"] != impl:
            raise InputError(path, f"fitted with impl {payload['provenance']['params']['impl']!r}, given as {impl!r}")
        truth = evaluate.read_scored_truth(args.expression, test_keys, payload)
        real = evaluate.score_regressor(payload["regressor"], args.midnight, test_keys, {}, truth, args.n_boot,
                                        args.seed, n_perm=args.n_boot)["real"]
        entry = {"auc": round(real["auc"], 4), "lo": round(real["lo"], 4), "hi": round(real["hi"], 4),
                 "fit_s": round(payload["fit_seconds"], 2), "params": payload["provenance"]["params"]}
        if reference is None:
            reference = entry
        else:
            entry["within_reference_interval"] = bool(reference["lo"] <= entry["auc"] <= reference["hi"])
        results["fits"][impl] = entry
        inside = "" if entry is reference else (f"; within {next(iter(fitted))}'s interval: "
                                               f"{entry['within_reference_interval']}")
        print(f"{impl}: AUC {entry['auc']:.4f} [{entry['lo']:.4f}, {entry['hi']:.4f}], fit {entry['fit_s']:.2f} s{inside}")
    print(json.dumps(results))
    return results


# --------------------------------------------------------------------------------------------
# sample: solvers against network evaluations (analytic error, tiles/s, FID), fused guidance
# --------------------------------------------------------------------------------------------


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, default=None, help="trained model folder (timing and FID rows)")
    p.add_argument("--split", type=Path, default=None, help="split table of the model's cohort")
    p.add_argument("--split-name", default="test")
    p.add_argument("--uni", type=Path, default=None, help="uni2h feature store")
    p.add_argument("--ge", type=Path, default=None, help="cancerfoundation feature store (GE models)")
    p.add_argument("--regime", default="uni_ge")
    p.add_argument("--steps", default="10,20,50", help="comma-separated step counts")
    p.add_argument("--solvers", default=None, help="comma-separated (default: every solver of the objective)")
    p.add_argument("--s-uni", type=float, default=PAPER_S_UNI)
    p.add_argument("--s-ge", type=float, default=PAPER_S_GE)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--spots", type=int, default=8, help="spots of the timed batch")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the fused-guidance timing")
    p.add_argument("--fid-h0mini", type=Path, default=None,
                   help="H0-mini features of the real tiles: FID of every solver/steps row on the split's spots")
    p.add_argument("--fid-spots", type=int, default=None, help="seeded subsample of the split for FID")
    p.add_argument("--fid-n-boot", type=int, default=0,
                   help="spot-bootstrap replicates of each FID (as the eval stage: mean and 95%% interval); 0: point only")
    p.add_argument("--vae-impl", choices=("smoke", "real"), default="smoke")
    p.add_argument("--vae-weights", default=None)
    p.add_argument("--h0mini-impl", choices=("smoke", "real"), default="smoke")
    p.add_argument("--h0mini-weights", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")


def analytic_solver_error(objective: str, solver: str, steps: int, regime: str = "uni_ge",
                          s_uni: float = PAPER_S_UNI, s_ge: float = PAPER_S_GE, conditions: int = 3, draws: int = 4) -> dict[str, float]:
    """Largest error of the sampled mean and std (the covariance is diagonal) against the exact
    answer, in data-std units, on `stmdit.model.analytic`'s Gaussian model (std 0.25..1 per element,
    as tests/test_sampler_exact.py measures it): the sampler is affine in its noise per element, so
    `draws` noise draws per condition give its output mean and std exactly."""
    import torch

    from stmdit.loader import GeBatch
    from stmdit.model.analytic import GaussianConfig, GaussianDenoiser, elementwise_affine_fit
    from stmdit.sampling import SamplerSettings, initial_noise, sample_latents

    model = GaussianDenoiser(GaussianConfig(objective=objective, std_range=(0.25, 1.0)))
    generator = torch.Generator().manual_seed(1)
    uni = torch.randn(conditions, model.config.uni_dim, generator=generator)
    ge = GeBatch(torch.randn(conditions, model.config.ge_dim, generator=generator))
    keys = [f"cond{c}:draw{d}" for c in range(conditions) for d in range(draws)]
    settings = SamplerSettings(regime=regime, steps=steps, s_uni=s_uni, s_ge=s_ge, solver=solver)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors of a few KiB: more threads only wait on each other (10-100x slower when loaded)
    try:
        samples = sample_latents(model, objective, keys, uni.repeat_interleave(draws, 0),
                                 GeBatch(ge.cls.repeat_interleave(draws, 0)), settings)
    finally:
        torch.set_num_threads(threads)
    noise = initial_noise(keys, settings.seed, model.config.latent_shape)
    limit_mean, limit_std = model.sampler_limit(model.regime_mean(uni, ge, regime, s_uni, s_ge))
    mean_error = std_error = 0.0
    for c in range(conditions):
        rows = slice(c * draws, (c + 1) * draws)
        slope, offset, _ = elementwise_affine_fit(noise[rows], samples[rows])
        mean_error = max(mean_error, ((offset - limit_mean[c]) / model.std).abs().max().item())
        std_error = max(std_error, ((slope - limit_std[c]) / model.std).abs().max().item())
    return {"mean_error": mean_error, "std_error": std_error}


def mean_seconds(run, repeats: int, device) -> float:
    """Mean wall time of `run()` over `repeats` calls after one warm-up call."""
    import torch

    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def time_fused_guidance(model, x, t, uni, ge, conditions, repeats: int) -> dict[str, float]:
    """Seconds of one forward over len(conditions) x B rows against len(conditions) forwards of B rows."""
    import torch

    from stmdit.model import guidance

    with torch.inference_mode():
        fused = mean_seconds(lambda: guidance.batched_predictions(model, x, t, uni, ge, list(conditions)),
                             repeats, x.device)
        separate = mean_seconds(lambda: [guidance.batched_predictions(model, x, t, uni, ge, [c]) for c in conditions],
                                repeats, x.device)
    return {"fused_s": fused, "separate_s": separate, "separate_over_fused": separate / fused}


def time_condition_cache(model, x, t, uni, ge, regime: str, s_uni: float, s_ge: float,
                         repeats: int) -> dict[str, float]:
    """Seconds of one guided step that reuses the conditions' encoding (every step after a batch's
    first) against one that recomputes it."""
    import torch

    from stmdit.model import guidance

    cache = guidance.ConditionCache()
    with torch.inference_mode():
        cached = mean_seconds(lambda: guidance.guided_prediction(model, x, t, uni, ge, regime, s_uni, s_ge,
                                                                 cache=cache), repeats, x.device)
        fresh = mean_seconds(lambda: guidance.guided_prediction(model, x, t, uni, ge, regime, s_uni, s_ge),
                             repeats, x.device)
    return {"cached_s": cached, "uncached_s": fresh, "uncached_over_cached": fresh / cached}


@benchmark("sample", _sample_arguments)
def bench_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Solvers against network evaluations: analytic error, tiles/s, FID; fused vs separate guidance;
    the conditions' encoding reused across steps vs recomputed.

    Per solver and step count: guided-predictor calls per tile (each one batched forward over the
    regime's conditionings) and forward rows per tile; on the analytic Gaussian model (always) the
    error of the sampled mean and std against the exact distribution; with --model-dir, tiles/s of
    the latents of --spots spots (sampling only, no decoding) and, with --fid-h0mini, the FID of the
    decoded, H0-mini-encoded samples of the split's spots against the real tiles' features."""
    import numpy as np
    import torch

    from stmdit import solvers
    from stmdit.errors import InputError
    from stmdit.model import regime_spec
    from stmdit.models_config import OBJECTIVE_SOLVERS
    from stmdit.sampling import CodecSettings, SamplerSettings, SamplingSession, SessionSettings, regime_uses_ge

    steps_list = [int(v) for v in args.steps.split(",") if v.strip()]
    session = trained = device = None
    if args.model_dir is not None:
        if args.split is None or args.uni is None:
            raise InputError(None, "--model-dir needs --split and --uni (and --ge for GE regimes)")
        session = SamplingSession(SessionSettings(
            model_dir=args.model_dir, device=args.device,
            sampler=SamplerSettings(regime=args.regime, seed=args.seed, s_uni=args.s_uni, s_ge=args.s_ge,
                                    batch_size=args.batch_size, bf16=False),  # solvers compared in float32
            codec=CodecSettings(impl=args.vae_impl, weights=args.vae_weights)))
        trained, device = session.trained, session.device
        if regime_uses_ge(args.regime) and args.ge is None:
            raise InputError(None, f"regime {args.regime} needs --ge")
    objectives = [trained.objective] if trained else list(OBJECTIVE_SOLVERS)
    conditionings = len(regime_spec(args.regime).conditions)
    result: dict[str, Any] = {"benchmark": "sample", "model": str(args.model_dir) if trained else None,
                              "regime": args.regime, "s_uni": args.s_uni, "s_ge": args.s_ge, "rows": []}

    timing = fid_inputs = None
    if trained is not None:
        from stmdit.evaluate import load_eval_encoder, read_features
        from stmdit.metrics import subsample_keys
        from stmdit import split_table

        keys = split_table.split_keys(args.split, args.split_name)
        timed = session.store_conditions(keys[:args.spots], args.uni, args.ge)
        timing = (timed.noise_keys, *timed.batch(np.arange(len(timed))))
        if args.fid_h0mini is not None:
            fid_keys = subsample_keys(keys, args.fid_spots, args.seed) if args.fid_spots else keys
            real = read_features(args.fid_h0mini, fid_keys).embedding
            codec = session.open_codec()
            encoder, _ = load_eval_encoder("h0mini", args.h0mini_impl, weights=args.h0mini_weights, device=str(device))
            fid_inputs = (session.store_conditions(fid_keys, args.uni, args.ge), real, codec, encoder)
        uni, ge = timing[1].to(device), (None if timing[2] is None else timing[2].to(device))
        x = torch.randn(len(uni), trained.config.in_channels, trained.config.latent_size, trained.config.latent_size,
                        generator=torch.Generator().manual_seed(0)).to(device)
        result["fused_guidance"] = time_fused_guidance(trained.model, x, torch.tensor(500.0, device=device), uni, ge,
                                                       regime_spec(args.regime).conditions, args.repeats)
        result["fused_guidance"]["rows"] = len(uni)
        result["condition_cache"] = time_condition_cache(trained.model, x, torch.tensor(500.0, device=device), uni,
                                                         ge, args.regime, args.s_uni, args.s_ge, args.repeats)
        result["condition_cache"]["rows"] = len(uni)

    for objective in objectives:
        names = args.solvers.split(",") if args.solvers else OBJECTIVE_SOLVERS[objective]
        for solver in names:
            solvers.check_solver(objective, solver)
            for steps in steps_list:
                calls = solvers.predictor_calls(solver, steps)
                row = {"objective": objective, "solver": solver, "name": solvers.solver_name(objective, solver),
                       "steps": steps, "predictor_calls_per_tile": calls,
                       "forward_rows_per_tile": calls * conditionings,
                       **analytic_solver_error(objective, solver, steps, args.regime, args.s_uni, args.s_ge)}
                settings = SamplerSettings(regime=args.regime, steps=steps, seed=args.seed, s_uni=args.s_uni,
                                           s_ge=args.s_ge, batch_size=args.batch_size, solver=solver, bf16=False)
                if timing is not None:
                    session.sample_latents(timing[0], timing[1], timing[2],
                                           SamplerSettings(regime=args.regime, steps=1, solver=solver, bf16=False))  # warm-up
                    started = time.perf_counter()
                    session.sample_latents(*timing, settings)
                    row["tiles_per_s"] = len(timing[0]) / (time.perf_counter() - started)
                if fid_inputs is not None:
                    row.update(sampled_fid(session, *fid_inputs, settings, args.fid_n_boot))
                result["rows"].append(row)
    print_sample_table(result)
    print(json.dumps(result))
    return result


def sampled_fid(session, conditions, real, codec, encoder, settings, n_boot: int) -> dict[str, Any]:
    """FID of the spots' tiles sampled with `settings`, decoded and H0-mini-encoded, against their real
    tiles' features; with n_boot, the eval stage's spot-bootstrap mean and 95% interval too."""
    import numpy as np

    from stmdit.metrics import fid, fid_bootstrap

    features = []
    for start in range(0, len(conditions), settings.batch_size):
        positions = np.arange(start, min(start + settings.batch_size, len(conditions)))
        latents = session.sample_latents([conditions.noise_keys[p] for p in positions], *conditions.batch(positions),
                                         settings)
        features.append(encoder.encode(codec.decode(latents))["embedding"])
    generated = np.concatenate(features)
    out: dict[str, Any] = {"fid": fid(real, generated), "fid_spots": len(conditions)}
    if n_boot > 0:
        boot = fid_bootstrap(real, generated, n_boot=n_boot, seed=settings.seed)
        out["fid_boot"] = {k: boot[k] for k in ("mean", "lo", "hi", "n_boot")}
    return out


def print_sample_table(result: dict[str, Any]) -> None:
    print(f"sample bench: regime {result['regime']}, s_uni {result['s_uni']}, s_ge {result['s_ge']}"
          + (f", model {result['model']}" if result["model"] else ", analytic model only"))
    print("  analytic: largest error of the sampled mean / std against the exact distribution, in data-std units")
    header = f"  {'objective':<9} {'solver':<9} {'steps':>5} {'calls/tile':>10} {'rows/tile':>9} {'tiles/s':>8} " \
             f"{'mean err':>9} {'std err':>9} {'FID':>8}"
    print(header)
    for row in result["rows"]:
        tiles = f"{row['tiles_per_s']:.2f}" if "tiles_per_s" in row else "-"
        fid_text = f"{row['fid']:.2f}" if "fid" in row else "-"
        if "fid_boot" in row:
            fid_text += f" (mean {row['fid_boot']['mean']:.1f} [{row['fid_boot']['lo']:.1f}, {row['fid_boot']['hi']:.1f}])"
        print(f"  {row['objective']:<9} {row['name']:<9} {row['steps']:>5} {row['predictor_calls_per_tile']:>10} "
              f"{row['forward_rows_per_tile']:>9} {tiles:>8} {row['mean_error']:>9.2e} {row['std_error']:>9.2e} "
              f"{fid_text:>8}")
    fused = result.get("fused_guidance")
    if fused:
        print(f"  guidance of {fused['rows']} spots: one forward of all conditionings {fused['fused_s'] * 1e3:.1f} ms, "
              f"one forward per conditioning {fused['separate_s'] * 1e3:.1f} ms: separate / fused "
              f"{fused['separate_over_fused']:.2f}")
    cache = result.get("condition_cache")
    if cache:
        print(f"  guided step of {cache['rows']} spots reusing the conditions' encoding {cache['cached_s'] * 1e3:.1f} ms, "
              f"recomputing it {cache['uncached_s'] * 1e3:.1f} ms: recomputed / reused {cache['uncached_over_cached']:.2f}")


# --------------------------------------------------------------------------------------------
# deepspot: peak RSS of deepspot-train and deepspot-predict at two cohort sizes
# --------------------------------------------------------------------------------------------


def _deepspot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spots", type=int, nargs="+", default=[2000, 5000, 20000],
                   help="cohort sizes (spots), one run each; the slope comes from the two largest")
    p.add_argument("--genes", type=int, default=19000, help="target genes (all protein-coding)")
    p.add_argument("--nonzeros", type=int, default=4000, help="detected genes per spot (mean)")
    p.add_argument("--dim", type=int, default=32, help="feature width of the synthetic deepspot_fm store")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--n-ensemble", type=int, default=2)
    p.add_argument("--hidden-dim", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch / BLAS threads of each job")
    p.add_argument("--baselines", action="store_true", help="let the RidgeCV / MLP baselines run where they fit")
    p.add_argument("--keep", type=Path, default=None, help="write the cohorts and outputs here (default: a temp dir)")


def _synthetic_deepspot_cohort(root: Path, n_spots: int, n_genes: int, nonzeros: int, dim: int, seed: int = 0) -> dict:
    """A Visium-like cohort in the files DeepSpot reads: 3 donors of 2 slides each on a hex grid,
    CSR counts with about `nonzeros` detected genes per spot, a deepspot_fm store, a split."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from stmdit.features import write_feature_store
    from stmdit.provenance import provenance, write_parquet
    from stmdit.split import assign_splits

    rng = np.random.default_rng(seed)
    samples = [(f"s{k}", f"donor_{'ABC'[k // 2]}") for k in range(6)]
    per_slide = -(-n_spots // len(samples))
    side = int(np.ceil(np.sqrt(per_slide)))
    tables, spots_paths = [], []
    for k, (sample, donor) in enumerate(samples):
        n = min(per_slide, n_spots - k * per_slide)
        rows, cols = np.divmod(np.arange(n), side)
        barcodes = [f"{sample}-{i:06d}" for i in range(n)]
        table = pd.DataFrame({
            "key": [f"{sample}:{b}" for b in barcodes], "sample": sample, "donor": donor, "cohort": "bench",
            "barcode": barcodes, "array_row": rows, "array_col": 2 * cols + rows % 2,
            "pxl_row": rows * 100.0, "pxl_col": cols * 100.0, "label": "", "keep": True, "reason": ""})
        path = root / "spots" / f"{sample}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet(table, path, provenance("bench", {}, []))
        tables.append(table)
        spots_paths.append(path)
    spots = pd.concat(tables, ignore_index=True)
    blocks = []
    for start in range(0, n_spots, 1000):
        b = min(1000, n_spots - start)
        mask = rng.random((b, n_genes), dtype=np.float32) < nonzeros / n_genes
        block = sp.csr_matrix(mask.astype(np.float32))
        block.data = (1 + rng.poisson(2.0, size=block.nnz)).astype(np.float32)
        blocks.append(block)
    counts = sp.vstack(blocks, format="csr")
    genes = [f"GENE{i:05d}" for i in range(n_genes)]
    adata = ad.AnnData(obs=pd.DataFrame({"sample": spots["sample"].to_numpy(), "donor": spots["donor"].to_numpy()},
                                        index=spots["key"].to_numpy()),
                       var=pd.DataFrame({"highly_variable": np.arange(n_genes) < 3000,
                                         "highly_variable_rank": np.where(np.arange(n_genes) < 3000,
                                                                          np.arange(n_genes), np.nan),
                                         "protein_coding": True}, index=genes),
                       layers={"counts": counts})
    adata.uns["gene_sets"] = {"protein_coding": {"source": "bench", "version": "0"}}
    expression = root / "expression.h5ad"
    adata.write_h5ad(expression)
    del adata, counts, blocks
    store = root / "deepspot_fm.zarr"
    keys = spots["key"].tolist()
    batches = ({"embedding": rng.standard_normal((min(4096, n_spots - i), dim), dtype=np.float32),
                "subtiles": rng.standard_normal((min(4096, n_spots - i), 9, dim), dtype=np.float32)}
               for i in range(0, n_spots, 4096))
    write_feature_store(store, keys, batches, {"embedding": (dim,), "subtiles": (9, dim)},
                        {"encoder": {"name": "deepspot_fm", "impl": "smoke", "model": "bench"}})
    split = root / "split.parquet"
    write_parquet(assign_splits(spots, ["donor_C"], 0.1, seed=42), split, provenance("bench", {}, []))
    return {"expression": expression, "features": store, "spots": spots_paths, "split": split}


# Runs one command and writes its peak RSS (KiB) and exit code to argv[1]. A process forked from a
# large parent starts with the parent's RSS as its high-water mark (Linux keeps it across exec), so
# the bench, which has imported torch and written the cohort, forks this small interpreter, which
# forks the job: the job's rusage is then its own.
_RSS_HELPER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def _peak_rss_of(command: list[str], env: dict[str, str], log_path: Path) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of one command, from its own rusage (`os.wait4` in a small helper)."""
    import subprocess
    import sys

    report = log_path.with_suffix(".rss")
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        subprocess.run([sys.executable, "-S", "-c", _RSS_HELPER, str(report), *command], env=env, stdout=log_file,
                       stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - started
    max_rss_kib, code = (int(v) for v in report.read_text().split())
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed: see {log_path}\n" + log_path.read_text()[-2000:])
    return max_rss_kib * 1024.0, seconds


@benchmark("deepspot", _deepspot_arguments)
def bench_deepspot(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of deepspot-train and deepspot-predict on synthetic sparse cohorts of several sizes.

    Each job runs in its own process (peak RSS from its rusage, exact, not polled); the cohorts are
    written first (not measured). Bytes per spot above the fixed base = the RSS difference over the
    spot difference of the two largest sizes (below ~3,000 spots a model's prediction batches are not
    full yet, which lowers the peak); the projection to 115,000 spots assumes that slope holds."""
    import os
    import sys

    sizes = sorted(set(args.spots))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "PYTHONPATH": os.pathsep.join(
               [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    rows = []
    with tempfile.TemporaryDirectory(prefix="stmdit-bench-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for n in sizes:
            root = base / f"deepspot_{n}"
            started = time.perf_counter()
            cohort = _synthetic_deepspot_cohort(root, n, args.genes, args.nonzeros, args.dim)
            write_s = time.perf_counter() - started
            model, lodo, ptpl = root / "model", root / "lodo.json", root / "ptpl.h5ad"
            train = [sys.executable, "-m", "stmdit", "deepspot-train", "--expression", str(cohort["expression"]),
                     "--features", str(cohort["features"]), "--spots", *map(str, cohort["spots"]),
                     "--split", str(cohort["split"]), "--out-model", str(model), "--out-lodo", str(lodo),
                     "--epochs", str(args.epochs), "--n-ensemble", str(args.n_ensemble),
                     "--hidden-dim", str(args.hidden_dim), "--device", "cpu",
                     *([] if args.baselines else ["--no-baselines"])]
            predict = [sys.executable, "-m", "stmdit", "deepspot-predict", "--model", str(model), "--features",
                       str(cohort["features"]), "--spots", *map(str, cohort["spots"]), "--out", str(ptpl),
                       "--device", "cpu"]
            train_rss, train_s = _peak_rss_of(train, env, root / "train.log")
            predict_rss, predict_s = _peak_rss_of(predict, env, root / "predict.log")
            rows.append({"spots": n, "write_s": round(write_s, 1), "train_rss_gb": round(train_rss / 1e9, 3),
                         "train_s": round(train_s, 1), "predict_rss_gb": round(predict_rss / 1e9, 3),
                         "predict_s": round(predict_s, 1), "ptpl_bytes": ptpl.stat().st_size})
    result = {"benchmark": "deepspot", "genes": args.genes, "nonzeros_per_spot": args.nonzeros, "dim": args.dim,
              "epochs": args.epochs, "n_ensemble": args.n_ensemble, "threads": args.threads, "rows": rows}
    print(f"deepspot bench: {args.genes} genes, ~{args.nonzeros} non-zeros per spot, {args.dim}-d features, "
          f"{args.epochs} epoch(s), ensemble {args.n_ensemble}, {args.threads} thread(s)")
    print(f"  {'spots':>7} {'train GB':>9} {'train s':>8} {'predict GB':>11} {'predict s':>10} {'h5ad MB':>8}")
    for row in rows:
        print(f"  {row['spots']:>7} {row['train_rss_gb']:>9.3f} {row['train_s']:>8.1f} {row['predict_rss_gb']:>11.3f} "
              f"{row['predict_s']:>10.1f} {row['ptpl_bytes'] / 1e6:>8.1f}")
    if len(rows) >= 2:
        small, large = rows[-2], rows[-1]  # the two largest: batch-sized buffers are full at both
        spots = large["spots"] - small["spots"]
        for job in ("train", "predict"):
            slope = (large[f"{job}_rss_gb"] - small[f"{job}_rss_gb"]) * 1e9 / spots
            base_gb = small[f"{job}_rss_gb"] - slope * small["spots"] / 1e9
            result[f"{job}_bytes_per_spot"] = round(slope)
            result[f"{job}_base_gb"] = round(base_gb, 3)
            result[f"{job}_projected_gb_115k"] = round(base_gb + slope * 115_000 / 1e9, 2)
            print(f"  {job}: {slope:,.0f} bytes per spot above a base of {base_gb:.2f} GB; "
                  f"115,000 spots -> {result[f'{job}_projected_gb_115k']:.2f} GB")
    print(json.dumps(result))
    return result


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    BENCHMARKS[args.benchmark](args)


def register(subparsers: argparse._SubParsersAction) -> None:
    import stmdit.bench_loader  # noqa: F401  (registers `loader`; its own module, it imports this one)
    import stmdit.bench_scale  # noqa: F401  (registers `scale`; its own module, it imports this one)

    p = subparsers.add_parser("bench", help="time a pipeline stage (see `stmdit bench <name> -h`)")
    names = p.add_subparsers(dest="benchmark", required=True, metavar="<name>")
    for name, function in BENCHMARKS.items():
        doc = (function.__doc__ or name).strip().splitlines()[0]
        BENCHMARK_ARGUMENTS[name](names.add_parser(name, help=doc, description=doc))
    p.set_defaults(func=run)
