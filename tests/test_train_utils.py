"""Model-independent training pieces: schedule, EMA, per-sample seeds, budget, checkpoints."""

from __future__ import annotations

import time

import pytest
import torch

from stmdit.train_utils import (
    Ema,
    WallClock,
    latest_checkpoint,
    load_checkpoint,
    lr_factor,
    prune_checkpoints,
    keyed_seed,
    save_checkpoint,
)


def test_lr_schedule_warmup_then_linear_decay_to_ten_percent():
    assert lr_factor(0, 1000, 10000) == pytest.approx(1 / 1000)
    assert lr_factor(499, 1000, 10000) == pytest.approx(0.5)
    assert lr_factor(1000, 1000, 10000) == pytest.approx(1.0)
    assert lr_factor(5500, 1000, 10000) == pytest.approx(0.55)
    assert lr_factor(10000, 1000, 10000) == pytest.approx(0.1)
    assert lr_factor(20000, 1000, 10000) == pytest.approx(0.1)


def test_ema_follows_parameters_at_its_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = Ema(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1 - 0.81))
    target = torch.nn.Linear(2, 1, bias=False)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.19))


def test_sample_seed_depends_only_on_its_parts():
    assert keyed_seed(42, 3, "a:b") == keyed_seed(42, 3, "a:b")
    assert len({keyed_seed(42, s, j) for s in range(20) for j in range(20)}) == 400
    assert keyed_seed(42, 1, 2) != keyed_seed(43, 1, 2)


def test_wall_clock_budget(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    assert not WallClock(None, 60).must_stop(1.0)
    clock = WallClock(100.0, 10.0, started=time.time())
    assert not clock.must_stop(1.0)
    assert clock.must_stop(95.0)
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + 30))
    assert WallClock(1000.0, 10.0).must_stop(25.0)


def test_checkpoints_roundtrip_with_weights_only_and_prune(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 7, "rng": torch.get_rng_state(), "name": "x"}
    for step in (5, 10, 15):
        save_checkpoint(tmp_path / f"step_{step:08d}.pt", {**state, "step": step})
    assert latest_checkpoint(tmp_path).name == "step_00000015.pt"
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded["step"] == 15 and torch.equal(loaded["model"]["w"], state["model"]["w"])
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["step_00000010.pt", "step_00000015.pt"]
    assert not list(tmp_path.glob(".*"))
