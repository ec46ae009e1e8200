"""PixCell-256 (StonyBrook-CVLab/PixCell-256) loaded into the project's denoiser, so the published
model samples through the same sampler, guidance and regimes as every trained one.

The release is diffusers' layout: `transformer/config.json` + `diffusion_pytorch_model.safetensors`
of a PixArt transformer (cvlab-stonybrook/PixCell, controlnet/pixcell_transformer_2d.py) whose
caption projection takes the 1536-d UNI-2h embedding and also holds the learned unconditional
embedding (`caption_projection.uncond_embedding`, the null token of classifier-free guidance).
It is PixArt-XL/2 (hidden 16 x 72 = 1152, 28 blocks, patch 2) on 16 x 32 x 32 SD3 latents with a
learned-sigma head (32 output channels; the first 16 are epsilon) and position embeddings at
interpolation scale 0.5 (configs/pan_cancer/pixart_20x_256.py: pe_interpolation = 0.5).
PixCell-1024 (16 UNI tokens with their own position embedding) is not supported.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from stmdit.encoders.base import load_state_dict_strict, read_json, read_state_dict
from stmdit.errors import InputError
from stmdit.model.dit import DiTConfig, STMDiT

PIXCELL_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # the diffusers transformer folder's
CLASS_NAMES = ("PixArtTransformer2DModel", "PixCellTransformer2DModel")

# diffusers PixArt names -> STMDiT names (block index kept)
KEY_RULES = (
    (r"^pos_embed\.proj\.", "patch_embed.proj."),
    (r"^adaln_single\.emb\.timestep_embedder\.", "time_embedding."),
    (r"^adaln_single\.linear\.", "time_modulation.1."),
    (r"^caption_projection\.linear_", "uni_proj.linear_"),
    (r"^transformer_blocks\.(\d+)\.attn1\.", r"blocks.\1.attn."),
    (r"^transformer_blocks\.(\d+)\.attn2\.", r"blocks.\1.uni_attn."),
    (r"^transformer_blocks\.(\d+)\.", r"blocks.\1."),
    (r"^scale_shift_table$", "out_scale_shift_table"),
)


def transformer_folder(path: str | Path) -> Path:
    path = Path(path)
    return path / "transformer" if (path / "transformer" / "config.json").is_file() else path


def is_pixcell_folder(path: str | Path) -> bool:
    config = transformer_folder(path) / "config.json"
    return config.is_file() and read_json(config).get("_class_name") in CLASS_NAMES


def dit_config(config: dict[str, Any], source: Path) -> DiTConfig:
    """The STMDiT configuration of a PixArt/PixCell transformer config, or an error naming what differs."""
    def need(key: str, allowed) -> Any:
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise InputError(source, f"{key} = {value!r} is not supported (expected {allowed})")
        return value

    need("norm_type", ("ada_norm_single",))
    need("activation_fn", ("gelu-approximate",))
    need("attention_bias", (True,))
    if int(config.get("caption_num_tokens", 1)) != 1:
        raise InputError(source, f"caption_num_tokens = {config['caption_num_tokens']}: PixCell-1024's multi-token "
                                 "UNI conditioning is not supported (only PixCell-256, one UNI token)")
    sample_size = int(config.get("sample_size", 128))
    if config.get("use_additional_conditions", sample_size == 128):
        raise InputError(source, "use_additional_conditions (resolution/aspect embeddings) is not supported")
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    hidden = heads * head_dim
    if int(config.get("cross_attention_dim") or hidden) != hidden:
        raise InputError(source, "cross_attention_dim must equal the hidden size")
    in_channels = int(config.get("in_channels", 4))
    out_channels = int(config.get("out_channels") or in_channels)
    if out_channels not in (in_channels, 2 * in_channels):
        raise InputError(source, f"out_channels {out_channels} is neither in_channels nor 2 x in_channels (learned sigma)")
    if config.get("caption_channels") is None:
        raise InputError(source, "caption_channels is missing: PixCell conditions on a UNI embedding")
    scale = config.get("interpolation_scale")
    return DiTConfig(
        hidden_size=hidden, depth=int(config["num_layers"]), num_heads=heads,
        patch_size=int(config.get("patch_size", 2)), in_channels=in_channels, latent_size=sample_size,
        uni_dim=int(config["caption_channels"]), ge_fusion="none", ge_tokens=None,
        interpolation_scale=float(scale) if scale is not None else float(max(sample_size // 64, 1)),
        learned_sigma=out_channels == 2 * in_channels,
    )


def convert_key(key: str) -> str:
    """One diffusers PixCell key in STMDiT's names (the unconditional embedding is the UNI null token)."""
    if key == "caption_projection.uncond_embedding":
        return "uni_null"
    for pattern, replacement in KEY_RULES:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {convert_key(k): v for k, v in state.items()}
    if "uni_null" in out:
        out["uni_null"] = out["uni_null"].reshape(-1)
    return out


def convert_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """As convert_state_dict, on a checkpoint's key -> shape (preflight reads headers only)."""
    out = {convert_key(k): tuple(v) for k, v in shapes.items()}
    if "uni_null" in out:
        out["uni_null"] = (math.prod(out["uni_null"]),)
    return out


def load_pixcell(path: str | Path) -> STMDiT:
    """PixCell's diffusers folder (the release root or its transformer/) as an STMDiT, strictly."""
    folder = transformer_folder(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputError(config_path, "missing: PixCell's diffusers transformer needs its config.json")
    config = dit_config(read_json(config_path), config_path)
    weights = folder / PIXCELL_WEIGHTS_FILE
    if not weights.is_file():
        raise InputError(weights, "missing: PixCell's transformer weights")
    state = convert_state_dict(read_state_dict(weights))
    if "uni_null" not in state:
        raise InputError(weights, "no caption_projection.uncond_embedding: PixCell's unconditional UNI token is missing")
    model = STMDiT(config)
    load_state_dict_strict(model, state, weights)
    return model
