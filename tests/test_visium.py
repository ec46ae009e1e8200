"""Space Ranger reader against scanpy's own read_visium on the real folders; slide image decoding."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stmdit.errors import InputError
from stmdit.visium import (
    patch_image_source,
    TiledSlide,
    open_he_slide,
    read_positions,
    read_rgb_image,
    read_scalefactors,
    read_space_ranger,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CMU_SVS = SHARED_DATA / "he" / "cmu_small_region.svs"


def scanpy_view(folder: Path, tmp_path: Path) -> Path:
    """The folder as scanpy's read_visium needs it: it insists on a hires image, which these real
    folders lack, so the lowres PNG stands in for it (images only; counts and positions untouched)."""
    view = tmp_path / folder.name
    (view / "spatial").mkdir(parents=True)
    (view / "filtered_feature_bc_matrix.h5").symlink_to(folder / "filtered_feature_bc_matrix.h5")
    for file in (folder / "spatial").iterdir():
        (view / "spatial" / file.name).symlink_to(file)
    (view / "spatial" / "tissue_hires_image.png").symlink_to(folder / "spatial" / "tissue_lowres_image.png")
    return view


@pytest.mark.parametrize("name", ["sr1", "sr3"])
def test_reader_matches_scanpy_read_visium(name, visium_folders, tmp_path):
    import scanpy as sc

    folder = visium_folders[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sc.read_visium(scanpy_view(folder, tmp_path))
    got = read_space_ranger(folder)

    assert list(got.obs_names) == list(expected.obs_names)
    assert list(got.var_names) == list(expected.var_names)
    for column in ("in_tissue", "array_row", "array_col"):
        np.testing.assert_array_equal(got.obs[column].to_numpy(), expected.obs[column].to_numpy())
    assert (got.obs["in_tissue"] == 1).all()
    np.testing.assert_array_equal(got.obsm["spatial"], expected.obsm["spatial"].astype(np.float64))
    assert (sp.csr_matrix(got.X) != sp.csr_matrix(expected.X)).nnz == 0
    assert got.X.sum() > 0

    (library_id,) = expected.uns["spatial"]
    assert list(got.uns["spatial"]) == [library_id]
    ours, theirs = got.uns["spatial"][library_id], expected.uns["spatial"][library_id]
    assert ours["scalefactors"] == theirs["scalefactors"]
    assert ours["metadata"] == theirs["metadata"]
    assert set(ours["images"]) == {"lowres"}  # the real folders have no hires image
    lowres = ours["images"]["lowres"]
    assert lowres.dtype == np.uint8 and lowres.ndim == 3 and lowres.shape[2] == 3
    np.testing.assert_allclose(lowres / 255.0, theirs["images"]["lowres"][..., :3], atol=1e-6)


def test_layouts_are_the_ones_the_brief_names(visium_folders):
    assert (visium_folders["sr1"] / "spatial" / "tissue_positions_list.csv").exists()
    assert (visium_folders["sr3"] / "spatial" / "tissue_positions.csv").exists()


def test_parquet_positions_read_like_the_csv(visium_folders, tmp_path):
    folder = visium_folders["sr3"]
    copy = tmp_path / "outs"
    shutil.copytree(folder, copy)
    csv = copy / "spatial" / "tissue_positions.csv"
    pd.read_csv(csv).to_parquet(copy / "spatial" / "tissue_positions.parquet")
    csv.unlink()
    got = read_space_ranger(copy, load_images=False)
    expected = read_space_ranger(folder, load_images=False)
    assert list(got.obs_names) == list(expected.obs_names)
    np.testing.assert_array_equal(got.obsm["spatial"], expected.obsm["spatial"])


def test_headerless_positions_columns(visium_folders):
    positions = read_positions(visium_folders["sr1"] / "spatial" / "tissue_positions_list.csv")
    raw = pd.read_csv(visium_folders["sr1"] / "spatial" / "tissue_positions_list.csv", header=None)
    assert positions.index[0] == raw.iloc[0, 0]
    # 1.x columns: barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres
    assert positions["pxl_row_in_fullres"].iloc[0] == raw.iloc[0, 4]
    assert positions["pxl_col_in_fullres"].iloc[0] == raw.iloc[0, 5]


def test_source_image_path_recorded(visium_folders, tmp_path):
    image = tmp_path / "he.png"
    got = read_space_ranger(visium_folders["sr1"], image=image, load_images=False)
    (library,) = got.uns["spatial"].values()
    assert library["metadata"]["source_image_path"] == str(image.resolve())
    assert library["images"] == {}


def test_patch_image_falls_back_to_hires_then_lowres(visium_folders, tmp_path, caplog):
    folder = tmp_path / "outs"
    shutil.copytree(visium_folders["sr1"], folder)
    factors = read_scalefactors(folder / "spatial" / "scalefactors_json.json")

    with caplog.at_level(logging.WARNING, logger="stmdit.visium"):
        source = patch_image_source(folder, None, factors)
    assert source.kind == "lowres" and source.scale == factors["tissue_lowres_scalef"]
    assert "tissue_lowres_image.png" in caplog.text

    shutil.copy(folder / "spatial" / "tissue_lowres_image.png", folder / "spatial" / "tissue_hires_image.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stmdit.visium"):
        source = patch_image_source(folder, None, factors)
    assert source.kind == "hires" and source.scale == factors["tissue_hires_scalef"]
    assert "tissue_hires_image.png" in caplog.text

    fullres = tmp_path / "fullres.png"
    assert patch_image_source(folder, fullres, factors).scale == 1.0

    for png in (folder / "spatial").glob("tissue_*_image.png"):
        png.unlink()
    with pytest.raises(InputError) as err:
        patch_image_source(folder, None, factors)
    assert "tissue_hires_image.png" in err.value.path


def test_png_decodes_to_the_same_rgb_as_the_svs(tmp_path):
    if not CMU_SVS.exists():
        pytest.skip("shared/data/he is not beside this clone")
    pixels = read_rgb_image(CMU_SVS)
    slide, mpp = open_he_slide(CMU_SVS)
    assert isinstance(slide, TiledSlide) and (slide.height, slide.width) == (2967, 2220)
    slide.close()
    assert pixels.shape == (2967, 2220, 3) and pixels.dtype == np.uint8 and pixels.flags.c_contiguous
    assert mpp == pytest.approx(0.499)
    crop = pixels[1000:1200, 800:1100]
    png = tmp_path / "crop.png"
    cv2.imwrite(str(png), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(read_rgb_image(png), crop)
    with pytest.raises(InputError, match="mpp"):
        open_he_slide(png)
    assert open_he_slide(png, mpp=0.5)[1] == 0.5
    assert open_he_slide(CMU_SVS, mpp=0.25)[1] == 0.25


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".svs", ".tif"])
def test_undecodable_image_is_an_input_error(suffix, tmp_path):
    broken = tmp_path / f"broken{suffix}"
    broken.write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(InputError) as err:
        read_rgb_image(broken)
    assert err.value.path == str(broken)
