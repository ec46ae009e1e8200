"""The spots stage: patches, the A.3 filters (against an independent computation on real H&E),
pseudo-spots of H&E-only slides, image fallbacks, labels, and every bad input through the CLI."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import zarr

from stmdit.bench import BENCHMARKS
from stmdit.cli import main
from stmdit.spots import FilterParams, crop_patches, filter_reasons, patch_metrics, resize_patches
from stmdit.spots_table import SPOT_COLUMNS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CMU_SVS = SHARED_DATA / "he" / "cmu_small_region.svs"
FILTERS = FilterParams()


# --------------------------------------------------------------------------------------------
# Independent metrics: numpy formulas (ITU-R 601 grey, HSV by definition), scipy's Laplacian
# --------------------------------------------------------------------------------------------


def numpy_metrics(patch: np.ndarray) -> dict[str, float]:
    rgb = patch.astype(np.float64)
    grey = np.floor(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2] + 0.5)
    value = rgb.max(axis=2)
    saturation = np.floor(np.where(value > 0, 255 * (value - rgb.min(axis=2)) / np.maximum(value, 1), 0) + 0.5)
    # OpenCV's default border (reflect-101: d c b | b c d) is scipy's "mirror" mode
    laplacian = ndi.laplace(grey, mode="mirror")
    return {
        "foreground": float((grey < FILTERS.grey_threshold).mean()),
        "laplacian_var": float(laplacian.var()),
        "tissue_fraction": float(
            ((saturation > FILTERS.saturation_threshold) & (value < FILTERS.value_threshold)).mean()
        ),
    }


# --------------------------------------------------------------------------------------------
# Small synthetic Space Ranger folders
# --------------------------------------------------------------------------------------------

FULLRES = 400  # full-resolution image side (px)
SPOT_DIAMETER = 30.0
HIRES_SCALE, LOWRES_SCALE = 0.5, 0.1


def tissue_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Pink, saturated, textured pixels that pass every filter."""
    noise = np.random.default_rng(seed).normal(0, 25, (height, width, 3))
    return np.clip(np.array([190.0, 110.0, 170.0]) + noise, 0, 255).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def write_10x_h5(path: Path, barcodes: list[str], genes: list[str], counts: np.ndarray) -> None:
    """A 10x HDF5 v3 matrix (genes x barcodes CSC) as Space Ranger writes it."""
    import scipy.sparse as sp

    csc = sp.csc_matrix(counts.T)  # genes x barcodes, one column per barcode
    with h5py.File(path, "w") as f:
        f.attrs["library_ids"] = np.array([b"synthetic"])
        f.attrs["chemistry_description"] = "Spatial 3' v1"
        f.attrs["filetype"] = "matrix"
        f.attrs["software_version"] = "test"
        f.attrs["version"] = 2
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = csc.data.astype(np.int32)
        m["indices"] = csc.indices.astype(np.int64)
        m["indptr"] = csc.indptr.astype(np.int64)
        m["shape"] = np.array(csc.shape, dtype=np.int32)
        features = m.create_group("features")
        features["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        features["name"] = np.array(genes, dtype="S")
        features["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        features["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        features["_all_tag_keys"] = np.array([b"genome"])


def write_space_ranger(root: Path, layout: str = "2.x", seed: int = 0) -> dict:
    """outs/ with matrix, positions (1.x or 2.x layout), scale factors, hires and lowres images, plus
    a full-resolution image beside it. Row 0 of the grid is out of tissue (not in the matrix)."""
    outs = root / "outs"
    (outs / "spatial").mkdir(parents=True)
    rows, cols = np.meshgrid(np.arange(6), np.arange(11), indexing="ij")
    on_lattice = rows % 2 == cols % 2
    rows, cols = rows[on_lattice], cols[on_lattice]
    positions = pd.DataFrame({
        "barcode": [f"SPOT{r:02d}{c:02d}-1" for r, c in zip(rows, cols)],
        "in_tissue": (rows > 0).astype(int),
        "array_row": rows,
        "array_col": cols,
        "pxl_row_in_fullres": 60.0 + rows * 50.0,
        "pxl_col_in_fullres": 60.0 + cols * 28.0,
    })
    positions_file = outs / "spatial" / ("tissue_positions.csv" if layout == "2.x" else "tissue_positions_list.csv")
    positions.to_csv(positions_file, index=False, header=layout == "2.x")
    in_tissue = positions[positions["in_tissue"] == 1]
    barcodes = in_tissue["barcode"].tolist()
    counts = np.random.default_rng(seed).poisson(2.0, (len(barcodes), 20))
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", barcodes, [f"GENE{i}" for i in range(20)], counts)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": SPOT_DIAMETER, "tissue_hires_scalef": HIRES_SCALE,
        "tissue_lowres_scalef": LOWRES_SCALE, "fiducial_diameter_fullres": 45.0,
    }))
    fullres = tissue_image(FULLRES, FULLRES, seed)
    for kind, scale in (("hires", HIRES_SCALE), ("lowres", LOWRES_SCALE)):
        side = int(round(FULLRES * scale))
        small = cv2.resize(fullres, (side, side), interpolation=cv2.INTER_AREA)
        write_png(outs / "spatial" / f"tissue_{kind}_image.png", small)
    return {
        "outs": outs, "image": write_png(root / "fullres.png", fullres), "fullres": fullres,
        "positions": positions, "positions_file": positions_file, "barcodes": barcodes,
    }


def spots_args(out: Path, kind: str, path: Path, *extra: str) -> list[str]:
    return [
        "spots", "--sample", "s1", "--donor", "d1", "--cohort", "c1", "--kind", kind, "--path", str(path),
        "--out-spots", str(out / "spots" / "s1.parquet"), "--out-patches", str(out / "patches" / "s1.zarr"),
        "--patch-factor", "1.0", "--patch-size", "64", "--grey-threshold", "210", "--min-foreground", "0.55",
        "--min-laplacian-var", "20", "--saturation-threshold", "15", "--value-threshold", "240",
        "--min-tissue", "0.30", "--exclude-labels", "Whitespace", "Mixed", "--he-spot-diameter-um", "55",
        "--he-spot-spacing-um", "100", "--he-min-tissue", "0.5", *extra,
    ]


def outputs(out: Path) -> tuple[pd.DataFrame, zarr.Group]:
    return pd.read_parquet(out / "spots" / "s1.parquet"), zarr.open_group(str(out / "patches" / "s1.zarr"), mode="r")


def centre_crop(image: np.ndarray, row: float, col: float, side: int) -> np.ndarray:
    top, left = int(np.floor(row - side / 2 + 0.5)), int(np.floor(col - side / 2 + 0.5))
    return image[top:top + side, left:left + side]


# --------------------------------------------------------------------------------------------
# Real H&E: the H&E-only path, and the metrics against the independent computation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cmu_stage(tmp_path_factory):
    if not CMU_SVS.exists():
        pytest.skip("shared/data/he is not beside this clone")
    out = tmp_path_factory.mktemp("cmu")
    assert main(spots_args(out, "he", CMU_SVS)) == 0
    return out


def test_he_pseudo_spots_form_a_visium_grid_on_tissue(cmu_stage):
    spots, store = outputs(cmu_stage)
    assert list(spots.columns) == SPOT_COLUMNS
    assert 30 < len(spots) < 187  # the grid has 187 spots; about a third of the region is tissue
    assert spots["diameter_px"].iloc[0] == pytest.approx(55 / 0.499)
    assert all(re.fullmatch(r"r\d+_c\d+", b) for b in spots["barcode"])
    assert (spots["array_row"] % 2 == spots["array_col"] % 2).all()
    assert list(spots["barcode"]) == [f"r{r}_c{c}" for r, c in zip(spots["array_row"], spots["array_col"])]
    assert list(spots["key"]) == ["s1:" + b for b in spots["barcode"]]
    by_position = spots.set_index(["array_row", "array_col"])
    pairs = [(r, c) for r, c in by_position.index if (r, c + 2) in by_position.index]
    assert pairs, "no two horizontal neighbours on tissue"
    r, c = pairs[0]
    assert by_position.loc[(r, c + 2), "pxl_col"] - by_position.loc[(r, c), "pxl_col"] == pytest.approx(100 / 0.499)
    diagonal = [(r, c) for r, c in by_position.index if (r + 1, c + 1) in by_position.index][0]
    centres = by_position[["pxl_row", "pxl_col"]]
    step = centres.loc[(diagonal[0] + 1, diagonal[1] + 1)] - centres.loc[diagonal]
    assert np.hypot(*step) == pytest.approx(100 / 0.499)

    assert store["images"].shape == (len(spots), 64, 64, 3) and store["images"].dtype == np.uint8
    assert [str(k) for k in store["spot_key"][:]] == list(spots["key"])
    assert store.attrs["stmdit"]["step"] == "spots"
    assert store.attrs["stmdit"]["params"]["min_laplacian_var"] == 20.0


def test_metrics_match_independent_computation_on_real_he(cmu_stage):
    """Crops read straight through OpenSlide at the table's positions, measured with numpy/scipy."""
    import openslide

    spots, store = outputs(cmu_stage)
    side = int(round(spots["diameter_px"].iloc[0]))
    slide = openslide.OpenSlide(str(CMU_SVS))
    images = store["images"][:]
    expected = []
    for i, spot in spots.iterrows():
        top = int(np.floor(spot["pxl_row"] - side / 2 + 0.5))
        left = int(np.floor(spot["pxl_col"] - side / 2 + 0.5))
        crop = np.asarray(slide.read_region((left, top), 0, (side, side)).convert("RGB"))
        expected.append(numpy_metrics(crop))
        if i < 5:  # the stored patch is that crop, shrunk to 64 px with INTER_AREA
            np.testing.assert_array_equal(images[i], cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA))
    expected = pd.DataFrame(expected)
    np.testing.assert_allclose(spots["foreground"], expected["foreground"], atol=2e-3)
    np.testing.assert_allclose(spots["tissue_fraction"], expected["tissue_fraction"], atol=2e-3)
    np.testing.assert_allclose(spots["laplacian_var"], expected["laplacian_var"], rtol=2e-3)
    # the metrics span the thresholds: some spots are dropped, most kept
    assert spots["keep"].sum() > len(spots) / 2 and (~spots["keep"]).any()
    assert (spots["foreground"] < FILTERS.min_foreground).any()


def test_keep_and_reason_follow_the_thresholds(cmu_stage):
    spots, _ = outputs(cmu_stage)
    fails = pd.DataFrame({
        "foreground": spots["foreground"] < 0.55,
        "blur": spots["laplacian_var"] < 20,
        "tissue": spots["tissue_fraction"] < 0.30,
    })
    first = fails.idxmax(axis=1).where(fails.any(axis=1), "")
    assert list(spots["reason"]) == list(first)
    assert list(spots["keep"]) == list(spots["reason"] == "")
    assert (spots["label"] == "").all()


def test_real_he_patches_are_stored_losslessly_in_at_most_120_kb(tmp_path):
    """At the pipeline's 256 px, every stored patch is the slide's crop, enlarged with INTER_CUBIC, bit
    for bit (read back from the store and through the encoders' reader), in at most 120 KB a patch
    (JPEG-LS: 68 KB measured; delta + zstd stored 97 KB, Blosc lz4 189 KB of these 196,608 B
    patches). Tiles of the slide at its own resolution (no enlargement: the harder case) too."""
    import openslide

    from stmdit.image_stores import iter_kept_images, read_sample_patches

    if not CMU_SVS.exists():
        pytest.skip("shared/data/he is not beside this clone")
    args = spots_args(tmp_path, "he", CMU_SVS)
    args[args.index("--patch-size") + 1] = "256"
    assert main(args) == 0
    spots, store = outputs(tmp_path)
    side = int(round(spots["diameter_px"].iloc[0]))
    slide = openslide.OpenSlide(str(CMU_SVS))
    whole = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    padded = np.pad(whole, ((side, side), (side, side), (0, 0)), constant_values=255)  # white outside
    expected = np.stack([
        cv2.resize(centre_crop(padded, row + side, col + side, side), (256, 256), interpolation=cv2.INTER_CUBIC)
        for row, col in zip(spots["pxl_row"], spots["pxl_col"])
    ])
    assert len(spots) > 30 and expected.std() > 20  # tissue, not a blank slide
    assert np.array_equal(store["images"][:], expected)
    sample = read_sample_patches(tmp_path / "spots" / "s1.parquet", tmp_path / "patches" / "s1.zarr")
    read = np.concatenate(list(iter_kept_images([sample], batch_size=20)))
    assert np.array_equal(read, expected[spots["keep"].to_numpy()])

    images_dir = tmp_path / "patches" / "s1.zarr" / "images"
    chunks = [f for f in images_dir.rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert chunks and sum(f.stat().st_size for f in chunks) / len(spots) <= 120_000
    assert json.loads((images_dir / "zarr.json").read_text())["codecs"] == [{"name": "stmdit.jpegls"}]

    # native 256 px tiles of the slide's tissue through the same codec: at most 120 KB a tile, exact
    from stmdit.patch_codec import decode_patches, encode_patches

    tiles = np.stack([whole[r:r + 256, c:c + 256] for r in range(0, whole.shape[0] - 256, 256)
                      for c in range(0, whole.shape[1] - 256, 256)])
    tiles = tiles[tiles.mean(axis=(1, 2, 3)) < 220]
    encoded = encode_patches(tiles)
    assert len(tiles) > 20 and len(encoded) / len(tiles) <= 120_000
    assert np.array_equal(decode_patches(encoded, tiles.shape), tiles)


def test_patches_stores_written_with_the_earlier_codecs_still_read(tmp_path):
    """Stores of delta + zstd (and lz4 before it) read the same pixels through the encoders' reader."""
    from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec
    from zarr.codecs.numcodecs import Delta

    from stmdit.image_stores import open_image_store

    images = np.random.default_rng(0).integers(0, 256, (5, 256, 256, 3), dtype=np.uint8)
    for name, codecs in {"delta": {"filters": [TransposeCodec(order=(0, 3, 2, 1)), Delta(dtype="|u1")],
                                   "compressors": ZstdCodec(level=5)},
                         "lz4": {"compressors": BloscCodec(cname="lz4")}}.items():
        group = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=3)
        group.create_array("images", shape=images.shape, dtype="uint8", chunks=(4, 256, 256, 3), **codecs)[:] = images
        group.create_array("spot_key", shape=(5,), dtype=str, chunks=(5,))[:] = np.array(list("abcde"), dtype=object)
        assert np.array_equal(open_image_store(tmp_path / f"{name}.zarr").read_rows(np.arange(5)), images)


# --------------------------------------------------------------------------------------------
# Filters on constructed patches
# --------------------------------------------------------------------------------------------


def test_reasons_follow_label_foreground_blur_tissue_order():
    side = 40
    tissue = tissue_image(side, side, seed=1)
    white = np.full((side, side, 3), 255, np.uint8)
    blurred = cv2.GaussianBlur(tissue, (0, 0), sigmaX=8)
    grey_texture = np.repeat(tissue_image(side, side, seed=2)[..., 1:2], 3, axis=2)  # R = G = B: no saturation
    patches = np.stack([tissue, white, blurred, grey_texture, tissue, white])
    labels = np.array(["", "", "", "", "Whitespace", "Mixed"], dtype=object)
    metrics = patch_metrics(patches, FILTERS)
    assert metrics["foreground"][2] >= FILTERS.min_foreground and metrics["tissue_fraction"][2] >= FILTERS.min_tissue
    assert metrics["foreground"][3] >= FILTERS.min_foreground
    assert metrics["laplacian_var"][3] >= FILTERS.min_laplacian_var
    assert list(filter_reasons(labels, metrics, FILTERS)) == ["", "foreground", "blur", "tissue", "label", "label"]
    for patch, got in zip(patches, pd.DataFrame(metrics).to_dict("records")):
        want = numpy_metrics(patch)
        assert got["foreground"] == pytest.approx(want["foreground"], abs=2e-3)
        assert got["tissue_fraction"] == pytest.approx(want["tissue_fraction"], abs=2e-3)
        assert got["laplacian_var"] == pytest.approx(want["laplacian_var"], rel=2e-3, abs=1e-9)


def test_crops_are_white_padded_at_the_border():
    image = tissue_image(50, 60)
    patches = crop_patches(image, np.array([0.0, 25.0, 49.0]), np.array([0.0, 30.0, 59.0]), 10)
    assert patches.shape == (3, 10, 10, 3)
    np.testing.assert_array_equal(patches[0, 5:, 5:], image[:5, :5])
    assert (patches[0, :5] == 255).all() and (patches[0, :, :5] == 255).all()
    np.testing.assert_array_equal(patches[1], image[20:30, 25:35])
    np.testing.assert_array_equal(patches[2, :6, :6], image[44:, 54:])
    assert (patches[2, 6:] == 255).all()


def test_resize_shrinks_by_area_and_enlarges_by_cubic():
    patches = tissue_image(32, 32)[None]
    shrunk, enlarged = resize_patches(patches, 16)[0], resize_patches(patches, 64)[0]
    np.testing.assert_array_equal(shrunk, cv2.resize(patches[0], (16, 16), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(enlarged, cv2.resize(patches[0], (64, 64), interpolation=cv2.INTER_CUBIC))
    assert resize_patches(patches, 32) is patches


# --------------------------------------------------------------------------------------------
# Visium slides: full-resolution image, fallbacks, labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["1.x", "2.x"])
def test_visium_with_fullres_image_and_labels(layout, tmp_path):
    folder = write_space_ranger(tmp_path / "in", layout)
    labels = tmp_path / "labels.csv"
    out_of_tissue = folder["positions"]["barcode"].iloc[0]  # known to the slide, not in tissue: allowed
    pd.DataFrame({"barcode": [folder["barcodes"][0], folder["barcodes"][1], folder["barcodes"][2], out_of_tissue],
                  "label": ["Whitespace", "Mixed", "tumor", "stroma"]}).to_csv(labels, index=False)
    out = tmp_path / "out"
    extra = ["--image", str(folder["image"]), "--labels", str(labels)]
    assert main(spots_args(out, "visium", folder["outs"], *extra)) == 0
    spots, store = outputs(out)
    assert list(spots.columns) == SPOT_COLUMNS
    assert list(spots["barcode"]) == folder["barcodes"]
    positions = folder["positions"].set_index("barcode").loc[folder["barcodes"]]
    np.testing.assert_array_equal(spots["pxl_row"], positions["pxl_row_in_fullres"])
    np.testing.assert_array_equal(spots["pxl_col"], positions["pxl_col_in_fullres"])
    np.testing.assert_array_equal(spots["array_col"], positions["array_col"])
    assert (spots["diameter_px"] == SPOT_DIAMETER).all()
    assert list(spots["label"][:4]) == ["Whitespace", "Mixed", "tumor", ""]
    assert list(spots["reason"][:3]) == ["label", "label", ""]
    assert spots["keep"].sum() == len(spots) - 2
    assert set(spots[["sample", "donor", "cohort"]].drop_duplicates().itertuples(index=False)) == {("s1", "d1", "c1")}
    side = int(SPOT_DIAMETER)
    for i in (0, 7):
        crop = centre_crop(folder["fullres"], spots["pxl_row"][i], spots["pxl_col"][i], side)
        np.testing.assert_array_equal(store["images"][i], cv2.resize(crop, (64, 64), interpolation=cv2.INTER_CUBIC))
    assert store.attrs["stmdit"]["params"]["patch_image_scale"] == 1.0


def test_visium_falls_back_to_the_hires_image_with_its_scale(tmp_path, caplog):
    folder = write_space_ranger(tmp_path / "in")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(spots_args(out, "visium", folder["outs"])) == 0
    assert "fall back" in caplog.text and "tissue_hires_image.png" in caplog.text
    spots, store = outputs(out)
    hires = cv2.cvtColor(cv2.imread(str(folder["outs"] / "spatial" / "tissue_hires_image.png")), cv2.COLOR_BGR2RGB)
    side = int(round(SPOT_DIAMETER * HIRES_SCALE))
    crop = centre_crop(hires, spots["pxl_row"][3] * HIRES_SCALE, spots["pxl_col"][3] * HIRES_SCALE, side)
    np.testing.assert_array_equal(store["images"][3], cv2.resize(crop, (64, 64), interpolation=cv2.INTER_CUBIC))
    fullres_row = folder["positions"].set_index("barcode").loc[spots["barcode"][3], "pxl_row_in_fullres"]
    assert spots["pxl_row"][3] == fullres_row  # the table stays in full-resolution pixels
    assert store.attrs["stmdit"]["params"]["patch_side_px"] == side


def test_real_folder_falls_back_to_lowres(visium_folders, tmp_path, caplog):
    folder = visium_folders["sr1"]
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main(spots_args(out, "visium", folder)) == 0
    assert "tissue_lowres_image.png" in caplog.text
    spots, store = outputs(out)
    positions = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None)
    assert set(spots["barcode"]) == set(positions[0][positions[1] == 1])
    assert store["images"].shape == (len(spots), 64, 64, 3)
    scalefactors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    assert store.attrs["stmdit"]["params"]["patch_side_px"] == round(
        scalefactors["spot_diameter_fullres"] * scalefactors["tissue_lowres_scalef"])


# --------------------------------------------------------------------------------------------
# Bad input: one error line naming the file, exit 2, nothing left in the output paths
# --------------------------------------------------------------------------------------------


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00\x01 not what it claims to be \xff" * 20)
    return path


def _damage(case: str, tmp_path: Path) -> tuple[str, Path, list[str], Path]:
    """Build a broken input; return (kind, path, extra args, the file the error must name)."""
    if case.startswith("he"):
        if case == "he_undecodable":
            return "he", _garbage(tmp_path / "slide.svs"), ["--mpp", "0.5"], tmp_path / "slide.svs"
        if case == "he_no_mpp":
            return "he", write_png(tmp_path / "slide.png", tissue_image(300, 300)), [], tmp_path / "slide.png"
        if case == "he_no_tissue":
            white = np.full((300, 300, 3), 255, np.uint8)
            return "he", write_png(tmp_path / "slide.png", white), ["--mpp", "0.5"], tmp_path / "slide.png"
    folder = write_space_ranger(tmp_path / "in")
    outs, spatial, image = folder["outs"], folder["outs"] / "spatial", ["--image", str(folder["image"])]
    matrix, scalefactors = outs / "filtered_feature_bc_matrix.h5", spatial / "scalefactors_json.json"
    positions_file = folder["positions_file"]
    positions = folder["positions"]
    if case == "matrix_missing":
        matrix.unlink()
        return "visium", outs, image, matrix
    if case == "matrix_unreadable":
        _garbage(matrix)
        return "visium", outs, image, matrix
    if case == "positions_missing":
        positions_file.unlink()
        return "visium", outs, image, positions_file
    if case == "positions_unreadable":
        positions_file.write_text("barcode,in_tissue\nAAA,one\n")
        return "visium", outs, image, positions_file
    if case == "scalefactors_missing":
        scalefactors.unlink()
        return "visium", outs, image, scalefactors
    if case == "scalefactors_unreadable":
        scalefactors.write_text('{"spot_diameter_fullres": ')
        return "visium", outs, image, scalefactors
    if case == "barcode_not_in_positions":
        positions[positions["barcode"] != folder["barcodes"][5]].to_csv(positions_file, index=False)
        return "visium", outs, image, positions_file
    if case == "barcode_not_in_tissue":
        positions.loc[positions["barcode"] == folder["barcodes"][5], "in_tissue"] = 0
        positions.to_csv(positions_file, index=False)
        return "visium", outs, image, positions_file
    if case == "spot_outside_image":
        positions.loc[positions["barcode"] == folder["barcodes"][5], "pxl_col_in_fullres"] = FULLRES + 3
        positions.to_csv(positions_file, index=False)
        return "visium", outs, image, folder["image"]
    if case == "empty_after_filtering":
        write_png(folder["image"], np.full((FULLRES, FULLRES, 3), 250, np.uint8))
        return "visium", outs, image, outs
    if case == "labels_unknown_barcode":
        labels = tmp_path / "labels.csv"
        table = pd.DataFrame({"barcode": [folder["barcodes"][0], "NOTASPOT-1"], "label": ["tumor", "stroma"]})
        table.to_csv(labels, index=False)
        return "visium", outs, [*image, "--labels", str(labels)], labels
    if case == "image_undecodable":
        return "visium", outs, ["--image", str(_garbage(tmp_path / "fullres.tif"))], tmp_path / "fullres.tif"
    if case == "lowres_fallback_undecodable":
        (spatial / "tissue_hires_image.png").unlink()
        _garbage(spatial / "tissue_lowres_image.png")
        return "visium", outs, [], spatial / "tissue_lowres_image.png"
    raise AssertionError(case)


BAD_INPUTS = [
    "matrix_missing", "matrix_unreadable", "positions_missing", "positions_unreadable", "scalefactors_missing",
    "scalefactors_unreadable", "barcode_not_in_positions", "barcode_not_in_tissue", "spot_outside_image",
    "empty_after_filtering", "labels_unknown_barcode", "image_undecodable", "lowres_fallback_undecodable",
    "he_undecodable", "he_no_mpp", "he_no_tissue",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_with_one_line_and_no_outputs(case, tmp_path, capsys):
    kind, path, extra, named = _damage(case, tmp_path)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(spots_args(out, kind, path, *extra)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert errors[0].startswith(f"stmdit spots: error: {named}: "), errors[0]
    assert not (out / "spots" / "s1.parquet").exists() and not (out / "patches" / "s1.zarr").exists()
    leftovers = [p for p in out.rglob("*")] if out.exists() else []
    assert [p for p in leftovers if p.is_file() or p.name.startswith(".")] == []


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------


def test_bench_spots_prints_rate_and_ratio(tmp_path, capsys):
    assert "spots" in BENCHMARKS
    folder = write_space_ranger(tmp_path / "in")
    assert main(["bench", "spots", "--slide", str(folder["outs"]), "--image", str(folder["image"])]) == 0
    printed = capsys.readouterr().out
    assert "patches/s" in printed and "stage / decode" in printed
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["spots"] == len(folder["barcodes"]) and result["stage_s"] > 0 and result["decode_s"] > 0
