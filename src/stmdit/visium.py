"""Reading Space Ranger `outs/` folders and slide images.

`read_space_ranger` returns an AnnData shaped like scanpy's `read_visium`: obs indexed by barcode
with in_tissue/array_row/array_col, `obsm["spatial"]` = (x, y) = (pxl_col_in_fullres,
pxl_row_in_fullres) in full-resolution pixels, and `uns["spatial"][library_id]` with `images`
(hires/lowres, uint8 RGB here where scanpy keeps float32 in [0, 1]), `scalefactors` and `metadata`.
Both positions layouts are read (1.x headerless `tissue_positions_list.csv`, 2.x+
`tissue_positions.csv` with header, and `tissue_positions.parquet`).

`read_rgb_image` decodes any slide image once into an (H, W, 3) uint8 RGB array: whole-slide
formats (svs, tiled tiff, ...) through OpenSlide at level 0, png/jpg/plain tif through OpenCV.
Every bad input raises one `InputError` naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from stmdit.errors import InputError

log = logging.getLogger(__name__)

MATRIX_FILE = "filtered_feature_bc_matrix.h5"
SCALEFACTORS_FILE = "spatial/scalefactors_json.json"
HIRES_FILE = "spatial/tissue_hires_image.png"
LOWRES_FILE = "spatial/tissue_lowres_image.png"
# Looked up in this order (scanpy's order for the two CSVs).
POSITIONS_FILES = (
    "spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv", "spatial/tissue_positions.parquet"
)
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
OPENSLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"}


# --------------------------------------------------------------------------------------------
# Space Ranger files
# --------------------------------------------------------------------------------------------


def positions_path(outs_dir: str | Path) -> Path:
    """The positions file of a Space Ranger folder (InputError when there is none)."""
    outs_dir = Path(outs_dir)
    for name in POSITIONS_FILES:
        if (outs_dir / name).exists():
            return outs_dir / name
    raise InputError(
        outs_dir / POSITIONS_FILES[0], "positions file not found (nor tissue_positions_list.csv or .parquet)"
    )


def read_positions(path: str | Path) -> pd.DataFrame:
    """Spot positions indexed by barcode: in_tissue, array_row, array_col (int), pxl_row_in_fullres,
    pxl_col_in_fullres (float). Reads the 1.x headerless CSV, the 2.x+ CSV with header and parquet."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
            if "barcode" not in table.columns and table.index.name == "barcode":
                table = table.reset_index()
        else:
            with open(path) as fh:
                has_header = fh.readline().lower().startswith("barcode")
            if has_header:
                table = pd.read_csv(path, header=0, dtype={"barcode": str})
            else:
                table = pd.read_csv(path, header=None, dtype={0: str})
                if table.shape[1] != len(POSITION_COLUMNS):
                    raise ValueError(f"expected {len(POSITION_COLUMNS)} columns, found {table.shape[1]}")
                table.columns = POSITION_COLUMNS
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read spot positions: {exc}") from None
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(path, f"positions lack column(s) {missing}")
    table = table[POSITION_COLUMNS].copy()
    table["barcode"] = table["barcode"].astype(str)
    if table["barcode"].duplicated().any():
        raise InputError(path, f"duplicate barcode {table['barcode'][table['barcode'].duplicated()].iloc[0]!r}")
    try:
        for column in ("in_tissue", "array_row", "array_col"):
            table[column] = pd.to_numeric(table[column], errors="raise").astype(np.int64)
        for column in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
            table[column] = pd.to_numeric(table[column], errors="raise").astype(np.float64)
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"non-numeric spot positions: {exc}") from None
    pixels = table[["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy()
    if not np.isfinite(pixels).all():
        raise InputError(path, "spot pixel positions contain NaN or infinite values")
    if not table["in_tissue"].isin([0, 1]).all():
        raise InputError(path, "in_tissue must be 0 or 1")
    return table.set_index("barcode")


def read_scalefactors(path: str | Path) -> dict[str, float]:
    """`scalefactors_json.json` as a dict; spot_diameter_fullres must be a positive number."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "scale factors file not found")
    try:
        factors = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read scale factors: {exc}") from None
    if not isinstance(factors, dict):
        raise InputError(path, "scale factors must be a JSON object")
    diameter = factors.get("spot_diameter_fullres")
    if not _is_positive_number(diameter):
        raise InputError(path, f"spot_diameter_fullres must be a positive number, found {diameter!r}")
    return factors


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def scale_factor(factors: dict[str, float], key: str, path: str | Path) -> float:
    """One image scale factor (image px per full-resolution px), validated."""
    value = factors.get(key)
    if not _is_positive_number(value):
        raise InputError(path, f"{key} must be a positive number, found {value!r}")
    return float(value)


def read_matrix_barcodes(path: str | Path) -> np.ndarray:
    """Barcodes of a 10x HDF5 matrix (v3 `matrix/barcodes` or v2 `<genome>/barcodes`)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(path, "count matrix not found")
    try:
        with h5py.File(path, "r") as f:
            group = f["matrix"] if "matrix" in f else f[next(iter(f.keys()))]
            barcodes = group["barcodes"][:]
    except Exception as exc:  # h5py raises OSError, KeyError, StopIteration, ... for damaged files
        raise InputError(path, f"cannot read 10x HDF5 matrix: {exc}") from None
    return np.array([b.decode() if isinstance(b, bytes) else str(b) for b in barcodes], dtype=object)


def read_counts(path: str | Path):
    """The count matrix through `scanpy.read_10x_h5` (InputError naming the file on failure)."""
    import scanpy as sc

    path = Path(path)
    if not path.exists():
        raise InputError(path, "count matrix not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sc.read_10x_h5(path)
    except Exception as exc:  # h5py/scanpy raise many types for a damaged file
        raise InputError(path, f"cannot read 10x HDF5 matrix: {exc}") from None


def matrix_attrs(path: str | Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def check_barcodes(barcodes: np.ndarray, positions: pd.DataFrame, positions_file: str | Path) -> None:
    """Every matrix barcode must be a position in tissue (InputError naming the positions file)."""
    barcodes = pd.Index(barcodes)
    unknown = barcodes.difference(positions.index, sort=False)
    if len(unknown):
        raise InputError(
            positions_file, f"{len(unknown)} barcode(s) of {MATRIX_FILE} are not in this file, e.g. {unknown[0]!r}"
        )
    outside = barcodes[positions.loc[barcodes, "in_tissue"].to_numpy() != 1]
    if len(outside):
        raise InputError(
            positions_file, f"{len(outside)} barcode(s) of {MATRIX_FILE} are not in tissue here, e.g. {outside[0]!r}"
        )
    extra = int(positions["in_tissue"].sum()) - len(barcodes)
    if extra > 0:
        log.warning("%s: %d in-tissue spot(s) have no column in %s; ignored", positions_file, extra, MATRIX_FILE)


@dataclass(frozen=True)
class SpaceRangerSpots:
    """The spots of a Space Ranger folder: every position, the matrix barcodes, the scale factors."""

    positions: pd.DataFrame  # every spot of the positions file, indexed by barcode
    barcodes: pd.Index  # the matrix barcodes (all in tissue), matrix order
    scalefactors: dict[str, float]
    files: dict[str, Path]  # matrix, scalefactors, positions

    @property
    def in_matrix(self) -> pd.DataFrame:
        """Positions of the matrix barcodes, in matrix order."""
        return self.positions.loc[self.barcodes]


def read_spot_positions(outs_dir: str | Path) -> SpaceRangerSpots:
    """Validate a Space Ranger folder's matrix barcodes, positions and scale factors.

    Reads only the barcodes of the matrix (not the counts): the ingest stage's light path.
    """
    outs_dir = Path(outs_dir)
    if not outs_dir.is_dir():
        raise InputError(outs_dir, "Space Ranger folder not found")
    files = {"matrix": outs_dir / MATRIX_FILE, "scalefactors": outs_dir / SCALEFACTORS_FILE}
    barcodes = read_matrix_barcodes(files["matrix"])
    factors = read_scalefactors(files["scalefactors"])
    files["positions"] = positions_path(outs_dir)
    positions = read_positions(files["positions"])
    check_barcodes(barcodes, positions, files["positions"])
    return SpaceRangerSpots(positions, pd.Index(barcodes), factors, files)


def read_space_ranger(outs_dir: str | Path, image: str | Path | None = None, load_images: bool = True):
    """Read a Space Ranger `outs/` folder into an AnnData like scanpy's `read_visium`.

    obs: barcode index (matrix order), in_tissue, array_row, array_col; var as `read_10x_h5` gives it
    (names not made unique, like scanpy). obsm["spatial"]: (x, y) =
    (pxl_col_in_fullres, pxl_row_in_fullres). uns["spatial"][library_id]: images {hires, lowres}
    (uint8 RGB, those present; only with `load_images`), scalefactors, metadata (chemistry,
    software version, `source_image_path` when `image` is given). Every matrix barcode must be an
    in-tissue position, else InputError naming the positions file.
    """
    outs_dir = Path(outs_dir)
    folder = read_spot_positions(outs_dir)
    positions, factors, files = folder.in_matrix, folder.scalefactors, folder.files
    adata = read_counts(files["matrix"])
    if list(adata.obs_names) != list(positions.index):
        raise InputError(files["matrix"], "scanpy read barcodes that differ from the HDF5 barcodes")
    adata.obs = adata.obs.join(positions[["in_tissue", "array_row", "array_col"]])
    adata.obsm["spatial"] = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    attrs = matrix_attrs(files["matrix"])
    library_ids = attrs.get("library_ids")
    library_id = (
        (library_ids[0].decode() if isinstance(library_ids[0], bytes) else str(library_ids[0]))
        if library_ids is not None and len(library_ids)
        else outs_dir.name
    )
    metadata = {k: attrs[k] for k in ("chemistry_description", "software_version") if k in attrs}
    if image is not None:
        metadata["source_image_path"] = str(Path(image).resolve())
    images = {}
    if load_images:
        for name, relative in (("hires", HIRES_FILE), ("lowres", LOWRES_FILE)):
            if (outs_dir / relative).exists():
                images[name] = read_rgb_image(outs_dir / relative)
    adata.uns["spatial"] = {library_id: {"images": images, "scalefactors": factors, "metadata": metadata}}
    log.info("read %s: %d spots x %d genes (%s)", outs_dir, adata.n_obs, adata.n_vars, files["positions"].name)
    return adata


@dataclass(frozen=True)
class PatchImageSource:
    """Which image patches are cut from, and its scale (image px per full-resolution px)."""

    path: Path
    scale: float
    kind: str  # "fullres", "hires" or "lowres"


def patch_image_source(outs_dir: str | Path, image: str | Path | None, factors: dict[str, float]) -> PatchImageSource:
    """The full-resolution `image` when given, else the hires image, else the lowres one, with its
    scale factor (a warning names the fallback file)."""
    outs_dir = Path(outs_dir)
    if image is not None:
        return PatchImageSource(Path(image), 1.0, "fullres")
    for kind, relative in (("hires", HIRES_FILE), ("lowres", LOWRES_FILE)):
        path = outs_dir / relative
        if path.exists():
            scale = scale_factor(factors, f"tissue_{kind}_scalef", outs_dir / SCALEFACTORS_FILE)
            log.warning(
                "no full-resolution image given: patches fall back to %s (tissue_%s_scalef = %g)", path, kind, scale
            )
            return PatchImageSource(path, scale, kind)
    raise InputError(
        outs_dir / HIRES_FILE, "no full-resolution image given and neither the hires nor the lowres image exists"
    )


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Decode an image once into a C-contiguous (H, W, 3) uint8 RGB array.

    Whole-slide formats go through OpenSlide (level 0, transparent pixels made white); png, jpg and
    TIFFs OpenSlide cannot open go through OpenCV. An image that cannot be decoded -> InputError.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "image not found")
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        slide = open_slide(path, required=path.suffix.lower() not in (".tif", ".tiff"))
        if slide is not None:
            try:
                return read_slide_level0(slide, path)
            finally:
                slide.close()
    pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if pixels is None or pixels.size == 0:
        raise InputError(path, "cannot decode image")
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def open_slide(path: Path, required: bool = True):
    """An OpenSlide handle, or None for a TIFF OpenSlide does not support (OpenCV may read it)."""
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        if required:
            raise InputError(path, f"cannot decode slide: {exc}") from None
        return None


def read_slide_level0(slide, path: Path) -> np.ndarray:
    """Level 0 of an open slide as (H, W, 3) uint8 RGB, read in one call."""
    import openslide

    width, height = slide.dimensions
    if hasattr(openslide, "OpenSlideCache"):  # each tile is read once: caching would only hold memory
        slide.set_cache(openslide.OpenSlideCache(0))
    try:
        rgba = np.asarray(slide.read_region((0, 0), 0, (width, height)))
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise InputError(path, f"cannot decode slide: {exc}") from None
    rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    transparent = rgba[..., 3] == 0
    if transparent.any():
        rgb[transparent] = 255
    return rgb


def read_he_slide(path: str | Path, mpp: float | None = None) -> tuple[np.ndarray, float]:
    """An H&E-only slide decoded once as (H, W, 3) uint8 RGB, and its um/px.

    um/px is `mpp` when given, else the slide's `openslide.mpp-x`; neither -> InputError. The slide is
    opened once for both."""
    path = Path(path)
    if mpp is not None and not _is_positive_number(float(mpp)):
        raise InputError(path, f"--mpp must be a positive number, found {mpp!r}")
    if not path.exists():
        raise InputError(path, "image not found")
    slide = None
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        slide = open_slide(path, required=path.suffix.lower() not in (".tif", ".tiff"))
    if slide is None:
        if mpp is None:
            raise InputError(path, _NO_MPP)
        return read_rgb_image(path), float(mpp)
    try:
        if mpp is None:
            mpp = _slide_mpp_x(slide, path)
        return read_slide_level0(slide, path), float(mpp)
    finally:
        slide.close()


_NO_MPP = "um/px unknown: the slide has no openslide.mpp-x; give mpp in the sample sheet (--mpp)"


def _slide_mpp_x(slide, path: Path) -> float:
    value = slide.properties.get("openslide.mpp-x")
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise InputError(path, _NO_MPP) from None
    if not _is_positive_number(mpp):
        raise InputError(path, _NO_MPP)
    mpp_y = slide.properties.get("openslide.mpp-y")
    if mpp_y is not None and abs(float(mpp_y) - mpp) > 0.01 * mpp:
        log.warning("%s: non-square pixels (mpp-x %s, mpp-y %s); using mpp-x", path, mpp, mpp_y)
    return mpp
