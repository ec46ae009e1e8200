"""The ODE solvers that turn a (guided) denoiser into samples: one registry, one sampling loop.

`sample.solver` (config) / `--solver` (CLI) picks one; every solver runs the same loop,
`denoise`: for t in scheduler.timesteps: x <- scheduler.step(predict(x, t), t, x).

- default: the paper's first-order solvers. ddpm: diffusers `DDIMScheduler` from the training
  `DDPMScheduler`'s config (linear betas 1e-4..0.02, T = 1000, epsilon), eta = 0,
  `clip_sample=False` (latents are not bounded to [-1, 1]), `set_alpha_to_one=True` (the last step
  goes to alpha_bar = 1, the data itself: with False it stops at the first training noise level and
  keeps 0.01 x epsilon of noise) and `timestep_spacing="trailing"` (the first step is t = 999, the
  level of the pure-noise start; "leading" would start at t = 980 from a pure-noise sample).
  flow: `FlowMatchEulerDiscreteScheduler` with shift 1.0: its sigma is the training t, its
  x_sigma = sigma * noise + (1 - sigma) * x0 and its Euler step x <- x + (sigma_next - sigma) * v,
  with v = dx/dsigma = noise - x0, are exactly the trained flow; its timesteps are sigma * 1000.
- dpmpp_2m: ddpm only, DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095), second order, one
  evaluation per step: diffusers `DPMSolverMultistepScheduler` from the same training config, on
  DDIM's grid: trailing spacing (t = 999 first), `final_sigmas_type="zero"` (the last step lands on
  alpha_bar = 1, as `set_alpha_to_one`; diffusers makes that last step first order), epsilon.
  (For flow, the same update in lambda = log((1 - sigma) / sigma) on Euler's uniform sigmas measured
  worse than Euler at 10 and 20 steps on the analytic model: not offered.)
- heun: flow only, diffusers `FlowMatchHeunDiscreteScheduler` (shift 1.0): Euler's sigmas, each
  Euler step corrected by the velocity at its end (trapezoid), except the last step to sigma = 0.

flow_x0 models predict x0 and are sampled by the flow solvers above, with v = (x_t - x0_hat) / t
(guidance combines x0 predictions with weights summing to one, so it commutes with this map).

Network evaluations per tile: `predictor_calls(solver, steps)` calls of the guided predictor (N for
default and dpmpp_2m, 2N - 1 for heun), each one batched forward pass over the regime's
conditionings (3 rows per tile for dual guidance).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import torch

from stmdit.errors import InputError
from stmdit.model import get_objective
from stmdit.models_config import OBJECTIVE_ODE, OBJECTIVE_SOLVERS  # without torch: the Snakefile checks sample.solver

DEFAULT, DPMPP_2M, HEUN = "default", "dpmpp_2m", "heun"
SOLVERS = (DEFAULT, DPMPP_2M, HEUN)
SOLVER_NAMES = {("ddpm", DEFAULT): "ddim", ("flow", DEFAULT): "euler", ("ddpm", DPMPP_2M): "dpmpp_2m",
                ("flow", HEUN): "heun"}
DDIM_OPTIONS = {"clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing", "steps_offset": 0}
DPMPP_OPTIONS = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                 "timestep_spacing": "trailing", "final_sigmas_type": "zero", "lower_order_final": True,
                 "use_karras_sigmas": False, "thresholding": False, "steps_offset": 0}
FLOW_SHIFT = 1.0

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_solver(objective: str, solver: str) -> None:
    """InputError when `solver` is unknown or does not solve `objective`'s ODE."""
    if solver not in SOLVERS:
        raise InputError(None, f"unknown solver {solver!r} (known: {', '.join(SOLVERS)})")
    if solver not in OBJECTIVE_SOLVERS.get(objective, ()):
        raise InputError(None, f"solver {solver!r} does not sample {objective} models (use one of "
                               f"{', '.join(OBJECTIVE_SOLVERS.get(objective, ()))})")


def solver_name(objective: str, solver: str) -> str:
    """ddim / euler / dpmpp_2m / heun."""
    check_solver(objective, solver)
    return SOLVER_NAMES[OBJECTIVE_ODE[objective], solver]


def predictor_calls(solver: str, steps: int) -> int:
    """Guided-predictor calls (batched forward passes) per tile for `steps` steps."""
    return 2 * steps - 1 if solver == HEUN else steps


def build_scheduler(objective: str, steps: int, device: torch.device | str | None = None, solver: str = DEFAULT):
    """A fresh scheduler of `solver` for `objective`, its timesteps set for `steps` steps."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           FlowMatchHeunDiscreteScheduler)

    check_solver(objective, solver)
    if OBJECTIVE_ODE[objective] == "ddpm":
        training_config = get_objective("ddpm").scheduler.config
        if solver == DEFAULT:
            scheduler = DDIMScheduler.from_config(training_config, **DDIM_OPTIONS)
        else:
            scheduler = DPMSolverMultistepScheduler.from_config(training_config, **DPMPP_OPTIONS)
    else:
        kind = FlowMatchEulerDiscreteScheduler if solver == DEFAULT else FlowMatchHeunDiscreteScheduler
        scheduler = kind(num_train_timesteps=get_objective("flow").num_train_timesteps, shift=FLOW_SHIFT)
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def describe_scheduler(objective: str, steps: int, solver: str) -> dict[str, Any]:
    scheduler = build_scheduler(objective, steps, solver=solver)
    config = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)  # -inf: not JSON
              for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"name": solver_name(objective, solver), "solver": solver, "scheduler": type(scheduler).__name__,
            "scheduler_config": json.loads(json.dumps(config, default=str)),
            "predictor_calls_per_tile": predictor_calls(solver, steps)}


@torch.inference_mode()
def denoise(predict: Predictor, noise: torch.Tensor, objective: str, steps: int, solver: str = DEFAULT) -> torch.Tensor:
    """Run `solver` for `objective` from `noise`; `predict(x, t)` returns the model's (guided)
    prediction at model timestep t (epsilon for ddpm, velocity for flow, x0 for flow_x0, which is
    turned into the velocity the flow solvers step with). Returns float32 x0."""
    scheduler = build_scheduler(objective, steps, noise.device, solver)
    to_solver = get_objective(objective).solver_prediction
    x = noise.float() * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(to_solver(model_input, t, predict(model_input, t).float()), t, x).prev_sample
    return x.float()
