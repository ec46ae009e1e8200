"""Do generated tiles have the tissue's texture? Grey roughness against the real tiles through the VAE.

    stmdit texture --latents sd3_vae.zarr --tiles uni=A.zarr uni_ge=B.zarr --vae-impl smoke --out texture.json

A tile's grey roughness is the mean squared difference between neighbouring 8 x 8-px block means of
its grey image (horizontal and vertical neighbours together): nuclei, fibres and white space make it
large, a tile of flat colour makes it 0, and squares of a latent pixel's size (8 px) make it larger than
tissue. The reference is the same spots' real latents decoded by the same VAE (`real (VAE)` in the
grids), the most detail a generated tile can show. Per regime the report gives both means over the
spots, their ratio with a 95% spot-bootstrap interval, and whether the ratio lies within TARGET.

Two diagnostics come with it. `cell_border`: how much of the roughness sits on the borders of the
denoiser's token grid (a mosaic of token squares). `scales`: the same roughness with blocks of
8-64 px, generated over real (VAE) per block size. Tiles of filtered noise in the tissue's palette
can match tissue at 8 px and still lack its large structures (white space, fibre bundles, nests of
cells), which only the larger blocks see.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np

from stmdit.cli import cli_params, parse_named_paths
from stmdit.errors import InputError
from stmdit.eval_json import write_eval_json
from stmdit.features import open_feature_store
from stmdit.image_stores import open_image_store
from stmdit.layout import CHUNK_TILES, chunked_summaries
from stmdit.loader import store_rows
from stmdit.provenance import provenance
from stmdit.tile_decoder import StoreDecoder, add_vae_options
from stmdit.zarr_rows import read_array_rows

log = logging.getLogger(__name__)

BLOCK_PX = 8  # one latent pixel of the SD3 VAE
TARGET = (0.8, 1.25)  # generated / real (VAE) roughness that counts as the tissue's texture
CELLS_PX = (16, 32)  # the token grids of a DiT on SD3 latents at patch size 2 (paper) and 4 (demo)
SCALES_PX = (8, 16, 32, 64)  # block sizes of the roughness by scale: a latent pixel to a quarter of a 256-px tile


def grey_block_means(images: np.ndarray, block: int = BLOCK_PX) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB tiles -> (N, H/b, W/b) means of the grey tile's b x b blocks (grey levels 0-255)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"tiles of shape {images.shape[1:]}, expected (H, W, 3)")
    n, height, width = images.shape[:3]
    if height % block or width % block or height < 2 * block:
        raise ValueError(f"tiles of {height} x {width} px do not divide into at least 2 x 2 blocks of {block} px")
    grey = np.stack([cv2.cvtColor(tile, cv2.COLOR_RGB2GRAY) for tile in images]).astype(np.float64)
    return grey.reshape(n, height // block, block, width // block, block).mean(axis=(2, 4))


def neighbour_differences(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, h, w) block means -> squared differences of horizontally (N, h, w - 1) and vertically
    (N, h - 1, w) neighbouring blocks."""
    return np.diff(means, axis=2) ** 2, np.diff(means, axis=1) ** 2


def block_differences(images: np.ndarray, block: int = BLOCK_PX) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 RGB tiles -> `neighbour_differences` of their grey `block`-px block means."""
    return neighbour_differences(grey_block_means(images, block))


def coarse_roughness(means: np.ndarray, factor: int) -> np.ndarray:
    """(N, h, w) block means -> (N,) grey roughness of blocks `factor` times as large (NaN when the
    tile does not divide into at least 2 x 2 of them)."""
    n, height, width = means.shape
    if height % factor or width % factor or height < 2 * factor or width < 2 * factor:
        return np.full(n, np.nan)
    coarse = means.reshape(n, height // factor, factor, width // factor, factor).mean(axis=(2, 4))
    return roughness_of(neighbour_differences(coarse))


def roughness_of(differences: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(N,) mean of `block_differences` over every neighbouring pair."""
    across, down = differences
    return (across.sum(axis=(1, 2)) + down.sum(axis=(1, 2))) / (across[0].size + down[0].size)


def grey_roughness(images: np.ndarray, block: int = BLOCK_PX) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB tiles -> (N,) mean squared difference of neighbouring block means of the
    grey tile (grey levels 0-255)."""
    return roughness_of(block_differences(images, block))


def cell_border_roughness(images: np.ndarray, cell: int, block: int = BLOCK_PX,
                          differences: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """(N, H, W, 3) tiles -> (N, 2): the grey roughness of the block pairs that straddle a border of
    the `cell`-px grid, and of the pairs inside a cell. A denoiser that makes each of its patch
    tokens on its own draws a mosaic of `cell`-px squares (cell = patch size x 8 px): its border
    pairs differ far more than its inner pairs, while tissue has no such grid. `differences`: the
    tiles' `block_differences`, when already computed."""
    if cell % block or cell <= block:
        raise ValueError(f"cells of {cell} px are not a multiple (> 1) of {block}-px blocks")
    across, down = differences if differences is not None else block_differences(images, block)
    per_cell = cell // block
    if across.shape[2] < per_cell or down.shape[1] < per_cell:  # smaller than two cells: no border
        return np.full((len(images), 2), np.nan)
    border_cols = (np.arange(across.shape[2]) + 1) % per_cell == 0
    border_rows = (np.arange(down.shape[1]) + 1) % per_cell == 0
    border = np.concatenate([across[:, :, border_cols].reshape(len(images), -1),
                             down[:, border_rows, :].reshape(len(images), -1)], axis=1)
    inner = np.concatenate([across[:, :, ~border_cols].reshape(len(images), -1),
                            down[:, ~border_rows, :].reshape(len(images), -1)], axis=1)
    return np.stack([border.mean(axis=1), inner.mean(axis=1)], axis=1)


def texture_summary(tiles: np.ndarray) -> np.ndarray:
    """(N, SUMMARY_WIDTH): the grey roughness, the border and inner roughness of each cell grid, then
    the roughness with each larger block of SCALES_PX."""
    means = grey_block_means(tiles)  # the grey conversion and block means, once for every measure
    differences = neighbour_differences(means)
    return np.concatenate([roughness_of(differences)[:, None]]
                          + [cell_border_roughness(tiles, cell, differences=differences) for cell in CELLS_PX]
                          + [coarse_roughness(means, scale // BLOCK_PX)[:, None] for scale in SCALES_PX[1:]], axis=1)


SUMMARY_WIDTH = 1 + 2 * len(CELLS_PX) + len(SCALES_PX) - 1
SCALE_COLUMNS = dict(zip(SCALES_PX, [0, *range(1 + 2 * len(CELLS_PX), SUMMARY_WIDTH)]))


def decoded_summaries(codec, latents, rows: list[int]) -> np.ndarray:
    """`texture_summary` of the real latents `latents[rows]` decoded by `codec`, CHUNK_TILES at a time."""
    parts = [texture_summary(codec.decode(read_array_rows(latents, rows[start:start + CHUNK_TILES]).astype(np.float32)))
             for start in range(0, len(rows), CHUNK_TILES)]
    return np.concatenate(parts) if parts else np.zeros((0, SUMMARY_WIDTH))


def cell_grids(generated: np.ndarray, real: np.ndarray) -> dict[str, dict[str, float]]:
    """Per cell size, the border / inner roughness of the generated and of the real (VAE) tiles."""
    grids = {}
    for i, cell in enumerate(CELLS_PX):
        border, inner = 1 + 2 * i, 2 + 2 * i
        if np.isnan(generated[:, border]).any():
            continue  # tiles smaller than two cells
        grids[str(cell)] = {"generated": float(generated[:, border].mean() / max(generated[:, inner].mean(), 1e-12)),
                            "real_vae": float(real[:, border].mean() / max(real[:, inner].mean(), 1e-12))}
    return grids


def scale_ratios(generated: np.ndarray, real: np.ndarray) -> dict[str, dict[str, float]]:
    """Per block size of SCALES_PX, the mean grey roughness of the generated and of the real (VAE)
    tiles and their ratio (sizes the tiles are too small for are left out)."""
    scales = {}
    for scale, column in SCALE_COLUMNS.items():
        if np.isnan(generated[:, column]).any():
            continue
        mean_generated, mean_real = float(generated[:, column].mean()), float(real[:, column].mean())
        scales[str(scale)] = {"generated": mean_generated, "real_vae": mean_real,
                              "ratio": mean_generated / max(mean_real, 1e-12)}
    return scales


def ratio_interval(generated: np.ndarray, real: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% spot-bootstrap interval of mean(generated) / mean(real) (spots resampled in pairs)."""
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, len(real), size=len(real))
        replicates[b] = generated[rows].mean() / max(real[rows].mean(), 1e-12)
    lo, hi = np.quantile(replicates, [0.025, 0.975])
    return float(lo), float(hi)


def texture_report(latent_path: Path, tile_stores: dict[str, Path], decoder: StoreDecoder, n_boot: int, seed: int) -> dict:
    """Grey roughness of each regime's tiles against the same spots' real latents decoded by `decoder`
    (which also decodes tile stores that keep latents only)."""
    codec = decoder.codec
    latent_group = open_feature_store(latent_path)
    if "latent" not in latent_group or "spot_key" not in latent_group:
        raise InputError(latent_path, "not a latent store (needs arrays latent and spot_key)")
    real_cache: dict[str, np.ndarray] = {}
    regimes = {}
    for regime, path in tile_stores.items():
        tiles = open_image_store(path, min_spots=2, decoder=decoder)  # the ratio's bootstrap resamples spots
        keys = tiles.keys
        wanted = [k for k in keys if k not in real_cache]
        if wanted:
            rows = store_rows(latent_group, wanted, latent_path)
            real_cache.update(zip(wanted, decoded_summaries(codec, latent_group["latent"], rows)))
        real_summaries = np.stack([real_cache[k] for k in keys])
        try:
            summaries = chunked_summaries(tiles, range(len(keys)), texture_summary, SUMMARY_WIDTH)
        except ValueError as exc:
            raise InputError(path, str(exc)) from None
        generated, real = summaries[:, 0], real_summaries[:, 0]
        ratio = float(generated.mean() / max(real.mean(), 1e-12))
        lo, hi = ratio_interval(generated, real, n_boot, seed)
        grids = cell_grids(summaries, real_summaries)
        scales = scale_ratios(summaries, real_summaries)
        regimes[regime] = {"generated": float(generated.mean()), "real_vae": float(real.mean()), "ratio": ratio,
                           "lo": lo, "hi": hi, "n": len(keys), "within_target": bool(TARGET[0] <= ratio <= TARGET[1]),
                           "cell_border": grids, "scales": scales}
        log.info("%s: grey roughness %.1f, real (VAE) %.1f, ratio %.3f [%.3f, %.3f] over %d spots; border / inner "
                 "roughness %s; ratio by block size %s", regime, generated.mean(), real.mean(), ratio, lo, hi, len(keys),
                 ", ".join(f"{c} px {g['generated']:.2f} (real (VAE) {g['real_vae']:.2f})" for c, g in grids.items()),
                 ", ".join(f"{b} px {v['ratio']:.2f}" for b, v in scales.items()))
    return regimes


def run_texture(args: argparse.Namespace) -> Path:
    if args.n_boot < 1:
        raise InputError(None, f"--n-boot must be at least 1, got {args.n_boot}")
    tile_stores = parse_named_paths(args.tiles, "--tiles")
    regimes = texture_report(args.latents, tile_stores, StoreDecoder.from_args(args),
                             args.n_boot, args.seed)
    result = {
        "metric": "texture", "model": args.model, "cohort": args.cohort,
        "measure": f"grey roughness: mean squared difference of neighbouring {BLOCK_PX} x {BLOCK_PX}-px block means "
                   "of the grey tile, averaged over spots",
        "reference": "the same spots' real latents decoded by the same VAE (real (VAE))",
        "target": list(TARGET), "interval": f"95% spot bootstrap of the ratio ({args.n_boot} replicates)",
        "cell_border": "per cell size (px), the roughness of block pairs across a cell border over that of pairs "
                       "inside a cell: near 1 for tissue, far above 1 for a mosaic of the denoiser's patch tokens",
        "scales": "per block size (px), the grey roughness of the generated and real (VAE) tiles with blocks of "
                  "that size and their ratio: below 1 at the larger blocks for tiles without the tissue's "
                  "large structures",
        "regimes": regimes,
        "provenance": provenance("texture", cli_params(args), inputs=[args.latents, *tile_stores.values()]),
    }
    write_eval_json(args.out, result)
    return Path(args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("texture", help="grey roughness of generated tiles against their spots' real (VAE) tiles")
    p.add_argument("--latents", type=Path, required=True, help="the cohort's real latent store (sd3_vae.zarr)")
    p.add_argument("--tiles", nargs="+", required=True, help="regime=tile store")
    add_vae_options(p)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where tile stores kept as latents (and the real latents) are decoded")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="")
    p.add_argument("--cohort", default="")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_texture)
