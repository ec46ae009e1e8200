"""Donor-level train/val/test split of a cohort.

Test donors are held out whole (from config, or one donor drawn with the seed); the remaining
spots form the train pool, of which a seeded random `val_fraction` goes to validation. An H&E-only
(out-of-distribution) cohort is all test. No donor is in both the train pool and test.
"""

from __future__ import annotations

import argparse
import logging
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from stmdit.errors import InputError
from stmdit.provenance import provenance
from stmdit.split_table import SPLIT_NAMES, TEST, TRAIN, VAL, write_split_table
from stmdit.spots_table import read_kept_spots

log = logging.getLogger(__name__)


def _sample_rng(seed: int, sample: str) -> np.random.Generator:
    """A generator that depends only on the seed and the slide, not on the other slides."""
    return np.random.default_rng([seed, zlib.crc32(sample.encode())])


def cap_spots_per_slide(spots: pd.DataFrame, max_spots: int | None, seed: int) -> pd.DataFrame:
    if max_spots is None:
        return spots
    parts = []
    for sample, group in spots.groupby("sample", sort=False):
        if len(group) > max_spots:
            chosen = _sample_rng(seed, sample).choice(len(group), size=max_spots, replace=False)
            group = group.iloc[np.sort(chosen)]
        parts.append(group)
    return pd.concat(parts, ignore_index=True)


def assign_splits(
    spots: pd.DataFrame,
    test_donors: list[str] | None,
    val_fraction: float,
    seed: int,
    all_test: bool = False,
    source: str | Path = "spots",
) -> pd.DataFrame:
    """Return key, sample, donor, split for every spot of `spots` (cohort spot order kept)."""
    out = spots[["key", "sample", "donor"]].copy()
    donors = sorted(out["donor"].unique())
    if all_test:
        out["split"] = TEST
        return out
    if test_donors is None:
        if len(donors) < 2:
            raise InputError(source, f"cannot hold out a test donor: the cohort has only {donors}")
        test_donors = [donors[np.random.default_rng(seed).integers(len(donors))]]
        log.info("no test donors configured: held out %s (seed %d)", test_donors, seed)
    unknown = sorted(set(test_donors) - set(donors))
    if unknown:
        raise InputError(source, f"test donor(s) {unknown} are not in the cohort (donors: {donors})")
    if set(test_donors) == set(donors):
        raise InputError(source, "every donor is a test donor: nothing is left to train on")

    is_test = out["donor"].isin(test_donors).to_numpy()
    split = np.where(is_test, TEST, TRAIN).astype(object)
    pool = np.flatnonzero(~is_test)
    n_val = int(round(val_fraction * len(pool)))
    val_rows = np.random.default_rng(seed).choice(pool, size=n_val, replace=False)
    split[val_rows] = VAL
    out["split"] = split
    return out


def summary_table(splits: pd.DataFrame) -> str:
    table = splits.pivot_table(index="donor", columns="split", values="key", aggfunc="count", fill_value=0)
    table = table.reindex(columns=[c for c in SPLIT_NAMES if c in table.columns])
    table.loc["total"] = table.sum()
    return table.to_string()


def run(args: argparse.Namespace) -> None:
    spots = pd.concat([read_kept_spots(p) for p in args.spots], ignore_index=True)
    if spots.empty:
        raise InputError(args.spots[0], f"cohort {args.cohort!r} has no kept spots to split")
    test_donors = None if args.test_donors == ["auto"] else args.test_donors
    spots = cap_spots_per_slide(spots, args.max_spots_per_slide, args.seed)
    splits = assign_splits(spots, test_donors, args.val_fraction, args.seed, args.all_test, args.spots[0])
    params = {
        "cohort": args.cohort,
        "test_donors": test_donors,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "max_spots_per_slide": args.max_spots_per_slide,
        "all_test": args.all_test,
    }
    write_split_table(splits, args.out, provenance("split", params, args.spots))
    log.info("spots per split and donor:\n%s", summary_table(splits))
    log.info("wrote %s", args.out)


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "null", "") else int(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("split", help="donor-level train/val/test split of a cohort")
    p.add_argument("--cohort", required=True)
    p.add_argument("--spots", nargs="+", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--test-donors", nargs="+", default=["auto"], help="held-out donors, or 'auto' (one, by seed)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-spots-per-slide", type=_optional_int, default=None)
    p.add_argument("--all-test", action="store_true", help="out-of-distribution cohort: every spot is test")
    p.set_defaults(func=run)
