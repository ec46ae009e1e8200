"""Guard rails: bottlenecked denoiser sizes are configuration errors unless opted into, a loss that
stalls near the trivial floor is flagged, and each trained model gets a loss-curve figure."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from stmdit.cli import main
from stmdit.config import load_config
from stmdit.errors import InputError
from stmdit.model import DiTConfig, GaussianConfig, GaussianDenoiser, get_objective
from stmdit.models_config import resolve_models
from stmdit.report import plot_loss_curve
from stmdit.loss_floors import gaussian_loss, moment_loss, trivial_loss
from stmdit.train import STALL_FRACTION, loss_check

ROOT = Path(__file__).resolve().parents[1]


def test_bottlenecked_dit_config_is_an_error_unless_allowed():
    with pytest.raises(ValueError, match=r"bottlenecked denoiser: hidden_size 64 < .* 4\^2 x 16 = 256 .* ~0\.75"):
        DiTConfig(hidden_size=64, num_heads=4, patch_size=4)
    assert DiTConfig(hidden_size=64, num_heads=4, patch_size=4, allow_bottleneck=True).allow_bottleneck
    DiTConfig(hidden_size=256, num_heads=4, patch_size=4)  # exactly p^2 C is fine
    DiTConfig()  # the paper's B: 768 >= 2^2 x 16


def test_bottlenecked_size_stops_the_config_at_parse_time():
    config = load_config(ROOT / "config.yaml")
    assert config["train"]["sizes"]["tiny"]["allow_bottleneck"] is True  # the plumbing size opts in
    assert "allow_bottleneck" not in config["train"]["sizes"][config["train"]["size"]]  # the demo's does not
    config["train"]["size"] = "tiny"
    resolve_models(config)
    broken = copy.deepcopy(config)
    del broken["train"]["sizes"]["tiny"]["allow_bottleneck"]
    with pytest.raises(InputError, match=r"config key train\.sizes\.tiny \(model .*\): bottlenecked denoiser"):
        resolve_models(broken)
    # a model's own arch can widen a bottlenecked size, and is named when it narrows one
    widened = copy.deepcopy(broken)
    for entry in widened["models"].values():
        entry["arch"] = {"hidden_size": 256}
    resolve_models(widened)
    narrowed = copy.deepcopy(config)
    narrowed["train"]["size"] = "B"
    first = next(iter(narrowed["models"]))
    narrowed["models"][first]["arch"] = {"patch_size": 8}
    with pytest.raises(InputError, match=rf"train\.sizes\.B / models\.{first}\.arch .*8\^2 x 16 = 1024"):
        resolve_models(narrowed)



def test_every_configured_size_is_built_as_a_dit_config_at_parse_time():
    """A size that `stmdit train` could not build stops the config when it is read, naming the key."""
    config = load_config(ROOT / "config.yaml")
    resolve_models(config)
    heads = copy.deepcopy(config)
    heads["train"]["sizes"][config["train"]["size"]]["num_heads"] = 7
    with pytest.raises(InputError, match=rf"config key train\.sizes\.{config['train']['size']} \(model .*\): "
                                         r"hidden_size \d+ is not divisible by num_heads 7"):
        resolve_models(heads)
    unknown = copy.deepcopy(config)
    first = next(iter(unknown["models"]))
    unknown["models"][first]["arch"] = {"hiden_size": 512}
    with pytest.raises(InputError, match=rf"models\.{first}\.arch .*unknown DiTConfig field\(s\): hiden_size"):
        resolve_models(unknown)


def test_the_torch_free_fusion_table_is_the_registry():
    from stmdit.dit_config import FUSION_KINDS, TOKEN_SOURCE_NAMES
    from stmdit.model.fusion import GE_FUSIONS, TOKEN_SOURCES

    assert {name: (cls.uses_ge, cls.uses_tokens) for name, cls in GE_FUSIONS.items()} == \
        {name: tuple(kind) for name, kind in FUSION_KINDS.items()}
    assert set(TOKEN_SOURCES) == TOKEN_SOURCE_NAMES


def write_log(path: Path, losses, val_every: int = 4) -> Path:
    steps = np.arange(1, len(losses) + 1)
    val = [loss * 1.1 if step % val_every == 0 else np.nan for step, loss in zip(steps, losses)]
    pd.DataFrame({"step": steps, "epoch": 0, "loss": losses, "lr": 1e-3, "grad_norm": 1.0, "samples_per_s": 10.0,
                  "val_loss": val}).to_csv(path, index=False)
    return path


def test_trivial_and_moment_losses_are_the_losses_of_their_predictors():
    """trivial_loss: predicting the target's mean; moment_loss: the exact predictor of Gaussian data
    with the latents' per-element moments (`GaussianDenoiser`), both measured here by Monte Carlo
    through the training objectives' own noising."""
    assert trivial_loss("ddpm", np.zeros((4, 2, 2, 2))) == 1.0
    for objective in ("ddpm", "flow", "flow_x0"):
        model = GaussianDenoiser(GaussianConfig(objective=objective, in_channels=2, latent_size=4,
                                                std_range=(0.1, 1.0), ge_fusion="none"))
        generator = torch.Generator().manual_seed(0)
        n = 20000
        x0 = model.base + model.std * torch.randn(n, *model.config.latent_shape, generator=generator, dtype=torch.float64)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        noised = get_objective(objective).prepare(x0, noise, u)
        exact = model(noised.x_t, noised.timestep, None, None).to(torch.float64)
        target = noised.target.to(torch.float64)
        latents = x0.numpy()
        assert moment_loss(objective, latents) == pytest.approx(((exact - target) ** 2).mean().item(), rel=0.02)
        assert trivial_loss(objective, latents) == pytest.approx(((target - target.mean(0)) ** 2).mean().item(),
                                                                 rel=0.02)


def test_stalled_loss_is_flagged_with_a_warning(tmp_path, caplog):
    latents = np.sqrt(0.1) * np.random.default_rng(0).standard_normal((500, 4, 4, 4))
    config = DiTConfig(hidden_size=64, num_heads=4, patch_size=4, allow_bottleneck=True)
    stalled_log = write_log(tmp_path / "stalled.csv", np.linspace(1.0, 0.755, 40))
    with caplog.at_level(logging.WARNING, logger="stmdit.train"):
        check = loss_check(stalled_log, "ddpm", latents, config)
    assert check["stalled"] and check["bottleneck_floor"] == pytest.approx(0.75)
    assert check["final_train_loss"] == pytest.approx(np.linspace(1.0, 0.755, 40)[-10:].mean())
    assert check["moment_loss"] == pytest.approx(0.12, abs=0.01)
    assert check["stall_threshold"] == pytest.approx(0.12 + STALL_FRACTION * 0.88, abs=0.01)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "WARNING: the loss stalled near the trivial floor" in warning[0]
    assert "bottlenecked" in warning[0]
    caplog.clear()
    wide = DiTConfig(hidden_size=64, num_heads=4, patch_size=2, in_channels=4)
    with caplog.at_level(logging.WARNING, logger="stmdit.train"):
        check = loss_check(write_log(tmp_path / "learning.csv", np.geomspace(1.0, 0.04, 40)), "ddpm", latents, wide)
    assert not check["stalled"] and check["bottleneck_floor"] is None and not caplog.records
    # flow: a loss at 45% of the trivial one is what per-element moments give (learning, not
    # stalled); 95% is stalled
    trivial = trivial_loss("flow", latents)
    assert not loss_check(write_log(tmp_path / "f1.csv", np.full(20, 0.45 * trivial)), "flow", latents, wide)["stalled"]
    assert loss_check(write_log(tmp_path / "f2.csv", np.full(20, 0.95 * trivial)), "flow", latents, wide)["stalled"]


def test_loss_curve_figure(tmp_path):
    log_path = write_log(tmp_path / "train_log.csv", np.geomspace(1.0, 0.05, 60))
    training = tmp_path / "training.json"
    training.write_text(json.dumps({"loss_check": {"trivial_loss": 1.0}}))
    out = tmp_path / "figures" / "loss.png"
    assert main(["loss-curve", "--train-log", str(log_path), "--training-json", str(training),
                 "--name", "PixCell-B", "--out", str(out)]) in (0, None)
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 10  # something is drawn
    bad = tmp_path / "bad.csv"
    bad.write_text("step,foo\n1,2\n")
    with pytest.raises(InputError, match=r"bad\.csv.*no column\(s\) loss, val_loss"):
        plot_loss_curve(bad, tmp_path / "bad.png", "x")
    assert not (tmp_path / "bad.png").exists()


def stationary_latents(n: int, mixing: np.ndarray, spectrum: np.ndarray, seed: int) -> np.ndarray:
    """(n, C, H, W) Gaussian fields, stationary on the torus: every channel's white noise filtered to
    `spectrum` (orthonormal Fourier coefficients of variance spectrum[f]), then channels mixed.
    Their covariance has the eigenvalues spectrum[f] x eig(mixing mixing^T), exactly."""
    white = np.random.default_rng(seed).standard_normal((n, mixing.shape[1], *spectrum.shape))
    fields = np.fft.ifft2(np.fft.fft2(white, norm="ortho") * np.sqrt(spectrum), norm="ortho").real
    return np.einsum("cd,bdhw->bchw", mixing, fields) + 0.3


def test_gaussian_loss_is_the_loss_of_the_gaussian_with_the_latents_spectrum():
    """On fields with a known channel covariance and spatial spectrum, gaussian_loss matches the
    posterior loss over their exact covariance eigenvalues for every objective; it lies well below
    moment_loss, which ignores the correlations, and equals it for white, independent elements."""
    from stmdit.loss_floors import gaussian_posterior_loss

    frequencies = np.fft.fftfreq(8)
    spectrum = 1 / (0.02 + frequencies[:, None] ** 2 + frequencies[None] ** 2)
    spectrum /= spectrum.mean()
    mixing = np.array([[1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [0.6, 0.5, 0.1], [2.0, 0.0, 0.0]])  # rank 3, 4 channels
    latents = stationary_latents(3000, mixing, spectrum, seed=0)
    eigenvalues = np.outer(spectrum.ravel(), np.linalg.eigvalsh(mixing @ mixing.T)).ravel()
    for objective in ("ddpm", "flow", "flow_x0"):
        exact = gaussian_posterior_loss(objective, eigenvalues)
        assert gaussian_loss(objective, latents) == pytest.approx(exact, rel=0.03)
        assert gaussian_loss(objective, latents) < 0.8 * moment_loss(objective, latents)
    white = stationary_latents(3000, np.diag([0.3, 1.0, 2.0]), np.ones((8, 8)), seed=1)
    for objective in ("ddpm", "flow", "flow_x0"):
        assert gaussian_loss(objective, white) == pytest.approx(moment_loss(objective, white), rel=0.03)
    subset = gaussian_loss("flow", latents, max_spots=1000)
    assert subset == gaussian_loss("flow", latents, max_spots=1000)  # a seeded subset
    assert subset == pytest.approx(gaussian_loss("flow", latents), rel=0.05) and subset != gaussian_loss("flow", latents)


def test_loss_check_says_whether_the_model_went_below_the_gaussian(tmp_path, caplog):
    latents = stationary_latents(400, np.eye(4), np.ones((4, 4)), seed=2)
    config = DiTConfig(hidden_size=64, num_heads=4, patch_size=2, in_channels=4)
    gaussian = gaussian_loss("flow", latents)
    for final, above in ((1.2 * gaussian, True), (0.8 * gaussian, False)):
        log_path = write_log(tmp_path / f"{above}.csv", np.full(40, final / 1.1))  # write_log's val loss is 1.1 x
        with caplog.at_level(logging.INFO, logger="stmdit.train"):
            check = loss_check(log_path, "flow", latents, config)
        assert check["gaussian_loss"] == pytest.approx(gaussian) and check["above_gaussian"] is above
        assert check["final_val_loss"] == pytest.approx(final)
        assert ("filtered noise" in caplog.text) is above
        caplog.clear()
