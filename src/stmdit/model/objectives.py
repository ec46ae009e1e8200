"""Training objectives (DDPM epsilon prediction, rectified flow predicting the velocity or x0) and
the per-sample randomness of a training step (noise, timestep draw, modality dropout).

Every random number of a sample comes from its own generator, seeded by (seed, step, sample id)
through `stmdit.train_utils.keyed_generator`, so a sample's draws do not depend on the batch it is in,
the batch size or gradient accumulation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from stmdit.train_utils import keyed_generator

NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class NoisedBatch:
    """What the model sees and what it must predict."""

    x_t: torch.Tensor
    timestep: torch.Tensor  # (B,) float in [0, 1000], as fed to the model
    target: torch.Tensor


@dataclass
class SpotDraws:
    """Per-spot randomness of one training step."""

    noise: torch.Tensor  # (B, C, H, W) standard normal
    u: torch.Tensor  # (B,) uniform in [0, 1): the timestep draw
    drop_uni: torch.Tensor  # (B,) bool
    drop_ge: torch.Tensor  # (B,) bool

    def to(self, device) -> "SpotDraws":
        return SpotDraws(self.noise.to(device), self.u.to(device), self.drop_uni.to(device), self.drop_ge.to(device))


def draw_spot_randomness(
    spot_ids: Sequence[int | str],
    *,
    seed: int,
    step: int,
    latent_shape: Sequence[int],
    p_drop_uni: float,
    p_drop_ge: float | None = None,
) -> SpotDraws:
    """Noise, timestep draw and dropout flags of each spot (its key, or a dataset position).

    UNI and GE are dropped independently, each with its own Bernoulli draw (p_drop_ge defaults to
    p_drop_uni), so the regimes both / UNI only / GE only / none kept occur in proportions
    (1-p)^2 : p(1-p) : p(1-p) : p^2."""
    p_drop_ge = p_drop_uni if p_drop_ge is None else p_drop_ge
    for name, p in (("p_drop_uni", p_drop_uni), ("p_drop_ge", p_drop_ge)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    noise, u, drop_uni, drop_ge = [], [], [], []
    for spot_id in spot_ids:
        generator = keyed_generator(seed, step, spot_id)
        scalars = torch.rand(3, generator=generator)  # drawn before the noise: independent of its shape
        u.append(scalars[0])
        drop_uni.append(scalars[1] < p_drop_uni)
        drop_ge.append(scalars[2] < p_drop_ge)
        noise.append(torch.randn(tuple(latent_shape), generator=generator))
    if not noise:
        raise ValueError("no sample ids given")
    return SpotDraws(torch.stack(noise), torch.stack(u), torch.stack(drop_uni), torch.stack(drop_ge))


class DiffusionObjective:
    """Maps (x0, noise, u) to the model input and target; `loss` runs the model on a batch."""

    name: ClassVar[str]
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def prepare(self, x0: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> NoisedBatch:
        raise NotImplementedError

    def x0_from_prediction(self, x_t: torch.Tensor, timestep: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The clean latent that the model's prediction at (x_t, model timestep) implies."""
        raise NotImplementedError

    def solver_prediction(self, x_t: torch.Tensor, timestep: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """What the ODE solver steps with: epsilon (ddpm) or velocity (flow); the prediction itself
        unless the model predicts something else."""
        return prediction

    def loss(
        self,
        model: torch.nn.Module,
        batch: dict,
        draws: SpotDraws,
        autocast_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """MSE between the model's prediction and the target, averaged over all elements.

        `batch` holds "latent" (B, C, H, W), "uni" (B, 1536) and "ge" (GeBatch or None), as
        `SpotFeatures.batch` returns them (already on the model's device). `autocast_dtype`
        (e.g. torch.bfloat16) runs the forward pass under autocast; the loss is in float32."""
        x0 = batch["latent"].float()
        draws = draws.to(x0.device)
        noised = self.prepare(x0, draws.noise.to(x0.dtype), draws.u)
        context = (torch.autocast(device_type=x0.device.type, dtype=autocast_dtype)
                   if autocast_dtype is not None else contextlib.nullcontext())
        with context:
            prediction = model(noised.x_t, noised.timestep, batch["uni"], batch.get("ge"),
                               drop_uni=draws.drop_uni, drop_ge=draws.drop_ge)
        return F.mse_loss(prediction.float(), noised.target)


class DDPMObjective(DiffusionObjective):
    """T = 1000 discrete steps, linear betas 1e-4 -> 0.02, epsilon prediction."""

    name = "ddpm"

    def __init__(self):
        self.scheduler = DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02,
                                       beta_schedule="linear", prediction_type="epsilon")

    def prepare(self, x0, noise, u):
        steps = (u * self.num_train_timesteps).long().clamp_(0, self.num_train_timesteps - 1)
        x_t = self.scheduler.add_noise(x0, noise, steps.to(x0.device))
        return NoisedBatch(x_t, steps.to(x0.dtype), noise)

    def x0_from_prediction(self, x_t, timestep, prediction):
        alpha_bar = self.scheduler.alphas_cumprod.to(x_t.device)[timestep.long()].to(x_t.dtype)
        alpha_bar = alpha_bar.reshape(-1, *([1] * (x_t.ndim - 1)))
        return (x_t - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()


class FlowObjective(DiffusionObjective):
    """Rectified flow: x_t = t noise + (1 - t) x0, target velocity noise - x0, model timestep 1000 t."""

    name = "flow"

    def prepare(self, x0, noise, u):
        t = u.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = t * noise + (1 - t) * x0
        return NoisedBatch(x_t, u.to(x0.dtype) * self.num_train_timesteps, noise - x0)

    def x0_from_prediction(self, x_t, timestep, prediction):
        t = (timestep / self.num_train_timesteps).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return x_t - t * prediction


class FlowX0Objective(FlowObjective):
    """Rectified flow parametrised by x0: the same x_t and timesteps as `flow`, but the model predicts
    x0 and the loss is the MSE on x0 (the velocity's MSE weighted by t^2: the noisy end of the path
    weighs less than in `flow`). Sampling solves the same flow ODE with v = (x_t - x0_hat) / t,
    finite at every sigma Euler and UniPC evaluate (the smallest is 1/1000)."""

    name = "flow_x0"

    def prepare(self, x0, noise, u):
        noised = super().prepare(x0, noise, u)
        return NoisedBatch(noised.x_t, noised.timestep, x0)

    def x0_from_prediction(self, x_t, timestep, prediction):
        return prediction

    def solver_prediction(self, x_t, timestep, prediction):
        t = self._time(x_t, timestep)
        if torch.any(t <= 0):
            raise ValueError("flow_x0 has no velocity at t = 0")
        return (x_t - prediction) / t

    def _time(self, x_t, timestep):
        t = torch.as_tensor(timestep, dtype=x_t.dtype, device=x_t.device) / self.num_train_timesteps
        return (t.expand(len(x_t)) if t.ndim == 0 else t).reshape(-1, *([1] * (x_t.ndim - 1)))


OBJECTIVES: dict[str, type[DiffusionObjective]] = {cls.name: cls for cls in (DDPMObjective, FlowObjective,
                                                                            FlowX0Objective)}


def get_objective(name: str) -> DiffusionObjective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]()
