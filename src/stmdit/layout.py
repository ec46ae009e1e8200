"""Does a generated tile follow its spot's layout? The coarse layout agreement between each
generated tile and the real tile of its spot.

    stmdit layout --patches S1.zarr ... --tiles uni=A.zarr uncond=B.zarr --out layout.json

A tile's coarse layout is its grey level pooled to `cells` x `cells` blocks, minus the tile's mean,
so brightness and palette do not count, only where the tile is light and dark. A spot's agreement
is the Pearson correlation of its generated and real layouts. FID rewards the right palette and
texture statistics and says nothing about this; the sample grid shows it, and this measures it.

Per regime the JSON gives the mean agreement over the spots with a 95% spot-level bootstrap
interval, and the same for a null that pairs each generated tile with the real tile of another
spot (a fixed random derangement): tiles that ignore their spot's layout score within the null.
`follows_layout` is true when the regime's interval lies above the null's.

    stmdit layout-probe --model-dir M --split S --latents L.zarr --uni U.zarr --out probe.json

asks the trained model directly, without sampling: from a latent noised to `--noise-level` (0.98:
almost pure noise), what does the model's clean-latent estimate take from the spot's UNI? The UNI
part of the estimate is the decoded estimate with the spot's UNI minus the one with the null UNI.
Its layout is scored against the spot's decoded real latent as above; its brightness (tile mean)
and contrast (standard deviation of the layout) by their correlation over spots. A model whose UNI path carries only palette scores r ~ 0 on layout and
well above 0 on brightness, on its own training spots as well as on test spots.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from stmdit.cli import cli_params, parse_named_paths
from stmdit.errors import InputError
from stmdit.eval_json import write_eval_json
from stmdit.image_stores import Decoder, ImageStore, open_image_store
from stmdit.probe_inputs import add_probe_inputs, open_latent_store
from stmdit.provenance import atomic_path, provenance
from stmdit.zarr_rows import read_array_rows

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


def chunked_summaries(store: ImageStore, rows: Sequence[int], summarise: Callable[[np.ndarray], np.ndarray],
                      width: int) -> np.ndarray:
    """`summarise` of the store's `rows` (tiles (N, H, W, 3) -> (N, width)), read CHUNK_TILES tiles at a time."""
    parts = [summarise(store.read_rows(list(rows[start:start + CHUNK_TILES])))
             for start in range(0, len(rows), CHUNK_TILES)]
    return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)


def chunked_layouts(store: ImageStore, rows: Sequence[int], cells: int) -> np.ndarray:
    """Coarse layouts of the store's `rows`, read CHUNK_TILES tiles at a time."""
    return chunked_summaries(store, rows, lambda tiles: coarse_layout(tiles, cells), cells * cells)


class RealSummaries:
    """Per-tile summaries of real tiles by spot key, read from the patches stores once."""

    def __init__(self, patches: Sequence[Path], summarise: Callable[[np.ndarray], np.ndarray], width: int):
        self.stores = [open_image_store(path) for path in patches]
        self.summarise = summarise
        self.width = width
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, keys: Sequence[str], source: Path) -> np.ndarray:
        wanted = [k for k in dict.fromkeys(keys) if k not in self.cache]
        for store in self.stores:
            mine = [k for k in wanted if k in store.index]
            rows = [store.index[k] for k in mine]
            self.cache.update(zip(mine, chunked_summaries(store, rows, self.summarise, self.width)))
        missing = [k for k in keys if k not in self.cache]
        if missing:
            raise InputError(source, f"{len(missing)} spot(s) are in no --patches store, e.g. {missing[0]}")
        return np.stack([self.cache[k] for k in keys])


def layout_report(patches: Sequence[Path], tile_stores: Mapping[str, Path], cells: int, n_boot: int, seed: int,
                  decoder: Decoder | None = None) -> dict:
    real_layouts = RealSummaries(patches, lambda tiles: coarse_layout(tiles, cells), cells * cells)
    regimes = {}
    for regime, path in tile_stores.items():
        tiles = open_image_store(path, min_spots=2, decoder=decoder)  # the other-spot null needs two
        keys = tiles.keys
        try:
            generated = chunked_layouts(tiles, range(len(keys)), cells)
        except ValueError as exc:
            raise InputError(path, str(exc)) from None
        regimes[regime] = entry = regime_layout(real_layouts(keys, path), generated, n_boot, seed)
        log.info("%s: layout agreement %.3f [%.3f, %.3f], null %.3f [%.3f, %.3f] over %d spots", regime,
                 entry["mean"], entry["lo"], entry["hi"], entry["null"]["mean"], entry["null"]["lo"],
                 entry["null"]["hi"], entry["n"])
    return regimes


def run_layout(args: argparse.Namespace) -> Path:
    tile_stores = parse_named_paths(args.tiles, "--tiles")
    from stmdit.tile_decoder import StoreDecoder

    regimes = layout_report(args.patches, tile_stores, args.cells, args.n_boot, args.seed, StoreDecoder.from_args(args))
    result = {
        "metric": "layout", "model": args.model, "cohort": args.cohort, "cells": args.cells,
        "measure": "per-spot Pearson r of the block-mean grey layouts (tile mean removed) of generated vs real tile",
        "interval": f"95% spot bootstrap ({args.n_boot} replicates)",
        "regimes": regimes,
        "provenance": provenance("layout", cli_params(args), inputs=[*args.patches, *tile_stores.values()]),
    }
    write_eval_json(args.out, result)
    return Path(args.out)


# ---------------------------------------------------------------------------------------------
# stmdit layout-probe


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two per-spot values (0 when either is constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0


def brightness_r(real: np.ndarray, estimate: np.ndarray) -> float:
    """Pearson r over spots of the mean grey level of two (N, H, W, 3) image sets."""
    return pearson(real.astype(np.float64).mean(axis=(1, 2, 3)), estimate.astype(np.float64).mean(axis=(1, 2, 3)))


def uni_estimates(model, objective, latents, uni, noise, noise_level: float):
    """Clean-latent estimates from the noised `latents` with each spot's UNI and with the null UNI
    (GE dropped in both)."""
    import torch

    device = latents.device
    u = torch.full((len(latents),), noise_level, dtype=torch.float32, device=device)
    noised = objective.prepare(latents.float(), noise, u)
    keep = torch.zeros(len(latents), dtype=torch.bool, device=device)
    drop = torch.ones(len(latents), dtype=torch.bool, device=device)
    estimates = []
    for drop_uni in (keep, drop):
        prediction = model(noised.x_t, noised.timestep, uni, None, drop_uni=drop_uni, drop_ge=drop).float()
        estimates.append(objective.x0_from_prediction(noised.x_t, noised.timestep, prediction))
    return estimates[0], estimates[1]


def probe_split(model, objective, latents: np.ndarray, uni: np.ndarray, noise, decode,
                noise_level: float, batch_size: int, cells: int, n_boot: int, seed: int) -> dict:
    """The probe's entries for one set of spots: `noise` (N, C, H, W) is their fixed noise and
    `decode` maps latents to (N, H, W, 3) uint8 tiles."""
    import torch

    with torch.inference_mode():
        return _probe_split(model, objective, latents, uni, noise, decode, noise_level, batch_size, cells, n_boot,
                            seed)


def _probe_split(model, objective, latents, uni, noise, decode, noise_level, batch_size, cells, n_boot, seed):
    import torch

    device = next(model.parameters(), torch.empty(0)).device
    real_layout, with_uni, without_uni, grey = [], [], [], {"real": [], "uni": [], "null": []}
    for start in range(0, len(latents), batch_size):
        rows = slice(start, start + batch_size)
        x0 = torch.from_numpy(latents[rows].astype(np.float32)).to(device)
        uni_rows = torch.from_numpy(uni[rows].astype(np.float32)).to(device)
        estimate, null_estimate = uni_estimates(model, objective, x0, uni_rows, noise[rows].to(device), noise_level)
        images = {"real": decode(x0), "uni": decode(estimate), "null": decode(null_estimate)}
        real_layout.append(coarse_layout(images["real"], cells))
        with_uni.append(coarse_layout(images["uni"], cells))
        without_uni.append(coarse_layout(images["null"], cells))
        for name, image in images.items():
            grey[name].append(image)
    real_layout, with_uni, without_uni = map(np.concatenate, (real_layout, with_uni, without_uni))
    images = {name: np.concatenate(parts) for name, parts in grey.items()}
    uni_part = regime_layout(real_layout, with_uni - without_uni, n_boot, seed)
    return {
        "n": int(len(latents)),
        "uni_part_layout": uni_part,
        "estimate_layout": regime_layout(real_layout, with_uni, n_boot, seed),
        "null_uni_estimate_layout": regime_layout(real_layout, without_uni, n_boot, seed),
        "brightness_r": {"with_uni": brightness_r(images["real"], images["uni"]),
                         "null_uni": brightness_r(images["real"], images["null"])},
        "contrast_r": {"with_uni": pearson(real_layout.std(axis=1), with_uni.std(axis=1)),
                       "null_uni": pearson(real_layout.std(axis=1), without_uni.std(axis=1))},
    }


def run_layout_probe(args: argparse.Namespace) -> Path:
    from stmdit.loader import store_rows
    from stmdit.split_table import split_keys
    from stmdit.metrics import subsample_keys
    from stmdit.model import get_objective
    from stmdit.sampling import CodecSettings, SamplingSession, SessionSettings
    from stmdit.train_utils import keyed_generator
    import torch

    if not 0.0 < args.noise_level < 1.0:
        raise InputError(None, f"--noise-level must lie in (0, 1), got {args.noise_level}")
    # the model and its decoder only: the probe does not run the sampler
    session = SamplingSession(SessionSettings(model_dir=args.model_dir, device=args.device, sampler=None,
                                              codec=CodecSettings.from_args(args)))
    trained, device = session.trained, session.device
    objective = get_objective(trained.objective)
    codec = session.open_codec()
    latent_group = open_latent_store(args.latents, trained.config)
    shape = tuple(latent_group["latent"].shape[1:])

    def decode(latents) -> np.ndarray:
        return codec.decode(latents.to(device))

    splits = {}
    for split_name in args.splits:
        keys = subsample_keys(split_keys(args.split, split_name), args.max_spots, args.seed)
        if len(keys) < 2:
            raise InputError(args.split, f"split {split_name!r} has {len(keys)} spot(s); the probe needs at least 2")
        latents = read_array_rows(latent_group["latent"], store_rows(latent_group, keys, args.latents))
        uni = session.store_conditions(keys, args.uni, None).uni
        noise = torch.stack([torch.randn(shape, generator=keyed_generator(args.seed, "layout-probe", k)) for k in keys])
        splits[split_name] = entry = probe_split(trained.model, objective, latents, uni, noise, decode,
                                                 args.noise_level, args.batch_size, args.cells, args.n_boot, args.seed)
        part = entry["uni_part_layout"]
        log.info("%s (%d spots): layout r of the UNI part %.3f [%.3f, %.3f] (null %.3f [%.3f, %.3f]); brightness "
                 "r with UNI %.3f, null UNI %.3f; contrast r with UNI %.3f, null UNI %.3f", split_name, entry["n"],
                 part["mean"], part["lo"], part["hi"], part["null"]["mean"], part["null"]["lo"], part["null"]["hi"],
                 entry["brightness_r"]["with_uni"], entry["brightness_r"]["null_uni"],
                 entry["contrast_r"]["with_uni"], entry["contrast_r"]["null_uni"])
    result = {
        "model": str(args.model_dir), "objective": trained.objective, "noise_level": args.noise_level,
        "cells": args.cells, "vae": args.vae_impl,
        "measure": "clean-latent estimate of the model from a latent noised to noise_level, with the spot's UNI "
                   "and with the null UNI (GE dropped); layouts as in `stmdit layout`, against the decoded "
                   "real latent",
        "interval": f"95% spot bootstrap ({args.n_boot} replicates)",
        "splits": splits,
        "provenance": provenance("layout-probe", cli_params(args),
                                 inputs=[trained.path, args.split, args.latents, args.uni]),
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return Path(args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    from stmdit.tile_decoder import TILES_DECODER_HELP, add_vae_options

    probe = subparsers.add_parser("layout-probe", help="what a trained model's clean-latent estimate takes from UNI: "
                                                        "layout and brightness, on train and test spots")
    add_probe_inputs(probe)
    probe.add_argument("--splits", nargs="+", default=["train", "test"], help="split names to probe")
    add_vae_options(probe)
    probe.add_argument("--noise-level", type=float, default=0.98, help="fraction of the way to pure noise (0, 1)")
    probe.add_argument("--max-spots", type=int, default=200, help="seeded subsample of each split")
    probe.add_argument("--cells", type=int, default=DEFAULT_CELLS)
    probe.add_argument("--n-boot", type=int, default=200)
    probe.add_argument("--seed", type=int, default=42, help="spot subsample, noise and bootstrap")
    probe.add_argument("--batch-size", type=int, default=32)
    probe.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    probe.add_argument("--out", type=Path, required=True)
    probe.set_defaults(func=run_layout_probe)

    p = subparsers.add_parser("layout", help="coarse layout agreement of generated tiles with their real spots")
    p.add_argument("--patches", type=Path, nargs="+", required=True, help="patches stores of the cohort")
    p.add_argument("--tiles", nargs="+", required=True, help="regime=tile store")
    p.add_argument("--cells", type=int, default=DEFAULT_CELLS, help="blocks per side (default 8: 32 px at 256 px)")
    add_vae_options(p, help_impl=TILES_DECODER_HELP)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where tile stores kept as latents are decoded")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="")
    p.add_argument("--cohort", default="")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_layout)
