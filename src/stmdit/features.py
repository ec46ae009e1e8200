"""Features stage: frozen-encoder outputs per spot, one Zarr store per cohort and encoder.

    stmdit features --encoder uni2h --impl smoke|real [--weights P] [--allow-hub] [--arch-json J]
        [--variant V] --spots a.parquet b.parquet --patches a.zarr b.zarr --out F.zarr
        --batch-size 32 --device auto [--bf16]
    stmdit features --encoder cancerfoundation --impl smoke|real [--weights DIR]
        --expression cohort.h5ad --out F.zarr --max-genes 1199 --seed 0 --batch-size 64 --device auto

Rows: image encoders embed the kept spots (keep == True) of the given samples, in the given order
(the cohort spot order), reading each patches store once, in chunk-aligned blocks; the
expression encoder follows the h5ad's obs order (already the cohort order). The store holds
`spot_key` (N,) and the encoder's outputs (`embedding`, `subtiles`, `latent`; CancerFoundation:
the CLS `embedding`, its input `bins` and the gene list `token_genes`), attrs "stmdit"
(provenance) and "encoder" (name, impl, weights and their sha256, preprocessing, shapes). It is
written to a temporary sibling and renamed into place when complete.

GE tokens (1,200 x 256 per spot at the paper's gene count, 600 KiB in float16) are not stored:
the bins they are encoded from take 1.2 KB, and `ge_inputs.GeTokenSource` encodes them on the
model's device inside training and sampling. Stores written with `tokens`/`token_mask` still read.

Layout, chosen for training, which reads latents, UNI embeddings and GE tokens of random spots
at a high rate:
- Zarr v3 shards of up to ~64 MiB hold inner chunks of ~256 KiB, or of ONE spot when a spot is
  bigger (latents: 8 spots of 32 KiB per chunk; embeddings: 21-256 spots; GE bins: ~200 spots). A random spot costs one byte-range read and one decompression of at
  most ~600 KiB; a whole-array read touches few enough chunks to run at hundreds of MB/s
  (zarr-python spends ~0.4 ms per chunk); a 100k-spot cohort is hundreds of files, not 100k
  (inode quotas and metadata servers on clusters).
- Read rows with `read_array_rows` / `read_feature_rows`, not `get_orthogonal_selection`: in
  zarr 3.1 an integer-array selection on a sharded array expands to per-element coordinates
  inside each shard (measured: 64 random token rows 1.4 s, 3,600 latent rows 8 s and 5 GB RSS),
  whereas contiguous row ranges read concurrently take ~0.1 s for 64 token rows, and dense
  requests read the spanned range once.
- dtypes: uint8 for GE bins; float16 for latents and sub-tile embeddings (the big arrays; half the disk,
  page cache and RAM; relative error ~5e-4, far below VAE reconstruction error and the noise of
  the diffusion targets), float32 for the small conditioning embeddings, bool for masks.
  Values that would overflow float16 are an error, not silently inf.
- Compression: Blosc zstd level 3 with byte shuffle: shuffle groups the float exponent bytes,
  the compressible part of these values; decompression cost is small next to the read
  (~8% on random token reads).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import zarr
from tqdm import tqdm

from stmdit.cli import add_bf16_option
from stmdit.errors import InputError
from stmdit.h5ad_rows import H5adRows
from stmdit.image_stores import iter_kept_images, read_cohort_patches
from stmdit.provenance import atomic_path, provenance
from stmdit.zarr_rows import read_array_rows, string_values

log = logging.getLogger(__name__)

TARGET_CHUNK_BYTES = 256 * 1024
TARGET_SHARD_BYTES = 64 * 1024 * 1024
KEY_CHUNK_ROWS = 65536
READ_BLOCK_ROWS = 8192  # rows per read of a whole cohort's features (read_rows_in_blocks)
STORED_DTYPES = {
    "embedding": np.float32,
    "subtiles": np.float16,
    "latent": np.float16,
    "tokens": np.float16,  # GE stores written before bins; still read
    "token_mask": np.bool_,
    "bins": np.uint8,  # CancerFoundation's value input (bin 0..n_bins-1 of each gene of the list)
}


# ---------------------------------------------------------------------------------------------
# Store helpers


def array_layout(n_rows: int, row_shape: Sequence[int], itemsize: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inner chunk shape, shard shape) for an (n_rows, *row_shape) array: see module docstring."""
    row_bytes = max(1, math.prod(row_shape) * itemsize)
    chunk_rows = int(min(max(1, TARGET_CHUNK_BYTES // row_bytes), max(n_rows, 1)))
    chunks_per_shard = max(1, TARGET_SHARD_BYTES // (chunk_rows * row_bytes))
    shard_rows = int(min(chunks_per_shard * chunk_rows, math.ceil(max(n_rows, 1) / chunk_rows) * chunk_rows))
    return (chunk_rows, *row_shape), (shard_rows, *row_shape)


def _compressor(dtype: np.dtype):
    from zarr.codecs import BloscCodec, BloscShuffle

    return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle, typesize=np.dtype(dtype).itemsize)


def to_stored(name: str, values: np.ndarray) -> np.ndarray:
    """Cast an encoder output to its stored dtype; NaN/inf outputs and float16 overflow are errors."""
    values = np.asarray(values)
    dtype = STORED_DTYPES.get(name, np.float32)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(f"{name}: the encoder produced NaN or infinite values")
    with np.errstate(over="ignore"):
        out = values.astype(dtype, copy=False)
    if dtype == np.float16 and not np.isfinite(out).all():
        raise ValueError(f"{name}: values beyond float16 range (max |x| = {np.abs(values).max():.3g})")
    if np.dtype(dtype).kind == "u" and values.size and (values.min() < 0 or values.max() > np.iinfo(dtype).max):
        raise ValueError(f"{name}: values outside 0..{np.iinfo(dtype).max} (the stored dtype is {np.dtype(dtype).name})")
    return out


class _RowBuffer:
    """Rows of one array waiting to be written in whole shards (no read-modify-write of shards)."""

    def __init__(self, array: zarr.Array, shard_rows: int):
        self.array = array
        self.shard_rows = shard_rows
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.written = 0

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.n_pending += len(rows)
        if self.n_pending >= self.shard_rows:
            self.flush(whole_shards_only=True)

    def flush(self, whole_shards_only: bool = False) -> None:
        if not self.n_pending:
            return
        block = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n_write = (len(block) // self.shard_rows) * self.shard_rows if whole_shards_only else len(block)
        if n_write:
            self.array[self.written:self.written + n_write] = block[:n_write]
            self.written += n_write
        rest = block[n_write:]
        self.pending = [rest] if len(rest) else []
        self.n_pending = len(rest)


@contextlib.contextmanager
def staged_spot_store(path: str | Path, keys: Sequence[str], extra_arrays: Mapping[str, np.ndarray] | None = None
                      ) -> Iterator[zarr.Group]:
    """A new Zarr v3 group in the staging folder of `path` (moved into place when the block ends
    without an error, see `atomic_path`), holding `spot_key` = keys and `extra_arrays` as given; the
    writer adds its per-spot arrays. Feature and tile stores both start here."""
    keys = [str(k) for k in keys]
    if not keys:
        raise InputError(path, "no spots to write")
    with atomic_path(Path(path)) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        group.create_array("spot_key", shape=(len(keys),), dtype=str,
                           chunks=(min(len(keys), KEY_CHUNK_ROWS),))[:] = np.array(keys, dtype=object)
        for name, values in (extra_arrays or {}).items():
            values = np.asarray(values)
            if values.dtype.kind in "UO":
                strings = group.create_array(name, shape=values.shape, dtype=str, chunks=values.shape or (1,))
                strings[:] = values.astype(object)
            else:
                group.create_array(name, data=values)
        yield group


def write_feature_store(
    path: str | Path,
    keys: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    shapes: Mapping[str, Sequence[int]],
    attrs: Mapping[str, Any],
    extra_arrays: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write a feature store atomically: `spot_key` = keys, one array per output name of `shapes`
    (filled row by row from `batches`, in key order), `extra_arrays` as they are, and `attrs`.

    If anything fails (including inside `batches`), no store is left at `path`.
    """
    path, n = Path(path), len(keys)
    with staged_spot_store(path, keys, extra_arrays) as group:
        buffers = {}
        for name, shape in shapes.items():
            dtype = np.dtype(STORED_DTYPES.get(name, np.float32))
            chunks, shards = array_layout(n, tuple(shape), dtype.itemsize)
            array = group.create_array(name, shape=(n, *shape), dtype=dtype, chunks=chunks, shards=shards,
                                       compressors=_compressor(dtype), fill_value=0)
            buffers[name] = _RowBuffer(array, shards[0])
        rows = 0
        for batch in batches:
            sizes = {name: len(batch[name]) for name in shapes}
            if len(set(sizes.values())) != 1:
                raise ValueError(f"outputs of one batch have different lengths: {sizes}")
            for name, buffer in buffers.items():
                values = to_stored(name, batch[name])
                if values.shape[1:] != tuple(shapes[name]):
                    raise ValueError(f"{name}: encoder output rows {values.shape[1:]} != declared {tuple(shapes[name])}")
                buffer.add(values)
            rows += next(iter(sizes.values()))
        if rows != n:
            raise RuntimeError(f"encoder produced {rows} rows for {n} spots")
        for buffer in buffers.values():
            buffer.flush()
        group.attrs.update(json.loads(json.dumps(dict(attrs), default=str)))
    log.info("wrote %s: %d spots, arrays %s", path, n, {k: [n, *v] for k, v in shapes.items()})
    return path


def open_feature_store(path: str | Path) -> zarr.Group:
    """Open a feature store read-only (InputError naming it when missing or unreadable)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "feature store not found")
    try:
        group = zarr.open_group(str(path), mode="r")
        group["spot_key"]
    except Exception as exc:  # zarr raises several types for damaged or foreign stores
        raise InputError(path, f"not a readable feature store: {exc}") from None
    return group


def check_finite_rows(values: np.ndarray, source: str | Path, array_name: str, keys: Sequence[str]) -> np.ndarray:
    """`values` (rows aligned with `keys`) when every value is finite; otherwise InputError naming
    the store, the array and the first spot with a NaN or inf. Integer and bool arrays pass."""
    if values.dtype.kind not in "fc" or values.size == 0:
        return values
    # in blocks of rows: a mask of every value of a token store at once would be as large as the store
    finite = np.concatenate([np.isfinite(values[start:start + 1024]).reshape(len(values[start:start + 1024]), -1)
                             .all(axis=1) for start in range(0, len(values), 1024)])
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise InputError(source, f"array {array_name!r} has NaN or inf values at spot {keys[row]} (row {row} of "
                                 f"those read; {int((~finite).sum())} such rows): recompute the store")
    return values


def store_row_arrays(group: zarr.Group) -> list[str]:
    """Names of the per-spot arrays of a store (the encoder outputs)."""
    shapes = (group.attrs.get("encoder") or {}).get("shapes") or {}
    n = group["spot_key"].shape[0]
    names = [name for name in shapes if name in group]
    return names or [name for name, a in group.arrays() if name != "spot_key" and a.shape[:1] == (n,)]


def read_feature_rows(
    store: str | Path | zarr.Group, keys: Sequence[str], arrays: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Rows of the given spot keys (in that order) of each per-spot array (default: all outputs).

    Every key must be in the store: InputError naming the store otherwise. Arrays come in their
    stored dtype (float16 for latents and tokens).
    """
    if isinstance(store, zarr.Group):
        group, name = store, str(store.store)
    else:
        group, name = open_feature_store(store), str(store)
    index = pd.Index(string_values(group["spot_key"][:]))
    if not index.is_unique:
        raise InputError(name, "feature store has duplicate spot keys")
    rows = index.get_indexer(pd.Index([str(k) for k in keys]))
    missing = np.flatnonzero(rows < 0)
    if missing.size:
        raise InputError(name, f"{missing.size} spot key(s) are not in the feature store, e.g. {keys[missing[0]]}")
    out = {}
    for array_name in arrays or store_row_arrays(group):
        if array_name not in group:
            raise InputError(name, f"feature store has no array {array_name!r}")
        out[array_name] = check_finite_rows(read_rows_in_blocks(group[array_name], rows), name, array_name, keys)
    return out


def read_rows_in_blocks(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """`read_array_rows`, READ_BLOCK_ROWS rows at a time into one array when the rows increase (a
    cohort in store order): zarr holds the compressed chunks of one block, not of every row, beside
    the result."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size <= READ_BLOCK_ROWS or not (np.diff(rows) > 0).all():
        return read_array_rows(array, rows)
    out = np.empty((rows.size, *array.shape[1:]), dtype=array.dtype)
    for start in range(0, rows.size, READ_BLOCK_ROWS):
        out[start:start + READ_BLOCK_ROWS] = read_array_rows(array, rows[start:start + READ_BLOCK_ROWS])
    return out


# ---------------------------------------------------------------------------------------------
# Image encoders: kept spots of the cohort's patches stores


def encode_batches(encoder, batches: Iterable, total: int, desc: str) -> Iterator[dict[str, np.ndarray]]:
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", file=sys.stderr, mininterval=5.0):
        yield encoder.encode(*batch) if isinstance(batch, tuple) else encoder.encode(batch)


# ---------------------------------------------------------------------------------------------
# Expression encoder: CancerFoundation on the cohort's h5ad


COUNT_BLOCK_ROWS = 4096  # spots of counts read from the h5ad at a time


@dataclass
class CohortCounts:
    """A cohort h5ad opened for its counts: obs/var in memory, layers["counts"] read by row blocks
    (a PTPL h5ad's pseudo-counts are nearly dense: never loaded whole, except by cell_ranger)."""

    path: Path
    keys: list[str]
    var_names: np.ndarray
    hvg_rank: np.ndarray
    highly_variable: np.ndarray | None
    source: H5adRows
    batches: np.ndarray | None = None  # obs["sample"]: the batch key of the reference gene selection

    @property
    def counts(self):
        """Every spot's raw counts as one CSR matrix (spots x genes): for cell_ranger gene selection only."""
        from stmdit.memory_budget import require

        require(self.path, 8 * self.source.stored_values("layers/counts"), "cell_ranger gene selection on the whole "
                "counts matrix")
        return self.source.rows("layers/counts", 0, len(self.keys))


def read_cohort_counts(path: Path) -> CohortCounts:
    path = Path(path)
    source = H5adRows(path)
    try:
        if not source.has("layers/counts"):
            raise InputError(path, 'no raw counts: layers["counts"] is missing')
        obs, var = source.obs, source.var
        if "highly_variable_rank" not in var:
            raise InputError(path, 'var["highly_variable_rank"] is missing (HVG ranks choose the gene list)')
        if len(obs) == 0:
            raise InputError(path, "the cohort has no spots")
        if not obs.index.is_unique:
            raise InputError(path, "spot keys (obs names) are not unique")
    except BaseException:
        source.close()
        raise
    hv = var["highly_variable"].to_numpy(dtype=bool) if "highly_variable" in var else None
    batches = obs["sample"].to_numpy().astype(str) if "sample" in obs else None
    return CohortCounts(path, [str(k) for k in obs.index], var.index.to_numpy().astype(str),
                        var["highly_variable_rank"].to_numpy(dtype=np.float64), hv, source, batches)


def check_counts(path: Path, counts) -> None:
    data = counts.data
    if data.size and (not np.isfinite(data).all() or data.min() < 0):
        raise InputError(path, 'layers["counts"] has negative or non-finite values: raw counts expected')


def iter_count_batches(cohort: CohortCounts, columns: np.ndarray, batch_size: int,
                       block_rows: int = COUNT_BLOCK_ROWS) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(dense counts of `columns`, spot keys) per batch of spots, read a block of rows at a time and
    checked for raw counts block by block."""
    block_rows = max(batch_size, block_rows // batch_size * batch_size)
    for first, block in cohort.source.iter_rows("layers/counts", block_rows):
        block = block[:, columns]
        check_counts(cohort.path, block)
        for start in range(0, block.shape[0], batch_size):
            stop = min(start + batch_size, block.shape[0])
            yield block[start:stop].toarray(), list(cohort.keys[first + start:first + stop])


# ---------------------------------------------------------------------------------------------
# The stage


def parse_arch(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        arch = json.loads(text)
    except ValueError as exc:
        raise InputError(None, f"--arch-json is not valid JSON: {exc}") from None
    if not isinstance(arch, dict):
        raise InputError(None, "--arch-json must be a JSON object")
    return arch


def stage_params(args: argparse.Namespace, arch: dict) -> dict[str, Any]:
    params = {
        "encoder": args.encoder, "impl": args.impl, "weights": args.weights, "allow_hub": args.allow_hub,
        "arch": arch, "variant": args.variant, "bf16": args.bf16, "device": args.device, "batch_size": args.batch_size,
    }
    if args.encoder == "cancerfoundation":
        params.update(max_genes=args.max_genes, seed=args.seed, gene_selection=args.gene_selection,
                      l2_normalize=args.l2_normalize, binning=args.binning)
    return params


def run_image_features(args: argparse.Namespace, arch: dict) -> Path:
    from stmdit.encoders import load_encoder

    if not args.spots or not args.patches:
        raise InputError(None, f"encoder {args.encoder} needs --spots and --patches")
    samples = read_cohort_patches(args.spots, args.patches)
    keys = [k for s in samples for k in s.keys]
    encoder = load_encoder(args.encoder, args.impl, weights=args.weights, allow_hub=args.allow_hub, arch=arch,
                           variant=args.variant, device=args.device, bf16=args.bf16)
    log.info("encoder %s (%s) on %s: %d spots from %d samples, outputs %s", args.encoder, args.impl,
             getattr(encoder, "device", "cpu"), len(keys), len(samples), encoder.output_shapes)
    attrs = {
        "stmdit": provenance("features", stage_params(args, arch), [*args.spots, *args.patches]),
        "encoder": encoder.describe(),
    }
    batches = encode_batches(encoder, iter_kept_images(samples, args.batch_size),
                             math.ceil(len(keys) / args.batch_size), args.encoder)
    return write_feature_store(args.out, keys, batches, encoder.output_shapes, attrs)


def run_expression_features(args: argparse.Namespace, arch: dict) -> Path:
    if not args.expression:
        raise InputError(None, "encoder cancerfoundation needs --expression")
    cohort = read_cohort_counts(Path(args.expression))
    try:
        return encode_cohort_counts(args, arch, cohort)
    finally:
        cohort.source.close()


def encode_cohort_counts(args: argparse.Namespace, arch: dict, cohort: CohortCounts) -> Path:
    from stmdit.encoders import load_encoder

    encoder = load_encoder("cancerfoundation", args.impl, weights=args.weights, allow_hub=args.allow_hub, arch=arch,
                           variant=args.variant, device=args.device, bf16=args.bf16, seed=args.seed)
    encoder.configure(gene_selection=args.gene_selection, l2_normalize=args.l2_normalize, binning=args.binning)
    counts = cohort.counts if encoder.gene_selection == "cell_ranger" else None  # hvg_rank needs no counts
    columns = encoder.choose_genes(cohort.var_names, cohort.hvg_rank, args.max_genes, cohort.highly_variable,
                                   counts=counts, batches=cohort.batches)
    del counts
    if len(columns) == 0:
        where = "in the CancerFoundation vocabulary" if encoder.usable_genes() is not None else "flagged"
        raise InputError(cohort.path, f"no highly variable gene is {where}: the gene list would be empty")
    log.info("cancerfoundation (%s): %d spots, %d genes (top HVGs, first %s), sequence length %d; counts read "
             "%d spots at a time", args.impl, len(cohort.keys), len(columns), encoder.genes[:3],
             encoder.sequence_length, COUNT_BLOCK_ROWS)
    attrs = {
        "stmdit": provenance("features", stage_params(args, arch), [args.expression]),
        "encoder": encoder.describe(),
    }
    batches = encode_batches(encoder, iter_count_batches(cohort, columns, args.batch_size),
                             math.ceil(len(cohort.keys) / args.batch_size), "cancerfoundation")
    token_genes = np.array(["<cls>", *encoder.genes], dtype=object)
    return write_feature_store(args.out, cohort.keys, batches, encoder.output_shapes, attrs,
                               extra_arrays={"token_genes": token_genes})


def run(args: argparse.Namespace) -> Path:
    from stmdit.encoders import get_spec

    spec = get_spec(args.encoder)
    if args.batch_size < 1:
        raise InputError(None, f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_genes < 1:
        raise InputError(None, f"--max-genes must be at least 1, got {args.max_genes}")
    arch = parse_arch(args.arch_json)
    if spec.modality == "expression":
        return run_expression_features(args, arch)
    return run_image_features(args, arch)


def register(subparsers) -> None:
    from stmdit.encoders import ENCODER_NAMES

    parser = subparsers.add_parser(
        "features", help="frozen-encoder features of a cohort (one Zarr store)", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--encoder", required=True, choices=ENCODER_NAMES)
    parser.add_argument("--impl", choices=("real", "smoke"), default="smoke")
    parser.add_argument("--weights", help="local weights path, or a hub id (needs --allow-hub)")
    parser.add_argument("--allow-hub", action="store_true", help="allow loading weights from the Hugging Face hub")
    parser.add_argument("--arch-json", help="JSON object of architecture overrides (tests, custom sizes)")
    parser.add_argument("--variant", help="encoder variant (deepspot_fm: uni | hoptimus0)")
    parser.add_argument("--spots", nargs="+", help="spots tables of the cohort's samples, in cohort order")
    parser.add_argument("--patches", nargs="+", help="patches stores, same order as --spots")
    parser.add_argument("--expression", help="cohort h5ad (cancerfoundation)")
    parser.add_argument("--out", required=True, help="output feature store (.zarr)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_bf16_option(parser)
    parser.add_argument("--max-genes", type=int, default=1199, help="cancerfoundation: at most this many HVGs")
    parser.add_argument("--seed", type=int, default=0, help="cancerfoundation: seed of the tie-breaking in binning")
    parser.add_argument("--gene-selection", choices=("cell_ranger", "hvg_rank"),
                        help="cancerfoundation: the reference's cell_ranger HVGs among vocab genes, or the pipeline's "
                             "seurat_v3 ranks (default: cell_ranger for real, hvg_rank for smoke)")
    parser.add_argument("--l2-normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="cancerfoundation: L2-normalise the cell embedding (default: yes for real, as the "
                             "reference; no for smoke)")
    parser.add_argument("--binning", choices=("reference", "rank"),
                        help="cancerfoundation: the reference's quantile binning with random ties, or the rank "
                             "binning with seeded tie order (default: reference for real, rank for smoke)")
    parser.set_defaults(func=run)
