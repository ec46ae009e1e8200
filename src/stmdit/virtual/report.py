"""What a virtual tissue experiment shows: the change per spot, its summary against the control,
virtual-slide mosaics and the dose-response montage.

    stmdit virtual-report --tiles results/virtual/E/tiles.zarr --spots a.parquet ... --patches a.zarr ...
        --h0mini-impl smoke|real [--h0mini-weights P] --n-boot 200 --seed 0 --tile-px 32
        --summary summary.json --mosaics mosaics/ --montage montage.png

The change of a spot in an arm is the Euclidean distance between the H0-mini embeddings (the
configured encoder: smoke in the demo) of its unedited and its arm's tile. Both come from the same
noise and UNI, so the change is the edit's alone; the control arm (an edit the model cannot have
learned: see `edits.control_edit`) measures what an edit of that size does without a claim to the
effect. The summary gives per tissue label the mean change of the edit and of the control with
percentile bootstrap intervals, and the paired difference (edit - control, the same resampled spots
for both): `effect` is true when its interval lies above 0.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from stmdit.cli import cli_params
from stmdit.errors import InputError
from stmdit.image_stores import Decoder, ImageStore, open_image_store
from stmdit.metrics import percentile_interval
from stmdit.provenance import atomic_path, provenance, write_json
from stmdit.virtual.experiment import CONTROL, UNEDITED, read_spot_tables
from stmdit.zarr_rows import string_values

log = logging.getLogger(__name__)

ALPHA = 0.05
TOP_SPOTS = 10
BACKGROUND = 235


def paired_bootstrap(edit: np.ndarray, control: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Mean change of the edit and of the control, and of their paired difference, with
    (1 - ALPHA) percentile intervals over `n_boot` resamples of the spots (the same for all three)."""
    edit, control = np.asarray(edit, np.float64), np.asarray(control, np.float64)
    n = len(edit)
    out = {"n": int(n), "edit_mean": float(edit.mean()), "control_mean": float(control.mean()),
           "difference_mean": float((edit - control).mean())}
    if n_boot < 1 or n < 2:
        out.update(edit_ci=None, control_ci=None, difference_ci=None, effect=None)
        return out
    rows = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    for name, values in (("edit", edit), ("control", control), ("difference", edit - control)):
        out[f"{name}_ci"] = list(percentile_interval(values[rows].mean(axis=1), ALPHA))
    out["effect"] = bool(out["difference_ci"][0] > 0)
    return out


def read_tiles(path: str | Path, decoder: Decoder | None = None) -> tuple[ImageStore, pd.DataFrame]:
    store = open_image_store(path, decoder=decoder)
    group = store.group
    needed = ("spot_key", "arm", "ref_key", "dose", "label", "sample", "pxl_row", "pxl_col")
    missing = [name for name in needed if name not in group]
    if missing or "virtual" not in group.attrs:
        raise InputError(path, f"not a virtual experiment store (missing {missing or 'attrs virtual'})")
    rows = pd.DataFrame({
        "arm": string_values(group["arm"][:]), "key": string_values(group["ref_key"][:]),
        "dose": np.asarray(group["dose"][:], np.float64), "label": string_values(group["label"][:]),
        "sample": string_values(group["sample"][:]), "pxl_row": group["pxl_row"][:], "pxl_col": group["pxl_col"][:],
    })
    return store, rows


def embed_tiles(store: ImageStore, encoder, batch_size: int = 64) -> np.ndarray:
    parts = [encoder.encode(images)["embedding"] for images in store.iter_batches(batch_size)]
    return np.concatenate(parts).astype(np.float64)


def changes_by_arm(rows: pd.DataFrame, embeddings: np.ndarray) -> pd.DataFrame:
    """spots x arms table of the change (H0-mini distance to the spot's unedited tile)."""
    base = rows.index[rows["arm"] == UNEDITED]
    base_of = pd.Series(base, index=rows.loc[base, "key"].to_numpy())
    table = {}
    for arm, part in rows[rows["arm"] != UNEDITED].groupby("arm", sort=False):
        ref = base_of.reindex(part["key"]).to_numpy()
        table[arm] = pd.Series(np.linalg.norm(embeddings[part.index] - embeddings[ref], axis=1),
                               index=part["key"].to_numpy())
    return pd.DataFrame(table)


def summarise(rows: pd.DataFrame, changes: pd.DataFrame, arms: Sequence[dict], n_boot: int, seed: int
              ) -> dict[str, Any]:
    """The summary JSON's numbers (module docstring)."""
    main = [a["arm"] for a in arms if a["arm"] not in (UNEDITED, CONTROL)][-1]
    spots = rows[rows["arm"] == UNEDITED].set_index("key")
    labels = spots["label"].reindex(changes.index)
    per_label = {}
    for label in sorted(labels.unique()):
        mask = (labels == label).to_numpy()
        per_label[label] = paired_bootstrap(changes[main].to_numpy()[mask], changes[CONTROL].to_numpy()[mask],
                                            n_boot, seed)
    order = np.argsort(-changes[main].to_numpy(), kind="stable")[:TOP_SPOTS]
    top = [{"key": str(changes.index[i]), "label": str(labels.iloc[i]), "sample": str(spots.loc[changes.index[i], "sample"]),
            "change": float(changes[main].iloc[i]), "control_change": float(changes[CONTROL].iloc[i])} for i in order]
    doses = []
    for arm in arms:
        if arm["arm"] in (UNEDITED, CONTROL) or arm["dose"] is None:
            continue
        values = changes[arm["arm"]].to_numpy()
        ci = (list(percentile_interval(values[np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))]
                                       .mean(axis=1), ALPHA)) if n_boot and len(values) > 1 else None)
        doses.append({"arm": arm["arm"], "dose": arm["dose"], "edit": arm["edit"], "mean_change": float(values.mean()),
                      "ci": ci})
    return {
        "edited_arm": main,
        "all_spots": paired_bootstrap(changes[main].to_numpy(), changes[CONTROL].to_numpy(), n_boot, seed),
        "per_label": per_label,
        "top_spots": top,
        "dose_response": doses,
    }


# ---------------------------------------------------------------------------------------------
# Pictures


def spot_spacing(pxl: np.ndarray) -> float:
    """Median distance to the nearest other spot, in full-resolution pixels (1 when alone)."""
    if len(pxl) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(pxl).query(pxl, k=2)
    return float(np.median(distances[:, 1])) or 1.0


def place_tiles(canvas: np.ndarray, tiles: np.ndarray, positions: np.ndarray, tile_px: int) -> None:
    import cv2

    for tile, (y, x) in zip(tiles, positions):
        small = cv2.resize(np.asarray(tile), (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        canvas[y:y + tile_px, x:x + tile_px] = small


def colour_map(values: np.ndarray, vmax: float) -> np.ndarray:
    """(n, 3) uint8 RGB of values in [0, vmax] on OpenCV's viridis."""
    import cv2

    scaled = np.clip(np.asarray(values, np.float64) / (vmax or 1.0), 0, 1)
    grey = np.round(scaled * 255).astype(np.uint8).reshape(-1, 1)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB).reshape(-1, 3)


def slide_mosaic(context: pd.DataFrame, real_tiles: np.ndarray, rows: pd.DataFrame, tiles: dict[str, np.ndarray],
                 change: np.ndarray, vmax: float, tile_px: int, title: str) -> np.ndarray:
    """Panels side by side: the real tiles of the slide's kept spots around the selection, the
    unedited and the edited generation of the selected spots, and the change map."""
    import cv2

    spacing = spot_spacing(context[["pxl_row", "pxl_col"]].to_numpy(np.float64))
    scale = tile_px / spacing
    sel = rows[["pxl_row", "pxl_col"]].to_numpy(np.float64)
    lo = sel.min(axis=0) - spacing
    hi = sel.max(axis=0) + spacing
    inside = ((context["pxl_row"] >= lo[0]) & (context["pxl_row"] <= hi[0]) & (context["pxl_col"] >= lo[1])
              & (context["pxl_col"] <= hi[1])).to_numpy()
    height, width = (np.ceil((hi - lo) * scale).astype(int) + tile_px)

    def positions(pxl: np.ndarray) -> np.ndarray:
        return np.round((pxl - lo) * scale).astype(int)

    header, gap = 28, 8
    panels = []
    real = np.full((height, width, 3), BACKGROUND, np.uint8)
    place_tiles(real, real_tiles[inside], positions(context[["pxl_row", "pxl_col"]].to_numpy(np.float64)[inside]),
                tile_px)
    panels.append(("real", real))
    for name, images in tiles.items():
        canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
        place_tiles(canvas, images, positions(sel), tile_px)
        panels.append((name, canvas))
    change_panel = np.full((height, width, 3), BACKGROUND, np.uint8)
    colours = colour_map(change, vmax)
    for (y, x), colour in zip(positions(sel), colours):
        change_panel[y:y + tile_px, x:x + tile_px] = colour
    panels.append((f"change (0..{vmax:.3g})", change_panel))
    out = np.full((height + header, len(panels) * (width + gap), 3), 255, np.uint8)
    for i, (name, panel) in enumerate(panels):
        x0 = i * (width + gap)
        out[header:, x0:x0 + width] = panel
        cv2.putText(out, name, (x0 + 2, header - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    banner = np.full((22, out.shape[1], 3), 255, np.uint8)
    cv2.putText(banner, title, (2, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([banner, out])


def choose_montage_spots(labels: pd.Series, per_class: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    keys = []
    for label in sorted(labels.unique()):
        candidates = labels.index[labels.to_numpy() == label].to_numpy()
        chosen = np.sort(rng.choice(len(candidates), size=min(per_class, len(candidates)), replace=False))
        keys.extend(str(candidates[i]) for i in chosen)
    return keys


def montage(keys: Sequence[str], labels: pd.Series, real: np.ndarray, columns: Sequence[tuple[str, np.ndarray]],
            changes: pd.DataFrame, tile_px: int) -> np.ndarray:
    """One row per spot: real | unedited | every edited arm (weakest first) | control, the change
    under each generated tile."""
    import cv2

    label_w, header, gap, footer = 150, 24, 4, 16
    names = ["real", *[name for name, _ in columns]]
    height = header + len(keys) * (tile_px + footer + gap)
    width = label_w + len(names) * (tile_px + gap)
    canvas = np.full((height, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for c, name in enumerate(names):
        cv2.putText(canvas, name, (label_w + c * (tile_px + gap), header - 8), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for r, key in enumerate(keys):
        y = header + r * (tile_px + footer + gap)
        cv2.putText(canvas, str(labels[key]), (2, y + tile_px // 2), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(canvas, key.split(":")[-1][:18], (2, y + tile_px // 2 + 14), font, 0.3, (80, 80, 80), 1,
                    cv2.LINE_AA)
        row_tiles = [real[r], *[images[r] for _, images in columns]]
        for c, tile in enumerate(row_tiles):
            x = label_w + c * (tile_px + gap)
            canvas[y:y + tile_px, x:x + tile_px] = cv2.resize(np.asarray(tile), (tile_px, tile_px),
                                                              interpolation=cv2.INTER_AREA)
            arm = names[c]
            if arm in changes.columns:
                cv2.putText(canvas, f"{changes.loc[key, arm]:.3g}", (x, y + tile_px + 12), font, 0.35, (0, 0, 0), 1,
                            cv2.LINE_AA)
    return canvas


def write_multiscale(group, name: str, rgb: np.ndarray, min_side: int = 256) -> None:
    """`rgb` (H, W, 3) as an OME-Zarr 0.5 multiscale image (axes c, y, x; levels halving down to
    `min_side` px) in subgroup `name` of the Zarr v3 `group`: napari (with napari-ome-zarr) and
    browser viewers such as vizarr open it."""
    import cv2

    image = group.create_group(name)
    levels, level = [], np.ascontiguousarray(rgb)
    while True:
        levels.append(level)
        if min(level.shape[:2]) // 2 < min_side:
            break
        level = cv2.resize(level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA)
    datasets = []
    for i, data in enumerate(levels):
        planes = np.moveaxis(data, -1, 0)
        image.create_array(str(i), data=planes, chunks=(3, min(512, planes.shape[1]), min(512, planes.shape[2])))
        factor = float(2 ** i)
        datasets.append({"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1.0, factor, factor]}]})
    image.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "name": name,
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": datasets,
    }], "omero": {"channels": [{"label": c, "color": colour, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                               for c, colour in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))],
                  "rdefs": {"model": "color"}}}


# ---------------------------------------------------------------------------------------------
# stmdit virtual-report


def real_tiles_of(patches: Sequence[Path], keys: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    wanted = set(keys)
    for path in patches:
        store = open_image_store(path)
        present = [k for k in store.keys if k in wanted]
        if present:
            images = store.read_rows([store.index[k] for k in present])
            out.update(zip(present, images))
    missing = wanted - set(out)
    if missing:
        raise InputError(None, f"{len(missing)} spot(s) have no real tile in the patches stores, e.g. {sorted(missing)[0]}")
    return out


def run_virtual_report(args: argparse.Namespace) -> None:
    from stmdit.encoders import load_encoder
    from stmdit.tile_grid import write_png

    from stmdit.tile_decoder import StoreDecoder

    store, rows = read_tiles(args.tiles, StoreDecoder.from_args(args))
    attrs = dict(store.group.attrs)
    virtual = attrs["virtual"]
    arms = virtual["arms"]
    from stmdit.features import parse_arch

    encoder = load_encoder("h0mini", args.h0mini_impl, weights=args.h0mini_weights, allow_hub=args.allow_hub,
                           arch=parse_arch(args.h0mini_arch_json), device=args.device)
    embeddings = embed_tiles(store, encoder)
    changes = changes_by_arm(rows, embeddings)
    numbers = summarise(rows, changes, arms, args.n_boot, args.seed)
    main = numbers["edited_arm"]

    spots = read_spot_tables(args.spots)
    base = rows[rows["arm"] == UNEDITED]
    labels = base.set_index("key")["label"]
    arm_rows = {arm: rows.index[rows["arm"] == arm].to_numpy() for arm in rows["arm"].unique()}
    vmax = float(max(changes.to_numpy().max(), 1e-12))

    import zarr

    with atomic_path(args.mosaics) as tmp, atomic_path(args.mosaics_zarr) as zarr_tmp:
        tmp.mkdir(parents=True)
        viewer = zarr.open_group(str(zarr_tmp), mode="w", zarr_format=3)
        viewer.attrs["stmdit"] = {"experiment": virtual["experiment"], "panels": "real | unedited | edited | change",
                                  "format": "one OME-Zarr 0.5 multiscale image per slide"}
        for sample, part in base.groupby("sample", sort=True):
            context = spots[spots["sample"] == sample]
            real = real_tiles_of(args.patches, context["key"].tolist())
            real_stack = np.stack([real[k] for k in context["key"]])
            positions = part.index.to_numpy()
            order = {k: i for i, k in enumerate(base["key"])}
            idx = [order[k] for k in part["key"]]
            tiles = {"unedited": store.read_rows(arm_rows[UNEDITED][idx]), main: store.read_rows(arm_rows[main][idx])}
            change = changes[main].reindex(part["key"]).to_numpy()
            title = (f"{virtual['experiment']}: {sample}, {len(part)} spots, edit {arms[-2]['edit']} "
                     f"(mean change {change.mean():.3g}; control {changes[CONTROL].reindex(part['key']).mean():.3g})")
            picture = slide_mosaic(context, real_stack, part.loc[positions], tiles, change, vmax, args.tile_px, title)
            write_png(tmp / f"{sample}.png", picture)
            large = slide_mosaic(context, real_stack, part.loc[positions], tiles, change, vmax, args.zarr_tile_px, title)
            write_multiscale(viewer, sample, large)
    keys = choose_montage_spots(labels, args.per_class, args.seed)
    order = {k: i for i, k in enumerate(base["key"])}
    idx = [order[k] for k in keys]
    real = real_tiles_of(args.patches, keys)
    columns = [(a["arm"], store.read_rows(arm_rows[a["arm"]][idx])) for a in arms]
    write_png(args.montage, montage(keys, labels, np.stack([real[k] for k in keys]), columns, changes,
                                    args.montage_tile_px))

    summary = {
        "experiment": virtual["experiment"],
        "model": attrs.get("model", {}).get("folder"),
        "regime": attrs.get("sampler", {}).get("regime"),
        "arms": arms,
        "control": virtual["control"],
        "n_spots": int(len(base)),
        "change": "Euclidean distance of the H0-mini embeddings of a spot's unedited and edited tiles (same noise, "
                  "same UNI)",
        "h0mini": encoder.describe() if hasattr(encoder, "describe") else args.h0mini_impl,
        "interval": f"{100 * (1 - ALPHA):g}% percentile bootstrap over spots, {args.n_boot} resamples, seed {args.seed}",
        "effect": "per label: the interval of the paired difference (edit - control) lies above 0",
        **numbers,
        "per_spot": {key: {arm: float(changes.loc[key, arm]) for arm in changes.columns} for key in changes.index},
        "stmdit": provenance("virtual-report", cli_params(args),
                             [args.tiles, *args.spots, *args.patches]),
        "sampling": attrs.get("stmdit"),
    }
    write_json(args.summary, summary)
    overall = numbers["all_spots"]
    log.info("%s: mean change %.4g (control %.4g), difference interval %s -> %s", virtual["experiment"],
             overall["edit_mean"], overall["control_mean"], overall["difference_ci"], args.summary)


def register(subparsers: argparse._SubParsersAction) -> None:
    from stmdit.tile_decoder import TILES_DECODER_HELP, add_vae_options

    p = subparsers.add_parser("virtual-report", help="summary, mosaics and montage of a virtual tissue experiment")
    p.add_argument("--tiles", type=Path, required=True, help="the experiment's tiles store (stmdit virtual-tiles)")
    p.add_argument("--spots", type=Path, nargs="+", required=True, help="spots tables of the cohort")
    p.add_argument("--patches", type=Path, nargs="+", required=True, help="patches stores of the cohort")
    p.add_argument("--h0mini-impl", choices=("smoke", "real"), default="smoke")
    p.add_argument("--h0mini-weights", help="H0-mini weights: local path, or hub id with --allow-hub")
    p.add_argument("--h0mini-arch-json", help="JSON object of h0mini architecture overrides")
    p.add_argument("--allow-hub", action="store_true")
    add_vae_options(p, help_impl=TILES_DECODER_HELP, allow_hub=False)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-px", type=int, default=32, help="mosaic: px per spot")
    p.add_argument("--montage-tile-px", type=int, default=96)
    p.add_argument("--zarr-tile-px", type=int, default=128, help="multiscale mosaic: px per spot at full resolution")
    p.add_argument("--per-class", type=int, default=2, help="montage: spots per tissue label")
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--mosaics", type=Path, required=True, help="folder of one PNG per slide")
    p.add_argument("--mosaics-zarr", type=Path, required=True,
                   help="Zarr of the mosaics as OME-Zarr multiscale images, one group per slide (napari)")
    p.add_argument("--montage", type=Path, required=True)
    p.set_defaults(func=run_virtual_report)
