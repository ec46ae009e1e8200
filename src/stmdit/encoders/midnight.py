"""Midnight (kaiko-ai/midnight): a DINOv2 ViT-g/14 loaded with transformers `AutoModel`.

Model card: 224 px input normalised with mean = std = 0.5; the classification embedding is the
CLS token concatenated with the mean of the patch tokens of `last_hidden_state` (1536 + 1536 =
3072-d). Register tokens, if a checkpoint has them, are excluded from the patch mean.
"""

from __future__ import annotations

import logging

import torch

from stmdit.encoders.base import ImageEncoder, ImagePreprocess, LoadOptions, log_hub_use, resolve_device, resolve_weights
from stmdit.errors import InputError

log = logging.getLogger(__name__)

MODEL = "Midnight (transformers Dinov2Model, CLS + mean patch token)"
HUB_ID = "kaiko-ai/midnight"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
INPUT_SIZE = 224
KNOWN_ARCH_KEYS = ("input_size", "mean", "std", "interpolation")


class ClsMeanPatchBackbone:
    """concat(CLS, mean of patch tokens) of a transformers ViT's last hidden state."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.n_prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=x).last_hidden_state
        return torch.cat([hidden[:, 0], hidden[:, self.n_prefix:].mean(dim=1)], dim=-1)


def load_transformers_model(name: str, options: LoadOptions) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModel

    unknown = sorted(set(options.arch) - set(KNOWN_ARCH_KEYS))
    if unknown:
        raise InputError(None, f"arch keys {unknown} are not understood by encoder {name} (its architecture comes "
                               f"from config.json; known keys: {list(KNOWN_ARCH_KEYS)})")
    source = resolve_weights(name, options.weights, HUB_ID, options.allow_hub)
    if source.kind == "hub":
        log_hub_use(name, source.location)
    location = source.location
    try:
        model, info = AutoModel.from_pretrained(location, output_loading_info=True)
    except Exception as exc:  # missing config, network, unknown model type
        raise InputError(location, f"cannot load encoder {name} with transformers AutoModel: {exc}") from None
    problems = [f"{len(info[k])} {k.replace('_', ' ')}, e.g. {sorted(map(str, info[k]))[:3]}"
                for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)]
    if problems:
        raise InputError(location, "checkpoint does not match its config: " + "; ".join(problems))
    return model, location


def load_midnight(options: LoadOptions) -> ImageEncoder:
    device = resolve_device(options.device)
    model, weights = load_transformers_model("midnight", options)
    model.eval().to(device)
    arch = dict(options.arch)
    return ImageEncoder(
        name="midnight",
        impl="real",
        backbone=ClsMeanPatchBackbone(model),
        dim=2 * int(model.config.hidden_size),
        preprocess=ImagePreprocess(
            input_size=int(arch.get("input_size", INPUT_SIZE)),
            mean=tuple(arch.get("mean", MEAN)),
            std=tuple(arch.get("std", STD)),
            interpolation=arch.get("interpolation", "bilinear"),
        ),
        device=device,
        bf16=options.bf16,
        weights=weights,
        model=MODEL,
    )
