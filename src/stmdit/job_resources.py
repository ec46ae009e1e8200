"""Memory and time of every pipeline job, computed from the sizes of its inputs.

Every rule asks the cluster for `mem_mb` and `runtime` (minutes) through `mem_mb(rule)` and
`runtime(rule)`, which return the callables Snakemake evaluates per job (`workflow/rules/common.smk`
wires them). A job's size is read cheaply from its input files' headers, never from their data:

| measure       | read from                                                                  |
|---------------|----------------------------------------------------------------------------|
| `spots`       | the largest spot count among the inputs, each summed over its files (a cohort's slides): |
|               | rows of parquet files (footer), `n_obs` of an h5ad, rows of Zarr stores, 10x barcodes |
| `nnz`         | stored counts: `layers/counts` (else `X`) of an h5ad, `matrix/data` of 10x matrices |
| `gigapixels`  | pixels of slide images, from the TIFF/SVS header (tifffile, else OpenSlide, else Pillow) |
| `loaded_mb`   | uncompressed MB of the arrays of the inputs a job loads whole (`Formula.loads`): every |
|               | Zarr array but `images` (tiles are streamed in batches), from its `zarr.json`/`.zarray` |
| `dense_mb`    | spots x genes x 4 bytes: a float32 matrix of the largest h5ad (the one dense fit)   |

Each quantity is `base + sum(coefficient x measure)`, one row per rule in `FORMULAS`, times the
job's `attempt` (a retry after running out of memory or time asks for twice, then three times as
much), except for rules listed in `FIXED_ON_RETRY` (`train`, whose retries resume a run stopped at
its wall-clock budget). The coefficients target the bounded behaviour of issue 16 (at most 8 GB per
job at the paper's 115,000 spots x 20,000 genes, the Midnight+MLP fit at most 16 GB, `spots` at
most 2 GB for any slide) and are calibrated against the peak RSS measured there; they live in this
one table so that `stmdit bench scale` figures can retune them. `stmdit resources` prints it.

Snakemake evaluates these callables when it plans (inputs of later jobs may not exist yet: the
value is then `<TBD>`, as with `input.size_mb`) and again, with all inputs present, right before a
job is submitted, and after every failed attempt.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".scn", ".mrxs", ".vms", ".bif", ".png", ".jpg", ".jpeg")
STREAMED_ARRAYS = ("images",)  # Zarr arrays every reader streams in batches


@dataclass(frozen=True)
class InputSizes:
    """What decides a job's cost (see the module docstring)."""

    spots: int = 0
    nnz: int = 0
    gigapixels: float = 0.0
    loaded_mb: float = 0.0
    dense_mb: float = 0.0


@dataclass(frozen=True)
class Cost:
    """`base + per_kspot x spots/1e3 + per_mnnz x nnz/1e6 + per_gigapixel x gigapixels
    + per_loaded_mb x loaded_mb + per_dense_mb x dense_mb` (MB for memory, minutes for time)."""

    base: float
    per_kspot: float = 0.0
    per_mnnz: float = 0.0
    per_gigapixel: float = 0.0
    per_loaded_mb: float = 0.0
    per_dense_mb: float = 0.0

    def __call__(self, sizes: InputSizes) -> float:
        return (self.base + self.per_kspot * sizes.spots / 1e3 + self.per_mnnz * sizes.nnz / 1e6
                + self.per_gigapixel * sizes.gigapixels + self.per_loaded_mb * sizes.loaded_mb
                + self.per_dense_mb * sizes.dense_mb)

    def describe(self, unit: str) -> str:
        terms = [f"{self.base:g} {unit}"]
        for name, label in (("per_kspot", "1k spots"), ("per_mnnz", "1M nnz"), ("per_gigapixel", "gigapixel"),
                            ("per_loaded_mb", "loaded MB"), ("per_dense_mb", "dense MB")):
            value = getattr(self, name)
            if value:
                terms.append(f"{value:g}/{label}")
        return " + ".join(terms)


@dataclass(frozen=True)
class Formula:
    mem_mb: Cost
    runtime: Cost
    loads: tuple[str, ...] = ()  # named inputs loaded whole (their arrays count in `loaded_mb`)
    note: str = ""


_FEATURES = ("real", "generated", "deepspot", "visium")
_AUC_STORES = ("real_uni", "real_midnight", "noise_uni", "noise_midnight", "gen_uni", "gen_midnight")

# One row per rule, calibrated on `stmdit bench scale --sizes 5000,50000` (its last two columns: each
# rule's peak RSS and wall time over what these formulas asked, at 37,630 spots x 20,000 genes,
# ~150 M counts): every peak within its request. Paper scale: 115,000 spots, ~460 M counts.
FORMULAS: dict[str, Formula] = {
    "spots": Formula(Cost(1536, per_kspot=0.5, per_gigapixel=20), Cost(5, per_kspot=0.1, per_gigapixel=2),
                     note="reads its slide in blocks: at most 2 GB for any slide"),
    "expression": Formula(Cost(1000, per_mnnz=12), Cost(5, per_mnnz=0.02),
                          note="sparse counts, a CSR copy and the normalised layer"),
    "split": Formula(Cost(500, per_kspot=2), Cost(5, per_kspot=0.01)),
    "features_image": Formula(Cost(3000, per_kspot=8), Cost(10, per_kspot=0.67),
                              note="encoder weights + one batch; ~25 spots/s"),
    "features_cancerfoundation": Formula(Cost(3000, per_kspot=10, per_mnnz=2), Cost(10, per_kspot=1),
                                         note="counts read in row blocks"),
    "features_cancerfoundation_ptpl": Formula(Cost(3000, per_kspot=10, per_mnnz=2), Cost(10, per_kspot=1)),
    "deepspot_train": Formula(Cost(3000, per_loaded_mb=1, per_mnnz=5), Cost(30, per_kspot=2),
                              loads=("features",),
                              note="features whole, sparse targets read in gene blocks, running sums"),
    "deepspot_predict": Formula(Cost(2500, per_loaded_mb=1, per_kspot=16), Cost(10, per_kspot=0.2),
                                loads=("features",), note="predictions written in chunks"),
    "train": Formula(Cost(6000, per_loaded_mb=1), Cost(24 * 60), loads=("uni",),
                     note="runtime is one job's wall-clock budget; retries resume, they do not grow it"),
    "tiles": Formula(Cost(5000, per_kspot=2), Cost(10, per_kspot=0.5), note="DiT + VAE weights, one batch"),
    "perturbed_tiles": Formula(Cost(5000, per_kspot=2, per_mnnz=4), Cost(10, per_kspot=0.5)),
    "tile_grid": Formula(Cost(3000, per_kspot=0.5), Cost(5, per_kspot=0.05), note="decodes a few latents"),
    "eval_features": Formula(Cost(3000, per_kspot=8), Cost(10, per_kspot=0.67)),
    "noise_features": Formula(Cost(3000, per_kspot=8), Cost(10, per_kspot=0.67)),
    "fid": Formula(Cost(2000, per_loaded_mb=2, per_kspot=1), Cost(10, per_kspot=1), loads=_FEATURES,
                   note="bootstrap over the test spots: two covariances per replicate"),
    "ood_fid": Formula(Cost(2000, per_loaded_mb=2, per_kspot=1), Cost(10, per_kspot=1), loads=_FEATURES),
    "swap_fid": Formula(Cost(2000, per_loaded_mb=2, per_kspot=1), Cost(10, per_kspot=1), loads=_FEATURES),
    "layout": Formula(Cost(3000, per_kspot=1), Cost(10, per_kspot=0.2)),
    "palette": Formula(Cost(3000, per_kspot=1), Cost(10, per_kspot=0.2), note="reads every tile once, 256 at a time"),
    "texture": Formula(Cost(3000, per_kspot=1), Cost(10, per_kspot=0.5),
                       note="reads every tile once and decodes the real latents, 256 at a time"),
    "auc": Formula(Cost(3000, per_loaded_mb=1, per_mnnz=2), Cost(20, per_kspot=0.5), loads=_AUC_STORES,
                   note="predicts only (the regressors are fit once per cohort); test-split targets, "
                        "top-k columns dense"),
    # The regressors, fit once per training cohort (rule eval_regressor, one job each). The Oracle:
    # PCA of the real UNI2-h features, then a Ridge per k on the top-k HVGs (dense float64 columns).
    # The Midnight+MLP: the one job allowed dense float32 targets (at most 16 GB at 115,000 x 20,000).
    "eval_regressor_oracle": Formula(Cost(2000, per_loaded_mb=2, per_kspot=25), Cost(20, per_kspot=0.5),
                                     loads=("features",), note="PCA 256 + Ridge per k on the top-k columns"),
    "eval_regressor_midnight_mlp": Formula(Cost(2000, per_dense_mb=1.2, per_loaded_mb=1), Cost(60, per_kspot=8),
                                           loads=("features",),
                                           note="sklearn MLP on dense float32 targets: 7-15 h at the paper's scale"),
    "perturbation": Formula(Cost(2000, per_loaded_mb=2, per_kspot=1), Cost(10, per_kspot=0.1),
                            loads=("features", "real")),
    "figure_matched_spots": Formula(Cost(2000, per_kspot=2, per_mnnz=4), Cost(10, per_kspot=0.05)),
    "virtual_tiles": Formula(Cost(5000, per_kspot=2, per_mnnz=4), Cost(10, per_kspot=0.5)),
    "virtual_report": Formula(Cost(3000, per_kspot=2), Cost(10, per_kspot=0.2)),
}
# Jobs that read only small JSON/CSV files, or make the demo: their size does not grow with the data.
SMALL_JOB = Formula(Cost(2000), Cost(10))
FIXED_ON_RETRY = frozenset({"train"})


def formula(rule: str) -> Formula:
    return FORMULAS.get(rule, SMALL_JOB)


# ---------------------------------------------------------------------------------------------
# Probes: headers only


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _h5_shape(group) -> tuple[int, ...] | None:
    if hasattr(group, "shape"):  # a dense dataset
        return tuple(group.shape)
    shape = group.attrs.get("shape")
    return tuple(int(v) for v in shape) if shape is not None else None


def _h5_nnz(group) -> int:
    if hasattr(group, "shape"):
        return int(math.prod(group.shape))
    return int(group["data"].shape[0]) if "data" in group else 0


def _h5ad_sizes(path: Path) -> tuple[int, int, int]:
    """(spots, genes, stored counts) of an h5ad, from its HDF5 headers."""
    import h5py

    with h5py.File(path, "r") as f:
        counts = f["layers"]["counts"] if "layers" in f and "counts" in f["layers"] else f.get("X")
        shape = _h5_shape(counts) if counts is not None else None
        if shape is None:
            return 0, 0, 0
        return shape[0], shape[1], _h5_nnz(counts)


def _tenx_sizes(path: Path) -> tuple[int, int]:
    """(barcodes, stored counts) of a 10x filtered_feature_bc_matrix.h5."""
    import h5py

    with h5py.File(path, "r") as f:
        matrix = f["matrix"]
        return int(matrix["shape"][1]), int(matrix["data"].shape[0])


def _zarr_arrays(store: Path) -> Iterable[tuple[str, tuple[int, ...], int]]:
    """(name, shape, itemsize) of every array directly in a Zarr v2/v3 group, from its metadata."""
    import numpy as np

    for child in sorted(store.iterdir()):
        meta_v3, meta_v2 = child / "zarr.json", child / ".zarray"
        if meta_v3.is_file():
            meta = json.loads(meta_v3.read_text())
            if meta.get("node_type") != "array":
                continue
            dtype = meta.get("data_type")
            itemsize = np.dtype(dtype).itemsize if isinstance(dtype, str) and dtype != "string" else 8
        elif meta_v2.is_file():
            meta = json.loads(meta_v2.read_text())
            itemsize = np.dtype(meta["dtype"]).itemsize if isinstance(meta.get("dtype"), str) else 8
        else:
            continue
        yield child.name, tuple(meta["shape"]), itemsize


def _image_gigapixels(path: Path) -> float:
    """Level-0 pixels of a slide image / 1e9, from its header (no pixel is decoded)."""
    if path.suffix.lower() in (".tif", ".tiff", ".svs", ".btf"):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.series[0].levels[0] if tif.series else tif.pages[0]
                shape = page.shape
                axes = page.axes
                height, width = shape[axes.index("Y")], shape[axes.index("X")]
                return height * width / 1e9
        except Exception:  # noqa: BLE001  (not a TIFF tifffile reads: try OpenSlide)
            pass
    try:
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            width, height = slide.dimensions
            return width * height / 1e9
    except Exception:  # noqa: BLE001
        pass
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as image:  # lazy: reads the header only
        width, height = image.size
        return width * height / 1e9


def _probe(path: Path, loaded: bool) -> dict[str, float]:
    """The measures one input contributes; {} when it is missing or unreadable (the job itself
    reports a bad input with a clear error: sizing never stops the planner)."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return {"spots": _parquet_rows(path)}
        if name.endswith(".h5ad"):
            spots, genes, nnz = _h5ad_sizes(path)
            return {"spots": spots, "nnz": nnz, "dense_mb": spots * genes * 4 / 1e6}
        if name.endswith(".h5"):
            barcodes, nnz = _tenx_sizes(path)
            return {"spots": barcodes, "nnz": nnz}
        if name.endswith(".zarr") and path.is_dir():
            arrays = list(_zarr_arrays(path))
            rows = max((shape[0] for _, shape, _ in arrays if shape), default=0)
            result = {"spots": rows}
            if loaded:
                result["loaded_mb"] = sum(math.prod(shape) * size for n, shape, size in arrays
                                          if n not in STREAMED_ARRAYS) / 1e6
            return result
        if name.endswith(IMAGE_SUFFIXES) and path.is_file():
            return {"gigapixels": _image_gigapixels(path)}
    except Exception:  # noqa: BLE001
        return {}
    return {}


def measure(inputs: Mapping[str, Iterable[str | os.PathLike]], loads: Iterable[str] = ()) -> InputSizes:
    """Sizes of one job from its inputs (name -> paths); `loads` names the inputs loaded whole.

    Spots and counts are summed over the files of one input (a cohort's slides), and the largest
    input is taken (the cohort's spots, however the job reads them); pixels and loaded bytes are
    summed over all inputs."""
    loads = set(loads)
    spots = nnz = gigapixels = loaded_mb = dense_mb = 0.0
    for input_name, paths in inputs.items():
        input_spots = input_nnz = 0.0
        for path in paths:
            probe = _probe(Path(path), input_name in loads)
            input_spots += probe.get("spots", 0)
            input_nnz += probe.get("nnz", 0)
            gigapixels += probe.get("gigapixels", 0.0)
            loaded_mb += probe.get("loaded_mb", 0.0)
            dense_mb = max(dense_mb, probe.get("dense_mb", 0.0))
        spots, nnz = max(spots, input_spots), max(nnz, input_nnz)
    return InputSizes(spots=int(spots), nnz=int(nnz), gigapixels=gigapixels, loaded_mb=loaded_mb, dense_mb=dense_mb)


def job_request(rule: str, sizes: InputSizes, attempt: int = 1) -> dict[str, int]:
    """{"mem_mb", "runtime"} of one job of `rule` with `sizes`, at retry `attempt` (1 = first)."""
    entry = formula(rule)
    scale = 1 if rule in FIXED_ON_RETRY else max(1, int(attempt))
    return {"mem_mb": int(math.ceil(entry.mem_mb(sizes) * scale)),
            "runtime": int(math.ceil(entry.runtime(sizes) * scale))}


# ---------------------------------------------------------------------------------------------
# Snakemake callables


def _named_inputs(input) -> dict[str, list[str]]:
    """name -> paths of a Snakemake InputFiles (unnamed inputs under "")."""
    named: dict[str, list[str]] = {}
    seen: set[str] = set()
    for name, value in input.items():
        paths = [value] if isinstance(value, str) else list(value)
        named[name] = [str(p) for p in paths]
        seen.update(named[name])
    rest = [str(p) for p in input if str(p) not in seen]
    if rest:
        named[""] = rest
    return named


def _signature(named: Mapping[str, list[str]]) -> tuple | None:
    """(input name, path, mtime, size) of every input; None while one is still to be made."""
    signature = []
    for name, paths in named.items():
        for path in paths:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                return None
            signature.append((name, path, stat.st_mtime_ns, stat.st_size))
    return tuple(signature)


@functools.lru_cache(maxsize=4096)
def _measure_once(signature: tuple, loads: tuple[str, ...]) -> InputSizes:
    """`measure` of unchanged inputs is read once (mem_mb and runtime of a job share it)."""
    named: dict[str, list[str]] = {}
    for name, path, _, _ in signature:
        named.setdefault(name, []).append(path)
    return measure(named, loads)


def _resource(rule: str, key: str) -> Callable:
    def evaluate(wildcards, input, attempt):
        name = rule.format(**wildcards) if "{" in rule else rule
        signature = _signature(_named_inputs(input))
        if signature is None:
            from snakemake.common.tbdstring import TBDString

            return TBDString()  # an input is still to be made: sized again before submission
        return job_request(name, _measure_once(signature, formula(name).loads), attempt)[key]

    evaluate.__name__ = f"{key}_of_{rule}"
    return evaluate


def mem_mb(rule: str) -> Callable:
    """Snakemake `mem_mb` callable of `rule` (wildcards, input, attempt) -> MB."""
    return _resource(rule, "mem_mb")


def runtime(rule: str) -> Callable:
    """Snakemake `runtime` callable of `rule` (wildcards, input, attempt) -> minutes."""
    return _resource(rule, "runtime")


# ---------------------------------------------------------------------------------------------
# CLI: the table (README) and what a set of inputs would ask for


# The paper's scale for the table's last column: 115,000 spots, ~4,000 of ~25,000 genes detected per
# spot, 25,000 px Visium slides; and the MB of the stores each rule loads whole (float32 rows:
# UNI2-h 1,536, Midnight 3,072, H0-mini 768, DeepSpot's UNI tile 1,024 + 3x3 sub-tiles of 1,024
# float16; test
# split ~16,000 spots, four regimes).
PAPER_SPOTS, PAPER_TEST_SPOTS = 115_000, 16_000
PAPER_SCALE = InputSizes(spots=PAPER_SPOTS, nnz=460_000_000, gigapixels=0.625,
                         dense_mb=PAPER_SPOTS * 20_000 * 4 / 1e6)
_ROW = {"uni": 1536 * 4, "midnight": 3072 * 4, "h0mini": 768 * 4, "deepspot_fm": 1024 * 4 + 9 * 1024 * 2}
PAPER_LOADED_MB = {
    "deepspot_train": PAPER_SPOTS * _ROW["deepspot_fm"] / 1e6,
    "deepspot_predict": PAPER_SPOTS * _ROW["deepspot_fm"] / 1e6,
    "train": PAPER_SPOTS * _ROW["uni"] / 1e6,
    "fid": (PAPER_SPOTS + 4 * PAPER_TEST_SPOTS) * _ROW["h0mini"] / 1e6,
    "ood_fid": (PAPER_SPOTS + 2 * PAPER_TEST_SPOTS) * _ROW["h0mini"] / 1e6,
    "swap_fid": (PAPER_SPOTS + 2 * PAPER_TEST_SPOTS) * _ROW["h0mini"] / 1e6,
    "auc": (PAPER_SPOTS + 5 * PAPER_TEST_SPOTS) * (_ROW["uni"] + _ROW["midnight"]) / 1e6,
    "eval_regressor_oracle": PAPER_SPOTS * _ROW["uni"] / 1e6,
    "eval_regressor_midnight_mlp": PAPER_SPOTS * _ROW["midnight"] / 1e6,
    "perturbation": 2 * PAPER_SPOTS * _ROW["h0mini"] / 1e6,
}


def formula_table() -> str:
    """Markdown table of every formula and what it asks for at the paper's scale (first attempt)."""
    from dataclasses import replace

    lines = ["| rule | mem_mb | runtime (min) | paper scale |", "|---|---|---|---|"]
    for rule, entry in FORMULAS.items():
        request = job_request(rule, replace(PAPER_SCALE, loaded_mb=PAPER_LOADED_MB.get(rule, 0.0)))
        loads = f" (loads {', '.join(entry.loads)})" if entry.loads else ""
        lines.append(f"| `{rule}` | {entry.mem_mb.describe('MB')}{loads} | {entry.runtime.describe('min')} "
                     f"| {request['mem_mb'] / 1000:.1f} GB, {request['runtime']} min |")
    lines.append(f"| other rules | {SMALL_JOB.mem_mb.describe('MB')} | {SMALL_JOB.runtime.describe('min')} | |")
    return "\n".join(lines)


def run_resources(args: argparse.Namespace) -> dict[str, Any]:
    if args.inputs:
        # every given input counts as loaded whole when the rule loads any input whole
        sizes = measure({"given": args.inputs}, ("given",) if formula(args.rule).loads else ())
        request = job_request(args.rule, sizes, args.attempt)
        result = {"rule": args.rule, "attempt": args.attempt, "sizes": sizes.__dict__, **request}
        print(json.dumps(result))
        return result
    print(formula_table())
    return {}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("resources", help="the mem_mb/runtime formulas of every rule, or one job's request")
    p.add_argument("--rule", default="spots", help="rule whose request to compute for --inputs")
    p.add_argument("--attempt", type=int, default=1)
    p.add_argument("inputs", nargs="*", help="input files of one job (none: print the formula table)")
    p.set_defaults(func=run_resources)
