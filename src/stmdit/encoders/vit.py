"""timm ViT encoders: UNI2-h, H0-mini, and DeepSpot's backbones (UNI v1, H-optimus-0).

Real weights come from a local file or directory (`model.safetensors`, `pytorch_model.bin`, ...;
a timm `config.json` beside them may name the architecture and add model args), or from the hub
id when the config allows it. Architecture kwargs follow the model cards; `arch` overrides them
(tests build tiny instances this way). Layer classes are named in kwargs by string
("swiglu_packed", "silu") so that the whole spec, and any override, is plain JSON.
The embedding is the CLS token after the final norm (`forward_features(x)[:, 0]`), which is
what these models return with `num_classes=0` and token pooling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from stmdit.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    ImagePreprocess,
    LoadOptions,
    SubtileImageEncoder,
    find_weights_file,
    load_state_dict_strict,
    log_hub_use,
    read_json,
    read_state_dict,
    resolve_device,
    resolve_weights,
)
from stmdit.errors import InputError

log = logging.getLogger(__name__)

HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
PREPROCESS_KEYS = ("input_size", "mean", "std", "interpolation")
# timm kwargs that decide the checkpoint's keys and shapes (a config.json may not contradict them)
SHAPE_KWARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "reg_tokens",
                "init_values", "no_embed_class", "class_token")


@dataclass(frozen=True)
class TimmModelSpec:
    """A timm model as its card describes it: architecture, kwargs, input normalisation, hub id."""

    model: str
    architecture: str
    kwargs: Mapping[str, Any]
    hub_id: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.kwargs["embed_dim"])


# UNI2-h model card (MahmoodLab/UNI2-h): ViT-H/14 with SwiGLU and 8 register tokens, 1536-d.
UNI2H = TimmModelSpec(
    model="UNI2-h (timm vit_giant_patch14_224, SwiGLU, 8 register tokens)",
    architecture="vit_giant_patch14_224",
    kwargs={
        "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
        "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
        "mlp_layer": "swiglu_packed", "act_layer": "silu", "reg_tokens": 8, "dynamic_img_size": True,
    },
    hub_id="hf-hub:MahmoodLab/UNI2-h",
)

# UNI (v1) model card (MahmoodLab/UNI): ViT-L/16, 1024-d.
UNI_V1 = TimmModelSpec(
    model="UNI v1 (timm vit_large_patch16_224)",
    architecture="vit_large_patch16_224",
    kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 1024, "init_values": 1e-5, "num_classes": 0,
            "dynamic_img_size": True},
    hub_id="hf-hub:MahmoodLab/UNI",
)

# H-optimus-0 (bioptimus/H-optimus-0 config.json + card): ViT-g/14 with 4 registers, 1536-d,
# its own mean/std, bicubic resize, fixed 224 input.
HOPTIMUS0 = TimmModelSpec(
    model="H-optimus-0 (timm vit_giant_patch14_reg4_dinov2)",
    architecture="vit_giant_patch14_reg4_dinov2",
    kwargs={"img_size": 224, "embed_dim": 1536, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.33334,
            "global_pool": "token", "dynamic_img_size": False},
    hub_id="hf-hub:bioptimus/H-optimus-0",
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    interpolation="bicubic",
)

# H0-mini (bioptimus/H0-mini card): ViT-B/14 with 4 registers distilled from H-optimus-0, created
# with `mlp_layer=SwiGLUPacked, act_layer=SiLU`; the card's embedding is the CLS token, (1, 768)
# (it also shows concat(CLS, mean patch) as a 1536-d option; the paper uses 768-d, so CLS here).
# Its checkpoint's fc1 is (4096, 768): packed SwiGLU of hidden 2048, i.e. mlp_ratio 4096 / 768 =
# 5.33334 as for H-optimus-0 (bioptimus/H-optimus-0 config.json); layer scale 1e-5 as in DINOv2;
# no config.json is needed beside the weights (timm's default mlp_ratio 4 would not load them).
H0MINI = TimmModelSpec(
    model="H0-mini (timm vit_base_patch14_reg4_dinov2, SwiGLU, 4 register tokens)",
    architecture="vit_base_patch14_reg4_dinov2",
    kwargs={"img_size": 224, "patch_size": 14, "embed_dim": 768, "depth": 12, "num_heads": 12, "reg_tokens": 4,
            "init_values": 1e-5, "mlp_ratio": 5.33334, "num_classes": 0, "global_pool": "token",
            "mlp_layer": "swiglu_packed", "act_layer": "silu", "dynamic_img_size": False},
    hub_id="hf-hub:bioptimus/H0-mini",
    mean=HOPTIMUS_MEAN,
    std=HOPTIMUS_STD,
    interpolation="bicubic",
)

DEEPSPOT_BACKBONES = {"uni": UNI_V1, "hoptimus0": HOPTIMUS0}


def timm_layer(value: Any) -> Any:
    """Layer classes by name, so kwargs stay JSON: "swiglu_packed", "swiglu", "mlp", "silu", "gelu"."""
    if not isinstance(value, str):
        return value
    import timm.layers

    layers = {
        "swiglu_packed": timm.layers.SwiGLUPacked,
        "swiglu": timm.layers.SwiGLU,
        "mlp": timm.layers.Mlp,
        "silu": torch.nn.SiLU,
        "gelu": torch.nn.GELU,
    }
    if value not in layers:
        raise InputError(None, f"unknown timm layer name {value!r} (known: {sorted(layers)})")
    return layers[value]


def timm_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: timm_layer(v) if k in ("mlp_layer", "act_layer") else v for k, v in kwargs.items()}


def split_arch(arch: Mapping[str, Any]) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """`arch` override -> (architecture, model kwargs, preprocessing overrides)."""
    arch = dict(arch)
    architecture = arch.pop("architecture", None)
    preprocess = {k: arch.pop(k) for k in PREPROCESS_KEYS if k in arch}
    return architecture, arch, preprocess


def check_timm_config(path, config: Mapping[str, Any], spec: TimmModelSpec, architecture: str | None,
                      overrides: Mapping[str, Any]) -> None:
    """A timm config.json beside the weights must describe the published architecture: same
    architecture name and the same value for every model arg the spec fixes (unless overridden)."""
    named = config.get("architecture")
    if named and not architecture and named != spec.architecture:
        raise InputError(path, f"config names architecture {named!r}; {spec.model} is {spec.architecture!r}")
    for key, value in (config.get("model_args") or {}).items():
        if key in overrides or key not in spec.kwargs or key not in SHAPE_KWARGS:
            continue
        published = spec.kwargs[key]
        same = (abs(float(value) - float(published)) < 1e-3 if isinstance(published, float) and
                isinstance(value, (int, float)) else value == published)
        if not same:
            raise InputError(path, f"config sets {key} = {value!r}, the published {spec.model} has {published!r}")


def build_timm_model(name: str, spec: TimmModelSpec, options: LoadOptions) -> tuple[torch.nn.Module, str]:
    """The model with its weights, and a description of where the weights came from."""
    import timm

    architecture, overrides, _ = split_arch(options.arch)
    source = resolve_weights(name, options.weights, spec.hub_id, options.allow_hub)
    kwargs = dict(spec.kwargs)
    if source.kind == "hub":
        kwargs.update(overrides)
        hub_id = source.location if source.location.startswith(("hf-hub:", "hf_hub:")) else f"hf-hub:{source.location}"
        log_hub_use(name, hub_id)
        try:
            model = timm.create_model(hub_id, pretrained=True, **timm_kwargs(kwargs))
        except Exception as exc:  # network, gating, missing repo
            raise InputError(hub_id, f"cannot load encoder {name} from the hub: {exc}") from None
        return model, hub_id

    weights_file = find_weights_file(source.path)
    config_file = weights_file.parent / "config.json"
    if config_file.is_file():
        check_timm_config(config_file, read_json(config_file), spec, architecture, overrides)
        for key, value in (read_json(config_file).get("model_args") or {}).items():
            kwargs.setdefault(key, value)
    kwargs.update(overrides)
    architecture = architecture or spec.architecture
    try:
        model = timm.create_model(architecture, pretrained=False, **timm_kwargs(kwargs))
    except Exception as exc:
        raise InputError(weights_file, f"cannot build timm model {architecture} with {kwargs}: {exc}") from None
    load_state_dict_strict(model, read_state_dict(weights_file), weights_file)
    log.info("encoder %s: %s weights from %s", name, architecture, weights_file)
    return model, str(weights_file)


class TimmClsBackbone:
    """CLS token after the final norm of a timm ViT."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)[:, 0]


def preprocess_for(spec: TimmModelSpec, options: LoadOptions, model: torch.nn.Module | None = None) -> ImagePreprocess:
    _, kwargs, overrides = split_arch(options.arch)
    size = overrides.get("input_size") or kwargs.get("img_size") or spec.kwargs.get("img_size", 224)
    if model is not None and getattr(model, "patch_embed", None) is not None and not overrides.get("input_size"):
        size = model.patch_embed.img_size[0]
    return ImagePreprocess(
        input_size=int(size),
        mean=tuple(overrides.get("mean", spec.mean)),
        std=tuple(overrides.get("std", spec.std)),
        interpolation=overrides.get("interpolation", spec.interpolation),
    )


def load_timm_encoder(name: str, spec: TimmModelSpec, options: LoadOptions, subtiles: bool = False) -> ImageEncoder:
    device = resolve_device(options.device)
    model, weights = build_timm_model(name, spec, options)
    model.eval().to(device)
    encoder_class = SubtileImageEncoder if subtiles else ImageEncoder
    return encoder_class(
        name=name,
        impl="real",
        backbone=TimmClsBackbone(model),
        dim=int(model.num_features),
        preprocess=preprocess_for(spec, options, model),
        device=device,
        bf16=options.bf16,
        weights=weights,
        model=spec.model,
    )


def deepspot_backbone(variant: str | None) -> TimmModelSpec:
    variant = variant or "uni"
    if variant not in DEEPSPOT_BACKBONES:
        raise InputError(None, f"deepspot_fm variant {variant!r} is unknown (choose from {sorted(DEEPSPOT_BACKBONES)})")
    return DEEPSPOT_BACKBONES[variant]


def load_uni2h(options: LoadOptions) -> ImageEncoder:
    return load_timm_encoder("uni2h", UNI2H, options)


def load_h0mini(options: LoadOptions) -> ImageEncoder:
    return load_timm_encoder("h0mini", H0MINI, options)


def load_deepspot_fm(options: LoadOptions) -> ImageEncoder:
    return load_timm_encoder("deepspot_fm", deepspot_backbone(options.variant), options, subtiles=True)
