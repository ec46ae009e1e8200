"""Pseudo-labels (PTPL): DeepSpot (Nonchev et al., 2025) predicts spot expression from morphology.

    stmdit deepspot-train --expression E.h5ad --features F.zarr --spots S.parquet ... --out-model DIR
        --split results/splits/{cohort}.parquet --out-lodo results/ptpl/{cohort}_lodo.json
        [--genes protein_coding|hvg --epochs 20 --batch-size 512 --seed 0 ...]
    stmdit deepspot-predict --model DIR --features F.zarr --spots S.parquet ... --out results/ptpl/{cohort}.h5ad

Inputs per spot come from the cohort's `deepspot_fm` feature store: the tile embedding, the 3x3
sub-tile embeddings, and the tile embeddings of its radius-1 neighbours on the Visium hex grid (same
row, column +-2; rows +-1, column +-1; array coordinates of the spots table), zeros where a neighbour
has no features (not in tissue, filtered out, off the slide).

Model (DeepSpot's "spot_subspot_neighbors" context): one ensemble of phi = Linear -> Dropout -> ReLU
(512) maps every embedding, taking the median over the ensemble (the three inputs share it, as in
DeepSpot); the sub-tiles are sum-pooled, the neighbours max-pooled; the three are concatenated and an
ensemble of rho heads (Dropout -> Linear -> Dropout 0.1, DeepSpot's Rho) is averaged.

Targets (--genes): every protein-coding gene of the training cohort (var["protein_coding"] of the
expression file, from the list of stmdit.genesets; paper A.2), in the file's gene order, or its HVGs
(var["highly_variable"], in highly_variable_rank order), as log1p(CP10k) of layers["counts"], library
size over all genes; standardised per gene on each model's training spots when asked. The model keeps
that mean and scale as buffers and `DeepSpot.predict` un-standardises, so no caller does it again.
AdamW, MSE; every model is trained with the same seed. The gene set, its source list and counts go to
the lodo JSON, the model config and the PTPL h5ad (uns["gene_set"]).

deepspot-train reads the cohort's split (--split, results/splits/{cohort}.parquet): no model ever
learns from a validation or test spot. The fold plan: one model per training donor (a donor with
train/val spots), trained on the train-split spots of the other training donors, labels every spot of
that donor; one model trained on the train-split spots of all training donors labels the test donors
and every other cohort. Nothing of a test donor reaches a model that labels a training donor.
The plan (per model: training donors, splits and spot counts, the donors and spots it labels), the
out-of-fold Pearson r per gene over the training donors' spots, with two baselines on the same folds
and features (RidgeCV and an MLPRegressor on [tile, mean sub-tile, mean neighbour]), and the
all-training-donor model's r on the test donors go to --out-lodo and a table in the log.
Model directory: config.json (with the fold plan), all_donors.safetensors (all training donors),
lodo-NN.safetensors (one per training donor).

deepspot-predict: the kept spots of the spots tables (the feature store's rows). A spot of a training
donor of the training cohort is predicted by the fold model that never saw that donor; any other spot
(the test donors, an H&E-only cohort) by the all-training-donor model. Negatives are clipped to 0.
Output h5ad: obs = spot key (sample, donor, cohort, ptpl_model, fold_donor, out_of_fold); var = the
predicted genes with the training cohort's highly_variable and highly_variable_rank (so the
CancerFoundation step picks HVGs in the same order as on Visium counts, among the predicted genes)
and protein_coding; X = predictions (log1p CP10k, float32); layers["counts"] = expm1(X) pseudo-counts
(CSR float32); obsm["spatial"]; uns["stmdit"] provenance, uns["gene_set"], and uns["fold_plan"], the
plan of the models that made it (a JSON string).

Memory (issue 16: no spots x genes matrix is dense in full): the targets are read from the h5ad a
block of spots at a time and kept as compact counts (`deepspot_targets.TargetRows`, ~4 bytes per
non-zero); a training batch expands and densifies its own rows; the per-gene standardisation is computed on dense gene blocks of at most
MOMENT_BLOCK_BYTES (one block, bit-identical to the dense moments, when all genes fit); out-of-fold
and test-donor Pearson r come from float64 running sums (`PearsonSums`), a batch of predictions at a
time; the PTPL h5ad is written a block of spots at a time (X a chunked dense float32 dataset,
layers["counts"] an appended CSR) and read back by row blocks. The RidgeCV / MLP baselines need
sklearn's dense targets: they run only when about BASELINE_COPIES float64 copies of spots x genes fit
in --baselines-max-gb (config deepspot.baselines_max_gb), otherwise the log and the lodo JSON
("baselines") say they were skipped. A cohort whose sparse targets and features exceed the memory
left to the job stops with one line naming the file and the memory it needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stmdit.cli import add_bf16_option
from stmdit.deepspot_targets import (
    MAX_BYTES_PER_NONZERO,
    PROTEIN_CODING,
    TARGET_GENE_SETS,
    TARGET_SUM,
    TrainingCohort,
    read_training_cohort,
    target_rows,
)
from stmdit.encoders.base import autocast, resolve_device
from stmdit.errors import InputError
from stmdit.features import open_feature_store, read_feature_rows
from stmdit.h5ad_rows import H5adRows, write_h5ad_by_rows
from stmdit.memory import return_large_blocks_to_os
from stmdit.memory_budget import is_out_of_memory, out_of_memory, require
from stmdit.provenance import atomic_path, provenance, write_json
from stmdit.split_table import TEST, TRAIN, VAL, read_split_table
from stmdit.spots_table import read_kept_spots

log = logging.getLogger(__name__)

# (d array_row, d array_col) of the six radius-1 neighbours on Visium's hex grid (doubled columns)
HEX_NEIGHBOUR_OFFSETS = ((0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1))
N_SUBTILES = 9
RHO_OUTPUT_DROPOUT = 0.1
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-1, 4, 6))
MODEL_CONFIG = "config.json"
ALL_DONORS = "all_donors"
DENSE_BLOCK_ROWS = 1024  # spots expanded at a time into a dense gene block
MOMENT_BLOCK_BYTES = 64 << 20  # dense (train spots x genes) float32 per gene block of the target moments
PEARSON_BLOCK_ROWS = 256  # spots per float64 update of the Pearson sums
BASELINE_COPIES = 6  # dense float64 (spots x genes) arrays sklearn's RidgeCV (GCV) and MLP fits hold at once


# ---------------------------------------------------------------------------------------------
# Inputs: spot, sub-tile and neighbour embeddings


def hex_neighbour_index(sample: Sequence[str], array_row: Sequence[int], array_col: Sequence[int]) -> np.ndarray:
    """(N, 6) row of each spot's hex neighbours within its sample (HEX_NEIGHBOUR_OFFSETS order), -1 if absent."""
    sample = np.asarray(sample, dtype=object)
    row = np.asarray(array_row, dtype=np.int64)
    col = np.asarray(array_col, dtype=np.int64)
    positions = pd.MultiIndex.from_arrays([sample, row, col])
    if not positions.is_unique:
        first = positions[positions.duplicated()][0]
        raise ValueError(f"two spots share sample {first[0]!r} array position ({first[1]}, {first[2]})")
    index = np.full((len(row), len(HEX_NEIGHBOUR_OFFSETS)), -1, dtype=np.int64)
    for j, (d_row, d_col) in enumerate(HEX_NEIGHBOUR_OFFSETS):
        index[:, j] = positions.get_indexer(pd.MultiIndex.from_arrays([sample, row + d_row, col + d_col]))
    return index


def neighbour_embeddings(tile: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, K, D) tile embeddings of the neighbour rows `index` (B, K); zeros where index is -1."""
    present = (index >= 0).unsqueeze(-1)
    return tile[index.clamp(min=0)] * present.to(tile.dtype)


@dataclass
class SpotFeatures:
    """DeepSpot's inputs for the spots `keys`: tile (N, D) and sub-tiles (N, 9, D) as stored (float16 in a
    deepspot_fm store; each batch converts its own rows to float32),
    hex neighbours (N, 6) rows into these spots (-1 = none), and the store's encoder description."""

    keys: list[str]
    tile: torch.Tensor
    subtiles: torch.Tensor
    neighbours: torch.Tensor
    encoder: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.tile.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        tile = self.tile[rows].float()
        subtiles = self.subtiles[rows].float()
        neighbours = neighbour_embeddings(self.tile, self.neighbours[rows]).float()
        return tile.to(device), subtiles.to(device), neighbours.to(device)

    def pooled(self) -> np.ndarray:
        """(N, 3D) baseline features: tile, mean sub-tile, mean of the present neighbours (0 if none)."""
        index = self.neighbours
        present = (index >= 0).float()
        tile = self.tile.float()
        neighbour_sum = (neighbour_embeddings(tile, index) * present.unsqueeze(-1)).sum(1)
        neighbour_mean = neighbour_sum / present.sum(1, keepdim=True).clamp(min=1)
        return torch.cat([tile, self.subtiles.float().mean(1), neighbour_mean], dim=1).numpy()


def load_spot_features(store_path: str | Path, spots: pd.DataFrame) -> SpotFeatures:
    """Features of `spots` (columns key, sample, array_row, array_col), in that order, from a
    deepspot_fm store. Neighbours are looked up among these spots only."""
    store_path = Path(store_path)
    group = open_feature_store(store_path)
    for name in ("embedding", "subtiles"):
        if name not in group:
            raise InputError(store_path,
                             f"no array {name!r}: DeepSpot needs a deepspot_fm store (tile + 3x3 sub-tiles)")
    dim = group["embedding"].shape[1]
    if tuple(group["subtiles"].shape[1:]) != (N_SUBTILES, dim):
        raise InputError(store_path,
                         f"subtiles have shape {group['subtiles'].shape[1:]}, expected ({N_SUBTILES}, {dim})")
    keys = [str(k) for k in spots["key"]]
    rows = read_feature_rows(store_path, keys, ["embedding", "subtiles"])
    try:
        neighbours = hex_neighbour_index(spots["sample"].astype(str), spots["array_row"], spots["array_col"])
    except ValueError as exc:
        raise InputError(store_path, f"spots of this store: {exc}") from None
    encoder = dict(group.attrs.get("encoder") or {})
    n_isolated = int((neighbours < 0).all(axis=1).sum())
    log.info("read %s: %d spots, %d-d tile + %dx%d sub-tiles (%s); %.1f neighbours per spot, %d without any",
             store_path, len(keys), dim, N_SUBTILES, dim, encoder.get("name", "?"),
             float((neighbours >= 0).sum(1).mean()), n_isolated)
    return SpotFeatures(
        keys=keys,
        tile=torch.as_tensor(np.asarray(rows["embedding"])),
        subtiles=torch.as_tensor(np.asarray(rows["subtiles"])),
        neighbours=torch.as_tensor(neighbours),
        encoder=encoder,
    )


def read_cohort_spots(spots_paths: Sequence[str | Path]) -> pd.DataFrame:
    """Kept spots of the spots tables, in the given order, with the columns DeepSpot needs."""
    tables = []
    for path in spots_paths:
        table = read_kept_spots(path)
        missing = {"array_row", "array_col", "cohort"} - set(table.columns)
        if missing:
            raise InputError(path, f"spots table lacks column(s) {sorted(missing)}")
        tables.append(table)
    spots = pd.concat(tables, ignore_index=True)
    where = ", ".join(str(p) for p in spots_paths)
    if spots.empty:
        raise InputError(where, "no kept spots (keep is False everywhere)")
    if spots["key"].duplicated().any():
        raise InputError(where, f"spot key {spots['key'][spots['key'].duplicated()].iloc[0]} appears twice")
    log.info("read %d spots tables: %d kept spots of %d samples, %d donors", len(spots_paths), len(spots),
             spots["sample"].nunique(), spots["donor"].nunique())
    return spots


# ---------------------------------------------------------------------------------------------
# The model


class EnsembleLinear(nn.Module):
    """`n_members` independent Linear layers, initialised like torch's Linear from `generator`."""

    def __init__(self, in_features: int, out_features: int, n_members: int, generator: torch.Generator):
        super().__init__()
        bound = 1.0 / in_features**0.5
        self.weight = nn.Parameter(torch.empty(n_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n_members, out_features))
        nn.init.uniform_(self.weight, -bound, bound, generator=generator)
        nn.init.uniform_(self.bias, -bound, bound, generator=generator)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """Every member on the same input: (..., in) -> (..., n_members, out)."""
        return torch.einsum("...i,nio->...no", x, self.weight) + self.bias

    def memberwise(self, x: torch.Tensor) -> torch.Tensor:
        """Member m on x[..., m, :]: (..., n_members, in) -> (..., n_members, out)."""
        return torch.einsum("...ni,nio->...no", x, self.weight) + self.bias


class DeepSpot(nn.Module):
    """Deep-set regressor from a spot's tile, sub-tile and neighbour embeddings to its genes.

    `forward` returns the standardised predictions the loss sees; `predict` returns log1p(CP10k).
    """

    def __init__(self, input_dim: int, n_genes: int, hidden_dim: int = 512, n_ensemble: int = 10,
                 dropout: float = 0.3, seed: int = 0):
        super().__init__()
        self.config = {"input_dim": int(input_dim), "n_genes": int(n_genes), "hidden_dim": int(hidden_dim),
                       "n_ensemble": int(n_ensemble), "dropout": float(dropout)}
        generator = torch.Generator().manual_seed(int(seed))
        self.dropout = float(dropout)
        self.phi = EnsembleLinear(input_dim, hidden_dim, n_ensemble, generator)
        self.rho = EnsembleLinear(3 * hidden_dim, n_genes, n_ensemble, generator)
        self.register_buffer("target_mean", torch.zeros(n_genes))
        self.register_buffer("target_scale", torch.ones(n_genes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """phi: (..., D) -> (..., hidden), the median over the ensemble."""
        h = F.relu(F.dropout(self.phi.shared(x), self.dropout, self.training))
        return h.median(dim=-2).values

    def forward(self, tile: torch.Tensor, subtiles: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        n_sub = subtiles.shape[1]
        h = self.embed(torch.cat([tile.unsqueeze(1), subtiles, neighbours], dim=1))
        pooled = torch.cat([h[:, 0], h[:, 1:1 + n_sub].sum(1), h[:, 1 + n_sub:].max(1).values], dim=1)
        members = pooled.unsqueeze(1).expand(-1, self.config["n_ensemble"], -1)
        out = self.rho.memberwise(F.dropout(members, self.dropout, self.training))
        return F.dropout(out, RHO_OUTPUT_DROPOUT, self.training).mean(dim=1)

    def predict(self, tile: torch.Tensor, subtiles: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """Predictions in the targets' units (log1p CP10k): the only place standardisation is undone."""
        return self(tile, subtiles, neighbours).float() * self.target_scale + self.target_mean


@dataclass(frozen=True)
class TrainingConfig:
    hidden_dim: int = 512
    n_ensemble: int = 10
    dropout: float = 0.3
    lr: float = 1e-4
    weight_decay: float = 1e-6
    epochs: int = 20
    batch_size: int = 512
    standardize: bool = True
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    compile: bool = False


def gene_blocks(n_rows: int, n_genes: int, max_bytes: int = MOMENT_BLOCK_BYTES) -> list[tuple[int, int]]:
    """Column ranges whose dense float32 (n_rows x width) blocks take at most `max_bytes` (one range of
    every gene when they fit)."""
    width = max(1, int(max_bytes) // (4 * max(1, n_rows)))
    return [(start, min(start + width, n_genes)) for start in range(0, n_genes, width)]


def dense_columns(targets, rows: np.ndarray, start: int, stop: int, block_rows: int = DENSE_BLOCK_ROWS) -> np.ndarray:
    """targets[rows][:, start:stop] as dense float32, filled `block_rows` spots at a time."""
    out = np.empty((len(rows), stop - start), dtype=np.float32)
    whole = start == 0 and stop == targets.shape[1]
    for first in range(0, len(rows), block_rows):
        block = targets[rows[first:first + block_rows]] if whole else targets[rows[first:first + block_rows], start:stop]
        out[first:first + block_rows] = block.toarray() if sp.issparse(block) else block
    return out


def target_moments(targets, rows: np.ndarray, max_bytes: int = MOMENT_BLOCK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-gene mean and population standard deviation (float32) of targets[rows], by torch on dense
    gene blocks of at most `max_bytes`: when every gene fits in one block, bit-identical to the moments
    of the dense (rows x genes) matrix."""
    rows = np.asarray(rows, dtype=np.int64)
    n_genes = targets.shape[1]
    mean, std = torch.empty(n_genes), torch.empty(n_genes)
    for start, stop in gene_blocks(len(rows), n_genes, max_bytes):
        y = torch.as_tensor(dense_columns(targets, rows, start, stop))
        mean[start:stop] = y.mean(dim=0)
        std[start:stop] = y.std(dim=0, unbiased=False)
    return mean, std


def train_deepspot(features: SpotFeatures, targets, rows: np.ndarray, config: TrainingConfig,
                   desc: str = "deepspot") -> DeepSpot:
    """A DeepSpot model trained on the spots `rows` of `features` with targets[rows] (log1p CP10k; CSR
    or dense, each batch densifies its own rows). Same inputs and config -> the same model on the same
    device."""
    rows = np.asarray(rows, dtype=np.int64)
    device = resolve_device(config.device)
    model = DeepSpot(features.dim, targets.shape[1], config.hidden_dim, config.n_ensemble, config.dropout,
                     seed=config.seed)
    if config.standardize:
        mean, scale = target_moments(targets, rows)
        model.target_mean.copy_(mean)
        model.target_scale.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))
    model.to(device).train()
    step = torch.compile(model) if config.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = np.random.default_rng(config.seed)
    fork_devices = [device] if device.type == "cuda" else []
    target_mean, target_scale = model.target_mean.cpu(), model.target_scale.cpu()
    with torch.random.fork_rng(devices=fork_devices, device_type=device.type):
        torch.manual_seed(config.seed)
        progress = tqdm(range(config.epochs), desc=desc, unit="epoch", file=sys.stderr, mininterval=5.0)
        for epoch in progress:
            permutation = order.permutation(len(rows))
            total = 0.0
            for start in range(0, len(rows), config.batch_size):
                batch = permutation[start:start + config.batch_size]
                inputs = features.batch(rows[batch], device)
                y = (torch.as_tensor(target_rows(targets, rows[batch])) - target_mean) / target_scale
                with autocast(device, config.bf16):
                    prediction = step(*inputs)
                loss = F.mse_loss(prediction.float(), y.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            progress.set_postfix(mse=f"{total / len(rows):.4f}")
            log.debug("%s epoch %d: training MSE %.4f (standardised units)", desc, epoch + 1, total / len(rows))
    model.zero_grad(set_to_none=True)  # the last step's gradients are as large as the weights
    return model.eval()


@torch.inference_mode()
def predict_log1p(model: DeepSpot, features: SpotFeatures, rows: np.ndarray, batch_size: int = 1024,
                  device: str = "auto", bf16: bool = False, clip: bool = True) -> np.ndarray:
    """(len(rows), G) float32 predictions (log1p CP10k) of the spots `rows`; negatives -> 0 when `clip`."""
    rows = np.asarray(rows, dtype=np.int64)
    target = resolve_device(device)
    model = model.to(target).eval()
    out = np.zeros((len(rows), model.config["n_genes"]), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        inputs = features.batch(rows[start:start + batch_size], target)
        with autocast(target, bf16):
            out[start:start + batch_size] = model.predict(*inputs).float().cpu().numpy()
    return np.maximum(out, 0.0) if clip else out


# ---------------------------------------------------------------------------------------------
# Leave-one-donor-out evaluation


@dataclass(frozen=True)
class Fold:
    """One model of the fold plan: it trains on `train_rows` and labels `label_rows`.
    `held_out_donor` is "" for the model trained on all training donors."""

    held_out_donor: str
    train_rows: np.ndarray
    label_rows: np.ndarray


@dataclass(frozen=True)
class SplitRoles:
    """What the cohort's split (results/splits/{cohort}.parquet) allows DeepSpot: only spots of
    split "train" are trained on; validation and test spots are labelled, never learnt from."""

    path: Path
    split: np.ndarray  # per cohort spot: train / val / test, "" where the split does not list it
    training_donors: list[str]  # donors with train or val spots
    test_donors: list[str]

    @property
    def trainable(self) -> np.ndarray:
        return self.split == TRAIN


def read_split_roles(path: str | Path, keys: Sequence[str], donors: Sequence[str]) -> SplitRoles:
    """The split of each spot of the training cohort (`keys`, `donors` in the expression file's order)."""
    path = Path(path)
    table = read_split_table(path, ["key", "donor", "split"]).set_index("key")
    donors = np.asarray(donors, dtype=object).astype(str)
    rows = table.index.get_indexer(pd.Index(keys))
    listed = rows >= 0
    if not listed.any():
        raise InputError(path, "none of the training cohort's spots is in this split (a split of another cohort?)")
    split = np.where(listed, table["split"].to_numpy()[rows.clip(0)], "").astype(str)
    mismatch = np.flatnonzero(listed & (table["donor"].to_numpy()[rows.clip(0)] != donors))
    if mismatch.size:
        k = mismatch[0]
        raise InputError(path, f"spot {keys[k]} belongs to donor {table['donor'].iloc[rows[k]]!r} here but to "
                               f"{donors[k]!r} in the expression file")
    test_donors = sorted(set(donors[split == TEST].tolist()))
    training_donors = sorted(set(donors[np.isin(split, [TRAIN, VAL])].tolist()))
    both = sorted(set(test_donors) & set(training_donors))
    if both:
        raise InputError(path, f"donor(s) {both} have test spots and train/val spots: the split is not donor-level")
    unsplit = sorted(set(donors.tolist()) - set(test_donors) - set(training_donors))
    if unsplit:
        raise InputError(path, f"donor(s) {unsplit} of the training cohort have no spot in the split")
    return SplitRoles(path, split, training_donors, test_donors)


def donor_folds(donors: Sequence[str], roles: SplitRoles) -> list[Fold]:
    """One fold per training donor (sorted): it labels every spot of that donor and trains on the
    train-split spots of the other training donors. The test donors take part in no fold."""
    donors = np.asarray(donors, dtype=object).astype(str)
    if len(roles.training_donors) < 2:
        raise InputError(roles.path, "leave-one-donor-out needs at least 2 training donors (train/val spots), "
                                     f"found {roles.training_donors}")
    folds = [Fold(d, np.flatnonzero(roles.trainable & (donors != d)), np.flatnonzero(donors == d))
             for d in roles.training_donors]
    for fold in folds:
        if fold.train_rows.size == 0:
            raise InputError(roles.path, f"the fold that labels donor {fold.held_out_donor} has no train-split "
                                         "spot of another donor to learn from")
    return folds


def all_training_donors_fold(donors: Sequence[str], roles: SplitRoles) -> Fold:
    """The model of all training donors (train-split spots): it labels the test donors' spots (and
    every spot of another cohort, at prediction)."""
    donors = np.asarray(donors, dtype=object).astype(str)
    return Fold("", np.flatnonzero(roles.trainable), np.flatnonzero(np.isin(donors, roles.test_donors)))


def fold_plan(folds: Sequence[Fold], final: Fold, roles: SplitRoles, donors: Sequence[str], cohort: str) -> dict:
    """Which spots each model trains on and which it labels, derived from the rows themselves."""
    donors = np.asarray(donors, dtype=object).astype(str)

    def entry(fold: Fold, model: str, weights: str) -> dict[str, Any]:
        labelled = roles.split[fold.label_rows]
        return {
            "model": model,
            "weights": weights,
            "held_out_donor": fold.held_out_donor,
            "train_donors": sorted(set(donors[fold.train_rows].tolist())),
            "train_splits": sorted(set(roles.split[fold.train_rows].tolist())),
            "n_train_spots": int(fold.train_rows.size),
            "labels": {"cohort": cohort, "donors": sorted(set(donors[fold.label_rows].tolist())),
                       "n_spots": int(fold.label_rows.size),
                       "n_by_split": {s or "unsplit": int((labelled == s).sum()) for s in sorted(set(labelled.tolist()))}},
        }

    final_entry = entry(final, ALL_DONORS, weights_name(None))
    final_entry["labels"]["other_cohorts"] = f"every spot of a cohort other than {cohort}"
    return {
        "split": str(roles.path),
        "cohort": cohort,
        "training_donors": list(roles.training_donors),
        "test_donors": list(roles.test_donors),
        "trained_on": f"spots of split {TRAIN!r} only: validation and test spots label, never train",
        "folds": [entry(f, f"lodo:{f.held_out_donor}", weights_name(f.held_out_donor, k)) for k, f in enumerate(folds)],
        "all_training_donors": final_entry,
    }


def pearson_per_gene(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Pearson r of each column; NaN where either column is constant (the dense two-pass reference of
    `PearsonSums`)."""
    p = np.asarray(predicted, dtype=np.float64)
    o = np.asarray(observed, dtype=np.float64)
    p = p - p.mean(axis=0)
    o = o - o.mean(axis=0)
    denominator = np.sqrt((p * p).sum(axis=0) * (o * o).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (p * o).sum(axis=0) / denominator, np.nan)


class PearsonSums:
    """Per-gene Pearson r between predictions and observations from running float64 sums over blocks
    of spots: count, means, centred sums of squares and co-moment, merged pairwise (Chan, Golub and
    LeVeque), so r equals the two-pass `pearson_per_gene` of the stacked blocks to float rounding.
    A gene whose predictions or observations are constant has r NaN."""

    def __init__(self, n_genes: int):
        self.n = 0
        self.mean = np.zeros((2, n_genes))  # predicted, observed
        self.m2 = np.zeros((2, n_genes))
        self.co = np.zeros(n_genes)
        self.low = np.full((2, n_genes), np.inf)
        self.high = np.full((2, n_genes), -np.inf)

    def add(self, predicted: np.ndarray, observed: np.ndarray) -> "PearsonSums":
        for start in range(0, len(predicted), PEARSON_BLOCK_ROWS):
            block = np.stack([np.asarray(predicted[start:start + PEARSON_BLOCK_ROWS], dtype=np.float64),
                              np.asarray(observed[start:start + PEARSON_BLOCK_ROWS], dtype=np.float64)])  # (2, b, G)
            mean = block.mean(axis=1)
            centred = block - mean[:, None, :]
            part = PearsonSums(block.shape[2])
            part.n, part.mean = block.shape[1], mean
            part.m2 = (centred * centred).sum(axis=1)
            part.co = (centred[0] * centred[1]).sum(axis=0)
            part.low, part.high = block.min(axis=1), block.max(axis=1)
            self.merge(part)
        return self

    def merge(self, other: "PearsonSums") -> "PearsonSums":
        if other.n == 0:
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        weight = self.n * other.n / n
        self.m2 = self.m2 + other.m2 + delta * delta * weight
        self.co = self.co + other.co + delta[0] * delta[1] * weight
        self.mean = self.mean + delta * (other.n / n)
        self.low, self.high = np.minimum(self.low, other.low), np.maximum(self.high, other.high)
        self.n = n
        return self

    def r(self) -> np.ndarray:
        varies = (self.high > self.low).all(axis=0)
        denominator = np.sqrt(self.m2[0] * self.m2[1])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(varies & (denominator > 0), self.co / denominator, np.nan)


def summarise_pearson(r: np.ndarray) -> dict[str, Any]:
    defined = r[np.isfinite(r)]
    return {
        "median": float(np.median(defined)) if defined.size else None,
        "mean": float(np.mean(defined)) if defined.size else None,
        "n_genes": int(defined.size),
    }


def baseline_memory_bytes(n_spots: int, n_genes: int) -> int:
    """What sklearn's RidgeCV and MLP baselines hold: dense float64 (spots x genes) arrays."""
    return BASELINE_COPIES * 8 * int(n_spots) * int(n_genes)


def baseline_predictions(pooled: np.ndarray, targets, fold: Fold, seed: int,
                         mlp_hidden: int, mlp_max_iter: int) -> dict[str, np.ndarray]:
    """Out-of-fold predictions (clipped at 0) of RidgeCV and an MLPRegressor on standardised features.
    sklearn fits dense targets: the caller runs them only where `baseline_memory_bytes` fits."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import RidgeCV
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = pooled[fold.train_rows], target_rows(targets, fold.train_rows)
    x_test = pooled[fold.label_rows]
    ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
    mlp = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(mlp_hidden,), max_iter=mlp_max_iter,
                                                       random_state=seed))
    out = {}
    for name, estimator in (("ridge", ridge), ("mlp", mlp)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator.fit(x_train, y_train)
        out[name] = np.maximum(np.asarray(estimator.predict(x_test), dtype=np.float32).reshape(len(x_test), -1), 0.0)
    return out


def lodo_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [f"{'model':<10} {'median r':>9} {'mean r':>9} {'genes':>6}"]
    for name, s in summary.items():
        median = "nan" if s["median"] is None else f"{s['median']:.4f}"
        mean = "nan" if s["mean"] is None else f"{s['mean']:.4f}"
        lines.append(f"{name:<10} {median:>9} {mean:>9} {s['n_genes']:>6}")
    return "\n".join(lines)


@dataclass
class LodoResult:
    folds: list[Fold]
    models: dict[str, DeepSpot]  # held-out donor -> model
    rows: np.ndarray  # the spots the folds label (the training donors'), where pearson is measured
    pearson: dict[str, np.ndarray]  # method -> (G,) r on the pooled out-of-fold spots
    per_donor: dict[str, dict[str, dict[str, Any]]]  # method -> donor -> summary


def fold_pearson(features: SpotFeatures, targets, fold: Fold, config: TrainingConfig,
                 pooled: np.ndarray | None, mlp_hidden: int, mlp_max_iter: int, predict_batch_size: int = 1024,
                 model: DeepSpot | None = None) -> tuple[DeepSpot, dict[str, PearsonSums]]:
    """The fold's DeepSpot model (trained here unless given) and the Pearson sums of its predictions of
    the labelled spots against their targets, a batch of spots at a time, with the baselines' on the
    same rows when `pooled` features are given."""
    name = f"lodo {fold.held_out_donor}" if fold.held_out_donor else "all training donors"
    if model is None:
        model = train_deepspot(features, targets, fold.train_rows, config, desc=name)
    n_genes = targets.shape[1]
    sums = {"deepspot": PearsonSums(n_genes)}
    for start in range(0, len(fold.label_rows), predict_batch_size):
        rows = fold.label_rows[start:start + predict_batch_size]
        predicted = predict_log1p(model, features, rows, predict_batch_size, config.device, config.bf16)
        sums["deepspot"].add(predicted, target_rows(targets, rows))
    if pooled is not None:
        for method, predicted in baseline_predictions(pooled, targets, fold, config.seed, mlp_hidden,
                                                      mlp_max_iter).items():
            sums[method] = PearsonSums(n_genes)
            for start in range(0, len(fold.label_rows), predict_batch_size):
                rows = fold.label_rows[start:start + predict_batch_size]
                sums[method].add(predicted[start:start + predict_batch_size], target_rows(targets, rows))
    return model, sums


def leave_one_donor_out(features: SpotFeatures, targets, folds: Sequence[Fold], config: TrainingConfig,
                        baselines: bool = True, mlp_hidden: int = 256, mlp_max_iter: int = 50,
                        predict_batch_size: int = 1024,
                        save_model: Callable[[int, Fold, DeepSpot], None] | None = None) -> LodoResult:
    """Train one DeepSpot model per fold; out-of-fold Pearson r of DeepSpot and (optionally) the
    RidgeCV and MLP baselines on the same folds, over the spots the folds label, from running sums
    (no spots x genes matrix of predictions is ever held). With `save_model`, each fold's model is
    handed to it (fold index, fold, model) once scored and not kept: one fold model's weights are
    as large as its training data's targets at a few hundred spots, and a cohort has one per donor."""
    pooled = features.pooled() if baselines else None
    models = {}
    by_fold: dict[str, dict[str, PearsonSums]] = {}
    for k, fold in enumerate(folds):
        log.info("fold %d/%d: labels donor %s (%d spots), trains on %d train-split spots of the other training "
                 "donors", k + 1, len(folds), fold.held_out_donor, len(fold.label_rows), len(fold.train_rows))
        model, sums = fold_pearson(features, targets, fold, config, pooled, mlp_hidden, mlp_max_iter,
                                   predict_batch_size)
        if save_model is None:
            models[fold.held_out_donor] = model
        else:
            save_model(k, fold, model)
        del model
        by_fold[fold.held_out_donor] = sums
    methods = list(next(iter(by_fold.values()))) if by_fold else ["deepspot"]
    pearson = {}
    for method in methods:
        pooled_sums = PearsonSums(targets.shape[1])
        for sums in by_fold.values():
            pooled_sums.merge(sums[method])
        pearson[method] = pooled_sums.r()
    per_donor = {m: {d: summarise_pearson(sums[m].r()) for d, sums in by_fold.items()} for m in methods}
    rows = np.sort(np.concatenate([f.label_rows for f in folds]))
    return LodoResult(list(folds), models, rows, pearson, per_donor)


# ---------------------------------------------------------------------------------------------
# The model directory


def weights_name(held_out_donor: str | None, index: int = 0) -> str:
    return f"{ALL_DONORS}.safetensors" if held_out_donor is None else f"lodo-{index:02d}.safetensors"


def save_weights(path: Path, model: DeepSpot, held_out_donor: str) -> None:
    """One model's weights (safetensors), its held-out donor ("" for the all-training-donor model) in
    the file's metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"held_out_donor": held_out_donor})


def model_dir_config(architecture: Mapping[str, Any], plan: Mapping[str, Any], info: Mapping[str, Any]) -> dict:
    """config.json of a model directory: `info`, the architecture, the fold plan and each model's weights."""
    return {
        **info,
        "architecture": dict(architecture),
        "fold_plan": dict(plan),
        "all_donors": {"weights": weights_name(None), "donors": plan["all_training_donors"]["train_donors"]},
        "folds": [{"held_out_donor": f["held_out_donor"], "weights": f["weights"], "train_donors": f["train_donors"]}
                  for f in plan["folds"]],
    }


class FoldModels(Mapping[str, DeepSpot]):
    """A model directory's fold models by held-out donor, each read from its weights when asked for.
    Only the last one read is held: a cohort has one fold model per training donor, each as large as
    its output layer (hidden x genes x ensemble), and predictions take the donors' spots in turn."""

    def __init__(self, paths: Mapping[str, Path], architecture: Mapping[str, Any]):
        self.paths, self.architecture = dict(paths), dict(architecture)
        self._held: tuple[str, DeepSpot] | None = None
        for path in self.paths.values():
            check_weights_file(path)

    def __getitem__(self, held_out_donor: str) -> DeepSpot:
        if self._held is None or self._held[0] != held_out_donor:
            self._held = None  # the previous model goes before the next is read
            self._held = (held_out_donor, load_model(self.paths[held_out_donor], self.architecture))
        return self._held[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ModelSet:
    """A trained model directory: the all-donor model and the fold models by held-out donor."""

    path: Path
    config: dict[str, Any]
    all_donors: DeepSpot
    by_held_out_donor: FoldModels

    @property
    def genes(self) -> pd.DataFrame:
        return pd.DataFrame(self.config["genes"]).set_index("gene")


def check_weights_file(path: Path) -> None:
    """The file exists and its safetensors header reads (the tensors are read by `load_model`)."""
    from safetensors import safe_open

    if not path.is_file():
        raise InputError(path, "model weights not found")
    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except Exception as exc:  # safetensors raises several types for damaged files
        raise InputError(path, f"cannot read weights: {exc}") from None


def load_model(path: Path, architecture: Mapping[str, Any]) -> DeepSpot:
    from safetensors.torch import load_file

    from stmdit.encoders.base import load_state_dict_strict

    if not path.is_file():
        raise InputError(path, "model weights not found")
    model = DeepSpot(**architecture)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several types for damaged files
        raise InputError(path, f"cannot read weights: {exc}") from None
    load_state_dict_strict(model, state, path)
    return model.eval()


def load_model_dir(path: str | Path) -> ModelSet:
    path = Path(path)
    config_path = path / MODEL_CONFIG
    if not config_path.is_file():
        raise InputError(path, f"not a DeepSpot model directory ({MODEL_CONFIG} missing)")
    try:
        config = json.loads(config_path.read_text())
        architecture = config["architecture"]
        folds = config["folds"]
        config["genes"]
        config["fold_plan"]["cohort"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(config_path, f"cannot read model config: {exc}") from None
    all_donors = load_model(path / config["all_donors"]["weights"], architecture)
    by_donor = FoldModels({f["held_out_donor"]: path / f["weights"] for f in folds}, architecture)
    log.info("read %s: %d-d input -> %d genes, all-donor model + %d fold models", path,
             architecture["input_dim"], architecture["n_genes"], len(by_donor))
    return ModelSet(path, config, all_donors, by_donor)


# ---------------------------------------------------------------------------------------------
# Prediction and the PTPL h5ad


def check_encoder_matches(models: ModelSet, features: SpotFeatures, store_path: str | Path) -> None:
    """Features of a cohort must come from the encoder the models were trained on."""
    if features.dim != models.config["architecture"]["input_dim"]:
        raise InputError(store_path, f"{features.dim}-d embeddings, the DeepSpot model ({models.path}) expects "
                                     f"{models.config['architecture']['input_dim']}-d")
    trained = models.config.get("encoder") or {}
    for field in ("name", "impl", "model"):
        if trained.get(field) is not None and features.encoder.get(field) != trained.get(field):
            raise InputError(store_path, f"encoder {field} {features.encoder.get(field)!r} differs from the one the "
                                         f"DeepSpot model was trained on ({trained.get(field)!r})")


def spot_models(models: ModelSet, donors: Sequence[str], cohorts: Sequence[str]) -> np.ndarray:
    """The held-out donor of the model that labels each spot ("" = all training donors): a training
    donor's spots get the fold model that never saw that donor; the test donors' spots and every spot
    of another cohort the model of all training donors."""
    donors = np.asarray(donors, dtype=object).astype(str)
    in_training_cohort = np.asarray(cohorts, dtype=object).astype(str) == models.config["fold_plan"]["cohort"]
    labelled_by_fold = in_training_cohort & np.isin(donors, list(models.by_held_out_donor))
    return np.where(labelled_by_fold, donors, "").astype(object)


def iter_cohort_predictions(models: ModelSet, features: SpotFeatures, fold_donor: np.ndarray,
                            batch_size: int = 1024, device: str = "auto", bf16: bool = False) -> Iterator[np.ndarray]:
    """Clipped predictions (log1p CP10k, float32) of every spot, in spot order, a block of rows at a
    time. Each model predicts its own spots in the batches of `predict_log1p` over all of them (so the
    values are those of predicting them at once); a block is handed on as soon as all its rows are
    predicted, so at most one batch per model waits."""
    fold_donor = np.asarray(fold_donor, dtype=object).astype(str)
    batches = []
    for held_out in sorted(set(fold_donor.tolist())):
        rows = np.flatnonzero(fold_donor == held_out)
        log.info("%d spots predicted by the %s model", len(rows),
                 f"leave-{held_out}-out" if held_out else "all-training-donor")
        batches += [(held_out, rows[start:start + batch_size]) for start in range(0, len(rows), batch_size)]
    batches.sort(key=lambda batch: int(batch[1][0]))
    waiting: list[tuple[np.ndarray, np.ndarray]] = []
    done = 0
    n_genes = models.config["architecture"]["n_genes"]
    for k, (held_out, rows) in enumerate(tqdm(batches, desc="deepspot predict", unit="batch", file=sys.stderr,
                                              mininterval=5.0)):
        model = models.by_held_out_donor[held_out] if held_out else models.all_donors
        waiting.append((rows, predict_log1p(model, features, rows, batch_size, device, bf16)))
        complete = int(batches[k + 1][1][0]) if k + 1 < len(batches) else len(fold_donor)
        if complete == done:
            continue
        block = np.empty((complete - done, n_genes), dtype=np.float32)
        still = []
        for rows_, values in waiting:
            inside = rows_ < complete
            block[rows_[inside] - done] = values[inside]
            if not inside.all():
                still.append((rows_[~inside], values[~inside]))
        waiting, done = still, complete
        yield block


def h5ad_safe(value: Any) -> Any:
    """h5ad cannot store None: record it as the string "none" (as the expression step does)."""
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        return {str(k): h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [h5ad_safe(v) for v in value]
    return value


def ptpl_skeleton(spots: pd.DataFrame, genes: pd.DataFrame, fold_donor: np.ndarray, meta: Mapping[str, Any],
                  fold_plan: Mapping[str, Any] | None = None, gene_set: Mapping[str, Any] | None = None):
    """The PTPL AnnData without its matrices (obs, var, obsm, uns: see the module docstring); X and
    layers["counts"] are written block by block (`write_ptpl`)."""
    import anndata as ad

    obs = pd.DataFrame(index=pd.Index(spots["key"].astype(str).to_numpy(), name=None))
    for column in ("sample", "donor", "cohort"):
        obs[column] = spots[column].astype(str).to_numpy()
    fold_donor = np.asarray(fold_donor, dtype=object).astype(str)
    obs["ptpl_model"] = np.where(fold_donor != "", np.char.add("lodo:", fold_donor), ALL_DONORS)
    obs["fold_donor"] = fold_donor
    obs["out_of_fold"] = fold_donor != ""
    var = pd.DataFrame(index=pd.Index(genes.index.astype(str), name=None))
    var["highly_variable"] = genes["highly_variable"].to_numpy(dtype=bool) if "highly_variable" in genes else True
    var["highly_variable_rank"] = genes["highly_variable_rank"].to_numpy(dtype=np.float64)
    if "gene_ids" in genes:
        var["gene_ids"] = genes["gene_ids"].astype(str).to_numpy()
    adata = ad.AnnData(obs=obs, var=var)
    if {"pxl_col", "pxl_row"} <= set(spots.columns):
        adata.obsm["spatial"] = spots[["pxl_col", "pxl_row"]].to_numpy(dtype=np.float64)
    adata.uns["stmdit"] = h5ad_safe(dict(meta))
    if gene_set is not None:
        adata.uns["gene_set"] = h5ad_safe(dict(gene_set))
        if gene_set.get("name") == PROTEIN_CODING:
            adata.var["protein_coding"] = True
    if fold_plan is not None:
        adata.uns["fold_plan"] = json.dumps(fold_plan, sort_keys=True)  # h5ad stores no list of mappings
    return adata


def pseudo_counts(predictions: np.ndarray) -> sp.csr_matrix:
    """layers["counts"] of the PTPL h5ad: expm1 of the (clipped) predictions, CSR float32."""
    return sp.csr_matrix(np.expm1(np.asarray(predictions, dtype=np.float32)).astype(np.float32))


def write_ptpl(path: str | Path, skeleton, blocks: Iterable[np.ndarray]) -> Path:
    """The PTPL h5ad: X the predictions, layers["counts"] their pseudo-counts, written a block at a time."""
    write_h5ad_by_rows(path, skeleton, blocks, {"counts": pseudo_counts})
    log.info("wrote %s: %d spots x %d genes", path, skeleton.n_obs, skeleton.n_vars)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# The stage


def training_config(args: argparse.Namespace) -> TrainingConfig:
    config = TrainingConfig(
        hidden_dim=args.hidden_dim, n_ensemble=args.n_ensemble, dropout=args.dropout, lr=args.lr,
        weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size,
        standardize=args.standardize, seed=args.seed, device=args.device, bf16=args.bf16, compile=args.compile,
    )
    for name in ("hidden_dim", "n_ensemble", "epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise InputError(None, f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if not 0.0 <= config.dropout < 1.0:
        raise InputError(None, f"--dropout must be in [0, 1), got {config.dropout}")
    return config


def training_spots(cohort: TrainingCohort, spots: pd.DataFrame, spots_paths: Sequence[str | Path]) -> pd.DataFrame:
    """The spots-table rows of the cohort's spots, in the expression file's order."""
    table = spots.set_index("key", drop=False)
    missing = pd.Index(cohort.keys).difference(table.index)
    if len(missing):
        raise InputError(", ".join(str(p) for p in spots_paths),
                         f"{len(missing)} spot(s) of {cohort.path} are not kept spots of these tables, e.g. {missing[0]}")
    return table.loc[cohort.keys].reset_index(drop=True)


def cohort_name(spots: pd.DataFrame, source: str | Path) -> str:
    names = sorted(set(spots["cohort"].astype(str)))
    if len(names) != 1:
        raise InputError(source, f"the training spots belong to {len(names)} cohorts {names}; expected one")
    return names[0]


def feature_memory_bytes(store_path: str | Path) -> int:
    """What `load_spot_features` holds for a store: float32 tiles, stored sub-tiles, neighbour index."""
    group = open_feature_store(store_path)
    if "embedding" not in group or "subtiles" not in group:
        return 0  # not a deepspot_fm store: load_spot_features says so
    n, dim = group["embedding"].shape
    subtiles = int(np.prod(group["subtiles"].shape)) * np.dtype(group["subtiles"].dtype).itemsize
    return int(n * dim * 4 + subtiles + n * len(HEX_NEIGHBOUR_OFFSETS) * 8)


def training_memory_bytes(expression: str | Path, store_path: str | Path) -> int:
    """Estimated peak of deepspot-train beyond the interpreter: the targets (at most the raw counts'
    non-zeros, MAX_BYTES_PER_NONZERO each; typically half that), the features, a gene block of target
    moments."""
    with H5adRows(expression) as h5ad:
        n_spots = h5ad.shape("layers/counts")[0] if h5ad.has("layers/counts") else 0
        nonzeros = h5ad.stored_values("layers/counts") if h5ad.has("layers/counts") else 0
    return int(MAX_BYTES_PER_NONZERO * nonzeros + 16 * n_spots + feature_memory_bytes(store_path) + MOMENT_BLOCK_BYTES)


def choose_baselines(wanted: bool, max_gb: float, n_spots: int, n_genes: int) -> tuple[bool, str]:
    """Whether the RidgeCV / MLP baselines run, and why: sklearn fits them on dense targets, so they
    run only when `baseline_memory_bytes` stays within `max_gb`."""
    if not wanted:
        return False, "off (--no-baselines)"
    needed = baseline_memory_bytes(n_spots, n_genes)
    if needed > max_gb * 1e9:
        return False, (f"skipped: sklearn's dense targets for {n_spots} spots x {n_genes} genes need about "
                       f"{needed / 1e9:.1f} GB, above --baselines-max-gb {max_gb:g}")
    return True, f"on ({needed / 1e9:.2f} GB of dense targets, within --baselines-max-gb {max_gb:g})"


def run_train(args: argparse.Namespace) -> Path:
    return_large_blocks_to_os()  # per-batch buffers freed go back to the system (stmdit.memory)
    config = training_config(args)
    needed = training_memory_bytes(args.expression, args.features)
    require(args.expression, needed, "deepspot-train of this cohort")
    try:
        return train_stage(args, config)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(args.expression, needed, "deepspot-train of this cohort") from None


def train_stage(args: argparse.Namespace, config: TrainingConfig) -> Path:
    cohort = read_training_cohort(args.expression, args.genes)
    roles = read_split_roles(args.split, cohort.keys, cohort.donors)
    folds = donor_folds(cohort.donors, roles)  # fails before any reading of features
    final = all_training_donors_fold(cohort.donors, roles)
    spots = training_spots(cohort, read_cohort_spots(args.spots), args.spots)
    name = cohort_name(spots, args.spots[0])
    plan = fold_plan(folds, final, roles, cohort.donors, name)
    features = load_spot_features(args.features, spots)
    baselines, baselines_note = choose_baselines(not args.no_baselines, args.baselines_max_gb, len(cohort.keys),
                                                 cohort.targets.shape[1])
    log.info("RidgeCV and MLP baselines: %s", baselines_note)
    params = {**asdict(config), "genes": args.genes, "baselines": not args.no_baselines, "mlp_hidden": args.mlp_hidden,
              "mlp_max_iter": args.mlp_max_iter, "target_sum": TARGET_SUM, "ridge_alphas": list(RIDGE_ALPHAS)}
    if baselines != (not args.no_baselines):
        params["baselines_max_gb"] = args.baselines_max_gb  # only where it decided: same params hash as before
    inputs = [args.expression, args.features, args.split, *args.spots]
    log.info("cohort %s: training donors %s (leave-one-donor-out), test donors %s (labelled by the model of all "
             "training donors); models learn from the %d train-split spots only", name, roles.training_donors,
             roles.test_donors, int(roles.trainable.sum()))
    genes = cohort.genes.reset_index(names="gene")
    genes = genes.astype(object).where(genes.notna(), None)  # JSON has no NaN
    info = {"stmdit": provenance("deepspot-train", params, inputs), "encoder": features.encoder,
            "genes": genes.to_dict(orient="list"), "gene_set": cohort.gene_set, "training_cohort": str(cohort.path)}
    with atomic_path(args.out_model) as staging:  # each model's weights written once trained, not held
        staging.mkdir()

        def save_fold_model(index: int, fold: Fold, model: DeepSpot) -> None:
            save_weights(staging / weights_name(fold.held_out_donor, index), model, fold.held_out_donor)

        lodo = leave_one_donor_out(features, cohort.targets, folds, config, baselines=baselines,
                                   mlp_hidden=args.mlp_hidden, mlp_max_iter=args.mlp_max_iter,
                                   save_model=save_fold_model)
        summary = {m: summarise_pearson(r) for m, r in lodo.pearson.items()}
        log.info("leave-one-donor-out Pearson r per gene (out-of-fold spots of the training donors):\n%s",
                 lodo_table(summary))
        log.info("training the all-training-donor model on %d spots", len(final.train_rows))
        test_pearson = {}
        if final.label_rows.size == 0:
            all_donors = train_deepspot(features, cohort.targets, final.train_rows, config,
                                        desc="all training donors")
        else:
            pooled = features.pooled() if baselines else None
            all_donors, test_sums = fold_pearson(features, cohort.targets, final, config, pooled, args.mlp_hidden,
                                                 args.mlp_max_iter)
            test_pearson = {m: summarise_pearson(sums.r()) for m, sums in test_sums.items()}
            log.info("Pearson r per gene of the all-training-donor model on the test donors %s (reported only; "
                     "nothing of them trains a model):\n%s", roles.test_donors, lodo_table(test_pearson))
        save_weights(staging / weights_name(None), all_donors, "")
        config_json = model_dir_config(all_donors.config, plan, info)
        (staging / MODEL_CONFIG).write_text(json.dumps(config_json, indent=2, sort_keys=True, default=str) + "\n")
    log.info("wrote %s: all-training-donor model and %d leave-one-donor-out models", args.out_model, len(folds))
    report = {
        "stmdit": provenance("deepspot-train", params, inputs),
        "n_spots": len(cohort.keys),
        "genes": list(cohort.genes.index),
        "gene_set": cohort.gene_set,
        "fold_plan": plan,
        "baselines": {"run": baselines, "why": baselines_note},
        "pearson": {m: {**summary[m], "per_donor": lodo.per_donor[m]} for m in lodo.pearson},
        "per_gene": {m: [None if not np.isfinite(v) else float(v) for v in r] for m, r in lodo.pearson.items()},
        "test_donors_pearson": test_pearson,
    }
    write_json(args.out_lodo, report)
    log.info("wrote %s", args.out_lodo)
    return Path(args.out_model)


def run_predict(args: argparse.Namespace) -> Path:
    return_large_blocks_to_os()
    if args.batch_size < 1:
        raise InputError(None, f"--batch-size must be at least 1, got {args.batch_size}")
    needed = feature_memory_bytes(args.features) + MOMENT_BLOCK_BYTES
    require(args.features, needed, "deepspot-predict of this cohort")
    try:
        return predict_stage(args)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory(args.features, needed, "deepspot-predict of this cohort") from None


def predict_stage(args: argparse.Namespace) -> Path:
    models = load_model_dir(args.model)
    spots = read_cohort_spots(args.spots)
    features = load_spot_features(args.features, spots)
    check_encoder_matches(models, features, args.features)
    fold_donor = spot_models(models, spots["donor"].astype(str).to_numpy(), spots["cohort"].astype(str).to_numpy())
    params = {"batch_size": args.batch_size, "device": args.device, "bf16": args.bf16,
              "model_params_hash": models.config["stmdit"]["params_hash"]}
    meta = provenance("deepspot-predict", params, [args.model, args.features, *args.spots])
    skeleton = ptpl_skeleton(spots, models.genes, fold_donor, meta, models.config["fold_plan"],
                             models.config.get("gene_set"))
    log.info("%d of %d spots predicted out-of-fold (their donor was held out of the model)",
             int(skeleton.obs["out_of_fold"].sum()), skeleton.n_obs)
    blocks = iter_cohort_predictions(models, features, fold_donor, args.batch_size, args.device, args.bf16)
    return write_ptpl(args.out, skeleton, blocks)


def register(subparsers) -> None:
    train = subparsers.add_parser(
        "deepspot-train", help="DeepSpot pseudo-label models: leave-one-donor-out + all-donor, with baselines",
        description=__doc__.split("\n\n")[0],
    )
    train.add_argument("--expression", required=True, type=Path, help="training cohort h5ad (Visium)")
    train.add_argument("--features", required=True, type=Path, help="deepspot_fm feature store of that cohort")
    train.add_argument("--spots", nargs="+", required=True, type=Path, help="spots tables of the cohort (array positions)")
    train.add_argument("--split", required=True, type=Path,
                       help="the cohort's split (results/splits/{cohort}.parquet): only train-split spots train a model")
    train.add_argument("--out-model", required=True, type=Path, help="output model directory")
    train.add_argument("--out-lodo", required=True, type=Path,
                       help="output JSON: the fold plan and leave-one-donor-out Pearson r")
    train.add_argument("--genes", choices=TARGET_GENE_SETS, default=PROTEIN_CODING,
                       help="targets: the cohort's protein-coding genes (paper A.2) or its HVGs")
    train.add_argument("--hidden-dim", type=int, default=512)
    train.add_argument("--n-ensemble", type=int, default=10)
    train.add_argument("--dropout", type=float, default=0.3)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--weight-decay", type=float, default=1e-6)
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--batch-size", type=int, default=512)
    train.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                       help="standardise targets per gene on the training spots")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_bf16_option(train)
    train.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    train.add_argument("--no-baselines", action="store_true", help="skip the RidgeCV and MLP baselines")
    train.add_argument("--baselines-max-gb", type=float, default=4.0,
                       help="run the baselines only when sklearn's dense targets (6 float64 copies of spots x genes) "
                            "fit in this many GB; above, they are skipped and the log and lodo JSON say so")
    train.add_argument("--mlp-hidden", type=int, default=256, help="hidden units of the MLPRegressor baseline")
    train.add_argument("--mlp-max-iter", type=int, default=50, help="epochs of the MLPRegressor baseline")
    train.set_defaults(func=run_train)

    predict = subparsers.add_parser(
        "deepspot-predict", help="DeepSpot pseudo-labels of a cohort (out-of-fold for training donors) -> h5ad",
        description=__doc__.split("\n\n")[0],
    )
    predict.add_argument("--model", required=True, type=Path, help="model directory of deepspot-train")
    predict.add_argument("--features", required=True, type=Path, help="deepspot_fm feature store of the cohort")
    predict.add_argument("--spots", nargs="+", required=True, type=Path, help="spots tables of the cohort, cohort order")
    predict.add_argument("--out", required=True, type=Path, help="output h5ad (results/ptpl/{cohort}.h5ad)")
    predict.add_argument("--batch-size", type=int, default=1024)
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_bf16_option(predict)
    predict.set_defaults(func=run_predict)
