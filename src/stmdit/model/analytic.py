"""Exact denoisers for Gaussian data: ground truth for the samplers and the guidance.

Each conditioning c of a spot, UNI kept or nulled and GE kept or nulled, has its own data
distribution N(mu_c, diag(std^2)) with one shared std. For such data the best predictions are
closed form and affine in the noisy latent x:

- ddpm, x_t = a x0 + s eps with a^2 = alpha_bar_t, s^2 = 1 - a^2 (the training schedule):
  E[eps | x_t] = s (x_t - a mu_c) / (a^2 std^2 + s^2);
- flow, x_t = t noise + (1 - t) x0, model timestep 1000 t:
  E[noise - x0 | x_t] = -mu_c + (t - (1 - t) std^2) (x_t - (1 - t) mu_c) / (t^2 + (1 - t)^2 std^2);
- flow_x0, the same x_t: E[x0 | x_t] = mu_c + (1 - t) std^2 (x_t - (1 - t) mu_c) / (t^2 + (1 - t)^2 std^2).

Both depend on mu_c linearly with a coefficient that does not, so a guidance combination with
weights summing to one (every regime of `guidance.py`) is the exact predictor of
N(sum_c w_c mu_c, diag(std^2)): every regime at every scale has a known answer. The sampler applied
to an affine predictor is an affine map of its noise, element by element; `elementwise_affine_fit`
recovers that map from a few samples, so a sampler's output mean and std are known exactly.

`GaussianDenoiser` has STMDiT's call signature, null conditions included, and a `.config` that
`guided_prediction`, `sample_latents`, `StoreConditions` and `TrainedModel.describe` accept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from stmdit.loader import GeBatch
from stmdit.model.objectives import NUM_TRAIN_TIMESTEPS, get_objective


@dataclass
class GaussianConfig:
    """Shapes of the exact denoiser, named as `DiTConfig` names them."""

    objective: str = "ddpm"  # ddpm (epsilon) | flow (velocity) | flow_x0 (x0)
    in_channels: int = 4
    latent_size: int = 8
    uni_dim: int = 16
    ge_dim: int = 8
    ge_fusion: str = "adaln"  # none: UNI only; adaln: GE CLS; xattn: GE CLS and tokens
    ge_tokens: str | None = None
    std_range: tuple[float, float] = (0.02, 1.0)  # per-element std, log-uniform in this range
    effect_scale: float = 0.5  # rms of each condition's shift of the mean
    seed: int = 0

    def __post_init__(self):
        if self.objective not in ("ddpm", "flow", "flow_x0"):
            raise ValueError(f"unknown objective {self.objective!r} (ddpm | flow | flow_x0)")
        if self.ge_fusion not in ("none", "adaln", "xattn"):
            raise ValueError(f"unknown ge_fusion {self.ge_fusion!r}")

    @property
    def uses_ge(self) -> bool:
        return self.ge_fusion != "none"

    @property
    def uses_ge_tokens(self) -> bool:
        return self.ge_fusion == "xattn"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.in_channels, self.latent_size, self.latent_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def masked_token_mean(ge: GeBatch) -> torch.Tensor:
    """(B, ge_dim) mean of each spot's real tokens (zeros for a spot without any)."""
    weights = ge.token_mask.to(torch.float64)[..., None]
    return (ge.tokens.to(torch.float64) * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class GaussianDenoiser(nn.Module):
    """forward(x, t, uni, ge, drop_uni, drop_ge) -> the exact epsilon (ddpm), velocity (flow) or x0
    (flow_x0) of the spot's condition. Means: mu(0,0) = base, mu(u,0) = base + f(u), mu(0,g) = base + h(g),
    mu(u,g) = base + f(u) + h(g) + tanh(f(u)) tanh(h(g)) (an interaction, so the full conditional is
    not the sum of the single ones); f linear in the UNI vector, h linear in the GE CLS and, for
    `xattn`, in the mean of the real GE tokens. Computed in float64, returned in x's dtype."""

    def __init__(self, config: GaussianConfig):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        shape, size = config.latent_shape, config.in_channels * config.latent_size**2

        def draw(*dims: int) -> torch.Tensor:
            return torch.randn(*dims, generator=generator, dtype=torch.float64)

        low, high = (torch.log(torch.tensor(v, dtype=torch.float64)) for v in config.std_range)
        self.register_buffer("std", torch.exp(low + (high - low) * torch.rand(shape, generator=generator,
                                                                               dtype=torch.float64)))
        self.register_buffer("base", config.effect_scale * draw(*shape))
        scale = config.effect_scale
        self.register_buffer("uni_weight", scale * draw(config.uni_dim, size) / config.uni_dim**0.5)
        self.register_buffer("ge_weight", scale * draw(config.ge_dim, size) / config.ge_dim**0.5)
        self.register_buffer("token_weight", scale * draw(config.ge_dim, size) / config.ge_dim**0.5)
        training = get_objective("ddpm").scheduler
        self.register_buffer("alphas_cumprod", training.alphas_cumprod.to(torch.float64))

    # --- the data distribution of each condition ---------------------------------------------

    def uni_effect(self, uni: torch.Tensor) -> torch.Tensor:
        return (uni.to(torch.float64) @ self.uni_weight).reshape(-1, *self.config.latent_shape)

    def ge_effect(self, ge: GeBatch) -> torch.Tensor:
        effect = ge.cls.to(torch.float64) @ self.ge_weight
        if self.config.uses_ge_tokens:
            effect = effect + masked_token_mean(ge) @ self.token_weight
        return effect.reshape(-1, *self.config.latent_shape)

    def condition_mean(self, batch: int, uni: torch.Tensor | None, ge: GeBatch | None, keep_uni=True,
                       keep_ge=True) -> torch.Tensor:
        """(batch, C, H, W) float64 mean of the data of each spot's condition; keep_* (batch,) bool
        or a bool (False, or a None condition, selects the null distribution of that condition)."""
        keep_uni = self._flags(keep_uni, batch) & (uni is not None)
        keep_ge = self._flags(keep_ge, batch) & (ge is not None) & self.config.uses_ge
        mean = self.base.expand(batch, *self.config.latent_shape).clone()
        f = self.uni_effect(uni) if uni is not None else torch.zeros_like(mean)
        h = self.ge_effect(ge) if ge is not None and self.config.uses_ge else torch.zeros_like(mean)
        ku, kg = keep_uni.to(torch.float64)[:, None, None, None], keep_ge.to(torch.float64)[:, None, None, None]
        return mean + ku * f + kg * h + ku * kg * torch.tanh(f) * torch.tanh(h)

    def regime_mean(self, uni: torch.Tensor, ge: GeBatch | None, regime: str, s_uni: float, s_ge: float) -> torch.Tensor:
        """The mean of the Gaussian that `regime`'s guidance formula samples (paper 2.2), written out
        independently of `guidance.py`: uni_ge: m00 + s_uni (m_u0 - m00) + s_ge (m_ug - m_u0);
        uni: m00 + s_uni (m_u0 - m00); ge: m00 + s_ge (m_0g - m00); uncond: m00."""
        n = len(uni)
        m = {(ku, kg): self.condition_mean(n, uni, ge, ku, kg) for ku in (False, True) for kg in (False, True)}
        m00 = m[False, False]
        return {
            "uni_ge": m00 + s_uni * (m[True, False] - m00) + s_ge * (m[True, True] - m[True, False]),
            "uni": m00 + s_uni * (m[True, False] - m00),
            "ge": m00 + s_ge * (m[False, True] - m00),
            "uncond": m00,
        }[regime]

    def _flags(self, keep, batch: int) -> torch.Tensor:
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.base.device)
        return keep.expand(batch) if keep.ndim == 0 else keep

    # --- exact predictions -------------------------------------------------------------------

    def forward(self, x, t, uni, ge=None, drop_uni=None, drop_ge=None) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != c.latent_shape:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, c.latent_shape))}), got {tuple(x.shape)}")
        batch = x.shape[0]
        keep_uni = ~drop_uni if drop_uni is not None else True
        keep_ge = ~drop_ge if drop_ge is not None else True
        return self.exact_prediction(x, t, self.condition_mean(batch, uni, ge, keep_uni, keep_ge))

    def exact_prediction(self, x: torch.Tensor, t, mean: torch.Tensor) -> torch.Tensor:
        """The exact epsilon (ddpm), velocity (flow) or x0 (flow_x0) at model timestep t for data
        N(mean, std^2); float64 inside, x's dtype out."""
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64)
        t = (t.expand(x.shape[0]) if t.ndim == 0 else t)[:, None, None, None]
        x64 = x.to(torch.float64)
        if self.config.objective == "ddpm":
            a, s = ddpm_coefficients(self.alphas_cumprod, t)
            return (s * (x64 - a * mean) / (a**2 * self.std**2 + s**2)).to(x.dtype)
        tau = flow_time(t)
        var = tau**2 + (1 - tau) ** 2 * self.std**2
        if self.config.objective == "flow_x0":
            return (mean + (1 - tau) * self.std**2 * (x64 - (1 - tau) * mean) / var).to(x.dtype)
        return (-mean + (tau - (1 - tau) * self.std**2) * (x64 - (1 - tau) * mean) / var).to(x.dtype)

    def sampler_limit(self, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of what the exact probability-flow ODE makes of N(0, I) started at the
        sampler's first noise level, for data N(mean, std^2). Flow starts at t = 1, the noise itself:
        the data. DDPM starts at t = 999, where the data still has a = sqrt(alpha_bar) = 0.0064 of
        signal that pure noise lacks (the linear schedule's nonzero terminal SNR): the ODE maps
        x_T to mean + (x_T - a mean) std / sqrt(a^2 std^2 + s^2), so the mean is short by
        a std mean / sqrt(...) (about 0.6% of mean for std 1)."""
        if self.config.objective != "ddpm":
            return mean, self.std.expand_as(mean)
        a, s = ddpm_coefficients(self.alphas_cumprod, torch.tensor(float(NUM_TRAIN_TIMESTEPS - 1)))
        gain = self.std / torch.sqrt(a**2 * self.std**2 + s**2)
        return mean - a * mean * gain, gain.expand_as(mean)


def ddpm_coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at timesteps t in [0, T-1] (linear interpolation
    between the integer steps). Timesteps outside the training range are an error, not clamped."""
    last = len(alphas_cumprod) - 1
    if torch.any(t < 0) or torch.any(t > last):
        raise ValueError(f"ddpm timestep outside [0, {last}]: {t.flatten().tolist()[:4]}")
    low = t.floor().long().clamp(max=last)
    high = (low + 1).clamp(max=last)
    frac = t - low.to(t.dtype)
    alpha_bar = alphas_cumprod[low] * (1 - frac) + alphas_cumprod[high] * frac
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def flow_time(t: torch.Tensor) -> torch.Tensor:
    """Model timestep (0..1000) -> the flow's t in [0, 1]; outside that range is an error."""
    if torch.any(t < 0) or torch.any(t > NUM_TRAIN_TIMESTEPS):
        raise ValueError(f"flow timestep outside [0, {NUM_TRAIN_TIMESTEPS}]: {t.flatten().tolist()[:4]}")
    return t / NUM_TRAIN_TIMESTEPS


def elementwise_affine_fit(noise: torch.Tensor, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """For K draws of one condition, noise and samples (K, ...): the least-squares slope and offset
    of samples = slope * noise + offset in every element, and the largest residual (how far the
    sampler is from affine; float rounding only, for an affine predictor)."""
    noise, samples = noise.to(torch.float64), samples.to(torch.float64)
    if noise.shape != samples.shape or len(noise) < 2:
        raise ValueError("need at least two (noise, sample) pairs of the same shape")
    noise_c = noise - noise.mean(0)
    slope = (noise_c * (samples - samples.mean(0))).sum(0) / (noise_c**2).sum(0)
    offset = samples.mean(0) - slope * noise.mean(0)
    residual = (samples - (slope * noise + offset)).abs().max().item()
    return slope, offset, residual
