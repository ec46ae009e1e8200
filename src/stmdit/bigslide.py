"""Large synthetic slides from a real H&E, written tile by tile: the inputs of `stmdit bench spots-scale`.

`MirroredTissue` tiles a real H&E (the CMU-1-Small-Region svs) over any size, each copy flipped like
its neighbour (a mirror tiling, so the tissue has no seams), white outside an ellipse of tissue.
`write_pyramidal_tiff` writes it as a tiled, pyramidal, JPEG-compressed TIFF (what OpenSlide reads as
a generic tiled TIFF, with its um/px in the resolution tags), one tile at a time: no level is ever
held whole. Lower levels are exact box means of level 0 before JPEG (the source is cut to a multiple
of the largest downsample, and the tissue ellipse decided per block of that size), as a scanner's
pyramid approximately is. `write_visium_folder` adds a Space Ranger 2.x-like folder (positions,
scale factors, a 10x HDF5 matrix) whose Visium grid of spots lies on such an image.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

TILE = 512
DOWNSAMPLES = (4, 16, 64)  # lower pyramid levels; every size used here is a multiple of the largest
JPEG_QUALITY = 85


def mirror_index(positions: np.ndarray, length: int) -> np.ndarray:
    """Index into a source of `length` px of a mirror tiling (0..L-1, L-1..0, 0..) at `positions`."""
    phase = positions % (2 * length)
    return np.where(phase < length, phase, 2 * length - 1 - phase)


class MirroredTissue:
    """A real H&E mirror-tiled over a width x height plane, white outside an inscribed ellipse of
    tissue (decided per BLOCK x BLOCK square, so lower levels stay exact box means)."""

    BLOCK = max(DOWNSAMPLES)

    def __init__(self, source_rgb: np.ndarray, width: int, height: int, tissue_fraction: float = 0.6):
        cut_h = source_rgb.shape[0] // self.BLOCK * self.BLOCK
        cut_w = source_rgb.shape[1] // self.BLOCK * self.BLOCK
        self.source = np.ascontiguousarray(source_rgb[:cut_h, :cut_w])
        self.width, self.height = width, height
        # an ellipse with the plane's aspect covering `tissue_fraction` of it (in plane-normalised units)
        self.radius = float(np.sqrt(tissue_fraction / np.pi))
        self.levels = {1: self.source}
        for downsample in DOWNSAMPLES:
            self.levels[downsample] = cv2.resize(
                self.source, (cut_w // downsample, cut_h // downsample), interpolation=cv2.INTER_AREA
            )

    def tile(self, downsample: int, top: int, left: int, size: int = TILE) -> np.ndarray:
        """(size, size, 3) RGB of the level `downsample` from (top, left) in that level's px; white
        beyond the plane."""
        source = self.levels[downsample]
        ys, xs = top + np.arange(size), left + np.arange(size)
        out = source[mirror_index(ys, source.shape[0])[:, None], mirror_index(xs, source.shape[1])[None, :]]
        block_y = (ys * downsample // self.BLOCK + 0.5) * self.BLOCK / self.height - 0.5
        block_x = (xs * downsample // self.BLOCK + 0.5) * self.BLOCK / self.width - 0.5
        outside = (block_y[:, None] ** 2 + block_x[None, :] ** 2 > self.radius ** 2)
        outside |= (ys[:, None] * downsample >= self.height) | (xs[None, :] * downsample >= self.width)
        out[outside] = 255
        return out


def read_source(path: str | Path) -> np.ndarray:
    """The source H&E decoded whole (a small slide such as the CMU svs)."""
    from stmdit.visium import read_rgb_image

    return read_rgb_image(path)


def write_pyramidal_tiff(path: str | Path, tissue: MirroredTissue, mpp: float, tile: int = TILE,
                         quality: int = JPEG_QUALITY) -> Path:
    """Write `tissue` as a tiled pyramidal JPEG TIFF (level 0 and DOWNSAMPLES), tile by tile."""
    import tifffile

    path = Path(path)
    if tissue.width % MirroredTissue.BLOCK or tissue.height % MirroredTissue.BLOCK:
        raise ValueError(f"width and height must be multiples of {MirroredTissue.BLOCK}")
    pixels_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for number, downsample in enumerate((1, *DOWNSAMPLES)):
            width, height = tissue.width // downsample, tissue.height // downsample
            tiles = (tissue.tile(downsample, top, left, tile)
                     for top in range(0, height, tile) for left in range(0, width, tile))
            writer.write(
                tiles, shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                compression="jpeg", compressionargs={"level": quality}, subfiletype=1 if number else 0,
                resolution=(pixels_per_cm / downsample, pixels_per_cm / downsample), resolutionunit="CENTIMETER",
            )
    return path


def visium_barcodes(n: int, seed: int) -> np.ndarray:
    """n distinct Visium-like barcodes (16 nt + "-1")."""
    rng = np.random.default_rng(seed)
    codes: set[str] = set()
    while len(codes) < n:
        for row in rng.integers(0, 4, size=(n - len(codes), 16)):
            codes.add("".join("ACGT"[i] for i in row) + "-1")
    return np.array(sorted(codes), dtype=object)


def write_visium_folder(outs: str | Path, tissue: MirroredTissue, mpp: float, spot_diameter_um: float = 55.0,
                        spot_spacing_um: float = 100.0, seed: int = 0, write_matrix: bool = True) -> int:
    """A Space Ranger 2.x-like outs/ folder (tissue_positions.csv, scalefactors_json.json and, unless
    `write_matrix` is false, a 10x HDF5 matrix with one gene: stmdit.scale_cohort writes a full one)
    for a Visium grid over `tissue` at `mpp`; spots whose centre lies on the tissue ellipse are in tissue. Matrix barcodes are sorted, as Space Ranger writes them (so matrix
    order is spatially random). Returns the number of in-tissue spots."""
    import h5py
    import pandas as pd

    from stmdit.spots import hex_grid

    outs = Path(outs)
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    diameter = spot_diameter_um / mpp
    grid = hex_grid(tissue.height, tissue.width, diameter, spot_spacing_um / mpp)
    rows, cols = grid["pxl_row"].to_numpy(), grid["pxl_col"].to_numpy()
    in_tissue = ((rows / tissue.height - 0.5) ** 2 + (cols / tissue.width - 0.5) ** 2) <= tissue.radius ** 2
    barcodes = visium_barcodes(len(grid), seed)
    np.random.default_rng(seed).shuffle(barcodes)
    positions = pd.DataFrame({
        "barcode": barcodes, "in_tissue": in_tissue.astype(int), "array_row": grid["array_row"],
        "array_col": grid["array_col"], "pxl_row_in_fullres": np.round(rows).astype(int),
        "pxl_col_in_fullres": np.round(cols).astype(int),
    })
    positions.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": diameter, "fiducial_diameter_fullres": diameter * 1.6,
        "tissue_hires_scalef": 2000 / max(tissue.width, tissue.height),
        "tissue_lowres_scalef": 600 / max(tissue.width, tissue.height),
    }))
    matrix_barcodes = np.sort(barcodes[in_tissue].astype(str))
    n = len(matrix_barcodes)
    if not write_matrix:
        return n
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"bench"])
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        group = f.create_group("matrix")
        group["barcodes"] = matrix_barcodes.astype("S")
        group["data"] = np.ones(n, dtype=np.int32)
        group["indices"] = np.zeros(n, dtype=np.int64)
        group["indptr"] = np.arange(n + 1, dtype=np.int64)
        group["shape"] = np.array([1, n], dtype=np.int32)
        features = group.create_group("features")
        features["id"] = np.array([b"ENSG00000141510"])
        features["name"] = np.array([b"TP53"])
        features["feature_type"] = np.array([b"Gene Expression"])
        features["genome"] = np.array([b"GRCh38"])
        features["_all_tag_keys"] = np.array([b"genome"])
    return n
