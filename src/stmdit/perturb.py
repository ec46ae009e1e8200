"""Perturbation sampling: the image series of Table 5 (paper D.7, K).

    stmdit perturbed-tiles --model-dir M --split S --expression C.h5ad --uni U --ge G
        --pairs Tumor:Stroma,Tumor:Immune,Immune:Tumor --alphas 0,0.25,0.5,0.75,1 --n-ref 100
        --seed 42 [--mode centroid|spotwise] [--uni-null] --vae-impl ... --out results/tiles/M/C/perturbation.zarr

Class centroids are means over the TRAIN spots of a label, of the CancerFoundation CLS and, for
token models, of each token position over the spots where it is a real token (token_mask).
Reference spots are up to n-ref TEST spots of the source label. A row (pair, reference, alpha) is
sampled with the reference spot's UNI (or the null UNI) and its noise (seed, reference key), the
same at every alpha, and a GE input that depends on the mode:
- `centroid` (the paper's definition, the default): `interpolate_ge(source centroid, target
  centroid, alpha)`; every reference spot of a pair gets the same GE at a given alpha;
- `spotwise`: `interpolate_ge(reference spot's own GE, target centroid, alpha)`, so alpha = 0 is
  the spot's plain uni_ge tile.
Tokens move position-wise (`interpolate_tokens` says what happens where only one side is real).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from stmdit.cli import cli_params
from stmdit.errors import InputError
from stmdit.features import check_finite_rows, open_feature_store
from stmdit.ge_inputs import GeTokenSource, check_trained_encoder, encoder_identity
from stmdit.loader import GeBatch, store_rows
from stmdit.metrics import choose_reference_spots, class_centroids, interpolate_ge
from stmdit.model import GE, UNI_GE
from stmdit.sampling import SamplingSession, SessionSettings, add_sampler_options, check_width
from stmdit.split_table import TEST, TRAIN, split_keys
from stmdit.zarr_rows import read_array_rows

log = logging.getLogger(__name__)

CENTROID, SPOTWISE = "centroid", "spotwise"
MODES = {
    CENTROID: "GE interpolated between the source and the target class centroids (paper D.7)",
    SPOTWISE: "each reference spot's own GE interpolated toward the target class centroid",
}


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """"Tumor:Stroma,Immune:Tumor" -> [("Tumor", "Stroma"), ("Immune", "Tumor")]."""
    pairs = []
    for item in (part.strip() for part in text.split(",")):
        source, sep, target = item.partition(":")
        if not sep or not source.strip() or not target.strip():
            raise InputError(None, f"--pairs: {item!r} is not SOURCE:TARGET")
        pairs.append((source.strip(), target.strip()))
    return pairs


def parse_alphas(text: str) -> list[float]:
    try:
        alphas = sorted({float(a) for a in text.split(",")})
    except ValueError:
        raise InputError(None, f"--alphas: {text!r} is not a comma-separated list of numbers") from None
    if not alphas or alphas[0] < 0 or alphas[-1] > 1:
        raise InputError(None, f"--alphas must lie in [0, 1], got {text!r}")
    return alphas


def read_spot_labels(expression: str | Path, keys: Sequence[str]) -> np.ndarray:
    """obs["label"] of `keys` from the cohort h5ad (obs names are spot keys)."""
    from stmdit.expression import read_cohort_obs

    expression = Path(expression)
    obs = read_cohort_obs(expression)
    if "label" not in obs:
        raise InputError(expression, 'obs["label"] (tissue labels) is missing')
    labels = obs["label"].astype(str).reindex([str(k) for k in keys])
    if labels.isna().any():
        raise InputError(expression, f"{int(labels.isna().sum())} spot(s) of the split have no row, "
                                     f"e.g. {labels.index[labels.isna()][0]}")
    return labels.to_numpy(dtype=object)


@dataclass
class GeCentroid:
    """A class centroid in CancerFoundation space: CLS (d,) and, for token models, tokens (T, d) with
    `valid` (T,) = the position holds a real token in at least one spot of the class."""

    cls: np.ndarray
    tokens: np.ndarray | None = None
    valid: np.ndarray | None = None


def token_centroid(tokens: GeTokenSource, rows: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean of the tokens of store rows `rows` over the spots where the position is a real
    token (`metrics.class_centroids` with a mask), accumulated in blocks so a class is never in memory."""
    sums = counts = None
    for start in range(0, len(rows), block):
        chunk = np.sort(rows[start:start + block])
        values, mask = tokens.rows(chunk)
        weights = mask.cpu().numpy().astype(np.float64)
        part = np.einsum("nt,ntd->td", weights, values.cpu().numpy().astype(np.float64))
        sums = part if sums is None else sums + part
        counts = weights.sum(axis=0) if counts is None else counts + weights.sum(axis=0)
    return sums / np.maximum(counts, 1.0)[:, None], counts > 0


def ge_centroids(ge_store: str | Path, keys: Sequence[str], labels: np.ndarray, wanted: Iterable[str],
                 tokens: GeTokenSource | None) -> dict[str, GeCentroid]:
    """Centroids of the `wanted` labels over `keys` (the train spots); token centroids too when given
    the store's `tokens`."""
    group = open_feature_store(ge_store)
    rows = store_rows(group, keys, ge_store)
    cls = check_finite_rows(read_array_rows(group["embedding"], rows), ge_store, "embedding", [str(k) for k in keys])
    wanted = [w for w in dict.fromkeys(wanted) if np.any(labels == w)]
    if not wanted:
        return {}
    selected = np.isin(labels, wanted)
    centroids = {label: GeCentroid(c) for label, c in class_centroids(cls[selected], labels[selected]).items()}
    if tokens is not None:
        for label in wanted:
            centroids[label].tokens, centroids[label].valid = token_centroid(tokens, rows[labels == label])
            if not np.isfinite(centroids[label].tokens).all():
                raise InputError(ge_store, f"the GE tokens have NaN or inf values in train spots labelled {label!r}: "
                                           "recompute the store")
    return centroids


def interpolate_tokens(tokens: np.ndarray, mask: np.ndarray, centroid: GeCentroid, alpha: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Position-wise interpolation of a token sequence (a spot's, or the source centroid's) toward a
    class centroid.

    Positions real in both move linearly; positions the centroid lacks keep the start token;
    positions only the centroid has appear (with the centroid's token) once alpha > 0. At alpha = 0
    the start sequence and mask come back unchanged."""
    both = mask & centroid.valid
    moved = np.where(both[:, None], interpolate_ge(tokens, centroid.tokens, alpha), tokens)
    appear = ~mask & centroid.valid & (alpha > 0)
    return np.where(appear[:, None], centroid.tokens, moved), mask | appear


class PerturbationConditions:
    """Rows (pair, reference spot, alpha): the reference spot's UNI (or the null UNI) and the GE of
    the mode (module docstring); the noise of a row is its reference spot's."""

    def __init__(self, rows: pd.DataFrame, uni_store: str | Path, ge_store: str | Path,
                 centroids: Mapping[str, GeCentroid], config, uni_null: bool, mode: str = CENTROID,
                 tokens: GeTokenSource | None = None):
        """`tokens`: the GE store's token source, for token models in spotwise mode."""
        if mode not in MODES:
            raise InputError(None, f"perturbation mode must be one of {sorted(MODES)}, got {mode!r}")
        self.rows = rows.reset_index(drop=True)
        self.keys = self.rows["spot_key"].tolist()
        self.noise_keys = self.rows["ref_key"].tolist()
        self.centroids = centroids
        self.mode = mode
        self.uses_tokens = config.uses_ge_tokens
        refs = self.ref_keys = list(dict.fromkeys(self.noise_keys))
        self.ref_index = {k: i for i, k in enumerate(refs)}
        self.ge_store = ge_store
        uni_group = open_feature_store(uni_store)
        self.uni = check_finite_rows(read_array_rows(uni_group["embedding"], store_rows(uni_group, refs, uni_store)),
                                     uni_store, "embedding", refs)
        check_width(uni_store, "UNI embedding", self.uni.shape[-1], config.uni_dim)
        self.uni_null = uni_null
        group = open_feature_store(ge_store)
        self.ge_tokens = None
        if mode == SPOTWISE:
            self.ge_rows = store_rows(group, refs, ge_store)
            self.ge_cls = check_finite_rows(read_array_rows(group["embedding"], self.ge_rows), ge_store, "embedding",
                                            refs)
            check_width(ge_store, "GE embedding", self.ge_cls.shape[-1], config.ge_dim)
            if self.uses_tokens:
                if tokens is None:
                    raise ValueError("a token model in spotwise mode needs the GE store's token source")
                self.ge_tokens = tokens
        else:
            for centroid in centroids.values():
                check_width(ge_store, "GE centroid", centroid.cls.shape[-1], config.ge_dim)

    def __len__(self) -> int:
        return len(self.rows)

    def start_ge(self, part: pd.DataFrame, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The alpha = 0 end of each row: (CLS (n, d), tokens (n, T, d), masks (n, T))."""
        if self.mode == SPOTWISE:
            cls = self.ge_cls[refs].astype(np.float64)
            if self.ge_tokens is None:
                return cls, None, None
            tokens, masks = self.ge_tokens.rows(self.ge_rows[refs], [self.ref_keys[r] for r in refs])
            return cls, tokens.cpu().numpy().astype(np.float64), masks.cpu().numpy()
        sources = [self.centroids[s] for s in part["source"]]
        cls = np.stack([c.cls for c in sources])
        if not self.uses_tokens:
            return cls, None, None
        return cls, np.stack([c.tokens for c in sources]), np.stack([c.valid for c in sources])

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor | None, GeBatch]:
        part = self.rows.iloc[positions]
        refs = np.array([self.ref_index[k] for k in part["ref_key"]])
        alphas, targets = part["alpha"].to_numpy(), part["target"].tolist()
        start_cls, start_tokens, start_masks = self.start_ge(part, refs)
        cls = np.stack([interpolate_ge(c, self.centroids[t].cls, a) for c, t, a in zip(start_cls, targets, alphas)])
        ge = GeBatch(torch.from_numpy(cls.astype(np.float32)))
        if start_tokens is not None:
            moved = [interpolate_tokens(tok, m, self.centroids[t], a)
                     for tok, m, t, a in zip(start_tokens, start_masks, targets, alphas)]
            ge.tokens = torch.from_numpy(np.stack([m[0] for m in moved]).astype(np.float32))
            ge.token_mask = torch.from_numpy(np.stack([m[1] for m in moved]))
        uni = None if self.uni_null else torch.from_numpy(self.uni[refs].astype(np.float32))
        return uni, ge


def perturbation_rows(pairs: Sequence[tuple[str, str]], alphas: Sequence[float], test_keys: Sequence[str],
                      test_labels: np.ndarray, train_labels: np.ndarray, n_ref: int, seed: int,
                      mode: str = CENTROID) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per (pair, reference spot, alpha), and the skipped pairs with their reason."""
    rows, skipped = [], {}
    for source, target in pairs:
        pair = f"{source}->{target}"
        if not np.any(train_labels == target):
            skipped[pair] = f"no train spots labelled {target!r} (no target centroid)"
        elif mode == CENTROID and not np.any(train_labels == source):
            skipped[pair] = f"no train spots labelled {source!r} (no source centroid)"
        elif not np.any(test_labels == source):
            skipped[pair] = f"no test spots labelled {source!r} (no reference spots)"
        if pair in skipped:
            log.warning("perturbation pair %s skipped: %s", pair, skipped[pair])
            continue
        for ref in choose_reference_spots(test_keys, test_labels, source, n_ref, seed):
            rows.extend({"spot_key": f"{pair}|{ref}|{alpha:g}", "pair": pair, "source": source, "target": target,
                         "ref_key": ref, "alpha": float(alpha)} for alpha in alphas)
    return pd.DataFrame(rows, columns=["spot_key", "pair", "source", "target", "ref_key", "alpha"]), skipped


def run_perturbed_tiles(args: argparse.Namespace) -> Path:
    pairs, alphas = parse_pairs(args.pairs), parse_alphas(args.alphas)
    regime = GE if args.uni_null else UNI_GE
    session = SamplingSession(SessionSettings.from_args(
        args, regime, needs_ge_model="perturbation sampling needs a GE model; this model is UNI-only"))
    trained = session.trained
    train_keys = split_keys(args.split, TRAIN)
    test_keys = split_keys(args.split, TEST)
    train_labels = read_spot_labels(args.expression, train_keys)
    test_labels = read_spot_labels(args.expression, test_keys)
    rows, skipped = perturbation_rows(pairs, alphas, test_keys, test_labels, train_labels, args.n_ref, args.seed,
                                      args.mode)
    if rows.empty:
        raise InputError(args.expression, f"no perturbation pair can be sampled: {skipped}")
    wanted = [*rows["target"].unique(), *(rows["source"].unique() if args.mode == CENTROID else [])]
    check_trained_encoder(trained.ge_encoder, encoder_identity(open_feature_store(args.ge).attrs.get("encoder")),
                          trained.path / "training.json", args.ge)
    tokens = GeTokenSource(args.ge, session.device) if trained.config.uses_ge_tokens else None
    centroids = ge_centroids(args.ge, train_keys, train_labels, wanted, tokens)
    conditions = PerturbationConditions(rows, args.uni, args.ge, centroids, trained.config, args.uni_null, args.mode,
                                        tokens)
    session.open_codec()
    log.info("perturbation (%s mode: %s): %d rows (%d pairs x refs x %d alphas), regime %s%s -> %s", args.mode,
             MODES[args.mode], len(rows), rows["pair"].nunique(), len(alphas), regime,
             " (UNI nulled)" if args.uni_null else "", args.out)
    inputs = [session.weights_path, args.split, args.expression, args.uni, args.ge]
    attrs = session.attrs("perturbed-tiles", cli_params(args), inputs)
    attrs["perturbation"] = {
        "mode": args.mode,
        "mode_description": MODES[args.mode],
        "pairs": [f"{s}->{t}" for s, t in pairs],
        "sampled_pairs": rows["pair"].unique().tolist(),
        "skipped_pairs": skipped,
        "alphas": alphas,
        "n_ref": args.n_ref,
        "uni_null": bool(args.uni_null),
        "centroids": "mean CancerFoundation CLS (and per-position mean of real tokens) of the TRAIN spots "
                     "of a label",
        "noise": "per reference spot: keyed_generator(seed, 'sample', ref_key), the same at every alpha",
    }
    extra = {"pair": rows["pair"].to_numpy(dtype=object), "ref_key": rows["ref_key"].to_numpy(dtype=object),
             "alpha": rows["alpha"].to_numpy(dtype=np.float64)}
    return session.generate(conditions, args.out, attrs, extra_arrays=extra)


def register(subparsers: argparse._SubParsersAction) -> None:
    perturb = subparsers.add_parser("perturbed-tiles", help="GE interpolated between class centroids (Table 5)")
    add_sampler_options(perturb)
    perturb.add_argument("--expression", type=Path, required=True, help='cohort h5ad with obs["label"]')
    perturb.add_argument("--ge", type=Path, required=True, help="cancerfoundation feature store")
    perturb.add_argument("--pairs", default="Tumor:Stroma,Tumor:Immune,Immune:Tumor")
    perturb.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    perturb.add_argument("--n-ref", type=int, default=100)
    perturb.add_argument("--mode", choices=sorted(MODES), default=CENTROID,
                         help="centroid: source-to-target centroid (paper); spotwise: each spot's GE to the target")
    perturb.add_argument("--uni-null", action="store_true", help="null the UNI condition (ge guidance)")
    perturb.set_defaults(func=run_perturbed_tiles)
