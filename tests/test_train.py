"""Training: the loop runs from feature stores, resumes exactly, stops for the wall clock, and
the two-process DDP run matches one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from stmdit.features import write_feature_store
from stmdit.model import STMDiT
from stmdit.train import EXIT_RESUBMIT, TrainSettings, train

TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2, "in_channels": 4, "latent_size": 8,
        "uni_dim": 16, "ge_dim": 8, "ge_source_heads": 2, "n_ge_queries": 4, "max_ge_tokens": 6}
N_SPOTS = 40


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    rng = np.random.default_rng(0)
    keys = [f"s{i % 2}:bc{i:03d}" for i in range(N_SPOTS)]
    uni = rng.standard_normal((N_SPOTS, 16)).astype(np.float32)
    latent = (uni[:, :4, None, None] + 0.3 * rng.standard_normal((N_SPOTS, 4, 8, 8))).astype(np.float32)
    tokens = rng.standard_normal((N_SPOTS, 6, 8)).astype(np.float32)
    mask = np.ones((N_SPOTS, 6), dtype=bool)
    mask[::3, 4:] = False
    write_feature_store(root / "sd3_vae.zarr", keys, [{"latent": latent}], {"latent": (4, 8, 8)}, {})
    write_feature_store(root / "uni2h.zarr", keys, [{"embedding": uni}], {"embedding": (16,)}, {})
    write_feature_store(root / "cf.zarr", keys, [{"embedding": tokens[:, 0], "tokens": tokens, "token_mask": mask}],
                        {"embedding": (8,), "tokens": (6, 8), "token_mask": (6,)}, {})
    split = ["train"] * 32 + ["val"] * 8
    pd.DataFrame({"key": keys, "sample": [k.split(":")[0] for k in keys], "donor": "d", "split": split}).to_parquet(
        root / "split.parquet")
    return root


def settings(**overrides) -> TrainSettings:
    values = dict(arch={**TINY, "ge_fusion": "xattn", "ge_tokens": "pma"}, objective="ddpm", p_drop=0.3, steps=8,
                  micro_batch=4, accumulation=2, lr=1e-3, warmup_steps=2, grad_clip=1.0, ema_decay=0.9,
                  log_every=1, val_every=4, checkpoint_every=3, keep_checkpoints=5, seed=7)
    values.update(overrides)
    return TrainSettings(**values)


def run_train(stores: Path, out: Path, s: TrainSettings, **kw) -> bool:
    return train(s, stores / "split.parquet", stores / "sd3_vae.zarr", stores / "uni2h.zarr", stores / "cf.zarr", out, **kw)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "ema.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_training_writes_model_log_and_config(stores, tmp_path, caplog):
    out = tmp_path / "m"
    with caplog.at_level("INFO", logger="stmdit.train"):
        assert run_train(stores, out, settings())
    model = STMDiT.from_pretrained(out, weights_name="ema.safetensors")
    assert model.config.ge_tokens == "pma"
    log = pd.read_csv(out / "train_log.csv")
    assert list(log["step"]) == list(range(1, 9))
    assert log["val_loss"].notna().sum() == 2 and np.isfinite(log["loss"]).all()
    assert {"grad_norm", "lr", "samples_per_s", "uni_proj_norm"} <= set(log.columns)
    assert log["lr"].iloc[0] == pytest.approx(1e-3 * 0.5)  # warm-up: step 1 of 2
    meta = json.loads((out / "training.json").read_text())
    assert meta["settings"]["p_drop"] == 0.3 and meta["provenance"]["params_hash"]
    # 8 steps leave the epsilon loss near 1: the run is flagged as stalled at the trivial floor
    check = meta["loss_check"]
    assert check["trivial_loss"] == 1.0 and check["stalled"] and check["final_train_loss"] > check["stall_threshold"]
    assert check["final_train_loss"] == pytest.approx(log["loss"].iloc[-2:].mean())
    assert any(r.levelname == "WARNING" and "stalled near the trivial floor" in r.getMessage() for r in caplog.records)
    # EMA weights differ from the live ones (decay 0.9 over 8 steps)
    state = torch.load(sorted((out / "checkpoints").rglob("step_8.pt"))[-1], weights_only=True)
    assert any(not torch.equal(state["model"][k], v) for k, v in weights(out).items())


def test_interrupted_run_resumes_to_identical_weights(stores, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train(stores, straight, settings())
    # stop after 2 steps (checkpoint at 2), then after 3 more (checkpoints at 3 and 5), then finish
    assert not run_train(stores, resumed, settings(), stop_after=2)
    assert not (resumed / "ema.safetensors").exists()
    assert not run_train(stores, resumed, settings(), stop_after=3)
    assert run_train(stores, resumed, settings())
    assert_same_weights(weights(straight), weights(resumed))
    a, b = pd.read_csv(straight / "train_log.csv"), pd.read_csv(resumed / "train_log.csv")
    pd.testing.assert_frame_equal(a.drop(columns="samples_per_s"), b.drop(columns="samples_per_s"))


def test_changed_settings_start_afresh(stores, tmp_path):
    out, fresh = tmp_path / "m", tmp_path / "fresh"
    run_train(stores, out, settings(), stop_after=3)
    assert run_train(stores, out, settings(lr=5e-4))  # not resumed from the lr=1e-3 checkpoint
    assert run_train(stores, fresh, settings(lr=5e-4))
    assert_same_weights(weights(out), weights(fresh))


def _cli(stores: Path, out: Path, s: TrainSettings, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stmdit", "train", "--settings", json.dumps(s.__dict__), "--split",
            str(stores / "split.parquet"), "--latents", str(stores / "sd3_vae.zarr"), "--uni",
            str(stores / "uni2h.zarr"), "--ge", str(stores / "cf.zarr"), "--out-dir", str(out), *extra]


def test_sigkill_then_restart_gives_identical_weights(stores, tmp_path):
    """A process killed at an arbitrary point (here: right after its first checkpoint) resumes."""
    s = settings(steps=12, checkpoint_every=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # the reference runs in a process like the killed one: same torch thread count, same rounding
    assert subprocess.run(_cli(stores, straight, s), capture_output=True).returncode == 0
    proc = subprocess.Popen(_cli(stores, killed, s), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").rglob("step_*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "ema.safetensors").exists()
    done = subprocess.run(_cli(stores, killed, s), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr
    assert_same_weights(weights(straight), weights(killed))


def test_sigterm_checkpoints_and_exits_for_resubmission(stores, tmp_path):
    """SLURM sends SIGTERM at the time limit (and on scancel): checkpoint at the next step, exit 75."""
    s = settings(steps=100000, checkpoint_every=100000)
    out = tmp_path / "m"
    proc = subprocess.Popen(_cli(stores, out, s), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = out / "train_log.csv"
        if log.exists() and len(log.read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_RESUBMIT, stderr[-2000:]
    saved = list((out / "checkpoints").rglob("step_*.pt"))
    assert len(saved) == 1 and int(saved[0].stem.split("_")[1]) >= 3
    assert not (out / "ema.safetensors").exists()


def test_wall_clock_budget_exits_for_resubmission(stores, tmp_path):
    out = tmp_path / "m"
    s = settings(budget_s=1e-3, margin_s=0.0)
    result = subprocess.run(_cli(stores, out, s), capture_output=True, text=True)
    assert result.returncode == EXIT_RESUBMIT, result.stderr[-2000:]
    assert list((out / "checkpoints").rglob("step_1.pt")) and not (out / "ema.safetensors").exists()


def test_flow_and_uni_only_models_train(stores, tmp_path):
    for arch, objective in (({**TINY, "ge_fusion": "none"}, "flow"), ({**TINY, "ge_fusion": "adaln"}, "ddpm")):
        out = tmp_path / f"{arch['ge_fusion']}_{objective}"
        assert run_train(stores, out, settings(arch=arch, objective=objective, steps=4))
        assert (out / "ema.safetensors").exists()


def test_two_process_gloo_matches_one_process(stores, tmp_path):
    """DDP over 2 CPU processes (gloo), micro-batch 2 each, equals 1 process with micro-batch 4."""
    one, two = tmp_path / "one", tmp_path / "two"
    s1 = settings(steps=4, micro_batch=4)
    s2 = settings(steps=4, micro_batch=2)
    assert run_train(stores, one, s1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(_cli(stores, two, s2, "--nproc", "2"), capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    for name in a:  # gradients are summed in another order: equal up to float rounding
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    training = json.loads((two / "training.json").read_text())
    assert training["processes"] == 2


def test_tokens_in_memory_give_the_same_batches_as_streaming(stores):
    from stmdit.loader import SpotFeatures
    from stmdit.split_table import split_keys

    keys = split_keys(stores / "split.parquet", "train")
    args = (keys, stores / "sd3_vae.zarr", stores / "uni2h.zarr", stores / "cf.zarr", True)
    streamed, in_memory = SpotFeatures(*args, tokens_in_memory_gb=0.0), SpotFeatures(*args, tokens_in_memory_gb=1.0)
    assert not isinstance(streamed.ge_tokens, np.ndarray) and isinstance(in_memory.ge_tokens, np.ndarray)
    rows = np.array([5, 0, 17, 5, 31])
    a, b = streamed.batch(rows), in_memory.batch(rows)
    for name in ("latent", "uni"):
        assert torch.equal(a[name], b[name])
    assert torch.equal(a["ge"].tokens, b["ge"].tokens) and torch.equal(a["ge"].token_mask, b["ge"].token_mask)
    assert not a["ge"].token_mask[1].all()  # position 0 has padding (mask[::3, 4:] = False)


def test_budget_in_epochs_becomes_steps_from_the_train_split(stores, tmp_path):
    out = tmp_path / "epochs"
    # 32 train spots / effective batch 8 = 4 steps per epoch; 1.5 epochs -> 6 steps (steps=8 ignored)
    assert run_train(stores, out, settings(epochs=1.5))
    assert list(pd.read_csv(out / "train_log.csv")["step"]) == list(range(1, 7))
    budget = json.loads((out / "training.json").read_text())["budget"]
    assert budget == {"epochs": 1.5, "steps_per_epoch": 4, "total_steps": 6, "train_spots": 32, "effective_batch": 8}


def test_a_store_with_nan_or_inf_rows_stops_with_the_file_array_and_spot(stores, tmp_path):
    """A feature store written elsewhere (or damaged) with a NaN or inf: one error naming the store, the
    array and the first bad spot, when the rows are loaded (UNI) or when their batch is read (streamed tokens)."""
    import shutil

    import zarr

    from stmdit.errors import InputError
    from stmdit.features import read_feature_rows
    from stmdit.loader import SpotFeatures
    from stmdit.split_table import split_keys

    keys = split_keys(stores / "split.parquet", "train")
    uni, cf = tmp_path / "uni2h.zarr", tmp_path / "cf.zarr"
    shutil.copytree(stores / "uni2h.zarr", uni)
    shutil.copytree(stores / "cf.zarr", cf)
    all_keys = [str(k) for k in zarr.open_group(str(uni), mode="r")["spot_key"][:]]
    zarr.open_group(str(uni), mode="r+")["embedding"][all_keys.index(keys[7]), 3] = np.nan
    with pytest.raises(InputError, match=f"'embedding' has NaN or inf values at spot {keys[7]}") as err:
        SpotFeatures(keys, stores / "sd3_vae.zarr", uni, None, False)
    assert err.value.path == str(uni)
    with pytest.raises(InputError, match=f"spot {keys[7]}"):
        read_feature_rows(uni, keys[::-1], ["embedding"])
    read_feature_rows(uni, keys[:7], ["embedding"])  # the other rows read as before

    zarr.open_group(str(cf), mode="r+")["tokens"][all_keys.index(keys[2]), 1, 0] = np.inf
    streamed = SpotFeatures(keys, stores / "sd3_vae.zarr", stores / "uni2h.zarr", cf, True, tokens_in_memory_gb=0.0)
    streamed.batch(np.array([0, 1, 3]))
    with pytest.raises(InputError, match=f"'tokens' has NaN or inf values at spot {keys[2]}") as err:
        streamed.batch(np.array([0, 2]))
    assert err.value.path == str(cf)
    with pytest.raises(InputError, match=f"spot {keys[2]}"):
        SpotFeatures(keys, stores / "sd3_vae.zarr", stores / "uni2h.zarr", cf, True, tokens_in_memory_gb=1.0)
