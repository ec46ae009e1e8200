"""Row blocks of h5ad files: read a matrix (X or a layer) a block of spots at a time, and write an
h5ad whose X (dense float32) and layers (CSR float32) are filled a block at a time, so no job holds
a whole spots x genes matrix. The files stay plain h5ad: `anndata.read_h5ad` opens them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from stmdit.errors import InputError
from stmdit.provenance import atomic_path

# target bytes of one stored chunk of the dense X (rows x all genes)
X_CHUNK_BYTES = 4 << 20
# values per stored chunk of a CSR layer's data, indices and indptr (h5py's guess for an empty array is tiny)
SPARSE_CHUNK_VALUES = 1 << 18
LAYER_ROWS = 128  # rows of a block converted to CSR and appended at a time


class H5adRows:
    """An h5ad opened read-only: obs, var and uns in memory, matrices read by row blocks."""

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise InputError(self.path, "expression file not found")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(self.path, f"cannot read h5ad: {exc}") from None
        self._cache: dict[str, Any] = {}

    def __enter__(self) -> "H5adRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    def _element(self, key: str) -> Any:
        from anndata.io import read_elem

        if key not in self._cache:
            if key not in self.file:
                raise InputError(self.path, f"h5ad has no {key}")
            try:
                self._cache[key] = read_elem(self.file[key])
            except Exception as exc:  # anndata raises many types for a damaged element
                raise InputError(self.path, f"cannot read {key} of the h5ad: {exc}") from None
        return self._cache[key]

    @property
    def obs(self) -> pd.DataFrame:
        return self._element("obs")

    @property
    def var(self) -> pd.DataFrame:
        return self._element("var")

    @property
    def uns(self) -> Mapping[str, Any]:
        return self._element("uns") if "uns" in self.file else {}

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    def has(self, matrix: str) -> bool:
        return matrix in self.file

    def _matrix(self, matrix: str):
        """The h5py dataset (dense) or anndata's backed sparse dataset of `matrix` ("X", "layers/counts")."""
        import h5py
        from anndata.io import sparse_dataset

        if matrix not in self.file:
            raise InputError(self.path, f"h5ad has no {matrix}")
        element = self.file[matrix]
        if isinstance(element, h5py.Dataset):
            return element
        try:
            return sparse_dataset(element)
        except Exception as exc:
            raise InputError(self.path, f"{matrix} is neither a dense nor a sparse matrix: {exc}") from None

    def shape(self, matrix: str) -> tuple[int, int]:
        return tuple(int(n) for n in self._matrix(matrix).shape)

    def stored_values(self, matrix: str) -> int:
        """Values stored for `matrix`: its non-zeros (sparse) or every cell (dense)."""
        import h5py

        element = self.file[matrix]
        if isinstance(element, h5py.Dataset):
            return int(np.prod(element.shape))
        return int(element["data"].shape[0])

    def rows(self, matrix: str, start: int, stop: int) -> sp.csr_matrix:
        """Rows start:stop of `matrix` as CSR, in the stored dtype."""
        values = self._matrix(matrix)[start:stop]
        return values if sp.issparse(values) and values.format == "csr" else sp.csr_matrix(values)

    def iter_rows(self, matrix: str, block_rows: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first row, CSR block) of `matrix`, `block_rows` rows at a time, in row order."""
        n = self.shape(matrix)[0]
        for start in range(0, n, block_rows):
            yield start, self.rows(matrix, start, min(start + block_rows, n))


def x_chunk_rows(n_obs: int, n_vars: int) -> int:
    return int(max(1, min(n_obs, X_CHUNK_BYTES // max(1, 4 * n_vars))))


def write_h5ad_by_rows(path: str | Path, skeleton, blocks: Iterable[np.ndarray],
                       layers: Mapping[str, Callable[[np.ndarray], sp.csr_matrix]] | None = None) -> Path:
    """Write `skeleton` (an AnnData with obs, var, obsm, uns and no X) to `path` atomically, with X
    the row blocks `blocks` (dense, in row order, float32) and each of `layers` the CSR float32
    matrix its function makes of every block (LAYER_ROWS rows at a time). Only one block is in memory
    at a time."""
    import h5py
    from anndata.io import sparse_dataset, write_elem

    path = Path(path)
    n_obs, n_vars = skeleton.n_obs, skeleton.n_vars
    if skeleton.X is not None:
        raise ValueError("the skeleton must not carry X: the blocks are X")
    layers = dict(layers or {})
    with atomic_path(path) as tmp:
        scratch = tmp.with_suffix(".h5ad")
        skeleton.write_h5ad(scratch)
        with h5py.File(scratch, "r+") as f:
            x = f.create_dataset("X", shape=(n_obs, n_vars), dtype="float32",
                                 chunks=(x_chunk_rows(n_obs, n_vars), max(1, n_vars)) if n_obs and n_vars else None)
            x.attrs["encoding-type"] = "array"
            x.attrs["encoding-version"] = "0.2.0"
            for name in layers:
                empty = sp.csr_matrix((0, n_vars), dtype=np.float32)
                empty.indptr = empty.indptr.astype(np.int64)  # a nearly dense layer exceeds 2**31 values
                write_elem(f["layers"], name, empty, dataset_kwargs={"chunks": (SPARSE_CHUNK_VALUES,)})
            stored = {name: sparse_dataset(f["layers"][name]) for name in layers}
            row = 0
            for block in blocks:
                block = np.asarray(block, dtype=np.float32)
                if block.ndim != 2 or block.shape[1] != n_vars or row + block.shape[0] > n_obs:
                    raise ValueError(f"block of shape {block.shape} at row {row} does not fit ({n_obs}, {n_vars})")
                x[row:row + block.shape[0]] = block
                for name, make in layers.items():  # a few rows at a time: a CSR of a dense block costs 3x its size
                    for start in range(0, block.shape[0], LAYER_ROWS):
                        stored[name].append(sp.csr_matrix(make(block[start:start + LAYER_ROWS]), dtype=np.float32))
                row += block.shape[0]
            if row != n_obs:
                raise ValueError(f"the blocks gave {row} rows, the h5ad has {n_obs}")
        scratch.rename(tmp)
    return path
