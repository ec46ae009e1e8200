"""The spots step reads slides in blocks: its patches, filter metrics and spot table (for H&E-only
slides, which grid spots are kept) are byte-identical to a whole-image read computed here, on the real
CMU svs, the real Visium folders, and a tiny tiled pyramidal JPEG TIFF (written tile by tile). Images
that can only be decoded whole stop at the memory limit with one line naming the file."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import zarr

from stmdit import spots as spots_module
from stmdit import visium
from stmdit.bigslide import MirroredTissue, read_source, write_pyramidal_tiff, write_visium_folder
from stmdit.cli import main
from stmdit.errors import InputError
from stmdit.spots import (
    FilterParams,
    GridParams,
    PatchParams,
    background_candidates,
    crop_patches,
    disc_mask,
    hex_grid,
    patch_metrics,
    patch_side,
    resize_patches,
    run_spots,
)
from stmdit.visium import TiledSlide, open_image, patch_image_source, read_rgb_image, read_scalefactors

FILTERS, PATCH, GRID = FilterParams(), PatchParams(), GridParams()
TINY_MPP = 0.25  # a 40x slide


@pytest.fixture(scope="module")
def tiny_tiff(tmp_path_factory, demo_image) -> Path:
    """A 4,032 x 3,008 px tiled pyramidal JPEG TIFF at 0.25 um/px, the CMU tissue mirror-tiled."""
    tissue = MirroredTissue(read_source(demo_image), 4032, 3008)
    return write_pyramidal_tiff(tmp_path_factory.mktemp("tiff") / "tiny.tif", tissue, TINY_MPP)


def whole_slide_pixels(path: Path) -> np.ndarray:
    """Level 0 decoded in one read_region call (the reference: how the step read slides before)."""
    import openslide

    slide = openslide.OpenSlide(str(path))
    rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    slide.close()
    rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    rgb[rgba[..., 3] == 0] = 255
    return rgb


def reference_patches(pixels: np.ndarray, rows: np.ndarray, cols: np.ndarray, diameter: float, scale: float):
    side = patch_side(diameter, scale, PATCH.patch_factor)
    native = crop_patches(pixels, rows * scale, cols * scale, side)
    return patch_metrics(native, FILTERS), resize_patches(native, PATCH.patch_size)


def reference_he_spots(pixels: np.ndarray, mpp: float) -> pd.DataFrame:
    """The grid spots with >= he_min_tissue non-white disc pixels, measured on the whole image."""
    diameter = GRID.spot_diameter_um / mpp
    grid = hex_grid(pixels.shape[0], pixels.shape[1], diameter, GRID.spot_spacing_um / mpp)
    side = max(1, int(round(diameter)))
    grey = cv2.cvtColor(
        crop_patches(pixels, grid["pxl_row"].to_numpy(), grid["pxl_col"].to_numpy(), side).reshape(-1, side, 3),
        cv2.COLOR_RGB2GRAY,
    ).reshape(len(grid), side, side)
    mask = disc_mask(side)
    fraction = np.count_nonzero((grey < FILTERS.grey_threshold) & mask, axis=(1, 2)) / np.count_nonzero(mask)
    return grid[fraction >= GRID.min_tissue].reset_index(drop=True)


def assert_outputs_match(tmp_path: Path, table: pd.DataFrame, pixels: np.ndarray, scale: float) -> None:
    metrics, images = reference_patches(
        pixels, table["pxl_row"].to_numpy(), table["pxl_col"].to_numpy(), float(table["diameter_px"].iloc[0]), scale
    )
    store = zarr.open_group(str(tmp_path / "patches.zarr"), mode="r")
    assert store["images"][:].tobytes() == images.tobytes()
    written = pd.read_parquet(tmp_path / "spots.parquet")
    pd.testing.assert_frame_equal(written, table)
    for name, values in metrics.items():
        np.testing.assert_array_equal(written[name].to_numpy(), values)


def run_he(path: Path, tmp_path: Path, mpp: float | None = None) -> pd.DataFrame:
    return run_spots("s", "d", "c", "he", path, tmp_path / "spots.parquet", tmp_path / "patches.zarr", mpp=mpp)


def test_cmu_svs_in_blocks_equals_the_whole_slide(demo_image, tmp_path, monkeypatch):
    monkeypatch.setattr(visium, "BLOCK_PX", 512)  # many read_region groups on this small slide
    table = run_he(demo_image, tmp_path)
    pixels = whole_slide_pixels(demo_image)
    expected = reference_he_spots(pixels, 0.499)
    assert table["barcode"].tolist() == expected["barcode"].tolist()
    np.testing.assert_array_equal(table["pxl_row"].to_numpy(), expected["pxl_row"].to_numpy())
    assert_outputs_match(tmp_path, table, pixels, 1.0)


def test_tiled_pyramidal_tiff_in_blocks_equals_the_whole_slide(tiny_tiff, tmp_path, caplog):
    image = open_image(tiny_tiff)
    assert isinstance(image, TiledSlide) and len(image.level_dimensions) == 4
    diameter = GRID.spot_diameter_um / TINY_MPP
    candidates = hex_grid(image.height, image.width, diameter, GRID.spot_spacing_um / TINY_MPP)
    ruled_out = background_candidates(image, candidates, diameter, FILTERS.grey_threshold, GRID.min_tissue)
    image.close()
    assert 0 < ruled_out.sum() < len(candidates)  # the lower level spares reads, and not everywhere

    table = run_he(tiny_tiff, tmp_path)  # the slide's own mpp (resolution tags)
    pixels = whole_slide_pixels(tiny_tiff)
    expected = reference_he_spots(pixels, TINY_MPP)
    assert table["barcode"].tolist() == expected["barcode"].tolist()
    assert not set(candidates["barcode"][ruled_out]) & set(expected["barcode"])
    assert_outputs_match(tmp_path, table, pixels, 1.0)


def test_visium_full_resolution_tiff_in_blocks_equals_the_whole_image(tiny_tiff, demo_image, tmp_path):
    tissue = MirroredTissue(read_source(demo_image), 4032, 3008)
    n = write_visium_folder(tmp_path / "outs", tissue, TINY_MPP, seed=3)
    table = run_spots("s", "d", "c", "visium", tmp_path / "outs", tmp_path / "spots.parquet",
                      tmp_path / "patches.zarr", image=tiny_tiff)
    assert len(table) == n > 20
    rows = table["pxl_row"].to_numpy()
    assert not np.all(np.diff(rows) >= 0)  # matrix order is spatially random: blocks are not compact
    assert_outputs_match(tmp_path, table, whole_slide_pixels(tiny_tiff), 1.0)


@pytest.mark.parametrize("name", ["sr1", "sr3"])
def test_real_visium_folders_equal_the_whole_image(name, visium_folders, tmp_path):
    folder = visium_folders[name]
    table = run_spots("s", "d", "c", "visium", folder, tmp_path / "spots.parquet", tmp_path / "patches.zarr")
    source = patch_image_source(folder, None, read_scalefactors(folder / visium.SCALEFACTORS_FILE))
    assert_outputs_match(tmp_path, table, read_rgb_image(source.path), source.scale)


def test_windows_across_block_and_slide_edges(tiny_tiff, monkeypatch):
    monkeypatch.setattr(visium, "BLOCK_PX", 300)
    pixels = whole_slide_pixels(tiny_tiff)
    rng = np.random.default_rng(0)
    tops = np.concatenate([rng.integers(-60, pixels.shape[0], 200), [-100, pixels.shape[0] - 10]])
    lefts = np.concatenate([rng.integers(-60, pixels.shape[1], 200), [pixels.shape[1] - 5, -100]])
    image = open_image(tiny_tiff)
    try:
        got = image.windows(tops, lefts, 97)
    finally:
        image.close()
    np.testing.assert_array_equal(got, visium.slice_windows(pixels, tops, lefts, 97))


def test_image_above_the_memory_limit_is_one_line_error(demo_image, tmp_path, capsys):
    png = tmp_path / "slide.png"
    cv2.imwrite(str(png), np.full((1200, 1000, 3), 200, dtype=np.uint8))
    needed = 1200 * 1000 * 3 / 2**20
    with pytest.raises(InputError) as err:
        open_image(png, max_image_mb=1.0)
    assert err.value.path == str(png) and f"{needed:,.0f} MB" in str(err.value)
    assert isinstance(open_image(png, max_image_mb=math.ceil(needed)), visium.DecodedImage)

    code = main(["spots", "--sample", "s", "--donor", "d", "--cohort", "c", "--kind", "he", "--path", str(png),
                 "--mpp", "0.5", "--out-spots", str(tmp_path / "o.parquet"), "--out-patches",
                 str(tmp_path / "o.zarr"), "--max-image-mb", "1"])
    err_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert code != 0 and len(err_lines) == 1
    assert str(png) in err_lines[0] and "MB" in err_lines[0] and "max_image_mb" in err_lines[0]
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "o.zarr").exists()


def test_screen_level_bounds_the_lower_level_read():
    class Pyramid:
        level_dimensions = [(80_000, 62_528), (20_000, 15_632), (5_000, 3_908), (1_250, 977)]

    assert spots_module.screen_level(Pyramid(), 220.0) == 2  # level 1 is over SCREEN_MAX_PIXELS
    assert spots_module.screen_level(Pyramid(), 20.0) is None  # a disc under 2 px at every lower level


def test_spots_scale_benchmark_reports_each_case_peak_memory(demo_image, tmp_path):
    from stmdit.bench import BENCHMARKS

    import argparse

    result = BENCHMARKS["spots-scale"](argparse.Namespace(
        source_image=demo_image, work=tmp_path, visium_px=2048, visium_mpp=0.27, he_width=2560, he_height=1984,
        he_mpp=0.25, keep=False,
    ))
    assert set(result["cases"]) == {"visium", "he"}
    for case in result["cases"].values():
        assert case["spots"] > 0 and 50 < case["peak_rss_mb"] < 2048
    assert list(tmp_path.iterdir()) == []  # the generated slides are deleted
