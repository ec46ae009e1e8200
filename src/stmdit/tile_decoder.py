"""The VAE decoder of tile stores, for every command that reads tiles: `CodecSettings` (which
decoder), `StoreDecoder` (loaded at first use, only when a store keeps latents only), its identity
as stores record it, and the command-line options. It imports no denoiser (and so not diffusers'
model code): the evaluation commands that only read tiles start in a fraction of the time."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stmdit.features import parse_arch

log = logging.getLogger(__name__)


@dataclass
class CodecSettings:
    """The VAE decoder (`sd3_vae`) of the tiles: implementation, weights (local diffusers folder, or
    hub id with `allow_hub`), JSON architecture overrides, bf16. The sampling commands and
    `StoreDecoder` decode in float32 (the sampler's bf16 is the denoiser's only), so a tile's pixels
    are the same whether they were stored or are decoded later."""

    impl: str = "smoke"
    weights: str | None = None
    arch_json: str | None = None
    allow_hub: bool = False
    bf16: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "CodecSettings":
        """From the options of `add_vae_options` (float32: see the class)."""
        return cls(impl=args.vae_impl, weights=args.vae_weights, arch_json=getattr(args, "vae_arch_json", None),
                   allow_hub=bool(getattr(args, "allow_hub", False)))


def load_codec(settings: CodecSettings, device: torch.device):
    from stmdit.encoders import load_encoder

    return load_encoder("sd3_vae", settings.impl, weights=settings.weights, allow_hub=settings.allow_hub,
                        arch=parse_arch(settings.arch_json), device=str(device.type), bf16=settings.bf16)


def decoder_identity(codec) -> dict[str, Any]:
    """What makes two decoders decode a latent alike (`image_stores.DECODER_IDENTITY_KEYS`): a tile
    store records it, and reading a latents-only store checks the given decoder against it."""
    from stmdit.encoders.base import weights_digest

    return {"impl": codec.impl, "weights": codec.weights,
            "weights_sha256": weights_digest(codec.weights) if codec.impl == "real" else None,
            "shift_factor": codec.shift, "scaling_factor": codec.scale, "latent_shape": list(codec.latent_shape)}


class StoreDecoder:
    """The decoder that commands reading tile stores give `image_stores.open_image_store`: loaded
    (on `device`) only when a store keeps latents only, at its first use."""

    def __init__(self, settings: CodecSettings, device: str = "cpu", codec=None):
        self.settings = settings
        self.device = device
        self._codec = codec  # already loaded, as by a sampling session
        self._identity: dict[str, Any] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "StoreDecoder":
        """From the options of `add_vae_options` (and --device, where the command has one)."""
        return cls(CodecSettings.from_args(args), getattr(args, "device", None) or "cpu")

    @property
    def codec(self):
        if self._codec is None:
            self._codec = load_codec(self.settings, resolve_device(self.device))
        return self._codec

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.codec.decode(latents)

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = decoder_identity(self.codec)
        return self._identity


def resolve_device(name: str) -> torch.device:
    from stmdit.encoders import resolve_device as resolve

    device = resolve(name)
    log.info("device: %s%s", device, "" if device.type == "cuda" else " (no CUDA, or CPU requested)")
    return device


def add_vae_options(p: argparse.ArgumentParser, help_impl: str | None = None, allow_hub: bool = True) -> None:
    """--vae-impl, --vae-weights, --vae-arch-json, --allow-hub (`allow_hub`: unless the command has its
    own): the decoder, as `load_codec` and `StoreDecoder` take it."""
    p.add_argument("--vae-impl", choices=("smoke", "real"), default="smoke", help=help_impl)
    p.add_argument("--vae-weights", help="SD3 VAE weights: local diffusers folder, or hub id with --allow-hub")
    p.add_argument("--vae-arch-json", help="JSON object of sd3_vae overrides")
    if allow_hub:
        p.add_argument("--allow-hub", action="store_true", help="allow loading the VAE from the Hugging Face hub")


TILES_DECODER_HELP = "decoder of tile stores that keep latents only (as the tiles were sampled with)"
