"""SD3 VAE: diffusers `AutoencoderKL` with 16 latent channels, the diffusion model's latent space.

Encoding: 256 px patches scaled to [-1, 1]; the stored latent is the posterior MEAN (not a
sample, so a spot's latent is deterministic), shifted and scaled as SD3 does,
`(mean - shift) * scale`, with shift/scale from the VAE config when it carries a shift_factor
(SD3's config: 0.0609 / 1.5305), else SD3's constants. `decode` inverts the scaling and runs the
VAE decoder, for the sampling stage.

Weights: a local diffusers directory (a pipeline folder with `vae/`, or the VAE folder itself),
or a hub id when allowed (default: stabilityai/stable-diffusion-3-medium-diffusers, subfolder vae).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stmdit.encoders.base import (
    LoadOptions,
    as_image_tensor,
    autocast,
    encoder_identity,
    log_hub_use,
    resolve_device,
    resolve_weights,
)
from stmdit.errors import InputError

log = logging.getLogger(__name__)

SD3_SHIFT = 0.0609
SD3_SCALE = 1.5305
INPUT_SIZE = 256
HUB_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
MODEL = "SD3 VAE (diffusers AutoencoderKL, 16 latent channels)"
KNOWN_ARCH_KEYS = ("input_size", "shift_factor", "scaling_factor", "subfolder")


def images_to_unit_range(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, size, size) in [-1, 1]."""
    x = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def unit_range_to_images(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    x = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class LatentCodec:
    """Shared interface of the real and smoke VAEs: `encode` uint8 patches -> {"latent"}, `decode`
    stored latents -> uint8 patches; `decode_tensor` keeps the [-1, 1] tensor on the device."""

    name = "sd3_vae"
    modality = "image"

    def __init__(self, impl: str, device: torch.device, shift: float, scale: float, input_size: int,
                 latent_shape: tuple[int, int, int], weights: str | None, model: str, bf16: bool = False):
        self.impl = impl
        self.device = device
        self.shift = float(shift)
        self.scale = float(scale)
        self.input_size = int(input_size)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.weights = weights
        self.model = model
        self.bf16 = bf16

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"latent": self.latent_shape}

    def describe(self) -> dict[str, Any]:
        return {
            **encoder_identity(self),
            "preprocessing": {
                "input_size": self.input_size,
                "resize": "bilinear, antialiased (only when patches are not input_size)",
                "scale": "uint8 / 127.5 - 1 -> [-1, 1]",
                "latent": "posterior mean (no sampling)",
                "stored": "(z - shift_factor) * scaling_factor",
                "shift_factor": self.shift,
                "scaling_factor": self.scale,
            },
            "shapes": {k: list(v) for k, v in self.output_shapes.items()},
            "device": str(self.device),
            "bf16": bool(self.bf16 and self.device.type == "cuda"),
        }

    def _encode_unit(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = images_to_unit_range(as_image_tensor(images, self.device), self.input_size)
        with autocast(self.device, self.bf16):
            z = self._encode_unit(x).float()
        return {"latent": ((z - self.shift) * self.scale).cpu().numpy().astype(np.float32)}

    @torch.inference_mode()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Stored (shifted, scaled) latents -> images in [-1, 1], (B, 3, H, W) float32."""
        z = latents.to(self.device, torch.float32) / self.scale + self.shift
        with autocast(self.device, self.bf16):
            return self._decode_unscaled(z).float().clamp(-1.0, 1.0)

    def decode(self, latents: np.ndarray | torch.Tensor) -> np.ndarray:
        """Stored latents (B, C, h, w) -> uint8 RGB patches (B, H, W, 3)."""
        latents = torch.as_tensor(np.asarray(latents, dtype=np.float32)) if isinstance(latents, np.ndarray) else latents
        return unit_range_to_images(self.decode_tensor(latents))


class DiffusersVae(LatentCodec):
    def __init__(self, vae: torch.nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.vae = vae

    def _encode_unit(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.mean

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample


def load_autoencoder(options: LoadOptions) -> tuple[torch.nn.Module, str]:
    from diffusers import AutoencoderKL

    unknown = sorted(set(options.arch) - set(KNOWN_ARCH_KEYS))
    if unknown:
        raise InputError(None, f"arch keys {unknown} are not understood by encoder sd3_vae (its architecture comes "
                               f"from the VAE config.json; known keys: {list(KNOWN_ARCH_KEYS)})")
    source = resolve_weights("sd3_vae", options.weights, HUB_ID, options.allow_hub)
    subfolder = options.arch.get("subfolder")
    if source.kind == "local":
        path = Path(source.location)
        if subfolder is None and (path / "vae" / "config.json").is_file():
            subfolder = "vae"
        if not (path / (subfolder or "") / "config.json").is_file():
            raise InputError(path, "not a diffusers VAE directory (no config.json here or in vae/)")
    else:
        subfolder = subfolder or "vae"
        log_hub_use("sd3_vae", source.location)
    where = f"{source.location}/{subfolder}" if subfolder else source.location
    try:
        vae, info = AutoencoderKL.from_pretrained(source.location, subfolder=subfolder, output_loading_info=True)
    except Exception as exc:  # diffusers raises many types for bad folders / network
        raise InputError(source.location, f"cannot load AutoencoderKL: {str(exc).splitlines()[0]}") from None
    # diffusers only warns about missing or unexpected keys: a partial VAE must not load
    problems = [f"{len(info[k])} {k.replace('_', ' ')}, e.g. {sorted(map(str, info[k]))[:3]}"
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if problems:
        raise InputError(where, "checkpoint does not match the VAE config: " + "; ".join(problems))
    return vae, where


def shift_and_scale(vae_config: Any, arch: dict) -> tuple[float, float]:
    """From `arch`, else from the VAE config when it has SD3's shift_factor, else SD3's constants."""
    config_shift = getattr(vae_config, "shift_factor", None)
    if config_shift is not None:
        shift, scale = float(config_shift), float(vae_config.scaling_factor)
    else:
        log.warning("VAE config has no shift_factor: using SD3's shift %.4f and scale %.4f", SD3_SHIFT, SD3_SCALE)
        shift, scale = SD3_SHIFT, SD3_SCALE
    return float(arch.get("shift_factor", shift)), float(arch.get("scaling_factor", scale))


def load_sd3_vae(options: LoadOptions) -> DiffusersVae:
    device = resolve_device(options.device)
    vae, weights = load_autoencoder(options)
    vae.eval().to(device)
    arch = dict(options.arch)
    shift, scale = shift_and_scale(vae.config, arch)
    input_size = int(arch.get("input_size", INPUT_SIZE))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if input_size % factor:
        raise InputError(weights, f"input size {input_size} is not a multiple of the VAE's downsampling factor {factor}")
    latent_shape = (int(vae.config.latent_channels), input_size // factor, input_size // factor)
    log.info("encoder sd3_vae: %s, latent %s, shift %.4f scale %.4f", weights, latent_shape, shift, scale)
    return DiffusersVae(
        vae, impl="real", device=device, shift=shift, scale=scale, input_size=input_size,
        latent_shape=latent_shape, weights=weights, model=MODEL, bf16=options.bf16,
    )
