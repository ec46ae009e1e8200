"""HEST-1k samples (kind hest): written from the real Space Ranger folders of shared/data in HEST's
layout (tests/hest_format.py), they must ingest to the spots the Space Ranger folder gives."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from hest_format import lattice_pairs, write_hest_sample, write_pseudo_spot_sample
from stmdit import cli, hest
from stmdit.config import check_cohorts, expression_cohorts, load_sample_sheet
from stmdit.deepspot import hex_neighbour_index
from stmdit.errors import InputError
from stmdit.expression import read_slide_counts
from stmdit.spots import run_spots
from stmdit.visium import TiledSlide, open_image


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory, visium_folders) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hest")
    written = {name: write_hest_sample(outs, root, name.upper()) for name, outs in visium_folders.items()}
    return root, written


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, hest_root, visium_folders) -> dict:
    """Spots tables of every folder, read as HEST and as Space Ranger (lowres fallback)."""
    root, _ = hest_root
    out = tmp_path_factory.mktemp("spots")
    tables = {}
    for name, outs in visium_folders.items():
        sample = name.upper()
        tables[name] = (
            run_spots(sample, "d", "c", "hest", root, out / f"{sample}_hest.parquet", out / f"{sample}_hest.zarr"),
            run_spots(sample, "d", "c", "visium", outs, out / f"{sample}_sr.parquet", out / f"{sample}_sr.zarr"),
        )
    return tables


@pytest.mark.parametrize("name", ["sr1", "sr3"])
def test_a_hest_sample_ingests_to_the_space_ranger_spots(name, ingested, hest_root):
    from_hest, from_sr = ingested[name]
    scale = hest_root[1][name]["scale"]
    um_per_px = hest_root[1][name]["um_per_px"]
    assert list(from_hest["barcode"]) == list(from_sr["barcode"]) and len(from_hest) > 900
    # coordinates: HEST's are px of its WSI (the lowres image), Space Ranger's full-resolution px
    np.testing.assert_allclose(from_hest["pxl_row"], from_sr["pxl_row"] * scale, rtol=1e-12)
    np.testing.assert_allclose(from_hest["pxl_col"], from_sr["pxl_col"] * scale, rtol=1e-12)
    assert (from_hest[["array_row", "array_col"]].to_numpy() == from_sr[["array_row", "array_col"]].to_numpy()).all()
    # diameters agree in um: HEST's the 65 um spot Space Ranger's spot_diameter_fullres measures
    hest_um = from_hest["diameter_px"].iloc[0] * um_per_px
    sr_um = from_sr["diameter_px"].iloc[0] * scale * um_per_px
    assert hest_um == pytest.approx(65.0) and sr_um == pytest.approx(hest_um, rel=1e-9)
    # the same pixels, so the same filter metrics and keep decisions
    for column in ("foreground", "laplacian_var", "tissue_fraction", "keep", "reason"):
        assert (from_hest[column].to_numpy() == from_sr[column].to_numpy()).all(), column
    assert 0 < from_hest["keep"].sum() < len(from_hest)
    # the HEST WSI is a tiled pyramid OpenSlide reads in blocks, not an image decoded whole
    wsi = open_image(hest.sample_files(hest_root[0], name.upper())["wsi"])
    assert isinstance(wsi, TiledSlide) and len(wsi.level_dimensions) > 1
    wsi.close()


@pytest.mark.parametrize("name", ["sr1", "sr3"])
def test_a_hest_sample_has_the_space_ranger_counts(name, ingested, hest_root, visium_folders):
    from_hest, from_sr = ingested[name]
    root = hest_root[0]
    kept = from_hest[from_hest["keep"]].reset_index(drop=True)
    a = read_slide_counts(hest.counts_path(root, name.upper()), kept)
    b = read_slide_counts(visium_folders[name] / "filtered_feature_bc_matrix.h5", kept)
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    assert (a.X != b.X).nnz == 0 and a.X.sum() > 0


def hest_pixel_size(written: dict, rows: np.ndarray, cols: np.ndarray) -> float:
    """HEST's estimate of um/px: 100 um per step of 2 array columns along a row (written here from the
    definition, not from stmdit)."""
    x, y = written["x"], written["y"]
    steps = []
    for row in np.unique(rows):
        on_row = np.flatnonzero(rows == row)
        if len(on_row) > 1:
            a, b = on_row[np.argmin(cols[on_row])], on_row[np.argmax(cols[on_row])]
            steps.append(np.hypot(x[b] - x[a], y[b] - y[a]) / ((cols[b] - cols[a]) / 2))
    return 100.0 / float(np.median(steps))


@pytest.mark.parametrize("name, sr_diameter_um", [("sr1", 65.1), ("sr3", 70.0)])
def test_with_hest_s_pixel_size_spots_are_100_um_apart_and_patches_65_um(name, sr_diameter_um, visium_folders,
                                                                           tmp_path, ingested, hest_root, caplog):
    """HEST's own um/px (from the spacing): same spots, spacing 100 um, patches around a 65 um spot, and
    Space Ranger's spot_diameter_fullres measures 65 (70 in the CytAssist folder) um against it."""
    written = hest_root[1][name]
    from_sr = ingested[name][1]
    um_per_px = hest_pixel_size(written, from_sr["array_row"].to_numpy(), from_sr["array_col"].to_numpy())
    write_hest_sample(visium_folders[name], tmp_path, "HESTPX", pixel_size_um_estimated=um_per_px,
                      pixel_size_um_embedded=None)
    with caplog.at_level(logging.WARNING):
        sample = hest.read_hest_sample(tmp_path, "HESTPX")
    assert "is the pixel size right" not in caplog.text
    assert list(sample.spots["barcode"]) == list(from_sr["barcode"])
    pitch_um = hest.centre_pitch(sample.spots[["pxl_col", "pxl_row"]].to_numpy(), "x") * um_per_px
    assert pitch_um == pytest.approx(100.0, rel=0.02)
    assert sample.diameter_px * um_per_px == pytest.approx(65.0)
    assert from_sr["diameter_px"].iloc[0] * written["scale"] * um_per_px == pytest.approx(sr_diameter_um, rel=0.02)
    # a pixel size 20% off puts the centres 120 um apart: a warning
    write_hest_sample(visium_folders[name], tmp_path, "WRONGPX", pixel_size_um_estimated=1.2 * um_per_px,
                      pixel_size_um_embedded=None)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        hest.read_hest_sample(tmp_path, "WRONGPX")
    assert "not inter_spot_dist 100 um: is the pixel size right?" in caplog.text


@pytest.mark.parametrize("name", ["sr1", "sr3"])
def test_without_array_columns_the_lattice_comes_from_the_centres(name, visium_folders, tmp_path, hest_root, caplog):
    written = write_hest_sample(visium_folders[name], tmp_path, "NOLAT", lattice=False)
    with caplog.at_level(logging.WARNING):
        derived = hest.read_hest_sample(tmp_path, "NOLAT")
    assert "lattice derived from the spot centres (hex packing" in caplog.text
    original = hest.read_hest_sample(hest_root[0], name.upper())
    assert list(derived.spots["barcode"]) == list(original.spots["barcode"]) == written["barcodes"]
    truth = lattice_pairs(original.spots["array_row"].to_numpy(), original.spots["array_col"].to_numpy())
    found = lattice_pairs(derived.spots["array_row"].to_numpy(), derived.spots["array_col"].to_numpy())
    assert len(truth) > 2 * len(original.spots) and found == truth


@pytest.mark.parametrize("technology, side_um", [("Xenium", 100.0), ("Visium HD", 128.0)])
def test_pseudo_spots_are_squares_measured_from_their_centres(technology, side_um, visium_folders, tmp_path, caplog):
    written = write_pseudo_spot_sample(visium_folders["sr1"], tmp_path, "PSEUDO", technology, side_um)
    with caplog.at_level(logging.INFO):
        table = run_spots("PSEUDO", "d", "c", "hest", tmp_path, tmp_path / "p.parquet", tmp_path / "p.zarr")
    assert f"{technology} pseudo-spots: squares of {side_um:.1f} um measured from the spot centres" in caplog.text
    assert list(table["barcode"]) == written["barcodes"]
    assert table["diameter_px"].iloc[0] == pytest.approx(written["side_px"], rel=1e-9)
    # a square grid becomes offset columns: DeepSpot's hex neighbours are its 4 sides (+ 2 diagonals)
    assert (table["array_col"] == 2 * written["array_col"] + written["array_row"] % 2).all()
    neighbours = hex_neighbour_index(table["sample"], table["array_row"], table["array_col"])
    site = {(r, c): i for i, (r, c) in enumerate(zip(written["array_row"], written["array_col"]))}
    for i, (r, c) in enumerate(zip(written["array_row"], written["array_col"])):
        sides = {site[s] for s in ((r, c - 1), (r, c + 1), (r - 1, c), (r + 1, c)) if s in site}
        assert sides <= set(neighbours[i].tolist()), (r, c)


def test_a_differing_embedded_pixel_size_is_a_warning(visium_folders, tmp_path, caplog):
    written = write_hest_sample(visium_folders["sr1"], tmp_path, "EMB", pixel_size_um_embedded=None)
    meta_path = tmp_path / "metadata" / "EMB.json"
    meta = json.loads(meta_path.read_text())
    with caplog.at_level(logging.WARNING):
        hest.read_hest_sample(tmp_path, "EMB")
        assert "pixel_size_um_embedded" not in caplog.text
        meta_path.write_text(json.dumps({**meta, "pixel_size_um_embedded": written["um_per_px"] * 1.08}))
        hest.read_hest_sample(tmp_path, "EMB")
        assert "pixel_size_um_embedded" not in caplog.text
        meta_path.write_text(json.dumps({**meta, "pixel_size_um_embedded": written["um_per_px"] * 1.2}))
        sample = hest.read_hest_sample(tmp_path, "EMB")
    estimated = written["um_per_px"]
    assert (f"pixel_size_um_embedded {1.2 * estimated:.4g} differs from pixel_size_um_estimated {estimated:.4g} by 20%"
            in caplog.text)
    assert sample.um_per_px == written["um_per_px"]


# --------------------------------------------------------------------------------------------
# Bad input: one line naming the file and the field, no output
# --------------------------------------------------------------------------------------------


def spots_cli(root: Path, sample: str, out: Path, capsys) -> tuple[int, str]:
    code = cli.main(["spots", "--sample", sample, "--donor", "d", "--cohort", "c", "--kind", "hest", "--path",
                     str(root), "--out-spots", str(out / "s.parquet"), "--out-patches", str(out / "p.zarr")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    return code, lines[0] if len(lines) == 1 else err


BAD_SAMPLES = {
    "non-integer counts": (dict(counts_scale=0.5), "st/BAD.h5ad: X must hold counts (non-negative integers), found 127.5 at spot 'AAACATTTCCCGGATT-1'"),
    "negative counts": (dict(counts_scale=-1.0), "st/BAD.h5ad: X must hold counts (non-negative integers), found -255 at spot 'AAACATTTCCCGGATT-1'"),
    "spots outside": (dict(shift_px=5000.0), 'st/BAD.h5ad: obsm["spatial"]: 982 spot centre(s) lie outside'),
    "no pixel size": (dict(pixel_size_um_estimated=None),
                      "metadata/BAD.json: pixel_size_um_estimated must be a positive number, found None"),
    "zero pixel size": (dict(pixel_size_um_estimated=0), "metadata/BAD.json: pixel_size_um_estimated must be a positive number, found 0"),
    "negative pixel size": (dict(pixel_size_um_estimated=-0.5),
                            "metadata/BAD.json: pixel_size_um_estimated must be a positive number, found -0.5"),
    "text pixel size": (dict(pixel_size_um_estimated="n/a"),
                        "metadata/BAD.json: pixel_size_um_estimated must be a positive number, found 'n/a'"),
    "no WSI": (dict(image=False), "wsis/BAD.tif: HEST wsi file not found"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_hest_input_stops_with_one_line_and_no_output(case, visium_folders, tmp_path, capsys):
    overrides, message = BAD_SAMPLES[case]
    root = tmp_path / "root"
    write_hest_sample(visium_folders["sr1"], root, "BAD", **overrides)
    code, line = spots_cli(root, "BAD", tmp_path, capsys)
    assert code == 2 and message in line, line
    assert not (tmp_path / "s.parquet").exists() and not (tmp_path / "p.zarr").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


@pytest.mark.parametrize("missing", ["st", "metadata"])
def test_a_missing_hest_file_is_named(missing, visium_folders, tmp_path, capsys):
    root = tmp_path / "root"
    write_hest_sample(visium_folders["sr1"], root, "GONE")
    files = hest.sample_files(root, "GONE")
    files[missing].unlink()
    code, line = spots_cli(root, "GONE", tmp_path, capsys)
    assert code == 2 and f"{files[missing]}: HEST {missing} file not found" in line, line
    code, line = spots_cli(root, "ABSENT", tmp_path, capsys)
    assert code == 2 and "metadata/ABSENT.json: HEST metadata file not found" in line


def test_pseudo_spot_technologies_need_no_metadata_geometry_but_spots_do(visium_folders, tmp_path):
    write_hest_sample(visium_folders["sr1"], tmp_path, "ST1", st_technology="Spatial Transcriptomics",
                      spot_diameter=None)
    with pytest.raises(InputError, match=r"ST1.json: spot_diameter must be a positive number of um for Spatial"):
        hest.read_hest_sample(tmp_path, "ST1")
    write_hest_sample(visium_folders["sr1"], tmp_path, "NOTECH", st_technology=None)
    assert hest.read_hest_sample(tmp_path, "NOTECH").diameter_px * hest.read_hest_sample(tmp_path, "NOTECH").um_per_px == 55
    write_hest_sample(visium_folders["sr1"], tmp_path, "NOGEOM", st_technology=None, inter_spot_dist=None)
    with pytest.raises(InputError, match=r"NOGEOM.json: inter_spot_dist must be a positive number of um for unknown"):
        hest.read_hest_sample(tmp_path, "NOGEOM")


# --------------------------------------------------------------------------------------------
# The sample sheet
# --------------------------------------------------------------------------------------------


def test_the_sheet_takes_hest_rows_beside_space_ranger_ones(tmp_path):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("sample\tdonor\tcohort\tkind\tpath\n"
                     "TENX95\tp2\thest\thest\t/data/hest\n"
                     "A1\td1\tmixed\tvisium\t/data/A1/outs\n"
                     "NCBI759\tp3\tmixed\thest\t/data/hest\n"
                     "H1\td4\the\the\t/data/h1.svs\n")
    loaded = load_sample_sheet(sheet)
    check_cohorts(loaded, sheet)
    assert expression_cohorts(loaded) == ["hest", "mixed"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("sample\tdonor\tcohort\tkind\tpath\tmpp\nTENX95\tp2\thest\thest\t/data/hest\t0.5\n")
    with pytest.raises(InputError, match="line 2: image/mpp columns are not for kind=hest samples"):
        load_sample_sheet(bad)
    bad.write_text("sample\tdonor\tcohort\tkind\tpath\nTENX95\tp2\tc\thest\t/data/hest\nH1\td\tc\the\t/x.svs\n")
    with pytest.raises(InputError, match=r"cohort 'c' mixes slide kinds \['he', 'hest'\]"):
        check_cohorts(load_sample_sheet(bad), bad)


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_counts_are_checked_block_by_block_and_the_spot_named(layout, tmp_path, monkeypatch):
    import anndata as ad

    counts = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    counts[33, 4] = 2.5  # in the 6th block of 6 rows
    X = counts if layout == "dense" else sp.csr_matrix(counts)
    ad.AnnData(X=X, obs=pd.DataFrame(index=[f"spot{i}" for i in range(40)])).write_h5ad(tmp_path / "x.h5ad")
    monkeypatch.setattr(hest, "COUNT_BLOCK_VALUES", 36)
    backed = hest.open_st(tmp_path / "x.h5ad")
    with pytest.raises(InputError, match=r"x.h5ad: X must hold counts \(non-negative integers\), found 2.5 at spot 'spot33'"):
        hest.check_counts(backed, tmp_path / "x.h5ad")
    backed.file.close()


@pytest.mark.parametrize("degrees", [0.0, 9.0, -25.0])
def test_a_derived_lattice_survives_a_rotated_slide(degrees, hest_root):
    """Centres of a real Visium slide turned by `degrees` (a slide scanned askew): the derived
    lattice finds the same hexagonal neighbours; a square grid (pseudo-spots) its 4 sides."""
    sample = hest.read_hest_sample(hest_root[0], "SR1")
    centres = sample.spots[["pxl_col", "pxl_row"]].to_numpy()
    turn = np.deg2rad(degrees)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    rows, cols, packing, _ = hest.derive_lattice(centres @ rotation.T, "x")
    truth = lattice_pairs(sample.spots["array_row"].to_numpy(), sample.spots["array_col"].to_numpy())
    assert packing == "hex" and lattice_pairs(rows, cols) == truth

    grid_rows, grid_cols = np.divmod(np.arange(20 * 15), 15)
    square = np.column_stack([grid_cols * 9.0, grid_rows * 9.0]) @ rotation.T + 500
    rows, cols, packing, pitch = hest.derive_lattice(square, "x")
    offset = 2 * grid_cols + grid_rows % 2  # what obs array_row/array_col of a square grid become
    assert packing == "square" and pitch == pytest.approx(9.0)
    assert lattice_pairs(rows, cols) == lattice_pairs(grid_rows, offset)
