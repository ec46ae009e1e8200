"""The spots table, `spots/{sample}.parquet`, the one reader: one row per in-tissue spot of a slide,
rows aligned with its patches store (`stmdit spots` writes both; columns SPOT_COLUMNS). `keep`
marks the spots that pass the filters; the later stages read the kept ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from stmdit.errors import InputError

SPOT_COLUMNS = [
    "key", "sample", "donor", "cohort", "barcode", "array_row", "array_col", "pxl_row", "pxl_col",
    "diameter_px", "foreground", "laplacian_var", "tissue_fraction", "label", "keep", "reason",
]
# what the expression, split and DeepSpot stages need of every table they read
KEPT_SPOT_COLUMNS = ("key", "sample", "donor", "barcode", "pxl_row", "pxl_col", "label", "keep")


def read_spots_table(path: str | Path, columns: Sequence[str] | None = None, kept: bool = False,
                     required: Iterable[str] = ()) -> pd.DataFrame:
    """`columns` (all when None) of one slide's spots table, only its kept rows when `kept` (index
    reset); InputError naming the table when it cannot be read or lacks a column it must have."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        present = pq.read_schema(path).names
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read spots table: {exc}") from None
    wanted = None if columns is None else list(dict.fromkeys([*columns, *(["keep"] if kept else [])]))
    missing = sorted({*(wanted or []), *required, *(["keep"] if kept else [])} - set(present))
    if missing:
        raise InputError(path, f"spots table lacks column(s) {missing}")
    table = pd.read_parquet(path, columns=wanted)
    if kept:
        table = table[table["keep"].astype(bool)].reset_index(drop=True)
        if columns is not None and "keep" not in columns:
            table = table.drop(columns="keep")
    return table


def read_kept_spots(path: str | Path) -> pd.DataFrame:
    """The kept spots of one slide, every column (KEPT_SPOT_COLUMNS at least)."""
    return read_spots_table(path, kept=True, required=KEPT_SPOT_COLUMNS)


def read_labelled_spots(paths: Iterable[str | Path], columns: Sequence[str]) -> pd.DataFrame:
    """The kept spots of several tables (every row of a table without `keep`), as `key`, `label`
    ("unlabelled" when empty or absent) and the other `columns`, in table order."""
    wanted = ["key", "label", *[c for c in columns if c not in ("key", "label")]]
    parts = []
    for path in paths:
        table = read_spots_table(path, required=[c for c in wanted if c != "label"])
        if "keep" in table:
            table = table[table["keep"].astype(bool)]
        if "label" not in table:
            table = table.assign(label="")
        parts.append(table[wanted])
    spots = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=wanted)
    spots["key"] = spots["key"].astype(str)
    spots["label"] = spots["label"].fillna("").astype(str).replace("", "unlabelled")
    return spots
