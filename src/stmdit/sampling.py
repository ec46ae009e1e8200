"""Sampling from trained STMDiT models (paper 2.2, D.3): the library every sampling command uses.

A `SamplingSession`, built from one `SessionSettings` (model folder, device, `SamplerSettings`,
`CodecSettings`), opens the trained model once (EMA weights, checked finite), checks that it can be
sampled in the regime with the solver, opens the VAE decoder (`sd3_vae`) when first needed and
checks it against the model, and gathers the provenance attributes; it then samples latents of
given noise keys and conditions, and generates whole output stores (`write_tile_store`). The
commands `stmdit tiles` (`stmdit.tiles`), `perturbed-tiles`, `virtual-tiles`, `generate`,
`layout-probe` and `bench sample` all go through it.

Samplers follow the model's training objective and the solver (`stmdit.solvers`: the paper's DDIM
for ddpm and Euler for flow by default, DPM-Solver++(2M) or, for flow, Heun).

The noise of a spot comes from `keyed_generator(seed, "sample", key)` only. The model runs on
batches padded (by repeating the last spot) to a multiple of PAD_MULTIPLE rows: MKL picks its GEMM
kernel, and with it the float summation order, by row count for small row counts (measured on CPU:
1-3 rows, and with 2 threads any count below 12 that is not a multiple of 4, differ from larger
batches in the last bit). With the padding a spot's latents are bit-identical whatever the batch
size and whichever other spots are sampled (on the same device and thread count).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from stmdit.cli import BF16_DEFAULT, add_bf16_option
from stmdit.errors import InputError
from stmdit.features import check_finite_rows, open_feature_store, staged_spot_store
from stmdit.ge_inputs import GeTokenSource, check_trained_encoder, encoder_identity
from stmdit.loader import GeBatch, store_rows
from stmdit.model import GE, REGIMES, UNI_GE, STMDiT, guided_prediction, regime_spec
from stmdit.model.dit import EMA_WEIGHTS_FILE
from stmdit.model.guidance import ConditionCache
from stmdit.models_config import OBJECTIVE_SOLVERS
from stmdit.provenance import params_hash, provenance
from stmdit.regimes import PAPER_S_GE, PAPER_S_UNI
from stmdit.solvers import DEFAULT, SOLVERS, Predictor, check_solver, denoise, describe_scheduler, predictor_calls
from stmdit.train_utils import keyed_generator
from stmdit.tile_decoder import CodecSettings, StoreDecoder, add_vae_options, decoder_identity, load_codec, resolve_device
from stmdit.zarr_rows import read_array_rows

log = logging.getLogger(__name__)

PAD_MULTIPLE = 8
LATENT_CHUNK_SPOTS = 8  # 8 x 64 KiB float32 latents per chunk
IMAGE_CHUNK_SPOTS = 16  # as the patches stores: 16 x 256 x 256 x 3 = 3 MiB


# ---------------------------------------------------------------------------------------------
# Trained model folders


@dataclass
class TrainedModel:
    """A finished model folder: EMA weights, its objective and the training settings."""

    path: Path
    model: STMDiT
    objective: str
    settings: dict
    settings_hash: str
    ge_encoder: dict | None = None  # the GE store's encoder at training (training.json; None before it was kept)

    @property
    def config(self):
        return self.model.config

    def describe(self) -> dict[str, Any]:
        return {
            "folder": str(self.path),
            "settings_hash": self.settings_hash,
            "objective": self.objective,
            "ge_fusion": self.config.ge_fusion,
            "ge_tokens": self.config.ge_tokens,
            "config": self.config.to_dict(),
        }


def load_trained_model(model_dir: str | Path, device: torch.device | str = "cpu") -> TrainedModel:
    """The EMA model of a finished training run (`config.json`, `ema.safetensors`, `training.json`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(model_dir, "model folder not found")
    from stmdit.model.pixcell import is_pixcell_folder, load_pixcell, transformer_folder

    if is_pixcell_folder(model_dir):  # PixCell-256's diffusers release: epsilon (DDPM), never trained here
        model = load_pixcell(model_dir).to(device).eval()
        from stmdit.encoders.base import weights_digest

        digest = weights_digest(transformer_folder(model_dir) / "diffusion_pytorch_model.safetensors")
        check_finite_weights(model, transformer_folder(model_dir) / "diffusion_pytorch_model.safetensors")
        settings = {"objective": "ddpm", "pretrained": {"format": "pixcell", "path": str(model_dir),
                                                        "sha256": digest}}
        return TrainedModel(model_dir, model, "ddpm", settings, params_hash(settings))
    training_path = model_dir / "training.json"
    if not training_path.is_file():
        raise InputError(training_path, "training.json not found (not a model folder written by stmdit train)")
    try:
        training = json.loads(training_path.read_text())
        settings = dict(training["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(training_path, f"cannot read the training settings: {exc}") from None
    objective = settings.get("objective")
    if objective not in OBJECTIVE_SOLVERS:
        raise InputError(training_path, f"unknown objective {objective!r} (expected one of {', '.join(OBJECTIVE_SOLVERS)})")
    if not (model_dir / EMA_WEIGHTS_FILE).is_file():
        raise InputError(model_dir / EMA_WEIGHTS_FILE, "EMA weights not found: has training finished?")
    model = STMDiT.from_pretrained(model_dir, weights_name=EMA_WEIGHTS_FILE).to(device).eval()
    check_finite_weights(model, model_dir / EMA_WEIGHTS_FILE)
    settings_hash = (training.get("provenance") or {}).get("params_hash") or params_hash(settings)
    return TrainedModel(model_dir, model, objective, settings, settings_hash, training.get("ge_encoder"))


def check_finite_weights(model: torch.nn.Module, weights_path: str | Path) -> None:
    """InputError naming the weights file and the first tensor holding a NaN or inf: such a model
    samples NaN latents, which the decoder turns into plausible-looking flat tiles."""
    tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point() or t.is_complex()]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).cpu()  # one device sync
    if bool(finite.all()):
        return
    name, tensor = tensors[int(torch.nonzero(~finite)[0])]
    kinds = " and ".join(k for k, bad in (("NaN", torch.isnan(tensor).any()), ("inf", torch.isinf(tensor).any()))
                         if bool(bad))
    raise InputError(weights_path, f"tensor {name!r} holds {kinds} values ({int((~finite).sum())} of "
                                   f"{len(tensors)} tensors are not finite): the model cannot be sampled")


def check_regime(trained: TrainedModel, regime: str) -> None:
    """InputError naming the model folder when the model cannot be sampled in `regime`."""
    if regime not in REGIMES:
        raise InputError(None, f"unknown regime {regime!r} (known: {', '.join(REGIMES)})")
    if regime_spec(regime).needs_ge_model and not trained.config.uses_ge:
        raise InputError(trained.path, f"the model is UNI-only (ge_fusion none) and cannot be sampled in regime "
                                       f"{regime!r}; use uni or uncond")


def regime_uses_ge(regime: str) -> bool:
    return regime in (UNI_GE, GE)


# ---------------------------------------------------------------------------------------------
# Sampler


@dataclass
class SamplerSettings:
    """How to sample. Defaults: the paper's (50 steps, seed 42, s_uni 4, s_ge 3, batch 32)."""

    regime: str = UNI_GE
    steps: int = 50
    seed: int = 42
    s_uni: float = PAPER_S_UNI
    s_ge: float = PAPER_S_GE
    batch_size: int = 32
    bf16: bool = BF16_DEFAULT  # bf16 autocast of the denoiser on CUDA (ignored on CPU)
    solver: str = DEFAULT  # stmdit.solvers: default (DDIM / Euler), dpmpp_2m, heun / unipc (flow)

    def __post_init__(self):
        if self.steps < 1:
            raise InputError(None, f"steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise InputError(None, f"batch size must be at least 1, got {self.batch_size}")
        if self.solver not in SOLVERS:
            raise InputError(None, f"unknown solver {self.solver!r} (known: {', '.join(SOLVERS)})")

    def describe(self, objective: str) -> dict[str, Any]:
        spec = regime_spec(self.regime)
        return {
            **describe_scheduler(objective, self.steps, self.solver),
            "guidance": spec.guidance,
            "forward_rows_per_tile": predictor_calls(self.solver, self.steps) * len(spec.conditions),
            "pad_multiple": PAD_MULTIPLE,
            "noise": 'keyed_generator(seed, "sample", spot key)',
            **asdict(self),
        }


def initial_noise(noise_keys: Sequence[str], seed: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """(N, C, H, W) standard normal noise; row i depends only on (seed, noise_keys[i])."""
    if not len(noise_keys):
        raise ValueError("no spots to sample")
    return torch.stack([torch.randn(tuple(latent_shape), generator=keyed_generator(seed, "sample", str(key)))
                        for key in noise_keys])


def guided_predictor(
    model: torch.nn.Module,
    uni: torch.Tensor | None,
    ge: GeBatch | None,
    regime: str,
    s_uni: float,
    s_ge: float,
    autocast_dtype: torch.dtype | None = None,
) -> Predictor:
    """predict(x, t) = `guided_prediction` in `regime` (all conditionings in one forward pass);
    the conditions' encoding is computed at the first call and kept for the later steps."""
    cache = ConditionCache()

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        context = (torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
                   if autocast_dtype is not None else contextlib.nullcontext())
        with context:
            return guided_prediction(model, x, t, uni, ge, regime=regime, s_uni=s_uni, s_ge=s_ge, cache=cache).float()

    return predict


def pad_rows(tensor: torch.Tensor | None, multiple: int = PAD_MULTIPLE) -> torch.Tensor | None:
    """Rows repeated from the last one up to a multiple of `multiple` rows."""
    if tensor is None:
        return None
    extra = -len(tensor) % multiple
    return torch.cat([tensor, tensor[-1:].expand(extra, *tensor.shape[1:])]) if extra else tensor


def pad_ge(ge: GeBatch | None, multiple: int = PAD_MULTIPLE) -> GeBatch | None:
    if ge is None:
        return None
    return GeBatch(pad_rows(ge.cls, multiple), pad_rows(ge.tokens, multiple), pad_rows(ge.token_mask, multiple))


def autocast_dtype_for(device: torch.device, bf16: bool) -> torch.dtype | None:
    return torch.bfloat16 if bf16 and device.type == "cuda" else None


def sample_latents(
    model: STMDiT,
    objective: str,
    noise_keys: Sequence[str],
    uni: torch.Tensor | None,
    ge: GeBatch | None,
    settings: SamplerSettings,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Latents (N, C, H, W) float32 on the CPU of one batch of spots, sampled in `settings.regime`."""
    device = torch.device(device)
    config = model.config
    noise = initial_noise(noise_keys, settings.seed, (config.in_channels, config.latent_size, config.latent_size))
    n = len(noise)
    uni = None if uni is None else pad_rows(uni.float()).to(device)
    ge = None if ge is None else pad_ge(ge).to(device)
    predict = guided_predictor(model, uni, ge, settings.regime, settings.s_uni, settings.s_ge,
                               autocast_dtype_for(device, settings.bf16))
    return denoise(predict, pad_rows(noise).to(device), objective, settings.steps, settings.solver)[:n].cpu()


# ---------------------------------------------------------------------------------------------
# Conditions of the spots to sample


class StoreConditions:
    """UNI and GE of spots read from the feature stores, one batch at a time (GE tokens are encoded
    from the stored bins, on `device`, batch by batch). `noise_keys` = `keys`.

    `trained_with`: the GE encoder the model was trained with (`TrainedModel.ge_encoder`), which the
    store's must be."""

    def __init__(self, keys: Sequence[str], uni_store: str | Path, ge_store: str | Path | None, config,
                 device: torch.device | str = "cpu", trained_with: Mapping[str, Any] | None = None,
                 model_path: str | Path | None = None):
        self.keys = [str(k) for k in keys]
        self.noise_keys = self.keys
        uni_group = open_feature_store(uni_store)
        self.uni = check_finite_rows(read_array_rows(uni_group["embedding"], store_rows(uni_group, self.keys, uni_store)),
                                     uni_store, "embedding", self.keys)
        check_width(uni_store, "UNI embedding", self.uni.shape[-1], config.uni_dim)
        self.ge_cls = self.ge_tokens = None
        self.ge_store = ge_store
        if ge_store is not None:
            group = open_feature_store(ge_store)
            self.ge_rows = store_rows(group, self.keys, ge_store)
            self.ge_cls = check_finite_rows(read_array_rows(group["embedding"], self.ge_rows), ge_store, "embedding",
                                            self.keys)
            check_width(ge_store, "GE embedding", self.ge_cls.shape[-1], config.ge_dim)
            check_trained_encoder(trained_with, encoder_identity(group.attrs.get("encoder")), model_path, ge_store)
            if config.uses_ge_tokens:
                self.ge_tokens = GeTokenSource(ge_store, device)

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, positions: np.ndarray) -> tuple[torch.Tensor, GeBatch | None]:
        uni = torch.from_numpy(self.uni[positions].astype(np.float32))
        if self.ge_cls is None:
            return uni, None
        ge = GeBatch(torch.from_numpy(self.ge_cls[positions].astype(np.float32)))
        if self.ge_tokens is not None:
            ge.tokens, ge.token_mask = self.ge_tokens.rows(self.ge_rows[positions], [self.keys[p] for p in positions])
        return uni, ge


def check_width(path: str | Path, what: str, found: int, expected: int) -> None:
    if found != expected:
        raise InputError(path, f"{what} has {found} dimensions; the model expects {expected}")


# ---------------------------------------------------------------------------------------------
# Output store


def write_tile_store(
    path: str | Path,
    keys: Sequence[str],
    batches: Iterable[tuple[np.ndarray, np.ndarray | None]],
    attrs: Mapping[str, Any],
    extra_arrays: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write `spot_key`, `latent` (N, C, H, W) float16 and, where the batches carry them, `images`
    (N, H, W, 3) uint8 (filled from (latents, images or None) batches in key order), per-row
    `extra_arrays` and `attrs`, atomically. Stored images are the decoded float16 latents, so a
    store without them reads the same pixels (`image_stores.ImageStore.read_rows`)."""
    from zarr.codecs import BloscCodec, BloscShuffle

    path, n = Path(path), len(keys)
    with staged_spot_store(path, keys, extra_arrays) as group:
        latent_array = image_array = None
        written = 0
        for latents, images in batches:
            if latent_array is None:
                latent_array = group.create_array(
                    "latent", shape=(n, *latents.shape[1:]), dtype="float16",
                    chunks=(min(n, LATENT_CHUNK_SPOTS), *latents.shape[1:]),
                    compressors=BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle, typesize=2))
                if images is not None:
                    image_array = group.create_array(
                        "images", shape=(n, *images.shape[1:]), dtype="uint8",
                        chunks=(min(n, IMAGE_CHUNK_SPOTS), *images.shape[1:]),
                        compressors=BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.noshuffle), fill_value=255)
            if (images is None) != (image_array is None):
                raise RuntimeError("every batch must carry images, or none")
            stop = written + len(latents)
            latent_array[written:stop] = latents.astype(np.float16)
            if image_array is not None:
                image_array[written:stop] = images
            written = stop
        if written != n:
            raise RuntimeError(f"sampled {written} rows for {n} spots")
        group.attrs.update(json.loads(json.dumps(dict(attrs), default=str)))
    log.info("wrote %s: %d rows (%s)", path, n, "latents and images" if image_array is not None else "latents only")
    return path


def check_codec(trained: TrainedModel, codec) -> None:
    if codec.latent_shape[0] != trained.config.in_channels:
        raise InputError(trained.path, f"the model makes {trained.config.in_channels}-channel latents; the "
                                       f"sd3_vae decoder takes {codec.latent_shape[0]}")


def generate(
    trained: TrainedModel,
    conditions,
    settings: SamplerSettings,
    codec,
    out: str | Path,
    attrs: Mapping[str, Any],
    device: torch.device,
    extra_arrays: Mapping[str, np.ndarray] | None = None,
    store_images: bool = False,
) -> Path:
    """Sample every row of `conditions` in batches and write the output store: latents, and with
    `store_images` their decoded pixels (decoded from the stored float16 latents)."""
    from tqdm import tqdm

    n, size = len(conditions), settings.batch_size
    attrs = {**attrs, "decoder": decoder_identity(codec), "store_images": bool(store_images)}

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        starts = range(0, n, size)
        for start in tqdm(starts, total=len(starts), desc=f"sample {settings.regime}", unit="batch",
                          file=sys.stderr, mininterval=5.0):
            positions = np.arange(start, min(start + size, n))
            uni, ge = conditions.batch(positions)
            noise_keys = [conditions.noise_keys[p] for p in positions]
            latents = sample_latents(trained.model, trained.objective, noise_keys, uni, ge, settings, device)
            stored = latents.numpy().astype(np.float16)
            yield stored, codec.decode(stored.astype(np.float32)) if store_images else None

    return write_tile_store(out, conditions.keys, batches(), attrs, extra_arrays)


def common_attrs(trained: TrainedModel, settings: SamplerSettings, codec_impl: str, step: str, params: dict,
                 inputs: list) -> dict[str, Any]:
    return {
        "stmdit": provenance(step, params, inputs),
        "sampler": settings.describe(trained.objective),
        "model": trained.describe(),
        "encoders": {"sd3_vae": codec_impl},
    }


def sampler_settings(args: argparse.Namespace, regime: str) -> SamplerSettings:
    return SamplerSettings(regime=regime, steps=args.steps, seed=args.seed, s_uni=args.s_uni, s_ge=args.s_ge,
                           batch_size=args.batch_size, bf16=args.bf16, solver=args.solver)

# ---------------------------------------------------------------------------------------------
# The sampling session


@dataclass
class SessionSettings:
    """Everything a sampling session needs: the model folder, the device (auto | cpu | cuda), how to
    sample (`sampler`; None: the model is only opened, as by `layout-probe`) and the decoder.

    `needs_ge_model`: where set, the reason the command needs a model that reads GE (the InputError
    names the model folder with it when the model is UNI-only)."""

    model_dir: Path
    device: str = "auto"
    sampler: SamplerSettings | None = field(default_factory=SamplerSettings)
    codec: CodecSettings = field(default_factory=CodecSettings)
    needs_ge_model: str | None = None
    store_images: bool = False  # tile stores keep decoded pixels as well as latents

    @classmethod
    def from_args(cls, args: argparse.Namespace, regime: str, needs_ge_model: str | None = None) -> "SessionSettings":
        """From the options of `add_sampler_options`, sampled in `regime`."""
        return cls(model_dir=Path(args.model_dir), device=args.device, sampler=sampler_settings(args, regime),
                   codec=CodecSettings.from_args(args), needs_ge_model=needs_ge_model,
                   store_images=bool(getattr(args, "store_images", False)))


class SamplingSession:
    """A trained model opened for sampling on a device, with its decoder.

    Opening loads the EMA model (InputError on missing, unreadable or non-finite weights), refuses a
    model that cannot be sampled in the regime or with the solver, and resolves the device; the
    decoder is loaded (and checked against the model) by `open_codec` or at first use."""

    def __init__(self, settings: SessionSettings):
        self.settings = settings
        self.sampler = settings.sampler
        self.device = resolve_device(settings.device)
        self.trained = load_trained_model(settings.model_dir, self.device)
        if settings.needs_ge_model and not self.trained.config.uses_ge:
            raise InputError(self.trained.path, settings.needs_ge_model)
        if self.sampler is not None:
            check_regime(self.trained, self.sampler.regime)
            check_solver(self.trained.objective, self.sampler.solver)
        self._codec = None

    @property
    def config(self):
        return self.trained.config

    @property
    def objective(self) -> str:
        return self.trained.objective

    @property
    def weights_path(self) -> Path:
        """The model's weights as a provenance input."""
        return self.trained.path / EMA_WEIGHTS_FILE

    @property
    def codec(self):
        """The sd3_vae decoder, loaded at first use and checked against the model's latents."""
        return self.open_codec()

    def open_codec(self):
        """Load the decoder (once) and check it against the model: commands call it before their
        work starts, so a wrong decoder stops them early."""
        if self._codec is None:
            codec = load_codec(self.settings.codec, self.device)
            check_codec(self.trained, codec)
            self._codec = codec
        return self._codec

    def _require_sampler(self) -> SamplerSettings:
        if self.sampler is None:
            raise ValueError("this session was opened without sampler settings")
        return self.sampler

    def store_conditions(self, keys: Sequence[str], uni_store: str | Path, ge_store: str | Path | None
                         ) -> "StoreConditions":
        """The UNI (and, when the regime reads GE, the GE) of `keys` from the feature stores."""
        ge = ge_store if self.sampler is not None and regime_uses_ge(self.sampler.regime) else None
        return StoreConditions(keys, uni_store, ge, self.config, self.device, self.trained.ge_encoder,
                               self.trained.path / "training.json")

    def attrs(self, step: str, params: dict, inputs: list) -> dict[str, Any]:
        """The provenance, sampler, model and encoder attributes of an output store."""
        return common_attrs(self.trained, self._require_sampler(), self.settings.codec.impl, step, params, inputs)

    def sample_latents(self, noise_keys: Sequence[str], uni: torch.Tensor | None, ge: GeBatch | None,
                       settings: SamplerSettings | None = None) -> torch.Tensor:
        """Latents (N, C, H, W) float32 on the CPU of one batch (`settings`: the session's by default)."""
        return sample_latents(self.trained.model, self.objective, noise_keys, uni, ge,
                              settings or self._require_sampler(), self.device)

    def decode(self, latents) -> np.ndarray:
        return self.codec.decode(latents)

    def generate(self, conditions, out: str | Path, attrs: Mapping[str, Any],
                 extra_arrays: Mapping[str, np.ndarray] | None = None) -> Path:
        """Sample every row of `conditions` and write the output store `out` (pixels too with
        `store_images`)."""
        return generate(self.trained, conditions, self._require_sampler(), self.codec, out, attrs, self.device,
                        extra_arrays, self.settings.store_images)

    def store_decoder(self) -> "StoreDecoder":
        """This session's decoder, for reading back the stores it writes."""
        return StoreDecoder(self.settings.codec, str(self.device), codec=self.codec)


# ---------------------------------------------------------------------------------------------
# Command-line options of the sampling commands


def add_sampler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, required=True, help="finished model folder (ema.safetensors)")
    p.add_argument("--split", type=Path, required=True, help="split table (key, split)")
    p.add_argument("--uni", type=Path, required=True, help="uni2h feature store")
    add_vae_options(p)
    p.add_argument("--steps", type=int, default=SamplerSettings.steps)
    p.add_argument("--solver", choices=SOLVERS, default=SamplerSettings.solver,
                   help="default: DDIM (ddpm) / Euler (flow), the paper's; dpmpp_2m; heun, unipc (flow only)")
    p.add_argument("--seed", type=int, default=SamplerSettings.seed)
    p.add_argument("--s-uni", type=float, default=SamplerSettings.s_uni, help="UNI guidance scale (paper: %(default)s)")
    p.add_argument("--s-ge", type=float, default=SamplerSettings.s_ge, help="GE guidance scale (paper: %(default)s)")
    p.add_argument("--batch-size", type=int, default=SamplerSettings.batch_size)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add_bf16_option(p)
    p.add_argument("--store-images", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the decoded tiles in the store as well as the float16 latents (commands that "
                        "read the store decode latents on demand otherwise)")
    p.add_argument("--out", type=Path, required=True)
