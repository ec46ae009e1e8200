"""Does a generated tile follow its spot's layout? The coarse layout agreement between each
generated tile and the real tile of its spot.

    stmdit layout --patches S1.zarr ... --samples uni=A.zarr uncond=B.zarr --out layout.json

A tile's coarse layout is its grey level pooled to `cells` x `cells` blocks, minus the tile's mean,
so brightness and palette do not count, only where the tile is light and dark. A spot's agreement
is the Pearson correlation of its generated and real layouts. FID rewards the right palette and
texture statistics and says nothing about this; the sample grid shows it, and this measures it.

Per regime the JSON gives the mean agreement over the spots with a 95% spot-level bootstrap
interval, and the same for a null that pairs each generated tile with the real tile of another
spot (a fixed random derangement): tiles that ignore their spot's layout score within the null.
`follows_layout` is true when the regime's interval lies above the null's.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from stmdit.errors import InputError
from stmdit.features import read_array_rows, string_values
from stmdit.provenance import atomic_path, provenance
from stmdit.sample import parse_named_paths, store_keys

log = logging.getLogger(__name__)

DEFAULT_CELLS = 8
CHUNK_TILES = 256  # tiles read at a time (256 x 192 KiB): memory stays flat on the paper's 11,776 test spots


def coarse_layout(images: np.ndarray, cells: int = DEFAULT_CELLS) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, cells * cells): block-mean grey level minus the tile's mean."""
    n, height, width = images.shape[:3]
    if height % cells or width % cells:
        raise ValueError(f"tiles of {height} x {width} px do not split into {cells} x {cells} blocks")
    grey = images.astype(np.float32).mean(axis=-1)
    blocks = grey.reshape(n, cells, height // cells, cells, width // cells).mean(axis=(2, 4)).reshape(n, -1)
    return blocks - blocks.mean(axis=1, keepdims=True)


def layout_agreement(real: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Per-row Pearson correlation of two (N, cells^2) layouts (0 where a layout is flat)."""
    numerator = (real * generated).sum(axis=1)
    denominator = np.sqrt((real * real).sum(axis=1) * (generated * generated).sum(axis=1))
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation without fixed points (n >= 2)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        if not np.any(order == np.arange(n)):
            return order


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(values))}


def regime_layout(real_layout: np.ndarray, generated_layout: np.ndarray, n_boot: int, seed: int) -> dict:
    """Agreement of generated layouts with their own spots' real layouts, and with other spots' (null)."""
    own = layout_agreement(real_layout, generated_layout)
    other = layout_agreement(real_layout[derangement(len(real_layout), seed)], generated_layout)
    entry = bootstrap_mean(own, n_boot, seed)
    entry["null"] = bootstrap_mean(other, n_boot, seed + 1)
    entry["follows_layout"] = bool(entry["lo"] > entry["null"]["hi"])
    return entry


def chunked_layouts(array, rows: Sequence[int], cells: int) -> np.ndarray:
    """Coarse layouts of `array[rows]` (N, H, W, 3), read CHUNK_TILES tiles at a time."""
    parts = [coarse_layout(read_array_rows(array, list(rows[start:start + CHUNK_TILES])), cells)
             for start in range(0, len(rows), CHUNK_TILES)]
    return np.concatenate(parts) if parts else np.zeros((0, cells * cells), np.float32)


class RealLayouts:
    """Coarse layouts of real tiles by spot key, read from the patches stores once."""

    def __init__(self, patches: Sequence[Path], cells: int):
        self.stores = [store_keys(path) for path in patches]
        self.cells = cells
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, keys: Sequence[str], source: Path) -> np.ndarray:
        wanted = [k for k in dict.fromkeys(keys) if k not in self.cache]
        for group, index in self.stores:
            mine = [k for k in wanted if k in index]
            self.cache.update(zip(mine, chunked_layouts(group["images"], [index[k] for k in mine], self.cells)))
        missing = [k for k in keys if k not in self.cache]
        if missing:
            raise InputError(source, f"{len(missing)} spot(s) are in no --patches store, e.g. {missing[0]}")
        return np.stack([self.cache[k] for k in keys])


def layout_report(patches: Sequence[Path], samples: Mapping[str, Path], cells: int, n_boot: int, seed: int) -> dict:
    real_layouts = RealLayouts(patches, cells)
    regimes = {}
    for regime, path in samples.items():
        group, _ = store_keys(path)
        keys = list(string_values(group["spot_key"][:]))
        if len(keys) < 2:
            raise InputError(path, f"{len(keys)} tile(s): the layout null needs at least 2")
        try:
            generated = chunked_layouts(group["images"], range(len(keys)), cells)
        except ValueError as exc:
            raise InputError(path, str(exc)) from None
        regimes[regime] = entry = regime_layout(real_layouts(keys, path), generated, n_boot, seed)
        log.info("%s: layout agreement %.3f [%.3f, %.3f], null %.3f [%.3f, %.3f] over %d spots", regime,
                 entry["mean"], entry["lo"], entry["hi"], entry["null"]["mean"], entry["null"]["lo"],
                 entry["null"]["hi"], entry["n"])
    return regimes


def run_layout(args: argparse.Namespace) -> Path:
    samples = parse_named_paths(args.samples)
    regimes = layout_report(args.patches, samples, args.cells, args.n_boot, args.seed)
    result = {
        "model": args.model, "cohort": args.cohort, "cells": args.cells,
        "measure": "per-spot Pearson r of the block-mean grey layouts (tile mean removed) of generated vs real tile",
        "interval": f"95% spot bootstrap ({args.n_boot} replicates)",
        "regimes": regimes,
        "provenance": provenance("layout", vars(args), inputs=[*args.patches, *samples.values()]),
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return Path(args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("layout", help="coarse layout agreement of generated tiles with their real spots")
    p.add_argument("--patches", type=Path, nargs="+", required=True, help="patches stores of the cohort")
    p.add_argument("--samples", nargs="+", required=True, help="regime=samples store")
    p.add_argument("--cells", type=int, default=DEFAULT_CELLS, help="blocks per side (default 8: 32 px at 256 px)")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="")
    p.add_argument("--cohort", default="")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_layout)
