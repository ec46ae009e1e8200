"""Virtual tissue experiments: edit the expression of chosen spots, re-encode it with the configured
CancerFoundation, and generate each spot unedited and edited from the same noise.

    stmdit virtual-tiles --name NAME --experiment-json '{...}' --model-dir M --split S
        --expression C.h5ad --uni U.zarr --ge G.zarr --spots a.parquet ... [sampler options] --out tiles.zarr

The experiment JSON holds one entry of the config's `virtual.experiments` (with `gene_sets`):
regime (uni_ge | ge), s_uni, s_ge, split (train | val | test | all), slides (sample names or null),
spots (all | {label: L} | {keys: [...]} | {region: {rows: [r0, r1], cols: [c0, c1]}}, array
coordinates, inclusive), max_spots, edit (see `stmdit.virtual.edits`), doses, control, seed.

Rows of the output store (`write_tile_store`): `{arm}|{spot key}` for the arms `unedited`, one per
dose (`dose=D`, or `edited` without a dose series) and `control` (the control edit at the strongest
dose); arrays `arm`, `ref_key` (the spot), `dose`. Every arm of a spot is sampled from the noise of
`keyed_generator(seed, "sample", spot key)` with the spot's UNI, so only the GE input differs. Each
arm's GE is the cohort's raw counts after the edit, through the encoder recorded in the GE store
(impl, seed, binning, gene list = its token_genes): re-encoding the unedited counts must reproduce
the store, which is checked before sampling.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from stmdit.errors import InputError
from stmdit.features import open_feature_store
from stmdit.ge_inputs import check_trained_encoder, load_store_encoder, store_params
from stmdit.loader import GeBatch, store_rows
from stmdit.model import GE, UNI_GE
from stmdit.split_table import TRAIN, read_split_table
from stmdit.spots_table import read_labelled_spots
from stmdit.virtual.edits import (
    Edit,
    apply_edit,
    check_reaches_encoder,
    control_edit,
    format_dose,
    log1p_cp10k,
    parse_edit,
    shuffled_centroid,
)
from stmdit.zarr_rows import read_array_rows

log = logging.getLogger(__name__)

UNEDITED, CONTROL = "unedited", "control"
SPLITS = ("train", "val", "test", "all")
CONTROLS = ("shuffled", "absent")
REENCODE_TOLERANCE = 1e-3  # max |re-encoded - stored| / (1 + max |stored|) of the unedited CLS


@dataclass
class ExperimentSpec:
    name: str
    edit: str
    regime: str = UNI_GE
    split: str = "test"
    slides: list[str] | None = None
    spots: Any = "all"
    max_spots: int | None = None
    doses: list[float] | None = None
    control: str = "shuffled"
    seed: int = 0
    gene_sets: dict[str, list[str]] = field(default_factory=dict)
    s_uni: float | None = None
    s_ge: float | None = None

    @classmethod
    def from_json(cls, name: str, text: str) -> "ExperimentSpec":
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise InputError(None, f"virtual experiment {name}: --experiment-json is not JSON: {exc}") from None
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(None, f"virtual experiment {name}: unknown keys {unknown} (known: {sorted(known)})")
        spec = cls(name=name, **values)
        spec.check()
        return spec

    def check(self) -> None:
        where = f"virtual experiment {self.name}"
        if self.regime not in (UNI_GE, GE):
            raise InputError(None, f"{where}: regime {self.regime!r} does not use GE, so no edit can reach the "
                                   f"model; use {UNI_GE} or {GE}")
        if self.split not in SPLITS:
            raise InputError(None, f"{where}: split {self.split!r} is not one of {SPLITS}")
        if self.control not in CONTROLS:
            raise InputError(None, f"{where}: control {self.control!r} is not one of {CONTROLS}")
        has_placeholder = "{dose}" in self.edit
        if self.doses and not has_placeholder:
            raise InputError(None, f"{where}: doses are given but the edit {self.edit!r} has no {{dose}} placeholder")
        if has_placeholder and not self.doses:
            raise InputError(None, f"{where}: the edit {self.edit!r} has a {{dose}} placeholder but no doses")
        if self.max_spots is not None and self.max_spots < 1:
            raise InputError(None, f"{where}: max_spots must be at least 1")

    @property
    def dose_arms(self) -> list[tuple[str, float | None, str]]:
        """(arm, dose, edit text) of every edited arm, weakest first."""
        if not self.doses:
            return [("edited", None, self.edit)]
        return [(f"dose={d:g}", float(d), format_dose(self.edit, d)) for d in sorted(self.doses)]


# ---------------------------------------------------------------------------------------------
# Spots


def read_spot_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Kept spots of the spots tables: key, sample, label, array_row, array_col, pxl_row, pxl_col,
    indexed by key."""
    spots = read_labelled_spots(paths, ["sample", "array_row", "array_col", "pxl_row", "pxl_col"])
    return spots[["key", "sample", "label", "array_row", "array_col", "pxl_row", "pxl_col"]].set_index("key", drop=False)


def select_spots(spots: pd.DataFrame, split: pd.DataFrame, spec: ExperimentSpec, source: str = "spots") -> pd.DataFrame:
    """The spots of the experiment, in spots-table order; InputError when none is left."""
    where = f"virtual experiment {spec.name}"
    chosen = spots
    if spec.split != "all":
        keys = set(split.loc[split["split"] == spec.split, "key"].astype(str))
        chosen = chosen[chosen["key"].isin(keys)]
    if spec.slides:
        unknown = sorted(set(spec.slides) - set(spots["sample"]))
        if unknown:
            raise InputError(None, f"{where}: slide(s) {unknown} are not in the cohort "
                                   f"(slides: {', '.join(sorted(spots['sample'].unique()))})")
        chosen = chosen[chosen["sample"].isin(spec.slides)]
    selector = spec.spots
    if selector == "all":
        pass
    elif isinstance(selector, dict) and len(selector) == 1 and "label" in selector:
        labels = selector["label"] if isinstance(selector["label"], list) else [selector["label"]]
        unknown = sorted(set(labels) - set(spots["label"]))
        if unknown:
            raise InputError(None, f"{where}: no spot is labelled {unknown[0]!r} "
                                   f"(labels: {', '.join(sorted(spots['label'].unique()))})")
        chosen = chosen[chosen["label"].isin(labels)]
    elif isinstance(selector, dict) and len(selector) == 1 and "keys" in selector:
        keys = [str(k) for k in selector["keys"]]
        unknown = [k for k in keys if k not in spots.index]
        if unknown:
            raise InputError(None, f"{where}: spot key {unknown[0]!r} is not a kept spot of the cohort")
        chosen = chosen[chosen["key"].isin(keys)]
    elif isinstance(selector, dict) and len(selector) == 1 and "region" in selector:
        region = selector["region"]
        try:
            (r0, r1), (c0, c1) = region["rows"], region["cols"]
        except (KeyError, TypeError, ValueError):
            raise InputError(None, f"{where}: spots.region must be {{rows: [r0, r1], cols: [c0, c1]}}") from None
        inside = chosen["array_row"].between(r0, r1) & chosen["array_col"].between(c0, c1)
        chosen = chosen[inside]
    else:
        raise InputError(None, f"{where}: spots must be all, {{label: L}}, {{keys: [...]}} or "
                               f"{{region: {{rows: [r0, r1], cols: [c0, c1]}}}}, got {selector!r}")
    if chosen.empty:
        raise InputError(None, f"{where}: the spot selection is empty (split {spec.split}, slides "
                               f"{spec.slides or 'all'}, spots {selector!r})")
    if spec.max_spots is not None and len(chosen) > spec.max_spots:
        rows = np.sort(np.random.default_rng(spec.seed).choice(len(chosen), size=spec.max_spots, replace=False))
        chosen = chosen.iloc[rows]
    return chosen


# ---------------------------------------------------------------------------------------------
# Re-encoding edited expression exactly as `stmdit features` encodes it


class GeReencoder:
    """The CancerFoundation of a GE feature store (impl, weights, arch, seed, gene selection,
    normalisation and binning from its provenance; the gene list from its token_genes)."""

    def __init__(self, ge_store: str | Path, cohort_genes: Sequence[str], weights: str | None = None,
                 device: str = "cpu"):
        self.path = Path(ge_store)
        group = open_feature_store(ge_store)
        self.params = store_params(group, ge_store)
        self.encoder, self.identity = load_store_encoder(group, ge_store, weights, device)
        self.genes = list(self.encoder.genes)
        index = {g: i for i, g in enumerate(cohort_genes)}
        missing = [g for g in self.genes if g not in index]
        if missing:
            raise InputError(ge_store, f"{len(missing)} encoder gene(s) are not in the cohort h5ad, e.g. {missing[0]}")
        self.columns = np.array([index[g] for g in self.genes], dtype=np.int64)

    def encode(self, counts: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Outputs for raw counts (n, all cohort genes) of spots `keys` (their binning streams)."""
        return self.encoder.encode(np.asarray(counts)[:, self.columns], list(keys))

    def check_reproduces(self, group, counts: np.ndarray, keys: Sequence[str]) -> float:
        """Relative max deviation of the re-encoded CLS from the store's; InputError beyond tolerance."""
        stored = read_array_rows(group["embedding"], store_rows(group, keys, self.path)).astype(np.float64)
        again = self.encode(counts, keys)["embedding"].astype(np.float64)
        deviation = float(np.abs(again - stored).max() / (1.0 + np.abs(stored).max()))
        if deviation > REENCODE_TOLERANCE:
            raise InputError(self.path, f"re-encoding the unedited counts does not reproduce the store (relative "
                                        f"deviation {deviation:.2g}): the encoder or the h5ad differ from the ones "
                                        "that made it")
        return deviation


# ---------------------------------------------------------------------------------------------
# The arms


def class_centroids_log1p(counts: np.ndarray, labels: np.ndarray, wanted: Sequence[str]) -> dict[str, np.ndarray]:
    x, _ = log1p_cp10k(counts)
    return {label: x[labels == label].mean(axis=0) for label in wanted}


@dataclass
class Arm:
    name: str
    dose: float | None
    edit: Edit | None  # None: unedited
    text: str


class VirtualConditions:
    """Rows (arm, spot) for `SamplingSession.generate`: the spot's UNI (None in regime ge) and the GE of its
    edited counts; `noise_keys` = the spot keys, so every arm of a spot starts from the same noise."""

    def __init__(self, spots: Sequence[str], arms: Sequence[Arm], counts: np.ndarray, cohort_genes: Sequence[str],
                 reencoder: GeReencoder, uni: np.ndarray | None, centroids: Mapping[str, np.ndarray], uses_tokens: bool):
        self.spots = list(spots)
        self.arms = list(arms)
        self.counts = np.asarray(counts, np.float64)
        self.cohort_genes = list(cohort_genes)
        self.reencoder = reencoder
        self.uni = uni
        self.centroids = dict(centroids)
        self.uses_tokens = uses_tokens
        self.arm_index = np.repeat(np.arange(len(self.arms)), len(self.spots))
        self.spot_index = np.tile(np.arange(len(self.spots)), len(self.arms))
        self.keys = [f"{self.arms[a].name}|{self.spots[s]}" for a, s in zip(self.arm_index, self.spot_index)]
        self.noise_keys = [self.spots[s] for s in self.spot_index]

    def __len__(self) -> int:
        return len(self.keys)

    def edited_counts(self, arm: Arm, spot_rows: np.ndarray) -> np.ndarray:
        counts = self.counts[spot_rows]
        if arm.edit is None:
            return counts
        return apply_edit(arm.edit, counts, self.cohort_genes, self.centroids)

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor | None, GeBatch]:
        arms, spots = self.arm_index[positions], self.spot_index[positions]
        counts = np.empty((len(positions), self.counts.shape[1]))
        for a in np.unique(arms):
            counts[arms == a] = self.edited_counts(self.arms[a], spots[arms == a])
        encoded = self.reencoder.encode(counts, [self.spots[s] for s in spots])
        ge = GeBatch(torch.from_numpy(encoded["embedding"].astype(np.float32)))
        if self.uses_tokens:
            ge.tokens = torch.from_numpy(encoded["tokens"].astype(np.float32))
            ge.token_mask = torch.from_numpy(encoded["token_mask"].astype(bool))
        uni = None if self.uni is None else torch.from_numpy(self.uni[spots].astype(np.float32))
        return uni, ge


def build_arms(spec: ExperimentSpec, cohort_genes: Sequence[str], encoder_genes: Sequence[str],
               labels: Sequence[str], encoder_columns: np.ndarray, centroids: dict[str, np.ndarray]
               ) -> tuple[list[Arm], dict[str, Any]]:
    """The arms of an experiment (parsing every edit before any work) and the control's description.
    Adds the shuffled centroids a toward control needs to `centroids`."""
    source = f"virtual experiment {spec.name}"
    arms = [Arm(UNEDITED, None, None, "")]
    for name, dose, text in spec.dose_arms:
        edit = parse_edit(text, cohort_genes, spec.gene_sets, labels, source)
        check_reaches_encoder(edit, encoder_genes, source)
        arms.append(Arm(name, dose, edit, edit.text()))
    strongest = arms[-1]
    control, description = control_edit(strongest.edit, encoder_genes, cohort_genes, spec.control, spec.seed)
    for term in control.terms:
        if term.op == "toward":
            label = term.target.removesuffix("~shuffled")
            centroids[term.target] = shuffled_centroid(centroids[label], encoder_columns, spec.seed)
    arms.append(Arm(CONTROL, strongest.dose, control, control.text()))
    return arms, {"kind": spec.control, "edit": control.text(), "genes": list(control.genes), "description": description,
                  "of_arm": strongest.name}


# ---------------------------------------------------------------------------------------------
# stmdit virtual-tiles


@dataclass
class ExperimentInputs:
    """What an experiment reads before sampling: the chosen spots (spots-table rows), their raw counts,
    the cohort's genes, the GE re-encoder, the toward: centroids and the split."""

    chosen: pd.DataFrame
    counts: np.ndarray
    cohort_genes: list[str]
    reencoder: GeReencoder
    centroids: dict[str, np.ndarray]
    labels: list[str]

    @property
    def keys(self) -> list[str]:
        return self.chosen["key"].tolist()


def read_experiment_inputs(args: argparse.Namespace, spec: ExperimentSpec) -> ExperimentInputs:
    """The spots of `spec`, their counts, the re-encoder of the GE store and the train-spot centroids
    of the labels that toward: edits name (as Table 5's)."""
    from stmdit.expression import read_cohort_h5ad
    import scipy.sparse as sp

    split = read_split_table(args.split)
    adata = read_cohort_h5ad(args.expression)
    cohort_genes = [str(g) for g in adata.var_names]
    obs_index = pd.Index([str(k) for k in adata.obs_names])
    spots = read_spot_tables(args.spots)
    spots = spots[spots["key"].isin(obs_index)]
    chosen = select_spots(spots, split, spec)

    reencoder = GeReencoder(args.ge, cohort_genes, weights=args.ge_weights, device=args.device)
    all_labels = sorted(spots["label"].unique())
    # toward: centroids over the train spots of each label (as Table 5's)
    train_keys = obs_index.intersection(pd.Index(split.loc[split["split"] == TRAIN, "key"].astype(str)))
    train_rows = obs_index.get_indexer(train_keys)
    train_labels = spots["label"].reindex(train_keys).fillna("unlabelled").to_numpy()
    counts_matrix = sp.csr_matrix(adata.layers["counts"])
    centroids: dict[str, np.ndarray] = {}
    texts = [t for _, _, t in spec.dose_arms]
    wanted = {lab for t in texts for lab in all_labels if f"toward:{lab}@" in t}
    if wanted:
        empty = [lab for lab in wanted if not np.any(train_labels == lab)]
        if empty:
            raise InputError(args.split, f"virtual experiment {spec.name}: no train spot is labelled {empty[0]!r} "
                                         "(no centroid to move toward)")
        centroids = class_centroids_log1p(counts_matrix[train_rows].toarray(), train_labels, sorted(wanted))
    counts = counts_matrix[obs_index.get_indexer(chosen["key"].tolist())].toarray().astype(np.float64)
    return ExperimentInputs(chosen, counts, cohort_genes, reencoder, centroids, all_labels)


def experiment_conditions(args: argparse.Namespace, spec: ExperimentSpec, inputs: ExperimentInputs,
                          arms: Sequence[Arm], config) -> tuple[VirtualConditions, float]:
    """The rows (arm, spot) to sample and the re-encoding deviation of the unedited counts from the
    GE store (InputError beyond tolerance, before any sampling)."""
    from stmdit.sampling import check_width

    keys = inputs.keys
    ge_group = open_feature_store(args.ge)
    deviation = inputs.reencoder.check_reproduces(ge_group, inputs.counts, keys)
    log.info("re-encoded the unedited GE of %d spots with %s: relative deviation from %s %.2g", len(keys),
             inputs.reencoder.params.get("impl"), args.ge, deviation)
    uni = read_uni(args.uni, keys, config) if spec.regime == UNI_GE else None
    check_width(args.ge, "GE embedding", ge_group["embedding"].shape[-1], config.ge_dim)
    conditions = VirtualConditions(keys, arms, inputs.counts, inputs.cohort_genes, inputs.reencoder, uni,
                                   inputs.centroids, config.uses_ge_tokens)
    return conditions, deviation


def read_uni(uni_store: str | Path, keys: Sequence[str], config) -> np.ndarray:
    """The UNI embeddings of `keys` (checked finite and of the model's width)."""
    from stmdit.features import check_finite_rows
    from stmdit.sampling import check_width

    group = open_feature_store(uni_store)
    uni = check_finite_rows(read_array_rows(group["embedding"], store_rows(group, keys, uni_store)), uni_store,
                            "embedding", list(keys))
    check_width(uni_store, "UNI embedding", uni.shape[-1], config.uni_dim)
    return uni


def experiment_extra_arrays(conditions: VirtualConditions, arms: Sequence[Arm], chosen: pd.DataFrame
                            ) -> dict[str, np.ndarray]:
    """Per-row arrays of the output store: arm, ref_key, dose and the spot's label, slide and pixel position."""
    spot_rows = conditions.spot_index
    extra = {
        "arm": np.array([arms[a].name for a in conditions.arm_index], dtype=object),
        "ref_key": np.array(conditions.noise_keys, dtype=object),
        "dose": np.array([np.nan if arms[a].dose is None else arms[a].dose for a in conditions.arm_index]),
        "label": chosen["label"].to_numpy(dtype=object)[spot_rows],
        "sample": chosen["sample"].to_numpy(dtype=object)[spot_rows],
        "pxl_row": chosen["pxl_row"].to_numpy(np.float64)[spot_rows],
        "pxl_col": chosen["pxl_col"].to_numpy(np.float64)[spot_rows],
    }
    assert all(len(v) == len(conditions) for v in extra.values())
    return extra


def experiment_session_settings(args: argparse.Namespace, spec: ExperimentSpec):
    """The sampling session of an experiment: its regime, and its s_uni / s_ge over the options'."""
    from stmdit.sampling import SessionSettings

    settings = SessionSettings.from_args(args, spec.regime, needs_ge_model=(
        f"virtual experiment {spec.name}: the model is UNI-only (ge_fusion none); a gene-expression edit cannot "
        "reach it"))
    settings.sampler.s_uni = args.s_uni if spec.s_uni is None else float(spec.s_uni)
    settings.sampler.s_ge = args.s_ge if spec.s_ge is None else float(spec.s_ge)
    return settings


def run_virtual_sample(args: argparse.Namespace) -> Path:
    from stmdit.cli import cli_params
    from stmdit.sampling import SamplingSession

    spec = ExperimentSpec.from_json(args.name, args.experiment_json)
    session = SamplingSession(experiment_session_settings(args, spec))
    inputs = read_experiment_inputs(args, spec)
    reencoder = inputs.reencoder
    arms, control = build_arms(spec, inputs.cohort_genes, reencoder.genes, inputs.labels, reencoder.columns,
                               inputs.centroids)
    check_trained_encoder(session.trained.ge_encoder, reencoder.identity,
                          session.trained.path / "training.json", args.ge)
    conditions, deviation = experiment_conditions(args, spec, inputs, arms, session.config)
    session.open_codec()
    log.info("virtual experiment %s: %d spots x %d arms (%s) with %s in regime %s -> %s", spec.name, len(inputs.keys),
             len(arms), ", ".join(f"{a.name}: {a.text or '-'}" for a in arms), session.trained.path, spec.regime,
             args.out)
    attrs = session.attrs("virtual-tiles", cli_params(args), [session.weights_path, args.split, args.expression,
                                                              args.uni, args.ge, *args.spots])
    attrs["virtual"] = {
        "experiment": spec.name,
        "spec": {k: v for k, v in vars(spec).items()},
        "arms": [{"arm": a.name, "dose": a.dose, "edit": a.text} for a in arms],
        "control": control,
        "n_spots": len(inputs.keys),
        "encoder": {"store": str(args.ge), "params": reencoder.params, "genes": len(reencoder.genes),
                    "reencode_deviation": deviation},
        "noise": "per spot: keyed_generator(seed, 'sample', spot key), the same in every arm",
        "edit_units": "log1p CP10k (x = log1p(1e4 c / total)); * scales counts",
    }
    extra = experiment_extra_arrays(conditions, arms, inputs.chosen)
    return session.generate(conditions, args.out, attrs, extra_arrays=extra)


def register(subparsers: argparse._SubParsersAction) -> None:
    from stmdit.sampling import add_sampler_options

    p = subparsers.add_parser("virtual-tiles", help="virtual tissue experiment: unedited and edited tiles per spot")
    add_sampler_options(p)
    p.add_argument("--name", required=True, help="experiment name (virtual.experiments key)")
    p.add_argument("--experiment-json", required=True, help="the experiment's config entry as JSON")
    p.add_argument("--expression", type=Path, required=True, help="cohort h5ad (raw counts, labels)")
    p.add_argument("--ge", type=Path, required=True, help="the cohort's cancerfoundation feature store")
    p.add_argument("--ge-weights", help="CancerFoundation weights (default: the path the GE store records)")
    p.add_argument("--spots", type=Path, nargs="+", required=True, help="spots tables of the cohort")
    p.set_defaults(func=run_virtual_sample)
