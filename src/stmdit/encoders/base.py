"""Pieces every encoder shares: load options, device and autocast, where weights come from, strict
state-dict loading, image preprocessing, and the two image-encoder shapes (one embedding per
tile; tile + 3x3 sub-tiles).

An image encoder takes uint8 RGB patches (B, H, W, 3) and returns float32 arrays per output
name. It is a preprocessing step (resize, normalise) followed by a `backbone`: a callable from a
normalised (B, 3, S, S) tensor to (B, D) features. Real and smoke encoders differ only in the
backbone, so the preprocessing and tiling code is the same for both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from stmdit.errors import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth", "pytorch_model.pth")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_HUB_ID = re.compile(r"^(hf[-_]hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadOptions:
    """How to build an encoder: weights (local path or hub id), hub permission, architecture
    overrides (tests, custom sizes), model variant, device ("auto" | "cpu" | "cuda"), bf16, and
    the seed of seeded preprocessing (CancerFoundation's tie-breaking)."""

    weights: str | None = None
    allow_hub: bool = False
    arch: Mapping[str, Any] = field(default_factory=dict)
    variant: str | None = None
    device: str = "auto"
    bf16: bool = False
    seed: int = 0


def stable_seed(*parts: object) -> int:
    """A 63-bit integer that depends only on `parts` (not on Python's hash randomisation)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(device: str) -> torch.device:
    """"auto" picks CUDA when available; asking for CUDA without it is a configuration error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "device 'cuda' was requested but CUDA is not available (use device: auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise InputError(None, f"unknown device {device!r} (expected auto, cpu or cuda)")
    return torch.device(device)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; float32 everywhere else."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Where weights come from


@dataclass(frozen=True)
class WeightsSource:
    """A resolved weights location: `kind` "local" (path) or "hub" (Hugging Face id)."""

    kind: str
    location: str

    @property
    def path(self) -> Path:
        return Path(self.location)


def resolve_weights(name: str, weights: str | None, default_hub_id: str | None, allow_hub: bool) -> WeightsSource:
    """Local path if it exists; otherwise a hub id, allowed only when `allow_hub` is set."""
    if weights:
        path = Path(weights).expanduser()
        if path.exists():
            return WeightsSource("local", str(path))
        if not _HUB_ID.match(weights):
            raise InputError(weights, f"weights for encoder {name} not found")
        if not allow_hub:
            raise InputError(
                weights,
                f"weights for encoder {name} not found as a local path; to load them as a Hugging Face hub id "
                "set features.allow_hub: true (--allow-hub)",
            )
        return WeightsSource("hub", weights)
    if default_hub_id is None:
        raise InputError(None, f"encoder {name} with impl real needs weights: a local path (features.encoders.{name}.weights)")
    if not allow_hub:
        raise InputError(
            None,
            f"encoder {name} with impl real needs weights: set features.encoders.{name}.weights to a local "
            f"copy, or allow the hub (features.allow_hub: true) to use {default_hub_id}",
        )
    return WeightsSource("hub", default_hub_id)


def find_weights_file(path: Path) -> Path:
    """The checkpoint file of a local weights path (the file itself, or the one in a directory)."""
    if path.is_file():
        return path
    for name in WEIGHT_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(path, f"no checkpoint file in weights directory (looked for {', '.join(WEIGHT_FILE_NAMES)})")
    raise InputError(path, f"several checkpoint files in weights directory: {[c.name for c in candidates]}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch checkpoint, read without executing pickled code.

    torch files are read with `weights_only=True`: a file that pickles objects besides tensors
    and plain containers is refused with its first unsupported type named, never unpickled."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for damaged files
        text = str(exc)
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsupported:
            raise InputError(path, f"checkpoint pickles a {unsupported.group(1)} object besides its tensors; it is "
                                   "not unpickled (re-save its state dict, e.g. as safetensors)") from None
        raise InputError(path, f"cannot read checkpoint: {text.splitlines()[0] if text else type(exc).__name__}") from None
    if not isinstance(state, Mapping):
        raise InputError(path, f"checkpoint is a {type(state).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        inner = state.get(wrapper)
        if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = inner
            break
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise InputError(path, f"checkpoint entries are not tensors: {non_tensors[:3]}")
    return dict(state)


SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                      "U16", "U32", "U64"}


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file from its JSON header alone (no tensor is read). A file
    whose header or tensor data is cut short, or whose offsets disagree with the shapes, is an error."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise InputError(path, "truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise InputError(path, f"truncated safetensors file (header of {header_len} bytes, file of {size})")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise InputError(path, f"cannot read safetensors file: {exc}") from None
    except ValueError as exc:
        raise InputError(path, f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InputError(path, "safetensors header is not a JSON object")
    data_size = size - 8 - header_len
    shapes: dict[str, tuple[int, ...]] = {}
    end_of_data = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(path, f"safetensors header entry {key!r} is malformed") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise InputError(path, f"tensor {key}: unknown dtype {dtype}")
        width = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
                 "I16": 2, "U16": 2}.get(dtype, 1)
        if stop - start != width * int(np.prod(shape, dtype=np.int64)):
            raise InputError(path, f"tensor {key}: {stop - start} bytes do not hold a {dtype} tensor of shape {shape}")
        end_of_data = max(end_of_data, int(stop))
        shapes[key] = shape
    if end_of_data > data_size:
        raise InputError(path, f"truncated safetensors file: tensors need {end_of_data} bytes of data, "
                               f"the file holds {data_size}")
    return shapes


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint: the safetensors header, or (torch files) a memory-mapped,
    weights-only read."""
    if path.suffix == ".safetensors":
        return read_safetensors_header(path)
    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception:
        state = read_state_dict(path)
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
                state = inner
    return {k: tuple(v.shape) for k, v in dict(state).items() if isinstance(v, torch.Tensor)}


def compare_shapes(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> list[str]:
    """Problems of a checkpoint's keys against an architecture's: missing, unexpected and
    misshaped keys, each with up to three examples and their shapes (empty: it matches)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k} {tuple(found[k])} != {tuple(v)}" for k, v in expected.items()
                 if k in found and tuple(found[k]) != tuple(v)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. "
                        + ", ".join(f"{k} {tuple(expected[k])}" for k in missing[:3]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. "
                        + ", ".join(f"{k} {tuple(found[k])}" for k in unexpected[:3]))
    if misshaped:
        problems.append(f"{len(misshaped)} key(s) of the wrong shape, e.g. {', '.join(misshaped[:2])}")
    return problems


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Content hash of a weights file (what every store and model folder records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(location: str | Path | None) -> dict[str, str] | None:
    """sha256 of each weights file of a local weights path (file, or every checkpoint file under a
    directory), keyed by its path relative to the location; None for hub ids and no weights."""
    if location is None:
        return None
    path = Path(location)
    if path.is_file():
        return {path.name: file_sha256(path)}
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return {str(p.relative_to(path)): file_sha256(p) for p in files}


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load every key; any missing, unexpected or misshaped key is an error naming the checkpoint."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = compare_shapes(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise InputError(source, "checkpoint does not match the architecture: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read JSON: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Images


def encoder_identity(encoder: Any, with_digest: bool = True) -> dict[str, Any]:
    """The first fields of every encoder's describe(): name, impl, model, weights and (with_digest)
    the weights' sha256 for a real impl."""
    identity = {"name": encoder.name, "impl": encoder.impl, "model": encoder.model, "weights": encoder.weights}
    if with_digest:
        identity["weights_sha256"] = weights_digest(encoder.weights) if encoder.impl == "real" else None
    return identity


@dataclass(frozen=True)
class ImagePreprocess:
    """uint8 RGB (B, H, W, 3) -> normalised float (B, 3, S, S): resize to `input_size`, scale to
    [0, 1], subtract `mean` and divide by `std` per channel."""

    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def describe(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "resize": f"{self.interpolation}, antialiased",
            "scale": "uint8 / 255",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """`images`: uint8 (B, H, W, 3) tensor already on the target device."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        x = resize_square(x, self.input_size, self.interpolation)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def resize_square(x: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize (B, C, H, W) in [0, 1] to (B, C, size, size), antialiased, clamped to [0, 1]."""
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x, size=(size, size), mode=interpolation, align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out


def as_image_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    images = np.ascontiguousarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}")
    return torch.from_numpy(images).to(device)


def subtile_bounds(size: int, grid: int = 3) -> list[tuple[int, int]]:
    """Pixel ranges [start, stop) of `grid` equal-as-possible strips of a side of `size` px."""
    edges = [round(i * size / grid) for i in range(grid + 1)]
    return list(zip(edges[:-1], edges[1:]))


Backbone = Callable[[torch.Tensor], torch.Tensor]


class ImageEncoder:
    """Preprocess + backbone; one output, `embedding` (B, D): the backbone's features of each patch."""

    def __init__(
        self,
        name: str,
        impl: str,
        backbone: Backbone,
        dim: int,
        preprocess: ImagePreprocess,
        device: torch.device,
        bf16: bool = False,
        weights: str | None = None,
        model: str = "",
    ):
        self.name = name
        self.impl = impl
        self.backbone = backbone
        self.dim = dim
        self.preprocess = preprocess
        self.device = device
        self.bf16 = bf16
        self.weights = weights
        self.model = model

    modality = "image"

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"embedding": (self.dim,)}

    def describe(self) -> dict[str, Any]:
        """What made the features: recorded in the store's attrs["encoder"]."""
        return {
            **encoder_identity(self),
            "preprocessing": {**self.preprocess.describe(), "output": self.output_description()},
            "shapes": {k: list(v) for k, v in self.output_shapes.items()},
            "device": str(self.device),
            "bf16": bool(self.bf16 and self.device.type == "cuda"),
        }

    def output_description(self) -> str:
        return "backbone features of the patch"

    @torch.inference_mode()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.bf16):
            return self.backbone(x).float()

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = self.preprocess(as_image_tensor(images, self.device))
        return {"embedding": self._features(x).cpu().numpy().astype(np.float32)}


class SubtileImageEncoder(ImageEncoder):
    """DeepSpot-style: the whole spot tile and its 3x3 sub-tiles, each resized to the model input.

    Outputs `embedding` (B, D) of the tile and `subtiles` (B, 9, D), sub-tiles in row-major order
    (top-left, top-middle, ..., bottom-right).
    """

    grid = 3

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"embedding": (self.dim,), "subtiles": (self.grid * self.grid, self.dim)}

    def output_description(self) -> str:
        return "backbone features of the tile and of its 3x3 sub-tiles (row-major), each resized to the input"

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        batch = as_image_tensor(images, self.device)
        height, width = batch.shape[1:3]
        crops = [batch]
        for r0, r1 in subtile_bounds(height, self.grid):
            for c0, c1 in subtile_bounds(width, self.grid):
                crops.append(batch[:, r0:r1, c0:c1])
        features = torch.stack([self._features(self.preprocess(c)) for c in crops], dim=1)  # (B, 10, D)
        features = features.cpu().numpy().astype(np.float32)
        return {"embedding": features[:, 0], "subtiles": features[:, 1:]}


def log_hub_use(name: str, hub_id: str) -> None:
    log.warning("encoder %s: loading weights from the Hugging Face hub (%s); this may download files", name, hub_id)
