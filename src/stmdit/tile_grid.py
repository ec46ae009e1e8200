"""The real/generated grid: a PNG of real tiles and, per regime, the generated tiles of the same
spots, a few spots of each tissue class.

    stmdit tile-grid --spots S1.parquet ... --patches S1.zarr ... --tiles uni_ge=A.zarr uni=B.zarr
        [--latents L.zarr --vae-impl ...] --per-class 4 --seed 0 --out results/tiles/M/C/grid.png

With --latents, a row of the real tiles decoded from their latents (the most a generated tile can show).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from stmdit.cli import parse_named_paths
from stmdit.errors import InputError
from stmdit.features import open_feature_store
from stmdit.image_stores import open_image_store, read_image
from stmdit.loader import store_rows
from stmdit.provenance import atomic_path
from stmdit.tile_decoder import StoreDecoder, add_vae_options
from stmdit.spots_table import read_labelled_spots
from stmdit.zarr_rows import read_array_rows, string_values

log = logging.getLogger(__name__)

GRID_LABEL_WIDTH = 96  # px left of the tiles for the row labels
GRID_HEADER_HEIGHT = 24  # px above the tiles for the class labels
GRID_GAP = 4  # px right of and below every tile


def grid_size(n_rows: int, n_columns: int, tile_px: int) -> tuple[int, int]:
    """(height, width) of a grid PNG."""
    return GRID_HEADER_HEIGHT + n_rows * (tile_px + GRID_GAP), GRID_LABEL_WIDTH + n_columns * (tile_px + GRID_GAP)


def read_labels_tables(spots: Sequence[Path]) -> pd.Series:
    """key -> label ("unlabelled" when empty) of the kept spots of the spots tables."""
    table = read_labelled_spots(spots, ["key"])
    return pd.Series(table["label"].to_numpy(), index=table["key"].to_numpy(), dtype=str)


def choose_grid_spots(labels: pd.Series, per_class: int, seed: int) -> list[tuple[str, str]]:
    """(label, key) columns: up to `per_class` spots of each label (sorted), drawn at `seed`."""
    rng = np.random.default_rng(seed)
    columns = []
    for label in sorted(labels.unique()):
        keys = labels.index[labels.to_numpy() == label].to_numpy()
        chosen = np.sort(rng.choice(len(keys), size=min(per_class, len(keys)), replace=False))
        columns.extend((label, str(keys[i])) for i in chosen)
    return columns


def render_grid(rows: Sequence[tuple[str, np.ndarray]], columns: Sequence[tuple[str, str]], tile_px: int) -> np.ndarray:
    """RGB canvas: one row per (name, images (n_columns, H, W, 3)), class names over their first column."""
    import cv2

    height, width = grid_size(len(rows), len(columns), tile_px)
    canvas = np.full((height, width, 3), 255, np.uint8)
    font, scale, black = cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0)
    for c, (label, _) in enumerate(columns):
        if c == 0 or columns[c - 1][0] != label:
            x = GRID_LABEL_WIDTH + c * (tile_px + GRID_GAP)
            cv2.putText(canvas, label, (x, GRID_HEADER_HEIGHT - 8), font, scale, black, 1, cv2.LINE_AA)
    for r, (name, images) in enumerate(rows):
        y = GRID_HEADER_HEIGHT + r * (tile_px + GRID_GAP)
        cv2.putText(canvas, name, (4, y + tile_px // 2), font, scale, black, 1, cv2.LINE_AA)
        for c, image in enumerate(images):
            x = GRID_LABEL_WIDTH + c * (tile_px + GRID_GAP)
            canvas[y:y + tile_px, x:x + tile_px] = cv2.resize(image, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
    return canvas


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    import cv2

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding of {path} failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())


def run_tile_grid(args: argparse.Namespace) -> Path:
    if len(args.spots) != len(args.patches):
        raise InputError(None, f"{len(args.spots)} --spots tables but {len(args.patches)} --patches stores")
    tile_stores = parse_named_paths(args.tiles, "--tiles")
    labels = read_labels_tables(args.spots)
    decoder = StoreDecoder.from_args(args)  # on the CPU: tile-grid has no --device
    opened_tiles = {name: open_image_store(path, decoder=decoder) for name, path in tile_stores.items()}
    real_stores = [open_image_store(path) for path in args.patches]
    present = labels.index.isin([k for store in real_stores for k in store.keys])
    for store in opened_tiles.values():
        present &= labels.index.isin(store.keys)
    latent_group = None
    if args.latents is not None:
        latent_group = open_feature_store(args.latents)
        if "latent" not in latent_group or "spot_key" not in latent_group:
            raise InputError(args.latents, "not a latent store (needs arrays latent and spot_key)")
        present &= labels.index.isin(list(string_values(latent_group["spot_key"][:])))
    labels = labels[present]
    if labels.empty:
        raise InputError(None, "no spot of the spots tables is in the patches stores and in every tile store")
    columns = choose_grid_spots(labels, args.per_class, args.seed)
    keys = [key for _, key in columns]
    rows = [("real", np.stack([read_image(real_stores, key) for key in keys]))]
    if latent_group is not None:  # the real tile through the codec: the most a generated tile can show
        latents = read_array_rows(latent_group["latent"], store_rows(latent_group, keys, args.latents))
        rows.append(("real (VAE)", decoder.decode(latents.astype(np.float32))))
    rows += [(name, store.read_rows([store.index[k] for k in keys])) for name, store in opened_tiles.items()]
    write_png(args.out, render_grid(rows, columns, args.tile_px))
    log.info("wrote %s: %d spots of %d classes, rows %s", args.out, len(keys), labels.nunique(),
             [name for name, _ in rows])
    return Path(args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    grid = subparsers.add_parser("tile-grid", help="PNG grid of real vs generated tiles per tissue class")
    grid.add_argument("--spots", type=Path, nargs="+", required=True, help="spots tables (labels)")
    grid.add_argument("--patches", type=Path, nargs="+", required=True, help="patches stores, same order")
    grid.add_argument("--tiles", nargs="+", required=True, help="REGIME=tile store, one per row")
    grid.add_argument("--latents", type=Path, default=None,
                      help="sd3_vae feature store: adds a row of the real tiles decoded from their latents")
    add_vae_options(grid, help_impl="decoder of --latents and of tile stores that keep latents only")
    grid.add_argument("--per-class", type=int, default=4)
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--tile-px", type=int, default=128)
    grid.add_argument("--out", type=Path, required=True)
    grid.set_defaults(func=run_tile_grid)
