"""DeepSpot's regression targets: log1p(CP10k) of the target genes, held as compact counts.

The cohort's raw counts of the target genes are kept as they are stored (integers in uint16, or
uint32 past 65,535; anything else in its own float dtype), their column in uint16 (int32 past 65,536
genes), and one float64 CP10k scale per spot: 4 bytes per non-zero for typical counts, against 8 for
CSR float32 values with int32 indices. A batch of rows is turned into log1p(count * scale) in float64,
then float32: the same operations, in the same order, as `log1p_cp10k` on the whole matrix, so the
targets a batch sees are bit-identical to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from stmdit.errors import InputError
from stmdit.genesets import protein_coding_columns
from stmdit.h5ad_rows import H5adRows

log = logging.getLogger(__name__)

TARGET_SUM = 1e4
PROTEIN_CODING, HVG = "protein_coding", "hvg"
TARGET_GENE_SETS = (PROTEIN_CODING, HVG)
TARGET_BLOCK_ROWS = 4096  # spots of raw counts read at a time
MAX_BYTES_PER_NONZERO = 8  # float32 or uint32 counts + int32 columns: the most a target non-zero takes


def log1p_cp10k(counts, columns: np.ndarray, target_sum: float = TARGET_SUM) -> sp.csr_matrix:
    """log1p of counts[:, columns] per `target_sum` counts of the spot's library (all genes), CSR
    float32. Row by row, so a block of spots gives the rows of the whole matrix bit for bit."""
    counts = sp.csr_matrix(counts)
    selected = sp.csr_matrix(sp.diags(cp10k_scale(counts, target_sum)) @ counts[:, columns].astype(np.float64))
    selected.data = np.log1p(selected.data)
    return selected.astype(np.float32)


def cp10k_scale(counts: sp.csr_matrix, target_sum: float = TARGET_SUM) -> np.ndarray:
    """target_sum / library size of each row (0 for an empty row), float64."""
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    return np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0)


def compact_value_dtype(values: np.ndarray) -> np.dtype:
    """The smallest dtype that holds `values` exactly: uint16 or uint32 for non-negative integers,
    else the values' own dtype."""
    if values.size == 0:
        return np.dtype(np.uint16)
    if values.dtype.kind in "iu" or np.array_equal(values, np.floor(values)):
        top = values.max()
        if values.min() >= 0 and top <= np.iinfo(np.uint16).max:
            return np.dtype(np.uint16)
        if values.min() >= 0 and top <= np.iinfo(np.uint32).max:
            return np.dtype(np.uint32)
    return values.dtype


class TargetRows:
    """(spots x genes) log1p(CP10k) targets, stored as compact counts (see the module doc). Indexing
    with an array of rows gives those rows as CSR float32; only they are ever expanded."""

    dtype = np.dtype(np.float32)

    def __init__(self, capacity: int, n_columns: int, target_sum: float = TARGET_SUM):
        self.values = np.empty(capacity, dtype=np.uint16)
        column_dtype = np.uint16 if n_columns <= np.iinfo(np.uint16).max + 1 else np.int32
        self.columns = np.empty(capacity, dtype=column_dtype)
        self._indptr = [np.zeros(1, dtype=np.int64)]
        self._scales: list[np.ndarray] = []
        self.n_columns, self.filled, self.target_sum = n_columns, 0, target_sum
        self.indptr = self.scale = None

    def append(self, counts: sp.csr_matrix, columns: np.ndarray) -> None:
        """Add the rows of `counts` (all genes): their library sizes and the target columns."""
        counts = sp.csr_matrix(counts)
        self._scales.append(cp10k_scale(counts, self.target_sum))
        block = counts[:, columns]
        wanted = np.promote_types(self.values.dtype, compact_value_dtype(block.data))
        if wanted != self.values.dtype:  # a count past uint16, or non-integer counts: widen once
            self.values = self.values.astype(wanted)
        stop = self.filled + block.nnz
        self.values[self.filled:stop] = block.data
        self.columns[self.filled:stop] = block.indices
        self._indptr.append(block.indptr[1:].astype(np.int64) + self.filled)
        self.filled = stop

    def finish(self) -> "TargetRows":
        """Release the unused capacity and fix the row index."""
        self.values.resize(self.filled, refcheck=False)  # realloc: shrinks in place
        self.columns.resize(self.filled, refcheck=False)
        self.indptr = np.concatenate(self._indptr)
        self.scale = np.concatenate(self._scales) if self._scales else np.zeros(0)
        self._indptr = self._scales = None
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.indptr) - 1, self.n_columns)

    @property
    def nnz(self) -> int:
        return int(self.filled)

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.columns.nbytes + self.indptr.nbytes + self.scale.nbytes)

    def __getitem__(self, index) -> sp.csr_matrix:
        if isinstance(index, tuple):  # (rows, columns)
            rows, columns = index
            if isinstance(columns, slice) and columns.step in (None, 1):
                start, stop, _ = columns.indices(self.n_columns)
                return self._rows(rows, start, stop)
            return self._rows(rows)[:, columns]
        return self._rows(index)

    def _rows(self, rows, start: int = 0, stop: int | None = None) -> sp.csr_matrix:
        """Rows `rows`, columns start:stop, as CSR float32; only their non-zeros are expanded."""
        stop = self.n_columns if stop is None else stop
        rows = np.arange(self.shape[0])[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        starts, lengths = self.indptr[rows], np.diff(self.indptr)[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
        columns = self.columns[gather]
        row_of = np.repeat(np.arange(len(rows)), lengths)
        if (start, stop) != (0, self.n_columns):
            inside = (columns >= start) & (columns < stop)
            gather, columns, row_of = gather[inside], columns[inside] - start, row_of[inside]
        values = self.values[gather].astype(np.float64) * self.scale[rows][row_of]
        data = np.log1p(values).astype(np.float32)
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of, minlength=len(rows)), out=indptr[1:])
        return sp.csr_matrix((data, columns.astype(np.int32), indptr), shape=(len(rows), stop - start))

    def toarray(self) -> np.ndarray:
        return self[np.arange(self.shape[0])].toarray()


def target_rows(targets, rows: np.ndarray) -> np.ndarray:
    """Dense float32 targets of the spots `rows` (only these rows are densified)."""
    block = targets[np.asarray(rows, dtype=np.int64)]
    return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32)


@dataclass
class TrainingCohort:
    """The Visium cohort DeepSpot learns from: spot keys, their donors, the target genes and the
    targets (N, G) log1p(CP10k) as `TargetRows`: a batch expands only its own rows."""

    path: Path
    keys: list[str]
    donors: np.ndarray
    genes: pd.DataFrame  # index gene symbol; highly_variable, highly_variable_rank (and gene_ids when present)
    targets: TargetRows
    gene_set: dict[str, Any]  # which gene set the targets are, its source and counts


def read_training_cohort(path: str | Path, genes: str = PROTEIN_CODING,
                         block_rows: int = TARGET_BLOCK_ROWS) -> TrainingCohort:
    """The targets: every protein-coding gene of the cohort (var["protein_coding"], paper A.2) in the
    file's gene order, or with genes="hvg" the HVGs in highly_variable_rank order. The raw counts are
    read `block_rows` spots at a time; the targets stay compact (see `TargetRows`)."""
    path = Path(path)
    if genes not in TARGET_GENE_SETS:
        raise InputError(None, f"--genes must be one of {list(TARGET_GENE_SETS)}, got {genes!r}")
    with H5adRows(path) as h5ad:
        if not h5ad.has("layers/counts"):
            raise InputError(path, 'no raw counts: layers["counts"] is missing')
        obs, var = h5ad.obs, h5ad.var
        if "highly_variable" not in var:
            raise InputError(path, 'var["highly_variable"] is missing (the PTPL genes carry the HVG flags)')
        if "donor" not in obs:
            raise InputError(path, 'obs["donor"] is missing (leave-one-donor-out needs it)')
        if not obs.index.is_unique:
            raise InputError(path, "spot keys (obs names) are not unique")
        hv = var["highly_variable"].to_numpy(dtype=bool)
        if "highly_variable_rank" in var:
            ranks = var["highly_variable_rank"].to_numpy(dtype=np.float64)
        else:
            ranks = np.arange(len(var), dtype=np.float64)
        if genes == HVG:
            flagged = np.flatnonzero(hv)
            if flagged.size == 0:
                raise InputError(path, "no gene is flagged highly_variable: nothing to predict")
            columns = flagged[np.argsort(ranks[flagged], kind="stable")]
            gene_set = {"name": HVG}
        else:
            columns, gene_set = protein_coding_columns(var, h5ad.uns, path, "train DeepSpot on --genes hvg")
        targets = TargetRows(h5ad.stored_values("layers/counts"), columns.size)
        for _, counts in h5ad.iter_rows("layers/counts", block_rows):
            if counts.data.size and (not np.isfinite(counts.data).all() or counts.data.min() < 0):
                raise InputError(path, 'layers["counts"] has negative or non-finite values: raw counts expected')
            targets.append(counts, columns)
        targets.finish()
    table = pd.DataFrame({"highly_variable": hv[columns], "highly_variable_rank": np.where(hv, ranks, np.nan)[columns]},
                         index=var.index[columns].astype(str))
    if "gene_ids" in var:
        table["gene_ids"] = var["gene_ids"].to_numpy()[columns].astype(str)
    gene_set.update(n_genes=int(columns.size), n_hvgs=int(hv[columns].sum()), hvgs_not_predicted=int(hv.sum() - hv[columns].sum()))
    donors = obs["donor"].astype(str).to_numpy()
    log.info("read %s: %d spots of %d donors, %d target genes (%s, first %s); %d of the %d HVGs among them; "
             "targets held as %s counts + %s columns, %d non-zeros (%.2f GB)", path, len(obs), len(set(donors)),
             len(columns), genes, list(table.index[:3]), int(hv[columns].sum()), int(hv.sum()),
             targets.values.dtype, targets.columns.dtype, targets.nnz, targets.nbytes / 1e9)
    return TrainingCohort(path, [str(k) for k in obs.index], donors, table, targets, gene_set)
