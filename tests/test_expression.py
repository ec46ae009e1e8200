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


def build_expression_whole(cohort, spots_paths, matrix_paths, min_spots_per_gene, n_hvg, target_sum=1e4,
                           scale_max=None):
    """The former expression step, the whole cohort in memory at once (raw and normalised matrices,
    scanpy on all of X): the reference for the blocked one."""
    import scipy.sparse as sp

    from stmdit.expression import read_slide_counts
    from stmdit.spots_table import read_kept_spots

    slides = [read_slide_counts(m, read_kept_spots(s)) for s, m in zip(spots_paths, matrix_paths)]
    adata = ad.concat(slides, join="outer", merge="first", fill_value=0)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.obs["cohort"] = cohort
    sc.pp.filter_genes(adata, min_cells=min_spots_per_gene)
    adata.layers["counts"] = sp.csr_matrix(adata.X, dtype=np.int32)
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_hvg, batch_key="sample", layer="counts",
                                subset=False)
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    order = adata.var.loc[adata.var_names[adata.var["highly_variable"]], "highly_variable_rank"] \
        .sort_values(kind="stable").index
    hvg = adata[:, order].copy()
    hvg.X = hvg.X.toarray()
    sc.pp.scale(hvg, max_value=scale_max)
    adata.obsm["hvg_scaled"] = np.asarray(hvg.X, dtype=np.float32)
    adata.var["mean"] = np.nan
    adata.var["std"] = np.nan
    adata.var.loc[order, "mean"] = hvg.var["mean"].to_numpy()
    adata.var.loc[order, "std"] = hvg.var["std"].to_numpy()
    return adata, np.asarray(order, dtype=str)


def assert_same_sparse(got, expected):
    got, expected = got.tocsr(), expected.tocsr()
    got.sort_indices(), expected.sort_indices()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.data, expected.data)


def test_blocked_expression_equals_the_whole_cohort_in_memory(two_slide_cohort, monkeypatch, tmp_path):
    """X normalised in blocks of rows from the int32 counts (and streamed into the h5ad), the HVG
    block filled block by block: X, counts, hvg_scaled, var mean/std and the HVG order are
    bit-identical to the former whole-cohort computation."""
    from stmdit import expression

    _, spots_paths, matrix = two_slide_cohort
    expected, order = build_expression_whole("c", spots_paths, [matrix, matrix], 10, 500)
    monkeypatch.setattr(expression, "EXPRESSION_BLOCK_ROWS", 97)  # several blocks, the last one short
    in_memory = expression.build_expression("c", spots_paths, [matrix, matrix], 10, 500)
    out = tmp_path / "c.h5ad"
    assert main(["expression", "--cohort", "c", "--spots", *map(str, spots_paths), "--matrices", str(matrix),
                 str(matrix), "--out", str(out), "--n-hvg", "500", "--protein-coding", "none"]) == 0
    assert expected.n_obs > 3 * 97
    for got in (in_memory, ad.read_h5ad(out)):
        assert_same_sparse(got.X, expected.X)
        assert_same_sparse(got.layers["counts"], expected.layers["counts"])
        np.testing.assert_array_equal(got.obsm["hvg_scaled"], expected.obsm["hvg_scaled"])
        np.testing.assert_array_equal(got.uns["hvg_genes"], order)
        assert list(got.obs_names) == list(expected.obs_names)
        for column in ("n_cells", "highly_variable", "highly_variable_rank", "mean", "std"):
            np.testing.assert_array_equal(got.var[column].to_numpy(), expected.var[column].to_numpy())
            assert got.var[column].dtype == expected.var[column].dtype


def test_slides_with_different_genes_stack_as_anndata_concat_does():
    """union_columns + stack_rows (no second copy of the counts) give anndata's outer-join concat."""
    import scipy.sparse as sp

    from stmdit.expression import stack_rows, union_columns

    rng = np.random.default_rng(2)
    slides = []
    for seed, genes in enumerate((["g1", "g3", "g2"], ["g2", "g4", "g1"], ["g1", "g2", "g3"])):
        counts = sp.random(4 + seed, len(genes), density=0.6, format="csr", random_state=rng, dtype=np.float32)
        slides.append(ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"s{seed}:{i}" for i in range(4 + seed)]),
                                 var=pd.DataFrame(index=genes)))
    expected = ad.concat(slides, join="outer", merge="first", fill_value=0)
    pieces = [union_columns(s.X, s.var_names, expected.var_names) for s in slides]
    stacked = stack_rows(pieces)
    assert pieces == [] and stacked.shape == expected.shape
    np.testing.assert_array_equal(stacked.toarray(), expected.X.toarray())


def test_obs_var_and_uns_are_read_without_the_matrices(two_slide_cohort, tmp_path):
    """read_h5ad_elements gives the obs, var and uns that anndata's backed mode gives (which also
    loads layers["counts"] and obsm); a missing or damaged file is one InputError naming it."""
    from stmdit.errors import InputError
    from stmdit.expression import read_cohort_obs, read_h5ad_elements

    out, _, _ = two_slide_cohort
    backed = ad.read_h5ad(out, backed="r")
    obs, var, uns = read_h5ad_elements(out, "obs", "var", "uns")
    pd.testing.assert_frame_equal(obs, backed.obs)
    pd.testing.assert_frame_equal(var, backed.var)
    assert sorted(uns) == sorted(backed.uns) and uns["stmdit"]["step"] == backed.uns["stmdit"]["step"] == "expression"
    np.testing.assert_array_equal(uns["hvg_genes"], backed.uns["hvg_genes"])
    assert list(read_cohort_obs(out).index) == list(backed.obs_names.astype(str))
    backed.file.close()
    with pytest.raises(InputError, match="expression file not found"):
        read_h5ad_elements(tmp_path / "absent.h5ad", "obs")
    (tmp_path / "damaged.h5ad").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="cannot read h5ad"):
        read_cohort_obs(tmp_path / "damaged.h5ad")
