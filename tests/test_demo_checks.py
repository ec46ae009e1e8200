"""`stmdit demo-checks`: the learning checks `make demo` prints, on hand-made evaluation JSONs and on
JSONs the metrics compute from small inputs of a working, a shuffled-condition and an untrained
generator."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import zarr

from stmdit import eval_json, metrics
from stmdit.demo_checks import fid_checks, learning_checks, run, stage_times
from stmdit.palette import palette_report
from stmdit.encoders.smoke import SmokeVae
from stmdit.tile_decoder import CodecSettings, StoreDecoder
from stmdit.texture import TARGET, texture_report


def interval(mean: float, half: float = 10.0) -> dict:
    return {"point": mean - 1, "mean": mean, "lo": mean - half, "hi": mean + half, "n_real": 50, "n_gen": 50}


def write_fid(folder, model: str, regimes: dict) -> None:
    eval_json.write_eval_json(folder / "fid.json", eval_json.fid_json(
        model=model, cohort="demo", regimes=regimes, features={}, encoders={}, params={}, inputs=[]))


def write_auc(folder, model: str, regressors: dict) -> None:
    eval_json.write_eval_json(folder / "auc.json", eval_json.auc_json(
        model=model, cohort="demo", regressors=regressors, features={}, encoders={}, params={}, inputs=[]))


def palette_entry(r: float, carries: bool) -> dict:
    return {"point": r, "lo": r - 0.05, "hi": r + 0.05, "carries_palette": carries,
            "null": {"point": 0.0, "lo": -0.05, "hi": 0.05}}


def texture_entry(ratio: float) -> dict:
    return {"ratio": ratio, "lo": ratio - 0.05, "hi": ratio + 0.05, "generated": 600 * ratio, "real_vae": 600.0,
            "n": 50, "within_target": bool(TARGET[0] <= ratio <= TARGET[1])}


def write_eval(results, model: str, fid: dict, oracle_uni_ge: dict | None = None, null: dict | None = None,
               palette: dict | None = None, texture: dict | None = None):
    folder = results / "eval" / model / "demo"
    folder.mkdir(parents=True)
    write_fid(folder, model, fid)
    generated = {"uni_ge": {"auc": oracle_uni_ge["mean"], **oracle_uni_ge}} if oracle_uni_ge else {}
    null = null or {"auc": 0.0, "lo": -0.02, "hi": 0.02}
    write_auc(folder, model, {"oracle": {"ks": [5], "real": {"auc": 0.1, "lo": 0.05, "hi": 0.15},
                                         "generated": generated, "null": {"empirical": null, "noise_tiles": null}}})
    palette = palette or {r: palette_entry(0.8, True) for r in ("uni", "uni_ge") if r in fid}
    (folder / "palette.json").write_text(json.dumps({"regimes": palette}))
    texture = texture or {r: texture_entry(1.0) for r in ("uni", "uni_ge") if r in fid}
    (folder / "texture.json").write_text(json.dumps({"target": list(TARGET), "regimes": texture}))
    return folder


def by_name(checks):
    return {c.name: c.passed for c in checks}


def test_a_learning_demo_passes_every_check(tmp_path):
    write_eval(tmp_path, "Base", {"uni": interval(150), "uncond": interval(280)})
    write_eval(tmp_path, "GE", {"uni_ge": interval(140), "uni": interval(170), "ge": interval(200),
                                "uncond": interval(280)}, oracle_uni_ge={"mean": 0.05, "lo": 0.02, "hi": 0.08})
    checks = learning_checks(tmp_path, "demo")
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    assert "GE: FID(uni_ge) below FID(uncond)" in by_name(checks)
    assert "a GE model's Oracle AUC of UNI+GE tiles above 0" in by_name(checks)
    assert "GE: uni_ge tiles have the tissue's texture" in by_name(checks)


def test_tiles_smoother_or_rougher_than_the_real_tiles_through_the_vae_fail_the_texture_check(tmp_path):
    """Roughness ratios as measured on the demo before its codec change: flow's 8-px squares (1.6-1.8)
    and flow_x0's smooth UNI-guided tiles (0.52-0.67); a missing texture.json fails too."""
    fid = {"uni_ge": interval(140), "uni": interval(170), "uncond": interval(280)}
    write_eval(tmp_path, "Squares", fid, texture={"uni": texture_entry(1.7), "uni_ge": texture_entry(1.0)})
    write_eval(tmp_path, "Smooth", fid, texture={"uni": texture_entry(1.0), "uni_ge": texture_entry(0.55)})
    (write_eval(tmp_path, "Unmeasured", fid) / "texture.json").unlink()
    passed = by_name(learning_checks(tmp_path, "demo"))
    assert not passed["Squares: uni tiles have the tissue's texture"]
    assert passed["Squares: uni_ge tiles have the tissue's texture"]
    assert not passed["Smooth: uni_ge tiles have the tissue's texture"]
    assert passed["Smooth: uni tiles have the tissue's texture"]
    assert not passed["Unmeasured: texture.json exists"]


def test_no_conditioning_effect_and_a_biased_null_fail(tmp_path):
    # overlapping intervals: UNI makes no difference; the null's interval excludes 0; the AUC is 0
    write_eval(tmp_path, "GE", {"uni_ge": interval(270), "uni": interval(275), "ge": interval(280),
                                "uncond": interval(280)}, oracle_uni_ge={"mean": 0.01, "lo": -0.01, "hi": 0.03},
               null={"auc": 0.04, "lo": 0.01, "hi": 0.08})
    passed = by_name(learning_checks(tmp_path, "demo"))
    assert not passed["GE: FID(uni) below FID(uncond)"] and not passed["GE: FID(uni_ge) below FID(uncond)"]
    assert not passed["a GE model's FID(ge) below its FID(uncond)"]
    assert not passed["a GE model's Oracle AUC of UNI+GE tiles above 0"]
    assert not passed["GE: oracle null (empirical) covers 0"]
    args = argparse.Namespace(results=str(tmp_path), cohort="demo", strict=True)
    assert run(args) == 1
    assert run(argparse.Namespace(results=str(tmp_path), cohort="demo", strict=False)) == 0


def test_missing_evaluation_is_a_failed_check(tmp_path):
    checks = learning_checks(tmp_path, "demo")
    assert [c.passed for c in checks] == [False]


def test_stage_times_sum_jobs_per_stage(tmp_path):
    bench = tmp_path / "benchmarks"
    for path, seconds in (("tiles/M/demo/uni.tsv", 10.0), ("tiles/M/demo/uncond.tsv", 5.0),
                          ("eval/M/demo/fid.tsv", 2.0), ("demo_data.tsv", 7.5)):
        (bench / path).parent.mkdir(parents=True, exist_ok=True)
        (bench / path).write_text(f"s\th:m:s\n{seconds}\t0:00:00\n")
    table = stage_times(bench).set_index("stage")
    assert table.loc["tiles", "jobs"] == 2 and table.loc["tiles", "seconds"] == pytest.approx(15.0)
    assert table.loc["fid", "seconds"] == pytest.approx(2.0) and table.loc["demo_data", "jobs"] == 1


def test_palette_check_passes_only_above_the_other_spot_null(tmp_path):
    write_eval(tmp_path, "Base", {"uni": interval(150), "uncond": interval(280)},
               palette={"uni": palette_entry(0.02, False)})
    folder = write_eval(tmp_path, "NoPalette", {"uni": interval(150), "uncond": interval(280)})
    (folder / "palette.json").unlink()
    passed = by_name(learning_checks(tmp_path, "demo"))
    assert passed["Base: uni tiles carry their spot's palette"] is False
    assert passed["NoPalette: palette.json exists"] is False
    assert run(argparse.Namespace(results=str(tmp_path), cohort="demo", strict=True)) == 1


def test_layout_is_a_diagnostic_line_not_a_check(tmp_path, capsys):
    folder = write_eval(tmp_path, "Base", {"uni": interval(150), "uncond": interval(280)})
    entry = {"mean": 0.003, "lo": -0.02, "hi": 0.02, "follows_layout": False, "null": {"mean": 0.0, "lo": -0.02,
                                                                                        "hi": 0.02}}
    (folder / "layout.json").write_text(json.dumps({"regimes": {"uni": entry, "uncond": entry}}))
    checks = learning_checks(tmp_path, "demo")
    layout = [c for c in checks if "layout" in c.name]
    assert [(c.name, c.passed) for c in layout] == [("Base: layout agreement (diagnostic, not a check)", None)]
    assert run(argparse.Namespace(results=str(tmp_path), cohort="demo", strict=True)) == 0
    out = capsys.readouterr().out
    assert "[INFO] Base: layout agreement (diagnostic, not a check): uni r 0.003 [-0.020, 0.020]" in out
    assert f"{len(checks) - 1} of {len(checks) - 1} checks pass" in out


def test_roughness_by_block_size_is_a_diagnostic_line_in_size_order(tmp_path):
    folder = write_eval(tmp_path, "Base", {"uni": interval(150), "uncond": interval(280)})
    scales = {str(size): {"generated": 1.0, "real_vae": 1.0, "ratio": ratio}
              for size, ratio in ((8, 1.05), (16, 0.96), (32, 0.92), (64, 0.61))}
    entry = {"ratio": 1.05, "lo": 1.0, "hi": 1.1, "within_target": True, "cell_border": {}, "scales": scales}
    (folder / "texture.json").write_text(json.dumps({"target": list(TARGET), "regimes": {"uni": entry}}, sort_keys=True))
    line = [c for c in learning_checks(tmp_path, "demo") if "block size" in c.name]
    assert [(c.passed, c.detail) for c in line] == [(None, "uni 8 px 1.05, 16 px 0.96, 32 px 0.92, 64 px 0.61")]


def test_each_model_s_loss_against_the_gaussian_is_a_diagnostic_line(tmp_path, capsys):
    write_eval(tmp_path, "Base", {"uni": interval(150), "uncond": interval(280)})
    for model, val_loss in (("Base", 0.419), ("Long", 0.259)):
        (tmp_path / "models" / model).mkdir(parents=True)
        check = {"trivial_loss": 1.828, "gaussian_loss": 0.285, "final_train_loss": 0.37, "final_val_loss": val_loss,
                 "above_gaussian": val_loss > 0.285}
        (tmp_path / "models" / model / "training.json").write_text(json.dumps({"loss_check": check}))
    (tmp_path / "models" / "Old").mkdir()
    (tmp_path / "models" / "Old" / "training.json").write_text(json.dumps({"loss_check": {"trivial_loss": 1.0}}))
    lines = {c.name.split(":")[0]: c for c in learning_checks(tmp_path, "demo") if "Gaussian" in c.name}
    assert set(lines) == {"Base", "Long"} and all(c.passed is None for c in lines.values())
    assert lines["Base"].detail == "0.419 vs 0.285 (above: no shapes yet; trivial 1.828)"
    assert lines["Long"].detail.startswith("0.259 vs 0.285 (below")
    assert run(argparse.Namespace(results=str(tmp_path), cohort="demo", strict=True)) == 0
    assert "[INFO] Base: final loss against a Gaussian" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Each check computed by the metrics from small inputs: a working generator passes, a generator with
# shuffled conditions or an untrained one fails.

N_SPOTS, N_TRAIN, N_GENES = 80, 200, 40
REGIMES = ("uni_ge", "uni", "uncond")


class TinyCohort:
    """Spots with a hidden tissue state z (4-d) that their image features, expression and palette all
    follow. A generator conditioned on spot j makes the features and the palette of z_j."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.to_features = rng.normal(size=(4, 16))
        self.to_genes = rng.normal(size=(4, N_GENES))
        self.to_colour = rng.normal(0, 25, size=(4, 3))
        self.z_train, self.z_test = rng.normal(size=(N_TRAIN, 4)), rng.normal(size=(N_SPOTS, 4))

    def features(self, z):
        return z @ self.to_features + self.rng.normal(0, 0.3, size=(len(z), 16))

    def expression(self, z):
        return np.log1p(np.exp(z @ self.to_genes + self.rng.normal(0, 0.5, size=(len(z), N_GENES))))

    def tiles(self, z, shaded: bool = True):
        """64 px tiles in the palette of z, each with its own random layout of light and dark blocks
        (flat but for pixel noise when not `shaded`: what an untrained model's mean prediction gives)."""
        palette = np.array([180.0, 120.0, 170.0]) + z @ self.to_colour
        shade = np.kron(self.rng.uniform(0.7, 1.3, size=(len(z), 8, 8)), np.ones((8, 8)))[..., None]
        shade = shade if shaded else np.ones_like(shade)
        tiles = palette[:, None, None, :] * shade + self.rng.normal(0, 10, size=(len(z), 64, 64, 3))
        return np.clip(tiles, 0, 255).astype(np.uint8)


def image_store(path, keys, images, name: str = "images"):
    group = zarr.open_group(str(path), mode="w")
    group.create_array(name, data=images, chunks=(16, *images.shape[1:]))
    group.create_array("spot_key", data=np.array(keys, dtype=str))
    return path


def evaluate_generator(tmp_path, cohort: TinyCohort, generator: str) -> None:
    """fid.json, auc.json, palette.json and texture.json of one generator, from the metrics' own functions."""
    keys = [f"s:{i}" for i in range(N_SPOTS)]
    folder = tmp_path / "eval" / generator / "demo"
    folder.mkdir(parents=True)
    z_real = cohort.z_test
    real_features = cohort.features(z_real)
    real_tiles = cohort.tiles(z_real)
    patches = image_store(folder / "patches.zarr", keys, real_tiles)
    conditions = {"working": z_real, "shuffled": z_real[np.roll(np.arange(N_SPOTS), 17)],
                  "untrained": np.zeros_like(z_real)}[generator]
    generated_z = {"uni_ge": conditions, "uni": conditions,
                   # without a condition a working model draws from a narrower, shifted distribution
                   "uncond": conditions if generator == "untrained" else 0.3 * cohort.rng.normal(size=z_real.shape) + 1}
    features = {r: cohort.features(z) for r, z in generated_z.items()}
    fid = {r: metrics.fid_bootstrap(real_features, f, n_boot=100, seed=0, keep_replicates=True)
           for r, f in features.items()}
    replicates = {r: entry.pop("replicates") for r, entry in fid.items()}
    for regime, difference in metrics.differences_from(replicates, "uncond").items():  # as `stmdit fid` writes it
        fid[regime]["minus_uncond"] = difference
    write_fid(folder, generator, fid)

    oracle = metrics.fit_oracle(cohort.features(cohort.z_train), cohort.expression(cohort.z_train), ks=(5, 10, 20))
    scored = metrics.transcriptomic_fidelity(oracle, cohort.expression(z_real)[:, oracle.gene_rank], real_features,
                                             {"uni_ge": features["uni_ge"]}, n_boot=100, seed=0, n_perm=100)
    write_auc(folder, generator, {"oracle": scored})

    codec = SmokeVae(torch.device("cpu"), latent_channels=4, input_size=64)  # a generator's tiles are decoded latents
    samples = {r: image_store(folder / f"{r}.zarr", keys, codec.decode(codec.encode(
        cohort.tiles(generated_z[r], shaded=generator != "untrained"))["latent"])) for r in ("uni_ge", "uni")}
    palette = palette_report([patches], samples, space="lab", n_boot=100, seed=0)
    (folder / "palette.json").write_text(json.dumps({"regimes": palette}))

    latents = image_store(folder / "latents.zarr", keys, codec.encode(real_tiles)["latent"], name="latent")
    texture = texture_report(latents, samples, StoreDecoder(CodecSettings(), "cpu", codec=codec), n_boot=100, seed=0)
    (folder / "texture.json").write_text(json.dumps({"target": list(TARGET), "regimes": texture}))


@pytest.fixture(scope="module")
def small_checks(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    cohort = TinyCohort()
    for generator in ("working", "shuffled", "untrained"):
        evaluate_generator(results, cohort, generator)
    return by_name(learning_checks(results, "demo"))


def test_a_working_generator_passes_every_check(small_checks):
    working = {name: ok for name, ok in small_checks.items() if name.startswith("working:") and ok is not None}
    assert all(working.values()), working
    assert {"working: FID(uni_ge) below FID(uncond)", "working: oracle null (empirical) covers 0",
            "working: uni tiles carry their spot's palette", "working: uni_ge tiles carry their spot's palette",
            "working: uni tiles have the tissue's texture"} < set(working)
    assert small_checks["working: roughness by block size, generated / real (VAE) (diagnostic, not a check)"] is None


def test_shuffled_conditions_fail_the_auc_and_palette_checks(small_checks):
    assert not small_checks["shuffled: uni tiles carry their spot's palette"]
    assert not small_checks["shuffled: uni_ge tiles carry their spot's palette"]
    # FID and texture compare distributions: shuffled conditions keep the distribution, so they cannot see them
    assert small_checks["shuffled: FID(uni) below FID(uncond)"]
    assert small_checks["shuffled: uni tiles have the tissue's texture"]


def test_an_untrained_generator_fails_fid_auc_palette_and_texture(small_checks):
    for regime in ("uni", "uni_ge"):
        assert not small_checks[f"untrained: FID({regime}) below FID(uncond)"]
        assert not small_checks[f"untrained: {regime} tiles carry their spot's palette"]
        assert not small_checks[f"untrained: {regime} tiles have the tissue's texture"]


def test_the_oracle_auc_check_passes_only_for_the_working_generator(tmp_path):
    cohort = TinyCohort(seed=1)
    verdicts = {}
    for generator in ("working", "shuffled", "untrained"):
        evaluate_generator(tmp_path / generator, cohort, generator)
        verdicts[generator] = by_name(learning_checks(tmp_path / generator, "demo"))[
            "a GE model's Oracle AUC of UNI+GE tiles above 0"]
    assert verdicts == {"working": True, "shuffled": False, "untrained": False}


def test_a_model_without_fid_json_still_has_its_palette_and_texture_checked(tmp_path):
    """PTPL models are scored by swap_fid and ood_fid, not fid.json, in the training cohort."""
    write_eval(tmp_path, "Base", {"uni": interval(150), "uncond": interval(280)})
    folder = tmp_path / "eval" / "Ptpl" / "demo"
    folder.mkdir(parents=True)
    (folder / "palette.json").write_text(json.dumps({"regimes": {"uni_ge": palette_entry(0.7, True)}}))
    (folder / "texture.json").write_text(json.dumps({"target": list(TARGET), "regimes": {"uni_ge": texture_entry(1.6)}}))
    passed = by_name(learning_checks(tmp_path, "demo"))
    assert passed["Ptpl: uni_ge tiles carry their spot's palette"]
    assert not passed["Ptpl: uni_ge tiles have the tissue's texture"]


def with_paired_difference(entry: dict, minus_uncond: tuple[float, float] | None) -> dict:
    if minus_uncond is not None:
        lo, hi = minus_uncond
        entry["minus_uncond"] = {"mean": (lo + hi) / 2, "lo": lo, "hi": hi, "n_boot": 100, "alpha": 0.05}
    return entry


@pytest.mark.parametrize("minus_uncond, passes", [
    (None, False),  # fid.json without the paired difference: overlapping intervals fail
    ((-25.0, -6.0), True),  # the paired difference lies below -2% of FID(uncond) (-4.48)
    ((-25.0, 1.0), False),  # ... or covers 0
    ((-25.0, -4.0), False),  # ... or excludes 0 by less than 2% of FID(uncond)
    ((-0.19, -0.001), False),  # tiles that are uncond's, on a tight interval (stop 32's XAttn-PMA-Flow)
])
def test_the_ge_check_reads_the_paired_difference_from_uncond(tmp_path, minus_uncond, passes):
    regimes = {"ge": with_paired_difference(interval(210.0, 20.0), minus_uncond), "uncond": interval(224.0, 25.0)}
    write_fid(tmp_path, "GE", regimes)
    verdict = {check.name: check for check in fid_checks({"GE": tmp_path / "fid.json"})}["a GE model's FID(ge) below its FID(uncond)"]
    assert verdict.passed is passes
    assert ("paired difference" in verdict.detail) is (minus_uncond is not None)

