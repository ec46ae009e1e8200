"""Frozen encoders: one registry mapping an encoder name to its loaders, preprocessing and
output shapes.

Every encoder has two implementations with the same interface:
- "real": the published model, weights from a local path (or a hub id when allowed);
- "smoke": a deterministic, weight-free stand-in that keeps image/expression content (smoke.py).

Interfaces (what `load_encoder` returns):
- image encoders (`modality == "image"`): `encode(images uint8 (B, H, W, 3)) -> {output: float32
  (B, *shape)}`; sd3_vae also has `decode(latents) -> uint8 images` and `decode_tensor`.
- expression encoder (cancerfoundation): `choose_genes(var_names, hvg_rank, max_genes,
  highly_variable)` fixes the gene list, then `encode(counts (B, G), spot_keys) -> {"embedding",
  "bins", "tokens", "token_mask"}` (a store keeps embedding and bins), and `tokens_from_bins(bins)`
  encodes stored bins on the encoder's device.
All have `output_shapes` (per spot, as loaded: architecture overrides change them) and
`describe()` (what the feature store records in attrs["encoder"]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from stmdit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, LoadOptions, resolve_device
from stmdit.encoders.cancerfoundation import load_cancerfoundation
from stmdit.encoders.midnight import MEAN as MIDNIGHT_MEAN
from stmdit.encoders.midnight import STD as MIDNIGHT_STD
from stmdit.encoders.midnight import load_midnight
from stmdit.encoders.sd3_vae import load_sd3_vae
from stmdit.encoders.smoke import SmokeCancerFoundation, load_smoke_vae, smoke_image_encoder
from stmdit.encoders.vit import (
    DEEPSPOT_BACKBONES,
    H0MINI,
    UNI2H,
    deepspot_backbone,
    load_deepspot_fm,
    load_h0mini,
    load_uni2h,
)
from stmdit.errors import InputError

__all__ = ["EncoderSpec", "LoadOptions", "REGISTRY", "ENCODER_NAMES", "IMAGE_ENCODERS", "get_spec", "load_encoder",
           "resolve_device"]

Loader = Callable[[LoadOptions], Any]


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder: what it is, how its inputs are prepared, what it outputs, how to load it."""

    name: str
    modality: str  # "image" | "expression"
    model: str
    preprocessing: str
    shapes: Mapping[str, Mapping[str, tuple]]  # variant ("" = default) -> output -> per-spot shape
    load_real: Loader
    load_smoke: Loader
    hub_id: str | None = None
    variants: tuple[str, ...] = ()

    def output_shapes(self, variant: str | None = None) -> dict[str, tuple]:
        """Per-spot output shapes of the published architecture (cancerfoundation: at 1,199 genes)."""
        return dict(self.shapes[variant or ""])


def _smoke_deepspot(options: LoadOptions):
    spec = deepspot_backbone(options.variant)
    return smoke_image_encoder("deepspot_fm", spec.embed_dim, spec.mean, spec.std, options, subtiles=True)


REGISTRY: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec(
            name="uni2h",
            modality="image",
            model=UNI2H.model,
            preprocessing="resize 256 -> 224 px (bilinear), ImageNet mean/std; CLS token",
            shapes={"": {"embedding": (1536,)}},
            load_real=load_uni2h,
            load_smoke=lambda o: smoke_image_encoder("uni2h", 1536, IMAGENET_MEAN, IMAGENET_STD, o),
            hub_id=UNI2H.hub_id,
        ),
        EncoderSpec(
            name="sd3_vae",
            modality="image",
            model="SD3 VAE (diffusers AutoencoderKL, 16 channels)",
            preprocessing="256 px in [-1, 1]; posterior mean, stored as (z - 0.0609) * 1.5305",
            shapes={"": {"latent": (16, 32, 32)}},
            load_real=load_sd3_vae,
            load_smoke=load_smoke_vae,
            hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
        ),
        EncoderSpec(
            name="cancerfoundation",
            modality="expression",
            model="CancerFoundation (6 layers, 8 heads, 256-d, vocab of gene symbols)",
            preprocessing="raw counts of <= 1,199 vocab HVGs, per-spot rank binning into 51 bins, seeded ties",
            shapes={"": {"embedding": (256,), "bins": (1199,)}},
            load_real=load_cancerfoundation,
            load_smoke=lambda o: SmokeCancerFoundation(o.seed, device=resolve_device(o.device)),
        ),
        EncoderSpec(
            name="deepspot_fm",
            modality="image",
            model="DeepSpot's backbone: UNI v1 (variant uni) or H-optimus-0 (variant hoptimus0)",
            preprocessing="the spot tile and its 3x3 sub-tiles, each resized to 224 px, the backbone's mean/std",
            shapes={
                "": {"embedding": (1024,), "subtiles": (9, 1024)},
                "uni": {"embedding": (1024,), "subtiles": (9, 1024)},
                "hoptimus0": {"embedding": (1536,), "subtiles": (9, 1536)},
            },
            load_real=load_deepspot_fm,
            load_smoke=_smoke_deepspot,
            hub_id=DEEPSPOT_BACKBONES["uni"].hub_id,
            variants=tuple(DEEPSPOT_BACKBONES),
        ),
        EncoderSpec(
            name="h0mini",
            modality="image",
            model=H0MINI.model,
            preprocessing="resize 256 -> 224 px (bicubic), H-optimus mean/std; CLS token",
            shapes={"": {"embedding": (768,)}},
            load_real=load_h0mini,
            load_smoke=lambda o: smoke_image_encoder("h0mini", 768, H0MINI.mean, H0MINI.std, o),
            hub_id=H0MINI.hub_id,
        ),
        EncoderSpec(
            name="midnight",
            modality="image",
            model="Midnight (transformers DINOv2 ViT-g/14)",
            preprocessing="resize 256 -> 224 px (bilinear), mean = std = 0.5; concat(CLS, mean patch token)",
            shapes={"": {"embedding": (3072,)}},
            load_real=load_midnight,
            load_smoke=lambda o: smoke_image_encoder("midnight", 3072, MIDNIGHT_MEAN, MIDNIGHT_STD, o),
            hub_id="kaiko-ai/midnight",
        ),
    )
}

ENCODER_NAMES = tuple(REGISTRY)
IMAGE_ENCODERS = tuple(name for name, spec in REGISTRY.items() if spec.modality == "image")


def get_spec(name: str) -> EncoderSpec:
    if name not in REGISTRY:
        raise InputError(None, f"unknown encoder {name!r} (known: {', '.join(ENCODER_NAMES)})")
    return REGISTRY[name]


def load_encoder(
    name: str,
    impl: str = "smoke",
    *,
    weights: str | None = None,
    allow_hub: bool = False,
    arch: Mapping[str, Any] | None = None,
    variant: str | None = None,
    device: str = "auto",
    bf16: bool = False,
    seed: int = 0,
) -> Any:
    """Build encoder `name` with implementation `impl` ("real" | "smoke").

    `weights`: local path or hub id (real only; hub ids need `allow_hub`). `arch`: architecture
    overrides (timm kwargs; CancerFoundation args; preprocessing keys such as input_size).
    `variant`: deepspot_fm's backbone ("uni" | "hoptimus0"). `seed`: CancerFoundation's binning seed.
    """
    spec = get_spec(name)
    if variant is not None and variant not in spec.variants:
        known = f"choose from {list(spec.variants)}" if spec.variants else "it has none"
        raise InputError(None, f"encoder {name} has no variant {variant!r} ({known})")
    options = LoadOptions(weights=weights, allow_hub=allow_hub, arch=dict(arch or {}), variant=variant,
                          device=device, bf16=bf16, seed=seed)
    if impl == "real":
        return spec.load_real(options)
    if impl == "smoke":
        return spec.load_smoke(options)
    raise InputError(None, f"unknown impl {impl!r} for encoder {name} (real or smoke)")
