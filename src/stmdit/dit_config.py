"""The denoiser's architecture as a plain dataclass, without torch: `stmdit.model.dit` builds the
network from it, and the workflow builds every configured model's `DiTConfig` when it reads the
config (`stmdit.models_config.resolve_models`), so a size that cannot be built fails at parse time.

The fusion and token-source names it accepts are those of `stmdit.model.fusion`'s registries, which
record each registered class here (the built-ins are listed below so that parsing needs no torch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple


class FusionKind(NamedTuple):
    uses_ge: bool
    uses_tokens: bool


# name -> what the fusion reads; `stmdit.model.fusion.register_fusion` adds (and checks) each class
FUSION_KINDS: dict[str, FusionKind] = {
    "none": FusionKind(uses_ge=False, uses_tokens=False),
    "adaln": FusionKind(uses_ge=True, uses_tokens=False),
    "xattn": FusionKind(uses_ge=True, uses_tokens=True),
}
TOKEN_SOURCE_NAMES: set[str] = {"direct", "pma", "perceiver", "gsa"}


def fusion_kind(name: str) -> FusionKind:
    if name not in FUSION_KINDS:
        raise ValueError(f"unknown GE fusion {name!r}; known: {', '.join(sorted(FUSION_KINDS))}")
    return FUSION_KINDS[name]


def bottleneck_error(hidden_size: int, patch_size: int, in_channels: int) -> str | None:
    """Why a denoiser of this width cannot carry its input, or None. Each token holds
    patch_size^2 x in_channels latent values; a narrower hidden state drops the rest, so neither
    the noise nor the image can be predicted in full: the epsilon loss cannot fall below about
    1 - hidden_size / (patch_size^2 x in_channels)."""
    per_token = patch_size**2 * in_channels
    if hidden_size >= per_token:
        return None
    return (f"bottlenecked denoiser: hidden_size {hidden_size} < patch_size^2 x in_channels = "
            f"{patch_size}^2 x {in_channels} = {per_token} values per token, so the epsilon loss cannot fall "
            f"below ~{1 - hidden_size / per_token:.2f}; use hidden_size >= {per_token} or a smaller patch, "
            f"or set allow_bottleneck: true to accept it")


@dataclass
class DiTConfig:
    """Every size of the denoiser. Defaults: B size on 16 x 32 x 32 SD3 latents, UNI only."""

    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 2
    in_channels: int = 16
    latent_size: int = 32
    mlp_ratio: float = 4.0
    timestep_freq_dim: int = 256
    uni_dim: int = 1536
    ge_dim: int = 256
    ge_fusion: str = "none"  # none | adaln | xattn
    ge_tokens: str | None = None  # token source of xattn: direct | pma | perceiver | gsa
    n_ge_queries: int = 32
    max_ge_tokens: int = 1200
    ge_source_heads: int = 4
    perceiver_iterations: int = 2
    gsa_layers: int = 1
    # position-embedding grid scale of diffusers' PatchEmbed (PixCell-256: 0.5) and a learned-sigma
    # output (2 x in_channels, PixArt's IDDPM head) of which the first in_channels are epsilon
    interpolation_scale: float = 1.0
    learned_sigma: bool = False
    # a learned bias on the self-attention logits per head and token offset, initialised local (see
    # dit.LocalAttentionBias); not in PixArt or PixCell, so the paper's sizes leave it off
    local_attention_bias: bool = False
    # channels of a convolutional head after the unpatchify (dit.ConvRefiner; 0 = none, as in PixArt
    # and PixCell): a latent pixel's prediction then sees its neighbours across token borders
    conv_refiner_channels: int = 0
    allow_bottleneck: bool = False  # accept hidden_size < patch_size^2 x in_channels (see bottleneck_error)

    def __post_init__(self):
        problem = bottleneck_error(self.hidden_size, self.patch_size, self.in_channels)
        if problem and not self.allow_bottleneck:
            raise ValueError(problem)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.conv_refiner_channels < 0:
            raise ValueError(f"conv_refiner_channels must be 0 (none) or positive, got {self.conv_refiner_channels}")
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent_size {self.latent_size} is not divisible by patch_size {self.patch_size}")
        if self.ge_dim % self.ge_source_heads:
            raise ValueError(f"ge_dim {self.ge_dim} is not divisible by ge_source_heads {self.ge_source_heads}")
        fusion = fusion_kind(self.ge_fusion)
        if fusion.uses_tokens and self.ge_tokens is None:
            raise ValueError(f"ge_fusion {self.ge_fusion!r} needs ge_tokens (a token source)")
        if not fusion.uses_tokens and self.ge_tokens is not None:
            raise ValueError(f"ge_tokens is only used by token fusions; ge_fusion {self.ge_fusion!r} takes none")
        if self.ge_tokens is not None and self.ge_tokens not in TOKEN_SOURCE_NAMES:
            raise ValueError(f"unknown GE token source {self.ge_tokens!r}; known: {', '.join(sorted(TOKEN_SOURCE_NAMES))}")

    @property
    def uses_ge(self) -> bool:
        return fusion_kind(self.ge_fusion).uses_ge

    @property
    def uses_ge_tokens(self) -> bool:
        """Whether the loader should read CancerFoundation token sequences for this model."""
        return fusion_kind(self.ge_fusion).uses_tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig field(s): {', '.join(unknown)}")
        return cls(**values)
