"""Evaluation stage: from sampled tiles to the evaluation JSONs the tables are built from.

    stmdit eval-features --encoder h0mini|uni2h|midnight --impl smoke|real [--weights P] [--arch-json J]
        [--allow-hub] --images X.zarr --out Y.zarr [--batch-size 32] [--device auto] [--bf16]
    stmdit eval-features ... --noise-tiles-for S.parquet [--split-name test] [--tile-size 256]
        [--seed 42] --out controls/C/noise_{encoder}.zarr      (Table 2's noise-tile null)
    stmdit fid --real features/C/h0mini.zarr --generated uni_ge=G1.zarr uni=G2.zarr ...
        --split S.parquet [--split-name test] [--expression C.h5ad | --spots A.parquet ...]
        [--n-boot 1000] [--n-boot-per-tissue N] [--seed 42] [--min-spots-per-tissue 50] [--threads 1]
        --model M --cohort C --kind fid|ood|swap --out eval/M/C/{fid,ood_fid,swap_fid}.json
    stmdit eval-regressor --regressor oracle|midnight_mlp --expression C.h5ad --split S.parquet
        --features features/C/{uni2h,midnight}.zarr [--ks 50,100,200,500,1000] [--pca 256]
        [--mlp-hidden 1024,1024] [--mlp-max-iter 200] [--mlp-impl sklearn|torch] [--device auto]
        [--midnight-genes protein_coding|all] [--seed 42] [--threads 1]
        --out eval/regressors/C/{oracle,midnight_mlp}.joblib       (once per training cohort)
    stmdit auc --expression C.h5ad --split S.parquet --oracle eval/regressors/C/oracle.joblib
        --real-uni features/C/uni2h.zarr --gen-uni uni_ge=...
        [--midnight-mlp eval/regressors/C/midnight_mlp.joblib --real-midnight features/C/midnight.zarr
         --gen-midnight uni_ge=...] [--noise-uni controls/C/noise_uni2h.zarr]
        [--noise-midnight controls/C/noise_midnight.zarr] [--n-boot 1000] [--n-perm 1000] [--seed 42]
        [--threads 1] --model M --cohort C --out eval/M/C/auc.json
    stmdit perturbation --features eval/M/C/perturbation_h0mini.zarr --tiles tiles/M/C/perturbation.zarr
        --real features/C/h0mini.zarr --expression C.h5ad --split S.parquet [--weight 1.0]
        --model M --cohort C [--variant default|uni_null] --out eval/M/C/perturbation.json

Stores read here:
- image stores (samples, perturbation samples, patches): `spot_key` (N,) and `images` (N, H, W, 3)
  uint8; `eval-features` writes a feature store (`spot_key`, `embedding`) with the same rows, attrs
  "stmdit", "encoder" and the image store's "encoders" / "sampler" attrs, so whether smoke encoders
  were involved anywhere upstream travels with the features. A perturbation store's per-row
  `pair`, `ref_key`, `alpha` are copied too.
- feature stores (features stage and eval-features): rows are matched by spot key, never by position.

Generated spots are the spots of the generated stores: every regime of one JSON must have the
same spots, all of them in the `--split-name` split and in the real store. The JSON's "encoders"
maps every encoder that touched an input to "smoke" or "real" ("smoke" wins on disagreement),
which is how a table knows it was made with smoke encoders. The numbers come from
`stmdit.metrics`; the layouts from the `stmdit.report` builders (see their docstrings).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from stmdit import eval_json, metrics
from stmdit.cli import add_bf16_option, parse_named_paths
from stmdit.errors import InputError
from stmdit.expression import read_cohort_obs, read_h5ad_elements, stack_rows
from stmdit.features import (
    check_finite_rows,
    encode_batches,
    open_feature_store,
    parse_arch,
    read_feature_rows,
    write_feature_store,
)
from stmdit.genesets import protein_coding_columns
from stmdit.image_stores import check_unique, open_image_store
from stmdit.provenance import atomic_path, provenance
from stmdit.split_table import TEST, TRAIN, split_keys
from stmdit.spots_table import read_spots_table
from stmdit.zarr_rows import string_values

log = logging.getLogger(__name__)

EVAL_ENCODERS = ("h0mini", "uni2h", "midnight")
FID_KINDS = {"fid": "fid", "ood": "ood_fid", "swap": "swap_fid"}
SWAP_CONDITIONS = ("deepspot", "visium")
PERTURBATION_ROW_ARRAYS = ("pair", "ref_key", "alpha")
PAIR_SEPARATOR = "->"


# ---------------------------------------------------------------------------------------------
# Reading inputs


def encoder_impls(attrs: Mapping[str, Any]) -> dict[str, str]:
    """Encoder name -> impl ("smoke" | "real") from a store's attrs: its own "encoder" (describe())
    and the "encoders" it carries (a mapping name -> impl or describe(), or a list of describe())."""
    impls: dict[str, str] = {}
    own = attrs.get("encoder")
    if isinstance(own, Mapping) and own.get("name") and own.get("impl"):
        impls[str(own["name"])] = str(own["impl"])
    carried = attrs.get("encoders") or {}
    entries = carried.items() if isinstance(carried, Mapping) else enumerate(carried if isinstance(carried, list) else [])
    for name, value in entries:
        if isinstance(value, Mapping):
            name, value = value.get("name", name), value.get("impl")
        if isinstance(name, str) and value is not None:
            impls[name] = merge_impls(impls, {name: str(value)})[name]
    return impls


def merge_impls(*impl_maps: Mapping[str, str]) -> dict[str, str]:
    """Union of encoder -> impl maps; an encoder that is "smoke" in any of them stays "smoke"."""
    merged: dict[str, str] = {}
    for impls in impl_maps:
        for name, impl in impls.items():
            merged[name] = "smoke" if "smoke" in (impl, merged.get(name)) else merged.get(name, impl)
    return dict(sorted(merged.items()))


@dataclass
class FeatureSet:
    """The `embedding` rows of one feature store, its spot keys and the encoders behind it."""

    path: Path
    keys: list[str]
    embedding: np.ndarray
    impls: dict[str, str]


def read_features(path: str | Path, keys: Sequence[str] | None = None) -> FeatureSet:
    """`embedding` of every row (store order), or of `keys` in that order (all must be present)."""
    path = Path(path)
    group = open_feature_store(path)
    if "embedding" not in group:
        raise InputError(path, "feature store has no 'embedding' array")
    impls = encoder_impls(dict(group.attrs))
    if keys is None:
        keys = [str(k) for k in string_values(group["spot_key"][:])]
        check_unique(keys, path)
        embedding = check_finite_rows(np.asarray(group["embedding"][:]), path, "embedding", keys)
    else:
        keys = [str(k) for k in keys]
        embedding = read_feature_rows(path, keys, ["embedding"])["embedding"]
    if embedding.ndim != 2 or len(embedding) != len(keys):
        raise InputError(path, f"'embedding' must be (spots, dim) with one row per spot key, found {embedding.shape}")
    return FeatureSet(path, keys, embedding, impls)


class GeneratedStores(Mapping[str, np.ndarray]):
    """The generated feature stores of one evaluation, name -> `embedding` of the same spots.

    Opening checks every store's spot keys (the same set as the first store's, or as `keys` when
    given) and reads its encoders; a store's rows are read only when it is asked for, in the order of
    `keys`, so a caller that scores one store at a time holds one store, not all of them."""

    def __init__(self, stores: Mapping[str, str | Path], keys: Sequence[str] | None = None):
        if not stores:
            raise InputError(None, "no generated stores given")
        self.paths = {name: Path(path) for name, path in stores.items()}
        self.impls: dict[str, dict[str, str]] = {}
        self._in_order: dict[str, bool] = {}
        self.keys = None if keys is None else [str(k) for k in keys]
        first = next(iter(stores))
        for name, path in self.paths.items():
            group = open_feature_store(path)
            if "embedding" not in group:
                raise InputError(path, "feature store has no 'embedding' array")
            store_keys = [str(k) for k in string_values(group["spot_key"][:])]
            check_unique(store_keys, path)
            if self.keys is None:
                self.keys = store_keys
            elif store_keys != self.keys and set(store_keys) != set(self.keys):
                whose = "the given test spots" if keys is not None else first
                raise InputError(path, f"{name}: {len(store_keys)} spots that differ from the {len(self.keys)} spots of "
                                       f"{whose} ({self.keys[0]!r} ...): every store must have the same spots")
            self._in_order[name] = store_keys == self.keys
            self.impls[name] = encoder_impls(dict(group.attrs))

    def __getitem__(self, name: str) -> np.ndarray:
        path = self.paths[name]
        if self._in_order[name]:
            embedding = check_finite_rows(np.asarray(open_feature_store(path)["embedding"][:]), path, "embedding",
                                          self.keys)
        else:
            embedding = read_feature_rows(path, self.keys, ["embedding"])["embedding"]
        if embedding.ndim != 2 or len(embedding) != len(self.keys):
            raise InputError(path, f"'embedding' must be (spots, dim) with one row per spot key, found {embedding.shape}")
        return embedding

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def first_path(self) -> Path:
        return next(iter(self.paths.values()))


def check_in_split(keys: Sequence[str], in_split: Sequence[str], split_path: str | Path, split_name: str,
                   source: str | Path) -> None:
    outside = pd.Index(keys).difference(pd.Index(in_split))
    if len(outside):
        raise InputError(source, f"{len(outside)} spot(s) are not in split {split_name!r} of {split_path}, "
                                 f"e.g. {outside[0]}")


def read_obs(path: str | Path) -> pd.DataFrame:
    """obs of a cohort h5ad (read without loading the matrices)."""
    return read_cohort_obs(path)


def read_labels(expression: str | Path | None = None, spots: Sequence[str | Path] | None = None) -> tuple[pd.Series, list[str]]:
    """Tissue label per spot key, from the cohort h5ad (obs "label") or spots tables (key, label)."""
    if expression is not None:
        obs = read_obs(expression)
        if "label" not in obs:
            raise InputError(expression, "obs has no 'label' column (tissue labels)")
        return obs["label"].astype(str), [str(expression)]
    parts = []
    for path in spots or []:
        table = read_spots_table(path, ["key", "label"])
        parts.append(pd.Series(table["label"].astype(str).to_numpy(), index=table["key"].astype(str)))
    labels = pd.concat(parts)
    check_unique(list(labels.index), ", ".join(str(p) for p in spots or []))
    return labels, [str(p) for p in spots or []]


def labels_of(labels: pd.Series, keys: Sequence[str], sources: Sequence[str]) -> np.ndarray:
    found = labels.reindex(pd.Index(keys))
    missing = found.isna().to_numpy()
    if missing.any():
        raise InputError(", ".join(sources), f"{int(missing.sum())} spot(s) have no tissue label, e.g. "
                                             f"{keys[int(np.flatnonzero(missing)[0])]}")
    return found.to_numpy().astype(str)


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise InputError(None, f"{option} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise InputError(None, f"{option} {text!r}: expected positive integers")
    return values


# ---------------------------------------------------------------------------------------------
# eval-features


def load_eval_encoder(encoder: str, impl: str, *, weights: str | None = None, arch: Mapping[str, Any] | None = None,
                      allow_hub: bool = False, batch_size: int = 32, device: str = "auto",
                      bf16: bool = False) -> tuple[Any, dict[str, Any]]:
    """The evaluation encoder and the parameters that go into its stores' provenance."""
    from stmdit.encoders import load_encoder

    if encoder not in EVAL_ENCODERS:
        raise InputError(None, f"eval-features: encoder must be one of {list(EVAL_ENCODERS)}, got {encoder!r}")
    if batch_size < 1:
        raise InputError(None, f"--batch-size must be at least 1, got {batch_size}")
    model = load_encoder(encoder, impl, weights=weights, allow_hub=allow_hub, arch=dict(arch or {}),
                         device=device, bf16=bf16)
    params = {"encoder": encoder, "impl": impl, "weights": weights, "arch": dict(arch or {}), "allow_hub": allow_hub,
              "batch_size": batch_size, "device": device, "bf16": bf16}
    return model, params


def noise_tile(seed: int, row: int, size: int) -> np.ndarray:
    """Uniform uint8 RGB noise of one spot: a function of (seed, row) only, whatever the batching."""
    return np.random.default_rng((seed, row)).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def extract_noise_features(
    split: str | Path,
    out_path: str | Path,
    encoder: str = "h0mini",
    impl: str = "smoke",
    *,
    split_name: str = TEST,
    tile_size: int = 256,
    seed: int = 42,
    batch_size: int = 32,
    **encoder_options: Any,
) -> Path:
    """Features of pure-noise tiles, one per spot of a split (keys in split order): a control that
    carries no information about its spot, scored by `auc` like generated tiles (Table 2)."""
    if tile_size < 8:
        raise InputError(None, f"--tile-size must be at least 8 px, got {tile_size}")
    keys = split_keys(split, split_name)
    model, params = load_eval_encoder(encoder, impl, batch_size=batch_size, **encoder_options)
    params.update(split_name=split_name, tile_size=tile_size, seed=seed)
    control = f"uniform uint8 RGB noise, {tile_size} x {tile_size} px; row i from default_rng(({seed}, i))"
    attrs = {"stmdit": provenance("eval-features", params, [split]), "encoder": model.describe(), "control": control}
    batches = (np.stack([noise_tile(seed, row, tile_size) for row in range(start, min(start + batch_size, len(keys)))])
               for start in range(0, len(keys), batch_size))
    encoded = encode_batches(model, batches, math.ceil(len(keys) / batch_size), f"{encoder} noise tiles")
    return write_feature_store(out_path, keys, encoded, model.output_shapes, attrs)


def extract_features(
    images_path: str | Path,
    out_path: str | Path,
    encoder: str = "h0mini",
    impl: str = "smoke",
    *,
    weights: str | None = None,
    arch: Mapping[str, Any] | None = None,
    allow_hub: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    bf16: bool = False,
    decoder=None,
) -> Path:
    """Encode every row of an image store into a feature store with the same rows and keys
    (`decoder`: of a tile store that keeps latents only)."""
    store = open_image_store(images_path, decoder=decoder)
    group, keys = store.group, store.keys
    model, params = load_eval_encoder(encoder, impl, weights=weights, arch=arch, allow_hub=allow_hub,
                                      batch_size=batch_size, device=device, bf16=bf16)
    source_attrs = dict(group.attrs)
    attrs = {"stmdit": provenance("eval-features", params, [images_path]), "encoder": model.describe()}
    attrs.update({name: source_attrs[name] for name in ("encoders", "sampler") if name in source_attrs})
    extra = {name: np.asarray(group[name][:]) for name in PERTURBATION_ROW_ARRAYS if name in group}
    extra = {name: string_values(v) if v.dtype.kind not in "fiub" else v for name, v in extra.items()}
    batches = encode_batches(model, store.iter_batches(batch_size), math.ceil(len(keys) / batch_size),
                             f"{encoder} {Path(images_path).name}")
    return write_feature_store(out_path, keys, batches, model.output_shapes, attrs, extra_arrays=extra)


# ---------------------------------------------------------------------------------------------
# FID (Tables 1, 3, 4, 6; Figure 6)


def fid_document(
    kind: str,
    real: str | Path,
    generated: Mapping[str, str | Path],
    split: str | Path,
    model: str,
    cohort: str,
    *,
    split_name: str = TEST,
    expression: str | Path | None = None,
    spots: Sequence[str | Path] | None = None,
    n_boot: int = 1000,
    n_boot_per_tissue: int | None = None,
    seed: int = 42,
    min_spots_per_tissue: int = 50,
    threads: int = 1,
) -> dict:
    """fid.json (kind "fid"), ood_fid.json ("ood") or swap_fid.json ("swap") as a checked document.

    `generated`: regime (fid, ood) or condition (swap: deepspot, visium) -> H0-mini features of
    the generated tiles. Real = the real tiles' features of the same spots, paired by key."""
    if kind not in FID_KINDS:
        raise InputError(None, f"--kind must be one of {list(FID_KINDS)}, got {kind!r}")
    allowed = SWAP_CONDITIONS if kind == "swap" else eval_json.REGIMES
    unknown = sorted(set(generated) - set(allowed))
    if unknown:
        raise InputError(None, f"{kind}: unknown generated names {unknown} (expected {list(allowed)})")
    if kind == "swap" and set(generated) != set(SWAP_CONDITIONS):
        raise InputError(None, f"swap: --generated needs exactly deepspot=... and visium=..., got {sorted(generated)}")
    if kind != "swap" and eval_json.primary_regime(generated) is None:
        raise InputError(None, f"{kind}: --generated needs regime uni_ge or uni, got {sorted(generated)}")

    stores = GeneratedStores(generated)
    keys = stores.keys
    in_split = split_keys(split, split_name)
    check_in_split(keys, in_split, split, split_name, stores.first_path)
    real_set = read_features(real, keys)
    spot_labels = None
    if kind == "fid" and (expression is not None or spots):
        labels, label_sources = read_labels(expression, spots)
        spot_labels = labels_of(labels, keys, label_sources)
    tissue_boot = n_boot if n_boot_per_tissue is None else n_boot_per_tissue
    scores, per_tissue = {}, {}
    for name in stores:  # one generated store held at a time
        embedding = stores[name]
        scores[name] = metrics.fid_bootstrap(real_set.embedding, embedding, n_boot=n_boot, seed=seed, threads=threads,
                                             keep_replicates=True)
        log.info("%s FID %s: bootstrap mean %s [%s, %s], point %.3f, on %d spots", kind, name, scores[name]["mean"],
                 scores[name]["lo"], scores[name]["hi"], scores[name]["point"], len(keys))
        if spot_labels is not None:
            per_tissue[name] = metrics.fid_per_label(real_set.embedding, embedding, spot_labels,
                                                     min_spots=min_spots_per_tissue, n_boot=tissue_boot, seed=seed,
                                                     threads=threads)
        del embedding

    replicates = {name: score.pop("replicates") for name, score in scores.items()}
    if kind == "fid" and n_boot > 0:  # FID(regime) - FID(uncond) over the same spot resamples (demo-checks reads it)
        for name, difference in metrics.differences_from(replicates, "uncond").items():
            scores[name]["minus_uncond"] = difference
    features = {"real": str(real), "generated": {name: str(path) for name, path in generated.items()}}
    encoders = merge_impls(real_set.impls, *stores.impls.values())
    params = {"kind": kind, "split_name": split_name, "n_boot": n_boot, "seed": seed, "alpha": 0.05,
              "n_spots": len(keys)}
    inputs = [real, *generated.values(), split]
    common = dict(model=model, cohort=cohort, features=features, encoders=encoders)
    if kind == "swap":
        return eval_json.swap_fid_json(deepspot=scores["deepspot"], visium=scores["visium"], params=params,
                                    inputs=inputs, **common)
    if kind == "ood":
        check_seeded_subsample(keys, in_split, seed, split)
        return eval_json.ood_fid_json(regimes=scores, n_subsample=len(keys), seed=seed, params=params, inputs=inputs,
                                   **common)
    if spot_labels is not None:
        params.update(min_spots_per_tissue=min_spots_per_tissue, n_boot_per_tissue=tissue_boot)
        inputs += label_sources
    return eval_json.fid_json(regimes=scores, per_tissue=per_tissue, params=params, inputs=inputs, **common)


def check_seeded_subsample(keys: Sequence[str], in_split: Sequence[str], seed: int, split: str | Path) -> None:
    """Warn when the OOD spots are not the seeded subsample of the split (they should be)."""
    expected = metrics.subsample_keys(in_split, max_spots=len(keys), seed=seed)
    if sorted(expected) != sorted(keys):
        log.warning("the %d generated OOD spots are not the subsample of %s at seed %d", len(keys), split, seed)


# ---------------------------------------------------------------------------------------------
# Transcriptomic fidelity (Table 2)


def log1p_cp10k_sparse(counts: Any) -> sp.csr_matrix:
    """log1p of counts per 10k as sparse float32 (zeros stay zero); as `metrics.log1p_cp10k`."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    normalised = sp.csr_matrix(sp.diags(scale) @ counts)
    normalised.data = np.log1p(normalised.data)
    return normalised.astype(np.float32)


def hvg_columns(path: str | Path) -> np.ndarray:
    """Column indices of the highly variable genes of a cohort h5ad (all genes when unflagged)."""
    (var,) = read_h5ad_elements(path, "var")
    if "highly_variable" not in var:
        log.warning("%s has no highly_variable flags: the Oracle regresses all genes", path)
        return np.arange(len(var))
    return np.flatnonzero(var["highly_variable"].to_numpy(dtype=bool))


MIDNIGHT_GENE_SETS = ("protein_coding", "all")


def midnight_columns(path: str | Path, gene_set: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The genes Midnight+MLP regresses: the cohort's protein-coding genes (paper D.4; var["protein_coding"]
    and the list's record from the expression step) or all of them; with the record of the choice."""
    if gene_set not in MIDNIGHT_GENE_SETS:
        raise InputError(None, f"--midnight-genes must be one of {list(MIDNIGHT_GENE_SETS)}, got {gene_set!r}")
    var, uns = read_h5ad_elements(path, "var", "uns")
    if gene_set == "all":
        return np.arange(len(var)), {"name": "all", "n_genes": len(var)}
    return protein_coding_columns(var, uns, path, "use --midnight-genes all")


EXPRESSION_BLOCK_ROWS = 4096


def read_expression_log1p(path: str | Path, keys: Sequence[str], columns: Sequence[int] | None = None,
                          block_rows: int = EXPRESSION_BLOCK_ROWS) -> sp.csr_matrix:
    """log1p CP10k of layers["counts"] for `keys`, rows in that order: of all genes, or of `columns`
    only (the library size is over all genes either way).

    Reads layers["counts"] alone (not X nor obsm), `block_rows` cohort rows at a time, and keeps
    only the result: no float64 or whole-cohort copy of the counts. The values are those of
    `log1p_cp10k_sparse` of the whole counts' rows (normalising is row by row), then `[:, columns]`."""
    import h5py
    from anndata.io import sparse_dataset

    path = Path(path)
    obs_names = read_cohort_obs(path).index  # not found / unreadable: InputError naming the file
    rows = pd.Index(obs_names).get_indexer(pd.Index([str(k) for k in keys]))
    if (rows < 0).any():
        raise InputError(path, f"{int((rows < 0).sum())} spot(s) are not in the expression file, "
                               f"e.g. {keys[int(np.flatnonzero(rows < 0)[0])]}")
    with h5py.File(path, "r") as handle:
        if "layers" not in handle or "counts" not in handle["layers"]:
            raise InputError(path, 'no raw counts: layers["counts"] is missing')
        stored = handle["layers"]["counts"]
        if not isinstance(stored, h5py.Dataset):  # sparse (CSR or CSC) group
            stored = sparse_dataset(stored)
        width = stored.shape[1] if columns is None else len(columns)
        file_order = np.argsort(rows, kind="stable")
        sorted_rows = rows[file_order]
        pieces = []
        for start in range(0, len(obs_names), block_rows):
            lo, hi = np.searchsorted(sorted_rows, [start, start + block_rows])
            if lo == hi:
                continue
            counts = sp.csr_matrix(stored[start : start + block_rows])[sorted_rows[lo:hi] - start]
            if counts.data.size and (not np.isfinite(counts.data).all() or counts.data.min() < 0):
                raise InputError(path, 'layers["counts"] has negative or non-finite values: raw counts expected')
            normalised = log1p_cp10k_sparse(counts)
            pieces.append(normalised if columns is None else normalised[:, np.asarray(columns)])
    if not pieces:
        return sp.csr_matrix((0, width), dtype=np.float32)
    result = stack_rows(pieces)  # empties `pieces` as it fills the result: never both in memory
    if (np.diff(file_order) != 1).any():  # keys not in file order: put the rows back in key order
        result = result[np.argsort(file_order, kind="stable")]
    return result


def expression_gene_count(path: str | Path) -> int:
    """How many genes (var rows) a cohort h5ad has, read without its matrices."""
    return len(read_h5ad_elements(path, "var")[0])


REGRESSORS = ("oracle", "midnight_mlp")
REGRESSOR_FEATURES = {"oracle": "uni2h", "midnight_mlp": "midnight"}


def fit_regressor(
    kind: str,
    expression: str | Path,
    split: str | Path,
    features: str | Path,
    out: str | Path,
    *,
    ks: Sequence[int] = metrics.PAPER_KS,
    n_components: int = 256,
    mlp_hidden: Sequence[int] = (1024, 1024),
    mlp_max_iter: int = 200,
    seed: int = 42,
    midnight_genes: str = "protein_coding",
    mlp_impl: str = "sklearn",
    device: str = "auto",
) -> dict[str, Any]:
    """Fit one evaluation regressor on the real TRAIN spots of a cohort and save it (joblib) with
    what `auc` needs to apply it: the expression columns it regresses (Oracle: the HVGs;
    Midnight+MLP: the protein-coding or all genes), the gene-set record and the provenance.

    kind "oracle": UNI2-h features -> PCA(n_components) -> Ridge per k (`metrics.fit_oracle`);
    kind "midnight_mlp": Midnight features -> MLP (`metrics.fit_midnight_mlp`, impl sklearn or torch)."""
    import joblib

    if kind not in REGRESSORS:
        raise InputError(None, f"--regressor must be one of {list(REGRESSORS)}, got {kind!r}")
    train_keys = split_keys(split, TRAIN)
    if kind == "oracle":
        columns, gene_set = hvg_columns(expression), None  # the Oracle: top-k HVGs
    else:
        columns, gene_set = midnight_columns(expression, midnight_genes)
        log.info("Midnight+MLP regresses %d genes (%s)", len(columns), midnight_genes)
    n_genes = expression_gene_count(expression)
    train_expression = read_expression_log1p(expression, train_keys, columns)  # only the regressed genes
    train_features = read_features(features, train_keys)
    log.info("%s: fitting on %d train spots x %d genes (of %d)", kind, len(train_keys), len(columns), n_genes)
    started = time.perf_counter()
    if kind == "oracle":
        regressor = metrics.fit_oracle(train_features.embedding, train_expression, ks=ks,
                                       n_components=n_components, seed=seed)
        params = {"ks": list(ks), "pca": n_components, "seed": seed}
    else:
        regressor = metrics.fit_midnight_mlp(train_features.embedding, train_expression, ks=ks,
                                             hidden_layer_sizes=mlp_hidden, max_iter=mlp_max_iter, seed=seed,
                                             impl=mlp_impl, device=device)
        params = {"ks": list(ks), "mlp_hidden": list(mlp_hidden), "mlp_max_iter": mlp_max_iter, "seed": seed,
                  "midnight_genes": midnight_genes, "impl": mlp_impl, "device": device}
    fit_seconds = time.perf_counter() - started
    log.info("%s fitted in %.1f s", kind, fit_seconds)
    payload = {"kind": kind, "regressor": regressor, "columns": np.asarray(columns), "n_genes": int(n_genes),
               "gene_set": gene_set, "train_keys": len(train_keys), "encoders": train_features.impls,
               "features": str(features), "fit_seconds": fit_seconds,
               "provenance": provenance("eval-regressor", {"regressor": kind, **params},
                                        [expression, split, features])}
    with atomic_path(out) as tmp:
        joblib.dump(payload, tmp)
    return payload


def load_regressor(path: str | Path, kind: str) -> dict[str, Any]:
    """The payload `fit_regressor` saved; InputError naming the file when it is not one of `kind`."""
    import joblib

    path = Path(path)
    if not path.exists():
        raise InputError(path, "fitted regressor not found (made by stmdit eval-regressor)")
    try:
        payload = joblib.load(path)
    except Exception as exc:  # joblib/pickle raise many types for damaged or foreign files
        raise InputError(path, f"not a readable fitted regressor: {exc}") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise InputError(path, f"expected a fitted {kind} regressor, found {found!r}")
    return payload


def auc_document(
    expression: str | Path,
    split: str | Path,
    oracle: str | Path,
    real_uni: str | Path,
    gen_uni: Mapping[str, str | Path],
    model: str,
    cohort: str,
    *,
    midnight_mlp: str | Path | None = None,
    real_midnight: str | Path | None = None,
    gen_midnight: Mapping[str, str | Path] | None = None,
    n_boot: int = 1000,
    seed: int = 42,
    n_perm: int = 1000,
    noise_uni: str | Path | None = None,
    noise_midnight: str | Path | None = None,
) -> dict:
    """auc.json: the Oracle (and Midnight+MLP when given), fitted once per cohort on real train spots
    (`fit_regressor`, loaded here), scored on the generated test tiles, the real test tiles
    (ceiling) and the nulls: the permutation null (`n_perm` shuffles of the spot correspondence)
    and, when given, pure-noise tiles of the same spots (`noise_uni` / `noise_midnight`:
    `eval-features --noise-tiles-for` stores), as null["noise_tiles"]."""
    if len({midnight_mlp is None, real_midnight is None, not gen_midnight}) != 1:
        raise InputError(None, "Midnight+MLP needs --midnight-mlp, --real-midnight and --gen-midnight together")
    if noise_midnight is not None and real_midnight is None:
        raise InputError(noise_midnight, "--noise-midnight needs the Midnight+MLP inputs (--real-midnight, --gen-midnight)")
    fitted = {"oracle": load_regressor(oracle, "oracle")}
    if midnight_mlp is not None:
        fitted["midnight_mlp"] = load_regressor(midnight_mlp, "midnight_mlp")
    uni_stores = GeneratedStores(gen_uni)
    test_keys = uni_stores.keys
    check_in_split(test_keys, split_keys(split, TEST), split, TEST, uni_stores.first_path)
    n_genes = expression_gene_count(expression)
    for kind, payload in fitted.items():
        if payload["n_genes"] != n_genes:
            raise InputError(oracle if kind == "oracle" else midnight_mlp,
                             f"fitted on {payload['n_genes']} genes, but {expression} has {n_genes}")
    log.info("expression %s: %d test spots x %d genes (log1p CP10k)", expression, len(test_keys), n_genes)

    regressors, features, impls = {}, {}, []
    noise = read_noise_control(noise_uni, test_keys)
    # each regressor's genes read on their own (not all genes, then a copy of its columns)
    regressors["oracle"] = score_regressor(fitted["oracle"]["regressor"], real_uni, test_keys, uni_stores,
                                           read_scored_truth(expression, test_keys, fitted["oracle"]), n_boot, seed,
                                           n_perm, noise)
    features["uni2h"] = {"real": str(real_uni), "generated": {r: str(p) for r, p in gen_uni.items()},
                         "noise_tiles": str(noise_uni) if noise_uni else None}
    impls += [fitted["oracle"]["encoders"], *uni_stores.impls.values(), *(store.impls for store in noise.values())]
    del noise  # scored: not held while the Midnight+MLP is

    if midnight_mlp is not None:
        payload = fitted["midnight_mlp"]
        midnight_stores = GeneratedStores(gen_midnight, keys=test_keys)  # read in the UNI stores' spot order
        noise = read_noise_control(noise_midnight, test_keys)
        regressors["midnight_mlp"] = score_regressor(payload["regressor"], real_midnight, test_keys, midnight_stores,
                                                     read_scored_truth(expression, test_keys, payload),
                                                     n_boot, seed, n_perm, noise)
        regressors["midnight_mlp"]["genes"] = payload["gene_set"]
        features["midnight"] = {"real": str(real_midnight), "generated": {r: str(p) for r, p in gen_midnight.items()},
                                "noise_tiles": str(noise_midnight) if noise_midnight else None}
        impls += [payload["encoders"], *midnight_stores.impls.values(), *(store.impls for store in noise.values())]

    oracle_params = fitted["oracle"]["provenance"]["params"]
    params = {"ks": oracle_params["ks"], "pca": oracle_params["pca"], "n_boot": n_boot, "n_perm": n_perm, "seed": seed,
              "alpha": 0.05, "n_train": fitted["oracle"]["train_keys"], "n_test": len(test_keys),
              "regressors": {kind: payload["provenance"] for kind, payload in fitted.items()}}
    genes = "log1p CP10k of layers['counts'] (library size over all genes); Oracle: HVGs ranked by train variance"
    if midnight_mlp is not None:
        mlp_params = fitted["midnight_mlp"]["provenance"]["params"]
        params.update(mlp_hidden=mlp_params["mlp_hidden"], mlp_max_iter=mlp_params["mlp_max_iter"],
                      mlp_impl=mlp_params["impl"], midnight_genes=fitted["midnight_mlp"]["gene_set"])
        genes += f"; Midnight+MLP: {mlp_params['midnight_genes']} genes ranked by train variance"
    params["genes"] = genes
    inputs = [expression, split, oracle, real_uni, *gen_uni.values()]
    inputs += [midnight_mlp, real_midnight, *gen_midnight.values()] if midnight_mlp is not None else []
    inputs += [path for path in (noise_uni, noise_midnight) if path is not None]
    return eval_json.auc_json(model=model, cohort=cohort, regressors=regressors, features=features,
                           encoders=merge_impls(*impls), params=params, inputs=inputs)


def read_scored_truth(expression: str | Path, test_keys: Sequence[str], payload: Mapping[str, Any]) -> sp.csr_matrix:
    """The test spots' expression in the columns a fitted regressor was fitted on (payload["columns"]),
    holding only the top-max(k) genes it is scored on: the other columns are left empty (never read),
    so not all ~20,000 genes of every test spot are held while scoring."""
    columns = np.asarray(payload["columns"])
    regressor = payload["regressor"]
    top = np.asarray(regressor.gene_rank[: max(regressor.ks)])
    ranked = read_expression_log1p(expression, test_keys, columns[top])
    return sp.csr_matrix((ranked.data, top[ranked.indices], ranked.indptr), shape=(ranked.shape[0], len(columns)))


def read_noise_control(path: str | Path | None, test_keys: Sequence[str]) -> dict[str, FeatureSet]:
    """{"noise_tiles": the noise-tile features of the test spots}, or {} without a store."""
    return {} if path is None else {"noise_tiles": read_features(path, test_keys)}


def score_regressor(regressor, real_path, test_keys, generated: Mapping[str, np.ndarray], test_expression,
                    n_boot: int, seed: int, n_perm: int = 1000,
                    controls: Mapping[str, FeatureSet] | None = None) -> dict[str, Any]:
    real_test = read_features(real_path, test_keys)
    scored = metrics.transcriptomic_fidelity(regressor, test_expression, real_test.embedding,
                                             generated, n_boot=n_boot, seed=seed,
                                             n_perm=n_perm, controls={c: s.embedding for c, s in (controls or {}).items()})
    null = scored["null"]["empirical"]
    log.info("%s AUC: real %.4f, %s; null %.4f [%.4f, %.4f] over %d permutations", regressor.name,
             scored["real"]["auc"], ", ".join(f"{r} {v['auc']:.4f}" for r, v in scored["generated"].items()),
             null["auc"], null["lo"], null["hi"], null["n_perm"])
    if "noise_tiles" in scored["null"]:
        noise = scored["null"]["noise_tiles"]
        log.info("%s AUC of noise tiles: %.4f [%.4f, %.4f]", regressor.name, noise["auc"], noise["lo"], noise["hi"])
    return scored


# ---------------------------------------------------------------------------------------------
# Perturbation (Table 5)


@dataclass
class PerturbationRows:
    """Per-row pair, reference spot and alpha of a perturbation tile store."""

    path: Path
    keys: list[str]
    pair: np.ndarray
    ref_key: np.ndarray
    alpha: np.ndarray
    impls: dict[str, str]
    mode: str  # how the GE input was interpolated (stmdit.perturb.MODES)


def read_perturbation_rows(path: str | Path) -> PerturbationRows:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "perturbation tile store not found")
    try:
        group = zarr.open_group(str(path), mode="r")
        keys = [str(k) for k in string_values(group["spot_key"][:])]
        pair = string_values(group["pair"][:]).astype(str)
        ref_key = string_values(group["ref_key"][:]).astype(str)
        alpha = np.asarray(group["alpha"][:], dtype=np.float64)
    except Exception as exc:  # zarr raises several types for damaged or foreign stores
        raise InputError(path, f"not a perturbation store (needs arrays spot_key, pair, ref_key, alpha): {exc}") from None
    if not (len(keys) == len(pair) == len(ref_key) == len(alpha)) or not keys:
        raise InputError(path, f"spot_key, pair, ref_key, alpha need the same non-zero length, found "
                               f"{len(keys)}, {len(pair)}, {len(ref_key)}, {len(alpha)}")
    check_unique(keys, path)
    attrs = dict(group.attrs)
    mode = (attrs.get("perturbation") or {}).get("mode")
    if mode is None:
        raise InputError(path, "attrs perturbation.mode is missing (a store from before the centroid/spotwise "
                               "modes): sample it again with stmdit perturbed-tiles")
    return PerturbationRows(path, keys, pair, ref_key, alpha, encoder_impls(attrs), str(mode))


def split_pair(pair: str, source: str | Path) -> tuple[str, str]:
    """"Tumor->Stroma" -> ("Tumor", "Stroma")."""
    parts = pair.split(PAIR_SEPARATOR)
    if len(parts) != 2 or not all(parts):
        raise InputError(source, f"pair {pair!r} is not of the form Source{PAIR_SEPARATOR}Target")
    return parts[0], parts[1]


def pair_feature_cube(rows: PerturbationRows, embedding: np.ndarray, pair: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_ref, n_alpha, d) features of one pair (references in store order) and its sorted alphas.
    Every reference must have exactly one image per alpha."""
    selected = np.flatnonzero(rows.pair == pair)
    alphas = np.unique(rows.alpha[selected])
    references = pd.unique(rows.ref_key[selected])
    ref_index = pd.Index(references).get_indexer(rows.ref_key[selected])
    alpha_index = np.searchsorted(alphas, rows.alpha[selected])
    filled = np.zeros((len(references), len(alphas)), dtype=np.int64)
    np.add.at(filled, (ref_index, alpha_index), 1)
    if (filled != 1).any():
        r, a = np.argwhere(filled != 1)[0]
        raise InputError(rows.path, f"pair {pair}: reference {references[r]} has {filled[r, a]} images at alpha "
                                    f"{alphas[a]:g} (expected one per reference and alpha)")
    cube = np.empty((len(references), len(alphas), embedding.shape[1]), dtype=np.float64)
    cube[ref_index, alpha_index] = embedding[selected]
    return cube, alphas


def perturbation_document(
    features: str | Path,
    samples: str | Path,
    real: str | Path,
    expression: str | Path,
    split: str | Path,
    model: str,
    cohort: str,
    *,
    weight: float = 1.0,
    variant: str = "default",
) -> dict:
    """perturbation.json: per pair, H0-mini features of the images along alpha scored against the
    class centroids of the real TRAIN tiles (`metrics.perturbation_scores`).

    The uni_null variant (sampled with UNI nulled) is its own Table 5 row: its model id is
    "{model}@uni_null"."""
    if variant not in ("default", "uni_null"):
        raise InputError(None, f"--variant must be default or uni_null, got {variant!r}")
    rows = read_perturbation_rows(samples)
    generated = read_features(features)
    if set(generated.keys) != set(rows.keys):
        raise InputError(features, f"its {len(generated.keys)} spot keys are not those of {samples} ({len(rows.keys)})")
    embedding = generated.embedding[pd.Index(generated.keys).get_indexer(rows.keys)]

    labels, label_sources = read_labels(expression)
    train_keys = split_keys(split, TRAIN)
    train = read_features(real, train_keys)
    centroids = metrics.class_centroids(train.embedding, labels_of(labels, train_keys, label_sources))

    pairs, alphas = {}, None
    for pair in pd.unique(rows.pair):
        source, target = split_pair(pair, samples)
        absent = [label for label in (source, target) if label not in centroids]
        if absent:
            raise InputError(expression, f"pair {pair}: no train spot is labelled {absent} (labels: {sorted(centroids)})")
        cube, pair_alphas = pair_feature_cube(rows, embedding, pair)
        if alphas is not None and not np.array_equal(alphas, pair_alphas):
            raise InputError(samples, f"pair {pair} has alphas {pair_alphas.tolist()}, other pairs {alphas.tolist()}")
        alphas = pair_alphas
        scores = metrics.perturbation_scores(cube, alphas, centroids[source], centroids[target], weight)
        pairs[metrics.pair_label(source, target)] = {"source": source, "target": target, "pair": pair, **scores}
        log.info("perturbation %s: composite %.3f (transition %.3f, monotonicity %.3f) over %d references",
                 pair, scores["composite"], scores["transition"], scores["monotonicity"], scores["n_ref"])

    params = {"weight": weight, "variant": variant, "split": TRAIN, "centroids": "H0-mini, real train tiles per label",
              "mode": rows.mode}
    model_id = model if variant == "default" else f"{model}@uni_null"
    doc = eval_json.perturbation_json(model=model_id, cohort=cohort, pairs=pairs, alphas=alphas.tolist(),
                                   monotonicity_weight=weight, mode=rows.mode,
                                   encoders=merge_impls(train.impls, generated.impls, rows.impls),
                                   params=params, inputs=[features, samples, real, expression, split])
    doc.update(variant=variant, sampled_model=model)
    return doc


# ---------------------------------------------------------------------------------------------
# CLI


def _finish(out: Path, doc: Mapping[str, Any] | None, started: float, read: Iterable) -> None:
    if doc is not None:
        eval_json.write_eval_json(out, doc)
    log.info("read %s; wrote %s in %.1f s", ", ".join(str(p) for p in read), out, time.perf_counter() - started)


def run_eval_features(args: argparse.Namespace) -> Path:
    started = time.perf_counter()
    options = dict(weights=args.weights, arch=parse_arch(args.arch_json), allow_hub=args.allow_hub,
                   batch_size=args.batch_size, device=args.device, bf16=args.bf16)
    if args.noise_tiles_for is not None:
        out = extract_noise_features(args.noise_tiles_for, args.out, args.encoder, args.impl, split_name=args.split_name,
                                     tile_size=args.tile_size, seed=args.seed, **options)
    else:
        from stmdit.tile_decoder import StoreDecoder

        out = extract_features(args.images, args.out, args.encoder, args.impl, decoder=StoreDecoder.from_args(args),
                               **options)
    _finish(args.out, None, started, [args.images or args.noise_tiles_for])
    return out


def blas_threads(threads: int):
    """A context limiting BLAS/OpenMP to `threads` (the rule's threads), whatever the environment says."""
    from threadpoolctl import threadpool_limits

    if threads < 1:
        raise InputError(None, f"--threads must be at least 1, got {threads}")
    return threadpool_limits(limits=threads)


def run_fid(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    allowed = SWAP_CONDITIONS if args.kind == "swap" else eval_json.REGIMES
    generated = parse_named_paths(args.generated, "--generated", allowed)
    with blas_threads(args.threads):
        doc = fid_document(args.kind, args.real, generated, args.split, args.model, args.cohort, split_name=args.split_name,
                           expression=args.expression, spots=args.spots, n_boot=args.n_boot,
                           n_boot_per_tissue=args.n_boot_per_tissue, seed=args.seed,
                           min_spots_per_tissue=args.min_spots_per_tissue, threads=args.threads)
    _finish(args.out, doc, started, [args.real, *generated.values(), args.split])
    return doc


def run_eval_regressor(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    with blas_threads(args.threads):
        payload = fit_regressor(args.regressor, args.expression, args.split, args.features, args.out,
                                ks=parse_int_list(args.ks, "--ks"), n_components=args.pca,
                                mlp_hidden=parse_int_list(args.mlp_hidden, "--mlp-hidden"),
                                mlp_max_iter=args.mlp_max_iter, seed=args.seed, midnight_genes=args.midnight_genes,
                                mlp_impl=args.mlp_impl, device=args.device)
    _finish(args.out, None, started, [args.expression, args.split, args.features])
    return payload


def run_auc(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    gen_uni = parse_named_paths(args.gen_uni, "--gen-uni", eval_json.REGIMES)
    gen_midnight = parse_named_paths(args.gen_midnight or [], "--gen-midnight", eval_json.REGIMES)
    with blas_threads(args.threads):
        doc = auc_document(args.expression, args.split, args.oracle, args.real_uni, gen_uni, args.model, args.cohort,
                           midnight_mlp=args.midnight_mlp, real_midnight=args.real_midnight,
                           gen_midnight=gen_midnight, n_boot=args.n_boot, seed=args.seed, n_perm=args.n_perm,
                           noise_uni=args.noise_uni, noise_midnight=args.noise_midnight)
    read = [args.expression, args.split, args.oracle, args.real_uni, *gen_uni.values()]
    read += [path for path in (args.noise_uni, args.noise_midnight) if path is not None]
    if args.midnight_mlp:
        read += [args.midnight_mlp, args.real_midnight, *gen_midnight.values()]
    _finish(args.out, doc, started, read)
    return doc


def run_perturbation(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    doc = perturbation_document(args.features, args.tiles, args.real, args.expression, args.split, args.model,
                                args.cohort, weight=args.weight, variant=args.variant)
    _finish(args.out, doc, started, [args.features, args.tiles, args.real, args.expression, args.split])
    return doc


def _add_common(parser: argparse.ArgumentParser, n_boot: bool = True) -> None:
    if n_boot:
        parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over spots")
        parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", required=True, help="model id (as in the eval paths and the models file)")
    parser.add_argument("--cohort", required=True)
    parser.add_argument("--out", required=True, type=Path)


def register(subparsers: argparse._SubParsersAction) -> None:
    from stmdit.tile_decoder import TILES_DECODER_HELP, add_vae_options

    p = subparsers.add_parser("eval-features", help="encoder features of every tile of a samples/patches store")
    p.add_argument("--encoder", required=True, choices=EVAL_ENCODERS)
    p.add_argument("--impl", choices=("real", "smoke"), default="smoke")
    p.add_argument("--weights", help="local weights path, or a hub id (needs --allow-hub)")
    p.add_argument("--arch-json", help="JSON object of architecture overrides (tests, custom sizes)")
    p.add_argument("--allow-hub", action="store_true", help="allow loading weights from the Hugging Face hub")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="patches or tile store (tiles kept as latents are decoded)")
    source.add_argument("--noise-tiles-for", type=Path, metavar="SPLIT",
                        help="split parquet: encode a pure-noise tile for every spot of --split-name instead")
    p.add_argument("--split-name", default=TEST, help="with --noise-tiles-for: the split whose spots get noise tiles")
    p.add_argument("--tile-size", type=int, default=256, help="with --noise-tiles-for: tile side in px")
    p.add_argument("--seed", type=int, default=42, help="with --noise-tiles-for: noise seed")
    p.add_argument("--out", required=True, type=Path, help="output feature store (.zarr)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_bf16_option(p)
    add_vae_options(p, help_impl=TILES_DECODER_HELP, allow_hub=False)
    p.set_defaults(func=run_eval_features)

    p = subparsers.add_parser("fid", help="H0-mini FID of generated vs real test tiles with bootstrap CIs")
    p.add_argument("--real", required=True, type=Path, help="H0-mini features of the real tiles (features stage)")
    p.add_argument("--generated", required=True, nargs="+",
                   help="REGIME=store (uni_ge, uni, ge, uncond); --kind swap: deepspot=store visium=store")
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--split-name", default=TEST, help="the split the generated spots must belong to")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--expression", type=Path, help="cohort h5ad: obs label for per-tissue FID")
    labels.add_argument("--spots", nargs="+", type=Path, help="spots tables (key, label) for per-tissue FID")
    p.add_argument("--n-boot-per-tissue", type=int, default=None, help="resamples per tissue (default: --n-boot)")
    p.add_argument("--min-spots-per-tissue", type=int, default=50)
    p.add_argument("--kind", required=True, choices=sorted(FID_KINDS))
    p.add_argument("--threads", type=int, default=1, help="bootstrap replicates computed at once (the rule's threads)")
    _add_common(p)
    p.set_defaults(func=run_fid)

    p = subparsers.add_parser("eval-regressor", help="fit the Oracle or Midnight+MLP on a cohort's real train spots")
    p.add_argument("--regressor", required=True, choices=REGRESSORS)
    p.add_argument("--expression", required=True, type=Path, help="cohort h5ad (layers['counts'])")
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--features", required=True, type=Path,
                   help="real-tile features: UNI2-h for the Oracle, Midnight for Midnight+MLP")
    p.add_argument("--ks", default=",".join(map(str, metrics.PAPER_KS)), help="top-k gene grid, comma-separated")
    p.add_argument("--pca", type=int, default=256, help="Oracle PCA components")
    p.add_argument("--mlp-hidden", default="1024,1024", help="Midnight+MLP hidden layer sizes, comma-separated")
    p.add_argument("--mlp-max-iter", type=int, default=200)
    p.add_argument("--mlp-impl", choices=metrics.MLP_IMPLS, default="sklearn",
                   help="Midnight+MLP: sklearn MLPRegressor (the paper's, the reference) or the same MLP in torch")
    p.add_argument("--device", default="auto", help="torch MLP device: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--midnight-genes", choices=MIDNIGHT_GENE_SETS, default="protein_coding",
                   help="genes Midnight+MLP regresses: protein-coding (paper D.4, var['protein_coding']) or all")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (the rule's threads)")
    p.add_argument("--out", required=True, type=Path, help="fitted regressor (.joblib)")
    p.set_defaults(func=run_eval_regressor)

    p = subparsers.add_parser("auc", help="transcriptomic fidelity (Oracle, Midnight+MLP) of generated tiles")
    p.add_argument("--expression", required=True, type=Path, help="cohort h5ad (layers['counts'])")
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--oracle", required=True, type=Path, help="fitted Oracle (stmdit eval-regressor)")
    p.add_argument("--real-uni", required=True, type=Path, help="UNI2-h features of the real tiles")
    p.add_argument("--gen-uni", required=True, nargs="+", help="REGIME=store of UNI2-h features of generated tiles")
    p.add_argument("--midnight-mlp", type=Path, help="fitted Midnight+MLP (stmdit eval-regressor)")
    p.add_argument("--real-midnight", type=Path, help="Midnight features of the real tiles")
    p.add_argument("--gen-midnight", nargs="+", help="REGIME=store of Midnight features of generated tiles")
    p.add_argument("--n-perm", type=int, default=1000,
                   help="permutations of the spot correspondence for the measured null (Table 2 'Null' row)")
    p.add_argument("--noise-uni", type=Path, help="UNI2-h features of noise tiles of the test spots (eval-features "
                                                  "--noise-tiles-for): Table 2's noise-tile null")
    p.add_argument("--noise-midnight", type=Path, help="Midnight features of the same noise tiles")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (the rule's threads)")
    _add_common(p)
    p.set_defaults(func=run_auc)

    p = subparsers.add_parser("perturbation", help="tissue-level perturbation scores (Table 5)")
    p.add_argument("--features", required=True, type=Path, help="H0-mini features of the perturbation samples")
    p.add_argument("--tiles", required=True, type=Path, help="perturbation tile store (pair, ref_key, alpha)")
    p.add_argument("--real", required=True, type=Path, help="H0-mini features of the real tiles")
    p.add_argument("--expression", required=True, type=Path, help="cohort h5ad: obs label")
    p.add_argument("--split", required=True, type=Path)
    p.add_argument("--weight", type=float, default=1.0, help="monotonicity weight of the composite")
    p.add_argument("--variant", choices=("default", "uni_null"), default="default")
    _add_common(p, n_boot=False)
    p.set_defaults(func=run_perturbation)
