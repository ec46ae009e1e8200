"""Ground truth for the samplers and the guidance, without training: for data that is Gaussian per
condition (`stmdit.model.analytic`) the exact predictor is known, so is what every sampler must make
of it.

Two references, both closed form, both independent of diffusers and of `guidance.py`:
- the solver's own answer: DDIM (eta 0) on the intended timesteps t_k = 999 - k 1000/N ending at
  alpha_bar = 1, and Euler on sigma = linspace(1, 1/1000, N) then 0, written out below in float64
  from the papers' update rules and fed the exact prediction of the guided Gaussian;
- the continuous answer: the data distribution N(mean, std^2) of the regime's formula (for DDPM the
  probability-flow limit from N(0, I) at t = 999, `GaussianDenoiser.sampler_limit`).

For an affine predictor the sampler is an affine map of the noise in every element, so the project's
sampler (`sample_latents` -> `guided_predictor` -> `guided_prediction` -> `denoise`) is measured
exactly: a few noise draws per condition give its slope (the output std) and offset (the mean).
The mutation tests at the end break the sampler the ways the issue names and show the checks fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zarr

from stmdit import sampling
from stmdit import solvers
from stmdit.features import write_feature_store
from stmdit.loader import GeBatch
from stmdit.model import guidance
from stmdit.model.analytic import GaussianConfig, GaussianDenoiser, ddpm_coefficients, elementwise_affine_fit
from stmdit.sampling import SamplerSettings, initial_noise, sample_latents
from stmdit.zarr_rows import string_values

torch.set_num_threads(1)

S_UNI, S_GE = 4.0, 3.0  # the paper's scales
N_COND, DRAWS = 3, 4  # conditions per test, noise draws per condition
SOLVER_TOL = 5e-4  # project sampler vs the closed-form solver, in data-std units: float32 rounding of
# outputs up to ~9 in elements of std 0.02 (measured 0.4-1.2e-4); every mutation below is >= 0.14
T = 1000


# --- conditions and the exact answer of each regime --------------------------------------------


def conditions(config: GaussianConfig, n: int = N_COND, seed: int = 1) -> tuple[torch.Tensor, GeBatch]:
    generator = torch.Generator().manual_seed(seed)
    uni = torch.randn(n, config.uni_dim, generator=generator)
    ge = GeBatch(torch.randn(n, config.ge_dim, generator=generator))
    if config.uses_ge_tokens:
        ge.tokens = torch.randn(n, 5, config.ge_dim, generator=generator)
        ge.token_mask = torch.ones(n, 5, dtype=torch.bool)
        ge.token_mask[::2, 3:] = False
    return uni, ge


def regime_mean(model: GaussianDenoiser, uni, ge: GeBatch, regime: str, s_uni: float, s_ge: float) -> torch.Tensor:
    """The mean of the Gaussian that `regime`'s guidance formula samples (`GaussianDenoiser.regime_mean`)."""
    return model.regime_mean(uni, ge, regime, s_uni, s_ge)


def sampler_map(model, uni, ge, regime: str, steps: int, s_uni=S_UNI, s_ge=S_GE, seed: int = 42, solver="default"):
    """(slope, offset) per condition and element of the project's sampler, from DRAWS noise draws of
    each condition through `sample_latents`; the largest residual of the affine fit."""
    n = len(uni)
    keys = [f"cond{c}:draw{d}" for c in range(n) for d in range(DRAWS)]
    repeat = lambda v: None if v is None else v.repeat_interleave(DRAWS, 0)  # noqa: E731
    ge_rows = None if ge is None else GeBatch(repeat(ge.cls), repeat(ge.tokens), repeat(ge.token_mask))
    settings = SamplerSettings(regime=regime, steps=steps, seed=seed, s_uni=s_uni, s_ge=s_ge, solver=solver)
    samples = sample_latents(model, model.config.objective, keys, repeat(uni), ge_rows, settings)
    noise = initial_noise(keys, seed, model.config.latent_shape)
    fits = [elementwise_affine_fit(noise[c * DRAWS:(c + 1) * DRAWS], samples[c * DRAWS:(c + 1) * DRAWS])
            for c in range(n)]
    return (torch.stack([f[0] for f in fits]), torch.stack([f[1] for f in fits]), max(f[2] for f in fits), samples)


# --- the solvers, written out from their update rules ------------------------------------------


def ddim_reference(model: GaussianDenoiser, mean: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """DDIM, eta = 0 (Song et al. 2021, eq. 12) on t_k = 999 - k 1000/N, the last step to
    alpha_bar = 1: x0_hat = (x - s_t eps) / a_t, x <- a_prev x0_hat + s_prev eps."""
    assert T % steps == 0
    timesteps = [T - 1 - k * (T // steps) for k in range(steps)]
    x = noise.to(torch.float64)
    for k, t in enumerate(timesteps):
        eps = model.exact_prediction(x, float(t), mean).to(torch.float64)
        a, s = ddpm_coefficients(model.alphas_cumprod, torch.tensor(float(t), dtype=torch.float64))
        if k + 1 < steps:
            a_prev, s_prev = ddpm_coefficients(model.alphas_cumprod, torch.tensor(float(timesteps[k + 1]),
                                                                                  dtype=torch.float64))
        else:
            a_prev, s_prev = 1.0, 0.0
        x = a_prev * (x - s * eps) / a + s_prev * eps
    return x


def flow_velocity(model: GaussianDenoiser, x: torch.Tensor, sigma: float, mean: torch.Tensor) -> torch.Tensor:
    """The flow's velocity at sigma: the model's own prediction (flow), or (x - x0_hat) / sigma from
    its x0 prediction (flow_x0, since x = sigma noise + (1 - sigma) x0 and v = noise - x0)."""
    prediction = model.exact_prediction(x, T * sigma, mean).to(torch.float64)
    return (x - prediction) / sigma if model.config.objective == "flow_x0" else prediction


def euler_reference(model: GaussianDenoiser, mean: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """Euler on the flow ODE dx/dsigma = v, sigma = linspace(1, 1/1000, N) then 0, the model
    evaluated at timestep 1000 sigma."""
    sigmas = np.append(np.linspace(1.0, 1.0 / T, steps), 0.0)
    x = noise.to(torch.float64)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * flow_velocity(model, x, sigma, mean)
    return x


def dpmpp_2m_reference(model: GaussianDenoiser, mean: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2, midpoint form) on DDIM's t_k,
    the last step to alpha_bar = 1: with lambda = log(a / s) and x0_k = (x - s_k eps) / a_k,
    x <- (s'/s_k) x + (a' - a_k s'/s_k) D, D = x0_k on the first and the last step, else
    x0_k + (x0_k - x0_{k-1}) h / (2 h_prev)."""
    assert T % steps == 0
    timesteps = [T - 1 - k * (T // steps) for k in range(steps)]
    coefficients = [ddpm_coefficients(model.alphas_cumprod, torch.tensor(float(t), dtype=torch.float64))
                    for t in timesteps] + [(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))]
    lam = [torch.log(a / s) if s > 0 else None for a, s in coefficients]
    x, previous = noise.to(torch.float64), None
    for k, t in enumerate(timesteps):
        (a, s), (a_next, s_next) = coefficients[k], coefficients[k + 1]
        x0 = (x - s * model.exact_prediction(x, float(t), mean).to(torch.float64)) / a
        data = x0
        if previous is not None and lam[k + 1] is not None:
            data = x0 + (x0 - previous) * (lam[k + 1] - lam[k]) / (2 * (lam[k] - lam[k - 1]))
        x, previous = (s_next / s) * x + (a_next - a * s_next / s) * data, x0
    return x


def heun_reference(model: GaussianDenoiser, mean: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """Heun (Karras et al. 2022, Alg. 1) on Euler's sigmas: each Euler step corrected by the mean
    of the velocities at its two ends, but the last one to sigma = 0 (2N - 1 evaluations)."""
    sigmas = np.append(np.linspace(1.0, 1.0 / T, steps), 0.0)
    x = noise.to(torch.float64)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = flow_velocity(model, x, sigma, mean)
        euler = x + (sigma_next - sigma) * v
        if sigma_next > 0:
            v_end = flow_velocity(model, euler, sigma_next, mean)
            euler = x + (sigma_next - sigma) * (v + v_end) / 2
        x = euler
    return x


def flow_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) of the flow, alpha = 1 - sigma: -inf at the noise, +inf at the data."""
    return -math.inf if sigma >= 1 else math.inf if sigma <= 0 else math.log((1 - sigma) / sigma)


def unipc_reference(model: GaussianDenoiser, mean: torch.Tensor, steps: int, noise: torch.Tensor) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, arXiv:2302.04867), data prediction, B(h) = e^h - 1, order 2, on
    sigma_k = linspace(1, 1/T, N + 1)[:N] (sigma_0 = 1 - 1e-6, finite lambda) then 0, the model told
    T sigma_k. With alpha = 1 - sigma, lambda = log(alpha / sigma), x0_k = x_k - sigma_k v(x_k) and
    E = 1 - e^-h over h = lambda_to - lambda_from:
    - corrector, after each evaluation but the first, redoes the step just taken from the corrected
      x_{k-1}: (s_k / s_{k-1}) x_{k-1} + a_k E x0_{k-1} + a_k E (rho_p (x0_{k-2} - x0_{k-1}) / r
      + rho_c (x0_k - x0_{k-1})), r = (lambda_{k-2} - lambda_{k-1}) / h, (rho_p, rho_c) solving
      [[1, 1], [r, 1]] rho = [b1, b2], b1 = phi2 / B, b2 = 2 phi3 / B in hh = -h
      (phi2 = (e^hh - 1) / hh - 1, phi3 = phi2 / hh - 1/2, B = e^hh - 1); after the first predictor
      step (order 1) it is the trapezoid: rho_p = 0, rho_c = 1/2;
    - predictor: (s_{k+1} / s_k) x_k + a_{k+1} E (x0_k + (x0_k - x0_{k-1}) h / (2 h_prev)), the
      correction dropped at the first and the last step (to sigma = 0: the output is x0_{N-1})."""
    sigmas = np.append(np.linspace(1.0, 1.0 / T, steps + 1)[:-1], 0.0)
    sigmas[0] = 1.0 - 1e-6
    lam = [flow_log_snr(s) for s in sigmas]
    x, data, corrected = noise.to(torch.float64), [], None
    for k in range(steps):
        x0 = x - sigmas[k] * flow_velocity(model, x, sigmas[k], mean)
        if k >= 1:
            h = lam[k] - lam[k - 1]
            hh, e = -h, -math.expm1(-h)
            x = sigmas[k] / sigmas[k - 1] * corrected + (1 - sigmas[k]) * e * data[-1]
            if k == 1:
                x = x + (1 - sigmas[k]) * e * 0.5 * (x0 - data[-1])
            else:
                r = (lam[k - 2] - lam[k - 1]) / h
                phi2 = math.expm1(hh) / hh - 1
                b1, b2 = phi2 / math.expm1(hh), 2 * (phi2 / hh - 0.5) / math.expm1(hh)
                rho_p = (b1 - b2) / (1 - r)
                rho_c = b1 - rho_p
                x = x + (1 - sigmas[k]) * e * (rho_p * (data[-2] - data[-1]) / r + rho_c * (x0 - data[-1]))
        data.append(x0)
        corrected = x
        h = lam[k + 1] - lam[k]
        step_data = x0
        if 1 <= k < steps - 1:
            step_data = x0 + (x0 - data[-2]) * h / (2 * (lam[k] - lam[k - 1]))
        x = sigmas[k + 1] / sigmas[k] * x + (1 - sigmas[k + 1]) * -math.expm1(-h) * step_data
    return x


REFERENCES = {("ddpm", "default"): ddim_reference, ("flow", "default"): euler_reference,
              ("ddpm", "dpmpp_2m"): dpmpp_2m_reference, ("flow", "heun"): heun_reference,
              ("flow", "unipc"): unipc_reference, ("flow_x0", "default"): euler_reference,
              ("flow_x0", "unipc"): unipc_reference}


def reference_map(model: GaussianDenoiser, mean: torch.Tensor, steps: int,
                  solver_name: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
    """(slope, offset) of the closed-form solver: its outputs for noise 0 and noise 1."""
    solver = REFERENCES[model.config.objective, solver_name]
    zero = solver(model, mean, steps, torch.zeros_like(mean))
    return solver(model, mean, steps, torch.ones_like(mean)) - zero, zero


def errors(model, slope, offset, ref_slope, ref_offset) -> tuple[float, float]:
    """Largest error of the mean and of the std over elements and conditions, in data-std units."""
    return (((offset - ref_offset) / model.std).abs().max().item(),
            ((slope - ref_slope) / model.std).abs().max().item())


def solver_error(model, regime: str, steps: int, s_uni=S_UNI, s_ge=S_GE) -> float:
    """max(mean error, std error) of the project's sampler against the closed-form solver."""
    uni, ge = conditions(model.config)
    slope, offset, _, _ = sampler_map(model, uni, ge, regime, steps, s_uni, s_ge)
    ref_slope, ref_offset = reference_map(model, regime_mean(model, uni, ge, regime, s_uni, s_ge), steps)
    return max(errors(model, slope, offset, ref_slope, ref_offset))


def make_model(objective: str, **overrides) -> GaussianDenoiser:
    return GaussianDenoiser(GaussianConfig(objective=objective, **overrides))


# --- 1. the project's samplers are the intended solvers ------------------------------------------


@pytest.mark.parametrize("objective", ["ddpm", "flow", "flow_x0"])
@pytest.mark.parametrize("regime", ["uni_ge", "uni", "ge", "uncond"])
def test_every_regime_samples_its_formula(objective, regime):
    """At the paper's scales each regime's samples are the solver's answer for the Gaussian its
    guidance formula describes, and not the answer of any other regime. Std 0.02..1 per element."""
    model = make_model(objective)
    uni, ge = conditions(model.config)
    slope, offset, residual, _ = sampler_map(model, uni, ge, regime, 50)
    assert residual < 1e-4  # the sampler is affine in its noise, as it must be for an affine predictor
    for other in ("uni_ge", "uni", "ge", "uncond"):
        ref_slope, ref_offset = reference_map(model, regime_mean(model, uni, ge, other, S_UNI, S_GE), 50)
        mean_error, std_error = errors(model, slope, offset, ref_slope, ref_offset)
        if other == regime:
            assert mean_error < SOLVER_TOL and std_error < SOLVER_TOL, (other, mean_error, std_error)
        else:
            assert mean_error > 0.5, (other, mean_error)  # the regimes' answers are far apart


def test_token_conditions_reach_the_sampler():
    """A token model (xattn): the GE tokens and their mask move the mean; the ge regime follows them."""
    model = make_model("flow", ge_fusion="xattn", ge_tokens="pma")
    uni, ge = conditions(model.config)
    slope, offset, _, _ = sampler_map(model, uni, ge, "ge", 50)
    ref_slope, ref_offset = reference_map(model, regime_mean(model, uni, ge, "ge", S_UNI, S_GE), 50)
    assert max(errors(model, slope, offset, ref_slope, ref_offset)) < SOLVER_TOL
    unmasked = GeBatch(ge.cls, ge.tokens, torch.ones_like(ge.token_mask))
    moved = regime_mean(model, uni, unmasked, "ge", S_UNI, S_GE) - regime_mean(model, uni, ge, "ge", S_UNI, S_GE)
    assert ((moved[::2] / model.std).abs().max() > 0.1) and moved[1].abs().max() == 0  # only masked rows moved


def test_unit_guidance_is_the_full_conditional():
    """s_uni = s_ge = 1: dual guidance is the conditional model itself, sample for sample."""
    model = make_model("ddpm")
    uni, ge = conditions(model.config)
    keys = [f"spot{i}" for i in range(len(uni))]
    guided = sample_latents(model, "ddpm", keys, uni, ge, SamplerSettings(steps=50, s_uni=1.0, s_ge=1.0))
    noise = initial_noise(keys, 42, model.config.latent_shape)
    plain = sampling.denoise(lambda x, t: model(x, t, uni, ge), noise, "ddpm", 50)
    torch.testing.assert_close(guided, plain, rtol=0, atol=2e-6)
    ref_slope, ref_offset = reference_map(model, model.condition_mean(len(uni), uni, ge), 50)
    slope, offset, _, _ = sampler_map(model, uni, ge, "uni_ge", 50, 1.0, 1.0)
    assert max(errors(model, slope, offset, ref_slope, ref_offset)) < SOLVER_TOL


# --- 2. convergence to the data, at the solver's order -------------------------------------------

CONVERGENCE_STEPS = (50, 100, 200, 1000)


@pytest.mark.parametrize("objective", ["ddpm", "flow", "flow_x0"])
def test_samplers_converge_to_the_data_at_first_order(objective):
    """DDIM and Euler are first-order solvers: the error of the output mean/std against the exact
    continuous answer halves when the steps double, and at 1,000 steps it is within 1% of the data
    std (flow's answer is the data; DDPM's is the data short of its terminal-SNR gap). Std 0.25..1
    per element, as latents: DDIM's last step, from t = 19 (50 steps) or t = 0 (1,000) to
    alpha_bar = 1, makes an element's std too small by 1 - std / sqrt(std^2 + r^2), r = sqrt(1 - a^2) / a
    at that t (0.076 at t = 19): 1.1% at std 0.5 but 45% at std 0.05 with 50 steps."""
    model = make_model(objective, std_range=(0.25, 1.0))
    uni, ge = conditions(model.config)
    mean = regime_mean(model, uni, ge, "uni_ge", S_UNI, S_GE)
    limit_mean, limit_std = model.sampler_limit(mean)
    errs = {}
    for steps in CONVERGENCE_STEPS:
        slope, offset, _, _ = sampler_map(model, uni, ge, "uni_ge", steps)
        errs[steps] = max(errors(model, slope, offset, limit_std, limit_mean))
        if steps == 1000:
            data_error = max(errors(model, slope, offset, model.std.expand_as(mean), mean))
    ratios = [errs[a] / errs[b] for a, b in ((50, 100), (100, 200))]
    assert all(1.6 < r < 2.5 for r in ratios), (errs, ratios)  # first order: 2 per doubling
    assert 12 < errs[50] / errs[1000] < 30, errs  # ~20 for 20x the steps
    assert errs[1000] < 0.01, errs  # (halving errors also say the limit is the right one: a wrong one stalls them)
    # flow starts at the data's own noise level: the limit is the data. DDPM's limit misses the data
    # by the terminal-SNR gap only (up to 5.7% of the std here, for guided means up to ~9).
    gap = ((mean - limit_mean) / model.std).abs().max().item()
    assert (gap == 0) == (objective != "ddpm")
    assert abs(data_error - gap) < errs[1000] + 1e-6 and (objective == "ddpm" or data_error < 0.01), (data_error, gap)


SECOND_ORDER = {"ddpm": "dpmpp_2m", "flow": "heun"}


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_second_order_solvers_are_the_published_updates(objective):
    """At 20 steps the project's DPM-Solver++(2M) (ddpm) and Heun (flow) are the closed-form
    updates above (std 0.02..1), and far from the first-order solver's answer."""
    model = make_model(objective)
    uni, ge = conditions(model.config)
    mean = regime_mean(model, uni, ge, "uni_ge", S_UNI, S_GE)
    slope, offset, residual, _ = sampler_map(model, uni, ge, "uni_ge", 20, solver=SECOND_ORDER[objective])
    assert residual < 1e-4
    ref_slope, ref_offset = reference_map(model, mean, 20, SECOND_ORDER[objective])
    assert max(errors(model, slope, offset, ref_slope, ref_offset)) < SOLVER_TOL
    first_slope, first_offset = reference_map(model, mean, 20)
    assert max(errors(model, slope, offset, first_slope, first_offset)) > 0.05


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_second_order_solvers_beat_first_order_and_converge_at_second_order(objective):
    """DPM-Solver++(2M) (ddpm) and Heun (flow) against the exact continuous answer, as the test
    above measures DDIM and Euler (std 0.25..1 per element): at 10, 20 and 50 steps each is closer
    than the paper's solver at the same steps; its error falls ~4x when the steps double (loosely:
    2.8..6); at 100 steps it is within 0.5% of the data std. The analytic model's figures per solver
    and step count are `stmdit bench sample`'s quality columns."""
    model = make_model(objective, std_range=(0.25, 1.0))
    uni, ge = conditions(model.config)
    limit_mean, limit_std = model.sampler_limit(regime_mean(model, uni, ge, "uni_ge", S_UNI, S_GE))
    errs = {}
    for solver in ("default", SECOND_ORDER[objective]):
        for steps in (10, 20, 40, 50, 100):
            slope, offset, _, _ = sampler_map(model, uni, ge, "uni_ge", steps, solver=solver)
            errs[solver, steps] = max(errors(model, slope, offset, limit_std, limit_mean))
    second = SECOND_ORDER[objective]
    assert all(errs[second, n] < errs["default", n] for n in (10, 20, 50)), errs
    assert 2.8 < errs[second, 20] / errs[second, 40] < 6, errs
    assert errs[second, 100] < 0.005 and errs["default", 100] > 0.02, errs


# --- 2b. UniPC for flow: second order at one evaluation per step ---------------------------------


@pytest.mark.parametrize("objective", ["flow", "flow_x0"])
def test_unipc_is_the_published_update(objective):
    """At 5, 10 and 20 steps the project's UniPC (flow, and flow_x0 through its velocity) is the
    closed-form update above (std 0.02..1), and far from Euler's answer at the same steps."""
    model = make_model(objective)
    uni, ge = conditions(model.config)
    mean = regime_mean(model, uni, ge, "uni_ge", S_UNI, S_GE)
    for steps in (5, 10, 20):
        slope, offset, residual, _ = sampler_map(model, uni, ge, "uni_ge", steps, solver="unipc")
        assert residual < 1e-4
        ref_slope, ref_offset = reference_map(model, mean, steps, "unipc")
        assert max(errors(model, slope, offset, ref_slope, ref_offset)) < SOLVER_TOL, steps
        euler_slope, euler_offset = reference_map(model, mean, steps)
        assert max(errors(model, slope, offset, euler_slope, euler_offset)) > 0.05, steps


def test_unipc_converges_at_second_order_at_one_evaluation_per_step():
    """UniPC against the exact continuous answer (std 0.25..1 per element), one evaluation per step:
    closer than Euler at the same steps (10 to 80); from 5 to 40 steps the error falls 4^3 = 64-fold
    (measured 76: 0.32, 0.081, 0.0078, 0.0042), at least 1.5x per doubling and 2.8..6x from 40 to 80
    (measured 3.2). The doublings are uneven because the last step, the data prediction at sigma =
    1/N taken as the sample, shrinks the std by ~(1/N)^2 / (2 std^2) while the multistep steps widen
    it by an amount that reaches its N^-2 regime only past ~40 steps: the signs cancel near 20."""
    model = make_model("flow", std_range=(0.25, 1.0))
    uni, ge = conditions(model.config)
    limit_mean, limit_std = model.sampler_limit(regime_mean(model, uni, ge, "uni_ge", S_UNI, S_GE))
    errs = {}
    for solver in ("default", "unipc"):
        for steps in (5, 10, 20, 40, 80):
            slope, offset, _, _ = sampler_map(model, uni, ge, "uni_ge", steps, solver=solver)
            errs[solver, steps] = max(errors(model, slope, offset, limit_std, limit_mean))
    assert all(errs["unipc", n] < errs["default", n] / 2 for n in (10, 20, 40, 80)), errs
    assert 32 < errs["unipc", 5] / errs["unipc", 40] < 128, errs
    assert all(errs["unipc", n] / errs["unipc", 2 * n] > 1.5 for n in (5, 10, 20, 40)), errs
    assert 2.8 < errs["unipc", 40] / errs["unipc", 80] < 6, errs
    assert errs["unipc", 80] < 0.002 < errs["default", 80], errs
    assert solvers.predictor_calls("unipc", 20) == 20


def unipc_integer_timesteps(monkeypatch) -> None:
    """diffusers' own UniPC timesteps: 1000 sigma truncated to an integer."""
    original = solvers.build_scheduler

    def mutated(objective, steps, device=None, solver="default"):
        scheduler = original(objective, steps, device, solver)
        if solver == "unipc":
            scheduler.timesteps = scheduler.timesteps.floor()
        return scheduler

    monkeypatch.setattr(solvers, "build_scheduler", mutated)


UNIPC_MUTATIONS = {
    "order_1": lambda mp: mp.setitem(solvers.UNIPC_OPTIONS, "solver_order", 1),
    "no_corrector": lambda mp: mp.setitem(solvers.UNIPC_OPTIONS, "disable_corrector", list(range(T))),
    "sigmas_shifted": lambda mp: mp.setitem(solvers.UNIPC_OPTIONS, "flow_shift", 1.5),
    "integer_timesteps": unipc_integer_timesteps,
}


@pytest.mark.parametrize("name", list(UNIPC_MUTATIONS))
def test_unipc_mutations_break_exactness(name, monkeypatch):
    """The check of test_unipc_is_the_published_update at 10 steps passes as shipped (2e-5) and fails,
    by a wide margin, when the order, the corrector, the sigmas or the model's timestep is altered
    (measured 0.092, 0.017, 0.15, 0.27; without the corrector only 0.0046 at 20 steps)."""
    model = make_model("flow")
    uni, ge = conditions(model.config)
    ref_slope, ref_offset = reference_map(model, regime_mean(model, uni, ge, "uni_ge", S_UNI, S_GE), 10, "unipc")

    def error() -> float:
        slope, offset, _, _ = sampler_map(model, uni, ge, "uni_ge", 10, solver="unipc")
        return max(errors(model, slope, offset, ref_slope, ref_offset))

    shipped = error()
    assert shipped < SOLVER_TOL
    UNIPC_MUTATIONS[name](monkeypatch)
    mutated = error()
    print(f"unipc {name}: error {mutated:.3g} (shipped {shipped:.3g}, tolerance {SOLVER_TOL:g})")
    assert mutated > 20 * SOLVER_TOL, (name, mutated)


# --- 3. guidance moves the mean monotonically -------------------------------------------------


@pytest.mark.parametrize("regime,scale", [("uni", "s_uni"), ("ge", "s_ge"), ("uni_ge", "s_ge")])
def test_guided_mean_moves_monotonically_with_the_scale(regime, scale):
    """Along the direction the condition moves the mean, the sampled mean moves further, step by
    step, as the scale grows past 1 (linearly: the exact answer is affine in s)."""
    model = make_model("flow", std_range=(0.25, 1.0))
    uni, ge = conditions(model.config)
    scales = [1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    means = []
    for s in scales:
        kwargs = {"s_uni": S_UNI, "s_ge": S_GE, scale: s}
        _, offset, _, _ = sampler_map(model, uni, ge, regime, 200, **kwargs)
        means.append(offset)
    direction = means[-1] - means[0]
    projections = [((m - means[0]) * direction).sum().item() / (direction**2).sum().item() for m in means]
    assert all(b > a for a, b in zip(projections, projections[1:])), projections
    expected = [(s - 1) / (scales[-1] - 1) for s in scales]
    np.testing.assert_allclose(projections, expected, atol=0.01)


# --- 4. batch size and seed, through the stores and the sample-store writer -------------------------


def test_store_sampling_is_batch_and_seed_independent(tmp_path):
    """`generate` with `StoreConditions` on Zarr stores (UNI, GE CLS + tokens) and the smoke VAE
    codec class at 4 x 8 x 8: a spot's latents do not depend on the batch size; every spot's sample
    is the exact answer's transform of its own noise (so the stores' conditions reach the right
    rows); another seed gives other samples of the same distribution (pooled standardised samples
    have mean 0, variance 1 and uncorrelated neighbours)."""
    from stmdit.encoders.smoke import SmokeVae

    codec = SmokeVae(torch.device("cpu"), latent_channels=4, input_size=64)
    channels, side = codec.latent_shape[0], codec.latent_shape[1]
    config = GaussianConfig(objective="ddpm", in_channels=channels, latent_size=side, ge_fusion="xattn",
                            ge_tokens="pma", std_range=(0.25, 1.0))
    model = GaussianDenoiser(config)
    n = 48
    keys = [f"s{i % 2}:bc{i:03d}" for i in range(n)]
    uni, ge = conditions(config, n)
    write_feature_store(tmp_path / "uni.zarr", keys, [{"embedding": uni.numpy()}], {"embedding": (config.uni_dim,)}, {})
    write_feature_store(tmp_path / "ge.zarr", keys, [{"embedding": ge.cls.numpy(), "tokens": ge.tokens.numpy(),
                                                      "token_mask": ge.token_mask.numpy()}],
                        {"embedding": (config.ge_dim,), "tokens": tuple(ge.tokens.shape[1:]),
                         "token_mask": (ge.tokens.shape[1],)}, {})
    order = list(reversed(keys))  # sampled in another order than stored
    store = sampling.StoreConditions(order, tmp_path / "uni.zarr", tmp_path / "ge.zarr", config)
    trained = sampling.TrainedModel(tmp_path, model, "ddpm", {}, "analytic")

    def run(batch_size: int, seed: int, name: str) -> np.ndarray:
        settings = SamplerSettings(steps=1000, seed=seed, batch_size=batch_size)
        attrs = sampling.common_attrs(trained, settings, "smoke", "sample", {}, [])
        out = sampling.generate(trained, store, settings, codec, tmp_path / f"{name}.zarr", attrs, torch.device("cpu"))
        group = zarr.open_group(str(out), mode="r")
        assert list(string_values(group["spot_key"][:])) == order
        return np.asarray(group["latent"][:])

    whole, in_fives = run(64, 42, "whole"), run(5, 42, "fives")
    np.testing.assert_array_equal(whole, in_fives)
    other_seed = run(64, 7, "seed7")
    rows = [keys.index(k) for k in order]
    ordered_ge = GeBatch(ge.cls[rows], ge.tokens[rows], ge.token_mask[rows])
    limit_mean, limit_std = model.sampler_limit(regime_mean(model, uni[rows], ordered_ge, "uni_ge", S_UNI, S_GE))
    limit_mean, limit_std, std = limit_mean.numpy(), limit_std.numpy(), model.std.numpy()
    for latents, seed in ((whole, 42), (other_seed, 7)):
        noise = initial_noise(order, seed, config.latent_shape).numpy()
        expected = limit_mean + limit_std * noise
        assert np.abs((latents - expected) / std).max() < 0.01 * (1 + np.abs(noise).max())
        z = (latents - limit_mean) / limit_std
        assert abs(z.mean()) < 0.03 and abs(z.var() - 1) < 0.05, (z.mean(), z.var())
        neighbours = np.corrcoef(z[..., :-1].ravel(), z[..., 1:].ravel())[0, 1]
        assert abs(neighbours) < 0.03, neighbours
    assert np.abs(other_seed - whole).mean() > 0.1


def test_flow_x0_is_not_sampled_by_heun():
    """Heun's last correction would divide a flow_x0 model's x0 error by sigma = 1/1000."""
    from stmdit.errors import InputError

    with pytest.raises(InputError, match="does not sample flow_x0"):
        solvers.check_solver("flow_x0", "heun")


def test_analytic_model_rejects_timesteps_outside_training():
    """An off-by-one mapping that reaches t = 1000 (ddpm) fails at once instead of being clamped."""
    model = make_model("ddpm")
    x = torch.zeros(1, *model.config.latent_shape)
    with pytest.raises(ValueError, match="outside"):
        model(x, torch.tensor([1000.0]), None, None)


# --- 5. mutations: each breaks the checks above, loudly ------------------------------------------


def shift_model_timestep(monkeypatch, shift: float) -> None:
    """The denoiser sees the scheduler's timestep + shift (a wrong timestep mapping)."""
    original = sampling.guided_predictor

    def mutated(*args, **kwargs):
        predict = original(*args, **kwargs)
        return lambda x, t: predict(x, (t + shift).clamp(min=0))

    monkeypatch.setattr(sampling, "guided_predictor", mutated)


def flip_guidance_term(monkeypatch, term: str) -> None:
    """The dual guidance with its UNI or its GE difference subtracted instead of added."""
    def mutated(model, x, t, uni, ge, s_uni=4.0, s_ge=3.0, cache=None):
        e00, eu0, eug = guidance.batched_predictions(model, x, t, uni, ge,
                                                     [guidance.BOTH_NULL, guidance.UNI_ONLY, guidance.BOTH_KEPT], cache)
        if term == "uni":
            return e00 - s_uni * (eu0 - e00) + s_ge * (eug - eu0)
        return e00 + s_uni * (eu0 - e00) - s_ge * (eug - eu0)

    monkeypatch.setattr(guidance, "dual_guidance", mutated)


def flow_sigma_one_step_late(monkeypatch) -> None:
    """Euler integrates from sigma_k while the model is told the next sigma's timestep."""
    original = solvers.build_scheduler

    def mutated(objective, steps, device=None, solver="default"):
        scheduler = original(objective, steps, device, solver)
        if objective == "flow":
            scheduler.timesteps = torch.cat([scheduler.timesteps[1:], scheduler.timesteps.new_zeros(1)])
        return scheduler

    monkeypatch.setattr(solvers, "build_scheduler", mutated)


def flow_x0_read_as_velocity(monkeypatch) -> None:
    """A flow_x0 model's x0 prediction stepped with as if it were the velocity."""
    from stmdit.model.objectives import FlowX0Objective

    monkeypatch.setattr(FlowX0Objective, "solver_prediction", lambda self, x_t, timestep, prediction: prediction)


def flow_x0_time_one_step_late(monkeypatch) -> None:
    """x0 turned into a velocity with the next sigma's t instead of the current one."""
    from stmdit.model.objectives import FlowX0Objective

    original = FlowX0Objective.solver_prediction

    def mutated(self, x_t, timestep, prediction):
        return original(self, x_t, timestep - T / 50, prediction) if timestep > T / 50 else \
            original(self, x_t, timestep, prediction)

    monkeypatch.setattr(FlowX0Objective, "solver_prediction", mutated)


MUTATIONS = {
    "ddim_leading_spacing": ("ddpm", lambda mp: mp.setitem(solvers.DDIM_OPTIONS, "timestep_spacing", "leading")),
    "ddim_model_t_minus_1": ("ddpm", lambda mp: shift_model_timestep(mp, -1.0)),
    "ddim_no_alpha_to_one": ("ddpm", lambda mp: mp.setitem(solvers.DDIM_OPTIONS, "set_alpha_to_one", False)),
    "flipped_uni_term": ("ddpm", lambda mp: flip_guidance_term(mp, "uni")),
    "flipped_ge_term": ("flow", lambda mp: flip_guidance_term(mp, "ge")),
    "flow_sigma_one_step_late": ("flow", flow_sigma_one_step_late),
    "flow_x0_read_as_velocity": ("flow_x0", flow_x0_read_as_velocity),
    "flow_x0_time_one_step_late": ("flow_x0", flow_x0_time_one_step_late),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutations_break_exactness(name, monkeypatch):
    """The exactness check of test_every_regime_samples_its_formula (uni_ge, paper scales, 50 steps)
    passes for the sampler as shipped and fails, by a wide margin, for each mutation."""
    objective, apply = MUTATIONS[name]
    model = make_model(objective)
    assert solver_error(model, "uni_ge", 50) < SOLVER_TOL
    apply(monkeypatch)
    error = solver_error(model, "uni_ge", 50)
    print(f"{name}: error {error:.3g} (tolerance {SOLVER_TOL:g})")
    assert error > 20 * SOLVER_TOL, (name, error)
