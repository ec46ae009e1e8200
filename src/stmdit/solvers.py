"""The ODE solvers that turn a (guided) denoiser into samples: one registry, one sampling loop.

`sampler.solver` (config) / `--solver` (CLI) picks one; every solver runs the same loop,
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
  Not offered for flow (analytic model, std 0.25..1): on Euler's sigmas its second-last step, from
  sigma = 1/N to 1/1000, is a step of 4.8 in lambda = log((1 - sigma) / sigma) after steps of 0.8
  (10 steps), over which it extrapolates x0 linearly in lambda: 0.56 / 0.24 of the data std at
  10 / 20 steps against Euler's 0.22 / 0.11 (0.12 / 0.011 with that one step first order).
  diffusers' flow grid starts at sigma = 0.999, not at the noise (sigma = 1), and truncates the
  timesteps to integers: the error stalls near 1e-2 from 20 steps on. unipc below is the same
  predictor plus a corrector, on a grid from the noise.
- heun: flow only, diffusers `FlowMatchHeunDiscreteScheduler` (shift 1.0): Euler's sigmas, each
  Euler step corrected by the velocity at its end (trapezoid), except the last step to sigma = 0.
- unipc: flow and flow_x0 only, UniPC (Zhao et al. 2023, arXiv:2302.04867): diffusers
  `UniPCMultistepScheduler` with flow sigmas (shift 1.0) and the flow prediction, B(h) = e^h - 1 ("bh2"), order 2: a
  predictor on x0 in lambda (first order at the first and the last step) and a corrector that reuses
  each evaluation for the step just taken, one evaluation per step. Its sigmas are linspace(1, 1/1000,
  N + 1) without the last (the first set to 1 - 1e-6, where lambda is finite), then 0; the model is
  told 1000 sigma: diffusers' own timesteps are that number truncated to an integer, up to 1/1000 of
  sigma off, which stalls the error near 1e-2 of the data std from 20 steps on. Analytic error
  (std 0.25..1) at 5 / 10 / 20 / 40 steps 0.32 / 0.081 / 0.0078 / 0.0042, Euler's 0.45 / 0.22 /
  0.11 / 0.054. Its last step takes the data prediction at sigma = 1/N as the sample, so elements
  whose data std is far below 1/N gain nothing over Euler (std 0.02: both ~0.8 at 10 steps).

flow_x0 models predict x0 and are sampled by Euler and unipc above, with v = (x_t - x0_hat) / t
(guidance combines x0 predictions with weights summing to one, so it commutes with this map; unipc
turns v back into x_t - sigma v = x0_hat). Not by heun: its correction at sigma_next = 1/1000 divides
the x0 error by 1/1000, a gain of (sigma - 1/1000) / (2/1000), about 26 at 20 steps.

Network evaluations per tile: `predictor_calls(solver, steps)` calls of the guided predictor (N for
default, dpmpp_2m and unipc, 2N - 1 for heun), each one batched forward pass over the regime's
conditionings (3 rows per tile for dual guidance).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import torch

from stmdit.errors import InputError
from stmdit.model import get_objective
from stmdit.models_config import OBJECTIVE_ODE, OBJECTIVE_SOLVERS  # without torch: the Snakefile checks sampler.solver

DEFAULT, DPMPP_2M, HEUN, UNIPC = "default", "dpmpp_2m", "heun", "unipc"
SOLVERS = (DEFAULT, DPMPP_2M, HEUN, UNIPC)
SOLVER_NAMES = {("ddpm", DEFAULT): "ddim", ("flow", DEFAULT): "euler", ("ddpm", DPMPP_2M): "dpmpp_2m",
                ("flow", HEUN): "heun", ("flow", UNIPC): "unipc"}
DDIM_OPTIONS = {"clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing", "steps_offset": 0}
DPMPP_OPTIONS = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                 "timestep_spacing": "trailing", "final_sigmas_type": "zero", "lower_order_final": True,
                 "use_karras_sigmas": False, "thresholding": False, "steps_offset": 0}
FLOW_SHIFT = 1.0
UNIPC_OPTIONS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": FLOW_SHIFT,
                 "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
                 "final_sigmas_type": "zero", "disable_corrector": [], "thresholding": False}

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_solver(objective: str, solver: str) -> None:
    """InputError when `solver` is unknown or does not solve `objective`'s ODE."""
    if solver not in SOLVERS:
        raise InputError(None, f"unknown solver {solver!r} (known: {', '.join(SOLVERS)})")
    if solver not in OBJECTIVE_SOLVERS.get(objective, ()):
        raise InputError(None, f"solver {solver!r} does not sample {objective} models (use one of "
                               f"{', '.join(OBJECTIVE_SOLVERS.get(objective, ()))})")


def solver_name(objective: str, solver: str) -> str:
    """ddim / euler / dpmpp_2m / heun / unipc."""
    check_solver(objective, solver)
    return SOLVER_NAMES[OBJECTIVE_ODE[objective], solver]


def predictor_calls(solver: str, steps: int) -> int:
    """Guided-predictor calls (batched forward passes) per tile for `steps` steps."""
    return 2 * steps - 1 if solver == HEUN else steps


def build_scheduler(objective: str, steps: int, device: torch.device | str | None = None, solver: str = DEFAULT):
    """A fresh scheduler of `solver` for `objective`, its timesteps set for `steps` steps."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler)

    check_solver(objective, solver)
    if OBJECTIVE_ODE[objective] == "ddpm":
        training_config = get_objective("ddpm").scheduler.config
        if solver == DEFAULT:
            scheduler = DDIMScheduler.from_config(training_config, **DDIM_OPTIONS)
        else:
            scheduler = DPMSolverMultistepScheduler.from_config(training_config, **DPMPP_OPTIONS)
    elif solver == UNIPC:
        scheduler = UniPCMultistepScheduler(num_train_timesteps=get_objective("flow").num_train_timesteps,
                                            **UNIPC_OPTIONS)
        scheduler.set_timesteps(steps, device=device)
        scheduler.timesteps = (scheduler.sigmas[:-1] * scheduler.config.num_train_timesteps).to(device)
        return scheduler
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
