"""CancerFoundation (BoevaLab): a scGPT-style transformer over gene tokens, re-implemented here
because the model ships no installable package.

Checkpoint layout (the public release, unpacked into one directory):
  model.pth   state dict
  args.json   {"nlayers": 6, "nheads": 8, "embsize": 256, "d_hid": 512, "n_bins": 51,
               "max_seq_len": 1200, "dropout": 0.2, ...}
  vocab.json  gene symbol -> token id, including "<pad>", "<cls>", "<eoc>"

Architecture (BoevaLab/CancerFoundation model/cancergpt.py, whose names the released weights use):
  gene_encoder   nn.Embedding(len(vocab), d, padding_idx=<pad>) + LayerNorm       (embedding, enc_norm)
  value_encoder  the bin index as a number: Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm
                 (linear1, linear2, norm), input clamped at 512; "category" style (scGPT's
                 CategoryValueEncoder: embedding over n_bins + 2, enc_norm) when args say so
  encoder        nn.TransformerEncoder of post-norm layers (d, nheads, d_hid, ReLU, batch_first)
  input          gene tokens + value embeddings, summed; <cls> first with value pad_value (-2)
Key names of other releases are mapped onto these (see `canonical_state_dict`): the training
model's attention wrapper (`self_attn.self_attn.*`), scGPT's names (`encoder.*` for the gene
encoder, `transformer_encoder.*`, flash-attention `Wqkv`), a DDP/Lightning prefix. Heads that
encoding does not use are dropped by name (IGNORED_HEADS); any other unmatched key is an error.

Input per spot: raw counts of one fixed gene list (the top HVGs by `highly_variable_rank` that
are in the vocab, at most max_seq_len - 1), binned per spot by rank of the non-zero counts into
bins 1..n_bins-1 (bin 0 = zero count). For tie-free counts this is exactly scGPT's quantile
binning (`digitize(x, quantile(nonzero, linspace(0, 1, n_bins - 1)))`); tied counts are ordered
by a random permutation seeded by (seed, spot key), so a spot's bins depend only on its counts,
the seed and its key (never on the batch). An all-zero spot is all bin 0.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from stmdit.encoders.base import (
    LoadOptions,
    autocast,
    encoder_identity,
    file_sha256,
    load_state_dict_strict,
    read_json,
    read_state_dict,
    resolve_device,
    stable_seed,
    weights_digest,
)
from stmdit.errors import InputError

log = logging.getLogger(__name__)

MODEL = "CancerFoundation (scGPT-style transformer, BoevaLab)"
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
CHECKPOINT_FILES = ("model.pth", "args.json", "vocab.json")

# Heads of the pre-training model that encoding never runs; their weights are dropped by name.
IGNORED_HEADS = (
    "decoder.",                       # expression (MLM) decoder
    "mvc_decoder.",                   # masked value prediction from the cell embedding
    "cls_decoder.",                   # classification head of fine-tuned models
    "flag_encoder.",                  # generative-training flag embedding (gen tokens only)
    "grad_reverse_discriminator.",    # scGPT domain-adversarial head
    "grad_reverse_discriminators.",   # CancerFoundation domain-adversarial heads
    "condition_encoders.",            # condition embeddings fed to the decoders
    "batch_encoder.",                 # scGPT batch embedding fed to the decoders
)


# ---------------------------------------------------------------------------------------------
# Binning and gene selection


def spot_rng(seed: int, key: str) -> np.random.Generator:
    """The random stream of one spot: a function of the seed and the spot key only."""
    return np.random.default_rng([int(seed), stable_seed("cancerfoundation-bins", key)])


def bin_spot(counts: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Bins 0..n_bins-1 of one spot's counts: 0 for zero, else by rank among the non-zero counts.

    The non-zero counts are ranked 0..n-1 (ties ordered by a permutation from `rng`) and rank r
    goes to bin 1 + floor(r (n_bins - 2) / (n - 1)): the minimum to bin 1, the maximum to
    n_bins - 1. A single non-zero count is that spot's maximum: bin n_bins - 1.
    """
    counts = np.asarray(counts)
    bins = np.zeros(counts.shape[0], dtype=np.int64)
    nonzero = np.flatnonzero(counts > 0)
    n = nonzero.size
    if n == 0:
        return bins
    if n == 1:
        bins[nonzero] = n_bins - 1
        return bins
    order = np.lexsort((rng.permutation(n), counts[nonzero]))
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n)
    bins[nonzero] = 1 + (ranks * (n_bins - 2)) // (n - 1)
    return bins


def bin_spot_reference(counts: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """The reference binning (BoevaLab/CancerFoundation model/data_collator.py): edges at the
    quantiles linspace(0, 1, n_bins - 1) of the non-zero counts; a count gets its left digit, or,
    when it equals several edges (ties), a uniform draw among the bins those edges span. The draw
    comes from `rng` (the reference uses the global NumPy stream)."""
    counts = np.asarray(counts, dtype=np.float64)
    bins = np.zeros(counts.shape[0], dtype=np.int64)
    nonzero = np.flatnonzero(counts > 0)
    if nonzero.size == 0:
        return bins
    values = counts[nonzero]
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(values, edges)
    right = np.digitize(values, edges, right=True)
    bins[nonzero] = np.ceil(rng.random(values.size) * (right - left) + left).astype(np.int64)
    return bins


BINNINGS = {"reference": bin_spot_reference, "rank": bin_spot}


def bin_counts(counts: np.ndarray, keys: Sequence[str], n_bins: int, seed: int, binning: str = "rank") -> np.ndarray:
    """Per-spot binning of a (B, G) count matrix; row i uses the stream of keys[i]."""
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] != len(keys):
        raise ValueError(f"counts {counts.shape} do not match {len(keys)} spot keys")
    bin_one = BINNINGS[binning]
    bins = np.zeros(counts.shape, dtype=np.int64)
    for i, key in enumerate(keys):
        bins[i] = bin_one(counts[i], n_bins, spot_rng(seed, key))
    return bins


def select_genes(
    var_names: Sequence[str],
    hvg_rank: Sequence[float],
    max_genes: int,
    highly_variable: Sequence[bool] | None = None,
    usable: Iterable[str] | None = None,
) -> np.ndarray:
    """Column indices of the gene list: HVGs (finite rank, and flagged when flags are given) that
    are `usable` (in the vocab), most variable (lowest rank) first, at most `max_genes`."""
    names = np.asarray(var_names, dtype=object)
    rank = np.asarray(hvg_rank, dtype=np.float64)
    keep = np.isfinite(rank)
    if highly_variable is not None:
        keep &= np.asarray(highly_variable, dtype=bool)
    if usable is not None:
        usable = set(usable)
        keep &= np.fromiter((n in usable for n in names), dtype=bool, count=names.size)
    candidates = np.flatnonzero(keep)
    ordered = candidates[np.argsort(rank[candidates], kind="stable")]
    return ordered[:max_genes]


def select_genes_cell_ranger(
    var_names: Sequence[str],
    counts: Any,
    max_genes: int,
    usable: Iterable[str] | None = None,
    batches: Sequence[str] | None = None,
) -> np.ndarray:
    """Column indices of the reference gene list (BoevaLab/CancerFoundation model/embedding.py):
    among the `usable` (vocab) genes, scanpy `highly_variable_genes(flavor="cell_ranger",
    n_top_genes=max_genes, batch_key=...)` on the raw counts, kept in their var order."""
    import anndata
    import scanpy as sc
    import scipy.sparse as sp

    names = np.asarray(var_names, dtype=object)
    candidates = np.arange(names.size)
    if usable is not None:
        usable = set(usable)
        candidates = np.flatnonzero(np.fromiter((n in usable for n in names), dtype=bool, count=names.size))
    if candidates.size == 0:
        return candidates
    matrix = sp.csr_matrix(counts)[:, candidates].astype(np.float32)
    adata = anndata.AnnData(X=matrix)
    adata.var_names = [str(names[i]) for i in candidates]
    batch_key = None
    if batches is not None:
        adata.obs["batch"] = np.asarray(batches, dtype=str)
        batch_key = "batch" if adata.obs["batch"].nunique() > 1 else None
    try:
        sc.pp.highly_variable_genes(adata, n_top_genes=min(int(max_genes), candidates.size), flavor="cell_ranger",
                                    batch_key=batch_key, subset=False)
    except ValueError as exc:  # e.g. too few distinct gene means for cell_ranger's 20 bins
        raise InputError(None, f"cell_ranger gene selection failed on these counts ({str(exc).splitlines()[0]}); "
                               "use gene_selection: hvg_rank") from None
    return candidates[np.flatnonzero(adata.var["highly_variable"].to_numpy(dtype=bool))]


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class CancerFoundationArgs:
    """The architecture fields of args.json (other fields of the file are ignored)."""

    embsize: int = 256
    nheads: int = 8
    d_hid: int = 512
    nlayers: int = 6
    n_bins: int = 51
    max_seq_len: int = 1200
    dropout: float = 0.2
    input_emb_style: str = "continuous"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str | Path) -> "CancerFoundationArgs":
        known = {f.name for f in fields(cls)}
        args = cls(**{k: v for k, v in values.items() if k in known})
        if args.input_emb_style not in ("continuous", "category"):
            raise InputError(source, f"input_emb_style {args.input_emb_style!r} is not supported (continuous, category)")
        return args

    @property
    def pad_value(self) -> float:
        """Value-channel input of <cls> and of padding (scGPT: -2 continuous, n_bins category)."""
        return float(self.n_bins) if self.input_emb_style == "category" else -2.0


class GeneTokenEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, padding_idx: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(tokens))


class ContinuousValueEncoder(nn.Module):
    """The bin index as a number through a small MLP (CancerFoundation's value encoder)."""

    def __init__(self, d_model: int, dropout: float, max_value: float = 512.0):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        return self.dropout(self.norm(self.linear2(self.activation(self.linear1(x)))))


class CategoryValueEncoder(nn.Module):
    """The bin index as a category (scGPT's "category" input style)."""

    def __init__(self, n_values: int, d_model: int, padding_idx: int):
        super().__init__()
        self.embedding = nn.Embedding(n_values, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(values.long()))


class CancerFoundationModel(nn.Module):
    """Gene-token + value embeddings through a post-norm transformer encoder; output (B, L, d)."""

    def __init__(self, n_tokens: int, pad_id: int, args: CancerFoundationArgs, batchnorm: bool = False):
        super().__init__()
        self.args = args
        d = args.embsize
        self.gene_encoder = GeneTokenEncoder(n_tokens, d, padding_idx=pad_id)
        if args.input_emb_style == "category":
            self.value_encoder = CategoryValueEncoder(args.n_bins + 2, d, padding_idx=args.n_bins)
        else:
            self.value_encoder = ContinuousValueEncoder(d, args.dropout)
        # pretraining option `batchnorm` (cancerfoundation/model/model.py): BatchNorm1d over the
        # embedding channels of gene + value embeddings, eps 6.1e-5, before the transformer
        self.bn = nn.BatchNorm1d(d, eps=6.1e-5) if batchnorm else None
        layer = nn.TransformerEncoderLayer(d, args.nheads, args.d_hid, args.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, args.nlayers, enable_nested_tensor=False)

    def forward(self, genes: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """`padding_mask` is True at padded positions (torch's convention)."""
        embeddings = self.gene_encoder(genes) + self.value_encoder(values)
        if self.bn is not None:
            embeddings = self.bn(embeddings.permute(0, 2, 1)).permute(0, 2, 1)
        return self.encoder(embeddings, src_key_padding_mask=padding_mask)


def _strip_common_prefix(keys: list[str]) -> dict[str, str]:
    for prefix in ("module.", "model."):
        if keys and all(k.startswith(prefix) for k in keys):
            return {k: k[len(prefix):] for k in keys}
    return {k: k for k in keys}


def canonical_key(key: str, scgpt_names: bool) -> str:
    """One checkpoint key in the names of `CancerFoundationModel`."""
    if scgpt_names:
        if key.startswith("transformer_encoder."):
            key = "encoder." + key[len("transformer_encoder."):]
        elif key.startswith("encoder."):
            key = "gene_encoder." + key[len("encoder."):]
    key = re.sub(r"(\.layers\.\d+\.self_attn\.)self_attn\.", r"\1", key)
    key = re.sub(r"\.self_attn\.Wqkv\.(weight|bias)$", r".self_attn.in_proj_\1", key)
    return key


def canonical_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Checkpoint -> (state dict in this module's names, keys of ignored heads)."""
    renamed = _strip_common_prefix(list(state))
    scgpt_names = any(k.startswith("transformer_encoder.") for k in renamed.values())
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for original, key in renamed.items():
        if key.startswith(IGNORED_HEADS):
            ignored.append(original)
            continue
        mapped[canonical_key(key, scgpt_names)] = state[original]
    return mapped, ignored


def load_vocab(path: Path) -> dict[str, int]:
    vocab = read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise InputError(path, "vocab.json must map gene symbols to integer token ids")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise InputError(path, f"vocab lacks special token(s) {missing}")
    return vocab


def load_model_dir(directory: Path, arch: Mapping[str, Any]) -> tuple[CancerFoundationModel, dict[str, int]]:
    """Model with the checkpoint's weights, and the vocab, from a CancerFoundation directory."""
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        raise InputError(directory, f"not a CancerFoundation checkpoint directory: missing {missing}")
    known = {f.name for f in fields(CancerFoundationArgs)}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise InputError(None, f"arch keys {unknown} are not CancerFoundation args (known: {sorted(known)})")
    args = CancerFoundationArgs.from_dict({**read_json(directory / "args.json"), **dict(arch)}, directory / "args.json")
    vocab = load_vocab(directory / "vocab.json")
    n_tokens = max(vocab.values()) + 1
    model = CancerFoundationModel(n_tokens, vocab["<pad>"], args)

    checkpoint = directory / "model.pth"
    # The release's model.pth is a plain state dict (the reference passes torch.load's result
    # straight to load_pretrained as a Mapping[str, Tensor]), so weights_only loading reads it.
    state, ignored = canonical_state_dict(read_state_dict(checkpoint))
    if any(k.startswith("dsbn.") for k in state):
        raise InputError(checkpoint, "checkpoint has domain-specific batch norm (dsbn.*), which needs a domain "
                                     "label per spot; only checkpoints without dsbn can encode here")
    if any(k.startswith("bn.") for k in state):
        model = CancerFoundationModel(n_tokens, vocab["<pad>"], args, batchnorm=True)
    embedding = state.get("gene_encoder.embedding.weight")
    if embedding is not None and embedding.shape[0] != n_tokens:
        raise InputError(checkpoint, f"the model embeds {embedding.shape[0]} tokens but vocab.json has {n_tokens}")
    load_state_dict_strict(model, state, checkpoint)
    if ignored:
        log.info("CancerFoundation: ignored %d weights of heads not used for encoding (%s)", len(ignored),
                 sorted({k.split(".")[0] for k in ignored}))
    return model, vocab


# ---------------------------------------------------------------------------------------------
# Encoders (real here; the smoke stand-in in smoke.py shares ExpressionEncoder)


class ExpressionEncoder:
    """Counts of a fixed gene list -> `bins` (B, G) uint8 (what the transformer reads), and from
    them the CLS `embedding` (B, d), `tokens` (B, L, d) and `token_mask` (B, L) (True = real token;
    L = 1 + number of genes, <cls> first).

    Use: `genes = encoder.choose_genes(...)`, then `encoder.encode(counts, keys)` with the counts of
    those genes in that order. A feature store keeps `embedding` and `bins` (`output_shapes`);
    `tokens_from_bins` makes the tokens again, on the encoder's device, where they are needed.
    """

    name = "cancerfoundation"
    modality = "expression"
    impl = "?"
    model = MODEL
    weights: str | None = None

    # The reference path (BoevaLab/CancerFoundation embed()) picks genes with cell_ranger HVGs and
    # L2-normalises the cell embedding; the smoke stand-in keeps the pipeline's HVG ranks, unscaled.
    default_gene_selection = "hvg_rank"
    default_l2_normalize = False
    default_binning = "rank"
    GENE_SELECTIONS = ("cell_ranger", "hvg_rank")

    def __init__(self, dim: int, n_bins: int, max_seq_len: int, seed: int):
        self.dim = int(dim)
        self.n_bins = int(n_bins)
        self.max_seq_len = int(max_seq_len)
        self.seed = int(seed)
        self.genes: list[str] = []
        self.gene_selection = self.default_gene_selection
        self.l2_normalize = self.default_l2_normalize
        self.binning = self.default_binning

    def configure(self, gene_selection: str | None = None, l2_normalize: bool | None = None,
                  binning: str | None = None) -> None:
        """Choose the gene selection ("cell_ranger" | "hvg_rank"), the L2 normalisation of the cell
        embedding and the binning ("reference" | "rank"); None keeps the encoder's default."""
        if binning is not None:
            if binning not in BINNINGS:
                raise InputError(None, f"unknown binning {binning!r} (choose from {sorted(BINNINGS)})")
            self.binning = binning
        if gene_selection is not None:
            if gene_selection not in self.GENE_SELECTIONS:
                raise InputError(None, f"unknown gene selection {gene_selection!r} (choose from {self.GENE_SELECTIONS})")
            self.gene_selection = gene_selection
        if l2_normalize is not None:
            self.l2_normalize = bool(l2_normalize)

    def usable_genes(self) -> set[str] | None:
        """Genes the encoder knows (its vocab), or None when any gene will do."""
        return None

    def choose_genes(self, var_names: Sequence[str], hvg_rank: Sequence[float], max_genes: int,
                     highly_variable: Sequence[bool] | None = None, counts: Any = None,
                     batches: Sequence[str] | None = None) -> np.ndarray:
        """Fix the gene list (column indices into var_names): with "hvg_rank", the top HVGs (by the
        pipeline's seurat_v3 rank) the encoder can use; with "cell_ranger", the reference's choice
        on the raw `counts` (spots x genes), batches given by `batches`."""
        limit = min(int(max_genes), self.max_seq_len - 1)
        if self.gene_selection == "cell_ranger":
            if counts is None:
                raise ValueError("cell_ranger gene selection needs the raw counts")
            columns = select_genes_cell_ranger(var_names, counts, limit, self.usable_genes(), batches)
        else:
            columns = select_genes(var_names, hvg_rank, limit, highly_variable, self.usable_genes())
        self.genes = [str(var_names[i]) for i in columns]
        return columns

    def finish_embedding(self, embedding: np.ndarray) -> np.ndarray:
        if not self.l2_normalize:
            return embedding
        norms = np.linalg.norm(embedding, axis=1, keepdims=True)
        return (embedding / np.where(norms > 0, norms, 1.0)).astype(np.float32)

    @property
    def sequence_length(self) -> int:
        return 1 + len(self.genes)

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """What a feature store keeps per spot: the CLS and the bins the tokens are encoded from."""
        return {"embedding": (self.dim,), "bins": (len(self.genes),)}

    def describe(self) -> dict[str, Any]:
        return {
            **encoder_identity(self, with_digest=False),  # CancerFoundationEncoder adds it for the real weights
            "preprocessing": {
                "genes": len(self.genes),
                "gene_selection": (
                    "scanpy highly_variable_genes(flavor=cell_ranger, batch_key=sample) on raw counts, in var order"
                    if self.gene_selection == "cell_ranger"
                    else "highly variable genes by highly_variable_rank (lowest first)")
                + (" among the vocab genes" if self.usable_genes() is not None else ""),
                "counts": 'raw counts (layers["counts"])',
                "binning": (f"per spot, the reference's quantile edges of the non-zero counts, bins 1..{self.n_bins - 1}, "
                            "0 = zero; ties drawn uniformly among the bins they span, seeded by (seed, spot key)"
                            if self.binning == "reference" else
                            f"per spot, rank of the non-zero counts into bins 1..{self.n_bins - 1}, 0 = zero; "
                            "ties ordered by a permutation seeded by (seed, spot key)"),
                "n_bins": self.n_bins,
                "seed": self.seed,
                "sequence": "<cls> (value = pad value) then the genes in list order; no padding tokens (every spot "
                            "has the same genes; the reference's padding is masked, so the outputs agree)",
                "embedding": "encoder output at <cls>, " + ("L2-normalised" if self.l2_normalize else "not normalised"),
                "stored": "embedding and bins (uint8, the transformer's value input) per spot; the tokens are "
                          "encoded from the bins on the model's device where a model attends to them",
            },
            "shapes": {k: list(v) for k, v in self.output_shapes.items()},
        }

    def bins(self, counts: np.ndarray, keys: Sequence[str]) -> np.ndarray:
        counts = np.asarray(counts)
        if counts.shape[1] != len(self.genes):
            raise ValueError(f"counts have {counts.shape[1]} genes, the encoder's list has {len(self.genes)}")
        return bin_counts(counts, keys, self.n_bins, self.seed, self.binning)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def tokens_from_bins(self, bins: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + G, d) float32, on the encoder's device, of bins (B, G) of the gene list."""
        raise NotImplementedError

    def check_bins(self, bins: torch.Tensor) -> torch.Tensor:
        if bins.ndim != 2 or bins.shape[1] != len(self.genes):
            raise ValueError(f"bins {tuple(bins.shape)} do not match the encoder's {len(self.genes)} genes")
        return bins.to(self.device)

    def encode(self, counts: np.ndarray, keys: Sequence[str]) -> dict[str, np.ndarray]:
        bins = self.bins(counts, keys)
        with torch.inference_mode():
            tokens = self.tokens_from_bins(torch.from_numpy(bins)).cpu().numpy()
        return {"embedding": self.finish_embedding(tokens[:, 0].copy()), "bins": bins.astype(np.uint8),
                "tokens": tokens, "token_mask": np.ones(tokens.shape[:2], dtype=bool)}


def file_digests(directory: Path, names: Sequence[str]) -> dict[str, str]:
    return {name: file_sha256(directory / name) for name in names if (directory / name).is_file()}


class CancerFoundationEncoder(ExpressionEncoder):
    impl = "real"
    default_gene_selection = "cell_ranger"
    default_l2_normalize = True
    default_binning = "reference"

    def __init__(self, model: CancerFoundationModel, vocab: dict[str, int], device: torch.device, seed: int,
                 bf16: bool = False, weights: str | None = None):
        args = model.args
        super().__init__(args.embsize, args.n_bins, args.max_seq_len, seed)
        self.network = model.eval().to(device)
        self.vocab = vocab
        self._device = device
        self._gene_ids: tuple[tuple[str, ...], torch.Tensor | None] = ((), None)
        self.bf16 = bf16
        self.weights = weights

    def usable_genes(self) -> set[str]:
        return {g for g in self.vocab if g not in SPECIAL_TOKENS}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["preprocessing"]["cls_and_pad_value"] = self.network.args.pad_value
        out["preprocessing"]["value_input"] = self.network.args.input_emb_style
        out["preprocessing"]["batchnorm"] = self.network.bn is not None
        # every file of the release: the vocab and args decide the tokens as much as model.pth does
        out["weights_sha256"] = {**(weights_digest(self.weights) or {}),
                                 **file_digests(Path(self.weights), CHECKPOINT_FILES)} if self.weights else None
        out["device"] = str(self.device)
        out["bf16"] = bool(self.bf16 and self.device.type == "cuda")
        return out

    @property
    def device(self) -> torch.device:
        return self._device

    def gene_ids(self) -> torch.Tensor:
        """Token ids of <cls> and the gene list on the device, built once per gene list (every
        training step encodes a batch)."""
        if self._gene_ids[0] != tuple(self.genes):
            ids = [self.vocab["<cls>"]] + [self.vocab[g] for g in self.genes]
            self._gene_ids = (tuple(self.genes), torch.tensor(ids, dtype=torch.long, device=self.device))
        return self._gene_ids[1]

    def tokens_from_bins(self, bins: torch.Tensor) -> torch.Tensor:
        bins = self.check_bins(bins)
        batch = bins.shape[0]
        gene_ids = self.gene_ids()
        genes = gene_ids.expand(batch, -1)
        values = torch.full((batch, gene_ids.numel()), self.network.args.pad_value, dtype=torch.float32,
                            device=self.device)
        values[:, 1:] = bins.float()
        padding = torch.zeros((batch, gene_ids.numel()), dtype=torch.bool, device=self.device)
        with torch.no_grad(), autocast(self.device, self.bf16):
            return self.network(genes, values, padding).float()


def load_cancerfoundation(options: LoadOptions) -> CancerFoundationEncoder:
    if not options.weights:
        raise InputError(None, "encoder cancerfoundation with impl real needs weights: the directory holding "
                               "model.pth, args.json and vocab.json (features.encoders.cancerfoundation.weights)")
    directory = Path(options.weights).expanduser()
    if not directory.is_dir():
        raise InputError(directory, "CancerFoundation weights directory not found (it has no hub id)")
    device = resolve_device(options.device)
    model, vocab = load_model_dir(directory, options.arch)
    log.info("encoder cancerfoundation: %s (%s)", directory, json.dumps(model.args.__dict__))
    return CancerFoundationEncoder(model, vocab, device, options.seed, bf16=options.bf16, weights=str(directory))
