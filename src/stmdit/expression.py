"""Per-cohort expression (paper Appendix A.2).

Kept spots of all slides of a cohort are concatenated; genes seen in fewer than
`min_spots_per_gene` spots are dropped; `n_hvg` highly variable genes are selected with scanpy's
`seurat_v3` on raw counts with `batch_key="sample"`; counts are normalised to `target_sum`,
log1p-transformed and scaled. Genes are flagged protein-coding from a gene list (stmdit.genesets:
the bundled HGNC list, a user's file, or none).

Layout of `results/expression/{cohort}.h5ad`:
- obs index: spot key; obs columns sample, donor, cohort, barcode, label
- var index: gene symbol; var gene_ids, n_cells, highly_variable, highly_variable_rank, mean, std,
  protein_coding (when a list is given)
- layers["counts"]: raw counts (CSR, int32), all kept genes
- X: log1p of counts normalised to `target_sum` (CSR float32), all kept genes; what DeepSpot and
  the Midnight regressor use
- obsm["hvg_scaled"]: the scaled (zero mean, unit variance, optional clip) log1p values of the HVGs
  only, dense float32, columns in `uns["hvg_genes"]` order (a dense scaled copy of every gene would
  not fit in memory at paper scale)
- obsm["spatial"]: (x, y) = (pxl_col, pxl_row) full-resolution pixels, scanpy's convention
- uns["stmdit"]: provenance; uns["gene_sets"]["protein_coding"]: the list's source, version, sha256
  and gene count, and how many of the cohort's genes (and HVGs) are in it (also --gene-sets-json)
"""

from __future__ import annotations

import argparse
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stmdit.errors import InputError
from stmdit.genesets import BUNDLED, NONE, GeneList, annotate_cohort, load_gene_list
from stmdit.memory import release_freed_memory
from stmdit.provenance import atomic_path, provenance, write_json
from stmdit.spots_table import read_kept_spots

log = logging.getLogger(__name__)


def read_cohort_h5ad(path: str | Path, *, counts: bool = True) -> ad.AnnData:
    """A cohort h5ad (expression or PTPL), InputError naming it when missing, unreadable, or (with
    `counts`) without raw counts in layers["counts"]."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "expression file not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a damaged file
        raise InputError(path, f"cannot read h5ad: {exc}") from None
    if counts and "counts" not in adata.layers:
        raise InputError(path, 'no raw counts: layers["counts"] is missing')
    return adata


def read_h5ad_elements(path: str | Path, *names: str) -> list:
    """Top-level elements of an h5ad (obs, var, uns), read alone: anndata's backed mode would load
    layers and obsm (the whole counts matrix) too. A missing uns reads as {}."""
    import h5py
    from anndata.io import read_elem

    path = Path(path)
    if not path.exists():
        raise InputError(path, "expression file not found")
    try:
        with h5py.File(path, "r") as handle:
            return [read_elem(handle[name]) if name in handle or name != "uns" else {} for name in names]
    except Exception as exc:  # h5py/anndata raise many types for a damaged file
        raise InputError(path, f"cannot read h5ad: {exc}") from None


def read_cohort_obs(path: str | Path) -> pd.DataFrame:
    """obs of a cohort h5ad, read without loading the matrices; index = spot keys (str)."""
    (obs,) = read_h5ad_elements(path, "obs")
    obs.index = obs.index.astype(str)
    return obs


def read_slide_counts(matrix_path: str | Path, spots: pd.DataFrame) -> ad.AnnData:
    """Raw counts of the kept spots of one slide, rows in the order of `spots`."""
    import scanpy as sc

    matrix_path = Path(matrix_path)
    if not matrix_path.exists():
        raise InputError(matrix_path, "count matrix not found")
    if matrix_path.suffix == ".h5ad":  # a HEST sample's st/{id}.h5ad
        from stmdit.hest import read_counts

        counts = read_counts(matrix_path)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                counts = sc.read_10x_h5(matrix_path)
        except Exception as exc:  # h5py/scanpy raise many types for a damaged file
            raise InputError(matrix_path, f"cannot read 10x HDF5 matrix: {exc}") from None
    counts.var_names_make_unique()
    missing = ~spots["barcode"].isin(counts.obs_names)
    if missing.any():
        raise InputError(
            matrix_path,
            f"{int(missing.sum())} kept spot barcode(s) are not in the matrix, e.g. {spots['barcode'][missing].iloc[0]}",
        )
    counts = counts[spots["barcode"].to_numpy()].copy()
    counts.obs_names = spots["key"].to_numpy()
    for column in ("sample", "donor", "cohort", "barcode", "label"):
        if column in spots:
            counts.obs[column] = spots[column].astype(str).to_numpy()
    counts.obsm["spatial"] = spots[["pxl_col", "pxl_row"]].to_numpy(dtype=np.float64)
    counts.X = sp.csr_matrix(counts.X, dtype=np.float32)
    return counts


EXPRESSION_BLOCK_ROWS = 4096


@dataclass
class CohortExpression:
    """A cohort's expression before X: `adata` has everything of the h5ad but X (None); X is
    log1p(normalise_total(`source`)) row by row, computed in blocks (`x_blocks`) so that the
    cohort never holds raw and normalised matrices at once. `source` is layers["counts"] (int32),
    or the float counts themselves when they are not whole numbers."""

    adata: ad.AnnData
    source: sp.csr_matrix
    target_sum: float

    def x_blocks(self, block_rows: int | None = None) -> Iterator[sp.csr_matrix]:
        block_rows = block_rows or EXPRESSION_BLOCK_ROWS
        for start in range(0, self.source.shape[0], block_rows):
            yield normalised_log1p(self.source[start : start + block_rows], self.target_sum)

    def x(self) -> sp.csr_matrix:
        blocks = list(self.x_blocks())
        return blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")


def normalised_log1p(counts: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    """scanpy's normalize_total(target_sum) then log1p of float32 `counts`, as CSR float32: per row,
    so a block of rows gets the values those rows get in the whole matrix."""
    import scanpy as sc

    block = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32))
    sc.pp.normalize_total(block, target_sum=target_sum)
    sc.pp.log1p(block)
    return sp.csr_matrix(block.X, dtype=np.float32)


def union_columns(piece: sp.csr_matrix, genes: pd.Index, union: pd.Index) -> sp.csr_matrix:
    """A slide's counts with its columns placed among the cohort's genes (anndata's outer join:
    genes the slide lacks count 0)."""
    if genes.equals(union):
        return piece
    return sp.csr_matrix((piece.data, union.get_indexer(genes)[piece.indices], piece.indptr),
                         shape=(piece.shape[0], len(union)))


def stack_rows(pieces: list[sp.csr_matrix]) -> sp.csr_matrix:
    """The pieces' rows one under the other, emptying `pieces` as they are copied: the result's
    pages are written piece by piece, so the pieces and the result are never both resident."""
    n_rows, nnz, n_columns = sum(p.shape[0] for p in pieces), sum(p.nnz for p in pieces), pieces[0].shape[1]
    index = np.int32 if max(nnz, n_columns) < 2**31 - 1 else np.int64
    data, indices = np.empty(nnz, pieces[0].dtype), np.empty(nnz, index)
    indptr = np.zeros(n_rows + 1, index)
    row = at = 0
    while pieces:
        piece = pieces.pop(0)
        data[at : at + piece.nnz] = piece.data
        indices[at : at + piece.nnz] = piece.indices
        indptr[row + 1 : row + 1 + piece.shape[0]] = piece.indptr[1:] + at
        row, at = row + piece.shape[0], at + piece.nnz
        del piece
    return sp.csr_matrix((data, indices, indptr), shape=(n_rows, n_columns))


def build_expression(*args: Any, **kwargs: Any) -> ad.AnnData:
    """The cohort's expression AnnData with X in memory: `cohort_expression(*args, **kwargs)`, then X."""
    expression = cohort_expression(*args, **kwargs)
    expression.adata.X = expression.x()
    return expression.adata


def read_cohort_slides(cohort: str, spots_paths: list[str | Path],
                       matrix_paths: list[str | Path]) -> tuple[ad.AnnData, list[sp.csr_matrix]]:
    """The kept spots of every slide: obs/var/obsm joined on the union of genes (X empty), and each
    slide's counts apart, on the union's columns (stacked later without a second copy)."""
    if len(spots_paths) != len(matrix_paths):
        raise ValueError("one count matrix per spots table is needed")
    slides, pieces = [], []
    for spots_path, matrix_path in zip(spots_paths, matrix_paths):
        spots = read_kept_spots(spots_path)
        if spots.empty:
            log.warning("%s: no kept spots, slide contributes nothing", spots_path)
            continue
        slide = read_slide_counts(matrix_path, spots)
        pieces.append(slide.X)
        slide.X = None
        slides.append(slide)
        release_freed_memory()  # the whole matrix read for this slide, freed: back to the system
        log.info("read %s: %d kept spots x %d genes", matrix_path, slide.n_obs, slide.n_vars)
    if not slides:
        raise InputError(spots_paths[0], f"cohort {cohort!r} has no kept spots")
    if len({tuple(s.var_names) for s in slides}) > 1:
        log.warning("slides have different gene lists: taking their union, absent genes count 0")
    adata = ad.concat(slides, join="outer", merge="first", fill_value=0)
    pieces = [union_columns(piece, slide.var_names, adata.var_names) for piece, slide in zip(pieces, slides)]
    adata.obs["cohort"] = cohort
    return adata, pieces


def drop_rare_genes(adata: ad.AnnData, pieces: list[sp.csr_matrix], min_spots_per_gene: int, cohort: str,
                    source: str | Path) -> ad.AnnData:
    """scanpy's filter_genes(min_cells): genes with a positive count in fewer spots are dropped, from
    `adata` (returned) and from `pieces` in place, one slide at a time (var["n_cells"] keeps the count)."""
    n_before = adata.n_vars
    n_cells = sum(np.bincount(piece.indices[piece.data > 0], minlength=n_before).astype(np.int64) for piece in pieces)
    keep = n_cells >= min_spots_per_gene
    adata.var["n_cells"] = n_cells
    if not keep.all():
        adata = adata[:, keep].copy()
        for i in range(len(pieces)):
            pieces[i] = pieces[i][:, keep]
    log.info("kept %d of %d genes seen in >= %d spots", adata.n_vars, n_before, min_spots_per_gene)
    if adata.n_vars == 0:
        raise InputError(source, f"no gene is detected in >= {min_spots_per_gene} spots of cohort {cohort!r}")
    return adata


def add_scaled_hvgs(expression: CohortExpression, scale_max: float | None) -> pd.Index:
    """obsm["hvg_scaled"]: the HVGs' log1p values scaled per gene (columns in HVG rank order, in
    uns["hvg_genes"]; var mean/std their moments), filled block by block; returns the HVGs in order."""
    import scanpy as sc

    adata = expression.adata
    hvg_genes = adata.var_names[adata.var["highly_variable"]]
    order = adata.var.loc[hvg_genes, "highly_variable_rank"].sort_values(kind="stable").index
    columns = adata.var_names.get_indexer(order)
    dense = np.empty((adata.n_obs, len(order)), dtype=np.float32)  # the HVGs' log1p values, then scaled
    start = 0
    for block in expression.x_blocks():
        dense[start : start + block.shape[0]] = block[:, columns].toarray()
        start += block.shape[0]
    hvg = ad.AnnData(X=dense, var=pd.DataFrame(index=order))
    sc.pp.scale(hvg, max_value=scale_max)
    adata.obsm["hvg_scaled"] = np.asarray(hvg.X, dtype=np.float32)
    adata.uns["hvg_genes"] = np.asarray(order, dtype=str)
    adata.var["mean"] = np.nan
    adata.var["std"] = np.nan
    adata.var.loc[order, "mean"] = hvg.var["mean"].to_numpy()
    adata.var.loc[order, "std"] = hvg.var["std"].to_numpy()
    return order


def cohort_expression(
    cohort: str,
    spots_paths: list[str | Path],
    matrix_paths: list[str | Path],
    min_spots_per_gene: int = 10,
    n_hvg: int = 3000,
    target_sum: float = 1e4,
    scale_max: float | None = None,
    protein_coding: GeneList | None = None,
) -> CohortExpression:
    import scanpy as sc

    adata, pieces = read_cohort_slides(cohort, spots_paths, matrix_paths)
    adata = drop_rare_genes(adata, pieces, min_spots_per_gene, cohort, matrix_paths[0])
    # X is normalised from the int32 counts when they hold the float32 values exactly (whole counts),
    # else from the float32 values, kept beside the counts
    if all(np.array_equal(piece.data, piece.data.astype(np.int32)) for piece in pieces):
        for i in range(len(pieces)):
            pieces[i] = sp.csr_matrix(pieces[i], dtype=np.int32)
        source = adata.layers["counts"] = stack_rows(pieces)
        release_freed_memory()
    else:
        source = stack_rows(pieces)
        adata.layers["counts"] = sp.csr_matrix(source, dtype=np.int32)
    gene_sets = {}
    if protein_coding is not None:  # before the HVGs: a list of another species stops here
        gene_ids = adata.var["gene_ids"].astype(str).to_numpy() if "gene_ids" in adata.var else None
        mask, gene_sets["protein_coding"] = annotate_cohort(adata.var_names, gene_ids, None, protein_coding, cohort,
                                                            matrix_paths[0])
        adata.var["protein_coding"] = mask

    n_top = min(n_hvg, adata.n_vars)
    if n_top < n_hvg:
        log.warning("only %d genes left: selecting all of them as HVGs instead of %d", n_top, n_hvg)
    sc.pp.highly_variable_genes(
        adata, flavor="seurat_v3", n_top_genes=n_top, batch_key="sample", layer="counts", subset=False
    )
    expression = CohortExpression(adata, source, target_sum)
    order = add_scaled_hvgs(expression, scale_max)
    adata.uns.pop("log1p", None)
    adata.uns.pop("hvg", None)
    if gene_sets:
        record = gene_sets["protein_coding"]
        record["hvgs"] = int(len(order))
        record["protein_coding_hvgs"] = int(adata.var.loc[order, "protein_coding"].sum())
        log.info("%d of the %d HVGs are protein-coding", record["protein_coding_hvgs"], record["hvgs"])
        adata.uns["gene_sets"] = gene_sets
    log.info("cohort %s: %d spots x %d genes, %d HVGs", cohort, adata.n_obs, adata.n_vars, len(order))
    return expression


def write_expression_h5ad(expression: CohortExpression, path: Path) -> None:
    """The h5ad of `expression`: everything but X through anndata, then X appended block by block
    (one block of normalised rows in memory at a time)."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    expression.adata.write_h5ad(path)
    with h5py.File(path, "a") as handle:
        blocks = expression.x_blocks()
        first = next(blocks)
        if expression.source.nnz >= 2**31 - 1:  # room for all non-zeros once appended (scipy wants one index dtype)
            first.indptr, first.indices = first.indptr.astype(np.int64), first.indices.astype(np.int64)
        write_elem(handle, "X", first)
        stored = sparse_dataset(handle["X"])
        for block in blocks:
            stored.append(block)


def run(args: argparse.Namespace) -> None:
    params = {
        "cohort": args.cohort,
        "min_spots_per_gene": args.min_spots_per_gene,
        "n_hvg": args.n_hvg,
        "target_sum": args.target_sum,
        "scale_max": args.scale_max,
        "protein_coding": args.protein_coding,
    }
    expression = cohort_expression(
        args.cohort, args.spots, args.matrices, args.min_spots_per_gene, args.n_hvg, args.target_sum, args.scale_max,
        protein_coding=load_gene_list(args.protein_coding),
    )
    adata = expression.adata
    # h5ad cannot store None: record an unset clip as the string "none"
    recorded = {k: ("none" if v is None else v) for k, v in params.items()}
    gene_list = [] if args.protein_coding in (BUNDLED, NONE) else [args.protein_coding]
    adata.uns["stmdit"] = provenance("expression", recorded, [*args.spots, *args.matrices, *gene_list])
    with atomic_path(args.out) as tmp:
        write_expression_h5ad(expression, tmp.with_suffix(".h5ad"))
        tmp.with_suffix(".h5ad").rename(tmp)
    log.info("wrote %s", args.out)
    if args.gene_sets_json is not None:
        write_json(args.gene_sets_json, {"stmdit": adata.uns["stmdit"], "cohort": args.cohort,
                                         "gene_sets": adata.uns.get("gene_sets", {})})
        log.info("wrote %s", args.gene_sets_json)


def _optional_float(value: str) -> float | None:
    return None if value.lower() in ("none", "null", "") else float(value)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("expression", help="per-cohort expression: gene filter, seurat_v3 HVGs, normalise, scale")
    p.add_argument("--cohort", required=True)
    p.add_argument("--spots", nargs="+", required=True, type=Path, help="results/spots/{sample}.parquet, sheet order")
    p.add_argument("--matrices", nargs="+", required=True, type=Path, help="filtered_feature_bc_matrix.h5 (or a HEST st/{id}.h5ad), same order")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--min-spots-per-gene", type=int, default=10)
    p.add_argument("--n-hvg", type=int, default=3000)
    p.add_argument("--target-sum", type=float, default=1e4)
    p.add_argument("--scale-max", type=_optional_float, default=None)
    p.add_argument("--protein-coding", default="hgnc",
                   help="protein-coding gene list: hgnc (bundled HGNC list, human), a file, or none (stmdit.genesets)")
    p.add_argument("--gene-sets-json", type=Path, help="also write the gene-set counts and provenance to this JSON")
    p.set_defaults(func=run)
