"""Smoke stand-ins: deterministic, weight-free, tiny encoders with the real ones' interfaces and
output shapes, for the demo and CI. They keep image (and expression) content, so numbers
downstream move with the data:

- image embeddings: a fixed seeded random projection of colour statistics of the normalised
  input (8x8 mean-pooled RGB, per-channel mean and standard deviation);
- VAE: 8x8 mean pooling of the [-1, 1] image to 3x32x32, mapped to 16 channels by a fixed matrix
  with orthonormal columns, then shifted and scaled as SD3 does, with the stand-in's own factors
  (SD3's 0.0609 / 1.5305 are for SD3's latents: on the demo's H&E they left these latents at std
  0.32, so most of a flow's path was noise-dominated and the models' tiles came out as 8-px
  squares); decoding applies the transpose (the pseudo-inverse) and bilinear upsampling, so
  decode(encode(x)) is a blurred x;
- CancerFoundation: the real per-spot binning, then fixed random gene vectors: token j is its
  gene's vector plus the bin value times a fixed value vector, the CLS a fixed random
  projection of the centred bin vector.
Every random matrix comes from a seed derived from the encoder's name, so it is the same in
every run and on every machine.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stmdit.encoders.base import ImageEncoder, ImagePreprocess, LoadOptions, SubtileImageEncoder, resolve_device, stable_seed
from stmdit.encoders.cancerfoundation import ExpressionEncoder
from stmdit.encoders.sd3_vae import LatentCodec

SMOKE_INPUT_SIZE = 64
POOL = 8
# (z - shift) * scale has mean 0 and std 1 over the demo's 1,038 spots (z: mean -0.027, std 0.207),
# as SD3's factors give its own latents
SMOKE_VAE_SHIFT, SMOKE_VAE_SCALE = -0.027, 4.8


def fixed_matrix(name: str, rows: int, cols: int) -> np.ndarray:
    """A standard-normal matrix determined by `name` and its shape."""
    return np.random.default_rng(stable_seed("smoke", name, rows, cols)).standard_normal((rows, cols))


class ColourStatsProjection:
    """Normalised (B, 3, S, S) -> (B, dim): fixed random projection of pooled colour statistics."""

    n_stats = 3 * POOL * POOL + 3 + 3

    def __init__(self, name: str, dim: int, device: torch.device):
        weights = fixed_matrix(name, self.n_stats, dim) / math.sqrt(self.n_stats)
        self.weights = torch.as_tensor(weights, dtype=torch.float64, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # float64 arithmetic, float32 result: the batch size changes BLAS blocking, not the output
        x = x.double()
        stats = torch.cat(
            [F.adaptive_avg_pool2d(x, POOL).flatten(1), x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1
        )
        return (stats @ self.weights).float()


def smoke_image_encoder(name: str, dim: int, mean: Sequence[float], std: Sequence[float], options: LoadOptions,
                        subtiles: bool = False) -> ImageEncoder:
    device = resolve_device(options.device)
    encoder_class = SubtileImageEncoder if subtiles else ImageEncoder
    return encoder_class(
        name=name,
        impl="smoke",
        backbone=ColourStatsProjection(name, dim, device),
        dim=dim,
        preprocess=ImagePreprocess(SMOKE_INPUT_SIZE, tuple(mean), tuple(std), "bilinear"),
        device=device,
        bf16=False,
        weights=None,
        model=f"smoke: fixed random projection of pooled colour statistics to {dim}-d",
    )


class SmokeVae(LatentCodec):
    """8x8 mean pooling to 3x32x32, lifted to 16 channels by a fixed orthonormal-column matrix."""

    def __init__(self, device: torch.device, latent_channels: int = 16, input_size: int = 256):
        q, _ = np.linalg.qr(fixed_matrix("sd3_vae", latent_channels, 3))
        super().__init__(
            impl="smoke", device=device, shift=SMOKE_VAE_SHIFT, scale=SMOKE_VAE_SCALE, input_size=input_size,
            latent_shape=(latent_channels, input_size // POOL, input_size // POOL), weights=None,
            model="smoke: 8x8 mean pooling lifted to 16 channels by a fixed orthonormal-column matrix; "
                  "decode = transpose + bilinear upsampling",
        )
        self.lift = torch.as_tensor(q, dtype=torch.float64, device=device)  # (16, 3), lift.T @ lift = I

    def _encode_unit(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x.double(), POOL)
        return torch.einsum("kc,bchw->bkhw", self.lift, pooled).to(x.dtype)

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("kc,bkhw->bchw", self.lift, z.double()).to(z.dtype)
        return F.interpolate(pooled, scale_factor=POOL, mode="bilinear", align_corners=False)


class SmokeCancerFoundation(ExpressionEncoder):
    """Weight-free stand-in of CancerFoundation with the same gene handling and output shapes."""

    impl = "smoke"
    model = "smoke: real binning, fixed random gene vectors plus bin value times a fixed value vector"

    def __init__(self, seed: int, dim: int = 256, n_bins: int = 51, max_seq_len: int = 1200,
                 device: torch.device | str = "cpu"):
        super().__init__(dim, n_bins, max_seq_len, seed)
        self._device = torch.device(device)
        self.value_vector = torch.as_tensor(fixed_matrix("cancerfoundation-value", 1, dim)[0] / math.sqrt(dim),
                                            dtype=torch.float64, device=self._device)
        self._gene_vectors: tuple[tuple[str, ...], torch.Tensor] = ((), torch.zeros((0, dim), dtype=torch.float64))

    @property
    def device(self) -> torch.device:
        return self._device

    def gene_vectors(self) -> torch.Tensor:
        """(G, d) float64 on the device: one fixed vector per gene symbol, in gene-list order."""
        if self._gene_vectors[0] != tuple(self.genes):
            vectors = [fixed_matrix(f"cancerfoundation-gene-{g}", 1, self.dim)[0] for g in self.genes]
            matrix = np.stack(vectors) / math.sqrt(self.dim) if vectors else np.zeros((0, self.dim))
            self._gene_vectors = (tuple(self.genes), torch.as_tensor(matrix, dtype=torch.float64, device=self.device))
        return self._gene_vectors[1]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["device"] = str(self.device)
        return out

    def tokens_from_bins(self, bins: torch.Tensor) -> torch.Tensor:
        # float64 arithmetic, float32 result: the same tokens on any device and batch size
        values = self.check_bins(bins).double() / (self.n_bins - 1)  # (B, G) in [0, 1]
        genes = self.gene_vectors()
        gene_tokens = genes[None, :, :] + values[:, :, None] * self.value_vector[None, None, :]
        centred = values - values.mean(dim=1, keepdim=True)
        cls = centred @ genes * math.sqrt(self.dim / max(len(self.genes), 1))
        return torch.cat([cls[:, None, :], gene_tokens], dim=1).float()


def load_smoke_vae(options: LoadOptions) -> SmokeVae:
    return SmokeVae(resolve_device(options.device))
