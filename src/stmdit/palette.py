"""Does a generated tile carry its spot's palette? What a UNI-conditioned tile should share with
its spot's real tile, whatever its layout: UNI2-h is a crop- and flip-invariant embedding of the
whole tile, so it carries the kind of tissue, the palette and the texture, not where things sit.

    stmdit palette --patches S1.zarr ... --tiles uni=A.zarr uncond=B.zarr --out palette.json

A tile's palette is its mean colour in CIELAB (lightness L*, and the a* and b* colour axes, so the
three axes are roughly perceptually even and the stain's hue is kept apart from its darkness). Per
regime, the agreement is the Pearson r over the test spots between the generated tiles' and their
own spots' real tiles' mean colour, one r per axis, averaged over the three axes. Its interval is a
95% spot-level bootstrap (spots resampled, r recomputed). The null pairs each generated tile with
the real tile of another spot (a fixed random derangement), which is what a model with shuffled
UNI produces in expectation: `carries_palette` is true when the regime's interval lies above the
null's. A constant generator has r = 0 on every axis.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from stmdit.cli import cli_params, parse_named_paths
from stmdit.errors import InputError
from stmdit.eval_json import write_eval_json
from stmdit.image_stores import Decoder, open_image_store
from stmdit.layout import RealSummaries, chunked_summaries, derangement
from stmdit.provenance import provenance

log = logging.getLogger(__name__)

SPACES = ("lab", "rgb")
AXES = {"lab": ("L*", "a*", "b*"), "rgb": ("R", "G", "B")}


def mean_colour(images: np.ndarray, space: str = "lab") -> np.ndarray:
    """(N, H, W, 3) uint8 RGB tiles -> (N, 3) mean colour: CIELAB (L* 0-100, a*, b*) or RGB (0-255)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"tiles of shape {images.shape[1:]}, expected (H, W, 3)")
    if space == "rgb":
        return images.reshape(len(images), -1, 3).mean(axis=1, dtype=np.float64)
    if space != "lab":
        raise ValueError(f"colour space {space!r}, expected one of {SPACES}")
    return np.stack([cv2.cvtColor(tile.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab).reshape(-1, 3).mean(axis=0)
                     for tile in images]).astype(np.float64) if len(images) else np.zeros((0, 3))


# below this spread over spots (L*a*b* or RGB units) a colour axis counts as constant: a twentieth of a
# just-noticeable difference (Delta E 1); OpenCV gives grey tiles a* and b* within +-0.03, not 0
CONSTANT_SD = 0.05


def axis_correlations(real: np.ndarray, generated: np.ndarray) -> np.ndarray:
    """Pearson r over rows, per column, of two (N, 3) colour tables; 0 where a column is constant
    (e.g. a* and b* of grey tiles, which vary only by rounding)."""
    real = real - real.mean(axis=0)
    generated = generated - generated.mean(axis=0)
    numerator = (real * generated).sum(axis=0)
    denominator = np.sqrt((real * real).sum(axis=0) * (generated * generated).sum(axis=0))
    varies = (real.std(axis=0) > CONSTANT_SD) & (generated.std(axis=0) > CONSTANT_SD)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=varies)


def bootstrap_palette_r(real: np.ndarray, generated: np.ndarray, n_boot: int, seed: int) -> dict:
    """The axis-mean r on all spots, its per-axis values and a 95% spot-bootstrap interval."""
    per_axis = axis_correlations(real, generated)
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, len(real), size=len(real))
        replicates[b] = axis_correlations(real[rows], generated[rows]).mean()
    lo, hi = np.quantile(replicates, [0.025, 0.975]) if n_boot else (np.nan, np.nan)
    return {"point": float(per_axis.mean()), "per_axis": [float(r) for r in per_axis], "lo": float(lo),
            "hi": float(hi), "n": int(len(real))}


def regime_palette(real: np.ndarray, generated: np.ndarray, n_boot: int, seed: int) -> dict:
    """Palette agreement of generated tiles with their own spots' real tiles, and with other spots' (null)."""
    entry = bootstrap_palette_r(real, generated, n_boot, seed)
    entry["null"] = bootstrap_palette_r(real[derangement(len(real), seed)], generated, n_boot, seed + 1)
    entry["carries_palette"] = bool(entry["lo"] > entry["null"]["hi"])
    return entry


def palette_report(patches: Sequence[Path], tile_stores: Mapping[str, Path], space: str, n_boot: int, seed: int,
                   decoder: Decoder | None = None) -> dict:
    def summarise(tiles: np.ndarray) -> np.ndarray:
        return mean_colour(tiles, space)

    real_colours = RealSummaries(patches, summarise, 3)
    regimes = {}
    for regime, path in tile_stores.items():
        tiles = open_image_store(path, min_spots=2, decoder=decoder)  # the other-spot null needs two
        keys = tiles.keys
        try:
            generated = chunked_summaries(tiles, range(len(keys)), summarise, 3)
        except ValueError as exc:
            raise InputError(path, str(exc)) from None
        regimes[regime] = entry = regime_palette(real_colours(keys, path), generated, n_boot, seed)
        log.info("%s: palette r %.3f [%.3f, %.3f] (per axis %s), other-spot null %.3f [%.3f, %.3f] over %d spots",
                 regime, entry["point"], entry["lo"], entry["hi"], " ".join(f"{r:.3f}" for r in entry["per_axis"]),
                 entry["null"]["point"], entry["null"]["lo"], entry["null"]["hi"], entry["n"])
    return regimes


def run_palette(args: argparse.Namespace) -> Path:
    if args.n_boot < 1:
        raise InputError(None, f"--n-boot must be at least 1, got {args.n_boot}")
    tile_stores = parse_named_paths(args.tiles, "--tiles")
    from stmdit.tile_decoder import StoreDecoder

    regimes = palette_report(args.patches, tile_stores, args.space, args.n_boot, args.seed, StoreDecoder.from_args(args))
    result = {
        "metric": "palette", "model": args.model, "cohort": args.cohort, "space": args.space, "axes": list(AXES[args.space]),
        "measure": "Pearson r over spots between the mean colour of each generated tile and of its spot's real "
                   "tile, per colour axis, averaged over the axes",
        "null": "the same with each generated tile paired with another spot's real tile (a fixed derangement)",
        "interval": f"95% spot bootstrap ({args.n_boot} replicates)",
        "regimes": regimes,
        "provenance": provenance("palette", cli_params(args), inputs=[*args.patches, *tile_stores.values()]),
    }
    write_eval_json(args.out, result)
    return Path(args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    from stmdit.tile_decoder import TILES_DECODER_HELP, add_vae_options

    p = subparsers.add_parser("palette", help="mean-colour agreement of generated tiles with their real spots")
    p.add_argument("--patches", type=Path, nargs="+", required=True, help="patches stores of the cohort")
    p.add_argument("--tiles", nargs="+", required=True, help="regime=tile store")
    p.add_argument("--space", choices=SPACES, default="lab", help="colour space of the mean colour (default lab)")
    add_vae_options(p, help_impl=TILES_DECODER_HELP)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where tile stores kept as latents are decoded")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="")
    p.add_argument("--cohort", default="")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_palette)
