"""GE tokens from a CancerFoundation feature store, encoded where they are needed.

A store written by `stmdit features --encoder cancerfoundation` keeps per spot the CLS `embedding`
and the transformer's input, `bins` (uint8, one per gene of `token_genes`): 1.2 KB at the paper's
1,199 genes, where the tokens would take 600 KiB in float16. A model that attends to GE tokens
gets them from a `GeTokenSource`:

- it rebuilds the store's encoder from the store's provenance (impl, weights, architecture, seed,
  bf16; the gene list from `token_genes`) on the model's device;
- it checks that these are the weights that wrote the store (sha256 of every file), and the
  model's training recorded the same (`identity`, kept in training.json as `ge_encoder`): a
  mismatch is one InputError;
- `complete(ge)` fills a batch's tokens from its bins on the device (training, after the batch has
  moved there); `rows(rows)` encodes the bins of store rows (sampling, perturbation centroids).

On CPU in float32 the tokens are bit-identical to the ones `stmdit features` computes from the
counts (the float32 values it stored as float16 in stores written before this change). Those
older stores, with `tokens`/`token_mask`, are read as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import zarr

from stmdit.errors import InputError
from stmdit.features import check_finite_rows, open_feature_store
from stmdit.loader import GeBatch
from stmdit.zarr_rows import read_array_rows, string_values

log = logging.getLogger(__name__)

ENCODE_ROWS = 64  # spots encoded at a time by `rows`
IDENTITY_KEYS = ("name", "impl", "model", "weights_sha256")


def encoder_identity(description: Mapping[str, Any] | None) -> dict[str, Any]:
    """What makes two CancerFoundation encoders the same: name, impl, model and weights' sha256."""
    description = dict(description or {})
    return {key: description.get(key) for key in IDENTITY_KEYS}


def same_encoder(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same name, impl and model, and the same sha256 for every weights file both record (stores
    written before the vocab and args were hashed record model.pth only)."""
    if any(a.get(key) != b.get(key) for key in ("name", "impl", "model")):
        return False
    digests_a, digests_b = a.get("weights_sha256") or {}, b.get("weights_sha256") or {}
    if not digests_a and not digests_b:
        return True
    common = set(digests_a) & set(digests_b)
    return bool(common) and all(digests_a[name] == digests_b[name] for name in common)


def short_digest(identity: Mapping[str, Any]) -> str:
    digests = identity.get("weights_sha256")
    if not digests:
        return f"{identity.get('impl')} (no weights)"
    return ", ".join(f"{name} {digest[:12]}" for name, digest in sorted(digests.items()))


def store_params(group: zarr.Group, path: str | Path) -> dict[str, Any]:
    """The `stmdit features` parameters recorded in a CancerFoundation store's provenance."""
    params = dict((group.attrs.get("stmdit") or {}).get("params") or {})
    if params.get("encoder") != "cancerfoundation":
        raise InputError(path, "the GE store's provenance does not name the cancerfoundation encoder")
    if "token_genes" not in group:
        raise InputError(path, "the GE store has no token_genes array (not written by stmdit features "
                               "--encoder cancerfoundation)")
    return params


def load_store_encoder(group: zarr.Group, path: str | Path, weights: str | None = None, device: str = "cpu"
                       ) -> tuple[Any, dict[str, Any]]:
    """The CancerFoundation that wrote the store, on `device`, with its gene list, and its identity (the
    weights hashed once); InputError when the weights found are not the ones the store records."""
    from stmdit.encoders import load_encoder

    params = store_params(group, path)
    encoder = load_encoder("cancerfoundation", params.get("impl", "smoke"), weights=weights or params.get("weights"),
                           allow_hub=bool(params.get("allow_hub")), arch=params.get("arch") or {}, device=device,
                           bf16=bool(params.get("bf16")), seed=int(params.get("seed", 0)))
    encoder.configure(gene_selection=params.get("gene_selection"), l2_normalize=params.get("l2_normalize"),
                      binning=params.get("binning"))
    encoder.genes = [str(g) for g in string_values(group["token_genes"][:])[1:]]
    recorded = encoder_identity(group.attrs.get("encoder"))
    found = encoder_identity(encoder.describe())
    if not same_encoder(found, recorded):
        raise InputError(path, f"the CancerFoundation at {weights or params.get('weights')} ({short_digest(found)}) "
                               f"is not the one that wrote this store ({short_digest(recorded)})")
    return encoder, found


def check_trained_encoder(trained_with: Mapping[str, Any] | None, identity: Mapping[str, Any], model_path: str | Path,
                          store_path: str | Path) -> None:
    """InputError (naming the model's training.json) when the model was trained with another GE encoder
    than `identity` (None: a model trained before the record was kept; nothing to compare)."""
    if trained_with is None:
        return
    trained_with = encoder_identity(trained_with)
    if not same_encoder(trained_with, identity):
        raise InputError(model_path, f"the model was trained with CancerFoundation {short_digest(trained_with)}, "
                                     f"the GE store {store_path} was written by {short_digest(identity)}")


class GeTokenSource:
    """GE tokens (float32) and masks of a CancerFoundation store's rows, on `device`."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", weights: str | None = None):
        self.path = Path(path)
        self.device = torch.device(device)
        self.group = open_feature_store(path)
        self.identity = encoder_identity(self.group.attrs.get("encoder"))
        self.encoder = None
        if "bins" in self.group:
            self.encoder, self.identity = load_store_encoder(self.group, path, weights, str(self.device))
            log.info("GE tokens: encoded from the stored bins on %s (%d genes, %s)", self.device,
                     len(self.encoder.genes), short_digest(self.identity))
        elif "tokens" in self.group and "token_mask" in self.group:
            log.info("GE tokens: read from the store (written with tokens)")
        else:
            raise InputError(path, "the model attends to GE tokens but the store has neither bins nor tokens: "
                                   "rebuild it with stmdit features --encoder cancerfoundation")

    @property
    def stores_tokens(self) -> bool:
        return self.encoder is None

    def read_bins(self, rows: np.ndarray) -> np.ndarray:
        return read_array_rows(self.group["bins"], np.asarray(rows))

    def encode(self, bins: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, L, d) float32 and mask (B, L) of bins (B, G), on the source's device."""
        bins = torch.as_tensor(bins)
        tokens = self.encoder.tokens_from_bins(bins.to(self.device))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def complete(self, ge: GeBatch | None) -> GeBatch | None:
        """`ge` with its tokens encoded from its bins (unchanged when it has tokens or no bins)."""
        if ge is None or ge.bins is None or ge.tokens is not None:
            return ge
        tokens, mask = self.encode(ge.bins)
        return GeBatch(ge.cls, tokens, mask)

    def rows(self, rows: np.ndarray, keys: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and masks of store rows `rows` (spot keys `keys`, for errors), on the device."""
        rows = np.asarray(rows)
        if self.stores_tokens:
            keys = list(keys) if keys is not None else [f"row {r}" for r in rows]
            tokens = check_finite_rows(read_array_rows(self.group["tokens"], rows), self.path, "tokens", keys)
            mask = read_array_rows(self.group["token_mask"], rows).astype(bool)
            return (torch.from_numpy(tokens.astype(np.float32)).to(self.device),
                    torch.from_numpy(mask).to(self.device))
        parts = [self.encode(self.read_bins(rows[i:i + ENCODE_ROWS])) for i in range(0, len(rows), ENCODE_ROWS)]
        if not parts:
            raise ValueError("no rows to encode")
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
