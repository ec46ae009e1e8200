"""The STMDiT denoiser: a PixArt-style diffusion transformer on SD3 latents, conditioned on the
timestep (PixArt's single shared AdaLN), a UNI2-h embedding (one token, per-block cross-attention)
and, depending on the fusion variant, gene expression (see `fusion.py`).

diffusers' PixArt transformer carries one text condition only, so the blocks are written here from
diffusers' parts (PatchEmbed, Timesteps/TimestepEmbedding, Attention, FeedForward).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed, PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from stmdit.dit_config import DiTConfig
from stmdit.errors import InputError
from stmdit.loader import GeBatch
from stmdit.model.fusion import (
    GeContext,
    attention_bias_mask,
    build_fusion,
    drop_flags,
)
from stmdit.provenance import atomic_path, provenance, write_json

CONFIG_NAME = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"  # save_pretrained's default: the live weights
EMA_WEIGHTS_FILE = "ema.safetensors"  # a finished training run's EMA weights, what sampling loads


@dataclass
class EncodedConditions:
    """The part of a forward pass that depends on the conditions only, not on x or t: the projected
    UNI token and the GE context. A sampler computes it once per batch of spots, not once per step."""

    uni_tokens: torch.Tensor  # (B, 1, hidden)
    ge_context: GeContext | None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class LocalAttentionBias(nn.Module):
    """A learned additive bias on the self-attention logits, one value per head and relative token
    offset (Swin's relative position bias), initialised to -d^2 / (2 sigma_h^2) for a token distance
    d with sigma_h = 1, 1, 2, 4, 8, ... tokens over the heads. The first heads start local and the
    last ones near global.

    Why it exists: at the demo's size and budget, PixArt's self-attention stays uniform over the 64
    tokens (measured with `stmdit attention-probe`). Each token is then denoised from itself and the
    tile's mean, and the tiles come out as a mosaic of token squares."""

    def __init__(self, side: int, heads: int):
        super().__init__()
        offsets = torch.arange(-(side - 1), side, dtype=torch.float32)
        squared_distance = offsets[:, None] ** 2 + offsets[None, :] ** 2
        sigmas = 2.0 ** torch.clamp(torch.arange(heads, dtype=torch.float32) - 1, min=0)
        self.table = nn.Parameter(-squared_distance[None] / (2 * sigmas[:, None, None] ** 2))
        row, col = (index.flatten() for index in torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
        self.register_buffer("row_offset", row[:, None] - row[None, :] + side - 1, persistent=False)
        self.register_buffer("col_offset", col[:, None] - col[None, :] + side - 1, persistent=False)

    def forward(self, dtype: torch.dtype) -> torch.Tensor:
        """(heads, tokens, tokens): the bias of every query-key pair, the same for every spot."""
        return self.table[:, self.row_offset, self.col_offset].to(dtype)


class LocalBiasAttnProcessor:
    """diffusers' scaled-dot-product self-attention (AttnProcessor2_0's path for a 3-d input without
    group or spatial norm) with a `LocalAttentionBias` added to the logits, broadcast over the batch.
    diffusers' processors take a mask per spot and head, which would copy the bias batch-size times
    in every block."""

    def __init__(self, bias: LocalAttentionBias):
        self.bias = bias

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LocalBiasAttnProcessor serves self-attention without a mask")
        batch, tokens, _ = hidden_states.shape
        query, key, value = (projection(hidden_states).view(batch, tokens, attn.heads, -1).transpose(1, 2)
                             for projection in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        mixed = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=self.bias(query.dtype)[None])
        return attn.to_out[1](attn.to_out[0](mixed.transpose(1, 2).reshape(batch, tokens, -1)))


class ConvRefiner(nn.Module):
    """A small convolutional head at latent resolution after the transformer's unpatchify. It reads
    the transformer's prediction next to the noisy latent, is told the timestep, and adds a residual,
    so a latent pixel's prediction sees its neighbours across patch-token borders (receptive field
    7 x 7 latent pixels). U-ViT's final 3 x 3 convolution (Bao et al., 2023) grown to three layers.
    The last convolution starts at zero, so a new network computes what PixArt's does.

    Why it exists: at the demo's size, neighbouring tokens are denoised nearly independently and the
    tiles come out as a mosaic of token squares (README, "The demo")."""

    def __init__(self, in_channels: int, out_channels: int, channels: int, hidden: int):
        super().__init__()
        self.conv_in = nn.Conv2d(out_channels + in_channels, channels, 3, padding=1)
        self.time = nn.Linear(hidden, channels)
        self.conv_mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, prediction: torch.Tensor, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(torch.cat([prediction, x.to(prediction.dtype)], dim=1))
        h = nn.functional.silu(h + self.time(t_emb).to(h.dtype)[:, :, None, None])
        h = h + nn.functional.silu(self.conv_mid(h))
        return prediction + self.conv_out(h)


class DiTBlock(nn.Module):
    """PixArt block: AdaLN-modulated self-attention, cross-attention to the UNI token, optional
    cross-attention to GE tokens, AdaLN-modulated MLP. The modulation is the shared one plus this
    block's learnable scale-shift table."""

    def __init__(self, config: DiTConfig, ge_attention: nn.Module | None):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads=heads, dim_head=hidden // heads, bias=True, out_bias=True)
        self.uni_attn = Attention(hidden, cross_attention_dim=hidden, heads=heads, dim_head=hidden // heads,
                                  bias=True, out_bias=True)
        self.ge_attn = ge_attention
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(hidden, inner_dim=int(hidden * config.mlp_ratio), activation_fn="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden**0.5)
        self.local_bias = None
        if config.local_attention_bias:
            self.local_bias = LocalAttentionBias(config.latent_size // config.patch_size, heads)
            self.attn.set_processor(LocalBiasAttnProcessor(self.local_bias))

    def forward(self, x, modulation, uni_tokens, ge_tokens=None, ge_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None].to(modulation.dtype) + modulation.reshape(x.shape[0], 6, -1)
        ).chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.uni_attn(x, encoder_hidden_states=uni_tokens)
        if self.ge_attn is not None:
            x = x + self.ge_attn(x, encoder_hidden_states=ge_tokens, attention_mask=attention_bias_mask(ge_mask))
        return x + gate_mlp * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))


class STMDiT(nn.Module):
    """Denoiser: forward(x, t, uni, ge, drop_uni, drop_ge) -> prediction shaped like x
    (epsilon for `ddpm`, velocity for `flow`)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.gradient_checkpointing = False
        self.patch_embed = PatchEmbed(height=config.latent_size, width=config.latent_size, patch_size=config.patch_size,
                                      in_channels=config.in_channels, embed_dim=hidden,
                                      interpolation_scale=config.interpolation_scale)
        self.time_proj = Timesteps(config.timestep_freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(config.timestep_freq_dim, hidden)
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.uni_null = nn.Parameter(torch.randn(config.uni_dim) / config.uni_dim**0.5)
        self.uni_proj = PixArtAlphaTextProjection(config.uni_dim, hidden, act_fn="gelu_tanh")
        self.fusion = build_fusion(config)
        self.blocks = nn.ModuleList(
            DiTBlock(config, type(self.fusion).block_attention(config)) for _ in range(config.depth)
        )
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.out_scale_shift_table = nn.Parameter(torch.zeros(2, hidden))
        self.out_channels = config.in_channels * (2 if config.learned_sigma else 1)
        self.proj_out = nn.Linear(hidden, config.patch_size**2 * self.out_channels)
        self._init_weights()
        self.refiner = None  # built after PixArt's initialisation, which would overwrite its own
        if config.conv_refiner_channels:
            self.refiner = ConvRefiner(config.in_channels, self.out_channels, config.conv_refiner_channels, hidden)

    def _init_weights(self) -> None:
        """PixArt-alpha's initialisation: xavier linears, N(0, 0.02) for the timestep MLP, the
        modulation and the UNI projection; zero output layer and UNI cross-attention output.
        GE modules (the fusion and the blocks' GE attention) keep the fusion's own initialisation."""
        ge_modules = {id(m) for m in self.fusion.modules()}
        ge_modules |= {id(m) for b in self.blocks if b.ge_attn is not None for m in b.ge_attn.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in ge_modules:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for linear in (self.time_embedding.linear_1, self.time_embedding.linear_2, self.time_modulation[1],
                       self.uni_proj.linear_1, self.uni_proj.linear_2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.uni_attn.to_out[0].weight)
            nn.init.zeros_(block.uni_attn.to_out[0].bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    # --- forward -------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        uni: torch.Tensor | None,
        ge: GeBatch | None = None,
        drop_uni: torch.Tensor | None = None,
        drop_ge: torch.Tensor | None = None,
        encoded: EncodedConditions | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W) noisy latents; t (B,) or scalar, in [0, 1000]; uni (B, uni_dim) or None
        (= all dropped); ge the GE batch or None (= all dropped); drop_* (B,) bool: True replaces
        that sample's condition by the learnable null token. `encoded`: `encode_conditions` of the
        same uni, ge and drop flags, computed earlier (the result is the same)."""
        batch_size = x.shape[0]
        self._check_latents(x)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch_size)
        if t.shape != (batch_size,):
            raise ValueError(f"t must be a scalar or have shape ({batch_size},), got {tuple(t.shape)}")
        dtype = self.time_embedding.linear_1.weight.dtype
        t_emb = self.time_embedding(self.time_proj(t).to(dtype))
        t_emb = self.fusion.condition_timestep(t_emb, ge, drop_ge)
        modulation = self.time_modulation(t_emb)
        if encoded is None:
            encoded = self.encode_conditions(uni, ge, drop_uni, drop_ge, batch_size)
        uni_tokens = encoded.uni_tokens
        ge_tokens, ge_mask = encoded.ge_context if encoded.ge_context is not None else (None, None)

        h = self.patch_embed(x.to(dtype))
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, modulation, uni_tokens, ge_tokens, ge_mask, use_reentrant=False)
            else:
                h = block(h, modulation, uni_tokens, ge_tokens, ge_mask)
        shift, scale = (self.out_scale_shift_table[None].to(t_emb.dtype) + t_emb[:, None]).chunk(2, dim=1)
        prediction = self._unpatchify(self.proj_out(modulate(self.norm_out(h), shift, scale)))
        if self.refiner is not None:
            prediction = self.refiner(prediction, x, t_emb)
        return prediction[:, : self.config.in_channels]

    def encode_conditions(self, uni: torch.Tensor | None, ge: GeBatch | None, drop_uni: torch.Tensor | None,
                          drop_ge: torch.Tensor | None, batch_size: int) -> EncodedConditions:
        """The UNI token and the GE context of a batch, as `forward` uses them."""
        dtype, device = self.time_embedding.linear_1.weight.dtype, self.uni_null.device
        uni_tokens = self.uni_proj(self._uni_or_null(uni, drop_uni, batch_size, device, dtype))[:, None, :]
        return EncodedConditions(uni_tokens, self.fusion.context(ge, drop_ge, batch_size))

    def _check_latents(self, x: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.latent_size, c.latent_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def _uni_or_null(self, uni, drop_uni, batch_size, device, dtype) -> torch.Tensor:
        null = self.uni_null.to(dtype).expand(batch_size, -1)
        if uni is None:
            return null
        if uni.shape != (batch_size, self.config.uni_dim):
            raise ValueError(f"UNI must have shape ({batch_size}, {self.config.uni_dim}), got {tuple(uni.shape)}")
        drop = drop_flags(batch_size, drop_uni, device)
        return torch.where(drop[:, None], null, uni.to(dtype))

    def _unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        p, c, side = self.config.patch_size, self.out_channels, self.config.latent_size // self.config.patch_size
        h = h.reshape(h.shape[0], side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, side * p, side * p)

    # --- monitoring ----------------------------------------------------------------------------

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    @torch.no_grad()
    def condition_norms(self) -> dict[str, float]:
        """Norms of the condition branches for the training log: a zero-initialised GE branch that
        never grows (gate or cross-attention output near 0) is visible here."""
        def mean_out_norm(attr: str) -> float:
            norms = [getattr(b, attr).to_out[0].weight.float().norm() for b in self.blocks]
            return torch.stack(norms).mean().item()

        norms = {
            "uni_proj_norm": self.uni_proj.linear_2.weight.float().norm().item(),
            "uni_xattn_out_norm": mean_out_norm("uni_attn"),
        }
        norms.update(self.fusion.norms())
        if isinstance(self.blocks[0].ge_attn, Attention):
            norms["ge_xattn_out_norm"] = mean_out_norm("ge_attn")
        return norms

    # --- persistence ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, weights_name: str = MODEL_WEIGHTS_FILE,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write `config.json` and the weights (safetensors) into `directory`, each atomically.
        `state_dict` (e.g. EMA weights with the model's names) replaces the live weights."""
        directory = Path(directory)
        state = self.state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        config = self.config.to_dict()
        write_json(directory / CONFIG_NAME, {
            "_class_name": type(self).__name__,
            **config,
            "provenance": provenance("model", config),
        })
        with atomic_path(directory / weights_name) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "config": json.dumps(config)})

    @classmethod
    def from_pretrained(cls, directory: str | Path, weights_name: str = MODEL_WEIGHTS_FILE) -> "STMDiT":
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / weights_name
        if not config_path.is_file():
            raise InputError(config_path, "model config not found")
        try:
            values = json.loads(config_path.read_text())
            values = {k: v for k, v in values.items() if k not in ("_class_name", "provenance")}
            config = DiTConfig.from_dict(values)
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise InputError(config_path, f"invalid model config: {exc}") from None
        if not weights_path.is_file():
            raise InputError(weights_path, "model weights not found")
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise InputError(weights_path, f"cannot read safetensors weights: {exc}") from None
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise InputError(weights_path, f"weights do not match the config: {exc}") from None
        return model


def count_parameters(config: DiTConfig) -> int:
    """Number of parameters of STMDiT(config), built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = STMDiT(config)
    return sum(p.numel() for p in model.parameters())
