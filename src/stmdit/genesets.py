"""Protein-coding genes: the gene set of the Midnight+MLP regressor (paper D.4, 19,338 genes) and of
DeepSpot's pseudo-labels (A.2).

Where the list comes from (config key `gene_sets.protein_coding`, CLI `--protein-coding`):
- `hgnc`: the list bundled with stmdit, `data/hgnc_protein_coding.tsv.gz`: HGNC approved symbols
  of locus type "gene with protein product", with HGNC and Ensembl gene ids. HGNC data are CC0. The
  header of the file says which HGNC export it was derived from and that file's sha256.
- a path: an HGNC export (the complete set, columns symbol / locus_group or locus_type / status
  [/ ensembl_gene_id], or a custom download, columns Approved symbol / Locus type / Status
  [/ Ensembl gene ID]) filtered here to approved protein-coding genes; or a plain list, one symbol
  per line (lines starting with # are comments), every symbol taken as protein-coding. A plain
  list is how a non-human cohort gets its own (e.g. MGI's mouse protein-coding genes).
- `none`: no annotation.

A cohort gene is protein-coding when its symbol is in the list or its Ensembl gene id
(var["gene_ids"], version suffix dropped) is. The bundled list is human: a mouse cohort's symbols
("Gapdh") are not HGNC symbols ("GAPDH"). When fewer than MIN_MATCH_FRACTION of a cohort's genes
are in the list, the list is for another species (or another naming) and the step stops with an
error naming the cohort's matrix; it never returns a near-empty gene set.

Regenerate the bundled list from a newer HGNC export:
    python -m stmdit.genesets --hgnc hgnc_complete_set.txt --source "HGNC complete set ..." \
        --version 2026-01-06 --out src/stmdit/data/hgnc_protein_coding.tsv.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from stmdit.errors import InputError

log = logging.getLogger(__name__)

BUNDLED = "hgnc"
NONE = "none"
BUNDLED_FILE = "data/hgnc_protein_coding.tsv.gz"
MIN_MATCH_FRACTION = 0.1
PAPER_PROTEIN_CODING_GENES = 19338  # paper, Appendix D.4

# HGNC column names: complete set (hgnc_complete_set.txt) -> custom download (genenames.org)
HGNC_COLUMNS = {
    "symbol": ("symbol", "Approved symbol"),
    "status": ("status", "Status"),
    "locus_group": ("locus_group", "Locus group"),
    "locus_type": ("locus_type", "Locus type"),
    "hgnc_id": ("hgnc_id", "HGNC ID"),
    "ensembl_gene_id": ("ensembl_gene_id", "Ensembl gene ID", "Ensembl ID(supplied by Ensembl)"),
}
PROTEIN_CODING_GROUP = "protein-coding gene"
PROTEIN_CODING_TYPE = "gene with protein product"


@dataclass(frozen=True)
class GeneList:
    """A protein-coding gene list and where it came from."""

    symbols: frozenset[str]
    ensembl_ids: frozenset[str]
    source: str
    version: str
    path: str
    sha256: str
    meta: dict[str, str] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        return {"source": self.source, "version": self.version, "path": self.path, "sha256": self.sha256,
                "list_genes": len(self.symbols), **{f"list_{k}": v for k, v in self.meta.items()}}


def plain(value: Any) -> Any:
    """h5ad/numpy values as plain Python (JSON-ready)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def protein_coding_columns(var: pd.DataFrame, uns: Any, path: str | Path, what: str) -> tuple[np.ndarray, dict]:
    """Columns flagged var["protein_coding"] and the record of the list they came from (uns["gene_sets"])."""
    if "protein_coding" not in var:
        raise InputError(path, f'var["protein_coding"] is missing: the expression step ran without a protein-coding '
                               f"list (config gene_sets.protein_coding); give one, or {what}")
    columns = np.flatnonzero(var["protein_coding"].to_numpy(dtype=bool))
    if columns.size == 0:
        raise InputError(path, "no gene is flagged protein_coding")
    recorded = plain(dict((uns.get("gene_sets") or {}).get("protein_coding") or {}))
    return columns, {"name": "protein_coding", **recorded, "n_genes": int(columns.size)}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _strip_version(gene_id: str) -> str:
    return gene_id.split(".", 1)[0] if gene_id.startswith("ENS") else gene_id


def _header_comments(text: str) -> dict[str, str]:
    """`# key: value` lines at the top of a list file."""
    meta = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].partition(":")
        if sep:
            meta[key.strip()] = value.strip()
    return meta


def hgnc_protein_coding(table: pd.DataFrame, source: str | Path) -> pd.DataFrame:
    """Approved protein-coding genes of an HGNC export: columns symbol, hgnc_id, ensembl_gene_id."""
    found = {}
    for name, candidates in HGNC_COLUMNS.items():
        found[name] = next((c for c in candidates if c in table.columns), None)
    if found["symbol"] is None or (found["locus_group"] is None and found["locus_type"] is None):
        raise InputError(source, "not an HGNC export: needs a symbol column (symbol / Approved symbol) and a locus "
                                 "group or type column (locus_group / Locus type)")
    if found["locus_group"] is not None:
        coding = table[found["locus_group"]] == PROTEIN_CODING_GROUP
    else:
        coding = table[found["locus_type"]] == PROTEIN_CODING_TYPE
    if found["status"] is not None:
        coding &= table[found["status"]] == "Approved"
    picked = table[coding]
    out = pd.DataFrame({"symbol": picked[found["symbol"]].astype(str).to_numpy()})
    for name in ("hgnc_id", "ensembl_gene_id"):
        out[name] = picked[found[name]].astype(str).to_numpy() if found[name] is not None else ""
    out = out[out["symbol"] != ""].drop_duplicates("symbol").reset_index(drop=True)
    if out.empty:
        raise InputError(source, "no approved protein-coding gene in this HGNC export")
    return out


def _read_text(path: Path) -> tuple[str, bytes]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read gene list: {exc.strerror}") from None
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    try:
        return data.decode("utf-8"), raw
    except UnicodeDecodeError:
        raise InputError(path, "gene list is not UTF-8 text") from None


def read_gene_list(path: str | Path) -> GeneList:
    """A list file: the bundled format, an HGNC export, or one symbol per line (see the module docstring)."""
    path = Path(path)
    text, raw = _read_text(path)
    meta = _header_comments(text)
    body = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not body:
        raise InputError(path, "the gene list is empty")
    if "\t" in body[0]:
        try:
            table = pd.read_csv(io.StringIO("\n".join(body)), sep="\t", dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as exc:
            raise InputError(path, f"cannot parse the gene list as TSV: {exc}") from None
        locus_columns = {*HGNC_COLUMNS["locus_group"], *HGNC_COLUMNS["locus_type"]}
        if locus_columns & set(table.columns):
            genes = hgnc_protein_coding(table, path)
        elif "symbol" in table.columns:  # the bundled format: filtered already
            genes = table.reindex(columns=["symbol", "hgnc_id", "ensembl_gene_id"], fill_value="")
        else:
            raise InputError(path, "a TSV gene list needs a symbol column (and a locus type column for an HGNC export)")
    else:
        genes = pd.DataFrame({"symbol": [line.strip() for line in body], "hgnc_id": "", "ensembl_gene_id": ""})
    symbols = frozenset(genes["symbol"])
    ensembl = frozenset(_strip_version(g) for g in genes["ensembl_gene_id"] if g)
    declared = meta.pop("genes", None)
    if declared is not None and declared != str(len(symbols)):
        raise InputError(path, f"the header declares {declared} genes, the file lists {len(symbols)}: truncated?")
    source = meta.pop("source", f"file {path}")
    version = meta.pop("version", f"sha256:{_sha256(raw)[:12]}")
    return GeneList(symbols, ensembl, source, version, str(path), _sha256(raw), meta)


def bundled_path() -> Path:
    return Path(str(resources.files("stmdit").joinpath(BUNDLED_FILE)))


def load_gene_list(spec: str | Path) -> GeneList | None:
    """`hgnc` (the bundled list), `none` (None) or a path."""
    if str(spec) == NONE:
        return None
    if str(spec) == BUNDLED:
        return read_gene_list(bundled_path())
    return read_gene_list(spec)


def protein_coding_mask(var_names: Sequence[str], gene_ids: Sequence[str] | None,
                        genes: GeneList) -> tuple[np.ndarray, dict[str, int]]:
    """Which cohort genes are in the list (by symbol, else by Ensembl id), and how many by each."""
    names = np.asarray(var_names, dtype=object).astype(str)
    by_symbol = np.fromiter((n in genes.symbols for n in names), dtype=bool, count=names.size)
    by_id = np.zeros_like(by_symbol)
    if gene_ids is not None and genes.ensembl_ids:
        ids = [_strip_version(str(g)) for g in gene_ids]
        by_id = np.fromiter((g in genes.ensembl_ids for g in ids), dtype=bool, count=names.size)
    mask = by_symbol | by_id
    return mask, {"by_symbol": int(by_symbol.sum()), "by_ensembl_id_only": int((by_id & ~by_symbol).sum())}


def annotate_cohort(var_names: Sequence[str], gene_ids: Sequence[str] | None, highly_variable: Sequence[bool] | None,
                    genes: GeneList, cohort: str, source: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The protein-coding mask of a cohort's genes and the record of it (list provenance and counts).
    InputError naming `source` (the cohort's data) when the list does not fit the cohort's species."""
    mask, matched = protein_coding_mask(var_names, gene_ids, genes)
    n, k = len(mask), int(mask.sum())
    fraction = k / n if n else 0.0
    if fraction < MIN_MATCH_FRACTION:
        examples = ", ".join(repr(str(g)) for g in list(var_names)[:3])
        raise InputError(source, f"only {k} of the {n} genes of cohort {cohort!r} ({fraction:.1%}) are in the "
                                 f"protein-coding list {genes.source} ({genes.path}); the cohort's genes ({examples}, "
                                 "...) look like another species or naming. Give a protein-coding list for this "
                                 "species (config gene_sets.protein_coding: PATH), or gene_sets.protein_coding: none "
                                 "with gene_sets.midnight_mlp: all and gene_sets.deepspot: hvg")
    record = {**genes.provenance(), "cohort": cohort, "cohort_genes": n, "protein_coding": k,
              "fraction": round(fraction, 6), **matched}
    if highly_variable is not None:
        hv = np.asarray(highly_variable, dtype=bool)
        record["hvgs"] = int(hv.sum())
        record["protein_coding_hvgs"] = int((hv & mask).sum())
    log.info("cohort %s: %d of %d genes (%.1f%%) are protein-coding in %s, version %s (%d genes in the list; "
             "%d matched by symbol, %d by Ensembl id only)%s", cohort, k, n, 100 * fraction, genes.source,
             genes.version, len(genes.symbols), matched["by_symbol"], matched["by_ensembl_id_only"],
             f"; {record['protein_coding_hvgs']} of the {record['hvgs']} HVGs" if highly_variable is not None else "")
    return mask, record


def write_bundled_list(hgnc_path: str | Path, out: str | Path, source: str, version: str) -> int:
    """Write the bundled list format (gzip TSV with `# key: value` header) from an HGNC export."""
    hgnc_path = Path(hgnc_path)
    text, raw = _read_text(hgnc_path)
    table = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False)
    genes = hgnc_protein_coding(table, hgnc_path).sort_values("symbol", kind="stable")
    header = [
        f"# source: {source}",
        f"# version: {version}",
        "# licence: HGNC data are CC0 (https://www.genenames.org/about/)",
        "# filter: Status == Approved and locus type 'gene with protein product' (locus group 'protein-coding gene')",
        f"# derived_from: {hgnc_path.name} sha256 {_sha256(raw)}",
        f"# genes: {len(genes)}",
    ]
    body = genes.to_csv(sep="\t", index=False, lineterminator="\n")
    payload = ("\n".join(header) + "\n" + body).encode()
    Path(out).write_bytes(gzip.compress(payload, mtime=0))
    return len(genes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the bundled protein-coding list from an HGNC export")
    parser.add_argument("--hgnc", required=True, type=Path, help="HGNC export (TSV)")
    parser.add_argument("--source", required=True, help="where the export came from (recorded in the list)")
    parser.add_argument("--version", required=True, help="its release or date (recorded in the list)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    n = write_bundled_list(args.hgnc, args.out, args.source, args.version)
    print(f"wrote {args.out}: {n} protein-coding genes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
