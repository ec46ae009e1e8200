"""The split table, results/splits/{cohort}.parquet: the one reader and writer of the format.

One row per kept spot of a cohort, in cohort spot order: key (sample:barcode), sample, donor and
split (train | val | test), with the split stage's provenance in the parquet metadata. Every stage
that needs a cohort's split reads it here, so the checks (columns, split names, unique keys) are
made in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from stmdit.errors import InputError
from stmdit.provenance import write_parquet

TRAIN, VAL, TEST = "train", "val", "test"
SPLIT_NAMES = (TRAIN, VAL, TEST)
COLUMNS = ("key", "sample", "donor", "split")


def write_split_table(table: pd.DataFrame, path: str | Path, meta: dict[str, Any]) -> None:
    """Write the split table (columns COLUMNS, split names from SPLIT_NAMES) atomically, with `meta`."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"split table without columns {missing}")
    unknown = sorted(set(table["split"].astype(str)) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; expected {list(SPLIT_NAMES)}")
    write_parquet(table[list(COLUMNS)], path, meta)


def read_split_table(path: str | Path, columns: Sequence[str] = ("key", "split")) -> pd.DataFrame:
    """The `columns` of a split table as strings (key and split always read), checked: the columns
    exist, every split name is known and no spot key appears twice. InputError names the file."""
    path = Path(path)
    wanted = list(dict.fromkeys(["key", "split", *columns]))
    try:
        table = pd.read_parquet(path, columns=wanted)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(path, f"cannot read split table (needs columns {', '.join(wanted)}): {exc}") from None
    table = table.astype({column: str for column in wanted})
    unknown = sorted(set(table["split"]) - set(SPLIT_NAMES))
    if unknown:
        raise InputError(path, f"unknown split name(s) {unknown}; expected {list(SPLIT_NAMES)}")
    duplicated = table["key"].duplicated()
    if duplicated.any():
        raise InputError(path, f"spot key {table['key'][duplicated].iloc[0]} appears twice")
    return table


def split_keys(path: str | Path, split_name: str) -> list[str]:
    """Spot keys of one split, in cohort order; InputError when the split has none."""
    table = read_split_table(path)
    keys = table.loc[table["split"] == split_name, "key"].tolist()
    if not keys:
        raise InputError(path, f"no spot is in split {split_name!r} (splits: {sorted(table['split'].unique())})")
    return keys
