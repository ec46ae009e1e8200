"""Training data: SD3 latents, UNI2-h embeddings and GE conditions of one split, read from the
feature stores.

Every per-spot array is read into memory once: latents, UNI, the GE CLS and the GE bins (uint8,
1.2 KB per spot at 1,199 genes), from which the trainer encodes the tokens on its device
(`ge_inputs.GeTokenSource.complete`). Batches are gathered on background threads that keep
`prefetch` batches ahead of the training step. Stores written with GE token sequences (600 KiB per
spot) keep them in Zarr, read per batch. `stmdit bench loader` compares this loader with an
in-memory gather.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import zarr

from stmdit.errors import InputError
from stmdit.features import check_finite_rows, open_feature_store
from stmdit.zarr_rows import read_array_rows, string_values

log = logging.getLogger(__name__)


def store_rows(store: zarr.Group, keys: Iterable[str], path: str | Path) -> np.ndarray:
    """Row index in `store` of each spot key (InputError naming the store if one is missing)."""
    index = {k: i for i, k in enumerate(string_values(store["spot_key"][:]))}
    keys = list(keys)
    missing = [k for k in keys if k not in index]
    if missing:
        raise InputError(path, f"{len(missing)} spot(s) of the split are not in the store, e.g. {missing[0]}")
    return np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))


def read_rows(array: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """array[rows] for arbitrary rows: chunk-aligned concurrent range reads (zarr_rows.read_array_rows)."""
    return read_array_rows(array, rows)


@dataclass
class GeBatch:
    """GE condition of a batch: CancerFoundation CLS and, for cross-attention models, the tokens, or
    the bins they are encoded from on the device (`ge_inputs.GeTokenSource.complete`)."""

    cls: torch.Tensor
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    bins: torch.Tensor | None = None

    def to(self, device) -> "GeBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return GeBatch(move(self.cls), move(self.tokens), move(self.token_mask), move(self.bins))


class SpotFeatures:
    """Latents, UNI and GE of the spots of one split, addressable by position 0..n-1."""

    def __init__(
        self,
        keys: list[str],
        latent_store: str | Path,
        uni_store: str | Path,
        ge_store: str | Path | None,
        ge_tokens: bool,
        tokens_in_memory_gb: float = 0.0,
    ):
        """`tokens_in_memory_gb`: read the GE token rows of these spots into memory once when they
        take at most this much (float16); otherwise they stay in the store and are read per batch."""
        self.keys = list(keys)
        latent_group = open_feature_store(latent_store)
        self.latents = check_finite_rows(read_rows(latent_group["latent"], store_rows(latent_group, self.keys, latent_store)),
                                         latent_store, "latent", self.keys)
        uni_group = open_feature_store(uni_store)
        self.uni = check_finite_rows(read_rows(uni_group["embedding"], store_rows(uni_group, self.keys, uni_store)),
                                     uni_store, "embedding", self.keys)
        self.ge_cls = None
        self.ge_tokens = None
        self.ge_bins = None
        if ge_store is not None:
            ge_group = open_feature_store(ge_store)
            self.ge_rows = store_rows(ge_group, self.keys, ge_store)
            self.ge_cls = check_finite_rows(read_rows(ge_group["embedding"], self.ge_rows), ge_store, "embedding",
                                            self.keys)
            self.ge_store = ge_store
            if ge_tokens and "bins" in ge_group:  # 1.2 KB per spot: in memory
                self.ge_bins = read_rows(ge_group["bins"], self.ge_rows)
            elif ge_tokens:  # a store written with tokens
                if "tokens" not in ge_group or "token_mask" not in ge_group:
                    raise InputError(ge_store, "the model attends to GE tokens but the store has neither bins nor "
                                               "tokens: rebuild it with stmdit features --encoder cancerfoundation")
                tokens, self.ge_mask = ge_group["tokens"], ge_group["token_mask"]
                need_gb = len(self.keys) * math.prod(tokens.shape[1:]) * tokens.dtype.itemsize / 1e9
                if need_gb <= tokens_in_memory_gb:
                    log.info("reading %.2f GB of GE tokens into memory", need_gb)
                    self.ge_tokens = check_finite_rows(read_rows(tokens, self.ge_rows), ge_store, "tokens", self.keys)
                    self.ge_mask = read_rows(self.ge_mask, self.ge_rows)
                    self.ge_rows = np.arange(len(self.keys))
                else:
                    self.ge_tokens = tokens
        log.info(
            "loaded %d spots: latents %s, UNI %s, GE %s", len(self.keys), self.latents.shape, self.uni.shape,
            "none" if ge_store is None else ("CLS + bins" if self.ge_bins is not None else
                                             "CLS + tokens" if ge_tokens else "CLS"),
        )

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def _rows(array, rows: np.ndarray) -> np.ndarray:
        return array[rows] if isinstance(array, np.ndarray) else read_rows(array, rows)

    def batch(self, positions: np.ndarray) -> dict:
        positions = np.asarray(positions)
        out = {
            "latent": torch.from_numpy(self.latents[positions].astype(np.float32)),
            "uni": torch.from_numpy(self.uni[positions].astype(np.float32)),
            "ge": None,
        }
        if self.ge_cls is not None:
            ge = GeBatch(torch.from_numpy(self.ge_cls[positions].astype(np.float32)))
            if self.ge_bins is not None:
                ge.bins = torch.from_numpy(self.ge_bins[positions])
            elif self.ge_tokens is not None:
                rows = self.ge_rows[positions]
                tokens = self._rows(self.ge_tokens, rows)
                if not isinstance(self.ge_tokens, np.ndarray):  # read from the store now: checked now
                    check_finite_rows(tokens, self.ge_store, "tokens", [self.keys[p] for p in positions])
                ge.tokens = torch.from_numpy(tokens.astype(np.float32))
                ge.token_mask = torch.from_numpy(self._rows(self.ge_mask, rows).astype(bool))
            out["ge"] = ge
        return out

    def iterate(self, batches: list[np.ndarray], prefetch: int = 4, workers: int = 2) -> Iterator[dict]:
        """Yield `batch(b)` for each b in order, reading up to `prefetch` batches ahead on threads."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            pending = [pool.submit(self.batch, b) for b in batches[:prefetch]]
            for i in range(len(batches)):
                result = pending[i].result()
                if i + prefetch < len(batches):
                    pending.append(pool.submit(self.batch, batches[i + prefetch]))
                pending[i] = None
                yield result
