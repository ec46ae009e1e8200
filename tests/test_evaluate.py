"""Evaluation CLIs on tiny hand-made stores: features of samples, FID/AUC/perturbation JSONs
recomputed independently, accepted by the report's tables, and bad inputs."""

from __future__ import annotations

import argparse
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import scipy.sparse as sp
import torch
import zarr

from stmdit import eval_json, evaluate, metrics, report
from stmdit.encoders import load_encoder
from stmdit.errors import InputError
from stmdit.features import write_feature_store
from stmdit.split_table import split_keys
from stmdit.zarr_rows import string_values

torch.set_num_threads(1)

MODEL, COHORT = "adaln_p05", "demo"
LABELS = ("Tumor", "Stroma", "Immune")
N_GENES = 30
DIMS = {"h0mini": 8, "uni2h": 12, "midnight": 10}
SMOKE_UPSTREAM = {"sd3_vae": "smoke", "uni2h": {"name": "uni2h", "impl": "smoke"}, "cancerfoundation": "real"}


def run_cli(*argv: str):
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def feature_store(path, keys, embedding, name="h0mini", impl="smoke", **attrs):
    write_feature_store(path, keys, [{"embedding": embedding}], {"embedding": (embedding.shape[1],)},
                        {"encoder": {"name": name, "impl": impl}, **attrs})
    return path


def image_store(path, keys, images, **arrays):
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("spot_key", shape=(len(keys),), dtype=str)[:] = np.array(keys, dtype=object)
    group.create_array("images", data=images, chunks=(2, *images.shape[1:]))
    for name, values in arrays.items():
        values = np.asarray(values)
        if values.dtype.kind in "UO":
            group.create_array(name, shape=values.shape, dtype=str)[:] = values.astype(object)
        else:
            group.create_array(name, data=values)
    group.attrs.update({"encoders": SMOKE_UPSTREAM, "sampler": {"name": "ddim", "steps": 50}})
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """60 train, 6 val, 39 test spots with labels, counts, and real features that carry the
    expression signal (so the Oracle has something to find)."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    splits = ["train"] * 60 + ["val"] * 6 + ["test"] * 39
    keys = [f"{'s1' if s != 'test' else 's2'}:bc{i:03d}" for i, s in enumerate(splits)]
    labels = np.array([LABELS[i % 3] for i in range(len(keys))])
    programme = rng.gamma(2.0, 1.0, size=(len(keys), 4))
    counts = rng.poisson(programme @ rng.gamma(1.0, 2.0, size=(4, N_GENES)) + 0.5).astype(np.int32)
    obs = pd.DataFrame({"label": labels, "sample": [k.split(":")[0] for k in keys]}, index=keys)
    adata = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs,
                       var=pd.DataFrame({"highly_variable": np.arange(N_GENES) % 4 != 3},
                                        index=[f"G{j}" for j in range(N_GENES)]))
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.var["protein_coding"] = PROTEIN_CODING
    adata.uns["gene_sets"] = {"protein_coding": {"source": "test list", "version": "v1", "list_genes": 100}}
    adata.write_h5ad(root / "expr.h5ad")
    pd.DataFrame({"key": keys, "sample": obs["sample"], "donor": obs["sample"], "split": splits}).to_parquet(
        root / "split.parquet")
    log_expr = metrics.log1p_cp10k(counts)
    real = {}
    for name, dim in DIMS.items():
        embedding = log_expr @ rng.standard_normal((N_GENES, dim)) + 0.3 * rng.standard_normal((len(keys), dim))
        embedding += 2.0 * np.array([LABELS.index(l) for l in labels])[:, None]
        real[name] = embedding.astype(np.float32)
        feature_store(root / f"{name}.zarr", keys, real[name], name=name, impl="smoke" if name == "h0mini" else "real")
    test = [k for k, s in zip(keys, splits) if s == "test"]
    gen_order = list(rng.permutation(test))  # generated stores list spots in another order than the real store
    row = {k: i for i, k in enumerate(keys)}
    generated = {}
    for name in DIMS:
        for regime, noise in {"uni_ge": 0.5, "uni": 1.0, "ge": 3.0, "deepspot": 0.7, "visium": 2.0}.items():
            values = real[name][[row[k] for k in gen_order]] + noise * rng.standard_normal((len(test), DIMS[name]))
            path = feature_store(root / f"gen_{regime}_{name}.zarr", gen_order, values.astype(np.float32), name=name,
                                 impl="smoke" if name == "h0mini" else "real", encoders=SMOKE_UPSTREAM)
            generated[regime, name] = (path, values.astype(np.float32))
    return {"root": root, "keys": keys, "labels": labels, "splits": np.array(splits), "counts": counts,
            "real": real, "row": row, "test": test, "gen_order": gen_order, "generated": generated}


PROTEIN_CODING = np.arange(N_GENES) % 5 != 0  # Midnight+MLP's genes (paper D.4)


def real_rows(cohort, name, keys):
    return cohort["real"][name][[cohort["row"][k] for k in keys]]


# ---------------------------------------------------------------------------------------------
# eval-features


def test_eval_features_equals_the_encoder_and_carries_smoke_attrs(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(7, 256, 256, 3), dtype=np.uint8)
    keys = [f"Tumor->Stroma|s2:bc{i:03d}|{a}" for i, a in enumerate([0, 0.25, 0.5, 0.75, 1, 0, 0.25])]
    store = image_store(tmp_path / "perturbation.zarr", keys, images, pair=["Tumor->Stroma"] * 7,
                        ref_key=[k.split("|")[1] for k in keys], alpha=[float(k.split("|")[2]) for k in keys])
    run_cli("eval-features", "--encoder", "h0mini", "--impl", "smoke", "--images", store,
            "--out", tmp_path / "f.zarr", "--batch-size", "3", "--device", "cpu")
    out = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    expected = load_encoder("h0mini", "smoke", device="cpu").encode(images)["embedding"]
    assert list(string_values(out["spot_key"][:])) == keys
    np.testing.assert_allclose(out["embedding"][:], expected, rtol=1e-6, atol=1e-6)
    assert out.attrs["encoder"]["impl"] == "smoke" and out.attrs["encoder"]["name"] == "h0mini"
    assert out.attrs["encoders"] == SMOKE_UPSTREAM and out.attrs["sampler"]["name"] == "ddim"
    assert out.attrs["stmdit"]["step"] == "eval-features"
    np.testing.assert_array_equal(out["alpha"][:], [0, 0.25, 0.5, 0.75, 1, 0, 0.25])
    assert list(string_values(out["pair"][:])) == ["Tumor->Stroma"] * 7
    assert evaluate.encoder_impls(dict(out.attrs)) == {"h0mini": "smoke", "sd3_vae": "smoke", "uni2h": "smoke",
                                                       "cancerfoundation": "real"}


def test_eval_features_rejects_a_store_that_is_not_uint8_images(tmp_path):
    store = tmp_path / "bad.zarr"
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    group.create_array("spot_key", shape=(2,), dtype=str)[:] = np.array(["a", "b"], dtype=object)
    group.create_array("images", data=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(InputError, match="uint8") as err:
        run_cli("eval-features", "--encoder", "h0mini", "--images", store, "--out", tmp_path / "f.zarr")
    assert err.value.path == str(store)
    with pytest.raises(InputError, match="not found"):
        run_cli("eval-features", "--encoder", "h0mini", "--images", tmp_path / "nope.zarr", "--out", tmp_path / "f.zarr")
    assert not (tmp_path / "f.zarr").exists()


# ---------------------------------------------------------------------------------------------
# FID


def independent_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_args(cohort, kind, out, regimes, *extra):
    root = cohort["root"]
    generated = [f"{r}={cohort['generated'][r, 'h0mini'][0]}" for r in regimes]
    return ["fid", "--real", root / "h0mini.zarr", "--generated", *generated, "--split", root / "split.parquet",
            "--n-boot", "20", "--seed", "7", "--model", MODEL, "--cohort", COHORT, "--kind", kind, "--out", out, *extra]


def test_fid_json_equals_an_independent_recomputation_and_renders_table_1(cohort, tmp_path):
    out = tmp_path / "fid.json"
    run_cli(*fid_args(cohort, "fid", out, ["uni_ge", "uni", "ge"], "--expression", cohort["root"] / "expr.h5ad",
                      "--min-spots-per-tissue", "5", "--n-boot-per-tissue", "5"))
    doc = eval_json.load_eval_json(out)
    real = real_rows(cohort, "h0mini", cohort["gen_order"])
    labels = pd.Series(cohort["labels"], index=cohort["keys"])[cohort["gen_order"]].to_numpy()
    for regime in ("uni_ge", "uni", "ge"):
        gen = cohort["generated"][regime, "h0mini"][1]
        expected = metrics.fid_bootstrap(real, gen, n_boot=20, seed=7)
        got = doc["regimes"][regime]
        for field in ("point", "mean", "lo", "hi"):
            assert got[field] == pytest.approx(expected[field], rel=1e-12)
        assert got["lo"] <= got["mean"] <= got["hi"] and got["n_boot"] == 20
        assert got["n_real"] == got["n_gen"] == len(cohort["test"])
        assert got["point"] == pytest.approx(independent_frechet(real.astype(np.float64), gen.astype(np.float64)), rel=1e-6)
        tissue = metrics.fid_per_label(real, gen, labels, min_spots=5, n_boot=5, seed=7)
        assert doc["per_tissue"][regime]["labels"].keys() == set(LABELS)
        for label in LABELS:
            assert doc["per_tissue"][regime]["labels"][label]["point"] == pytest.approx(tissue["labels"][label]["point"])
    assert doc["features"]["real"].endswith("h0mini.zarr")
    assert doc["encoders"] == {"cancerfoundation": "real", "h0mini": "smoke", "sd3_vae": "smoke", "uni2h": "smoke"}
    table = report.build_table(1, [doc], [{"model": MODEL, "name": "AdaLN p0.5"}])
    # the table prints the bootstrap mean (the paper's statistic) with the point beside it
    assert table.loc[0, "UNI+GE"] == pytest.approx(doc["regimes"]["uni_ge"]["mean"])
    assert table.loc[0, "UNI+GE point"] == pytest.approx(doc["regimes"]["uni_ge"]["point"])
    assert table.loc[0, "Delta"] == pytest.approx(doc["regimes"]["uni_ge"]["mean"] - doc["regimes"]["uni"]["mean"])
    assert table.attrs["smoke"]


def test_fid_json_carries_each_regimes_paired_difference_from_uncond(cohort, tmp_path):
    out = tmp_path / "fid.json"
    ge_store = cohort["generated"]["ge", "h0mini"][0]
    args = fid_args(cohort, "fid", out, ["uni", "ge"])
    args.insert(args.index("--split"), f"uncond={ge_store}")  # uncond's tiles are ge's: FID(ge) - FID(uncond) = 0
    run_cli(*args)
    regimes = eval_json.load_eval_json(out)["regimes"]
    assert "minus_uncond" not in regimes["uncond"]
    assert regimes["ge"]["minus_uncond"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n_boot": 20, "alpha": 0.05}
    uni = regimes["uni"]["minus_uncond"]  # uni's features are 3x closer to the real ones than ge's
    assert uni["lo"] <= uni["mean"] <= uni["hi"] < 0
    assert uni["mean"] == pytest.approx(regimes["uni"]["mean"] - regimes["uncond"]["mean"], rel=1e-9)


def test_ood_and_swap_jsons_render_tables_3_and_6(cohort, tmp_path):
    run_cli(*fid_args(cohort, "ood", tmp_path / "ood_fid.json", ["uni_ge", "uni"]))
    run_cli(*fid_args(cohort, "swap", tmp_path / "swap_fid.json", ["deepspot", "visium"]))
    ood, swap = eval_json.load_eval_json(tmp_path / "ood_fid.json"), eval_json.load_eval_json(tmp_path / "swap_fid.json")
    assert ood["n_subsample"] == len(cohort["test"]) and ood["seed"] == 7
    rows = [{"model": MODEL, "name": "AdaLN", "architecture": "PTPL-AdaLN"}]
    table3 = report.build_table(3, [ood], rows)
    assert table3.loc[0, "FID"] == pytest.approx(ood["regimes"]["uni_ge"]["mean"])
    assert table3.loc[0, "FID point"] == pytest.approx(ood["regimes"]["uni_ge"]["point"])
    assert table3.loc[0, "Delta_OOD(GE)"] == pytest.approx(ood["regimes"]["uni"]["mean"] - ood["regimes"]["uni_ge"]["mean"])
    table6 = report.build_table(6, [swap], rows)
    real = real_rows(cohort, "h0mini", cohort["gen_order"])
    visium = metrics.fid(real, cohort["generated"]["visium", "h0mini"][1])
    assert table6.loc[0, "Visium-cond point"] == pytest.approx(visium)
    assert table6.loc[0, "Visium-cond"] == pytest.approx(swap["conditions"]["visium"]["mean"])
    assert table6.loc[0, "Delta"] == pytest.approx(swap["conditions"]["visium"]["mean"] - swap["conditions"]["deepspot"]["mean"])


def test_fid_bad_inputs_name_the_file(cohort, tmp_path):
    root, out = cohort["root"], tmp_path / "fid.json"
    # a regime store with fewer spots than the others
    short = feature_store(tmp_path / "short.zarr", cohort["gen_order"][:-3], cohort["generated"]["uni", "h0mini"][1][:-3])
    args = fid_args(cohort, "fid", out, ["uni_ge"])
    args[args.index("--generated") + 1: args.index("--generated") + 2] = [args[args.index("--generated") + 1],
                                                                        f"uni={short}"]
    with pytest.raises(InputError, match="same spots") as err:
        run_cli(*args)
    assert err.value.path == str(short)
    # generated spots outside the real store
    alien = feature_store(tmp_path / "alien.zarr", ["s9:x1", "s9:x2", "s9:x3"], np.ones((3, 8), np.float32))
    split = tmp_path / "split.parquet"
    pd.DataFrame({"key": ["s9:x1", "s9:x2", "s9:x3"], "split": "test"}).to_parquet(split)
    with pytest.raises(InputError, match="not in the feature store") as err:
        run_cli("fid", "--real", root / "h0mini.zarr", "--generated", f"uni={alien}", "--split", split,
                "--model", MODEL, "--cohort", COHORT, "--kind", "fid", "--out", out)
    assert err.value.path == str(root / "h0mini.zarr")
    # generated spots that are not test spots
    train_store = feature_store(tmp_path / "train.zarr", cohort["keys"][:5], cohort["real"]["h0mini"][:5])
    with pytest.raises(InputError, match="not in split 'test'") as err:
        run_cli("fid", "--real", root / "h0mini.zarr", "--generated", f"uni={train_store}", "--split",
                root / "split.parquet", "--model", MODEL, "--cohort", COHORT, "--kind", "fid", "--out", out)
    assert err.value.path == str(train_store)
    with pytest.raises(InputError, match="not found") as err:
        run_cli(*fid_args(cohort, "fid", out, ["uni"])[:4], f"uni={tmp_path / 'missing.zarr'}",
                *fid_args(cohort, "fid", out, ["uni"])[5:])
    assert err.value.path == str(tmp_path / "missing.zarr")
    with pytest.raises(InputError, match="deepspot"):
        run_cli(*fid_args(cohort, "swap", out, ["deepspot"]))
    assert not out.exists()


def test_generated_stores_align_spots_and_read_each_store_only_when_asked(tmp_path):
    keys = [f"s0:{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    feature_store(tmp_path / "a.zarr", keys, a)
    order = [3, 5, 0, 1, 4, 2]
    feature_store(tmp_path / "b.zarr", [keys[i] for i in order], b[order])
    stores = evaluate.GeneratedStores({"uni": tmp_path / "a.zarr", "uni_ge": tmp_path / "b.zarr"})
    assert stores.keys == keys and list(stores) == ["uni", "uni_ge"]
    np.testing.assert_array_equal(stores["uni_ge"], b)  # rows of the other order, read in the first store's order
    given = evaluate.GeneratedStores({"uni": tmp_path / "a.zarr"}, keys=keys[::-1])
    np.testing.assert_array_equal(given["uni"], a[::-1])
    # the rows are read when asked, not when the stores are opened
    feature_store(tmp_path / "a.zarr", keys, a + 1)
    np.testing.assert_array_equal(stores["uni"], a + 1)
    with pytest.raises(InputError, match="same spots") as err:
        evaluate.GeneratedStores({"uni": tmp_path / "a.zarr"}, keys=keys[:5])
    assert err.value.path == str(tmp_path / "a.zarr")
    # a NaN in a generated or real store stops the scoring with the store and the spot
    zarr.open_group(str(tmp_path / "b.zarr"), mode="r+")["embedding"][1, 2] = np.nan  # b's row 1 is keys[5]
    with pytest.raises(InputError, match=f"NaN or inf values at spot {keys[5]}") as err:
        stores["uni_ge"]
    assert err.value.path == str(tmp_path / "b.zarr")
    with pytest.raises(InputError, match=f"spot {keys[5]}"):
        evaluate.read_features(tmp_path / "b.zarr")


# ---------------------------------------------------------------------------------------------
# AUC


def fit_regressors(cohort, tmp_path, *extra, seed="3", ks="5,10,20"):
    """The Oracle (PCA 4) and Midnight+MLP (8 hidden, 30 epochs) of the fixture, via the CLI."""
    root, paths = cohort["root"], []
    for kind, features, options in (("oracle", "uni2h", ["--pca", "4"]),
                                    ("midnight_mlp", "midnight", ["--mlp-hidden", "8", "--mlp-max-iter", "30", *extra])):
        paths.append(tmp_path / f"{kind}.joblib")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning at 30 iterations
            run_cli("eval-regressor", "--regressor", kind, "--expression", root / "expr.h5ad", "--split",
                    root / "split.parquet", "--features", root / f"{features}.zarr", "--ks", ks, *options,
                    "--seed", seed, "--out", paths[-1])
    return paths


def test_auc_json_equals_a_direct_recomputation_and_renders_table_2(cohort, tmp_path):
    root, out = cohort["root"], tmp_path / "auc.json"
    gen_uni = [f"{r}={cohort['generated'][r, 'uni2h'][0]}" for r in ("uni_ge", "uni")]
    gen_midnight = [f"uni_ge={cohort['generated']['uni_ge', 'midnight'][0]}"]
    oracle, mlp = fit_regressors(cohort, tmp_path)
    run_cli("auc", "--expression", root / "expr.h5ad", "--split", root / "split.parquet", "--oracle", oracle,
            "--real-uni", root / "uni2h.zarr", "--gen-uni", *gen_uni, "--midnight-mlp", mlp,
            "--real-midnight", root / "midnight.zarr", "--gen-midnight", *gen_midnight, "--n-boot", "10",
            "--seed", "3", "--model", MODEL, "--cohort", COHORT, "--out", out)
    doc = eval_json.load_eval_json(out)

    train = [k for k, s in zip(cohort["keys"], cohort["splits"]) if s == "train"]
    test = cohort["gen_order"]
    hvgs = np.arange(cohort["counts"].shape[1]) % 4 != 3  # the Oracle regresses HVGs only (CP10k over all genes)
    train_expr = metrics.log1p_cp10k(cohort["counts"][[cohort["row"][k] for k in train]])[:, hvgs]
    test_expr = metrics.log1p_cp10k(cohort["counts"][[cohort["row"][k] for k in test]])[:, hvgs]
    oracle = metrics.fit_oracle(real_rows(cohort, "uni2h", train), train_expr, ks=(5, 10, 20), n_components=4, seed=3)
    truth = {k: test_expr[:, oracle.gene_rank[:k]] for k in oracle.ks}
    for regime in ("uni_ge", "uni"):
        expected = metrics.fidelity_curve(oracle.predict_by_k(cohort["generated"][regime, "uni2h"][1]), truth)
        got = doc["regressors"]["oracle"]["generated"][regime]
        np.testing.assert_allclose(got["curve"], expected["curve"], rtol=1e-6, atol=1e-9)
        assert got["auc"] == pytest.approx(expected["auc"], rel=1e-6, abs=1e-9)
    ceiling = metrics.fidelity_curve(oracle.predict_by_k(real_rows(cohort, "uni2h", test)), truth)
    assert doc["regressors"]["oracle"]["real"]["auc"] == pytest.approx(ceiling["auc"], rel=1e-6)
    assert doc["regressors"]["oracle"]["ks"] == [5, 10, 20]
    assert doc["regressors"]["oracle"]["real"]["auc"] > 0.1  # the features carry expression signal
    assert "uni_ge" in doc["regressors"]["midnight_mlp"]["generated"]
    # Midnight+MLP regresses the protein-coding genes only, and says which list they came from
    assert doc["regressors"]["midnight_mlp"]["genes"] == doc["provenance"]["params"]["midnight_genes"] == {"name": "protein_coding", "source": "test list", "version": "v1",
                                               "list_genes": 100, "n_genes": int(PROTEIN_CODING.sum())}
    all_expr = [metrics.log1p_cp10k(cohort["counts"][[cohort["row"][k] for k in keys]]) for keys in (train, test)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at 30 iterations, as above
        mlp = metrics.fit_midnight_mlp(real_rows(cohort, "midnight", train), all_expr[0][:, PROTEIN_CODING],
                                       ks=(5, 10, 20), hidden_layer_sizes=(8,), max_iter=30, seed=3)
    assert len(mlp.gene_rank) == PROTEIN_CODING.sum()
    truth = {k: all_expr[1][:, PROTEIN_CODING][:, mlp.gene_rank[:k]] for k in mlp.ks}
    expected = metrics.fidelity_curve(mlp.predict_by_k(real_rows(cohort, "midnight", test)), truth)
    assert doc["regressors"]["midnight_mlp"]["real"]["auc"] == pytest.approx(expected["auc"], rel=1e-5, abs=1e-7)
    assert doc["encoders"]["uni2h"] == "smoke" and doc["encoders"]["midnight"] == "real"

    table = report.build_table(2, [doc], [{"model": MODEL, "name": "AdaLN"}])
    assert table.loc[0, "Oracle"] == pytest.approx(ceiling["auc"], rel=1e-6)
    assert table.loc[2, "Oracle"] == pytest.approx(doc["regressors"]["oracle"]["generated"]["uni_ge"]["auc"])
    assert table.loc[2, "Midnight+MLP"] == pytest.approx(doc["regressors"]["midnight_mlp"]["generated"]["uni_ge"]["auc"])


def test_noise_tiles_are_scored_as_a_null_that_covers_zero(cohort, tmp_path):
    root = cohort["root"]
    split_test = split_keys(root / "split.parquet", "test")
    for batch_size in ("3", "64"):  # the tiles depend on (seed, row) only, not on the batching
        run_cli("eval-features", "--encoder", "uni2h", "--impl", "smoke", "--noise-tiles-for", root / "split.parquet",
                "--tile-size", "16", "--seed", "5", "--batch-size", batch_size, "--device", "cpu",
                "--out", tmp_path / f"noise{batch_size}.zarr")
    noise = evaluate.read_features(tmp_path / "noise3.zarr")
    assert noise.keys == split_test and noise.impls == {"uni2h": "smoke"}
    tiles = np.stack([evaluate.noise_tile(5, row, 16) for row in range(len(split_test))])
    expected = load_encoder("uni2h", "smoke", device="cpu").encode(tiles)["embedding"]
    np.testing.assert_allclose(noise.embedding, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(evaluate.read_features(tmp_path / "noise64.zarr").embedding, noise.embedding)

    # The fixture's UNI2-h features are 12-d (the smoke encoder's are 1536-d): noise features of that size.
    dim = evaluate.read_features(root / "uni2h.zarr").embedding.shape[1]
    noise_store = feature_store(tmp_path / "noise_uni2h.zarr", split_test[::-1],
                                np.random.default_rng(8).normal(size=(len(split_test), dim)), name="uni2h")
    out = tmp_path / "auc.json"
    oracle, _ = fit_regressors(cohort, tmp_path)
    run_cli("auc", "--expression", root / "expr.h5ad", "--split", root / "split.parquet", "--oracle", oracle,
            "--real-uni", root / "uni2h.zarr",
            "--gen-uni", f"uni_ge={cohort['generated']['uni_ge', 'uni2h'][0]}", "--noise-uni", noise_store,
            "--n-boot", "100", "--n-perm", "100", "--seed", "3",
            "--model", MODEL, "--cohort", COHORT, "--out", out)
    doc = eval_json.load_eval_json(out)
    null = doc["regressors"]["oracle"]["null"]
    assert null["noise_tiles"]["lo"] <= 0.0 <= null["noise_tiles"]["hi"]
    assert null["empirical"]["lo"] <= 0.0 <= null["empirical"]["hi"] and null["empirical"]["n_perm"] == 100
    assert doc["features"]["uni2h"]["noise_tiles"] == str(noise_store)
    table = report.build_table(2, [doc], [{"model": MODEL, "name": "AdaLN"}])
    assert list(table["Model"])[:3] == ["Upper bound (real tiles)", "Null", "Null (noise tiles)"]
    assert table.loc[2, "Oracle"] == pytest.approx(null["noise_tiles"]["auc"])
    assert table.loc[1, "Oracle lo"] == pytest.approx(null["empirical"]["lo"])


def test_sparse_log1p_cp10k_matches_the_dense_metric(cohort):
    counts = cohort["counts"].copy()
    counts[0] = 0  # an empty spot stays zero
    np.testing.assert_allclose(evaluate.log1p_cp10k_sparse(counts).toarray(), metrics.log1p_cp10k(counts), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Perturbation


def perturbation_stores(cohort, tmp_path, drop_last=False, mode="centroid"):
    """Features along alpha built from the real train centroids: T->S walks onto the Stroma
    centroid, T->I walks away from the Immune centroid, I->T does not move."""
    train = cohort["splits"] == "train"
    h0 = cohort["real"]["h0mini"].astype(np.float64)
    centroid = {label: h0[train & (cohort["labels"] == label)].mean(axis=0) for label in LABELS}
    alphas = metrics.PAPER_ALPHAS
    refs = [f"s2:bc{i:03d}" for i in range(66, 70)]
    paths = {
        "Tumor->Stroma": lambda a: (1 - a) * centroid["Tumor"] + a * centroid["Stroma"],
        "Tumor->Immune": lambda a: centroid["Tumor"] + a * (centroid["Tumor"] - centroid["Immune"]),
        "Immune->Tumor": lambda a: centroid["Immune"],
    }
    keys, pair, ref_key, alpha, features = [], [], [], [], []
    for name, walk in paths.items():
        for ref in refs:
            for a in alphas:
                keys.append(f"{name}|{ref}|{a}")
                pair.append(name), ref_key.append(ref), alpha.append(a), features.append(walk(a))
    if drop_last:
        keys, pair, ref_key, alpha, features = keys[:-1], pair[:-1], ref_key[:-1], alpha[:-1], features[:-1]
    images = np.zeros((len(keys), 8, 8, 3), np.uint8)
    samples = image_store(tmp_path / "perturbation.zarr", keys, images, pair=pair, ref_key=ref_key, alpha=alpha)
    zarr.open_group(str(samples), mode="r+").attrs["perturbation"] = {"mode": mode}
    order = np.random.default_rng(5).permutation(len(keys))
    feats = feature_store(tmp_path / "perturbation_h0mini.zarr", [keys[i] for i in order],
                          np.asarray(features, np.float32)[order], encoders=SMOKE_UPSTREAM)
    return samples, feats


def perturbation_args(cohort, samples, feats, out, *extra):
    root = cohort["root"]
    return ["perturbation", "--features", feats, "--tiles", samples, "--real", root / "h0mini.zarr",
            "--expression", root / "expr.h5ad", "--split", root / "split.parquet", "--model", MODEL,
            "--cohort", COHORT, "--out", out, *extra]


def test_perturbation_scores_constructed_walks_and_renders_table_5(cohort, tmp_path):
    samples, feats = perturbation_stores(cohort, tmp_path)
    run_cli(*perturbation_args(cohort, samples, feats, tmp_path / "perturbation.json"))
    run_cli(*perturbation_args(cohort, samples, feats, tmp_path / "uni_null.json", "--variant", "uni_null",
                               "--weight", "0.5"))
    doc = eval_json.load_eval_json(tmp_path / "perturbation.json")
    pairs = doc["pairs"]
    assert pairs["T->S"]["transition"] == pytest.approx(1.0, abs=1e-5)
    assert pairs["T->S"]["monotonicity"] == pytest.approx(1.0)
    assert pairs["T->S"]["composite"] == pytest.approx(2.0, abs=1e-5)
    assert pairs["T->I"]["composite"] == pytest.approx(-2.0, abs=1e-5)
    assert pairs["I->T"]["composite"] == pytest.approx(0.0, abs=1e-6)
    assert pairs["T->S"]["n_ref"] == 4 and doc["alphas"] == list(metrics.PAPER_ALPHAS)
    assert doc["mean_composite"] == pytest.approx(0.0, abs=1e-5)
    uni_null = eval_json.load_eval_json(tmp_path / "uni_null.json")
    assert uni_null["model"] == f"{MODEL}@uni_null" and uni_null["variant"] == "uni_null"
    assert uni_null["pairs"]["T->S"]["composite"] == pytest.approx(1.5, abs=1e-5)
    assert doc["mode"] == "centroid" and doc["provenance"]["params"]["mode"] == "centroid"
    table = report.build_table(5, [doc, uni_null], [{"model": MODEL, "name": "AdaLN", "p": 0.5},
                                                    {"model": f"{MODEL}@uni_null", "name": "AdaLN (UNI-null)"}])
    assert list(table["T->S"]) == pytest.approx([2.0, 1.5], abs=1e-5)
    assert table.loc[0, "mean"] == pytest.approx(0.0, abs=1e-5)
    assert "Perturbation mode centroid: GE interpolated between the source and target class centroids" in \
        " ".join(table.attrs["notes"])

    # a spot-wise series is labelled as such, row by row when the table mixes modes
    spotwise_dir = tmp_path / "spotwise"
    spotwise_dir.mkdir()
    samples, feats = perturbation_stores(cohort, spotwise_dir, mode="spotwise")
    run_cli(*perturbation_args(cohort, samples, feats, spotwise_dir / "p.json", "--model", "spot"))
    spotwise = eval_json.load_eval_json(spotwise_dir / "p.json")
    assert spotwise["mode"] == "spotwise"
    mixed = report.build_table(5, [doc, spotwise], [{"model": MODEL, "name": "AdaLN", "p": 0.5},
                                                    {"model": "spot", "name": "AdaLN spot-wise"}])
    assert "spotwise (each reference spot's own GE interpolated toward the target class centroid (not the " \
           "paper's)): AdaLN spot-wise" in " ".join(mixed.attrs["notes"])
    with pytest.raises(InputError, match="mode must be one of"):
        eval_json.perturbation_json(model="m", cohort="c", pairs=doc["pairs"], alphas=doc["alphas"],
                                 monotonicity_weight=1.0, mode="nearest", encoders={}, params={}, inputs=[])


def test_perturbation_with_a_missing_alpha_names_the_samples_store(cohort, tmp_path):
    samples, feats = perturbation_stores(cohort, tmp_path, drop_last=True)
    with pytest.raises(InputError, match="expected one per reference and alpha") as err:
        run_cli(*perturbation_args(cohort, samples, feats, tmp_path / "p.json"))
    assert err.value.path == str(samples)
    other = feature_store(tmp_path / "other.zarr", ["a", "b"], np.zeros((2, 8), np.float32))
    with pytest.raises(InputError, match="spot keys") as err:
        run_cli(*perturbation_args(cohort, samples, other, tmp_path / "p.json"))
    assert err.value.path == str(other)
    assert not (tmp_path / "p.json").exists()
    assert evaluate.merge_impls({"a": "real"}, {"a": "smoke"}, {"a": "real"}) == {"a": "smoke"}


class SingleJobMidnightMLP(metrics.MidnightMLPRegressor):
    """The Midnight+MLP as the single-job `auc` used it before the fit moved to eval_regressor:
    every gene predicted for every spot at once, then the top-k columns taken."""

    def predict_by_k(self, features):
        predictions = np.clip(self.model.predict(metrics.as_feature_matrix(features, min_rows=1)), 0.0, None)
        return {k: predictions[:, self.gene_rank[:k]] for k in self.ks}


def test_auc_from_saved_regressors_equals_the_single_job_fit(cohort, tmp_path):
    """fit once + save + load + predict gives the AUCs of fitting inside the auc job, exactly."""
    import json

    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = cohort["root"]
    oracle_path, mlp_path = fit_regressors(cohort, tmp_path)
    gen = {r: cohort["generated"][r, "uni2h"][0] for r in ("uni_ge", "uni")}
    gen_midnight = {r: cohort["generated"][r, "midnight"][0] for r in ("uni_ge", "uni")}
    out = tmp_path / "auc.json"
    run_cli("auc", "--expression", root / "expr.h5ad", "--split", root / "split.parquet", "--oracle", oracle_path,
            "--real-uni", root / "uni2h.zarr", "--gen-uni", *[f"{r}={p}" for r, p in gen.items()],
            "--midnight-mlp", mlp_path, "--real-midnight", root / "midnight.zarr",
            "--gen-midnight", *[f"{r}={p}" for r, p in gen_midnight.items()], "--n-boot", "20", "--n-perm", "20",
            "--seed", "3", "--model", MODEL, "--cohort", COHORT, "--out", out)
    doc = eval_json.load_eval_json(out)

    # The single-job path: fit on the train spots in the job (dense float64 targets, then float32).
    train = split_keys(root / "split.parquet", "train")
    test = evaluate.GeneratedStores(gen).keys
    train_expr = evaluate.read_expression_log1p(root / "expr.h5ad", train)
    test_expr = evaluate.read_expression_log1p(root / "expr.h5ad", test)
    hvgs = evaluate.hvg_columns(root / "expr.h5ad")
    cols, _ = evaluate.midnight_columns(root / "expr.h5ad", "protein_coding")
    oracle = metrics.fit_oracle(evaluate.read_features(root / "uni2h.zarr", train).embedding, train_expr[:, hvgs],
                                ks=(5, 10, 20), n_components=4, seed=3)
    features = evaluate.read_features(root / "midnight.zarr", train).embedding
    target = train_expr[:, cols].toarray().astype(np.float64).astype(np.float32)
    model = make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(8,), max_iter=30, random_state=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(features.astype(np.float32), target)
    mlp = SingleJobMidnightMLP(model=model, gene_rank=metrics.rank_genes_by_variance(train_expr[:, cols]),
                               ks=(5, 10, 20))
    for name, regressor, encoder, stores, columns in (("oracle", oracle, "uni2h", gen, hvgs),
                                                      ("midnight_mlp", mlp, "midnight", gen_midnight, cols)):
        scored = metrics.transcriptomic_fidelity(
            regressor, test_expr[:, columns], evaluate.read_features(root / f"{encoder}.zarr", test).embedding,
            {r: evaluate.read_features(p, test).embedding for r, p in stores.items()}, n_boot=20, seed=3, n_perm=20)
        got = {key: value for key, value in doc["regressors"][name].items() if key != "genes"}
        assert got == json.loads(json.dumps(scored)), name  # bit-identical numbers

    # The saved MLP predicts the same in blocks of rows as all at once, to float64 rounding: BLAS
    # may pick another GEMM kernel for 7 rows (1 ulp apart on an AMD EPYC's OpenBLAS).
    saved = evaluate.load_regressor(mlp_path, "midnight_mlp")["regressor"]
    real_test = evaluate.read_features(root / "midnight.zarr", test).embedding
    by_block = saved.predict_by_k(real_test, block_rows=7)
    for k, expected in mlp.predict_by_k(real_test).items():
        np.testing.assert_allclose(by_block[k], expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(InputError, match="expected a fitted oracle"):
        evaluate.load_regressor(mlp_path, "oracle")


def test_auc_with_a_torch_fitted_midnight_mlp_records_its_impl(cohort, tmp_path):
    root = cohort["root"]
    oracle, mlp = fit_regressors(cohort, tmp_path, "--mlp-impl", "torch", "--device", "cpu")
    saved = evaluate.load_regressor(mlp, "midnight_mlp")
    assert saved["provenance"]["params"]["impl"] == "torch" and saved["provenance"]["stmdit_version"]
    assert str(root / "midnight.zarr") in saved["provenance"]["inputs"]
    out = tmp_path / "auc.json"
    run_cli("auc", "--expression", root / "expr.h5ad", "--split", root / "split.parquet", "--oracle", oracle,
            "--real-uni", root / "uni2h.zarr", "--gen-uni", f"uni_ge={cohort['generated']['uni_ge', 'uni2h'][0]}",
            "--midnight-mlp", mlp, "--real-midnight", root / "midnight.zarr",
            "--gen-midnight", f"uni_ge={cohort['generated']['uni_ge', 'midnight'][0]}", "--n-boot", "10",
            "--n-perm", "10", "--seed", "3", "--model", MODEL, "--cohort", COHORT, "--out", out)
    doc = eval_json.load_eval_json(out)
    assert doc["provenance"]["params"]["mlp_impl"] == "torch"
    assert np.isfinite(doc["regressors"]["midnight_mlp"]["real"]["auc"])
    with pytest.raises(InputError, match="fitted Oracle|not found"):
        run_cli("auc", "--expression", root / "expr.h5ad", "--split", root / "split.parquet",
                "--oracle", tmp_path / "missing.joblib", "--real-uni", root / "uni2h.zarr",
                "--gen-uni", f"uni_ge={cohort['generated']['uni_ge', 'uni2h'][0]}", "--model", MODEL,
                "--cohort", COHORT, "--out", tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def read_expression_log1p_whole(path, keys):
    """The former reader: the whole AnnData in memory, counts[rows] then log1p CP10k of all genes."""
    adata = ad.read_h5ad(path)
    rows = pd.Index(adata.obs_names.astype(str)).get_indexer(pd.Index(keys))
    return evaluate.log1p_cp10k_sparse(sp.csr_matrix(adata.layers["counts"])[rows])


@pytest.mark.parametrize("dense_layer", [False, True])
def test_blocked_expression_reader_equals_reading_the_whole_anndata(tmp_path, dense_layer):
    """read_expression_log1p reads layers["counts"] alone in blocks of rows: for keys in file order,
    shuffled, a subset, and with only some columns, its values are bit-identical to the former
    whole-AnnData path (then [:, columns]); an empty spot stays zero."""
    rng = np.random.default_rng(8)
    n, genes = 53, 40
    dense = rng.integers(1, 60, size=(n, genes)) * (rng.random((n, genes)) < 0.3)
    dense[4] = 0
    counts = sp.csr_matrix(dense.astype(np.int32))
    keys = [f"S:{i:03d}" for i in range(n)]
    adata = ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=pd.DataFrame(index=keys),
                       layers={"counts": counts.toarray() if dense_layer else counts})
    adata.obsm["hvg_scaled"] = rng.normal(size=(n, 5)).astype(np.float32)
    path = tmp_path / "expr.h5ad"
    adata.write_h5ad(path)
    columns = np.array([0, 3, 4, 17, 39])
    for wanted in (keys, list(rng.permutation(keys)), keys[5:30:3], [keys[4], keys[0]]):
        expected = read_expression_log1p_whole(path, wanted)
        for block in (1, 7, 4096):
            got = evaluate.read_expression_log1p(path, wanted, block_rows=block)
            assert got.dtype == np.float32 and got.shape == expected.shape
            np.testing.assert_array_equal(got.toarray(), expected.toarray())
            subset = evaluate.read_expression_log1p(path, wanted, columns, block_rows=block)
            np.testing.assert_array_equal(subset.toarray(), expected[:, columns].toarray())
        # auc's truth: only the top-max(k) ranked genes of the regressor's columns, the same values
        rank = np.array([3, 0, 4, 1, 2])
        payload = {"columns": columns, "regressor": argparse.Namespace(gene_rank=rank, ks=(1, 3))}
        truth = evaluate.read_scored_truth(path, wanted, payload)
        assert truth.shape == (len(wanted), len(columns)) and set(truth.indices) <= set(rank[:3])
        for k in (1, 3):
            np.testing.assert_array_equal(metrics._dense_columns(truth, rank[:k]),
                                          metrics._dense_columns(expected[:, columns], rank[:k]))
    assert evaluate.read_expression_log1p(path, keys[4:5]).nnz == 0
    assert evaluate.expression_gene_count(path) == genes
    with pytest.raises(InputError, match="not in the expression file"):
        evaluate.read_expression_log1p(path, ["S:999"])
    del adata.layers["counts"]
    adata.write_h5ad(tmp_path / "nocounts.h5ad")
    with pytest.raises(InputError, match="no raw counts"):
        evaluate.read_expression_log1p(tmp_path / "nocounts.h5ad", keys)


def test_bench_mlp_auc_scores_each_impl_on_the_same_real_test_tiles(cohort, tmp_path, capsys):
    from stmdit.bench import BENCHMARKS
    from stmdit.cli import main

    root = cohort["root"]
    _, sklearn_fit = fit_regressors(cohort, tmp_path / "sklearn")
    _, torch_fit = fit_regressors(cohort, tmp_path / "torch", "--mlp-impl", "torch", "--device", "cpu")
    common = ["bench", "mlp-auc", "--expression", root / "expr.h5ad", "--split", root / "split.parquet",
              "--midnight", root / "midnight.zarr", "--n-boot", "20", "--seed", "3"]
    assert main([str(a) for a in [*common, "--fitted", f"sklearn={sklearn_fit}", f"torch={torch_fit}"]]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # each fit scored exactly as the auc command scores its real test tiles
    sklearn_entry = result["fits"]["sklearn"]
    test = [k for k, s in zip(cohort["keys"], cohort["splits"]) if s == "test"]
    payload = evaluate.load_regressor(sklearn_fit, "midnight_mlp")
    expected = evaluate.score_regressor(payload["regressor"], root / "midnight.zarr", test, {},
                                        evaluate.read_scored_truth(root / "expr.h5ad", test, payload), 20, 3,
                                        n_perm=20)["real"]
    assert sklearn_entry["auc"] == round(expected["auc"], 4) and sklearn_entry["lo"] == round(expected["lo"], 4)
    torch_entry = result["fits"]["torch"]
    assert torch_entry["params"]["impl"] == "torch" and torch_entry["auc"] != sklearn_entry["auc"]
    assert torch_entry["within_reference_interval"] == (sklearn_entry["lo"] <= torch_entry["auc"] <= sklearn_entry["hi"])
    assert "within_reference_interval" not in sklearn_entry and "mlp-auc" in BENCHMARKS
    assert main([str(a) for a in [*common, "--fitted", f"torch={sklearn_fit}"]]) != 0
    assert "fitted with impl 'sklearn', given as 'torch'" in capsys.readouterr().err
