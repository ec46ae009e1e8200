"""Ingest one slide: in-tissue spots, spot-centred patches and the spot filters (paper A.3).

    stmdit spots --sample S --donor D --cohort C --kind visium|hest|he --path P [--image IMG]
        [--labels CSV] [--mpp 0.499] --out-spots results/spots/S.parquet
        --out-patches results/patches/S.zarr [thresholds, see --help]

Spots. `visium`: the barcodes of the Space Ranger matrix (all in tissue), with their positions.
`hest`: a HEST-1k sample (`--path` the HEST root, `--sample` its id; stmdit.hest says how its
fields map), patches cut from its pyramidal WSI in blocks.
`he` (H&E only): a Visium-like hexagonal grid of pseudo-spots (diameter `--he-spot-diameter-um`,
centre-to-centre `--he-spot-spacing-um`, at the slide's um/px; barcodes "r{array_row}_c{array_col}"
with Visium's doubled column index), keeping those whose disc has at least `--he-min-tissue` of
non-white pixels (grey < `--grey-threshold`). The disc fractions are computed on level-0 pixels, as
on a whole decoded slide; a low pyramid level, read whole, only rules out the grid spots whose disc
cannot reach `--he-min-tissue` by a bound with a 2x margin (see `background_candidates`), so they are
never read at level 0.

Patches. The patch image is the full-resolution image when given, else the hires image, else the
lowres one, with its scale factor (logged as a warning). A slide OpenSlide reads (svs, tiled
pyramidal TIFF) is read in blocks of spots through `read_region`, never whole; other images (png,
jpg, untiled TIFF) are decoded whole when their RGB pixels fit in `--max-image-mb`, else the step
stops with one error naming the file and the memory it needs. A patch is the square of side
round(spot diameter in image px x `--patch-factor`) centred on the spot, white (255) outside the
image, resized to `--patch-size` with cv2.INTER_AREA when shrinking (averages, no aliasing) and
cv2.INTER_CUBIC when enlarging (smoother than bilinear on the 3-5 px lowres fallback spots).

Filters, computed on the patch at its native side, before resizing, so they see the slide's pixels
and not interpolated ones: foreground = fraction of pixels with grey (cv2 RGB2GRAY) < grey-threshold;
blur = variance of cv2.Laplacian (CV_64F, 3x3 aperture, reflect-101 border) of the grey patch;
tissue = fraction of pixels with OpenCV HSV S > saturation-threshold and V < value-threshold (S, V
in 0..255). `reason` is the first failing of: label (in `--exclude-labels`), foreground, blur, tissue.

Outputs (written atomically, nothing left behind on error): `--out-spots` parquet with one row per
in-tissue spot (key, sample, donor, cohort, barcode, array_row, array_col, pxl_row, pxl_col,
diameter_px, foreground, laplacian_var, tissue_fraction, label, keep, reason), pixel positions and
diameter in full-resolution pixels; `--out-patches` zarr v3 group with `images` (N, P, P, 3) uint8
RGB and `spot_key` (N,), rows aligned with the parquet, and attrs["stmdit"] provenance.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import zarr
from tqdm import tqdm

from stmdit.errors import InputError
from stmdit.patch_codec import JpegLsPatchCodec
from stmdit.provenance import atomic_path, provenance, write_parquet
from stmdit.spots_table import SPOT_COLUMNS
from stmdit.visium import (
    DEFAULT_MAX_IMAGE_MB,
    DecodedImage,
    TiledSlide,
    open_he_slide,
    open_image,
    patch_image_source,
    read_spot_positions,
    slice_windows,
)

log = logging.getLogger(__name__)

REASONS = ("label", "foreground", "blur", "tissue")
CHUNK_SPOTS = 16  # patches per zarr chunk (16 x 256 x 256 x 3 = 3 MiB): random access by spot stays cheap
BLOCK_SPOTS = 64  # spots cut, measured, resized and written per step (bounds memory on full-res slides)
WORKERS = 2  # threads cutting blocks while the main thread writes


def patch_codecs() -> dict:
    """Codecs of the `images` array (create_array keywords): lossless JPEG-LS, one image per patch
    (`stmdit.patch_codec`). On the demo's real H&E patches (raw 196,608 B) 68 KB a patch where the
    earlier vertical differences + zstd 5 stored 97 KB and Blosc lz4 173-189 KB; on 256 px tiles of
    the same 20x slide at its own resolution 108 KB (delta + zstd 120 KB). Stores written with those
    codecs stay readable as they are."""
    return {"serializer": JpegLsPatchCodec(), "compressors": None}


@dataclass(frozen=True)
class FilterParams:
    """Thresholds of the spot filters (paper A.3); defaults are config.yaml's."""

    grey_threshold: int = 210
    min_foreground: float = 0.55
    min_laplacian_var: float = 20.0
    saturation_threshold: int = 15
    value_threshold: int = 240
    min_tissue: float = 0.30
    exclude_labels: tuple[str, ...] = ("Whitespace", "Mixed")


@dataclass(frozen=True)
class PatchParams:
    patch_factor: float = 1.0
    patch_size: int = 256


@dataclass(frozen=True)
class GridParams:
    """Pseudo-spots of H&E-only slides."""

    spot_diameter_um: float = 55.0
    spot_spacing_um: float = 100.0
    min_tissue: float = 0.5


@dataclass
class Slide:
    """One slide's in-tissue spots and the image their patches are cut from."""

    spots: pd.DataFrame  # barcode, array_row, array_col, pxl_row, pxl_col (full-res px), slide order
    diameter_px: float  # spot diameter in full-resolution px
    image: DecodedImage | TiledSlide  # open for windows; closed by run_spots
    image_path: Path
    scale: float  # image px per full-resolution px
    known_barcodes: pd.Index  # every barcode of the slide, in tissue or not (labels must name these)
    inputs: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Slides
# --------------------------------------------------------------------------------------------


def load_visium_slide(outs_dir: str | Path, image: str | Path | None = None,
                      max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> Slide:
    """The matrix barcodes of a Space Ranger folder, their positions and the opened patch image."""
    outs_dir = Path(outs_dir)
    folder = read_spot_positions(outs_dir)
    positions, factors, files = folder.in_matrix, folder.scalefactors, folder.files
    if positions.empty:
        raise InputError(files["matrix"], "the matrix has no spots")
    source = patch_image_source(outs_dir, image, factors)
    pixels = open_image(source.path, max_image_mb)
    spots = pd.DataFrame({
        "barcode": positions.index.to_numpy(dtype=object),
        "array_row": positions["array_row"].to_numpy(),
        "array_col": positions["array_col"].to_numpy(),
        "pxl_row": positions["pxl_row_in_fullres"].to_numpy(),
        "pxl_col": positions["pxl_col_in_fullres"].to_numpy(),
    })
    try:
        check_spots_inside(spots, (pixels.height, pixels.width), source.scale, source.path)
    except InputError:
        pixels.close()
        raise
    log.info(
        "%s: %d in-tissue spots, spot diameter %.1f full-res px; patch image %s (%d x %d px, scale %g)",
        outs_dir, len(spots), factors["spot_diameter_fullres"], source.path, pixels.width, pixels.height,
        source.scale,
    )
    inputs = [files["matrix"], files["positions"], files["scalefactors"], source.path]
    return Slide(spots, float(factors["spot_diameter_fullres"]), pixels, source.path, source.scale,
                 pd.Index(folder.positions.index), inputs)


def load_hest_slide(root: str | Path, sample_id: str, max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> Slide:
    """A HEST sample (see stmdit.hest): its in-tissue spots and the opened WSI (read in blocks)."""
    from stmdit import hest

    sample = hest.read_hest_sample(root, sample_id)
    pixels = open_image(sample.files["wsi"], max_image_mb)
    try:
        hest.check_inside(sample, pixels.width, pixels.height)
    except InputError:
        pixels.close()
        raise
    for note in sample.notes:
        log.info("%s: %s", sample_id, note)
    log.info("%s: %d in-tissue spots, spot diameter %.1f px (%.1f um); WSI %s (%d x %d px)", sample_id,
             len(sample.spots), sample.diameter_px, sample.diameter_px * sample.um_per_px, sample.files["wsi"],
             pixels.width, pixels.height)
    inputs = [sample.files["st"], sample.files["metadata"], sample.files["wsi"]]
    return Slide(sample.spots, sample.diameter_px, pixels, sample.files["wsi"], 1.0, sample.known_barcodes, inputs)


def check_spots_inside(spots: pd.DataFrame, shape: tuple[int, ...], scale: float, image_path: Path) -> None:
    """Every spot centre must lie inside the image (InputError naming the image)."""
    rows = spots["pxl_row"].to_numpy() * scale
    cols = spots["pxl_col"].to_numpy() * scale
    outside = (rows < 0) | (rows >= shape[0]) | (cols < 0) | (cols >= shape[1])
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise InputError(
            image_path,
            f"{int(outside.sum())} spot centre(s) lie outside the image ({shape[1]} x {shape[0]} px"
            f" at scale {scale:g}), e.g. {spots['barcode'].iloc[first]} at row {rows[first]:.1f},"
            f" col {cols[first]:.1f}",
        )


def hex_grid(height: int, width: int, diameter_px: float, spacing_px: float) -> pd.DataFrame:
    """Visium-like hexagonal grid of spot centres whose discs lie inside a height x width image.

    Rows are spacing x sqrt(3)/2 apart, odd rows shifted by half a spacing; array_col is Visium's
    doubled index (even in even rows, odd in odd rows), so neighbours are 1 row or 2 columns apart.
    """
    radius = diameter_px / 2
    row_pitch = spacing_px * math.sqrt(3) / 2
    n_rows = int(math.floor((height - diameter_px) / row_pitch)) + 1 if height >= diameter_px else 0
    n_cols = int(math.floor((width - diameter_px) / (spacing_px / 2))) + 1 if width >= diameter_px else 0
    array_row, array_col = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    on_lattice = (array_row % 2) == (array_col % 2)
    array_row, array_col = array_row[on_lattice], array_col[on_lattice]
    return pd.DataFrame({
        "barcode": [f"r{r}_c{c}" for r, c in zip(array_row.tolist(), array_col.tolist())],
        "array_row": array_row.astype(np.int64),
        "array_col": array_col.astype(np.int64),
        "pxl_row": radius + array_row * row_pitch,
        "pxl_col": radius + array_col * spacing_px / 2,
    })


def disc_mask(side: int) -> np.ndarray:
    """Boolean disc inscribed in a side x side square."""
    centre = (side - 1) / 2
    yy, xx = np.mgrid[:side, :side]
    return (yy - centre) ** 2 + (xx - centre) ** 2 <= (side / 2) ** 2


def disc_foreground(image: DecodedImage | TiledSlide, spots: pd.DataFrame, diameter_px: float,
                    grey_threshold: int) -> np.ndarray:
    """Fraction of non-white pixels (grey < grey_threshold) in each spot's disc, on level-0 pixels."""
    side = max(1, int(round(diameter_px)))
    mask = disc_mask(side)
    rows, cols = spots["pxl_row"].to_numpy(), spots["pxl_col"].to_numpy()
    fractions = [np.zeros(0)]
    block = 4 * BLOCK_SPOTS  # bounds memory on whole-slide images with many candidates
    for start in range(0, len(spots), block):
        grey = grey_stack(cut_windows(image, rows[start:start + block], cols[start:start + block], side))
        fractions.append(np.count_nonzero((grey < grey_threshold) & mask, axis=(1, 2)) / np.count_nonzero(mask))
    return np.concatenate(fractions)


SCREEN_MAX_PIXELS = 32 * 2**20  # the largest lower pyramid level read whole for the tissue mask
SCREEN_MARGIN = 2.0  # a grid spot is ruled out when its bound is below min_tissue / this


def screen_level(image: DecodedImage | TiledSlide, diameter_px: float) -> int | None:
    """The lower pyramid level the tissue mask is read from: the finest one with at most
    SCREEN_MAX_PIXELS pixels, at least 4x below level 0 and with a disc at least 2 px across; None when
    there is none (then every grid spot is measured at level 0)."""
    width, height = image.level_dimensions[0]
    for level, (level_width, level_height) in enumerate(image.level_dimensions):
        downsample = max(width / level_width, height / level_height)
        if downsample >= 4 and level_width * level_height <= SCREEN_MAX_PIXELS and diameter_px / downsample >= 2:
            return level
    return None


def background_candidates(image: DecodedImage | TiledSlide, spots: pd.DataFrame, diameter_px: float,
                          grey_threshold: int, min_tissue: float) -> np.ndarray:
    """Grid spots whose disc cannot hold `min_tissue` non-white pixels, judged on a lower pyramid level.

    A lower-level pixel is (up to JPEG and the scanner's filter) the mean of the level-0 pixels under it,
    and a pixel below grey_threshold lowers that mean by at least 255 - grey_threshold: so under a lower
    pixel of grey g at most (255 - g) / (255 - grey_threshold) of the level-0 pixels are non-white.
    Summed over the lower pixels touching the disc's square (widened by one lower pixel), this bounds
    the disc's non-white fraction from above; a spot is ruled out when the bound stays below
    min_tissue / SCREEN_MARGIN (the margin absorbs JPEG and resampling error of the lower level). Every
    other spot is measured exactly at level 0, so the spots kept are those a whole-slide read keeps
    (pinned by tests/test_spots_blocks.py). A slide without a suitable lower level is measured at level
    0 only, block by block."""
    level = screen_level(image, diameter_px) if isinstance(image, TiledSlide) else None
    background = np.zeros(len(spots), dtype=bool)
    if level is None or grey_threshold >= 255 or min_tissue <= 0 or spots.empty:
        return background
    level_width, level_height = image.level_dimensions[level]
    pixels = image.read(0, 0, level_height, level_width, level)
    darkness = 255 - cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    del pixels
    # summed-area table in uint32: it wraps, but a window's sum (< 2**32) comes out exact modulo 2**32
    summed = np.zeros((level_height + 1, level_width + 1), dtype=np.uint32)
    np.cumsum(darkness, axis=0, dtype=np.uint32, out=summed[1:, 1:])
    np.cumsum(summed[1:, 1:], axis=1, dtype=np.uint32, out=summed[1:, 1:])
    del darkness
    scale_y, scale_x = image.height / level_height, image.width / level_width
    side = max(1, int(round(diameter_px)))
    tops = np.floor(spots["pxl_row"].to_numpy() - side / 2 + 0.5)
    lefts = np.floor(spots["pxl_col"].to_numpy() - side / 2 + 0.5)
    r0 = np.clip(np.floor(tops / scale_y) - 1, 0, level_height).astype(np.int64)
    r1 = np.clip(np.floor((tops + side - 1) / scale_y) + 2, 0, level_height).astype(np.int64)
    c0 = np.clip(np.floor(lefts / scale_x) - 1, 0, level_width).astype(np.int64)
    c1 = np.clip(np.floor((lefts + side - 1) / scale_x) + 2, 0, level_width).astype(np.int64)
    dark_sum = (summed[r1, c1] - summed[r0, c1] - summed[r1, c0] + summed[r0, c0]).astype(np.float64)
    bound = dark_sum * scale_x * scale_y / (255 - grey_threshold) / np.count_nonzero(disc_mask(side))
    return bound < min_tissue / SCREEN_MARGIN


def load_he_slide(path: str | Path, mpp: float | None, grid: GridParams, grey_threshold: int,
                  max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> Slide:
    """An H&E-only slide: open it, lay the pseudo-spot grid, keep the spots on tissue (level-0 discs of
    the spots a lower pyramid level does not rule out)."""
    path = Path(path)
    image, um_per_px = open_he_slide(path, mpp, max_image_mb)
    try:
        diameter_px = grid.spot_diameter_um / um_per_px
        candidates = hex_grid(image.height, image.width, diameter_px, grid.spot_spacing_um / um_per_px)
        background = background_candidates(image, candidates, diameter_px, grey_threshold, grid.min_tissue)
        fraction = np.zeros(len(candidates))
        fraction[~background] = disc_foreground(image, candidates[~background], diameter_px, grey_threshold)
        spots = candidates[fraction >= grid.min_tissue].reset_index(drop=True)
        log.info(
            "%s: %d x %d px at %g um/px; %d of %d pseudo-spots on tissue (diameter %.1f px; %d ruled out on a"
            " lower pyramid level, %d measured at level 0)", path, image.width, image.height, um_per_px,
            len(spots), len(candidates), diameter_px, int(background.sum()), int((~background).sum()),
        )
        if spots.empty:
            raise InputError(path, f"no pseudo-spot lies on tissue ({len(candidates)} grid spots, none with "
                                   f">= {grid.min_tissue:g} non-white pixels)")
    except BaseException:
        image.close()
        raise
    return Slide(spots, diameter_px, image, path, 1.0, pd.Index(candidates["barcode"]), [path])


# --------------------------------------------------------------------------------------------
# Patches and filters
# --------------------------------------------------------------------------------------------


def patch_side(diameter_px: float, scale: float, patch_factor: float) -> int:
    """Patch side in image px: the spot diameter in image px times the factor, at least 1."""
    return max(1, int(round(diameter_px * scale * patch_factor)))


def window_corners(rows: np.ndarray, cols: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of the side x side squares centred on (rows, cols) in image px."""
    tops = np.floor(np.asarray(rows, dtype=np.float64) - side / 2 + 0.5).astype(np.int64)
    lefts = np.floor(np.asarray(cols, dtype=np.float64) - side / 2 + 0.5).astype(np.int64)
    return tops, lefts


def crop_patches(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, side: int) -> np.ndarray:
    """(n, side, side, 3) squares centred on (rows, cols) in image px, white (255) outside the image."""
    return slice_windows(image, *window_corners(rows, cols, side), side)


def cut_windows(image: DecodedImage | TiledSlide, rows: np.ndarray, cols: np.ndarray, side: int) -> np.ndarray:
    """`crop_patches` on an opened image: read in blocks from a TiledSlide, sliced from a DecodedImage."""
    return image.windows(*window_corners(rows, cols, side), side)


def grey_stack(patches: np.ndarray) -> np.ndarray:
    """cv2 RGB2GRAY of (n, s, s, 3) patches (converted as one tall image: the conversion is per pixel)."""
    n, side = patches.shape[:2]
    return cv2.cvtColor(patches.reshape(n * side, side, 3), cv2.COLOR_RGB2GRAY).reshape(n, side, side)


def patch_metrics(patches: np.ndarray, params: FilterParams) -> dict[str, np.ndarray]:
    """foreground, laplacian_var and tissue_fraction of (n, s, s, 3) uint8 RGB patches.

    Meant for patches at their native pixel side (before any resizing)."""
    n, side = patches.shape[:2]
    grey = grey_stack(patches)
    hsv = cv2.cvtColor(patches.reshape(n * side, side, 3), cv2.COLOR_RGB2HSV).reshape(n, side, side, 3)
    tissue = (hsv[..., 1] > params.saturation_threshold) & (hsv[..., 2] < params.value_threshold)
    pixels = side * side
    return {
        "foreground": np.count_nonzero(grey < params.grey_threshold, axis=(1, 2)) / pixels,
        "laplacian_var": np.array([cv2.Laplacian(g, cv2.CV_64F).var() for g in grey], dtype=np.float64),
        "tissue_fraction": np.count_nonzero(tissue, axis=(1, 2)) / pixels,
    }


def filter_reasons(labels: np.ndarray, metrics: dict[str, np.ndarray], params: FilterParams) -> np.ndarray:
    """The first failing filter of each spot ("" when it passes all): label, foreground, blur, tissue."""
    failing = [
        np.isin(np.asarray(labels, dtype=object), list(params.exclude_labels)),
        metrics["foreground"] < params.min_foreground,
        metrics["laplacian_var"] < params.min_laplacian_var,
        metrics["tissue_fraction"] < params.min_tissue,
    ]
    return np.select(failing, list(REASONS), default="").astype(object)


def resize_patches(patches: np.ndarray, size: int) -> np.ndarray:
    """Resize (n, s, s, 3) patches to (n, size, size, 3): INTER_AREA when shrinking, INTER_CUBIC when enlarging."""
    side = patches.shape[1]
    if side == size:
        return patches
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    out = np.empty((len(patches), size, size, 3), dtype=np.uint8)
    for i, patch in enumerate(patches):
        cv2.resize(patch, (size, size), dst=out[i], interpolation=interpolation)
    return out


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def read_labels(path: str | Path, known_barcodes: pd.Index) -> pd.Series:
    """barcode -> label from a CSV with columns barcode,label; every barcode must be known to the slide."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "labels file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read labels: {exc}") from None
    missing = {"barcode", "label"} - set(table.columns)
    if missing:
        raise InputError(path, f"labels lack column(s) {sorted(missing)} (found {list(table.columns)})")
    duplicated = table["barcode"].duplicated()
    if duplicated.any():
        raise InputError(path, f"barcode {table['barcode'][duplicated].iloc[0]!r} is labelled twice")
    unknown = ~table["barcode"].isin(known_barcodes)
    if unknown.any():
        raise InputError(
            path,
            f"{int(unknown.sum())} barcode(s) are unknown to the slide, e.g. {table['barcode'][unknown].iloc[0]!r}",
        )
    return table.set_index("barcode")["label"].str.strip()


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------



def load_slide(kind: str, path: str | Path, image: str | Path | None, mpp: float | None,
               grid: GridParams, filters: FilterParams, max_image_mb: float = DEFAULT_MAX_IMAGE_MB,
               sample: str | None = None) -> Slide:
    if kind == "visium":
        return load_visium_slide(path, image, max_image_mb)
    if kind == "hest":
        if image is not None or mpp is not None:
            raise InputError(path, "--image and --mpp are not for HEST samples (the WSI and its metadata give them)")
        return load_hest_slide(path, sample, max_image_mb)
    if kind == "he":
        if image is not None:
            log.warning("--image is ignored for an H&E-only slide (the slide itself is the image)")
        return load_he_slide(path, mpp, grid, filters.grey_threshold, max_image_mb)
    raise ValueError(f"unknown slide kind {kind!r}")


def spot_table(slide: Slide, sample: str, donor: str, cohort: str, labels: pd.Series | None) -> pd.DataFrame:
    """The identity columns of the spots table (metrics come later)."""
    spots = slide.spots
    label = (labels.reindex(spots["barcode"]).fillna("").to_numpy(dtype=object)
             if labels is not None else np.full(len(spots), "", dtype=object))
    return pd.DataFrame({
        "key": [f"{sample}:{b}" for b in spots["barcode"]],
        "sample": sample,
        "donor": donor,
        "cohort": cohort,
        "barcode": spots["barcode"].to_numpy(dtype=object),
        "array_row": spots["array_row"].to_numpy(dtype=np.int64),
        "array_col": spots["array_col"].to_numpy(dtype=np.int64),
        "pxl_row": spots["pxl_row"].to_numpy(dtype=np.float64),
        "pxl_col": spots["pxl_col"].to_numpy(dtype=np.float64),
        "diameter_px": float(slide.diameter_px),
        "label": label,
    })


def write_patches_and_metrics(
    slide: Slide, keys: list[str], store: Path, patch: PatchParams, filters: FilterParams, attrs: dict
) -> dict[str, np.ndarray]:
    """Cut, measure, resize and write every spot's patch into a new zarr store; return the metrics."""
    n, size = len(keys), patch.patch_size
    side = patch_side(slide.diameter_px, slide.scale, patch.patch_factor)
    rows = slide.spots["pxl_row"].to_numpy() * slide.scale
    cols = slide.spots["pxl_col"].to_numpy() * slide.scale
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    images = group.create_array(
        "images", shape=(n, size, size, 3), dtype="uint8", chunks=(min(n, CHUNK_SPOTS), size, size, 3),
        **patch_codecs(), fill_value=255,
        config={"write_empty_chunks": True},  # skips zarr's all-fill check: 5x faster writes
    )
    key_array = group.create_array("spot_key", shape=(n,), dtype=str, chunks=(n,))
    key_array[:] = np.array(keys, dtype=object)

    def cut(start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        native = cut_windows(slide.image, rows[start:stop], cols[start:stop], side)
        return patch_metrics(native, filters), resize_patches(native, size)

    # Blocks are cut, measured and resized by WORKERS threads (cv2 releases the GIL) while the main
    # thread writes finished blocks in order; at most WORKERS + 1 blocks are in memory.
    parts: list[dict[str, np.ndarray]] = []
    in_flight: deque = deque()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool, tqdm(total=n, unit="spot", desc="patches") as progress:

        def write_oldest() -> None:
            start, future = in_flight.popleft()
            metrics, block = future.result()
            images[start:start + len(block)] = block
            parts.append(metrics)
            progress.update(len(block))

        for start in range(0, n, BLOCK_SPOTS):
            in_flight.append((start, pool.submit(cut, start, min(start + BLOCK_SPOTS, n))))
            if len(in_flight) > WORKERS:
                write_oldest()
        while in_flight:
            write_oldest()
    group.attrs.update(attrs)
    log.info("patches: %d x %d px cut from %s (scale %g), resized to %d px", side, side, slide.image_path.name,
             slide.scale, size)
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def reason_counts(reasons: np.ndarray) -> dict[str, int]:
    return {reason: int((reasons == reason).sum()) for reason in REASONS}


def run_spots(
    sample: str,
    donor: str,
    cohort: str,
    kind: str,
    path: str | Path,
    out_spots: str | Path,
    out_patches: str | Path,
    image: str | Path | None = None,
    labels: str | Path | None = None,
    mpp: float | None = None,
    patch: PatchParams = PatchParams(),
    filters: FilterParams = FilterParams(),
    grid: GridParams = GridParams(),
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB,
) -> pd.DataFrame:
    """The whole stage for one slide; returns the spots table it wrote."""
    slide = load_slide(kind, path, image, mpp, grid, filters, max_image_mb, sample)
    try:
        return spots_of_slide(slide, sample, donor, cohort, kind, path, out_spots, out_patches, labels, mpp,
                              patch, filters, grid)
    finally:
        slide.image.close()


def spots_of_slide(slide: Slide, sample: str, donor: str, cohort: str, kind: str, path: str | Path,
                   out_spots: str | Path, out_patches: str | Path, labels: str | Path | None, mpp: float | None,
                   patch: PatchParams, filters: FilterParams, grid: GridParams) -> pd.DataFrame:
    """The spots table and patches of an opened slide (see run_spots)."""
    slide_labels = read_labels(labels, slide.known_barcodes) if labels is not None else None
    if slide_labels is not None:
        slide.inputs.append(Path(labels))
        log.info("%s: %d labelled barcodes", labels, len(slide_labels))
    table = spot_table(slide, sample, donor, cohort, slide_labels)
    params = {
        "sample": sample, "donor": donor, "cohort": cohort, "kind": kind, "mpp": mpp,
        **asdict(patch), **asdict(filters), **({f"he_{k}": v for k, v in asdict(grid).items()} if kind == "he" else {}),
        "patch_image": str(slide.image_path), "patch_image_scale": slide.scale,
        "patch_side_px": patch_side(slide.diameter_px, slide.scale, patch.patch_factor),
    }
    meta = provenance("spots", params, slide.inputs)
    with atomic_path(out_patches) as store:
        metrics = write_patches_and_metrics(slide, table["key"].tolist(), store, patch, filters, {"stmdit": meta})
        for name, values in metrics.items():
            table[name] = values
        table["reason"] = filter_reasons(table["label"].to_numpy(), metrics, filters)
        table["keep"] = table["reason"] == ""
        table = table[SPOT_COLUMNS]
        counts = reason_counts(table["reason"].to_numpy())
        summary = ", ".join(f"{reason} {count}" for reason, count in counts.items())
        if not table["keep"].any():
            raise InputError(path, f"no spot passes the filters: all {len(table)} in-tissue spots dropped ({summary})")
        write_parquet(table, out_spots, meta)
    log.info("kept %d of %d in-tissue spots; dropped by reason: %s", int(table["keep"].sum()), len(table), summary)
    log.info("wrote %s and %s", out_spots, out_patches)
    return table


def run(args: argparse.Namespace) -> None:
    run_spots(
        args.sample, args.donor, args.cohort, args.kind, args.path, args.out_spots, args.out_patches,
        image=args.image, labels=args.labels, mpp=args.mpp,
        patch=PatchParams(args.patch_factor, args.patch_size),
        filters=FilterParams(
            args.grey_threshold, args.min_foreground, args.min_laplacian_var, args.saturation_threshold,
            args.value_threshold, args.min_tissue, tuple(args.exclude_labels),
        ),
        grid=GridParams(args.he_spot_diameter_um, args.he_spot_spacing_um, args.he_min_tissue),
        max_image_mb=args.max_image_mb,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("spots", help="ingest one slide: in-tissue spots, patches and the A.3 spot filters")
    p.add_argument("--sample", required=True)
    p.add_argument("--donor", required=True)
    p.add_argument("--cohort", required=True)
    p.add_argument("--kind", required=True, choices=["visium", "hest", "he"])
    p.add_argument("--path", required=True, type=Path,
                   help="Space Ranger outs/ folder, the HEST root (kind hest: --sample is the HEST id), or the H&E slide")
    p.add_argument("--image", type=Path, default=None, help="full-resolution H&E of a Visium slide")
    p.add_argument("--labels", type=Path, default=None, help="CSV with columns barcode,label")
    p.add_argument("--mpp", type=float, default=None, help="um/px of an H&E slide (else its openslide.mpp-x)")
    p.add_argument("--out-spots", required=True, type=Path)
    p.add_argument("--out-patches", required=True, type=Path)
    d_patch, d_filter, d_grid = PatchParams(), FilterParams(), GridParams()
    p.add_argument("--patch-factor", type=float, default=d_patch.patch_factor)
    p.add_argument("--patch-size", type=int, default=d_patch.patch_size)
    p.add_argument("--grey-threshold", type=int, default=d_filter.grey_threshold)
    p.add_argument("--min-foreground", type=float, default=d_filter.min_foreground)
    p.add_argument("--min-laplacian-var", type=float, default=d_filter.min_laplacian_var)
    p.add_argument("--saturation-threshold", type=int, default=d_filter.saturation_threshold)
    p.add_argument("--value-threshold", type=int, default=d_filter.value_threshold)
    p.add_argument("--min-tissue", type=float, default=d_filter.min_tissue)
    p.add_argument("--exclude-labels", nargs="*", default=list(d_filter.exclude_labels))
    p.add_argument("--he-spot-diameter-um", type=float, default=d_grid.spot_diameter_um)
    p.add_argument("--he-spot-spacing-um", type=float, default=d_grid.spot_spacing_um)
    p.add_argument("--he-min-tissue", type=float, default=d_grid.min_tissue)
    p.add_argument("--max-image-mb", type=float, default=DEFAULT_MAX_IMAGE_MB,
                   help="largest image decoded whole (RGB MB); svs and tiled TIFFs are read in blocks instead")
    p.set_defaults(func=run)
