"""Expression stage on a real Visium matrix (shared/data), checked against direct computations."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from stmdit.cli import main


@pytest.fixture(scope="module")
def two_slide_cohort(visium_folders, tmp_path_factory):
    """The real SR1 muscle matrix presented as two slides (halves of its spots) of two donors."""
    folder = visium_folders["sr1"]
    tmp = tmp_path_factory.mktemp("expr")
    positions = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None,
                            names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"])
    positions = positions[positions["in_tissue"] == 1].reset_index(drop=True)
    halves = {"s1": positions.iloc[::2], "s2": positions.iloc[1::2]}
    spots_paths = []
    for i, (sample, part) in enumerate(halves.items()):
        spots = pd.DataFrame({
            "key": sample + ":" + part["barcode"], "sample": sample, "donor": f"d{i}", "cohort": "c",
            "barcode": part["barcode"], "pxl_row": part["pxl_row"], "pxl_col": part["pxl_col"],
            "label": "", "keep": np.arange(len(part)) % 7 != 0,
        })
        path = tmp / f"{sample}.parquet"
        spots.to_parquet(path)
        spots_paths.append(path)
    matrix = folder / "filtered_feature_bc_matrix.h5"
    out = tmp / "c.h5ad"
    code = main(["expression", "--cohort", "c", "--spots", *map(str, spots_paths), "--matrices", str(matrix),
                 str(matrix), "--out", str(out), "--n-hvg", "500", "--min-spots-per-gene", "10",
                 "--protein-coding", "none"])  # a mouse matrix: see test_genesets for the lists
    assert code == 0
    return out, spots_paths, matrix


def test_rows_are_kept_spots_in_cohort_order(two_slide_cohort):
    out, spots_paths, _ = two_slide_cohort
    adata = ad.read_h5ad(out)
    kept = pd.concat([pd.read_parquet(p) for p in spots_paths])
    kept = kept[kept["keep"]]
    assert list(adata.obs_names) == list(kept["key"])
    assert list(adata.obs["sample"]) == list(kept["sample"])
    np.testing.assert_array_equal(adata.obsm["spatial"], kept[["pxl_col", "pxl_row"]].to_numpy())
    assert adata.uns["stmdit"]["step"] == "expression"


def test_counts_filter_and_normalisation_match_direct_computation(two_slide_cohort):
    out, spots_paths, matrix = two_slide_cohort
    adata = ad.read_h5ad(out)
    raw = sc.read_10x_h5(matrix)
    raw.var_names_make_unique()
    barcodes = adata.obs["barcode"].to_numpy()
    raw = raw[barcodes]
    detected = np.asarray((raw.X > 0).sum(axis=0)).ravel()
    expected_genes = raw.var_names[detected >= 10]
    assert list(adata.var_names) == list(expected_genes)
    counts = raw[:, expected_genes].X.toarray()
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), counts)
    totals = counts.sum(axis=1, keepdims=True)
    expected_log = np.log1p(counts / totals * 1e4)
    np.testing.assert_allclose(adata.X.toarray(), expected_log, rtol=1e-5, atol=1e-5)


def test_hvgs_and_scaling(two_slide_cohort):
    out, *_ = two_slide_cohort
    adata = ad.read_h5ad(out)
    assert adata.var["highly_variable"].sum() == 500
    genes = list(adata.uns["hvg_genes"])
    ranks = adata.var.loc[genes, "highly_variable_rank"].to_numpy()
    assert np.all(np.diff(ranks) >= 0)
    scaled = adata.obsm["hvg_scaled"]
    assert scaled.shape == (adata.n_obs, 500)
    direct = adata[:, genes].X.toarray()
    std = direct.std(axis=0, ddof=1)
    expected = (direct - direct.mean(axis=0)) / np.where(std == 0, 1, std)
    np.testing.assert_allclose(scaled, expected, atol=1e-3)
