"""The embedded demo cohort: complete Space Ranger folders, deterministic, counts coupled to morphology."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from stmdit.demo import PROGRAMS, build_demo, gene_panel, morphology_scores, standardised
from stmdit.errors import InputError
from stmdit.visium import read_rgb_image, read_space_ranger

REPO = Path(__file__).resolve().parents[1]
ROOT = "results/resources/demo"
REGION_PX = 1600  # the end-to-end tests' cohort (tests/e2e/); `make demo` uses whole-image slides


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "demo.json"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, demo_image):
    work = tmp_path_factory.mktemp("demo")
    sheet = work / "samples.tsv"
    shutil.copy(REPO / "tests" / "e2e" / "samples.tsv", sheet)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        build_demo(sheet, demo_image, seed=0, n_genes=600, region_px=REGION_PX)
    finally:
        os.chdir(cwd)
    return work


def test_every_sheet_file_exists_and_layouts_alternate(demo):
    sheet = pd.read_csv(demo / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    for _, row in sheet.iterrows():
        assert (demo / row["path"]).exists()
        if row["kind"] != "visium":
            continue
        for name in ("filtered_feature_bc_matrix.h5", "spatial/scalefactors_json.json",
                     "spatial/tissue_hires_image.png", "spatial/tissue_lowres_image.png"):
            assert (demo / row["path"] / name).exists(), name
    layouts = [
        "1.x" if (demo / p / "spatial" / "tissue_positions_list.csv").exists() else "2.x"
        for p in sheet.loc[sheet["kind"] == "visium", "path"]
    ]
    assert {"1.x", "2.x"} == set(layouts)
    assert sheet.loc[sheet["kind"] == "visium", "donor"].nunique() >= 3 and (sheet["kind"] == "visium").sum() >= 6


def test_same_seed_same_files(demo, tmp_path, demo_image, monkeypatch):
    shutil.copy(demo / "samples.tsv", tmp_path / "samples.tsv")
    monkeypatch.chdir(tmp_path)
    build_demo(tmp_path / "samples.tsv", demo_image, seed=0, n_genes=600, region_px=REGION_PX)
    assert _digest(tmp_path / ROOT) == _digest(demo / ROOT)


def test_folder_reads_like_space_ranger_and_counts_follow_morphology(demo):
    outs = demo / ROOT / "demo_A1" / "outs"
    adata = read_space_ranger(outs, image=demo / ROOT / "demo_A1" / "image.tif")
    assert adata.n_vars == 600 and list(adata.var_names[:3]) == ["MLANA", "PMEL", "TYR"]
    direct = sc.read_10x_h5(outs / "filtered_feature_bc_matrix.h5")
    np.testing.assert_array_equal(direct.X.toarray(), adata.X.toarray())
    # Visium geometry at 0.499 um/px: 55 um spots, neighbours 100 um apart
    factors = adata.uns["spatial"][next(iter(adata.uns["spatial"]))]["scalefactors"]
    assert factors["spot_diameter_fullres"] == pytest.approx(55 / 0.499)
    xy = adata.obsm["spatial"]
    nearest = np.sort(np.linalg.norm(xy[:, None] - xy[None], axis=-1), axis=1)[:, 1]
    assert np.median(nearest) == pytest.approx(100 / 0.499, rel=0.01)

    image = read_rgb_image(demo / ROOT / "demo_A1" / "image.tif")
    spots = pd.DataFrame({"pxl_row": xy[:, 1], "pxl_col": xy[:, 0]})
    z = standardised(morphology_scores(image, spots, factors["spot_diameter_fullres"]))
    counts = adata.X.toarray()
    cp10k = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    stroma = [adata.var_names.get_loc(g) for g in PROGRAMS["stroma"][1]]
    r = np.corrcoef(cp10k[:, stroma].mean(1), z["eosin"])[0, 1]
    assert r > 0.5, r


def test_labels_cover_the_classes(demo):
    labels = pd.concat([pd.read_csv(p) for p in (demo / ROOT).glob("*/labels.csv")])
    assert {"Tumor", "Stroma", "Immune", "Whitespace"} <= set(labels["label"])


def test_panel_is_checked():
    assert len(gene_panel(600)) == 600 and len(set(gene_panel(600))) == 600
    with pytest.raises(ValueError, match="n_genes"):
        gene_panel(10_000)


def test_sheet_without_demo_rows_is_an_error(tmp_path, demo_image):
    sheet = tmp_path / "s.tsv"
    sheet.write_text("sample\tdonor\tcohort\tkind\tpath\nA\td\tc\tvisium\t/data/A/outs\n")
    with pytest.raises(InputError, match="no sample-sheet row"):
        build_demo(sheet, demo_image, seed=0, n_genes=600)
