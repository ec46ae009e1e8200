"""Reading Space Ranger `outs/` folders and slide images.

`read_space_ranger` returns an AnnData shaped like scanpy's `read_visium`: obs indexed by barcode
with in_tissue/array_row/array_col, `obsm["spatial"]` = (x, y) = (pxl_col_in_fullres,
pxl_row_in_fullres) in full-resolution pixels, and `uns["spatial"][library_id]` with `images`
(hires/lowres, uint8 RGB here where scanpy keeps float32 in [0, 1]), `scalefactors` and `metadata`.
Both positions layouts are read (1.x headerless `tissue_positions_list.csv`, 2.x+
`tissue_positions.csv` with header, and `tissue_positions.parquet`).

`open_image` opens a slide image to cut windows from without holding more than a block of it:
what OpenSlide reads (svs, tiled pyramidal TIFF, ...) as a `TiledSlide` (level 0 through
`read_region`, one call per group of nearby windows; lower levels for tissue masks), anything else
(png, jpg, untiled TIFF) decoded whole through OpenCV as a `DecodedImage`, when its RGB pixels fit
under a limit (`spots.max_image_mb`; above it, an InputError naming the file and the memory it needs).
`read_rgb_image` decodes a small image whole. Every bad input raises one `InputError` naming the file.
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


DEFAULT_MAX_IMAGE_MB = 1024  # config.yaml spots.max_image_mb: the largest image decoded whole (RGB)
BLOCK_PX = 2048  # side of the level-0 squares a block's windows are grouped by: one read_region each
SLIDE_CACHE_BYTES = 64 * 2**20  # OpenSlide's tile cache: neighbouring windows reuse decoded tiles


class DecodedImage:
    """An image decoded whole (png, jpg, untiled TIFF): one pyramid level, windows sliced from memory."""

    def __init__(self, pixels: np.ndarray, path: Path):
        self.pixels, self.path = pixels, path
        self.height, self.width = pixels.shape[:2]
        self.level_dimensions = [(self.width, self.height)]

    def windows(self, tops: np.ndarray, lefts: np.ndarray, side: int) -> np.ndarray:
        return slice_windows(self.pixels, tops, lefts, side)

    def close(self) -> None:
        pass


class TiledSlide:
    """A tiled (pyramidal) slide OpenSlide reads: svs, tiled TIFF, ... Windows come from `read_region`,
    one call per group of nearby windows (BLOCK_PX squares), never the whole of level 0.

    Pixels are level 0's as OpenSlide decodes them, transparent ones (and those outside the slide) white."""

    def __init__(self, slide, path: Path):
        import openslide

        self.slide, self.path = slide, path
        self.width, self.height = slide.dimensions
        self.level_dimensions = list(slide.level_dimensions)
        if hasattr(openslide, "OpenSlideCache"):
            slide.set_cache(openslide.OpenSlideCache(SLIDE_CACHE_BYTES))

    def read(self, top: int, left: int, height: int, width: int, level: int = 0) -> np.ndarray:
        """(height, width, 3) RGB of level 0 from (top, left); or a whole lower `level` (top = left = 0:
        OpenSlide interpolates a lower level read from any other corner)."""
        import openslide

        if level and (top or left):
            raise ValueError("a lower pyramid level is read whole, from (0, 0)")
        try:
            rgba = np.asarray(self.slide.read_region((left, top), level, (width, height)))
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise InputError(self.path, f"cannot decode slide: {exc}") from None
        rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        transparent = rgba[..., 3] == 0
        if transparent.any():
            rgb[transparent] = 255
        return rgb

    def windows(self, tops: np.ndarray, lefts: np.ndarray, side: int) -> np.ndarray:
        """(n, side, side, 3) squares of level 0 with top-left corners (tops, lefts), white outside the
        slide: one `read_region` per BLOCK_PX square holding window corners."""
        tops, lefts = np.asarray(tops, dtype=np.int64), np.asarray(lefts, dtype=np.int64)
        out = np.empty((len(tops), side, side, 3), dtype=np.uint8)
        if not len(tops):
            return out
        squares = (tops // BLOCK_PX) * (1 << 32) + (lefts // BLOCK_PX)
        order = np.argsort(squares, kind="stable")
        bounds = np.flatnonzero(np.diff(squares[order])) + 1
        for group in np.split(order, bounds):
            top, left = int(tops[group].min()), int(lefts[group].min())
            block = self.read(top, left, int(tops[group].max()) - top + side, int(lefts[group].max()) - left + side)
            for i in group.tolist():
                r, c = int(tops[i]) - top, int(lefts[i]) - left
                out[i] = block[r:r + side, c:c + side]
        return out

    def close(self) -> None:
        self.slide.close()


def slice_windows(image: np.ndarray, tops: np.ndarray, lefts: np.ndarray, side: int) -> np.ndarray:
    """(n, side, side, 3) squares of an in-memory image with top-left corners (tops, lefts), white (255)
    outside the image."""
    height, width = image.shape[:2]
    out = np.empty((len(tops), side, side, 3), dtype=np.uint8)
    for i, (top, left) in enumerate(zip(np.asarray(tops).tolist(), np.asarray(lefts).tolist())):
        if top >= 0 and left >= 0 and top + side <= height and left + side <= width:
            out[i] = image[top:top + side, left:left + side]
            continue
        out[i] = 255
        r0, c0, r1, c1 = max(top, 0), max(left, 0), min(top + side, height), min(left + side, width)
        if r1 > r0 and c1 > c0:
            out[i, r0 - top:r1 - top, c0 - left:c1 - left] = image[r0:r1, c0:c1]
    return out


def open_image(path: str | Path, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> DecodedImage | TiledSlide:
    """An image to cut windows from: a TiledSlide for what OpenSlide reads (read in blocks), else the
    image decoded whole through OpenCV, when its RGB pixels fit in `max_image_mb` (else InputError
    naming the file and the memory it needs)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "image not found")
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        slide = open_slide(path, required=path.suffix.lower() not in (".tif", ".tiff"))
        if slide is not None:
            return TiledSlide(slide, path)
    check_decoded_size(path, max_image_mb)
    pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if pixels is None or pixels.size == 0:
        raise InputError(path, "cannot decode image")
    return DecodedImage(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB, dst=pixels), path)


def check_decoded_size(path: Path, max_image_mb: float) -> None:
    """InputError when the image, decoded whole as RGB, would exceed `max_image_mb` (read from its header)."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # only the header is read here
    try:
        with Image.open(path) as header:
            width, height = header.size
    except Exception:  # not an image Pillow knows: OpenCV decides below
        return
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    needed_mb = width * height * 3 / 2**20
    if needed_mb > max_image_mb:
        raise InputError(
            path,
            f"decoding this {width} x {height} px image whole needs {needed_mb:,.0f} MB, above the limit of"
            f" {max_image_mb:g} MB (spots.max_image_mb); save it as a tiled pyramidal TIFF, which is read in"
            " blocks, or raise the limit",
        )


def read_rgb_image(path: str | Path, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> np.ndarray:
    """Decode a (small) image whole into a C-contiguous (H, W, 3) uint8 RGB array.

    Whole-slide formats go through OpenSlide (level 0, transparent pixels made white); png, jpg and
    TIFFs OpenSlide cannot open go through OpenCV. An image that cannot be decoded, or whose RGB
    pixels exceed `max_image_mb` -> InputError."""
    image = open_image(path, max_image_mb)
    if isinstance(image, DecodedImage):
        return image.pixels
    try:
        check_slide_size(image, max_image_mb)
        return image.read(0, 0, image.height, image.width)
    finally:
        image.close()


def check_slide_size(image: TiledSlide, max_image_mb: float) -> None:
    needed_mb = image.width * image.height * 3 / 2**20
    if needed_mb > max_image_mb:
        raise InputError(image.path, f"decoding this {image.width} x {image.height} px slide whole needs"
                                     f" {needed_mb:,.0f} MB, above the limit of {max_image_mb:g} MB")


def open_slide(path: Path, required: bool = True):
    """An OpenSlide handle, or None for a TIFF OpenSlide does not support (OpenCV may read it)."""
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        if required:
            raise InputError(path, f"cannot decode slide: {exc}") from None
        return None


def open_he_slide(path: str | Path, mpp: float | None = None,
                  max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> tuple[DecodedImage | TiledSlide, float]:
    """An H&E-only slide opened for reading in blocks (or decoded whole, see `open_image`), and its um/px.

    um/px is `mpp` when given, else the slide's `openslide.mpp-x`; neither -> InputError."""
    path = Path(path)
    if mpp is not None and not _is_positive_number(float(mpp)):
        raise InputError(path, f"--mpp must be a positive number, found {mpp!r}")
    if mpp is None and path.suffix.lower() not in OPENSLIDE_SUFFIXES:
        raise InputError(path, _NO_MPP)
    image = open_image(path, max_image_mb)
    if mpp is None:
        try:
            if not isinstance(image, TiledSlide):
                raise InputError(path, _NO_MPP)
            mpp = _slide_mpp_x(image.slide, path)
        except InputError:
            image.close()
            raise
    return image, float(mpp)


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
