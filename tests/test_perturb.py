"""Perturbation sampling (stmdit.perturb): the paper's centroid-to-centroid GE (the default) and the
spot-wise variant, on the tiny cohort and models of test_tiles."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import zarr

from stmdit import perturb
from stmdit import tiles
from stmdit.ge_inputs import GeTokenSource
from stmdit.metrics import class_centroids
from stmdit.model import DiTConfig
from stmdit.zarr_rows import string_values
from test_tiles import LATENT_SHAPE, STEPS, TINY, cohort, models, read_store, tiles_args, uni_ge_tiles  # noqa: F401


def cli(*argv: str):
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    tiles.register(subparsers)
    perturb.register(subparsers)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def perturb_args(cohort, model, out, *extra) -> list:
    root = cohort["root"]
    return ["perturbed-tiles", "--model-dir", model, "--split", root / "split.parquet", "--expression",
            root / "expr.h5ad", "--uni", root / "uni2h.zarr", "--ge", root / "cf.zarr",
            "--pairs", "Tumor:Stroma,Immune:Tumor,Necrosis:Tumor", "--alphas", "0,0.5,1", "--n-ref", 2,
            "--seed", 42, "--vae-impl", "smoke", "--steps", STEPS, "--batch-size", 4, "--device", "cpu",
            "--out", out, *extra]


def store_columns(store):
    group = store["group"]
    return string_values(group["pair"][:]), string_values(group["ref_key"][:]), np.asarray(group["alpha"][:])


def test_spotwise_store_layout_and_alpha_zero_is_the_plain_uni_ge_tile(cohort, models, uni_ge_tiles, tmp_path):
    out = tmp_path / "perturbation.zarr"
    cli(*perturb_args(cohort, models["xattn"], out, "--mode", "spotwise"))
    store = read_store(out)
    attrs = store["attrs"]
    pairs, refs, alphas = store_columns(store)
    # Tumor->Stroma and Immune->Tumor: 2 reference spots x 3 alphas each; Necrosis has no spots
    assert len(store["spot_key"]) == 12 and store["images"].shape == (12, 256, 256, 3)
    assert sorted(set(pairs)) == ["Immune->Tumor", "Tumor->Stroma"]
    assert list(attrs["perturbation"]["skipped_pairs"]) == ["Necrosis->Tumor"]
    assert attrs["perturbation"]["mode"] == "spotwise"
    assert attrs["perturbation"]["alphas"] == [0.0, 0.5, 1.0] and attrs["sampler"]["regime"] == "uni_ge"
    assert store["spot_key"][0] == f"{pairs[0]}|{refs[0]}|0" and alphas.tolist()[:3] == [0.0, 0.5, 1.0]
    test = cohort["table"].query("split == 'test'").set_index("key")["label"]
    assert all(test[r] == p.split("->")[0] for p, r in zip(pairs, refs))
    # alpha = 0 with the spot's own GE is the plain uni_ge sample of that reference spot
    plain = dict(zip(uni_ge_tiles["spot_key"], uni_ge_tiles["latent"]))
    for row in np.flatnonzero(alphas == 0):
        np.testing.assert_array_equal(store["latent"][row], plain[refs[row]])
    assert np.abs(store["latent"][2] - store["latent"][0]).max() > 1e-3  # GE reaches the model


def test_centroid_mode_is_the_default_and_shares_noise_and_uni_across_alphas(cohort, models, uni_ge_tiles, tmp_path):
    # a model on which GE has no effect: every alpha of a reference spot gives the same sample iff the
    # noise (and UNI) are shared across alphas; different reference spots still differ
    inert = tmp_path / "inert.zarr"
    cli(*perturb_args(cohort, models["inert"], inert))
    store = read_store(inert)
    assert store["attrs"]["perturbation"]["mode"] == "centroid"
    assert "source and the target class centroids" in store["attrs"]["perturbation"]["mode_description"]
    latents = store["latent"].reshape(4, 3, *LATENT_SHAPE)
    for per_ref in latents:
        np.testing.assert_array_equal(per_ref[1], per_ref[0])
        np.testing.assert_array_equal(per_ref[2], per_ref[0])
    assert np.abs(latents[0, 0] - latents[1, 0]).max() > 1e-3


def conditions_of(cohort, mode: str, root=None):
    """PerturbationConditions of the test cohort (Tumor->Stroma, 2 references, alphas 0, .5, 1)."""
    root = root or cohort["root"]
    table = cohort["table"]
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    rows, _ = perturb.perturbation_rows([("Tumor", "Stroma")], [0.0, 0.5, 1.0], test["key"].tolist(),
                                        test["label"].to_numpy(object), train["label"].to_numpy(object), 2, 42, mode)
    centroids = perturb.ge_centroids(root / "cf.zarr", train["key"].tolist(), train["label"].to_numpy(object),
                                     ["Tumor", "Stroma"], tokens=GeTokenSource(root / "cf.zarr"))
    config = DiTConfig(**TINY, ge_fusion="xattn", ge_tokens="pma")
    conditions = perturb.PerturbationConditions(rows, root / "uni2h.zarr", root / "cf.zarr", centroids, config,
                                                uni_null=False, mode=mode, tokens=GeTokenSource(root / "cf.zarr"))
    uni, ge = conditions.batch(np.arange(len(rows)))
    return rows, centroids, uni.numpy(), ge


def test_centroid_and_spotwise_modes_feed_different_ge(cohort):
    group = zarr.open_group(str(cohort["root"] / "cf.zarr"), mode="r")
    keys = list(string_values(group["spot_key"][:]))
    own_cls = {k: np.asarray(v) for k, v in zip(keys, group["embedding"][:])}
    uni_group = zarr.open_group(str(cohort["root"] / "uni2h.zarr"), mode="r")
    own_uni = dict(zip(keys, np.asarray(uni_group["embedding"][:])))

    rows, centroids, uni, ge = conditions_of(cohort, "centroid")
    cls, tokens = ge.cls.numpy(), ge.tokens.numpy()
    source, target = centroids["Tumor"], centroids["Stroma"]
    alphas, refs = rows["alpha"].to_numpy(), rows["ref_key"].tolist()
    assert len(set(refs)) == 2
    for i, (alpha, ref) in enumerate(zip(alphas, refs)):
        # every reference spot gets the same GE: the source centroid at 0, the target's at 1
        np.testing.assert_allclose(cls[i], (1 - alpha) * source.cls + alpha * target.cls, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(tokens[i], (1 - alpha) * source.tokens + alpha * target.tokens, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(uni[i], own_uni[ref])  # each reference keeps its own UNI
    assert not np.allclose(source.cls, own_cls[refs[0]])

    rows_s, _, uni_s, ge_s = conditions_of(cohort, "spotwise")
    assert rows_s["ref_key"].tolist() == refs  # same references, same noise keys
    np.testing.assert_array_equal(uni_s, uni)
    cls_s = ge_s.cls.numpy()
    for i, (alpha, ref) in enumerate(zip(alphas, refs)):
        np.testing.assert_allclose(cls_s[i], (1 - alpha) * own_cls[ref] + alpha * target.cls, rtol=1e-5, atol=1e-6)
    start = alphas == 0
    assert np.abs(cls_s[start][0] - cls_s[start][1]).max() > 1e-3  # spot-wise: each spot starts at its own GE
    np.testing.assert_allclose(cls_s[alphas == 1], cls[alphas == 1], rtol=1e-5, atol=1e-6)  # both end at the target


def test_centroid_mode_skips_a_pair_without_a_source_centroid():
    keys, test_labels = ["a", "b"], np.array(["Necrosis", "Tumor"], object)
    train_labels = np.array(["Tumor", "Stroma"], object)
    pairs = [("Necrosis", "Tumor")]
    rows, skipped = perturb.perturbation_rows(pairs, [0.0, 1.0], keys, test_labels, train_labels, 2, 0, "centroid")
    assert rows.empty and "no source centroid" in skipped["Necrosis->Tumor"]
    rows, skipped = perturb.perturbation_rows(pairs, [0.0, 1.0], keys, test_labels, train_labels, 2, 0, "spotwise")
    assert len(rows) == 2 and not skipped


def test_uni_null_perturbation_uses_ge_guidance(cohort, models, tmp_path):
    out = tmp_path / "uni_null.zarr"
    cli(*perturb_args(cohort, models["xattn"], out, "--uni-null", "--mode", "spotwise"))
    store = read_store(out)
    assert store["attrs"]["sampler"]["regime"] == "ge" and store["attrs"]["perturbation"]["uni_null"] is True
    ge_regime = tmp_path / "ge.zarr"
    cli(*tiles_args(cohort, models["xattn"], ge_regime, regime="ge"))
    ge_store = read_store(ge_regime)
    plain = dict(zip(ge_store["spot_key"], ge_store["latent"]))
    _, refs, _ = store_columns(store)
    np.testing.assert_array_equal(store["latent"][0], plain[refs[0]])  # alpha 0, UNI nulled = ge regime


def test_token_centroid_matches_class_centroids(cohort):
    group = zarr.open_group(str(cohort["root"] / "cf.zarr"), mode="r")
    tokens, mask = np.asarray(group["tokens"][:]), np.asarray(group["token_mask"][:])
    rows = np.array([0, 3, 5, 6])
    centroid, valid = perturb.token_centroid(GeTokenSource(cohort["root"] / "cf.zarr"), rows, block=3)
    expected = class_centroids(tokens[rows], ["x"] * 4, mask[rows])["x"]
    np.testing.assert_allclose(centroid, expected, rtol=1e-12)
    assert valid.all()
    # positions only the centroid has appear once alpha > 0; alpha 0 returns the spot unchanged
    target = perturb.GeCentroid(np.zeros(8), centroid, valid)
    spot_tokens, spot_mask = tokens[0].astype(np.float64), mask[0]
    assert not spot_mask.all()
    same, same_mask = perturb.interpolate_tokens(spot_tokens, spot_mask, target, 0.0)
    np.testing.assert_array_equal(same, spot_tokens)
    np.testing.assert_array_equal(same_mask, spot_mask)
    moved, moved_mask = perturb.interpolate_tokens(spot_tokens, spot_mask, target, 1.0)
    assert moved_mask.all()
    np.testing.assert_allclose(moved, centroid)


@pytest.mark.parametrize("mode", ["spotwise", "centroid"])
def test_nan_tokens_stop_perturbation_naming_the_store(cohort, tmp_path, mode):
    """A NaN in a reference spot's tokens (spot-wise) or in a train spot's of the target class (both
    modes: the target centroid) stops with one error naming the GE store, not NaN tiles."""
    import shutil

    from stmdit.errors import InputError

    root = tmp_path / "cohort"
    shutil.copytree(cohort["root"], root)
    table = cohort["table"]
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    rows, _ = perturb.perturbation_rows([("Tumor", "Stroma")], [0.0, 0.5, 1.0], test["key"].tolist(),
                                        test["label"].to_numpy(object), train["label"].to_numpy(object), 2, 42, mode)
    bad_key = rows["ref_key"].iloc[0] if mode == "spotwise" else train[train["label"] == "Stroma"]["key"].iloc[0]
    group = zarr.open_group(str(root / "cf.zarr"), mode="r+")
    row = list(string_values(group["spot_key"][:])).index(bad_key)
    tokens = np.asarray(group["tokens"][row])
    tokens[0, 0] = np.nan  # position 0 (CLS) is a real token in every spot
    group["tokens"][row] = tokens
    with pytest.raises(InputError, match="cf.zarr") as err:
        conditions_of(cohort, mode, root)
    assert "NaN or inf" in str(err.value)


def test_unknown_mode_is_refused():
    with pytest.raises(SystemExit):
        cli("perturbed-tiles", "--mode", "nearest")
