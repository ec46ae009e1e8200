"""How gene expression (GE) enters the denoiser: one class per fusion variant, one registry.

A fusion variant owns every GE parameter of the model:

- `condition_timestep` may change the timestep embedding before the AdaLN modulation (`adaln`);
- `context` may build a token sequence in the model's hidden space that every block attends to
  (`xattn`), and `block_attention` builds that per-block cross-attention;
- its null parameters replace the GE of samples whose GE is dropped.

`xattn` obtains its tokens from a *token source* (`direct`, `pma`, `perceiver`, `gsa`), each a class
in `TOKEN_SOURCES`. Sources work at the CancerFoundation width (`ge_dim`); their output is projected
to the hidden size once per forward pass and shared by all blocks.

Adding a variant: subclass `GeFusion` (or `TokenSource`), decorate it with `register_fusion`
(or `register_token_source`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PixArtAlphaTextProjection
from torch import nn

from stmdit.dit_config import FUSION_KINDS, TOKEN_SOURCE_NAMES, FusionKind
from stmdit.loader import GeBatch

if TYPE_CHECKING:
    from stmdit.dit_config import DiTConfig

GeContext = tuple[torch.Tensor, torch.Tensor]  # tokens (B, K, D), mask (B, K) bool, True = real token

GE_FUSIONS: dict[str, type["GeFusion"]] = {}
TOKEN_SOURCES: dict[str, type["TokenSource"]] = {}


def register_fusion(cls: type["GeFusion"]) -> type["GeFusion"]:
    kind = FusionKind(uses_ge=cls.uses_ge, uses_tokens=cls.uses_tokens)
    if FUSION_KINDS.setdefault(cls.name, kind) != kind:  # a built-in of the torch-free table, changed
        raise ValueError(f"fusion {cls.name!r}: {kind} differs from stmdit.dit_config.FUSION_KINDS {FUSION_KINDS[cls.name]}")
    GE_FUSIONS[cls.name] = cls
    return cls


def register_token_source(cls: type["TokenSource"]) -> type["TokenSource"]:
    TOKEN_SOURCE_NAMES.add(cls.name)
    TOKEN_SOURCES[cls.name] = cls
    return cls


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def fusion_class(name: str) -> type["GeFusion"]:
    return _lookup(GE_FUSIONS, name, "GE fusion")


def token_source_class(name: str) -> type["TokenSource"]:
    return _lookup(TOKEN_SOURCES, name, "GE token source")


def build_fusion(config: "DiTConfig") -> "GeFusion":
    return fusion_class(config.ge_fusion)(config)


def attention_bias_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool key mask -> (B, 1, L), the layout diffusers' Attention expects (True = attend)."""
    return mask[:, None, :]


def drop_flags(batch_size: int, drop: torch.Tensor | None, device) -> torch.Tensor:
    if drop is None:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    if drop.shape != (batch_size,):
        raise ValueError(f"drop flags must have shape ({batch_size},), got {tuple(drop.shape)}")
    return drop.to(device=device, dtype=torch.bool)


def zero_init_attention(hidden_size: int, context_dim: int, heads: int) -> Attention:
    """Cross-attention whose output projection starts at zero: the branch starts silent."""
    attention = Attention(hidden_size, cross_attention_dim=context_dim, heads=heads,
                          dim_head=hidden_size // heads, bias=True, out_bias=True)
    nn.init.zeros_(attention.to_out[0].weight)
    nn.init.zeros_(attention.to_out[0].bias)
    return attention


# --- fusion variants ---------------------------------------------------------------------------

class GeFusion(nn.Module):
    """Base class: no GE at all (what `none` is)."""

    name: ClassVar[str]
    uses_ge: ClassVar[bool] = True
    uses_tokens: ClassVar[bool] = False

    def __init__(self, config: "DiTConfig"):
        super().__init__()
        self.ge_dim = config.ge_dim

    @classmethod
    def block_attention(cls, config: "DiTConfig") -> nn.Module | None:
        """The per-block GE module each transformer block carries (None: blocks carry none)."""
        return None

    def condition_timestep(self, t_emb: torch.Tensor, ge: GeBatch | None, drop_ge: torch.Tensor | None) -> torch.Tensor:
        return t_emb

    def context(self, ge: GeBatch | None, drop_ge: torch.Tensor | None, batch_size: int) -> GeContext | None:
        return None

    def norms(self) -> dict[str, float]:
        return {}

    def _check_cls(self, ge: GeBatch, batch_size: int) -> None:
        if ge.cls.shape != (batch_size, self.ge_dim):
            raise ValueError(f"GE CLS must have shape ({batch_size}, {self.ge_dim}), got {tuple(ge.cls.shape)}")


@register_fusion
class NoFusion(GeFusion):
    """PixCell baseline: UNI only; GE is ignored and the model has no GE parameters."""

    name = "none"
    uses_ge = False


@register_fusion
class AdaLNFusion(GeFusion):
    """CancerFoundation CLS -> MLP -> timestep-embedding size, added through a zero-initialised
    per-channel gate to the timestep embedding, before the shared AdaLN modulation."""

    name = "adaln"

    def __init__(self, config: "DiTConfig"):
        super().__init__(config)
        self.null_cls = nn.Parameter(torch.randn(config.ge_dim) / config.ge_dim**0.5)
        self.cls_proj = PixArtAlphaTextProjection(config.ge_dim, config.hidden_size, act_fn="silu")
        self.gate = nn.Parameter(torch.zeros(config.hidden_size))

    def condition_timestep(self, t_emb, ge, drop_ge):
        batch_size = t_emb.shape[0]
        null = self.null_cls.to(t_emb.dtype).expand(batch_size, -1)
        if ge is None:
            cls = null
        else:
            self._check_cls(ge, batch_size)
            drop = drop_flags(batch_size, drop_ge, t_emb.device)
            cls = torch.where(drop[:, None], null, ge.cls.to(t_emb.dtype))
        return t_emb + self.gate.to(t_emb.dtype) * self.cls_proj(cls)

    def norms(self):
        return {
            "ge_gate": self.gate.detach().float().pow(2).mean().sqrt().item(),
            "ge_proj_norm": self.cls_proj.linear_2.weight.detach().float().norm().item(),
        }


@register_fusion
class CrossAttentionFusion(GeFusion):
    """A second per-block cross-attention (zero-initialised output) over K GE tokens that a token
    source makes from the CancerFoundation tokens (or from the CLS as one token when the batch
    carries no tokens, or a spot has none)."""

    name = "xattn"
    uses_tokens = True

    def __init__(self, config: "DiTConfig"):
        super().__init__(config)
        self.max_tokens = config.max_ge_tokens
        self.null_tokens = nn.Parameter(torch.randn(1, config.ge_dim) / config.ge_dim**0.5)
        self.source = token_source_class(config.ge_tokens)(config)
        self.token_proj = PixArtAlphaTextProjection(config.ge_dim, config.hidden_size, act_fn="gelu_tanh")

    @classmethod
    def block_attention(cls, config):
        return zero_init_attention(config.hidden_size, config.hidden_size, config.num_heads)

    def _input_tokens(self, ge: GeBatch | None, batch_size: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if ge is None:  # no GE at all: every sample gets the null sequence below
            return (torch.zeros(batch_size, 1, self.ge_dim, device=device, dtype=dtype),
                    torch.ones(batch_size, 1, dtype=torch.bool, device=device))
        self._check_cls(ge, batch_size)
        cls_token = ge.cls.to(dtype)[:, None, :]
        if ge.tokens is None and ge.bins is not None:
            raise ValueError("the batch has GE bins but no tokens: encode them first (GeTokenSource.complete)")
        if ge.tokens is None:
            return cls_token, torch.ones(batch_size, 1, dtype=torch.bool, device=device)
        tokens, mask = ge.tokens.to(dtype), ge.token_mask
        if tokens.ndim != 3 or tokens.shape[0] != batch_size or tokens.shape[2] != self.ge_dim:
            raise ValueError(f"GE tokens must have shape ({batch_size}, L, {self.ge_dim}), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_tokens:
            raise ValueError(f"{tokens.shape[1]} GE tokens per spot exceed max_ge_tokens={self.max_tokens}")
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device) if mask is None else mask.to(torch.bool)
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"GE token mask must have shape {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
        # A spot without any real token falls back to its CLS as a single token.
        return self._replace_rows(tokens, mask, ~mask.any(dim=1), cls_token)

    @staticmethod
    def _replace_rows(tokens, mask, rows, first_token):
        """Rows in `rows` become the one-token sequence `first_token` (B or 1, 1, D), padding after."""
        length = tokens.shape[1]
        one_token = torch.nn.functional.pad(first_token.expand(tokens.shape[0], 1, -1), (0, 0, 0, length - 1))
        one_mask = (torch.arange(length, device=mask.device) == 0).expand_as(mask)
        return (torch.where(rows[:, None, None], one_token, tokens), torch.where(rows[:, None], one_mask, mask))

    def context(self, ge, drop_ge, batch_size):
        device, dtype = self.null_tokens.device, self.token_proj.linear_1.weight.dtype
        if ge is not None:
            device = ge.cls.device
        tokens, mask = self._input_tokens(ge, batch_size, device, dtype)
        if ge is None:
            drop = torch.ones(batch_size, dtype=torch.bool, device=device)
        else:
            drop = drop_flags(batch_size, drop_ge, device)
        tokens, mask = self._replace_rows(tokens, mask, drop, self.null_tokens.to(dtype)[None])
        tokens, mask = self.source(tokens, mask)
        return self.token_proj(tokens), mask

    def norms(self):
        return {"ge_proj_norm": self.token_proj.linear_2.weight.detach().float().norm().item()}


# --- token sources -----------------------------------------------------------------------------

class TokenSource(nn.Module):
    """(tokens (B, L, ge_dim), mask (B, L)) -> (tokens' (B, K, ge_dim), mask' (B, K))."""

    name: ClassVar[str]

    def __init__(self, config: "DiTConfig"):
        super().__init__()
        self.dim = config.ge_dim
        self.heads = config.ge_source_heads

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> GeContext:
        raise NotImplementedError


class AttentionLayer(nn.Module):
    """Pre-norm residual attention of queries over a (masked) context; self-attention without one."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_query = nn.LayerNorm(dim, eps=1e-6)
        self.norm_context = nn.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim, cross_attention_dim=dim, heads=heads, dim_head=dim // heads, bias=True)

    def forward(self, queries, context=None, mask=None):
        normed = self.norm_query(queries)
        context = normed if context is None else self.norm_context(context)
        bias = None if mask is None else attention_bias_mask(mask)
        return queries + self.attention(normed, encoder_hidden_states=context, attention_mask=bias)


class MlpLayer(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.ff = FeedForward(dim, inner_dim=int(dim * mlp_ratio), activation_fn="gelu-approximate")

    def forward(self, x):
        return x + self.ff(self.norm(x))


class AttentionPooling(nn.Module):
    """K learnable queries attend over the tokens, then an MLP: K tokens out, all real."""

    def __init__(self, dim: int, heads: int, n_queries: int, mlp_ratio: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) / dim**0.5)
        self.attend = AttentionLayer(dim, heads)
        self.mlp = MlpLayer(dim, mlp_ratio)

    def forward(self, tokens, mask):
        queries = self.queries.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        pooled = self.mlp(self.attend(queries, tokens, mask))
        return pooled, torch.ones(pooled.shape[:2], dtype=torch.bool, device=pooled.device)


@register_token_source
class DirectTokens(TokenSource):
    """All CancerFoundation tokens, with their padding mask."""

    name = "direct"

    def forward(self, tokens, mask):
        return tokens, mask


@register_token_source
class PmaTokens(TokenSource):
    """Pooling by multi-head attention: `n_ge_queries` learnable queries attend over the tokens."""

    name = "pma"

    def __init__(self, config):
        super().__init__(config)
        self.pool = AttentionPooling(self.dim, self.heads, config.n_ge_queries, config.mlp_ratio)

    def forward(self, tokens, mask):
        return self.pool(tokens, mask)


@register_token_source
class PerceiverTokens(TokenSource):
    """Perceiver resampler: `n_ge_queries` learnable latents; each iteration cross-attends to the
    tokens, self-attends among latents and applies an MLP."""

    name = "perceiver"

    def __init__(self, config):
        super().__init__(config)
        self.latents = nn.Parameter(torch.randn(config.n_ge_queries, self.dim) / self.dim**0.5)
        self.iterations = nn.ModuleList(
            nn.ModuleDict({
                "cross": AttentionLayer(self.dim, self.heads),
                "self": AttentionLayer(self.dim, self.heads),
                "mlp": MlpLayer(self.dim, config.mlp_ratio),
            })
            for _ in range(config.perceiver_iterations)
        )

    def forward(self, tokens, mask):
        latents = self.latents.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        for layer in self.iterations:
            latents = layer["cross"](latents, tokens, mask)
            latents = layer["self"](latents)
            latents = layer["mlp"](latents)
        return latents, torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device)


@register_token_source
class GeneSelfAttentionTokens(TokenSource):
    """Gene self-attention (GSA): masked self-attention + MLP over the gene tokens, then reduced to
    `n_ge_queries` tokens by attention pooling."""

    name = "gsa"

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"self": AttentionLayer(self.dim, self.heads), "mlp": MlpLayer(self.dim, config.mlp_ratio)})
            for _ in range(config.gsa_layers)
        )
        self.pool = AttentionPooling(self.dim, self.heads, config.n_ge_queries, config.mlp_ratio)

    def forward(self, tokens, mask):
        for layer in self.layers:
            tokens = layer["mlp"](layer["self"](tokens, mask=mask))
        return self.pool(tokens, mask)
