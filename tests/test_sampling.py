"""The sampling session (stmdit.sampling): a model whose EMA weights hold a NaN or an inf, and a
UNI or GE store with a non-finite row, stop the run with one line naming the file before anything
is written; the session samples what the `sample` stage writes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from stmdit import sampling
from stmdit.errors import InputError
from stmdit.features import write_feature_store
from test_tiles import LATENT_SHAPE, STEPS, TINY, cli, cohort, models, read_store, tiles_args, save_model  # noqa: F401

torch.set_num_threads(1)


def poisoned_copy(model_dir, folder, tensor: str, value: float):
    shutil.copytree(model_dir, folder)
    state = load_file(str(folder / "ema.safetensors"))
    state[tensor] = state[tensor].clone()
    state[tensor].view(-1)[3] = value
    save_file(state, str(folder / "ema.safetensors"))
    return folder


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (float("-inf"), "inf")])
def test_non_finite_ema_weights_stop_the_run_naming_the_file_and_tensor(cohort, models, tmp_path, value, kind):
    tensor = sorted(load_file(str(models["xattn"] / "ema.safetensors")))[5]
    bad = poisoned_copy(models["xattn"], tmp_path / "bad_model", tensor, value)
    with pytest.raises(InputError) as error:
        sampling.load_trained_model(bad)
    assert error.value.path == str(bad / "ema.safetensors")
    assert repr(tensor) in str(error.value) and kind in str(error.value) and "\n" not in str(error.value)
    out = tmp_path / "x.zarr"
    with pytest.raises(InputError) as error:
        cli(*tiles_args(cohort, bad, out))
    assert error.value.path == str(bad / "ema.safetensors") and repr(tensor) in str(error.value)
    assert not out.exists()


def test_finite_weights_pass_the_check(models):
    trained = sampling.load_trained_model(models["xattn"])
    sampling.check_finite_weights(trained.model, models["xattn"] / "ema.safetensors")


def nan_copy(store, folder, array: str, row: int):
    shutil.copytree(store, folder)
    group = zarr.open_group(str(folder), mode="r+")
    values = np.asarray(group[array][:])
    values.reshape(len(values), -1)[row, 0] = np.nan
    group[array][:] = values
    return folder


@pytest.mark.parametrize("store, array, regime", [("uni2h.zarr", "embedding", "uni"), ("cf.zarr", "embedding", "uni_ge"),
                                                  ("cf.zarr", "tokens", "uni_ge")])
def test_a_non_finite_condition_row_stops_the_run_naming_the_store(cohort, models, tmp_path, store, array, regime):
    root = cohort["root"]
    test_keys = cohort["table"].query("split == 'test'")["key"].tolist()
    row = cohort["keys"].index(test_keys[2])
    bad = nan_copy(root / store, tmp_path / store, array, row)
    args = tiles_args(cohort, models["xattn"], tmp_path / "x.zarr", regime)
    args[args.index("--uni" if store == "uni2h.zarr" else "--ge") + 1] = bad
    with pytest.raises(InputError) as error:
        cli(*args)
    assert error.value.path == str(bad) and f"'{array}'" in str(error.value) and test_keys[2] in str(error.value)
    assert not (tmp_path / "x.zarr").exists()


def test_the_session_samples_what_the_tiles_stage_writes(cohort, models, tmp_path):
    root = cohort["root"]
    out = tmp_path / "uni_ge.zarr"
    cli(*tiles_args(cohort, models["xattn"], out, "uni_ge", 3))
    store = read_store(out)
    settings = sampling.SessionSettings(model_dir=models["xattn"], device="cpu",
                                        sampler=sampling.SamplerSettings(steps=STEPS, seed=42, batch_size=3))
    session = sampling.SamplingSession(settings)
    conditions = session.store_conditions(store["spot_key"], root / "uni2h.zarr", root / "cf.zarr")
    positions = np.arange(len(conditions))
    latents = session.sample_latents(conditions.noise_keys, *conditions.batch(positions))
    np.testing.assert_array_equal(latents.numpy().astype(np.float16), store["latent"])
    np.testing.assert_array_equal(session.decode(latents.half().float()), store["images"])
    with pytest.raises(InputError, match="UNI-only"):
        sampling.SamplingSession(sampling.SessionSettings(model_dir=models["uni_only"], device="cpu"))
    with pytest.raises(InputError, match="needs a GE model"):
        sampling.SamplingSession(sampling.SessionSettings(model_dir=models["uni_only"], device="cpu",
                                                          sampler=sampling.SamplerSettings(regime="uni"),
                                                          needs_ge_model="needs a GE model"))
