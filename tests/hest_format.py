"""HEST-1k-format samples written from real Space Ranger folders, for the tests (no HEST download here).

A sample is HEST's layout (mahmoodlab/HEST: `st/{id}.h5ad`, `wsis/{id}.tif`, `metadata/{id}.json`):
the Space Ranger lowres image becomes the WSI, a tiled pyramidal TIFF (tifffile + imagecodecs, LZW
like HEST's own writer, resolution tags in pixels per cm); spot centres are Space Ranger's
full-resolution positions times `tissue_lowres_scalef` (px of that image); um/px of that image is
10x's theoretical 65 um spot over the spot's lowres diameter (`spot_diameter_fullres` x
`tissue_lowres_scalef`), 10x's definition of spot_diameter_fullres.
The metadata carry HEST's field names. Written with scanpy/pandas/tifffile only, not with stmdit,
so the converter the tests check is not the one that made its input.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import cv2
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def space_ranger_spots(outs: Path) -> tuple[ad.AnnData, pd.DataFrame, dict]:
    """(counts, positions of the matrix barcodes, scale factors) of a Space Ranger folder."""
    counts = sc.read_10x_h5(outs / "filtered_feature_bc_matrix.h5")
    spatial = outs / "spatial"
    if (spatial / "tissue_positions.csv").exists():
        positions = pd.read_csv(spatial / "tissue_positions.csv", dtype={"barcode": str})
    else:
        positions = pd.read_csv(spatial / "tissue_positions_list.csv", header=None, names=POSITION_COLUMNS,
                                dtype={"barcode": str})
    positions = positions.set_index("barcode").loc[counts.obs_names]
    factors = json.loads((spatial / "scalefactors_json.json").read_text())
    return counts, positions, factors


def write_pyramid(path: Path, rgb: np.ndarray, um_per_px: float, tile: int = 128) -> None:
    """A tiled pyramidal TIFF (level 0 and halvings down to one tile), LZW, resolution in px per cm."""
    import tifffile

    per_cm = 1e4 / um_per_px
    level, downsample = rgb, 1
    with tifffile.TiffWriter(path) as writer:
        while True:
            writer.write(level, tile=(tile, tile), photometric="rgb", compression="lzw",
                         subfiletype=0 if downsample == 1 else 1,
                         resolution=(per_cm / downsample, per_cm / downsample), resolutionunit="CENTIMETER")
            if max(level.shape[:2]) <= tile:
                break
            downsample *= 2
            level = cv2.resize(rgb, (max(1, rgb.shape[1] // downsample), max(1, rgb.shape[0] // downsample)),
                               interpolation=cv2.INTER_AREA)


def hest_metadata(sample_id: str, um_per_px: float, image_shape, n_spots: int, technology: str = "Visium",
                  **fields) -> dict:
    meta = {
        "dataset_title": f"Space Ranger folder written as HEST ({sample_id})",
        "id": sample_id, "organ": "Muscle", "species": "Mus musculus", "st_technology": technology,
        "pixel_size_um_estimated": um_per_px, "pixel_size_um_embedded": um_per_px,
        "spot_diameter": 55.0, "inter_spot_dist": 100.0, "spots_under_tissue": n_spots,
        "fullres_px_width": int(image_shape[1]), "fullres_px_height": int(image_shape[0]),
    }
    meta.update(fields)
    return meta


def write_hest_sample(outs: Path, root: Path, sample_id: str, *, counts_scale: float = 1.0, shift_px: float = 0.0,
                      lattice: bool = True, image: bool = True, **metadata) -> dict:
    """Write a Space Ranger folder as HEST sample `sample_id` under `root`; returns what a reader
    should find (barcodes, centres, um/px, lowres scale). `counts_scale`, `shift_px`, `lattice` and
    `metadata` overrides make bad or partial samples."""
    counts, positions, factors = space_ranger_spots(outs)
    scale = factors["tissue_lowres_scalef"]
    rgb = cv2.cvtColor(cv2.imread(str(outs / "spatial" / "tissue_lowres_image.png")), cv2.COLOR_BGR2RGB)
    um_per_px = 65.0 / (factors["spot_diameter_fullres"] * scale)
    for folder in ("st", "wsis", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    x = positions["pxl_col_in_fullres"].to_numpy(dtype=np.float64) * scale + shift_px
    y = positions["pxl_row_in_fullres"].to_numpy(dtype=np.float64) * scale
    obs = pd.DataFrame({"in_tissue": positions["in_tissue"].to_numpy()}, index=counts.obs_names.copy())
    if lattice:
        obs["array_row"] = positions["array_row"].to_numpy()
        obs["array_col"] = positions["array_col"].to_numpy()
    obs["pxl_col_in_fullres"], obs["pxl_row_in_fullres"] = x, y
    matrix = sp.csr_matrix(counts.X, dtype=np.float32) * np.float32(counts_scale)
    st = ad.AnnData(X=sp.csr_matrix(matrix), obs=obs, var=counts.var[["gene_ids"]].copy())
    st.var_names_make_unique()
    st.obsm["spatial"] = np.column_stack([x, y])
    st.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    if image:
        write_pyramid(root / "wsis" / f"{sample_id}.tif", rgb, um_per_px)
    meta = hest_metadata(sample_id, um_per_px, rgb.shape, st.n_obs)
    meta.update(metadata)
    meta = {k: v for k, v in meta.items() if v is not None}
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))
    return {"barcodes": list(counts.obs_names), "x": x, "y": y, "um_per_px": um_per_px, "scale": scale,
            "counts": counts}


def write_pseudo_spot_sample(outs: Path, root: Path, sample_id: str, technology: str = "Xenium",
                             side_um: float = 100.0) -> dict:
    """A Xenium/Visium HD-like sample: the Visium spots' counts pooled into square pseudo-spots of
    `side_um` on a square grid (HEST's pooling: bin index = floor((x - x_min) / side), centre = bin
    middle, barcodes "RRRxCCC", empty bins dropped), on the same lowres WSI."""
    counts, positions, factors = space_ranger_spots(outs)
    scale = factors["tissue_lowres_scalef"]
    rgb = cv2.cvtColor(cv2.imread(str(outs / "spatial" / "tissue_lowres_image.png")), cv2.COLOR_BGR2RGB)
    um_per_px = 65.0 / (factors["spot_diameter_fullres"] * scale)
    side_px = side_um / um_per_px
    x = positions["pxl_col_in_fullres"].to_numpy() * scale
    y = positions["pxl_row_in_fullres"].to_numpy() * scale
    col = np.floor((x - x.min()) / side_px).astype(int)
    row = np.floor((y - y.min()) / side_px).astype(int)
    n_cols = int(col.max()) + 1
    bins = row * n_cols + col
    present = np.unique(bins)
    members = sp.csr_matrix((np.ones(len(bins)), (np.searchsorted(present, bins), np.arange(len(bins)))),
                            shape=(len(present), len(bins)))
    pooled = sp.csr_matrix(members @ sp.csr_matrix(counts.X, dtype=np.float64), dtype=np.float32)
    bin_row, bin_col = present // n_cols, present % n_cols
    centre_x = x.min() + (bin_col + 0.5) * side_px
    centre_y = y.min() + (bin_row + 0.5) * side_px
    obs = pd.DataFrame({"in_tissue": True, "array_row": bin_row, "array_col": bin_col,
                        "pxl_col_in_fullres": centre_x, "pxl_row_in_fullres": centre_y},
                       index=[f"{r:03d}x{c:03d}" for r, c in zip(bin_row, bin_col)])
    st = ad.AnnData(X=pooled, obs=obs, var=counts.var[["gene_ids"]].copy())
    st.var_names_make_unique()
    st.obsm["spatial"] = np.column_stack([centre_x, centre_y])
    for folder in ("st", "wsis", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    st.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    write_pyramid(root / "wsis" / f"{sample_id}.tif", rgb, um_per_px)
    # what HEST's table says for these technologies: the source bin (Visium HD) or nothing (Xenium)
    geometry = {"spot_diameter": 2.0, "inter_spot_dist": 2.0} if technology == "Visium HD" else \
        {"spot_diameter": None, "inter_spot_dist": None}
    meta = {k: v for k, v in hest_metadata(sample_id, um_per_px, rgb.shape, st.n_obs, technology,
                                           **geometry).items() if v is not None}
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))
    return {"side_px": side_px, "um_per_px": um_per_px, "n_spots": st.n_obs, "array_row": bin_row,
            "array_col": bin_col, "barcodes": list(obs.index), "pooled": pooled}


def lattice_pairs(rows: np.ndarray, cols: np.ndarray) -> set:
    """Unordered pairs of spot indices that are hexagonal neighbours (Visium's doubled columns)."""
    site = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols))}
    pairs = set()
    for (r, c), i in site.items():
        for dr, dc in ((0, 2), (1, 1), (1, -1)):
            j = site.get((r + dr, c + dc))
            if j is not None:
                pairs.add((min(i, j), max(i, j)))
    return pairs


