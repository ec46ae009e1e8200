"""Virtual tissue experiments: the edit grammar on expression with known answers, the bad-input
lines, the paired effect-vs-control statistics, and one experiment end to end on a tiny random
STMDiT (same noise in every arm; an edit the encoder cannot read changes nothing)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from stmdit.errors import InputError
from stmdit.virtual import edits as E
from stmdit.virtual.experiment import ExperimentSpec, read_spot_tables, select_spots
from stmdit.virtual.report import paired_bootstrap

torch.set_num_threads(1)

GENES = ["CD8A", "MKI67", "PTPRC", "COL1A1", "KRT5", "NKX2-1"]


def x_of(counts):
    return E.log1p_cp10k(np.asarray(counts, float))[0]


# --- the grammar ---------------------------------------------------------------------------------


def test_gene_terms_act_in_their_units_and_leave_other_genes_bit_identical():
    counts = np.array([[10.0, 3.0, 7.0, 0.0, 80.0, 5.0], [0.0, 1.0, 2.0, 4.0, 3.0, 0.0]])
    edit = E.parse_edit("CD8A*4, MKI67+2, PTPRC=0, NKX2-1-0.5", GENES)
    out = E.apply_edit(edit, counts, GENES)
    x, x_out = x_of(counts), E.log1p_cp10k(out)[0]
    totals = counts.sum(axis=1)
    # *4 scales the count (a zero stays zero); +2 in log1p CP10k of the unedited total; =0 silences
    np.testing.assert_allclose(out[:, 0], counts[:, 0] * 4)
    np.testing.assert_allclose(np.log1p(out[:, 1] * 1e4 / totals), x[:, 1] + 2)
    assert (out[:, 2] == 0).all()
    np.testing.assert_allclose(np.log1p(out[:, 5] * 1e4 / totals), np.maximum(x[:, 5] - 0.5, 0))
    np.testing.assert_array_equal(out[:, 3:5], counts[:, 3:5])  # untouched genes: raw counts as they were
    assert x_out.shape == x.shape


def test_gene_sets_toward_and_doses():
    counts = np.array([[10.0, 3.0, 7.0, 1.0, 8.0, 5.0]])
    sets = {"immune": ["CD8A", "PTPRC"]}
    out = E.apply_edit(E.parse_edit("immune*3", GENES, sets), counts, GENES)
    np.testing.assert_allclose(out[0, [0, 2]], counts[0, [0, 2]] * 3)
    centroid = np.linspace(0, 5, len(GENES))
    edit = E.parse_edit("toward:Stroma@0.5", GENES, labels=["Stroma", "Tumor"])
    moved = E.apply_edit(edit, counts, GENES, {"Stroma": centroid})
    # the profile moves half way in log1p CP10k; counts come back at the spot's unedited total
    halfway = (x_of(counts) + centroid) / 2
    np.testing.assert_allclose(moved, np.expm1(halfway) * counts.sum() / 1e4)
    assert E.parse_edit(E.format_dose("CD8A*{dose}", 8), GENES).terms[0].amount == 8
    spec = ExperimentSpec(name="x", edit="CD8A*{dose}", doses=[4, 1, 2])
    assert [a for a, _, _ in spec.dose_arms] == ["dose=1", "dose=2", "dose=4"]


@pytest.mark.parametrize("text, expected", [
    ("CD8*4", "unknown gene 'CD8'; did you mean CD8A"),
    ("cd8a*4", "did you mean CD8A"),
    ("CD8A^4", "malformed edit term 'CD8A^4'"),
    ("CD8A*", "malformed edit term"),
    ("toward:Strom@0.5", "no class 'Strom'; did you mean Stroma"),
    ("toward:Stroma@1.5", "alpha must lie in [0, 1]"),
    ("", "the edit is empty"),
    ("CD8A*{dose}", "give the doses"),
])
def test_malformed_or_unknown_edits_are_one_clear_line(text, expected):
    with pytest.raises(InputError) as err:
        E.parse_edit(text, GENES, {}, ["Stroma", "Tumor"], source="virtual experiment x")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_an_edit_of_genes_the_encoder_does_not_read_is_refused_and_is_the_absent_control():
    edit = E.parse_edit("KRT5*4", GENES)
    with pytest.raises(InputError, match="cannot reach the model"):
        E.check_reaches_encoder(edit, ["CD8A", "MKI67"])
    control, _ = E.control_edit(E.parse_edit("CD8A*4", GENES), ["CD8A", "MKI67"], GENES, "absent", seed=0)
    assert set(control.genes) <= set(GENES) - {"CD8A", "MKI67"}
    shuffled, _ = E.control_edit(E.parse_edit("CD8A*4,MKI67+1", GENES), GENES[:4], GENES, "shuffled", seed=0)
    assert [t.op for t in shuffled.terms] == ["*", "+"] and set(shuffled.genes) <= {"PTPRC", "COL1A1"}


def test_spot_selection_and_its_errors():
    spots = pd.DataFrame({"key": [f"s:{i}" for i in range(6)], "sample": ["s"] * 6,
                          "label": ["Tumor", "Tumor", "Stroma", "Stroma", "Immune", "Immune"],
                          "array_row": [0, 0, 1, 1, 2, 2], "array_col": [0, 2, 1, 3, 0, 2],
                          "pxl_row": np.arange(6.0), "pxl_col": np.arange(6.0)}).set_index("key", drop=False)
    split = pd.DataFrame({"key": spots["key"], "split": ["test"] * 6})
    pick = lambda sel, **kw: select_spots(spots, split, ExperimentSpec(name="x", edit="A*1", spots=sel, **kw))["key"].tolist()
    assert pick({"label": "Stroma"}) == ["s:2", "s:3"]
    assert pick({"keys": ["s:5", "s:0"]}) == ["s:0", "s:5"]
    assert pick({"region": {"rows": [1, 2], "cols": [2, 3]}}) == ["s:3", "s:5"]
    assert len(pick("all", max_spots=3)) == 3
    for selector, message in [({"region": {"rows": [5, 6], "cols": [0, 9]}}, "the spot selection is empty"),
                              ({"label": "Necrosis"}, "no spot is labelled 'Necrosis'"),
                              ({"keys": ["s:9"]}, "is not a kept spot"), ("some", "spots must be all")]:
        with pytest.raises(InputError, match=message):
            pick(selector)
    with pytest.raises(InputError, match="does not use GE"):
        ExperimentSpec(name="x", edit="A*1", regime="uni").check()


# --- effect against control: a case with a known answer -----------------------------------------


def test_paired_bootstrap_finds_a_real_effect_and_not_a_null_one():
    rng = np.random.default_rng(0)
    control = rng.gamma(2.0, 0.05, size=40)
    real = paired_bootstrap(control + 0.05 + rng.normal(0, 0.01, 40), control, 500, seed=0)
    assert real["effect"] and real["difference_ci"][0] > 0 and real["edit_mean"] > real["control_mean"]
    same = paired_bootstrap(rng.permutation(control), control, 500, seed=0)
    assert not same["effect"] and same["difference_ci"][0] < 0 < same["difference_ci"][1]
    assert paired_bootstrap(control[:1], control[:1], 100, 0)["effect"] is None


# --- one experiment end to end on a tiny random model --------------------------------------------


def run_cli(*argv) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stmdit", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=root)


def direct(module, *argv):
    parser = argparse.ArgumentParser()
    module.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A 24-spot cohort (2 slides, 3 labels, 40 genes; the encoder reads 30) with real smoke GE
    features, smoke UNI, patches, and a tiny random AdaLN flow model on them."""
    from stmdit import features
    from stmdit.encoders.smoke import SmokeCancerFoundation
    from stmdit.features import write_feature_store
    from test_tiles import TINY, save_model

    root = tmp_path_factory.mktemp("virtual")
    rng = np.random.default_rng(1)
    n, n_genes = 24, 40
    genes = [f"G{i}" for i in range(n_genes - 2)] + ["CD8A", "PTPRC"]
    keys = [f"s{i % 2}:bc{i:03d}" for i in range(n)]
    labels = np.array(["Tumor", "Stroma", "Immune"])[np.arange(n) % 3]
    counts = rng.poisson(rng.gamma(1.0, 3.0, size=(n, n_genes))).astype(np.float32)
    adata = ad.AnnData(X=np.log1p(counts), obs=pd.DataFrame({"label": labels, "sample": [k[:2] for k in keys]},
                                                            index=keys), var=pd.DataFrame(index=genes))
    adata.layers["counts"] = counts
    rank = np.arange(n_genes, dtype=float)
    rank[[-1]] = 0.5  # PTPRC is an HVG, CD8A (rank 38) falls outside the 30 the encoder reads
    adata.var["highly_variable_rank"] = rank
    adata.var["highly_variable"] = True
    adata.write_h5ad(root / "expr.h5ad")
    direct(features, "features", "--encoder", "cancerfoundation", "--impl", "smoke", "--expression", root / "expr.h5ad",
           "--out", root / "cf.zarr", "--max-genes", 30, "--device", "cpu")
    write_feature_store(root / "uni2h.zarr", keys, [{"embedding": rng.standard_normal((n, 16)).astype(np.float32)}],
                        {"embedding": (16,)}, {})
    split = pd.DataFrame({"key": keys, "split": np.where(np.arange(n) < 12, "train", "test")})
    split.to_parquet(root / "split.parquet")
    spot_files, patch_files = [], []
    for s in ("s0", "s1"):
        mine = [i for i, k in enumerate(keys) if k.startswith(s)]
        table = pd.DataFrame({"key": [keys[i] for i in mine], "sample": s, "label": labels[mine], "keep": True,
                              "array_row": np.arange(len(mine)) // 4, "array_col": (np.arange(len(mine)) % 4) * 2,
                              "pxl_row": (np.arange(len(mine)) // 4) * 87.0,
                              "pxl_col": (np.arange(len(mine)) % 4) * 100.0})
        table.to_parquet(root / f"{s}.parquet")
        group = zarr.open_group(str(root / f"{s}.zarr"), mode="w", zarr_format=3)
        group.create_array("images", data=rng.integers(0, 255, (len(mine), 64, 64, 3), dtype=np.uint8))
        group.create_array("spot_key", shape=(len(mine),), dtype=str)[:] = np.array(table["key"], dtype=object)
        spot_files.append(root / f"{s}.parquet")
        patch_files.append(root / f"{s}.zarr")
    arch = {**TINY, "ge_dim": 256, "ge_fusion": "adaln"}
    model = save_model(root / "adaln", arch, objective="flow")
    uni_only = save_model(root / "uni_only", {**TINY, "ge_fusion": "none"}, objective="flow")
    return {"root": root, "model": model, "uni_only": uni_only, "spots": spot_files, "patches": patch_files,
            "keys": keys}


def tiles_argv(ex, out, spec: dict, model=None) -> list:
    root = ex["root"]
    return ["virtual-tiles", "--name", "t", "--experiment-json", json.dumps(spec), "--model-dir",
            model or ex["model"], "--split", root / "split.parquet", "--expression", root / "expr.h5ad",
            "--uni", root / "uni2h.zarr", "--ge", root / "cf.zarr", "--spots", *ex["spots"], "--vae-impl", "smoke",
            "--steps", 3, "--seed", 42, "--batch-size", 5, "--device", "cpu", "--out", out]


def test_experiment_end_to_end(experiment, tmp_path):
    from stmdit.zarr_rows import string_values
    from stmdit.virtual import experiment as vexp
    from stmdit.virtual import report as vrep

    tiles = tmp_path / "tiles.zarr"
    spec = {"edit": "PTPRC*{dose}", "doses": [1, 20], "spots": "all", "split": "test", "control": "absent"}
    direct(vexp, *tiles_argv(experiment, tiles, spec))
    group = zarr.open_group(str(tiles), mode="r")
    arms = string_values(group["arm"][:])
    assert list(dict.fromkeys(arms)) == ["unedited", "dose=1", "dose=20", "control"]
    latents = np.asarray(group["latent"][:])
    assert "images" not in group  # kept as latents: the report decodes them
    unedited = arms == "unedited"
    # *1 and the absent-gene control leave the GE input unchanged: bit-identical tiles (same noise)
    np.testing.assert_array_equal(latents[arms == "dose=1"], latents[unedited])
    np.testing.assert_array_equal(latents[arms == "control"], latents[unedited])
    assert np.abs(latents[arms == "dose=20"] - latents[unedited]).max() > 1e-4
    assert group.attrs["virtual"]["encoder"]["reencode_deviation"] < 1e-6

    out = tmp_path / "report"
    direct(vrep, "virtual-report", "--tiles", tiles, "--spots", *experiment["spots"], "--patches", *experiment["patches"],
           "--h0mini-impl", "smoke", "--device", "cpu", "--n-boot", 100, "--summary", out / "summary.json",
           "--mosaics", out / "mosaics", "--mosaics-zarr", out / "mosaics.zarr", "--zarr-tile-px", 128, "--montage", out / "montage.png", "--tile-px", 16, "--montage-tile-px", 32)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edited_arm"] == "dose=20" and summary["n_spots"] == 12
    assert summary["all_spots"]["control_mean"] == 0.0 and summary["all_spots"]["edit_mean"] > 0
    assert summary["all_spots"]["effect"] is True
    assert set(summary["per_label"]) == {"Tumor", "Stroma", "Immune"}
    assert [d["dose"] for d in summary["dose_response"]] == [1.0, 20.0]
    assert summary["dose_response"][0]["mean_change"] == 0.0
    assert sorted(p.name for p in (out / "mosaics").iterdir()) == ["s0.png", "s1.png"]
    assert (out / "montage.png").stat().st_size > 0
    viewer = zarr.open_group(str(out / "mosaics.zarr"), mode="r")
    ome = viewer["s0"].attrs["ome"]
    levels = [viewer["s0"][d["path"]] for d in ome["multiscales"][0]["datasets"]]
    assert ome["version"] == "0.5" and len(levels) >= 2 and levels[0].shape[0] == 3
    assert levels[1].shape[1] == levels[0].shape[1] // 2 and levels[0].dtype == np.uint8


def test_toward_a_class_at_alpha_zero_is_the_unedited_tile(experiment, tmp_path):
    from stmdit.zarr_rows import string_values
    from stmdit.virtual import experiment as vexp

    tiles = tmp_path / "tiles.zarr"
    spec = {"edit": "toward:Stroma@{dose}", "doses": [0, 1], "spots": {"label": "Tumor"}, "max_spots": 3}
    direct(vexp, *tiles_argv(experiment, tiles, spec))
    group = zarr.open_group(str(tiles), mode="r")
    arms, latents = string_values(group["arm"][:]), np.asarray(group["latent"][:])
    assert list(dict.fromkeys(arms)) == ["unedited", "dose=0", "dose=1", "control"]
    assert set(string_values(group["label"][:])) == {"Tumor"}
    np.testing.assert_array_equal(latents[arms == "dose=0"], latents[arms == "unedited"])
    assert np.abs(latents[arms == "dose=1"] - latents[arms == "unedited"]).max() > 1e-4
    assert group.attrs["virtual"]["control"]["edit"] == "toward:Stroma~shuffled@1"


def test_bad_experiments_stop_with_one_line_and_no_output(experiment, tmp_path):
    out = tmp_path / "tiles.zarr"
    cases = [
        ({"edit": "PTPRX*4"}, None, "unknown gene 'PTPRX'; did you mean PTPRC"),
        ({"edit": "CD8A*4"}, None, "cannot reach the model"),
        ({"edit": "PTPRC*4"}, experiment["uni_only"], "UNI-only"),
        ({"edit": "PTPRC*4", "spots": {"region": {"rows": [50, 60], "cols": [0, 1]}}}, None, "selection is empty"),
        ({"edit": "PTPRC**4"}, None, "malformed edit term"),
    ]
    from stmdit.virtual import experiment as vexp

    for i, (spec, model, message) in enumerate(cases):
        if i == 0:  # through the CLI once: exit code 2 and one line on stderr
            done = run_cli(*tiles_argv(experiment, out, spec, model))
            assert done.returncode == 2, done.stderr
            error_lines = [line for line in done.stderr.splitlines() if "error:" in line]
            assert len(error_lines) == 1 and message in error_lines[0], done.stderr
        else:
            with pytest.raises(InputError) as err:
                direct(vexp, *tiles_argv(experiment, out, spec, model))
            assert message in str(err.value) and "\n" not in str(err.value)
        assert not out.exists() and not list(tmp_path.iterdir())


def test_generate_from_keys_equals_generate_from_the_same_expression_vector(experiment, tmp_path):
    from stmdit.virtual import generate as vgen

    root, key = experiment["root"], experiment["keys"][3]
    adata = ad.read_h5ad(root / "expr.h5ad")
    pd.DataFrame({"gene": adata.var_names, "count": np.asarray(adata[key].layers["counts"]).ravel()}).to_csv(
        root / "vector.tsv", sep="\t", index=False)
    common = ["generate", "--model-dir", experiment["model"], "--ge", root / "cf.zarr", "--vae-impl", "smoke",
              "--steps", 3, "--device", "cpu", "--regime", "ge", "--edit", "PTPRC+3"]
    direct(vgen, *common, "--expression", root / "expr.h5ad", "--keys", key, "--out-dir", tmp_path / "keys")
    direct(vgen, *common, "--vector", root / "vector.tsv", "--noise-key", key, "--out-dir", tmp_path / "vector")
    by_keys = zarr.open_group(str(tmp_path / "keys" / "tiles.zarr"), mode="r")
    by_vector = zarr.open_group(str(tmp_path / "vector" / "tiles.zarr"), mode="r")
    np.testing.assert_array_equal(by_keys["latent"][:], by_vector["latent"][:])
    assert np.abs(by_keys["latent"][0] - by_keys["latent"][1]).max() > 1e-4  # the edit changed the tile
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["edited", "tiles.zarr", "unedited"]
    assert (tmp_path / "vector" / "edited" / f"{key.replace(':', '_')}.png").is_file()
