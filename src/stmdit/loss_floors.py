"""Reference losses of a training run: what a denoiser that knows only some statistics of the
training latents achieves, in the objective's own loss, with timesteps drawn as in training.

- `trivial_loss`: predicting the target's mean whatever the input (a model that learned nothing);
- `moment_loss`: the exact denoiser of Gaussian data with each latent element's own mean and
  variance, elements independent;
- `gaussian_loss`: the exact denoiser of a stationary Gaussian with the latents' covariance across
  channels and their spatial spectrum (second-order statistics). Samples of that denoiser are
  filtered noise in the data's colours: a model whose loss is still above it has not learned even
  that much, and its tiles look like noise, whatever it learned of the palette. Shapes (nuclei,
  fibres, white space) need a loss below it.

Each is the objective's loss of the posterior mean for Gaussian data, summed over the covariance's
eigenvalues s (per element for moment_loss; per spatial frequency and channel eigenvector for
gaussian_loss): ddpm mean_t a s / (a s + 1 - a) with a = alpha_bar, flow mean_t s / (t^2 + (1 - t)^2 s),
flow_x0 (the flow's error times t^2) mean_t t^2 s / (t^2 + (1 - t)^2 s).
"""

from __future__ import annotations

import numpy as np

from stmdit.model import get_objective

GAUSSIAN_MAX_SPOTS = 4096  # gaussian_loss reads at most this many spots (a seeded subset): it is a reference
ROWS_PER_BLOCK = 256


def element_variance(latents: np.ndarray, block: int = 1024) -> np.ndarray:
    """Per-element variance over the spots (axis 0), accumulated in float64 blocks of rows (the
    latents of a full cohort stay float16 in memory)."""
    n = len(latents)
    total = np.zeros(latents.shape[1:], np.float64)
    squares = np.zeros(latents.shape[1:], np.float64)
    for start in range(0, n, block):
        rows = np.asarray(latents[start:start + block], dtype=np.float64)
        total += rows.sum(0)
        squares += (rows**2).sum(0)
    mean = total / max(n, 1)
    return np.maximum(squares / max(n, 1) - mean**2, 0.0)


def trivial_loss(objective: str, latents: np.ndarray) -> float:
    """The loss of predicting the target's mean whatever the input (the floor a model that learned
    nothing sits at): ddpm E[eps^2] = 1; flow E|v - E v|^2 with v = noise - x0, = 1 + the mean
    per-element variance of the training latents; flow_x0 that variance alone."""
    if objective == "ddpm":
        return 1.0
    variance = float(element_variance(latents).mean())
    return variance if objective == "flow_x0" else 1.0 + variance


def gaussian_posterior_loss(objective: str, variances: np.ndarray) -> float:
    """The expected loss (timesteps as in training) of the posterior mean of independent Gaussian
    components with these variances, averaged over the components."""
    variances = np.maximum(np.asarray(variances, np.float64).ravel(), 1e-12)
    if objective == "ddpm":
        t = get_objective("ddpm").scheduler.alphas_cumprod.double().numpy()[:, None]  # alpha_bar
        loss = lambda v: t * v / (t * v + 1 - t)  # noqa: E731
    else:
        t = ((np.arange(1000) + 0.5) / 1000)[:, None]
        weight = t**2 if objective == "flow_x0" else 1.0
        loss = lambda v: weight * v / (t**2 + (1 - t) ** 2 * v)  # noqa: E731
    return float(sum(loss(variances[i:i + 1024]).sum() for i in range(0, len(variances), 1024))
                 / (len(t) * len(variances)))


def moment_loss(objective: str, latents: np.ndarray) -> float:
    """The expected loss of the best predictor that knows only each latent element's mean and
    variance: the exact predictor for Gaussian data with independent elements. A model that learns
    the spots' structure goes below it. It can sit well below the trivial loss (ddpm 0.12 for
    variance 0.1, 0.28 for 1) or close to it (flow: 0.45 and 0.79 of it): a fixed fraction of the
    trivial loss would not tell a stalled flow model from a learning one."""
    return gaussian_posterior_loss(objective, element_variance(latents))


def spectral_covariance(latents: np.ndarray, max_spots: int = GAUSSIAN_MAX_SPOTS, seed: int = 0) -> np.ndarray:
    """(H x W, C, C) Hermitian: per spatial frequency, the covariance across channels of the
    latents' orthonormal 2-d Fourier coefficients (after removing each element's mean), over at most
    `max_spots` spots (a seeded subset), read ROWS_PER_BLOCK at a time."""
    n, channels, height, width = latents.shape
    rows = np.arange(n)
    if n > max_spots:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_spots, replace=False))
    blocks = [rows[i:i + ROWS_PER_BLOCK] for i in range(0, len(rows), ROWS_PER_BLOCK)]
    mean = sum(np.asarray(latents[b], np.float64).sum(0) for b in blocks) / len(rows)
    covariance = np.zeros((height * width, channels, channels), np.complex128)
    for block in blocks:
        coefficients = np.fft.fft2(np.asarray(latents[block], np.float64) - mean, norm="ortho")
        coefficients = coefficients.reshape(len(block), channels, height * width)
        covariance += np.einsum("bcf,bdf->fcd", coefficients, coefficients.conj())
    return covariance / max(len(rows) - 1, 1)


def gaussian_loss(objective: str, latents: np.ndarray, max_spots: int = GAUSSIAN_MAX_SPOTS, seed: int = 0) -> float:
    """The expected loss of the exact denoiser of a stationary Gaussian with the latents' channel
    covariance and spatial spectrum (`spectral_covariance`; exact for a stationary field on the
    torus, a close reference for tiles). (N, C, H, W) latents."""
    if latents.ndim != 4:
        raise ValueError(f"latents must be (N, C, H, W), got shape {latents.shape}")
    eigenvalues = np.linalg.eigvalsh(spectral_covariance(latents, max_spots, seed))
    return gaussian_posterior_loss(objective, eigenvalues)
