"""The workflow itself: lint, planning, parse-time validation, and the demo end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import zarr

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def snakemake(*args, cwd=REPO, timeout=1800):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([str(SNAKEMAKE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_lint_reports_nothing():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations" in result.stdout + result.stderr


def test_dry_run_plans_every_stage():
    result = snakemake("-n", "all", "--forceall")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for rule in ("demo_data", "spots", "expression", "features_image", "features_cancerfoundation", "split",
                 "deepspot_train", "deepspot_predict", "features_cancerfoundation_ptpl", "train", "tiles",
                 "perturbed_tiles", "tile_grid", "eval_features", "eval_regressor", "fid", "ood_fid", "swap_fid", "auc",
                 "perturbation", "models_json", "figure_matched_spots", "fetch_demo_image", "figure_loss_curve", "palette", "layout",
                 "virtual_tiles", "virtual_report",
                 *(f"table{n}" for n in range(1, 7))):
        assert f"\n{rule} " in out, f"{rule} not planned"


def test_config_booleans_reach_commands_either_way(tmp_path):
    """bf16 true in the config gives --bf16, false --no-bf16 (the commands default to on): a false
    value is passed, not left to the command's default."""
    override = tmp_path / "no_bf16.yaml"
    override.write_text("sampler:\n  bf16: false\nfeatures:\n  bf16: false\n")
    for configs, flag in [(["config.yaml"], "--bf16"), (["config.yaml", str(override)], "--no-bf16")]:
        result = snakemake("-n", "-p", "--forceall", "results/tiles/PixCell-Flow-B/demo/uni.zarr",
                           "--configfile", *configs)
        assert result.returncode == 0, result.stderr[-3000:]
        commands = [line for line in result.stdout.splitlines() if "python -m stmdit" in line]
        for command in ("stmdit tiles ", "stmdit features "):
            planned = [c for c in commands if command in c]
            assert planned and all(f" {flag}" in c and f" {'--no-bf16' if flag == '--bf16' else '--bf16'} " not in c
                                   for c in planned), (command, planned[:1])


def test_one_table_plans_only_its_own_chain():
    result = snakemake("-n", "--forceall", "results/tables/table2.md")
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for rule in ("auc", "eval_regressor", "train", "tiles", "eval_features", "noise_features", "table2"):
        assert f"\n{rule} " in out, f"{rule} not planned"
    for rule in ("fid", "ood_fid", "swap_fid", "perturbed_tiles", "perturbation", "deepspot_train", "table1"):
        assert f"\n{rule} " not in out, f"{rule} planned for table 2"


def test_bad_config_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("samples: workflow/demo/samples.tsv\nspots:\n  min_foreground: lots\n")
    result = snakemake("-n", "--configfile", str(bad))
    assert result.returncode != 0
    assert "spots.min_foreground = 'lots'" in result.stderr


def test_a_renamed_results_path_stops_naming_its_new_name():
    result = snakemake("-n", "results/samples/PixCell-Flow-B/demo/uni.zarr")
    assert result.returncode != 0
    assert ("stmdit: error: results/samples/ was renamed to results/tiles/: "
            "ask for results/tiles/PixCell-Flow-B/demo/uni.zarr") in result.stderr


def test_bottlenecked_size_stops_before_any_job(tmp_path):
    bad = tmp_path / "bottleneck.yaml"
    bad.write_text("train:\n  size: tiny\n  sizes:\n    tiny: {allow_bottleneck: false}\n")
    result = snakemake("-n", "--configfile", "config.yaml", str(bad))
    assert result.returncode != 0
    assert "config key train.sizes.tiny" in result.stderr and "bottlenecked denoiser" in result.stderr


def test_bad_sample_sheet_stops_before_any_job(tmp_path):
    sheet = tmp_path / "samples.tsv"
    sheet.write_text("sample\tdonor\tcohort\tkind\tpath\nA\td\tc\tvisium\tx\nA\td\tc\tvisium\ty\n")
    result = snakemake("-n", "--config", f"samples={sheet}")
    assert result.returncode != 0
    assert f"{sheet}: duplicate sample name(s) ['A']" in result.stderr


def test_a_gene_set_without_its_list_stops_before_any_job():
    result = snakemake("-n", "--config", "gene_sets={protein_coding: none, deepspot: hvg}")
    assert result.returncode != 0
    assert "gene_sets.protein_coding = 'none', but gene_sets.midnight_mlp = 'protein_coding' needs a list" in result.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, demo_image):
    """The demo's stages and models at plumbing size (tests/e2e/config.yaml over config.yaml), in a
    scratch checkout, run every planned job."""
    work = tmp_path / "repo"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".venv", "results", ".snakemake", ".git", "*.svs"))
    (work / "resources").mkdir(exist_ok=True)
    shutil.copy(demo_image, work / "resources" / "cmu_small_region.svs")
    layered = ("--configfile", "config.yaml", "tests/e2e/config.yaml")
    result = snakemake("--cores", "2", "all", *layered, cwd=work)
    assert result.returncode == 0, result.stderr[-5000:]
    results = work / "results"

    spots = pd.read_parquet(results / "spots" / "demo_A1.parquet")
    assert spots["keep"].any() and {"key", "reason", "foreground", "laplacian_var"} <= set(spots.columns)
    splits = pd.read_parquet(results / "splits" / "demo.parquet")
    assert set(splits["split"]) == {"train", "val", "test"}
    assert set(splits.loc[splits["split"] == "test", "donor"]) == {"donor_C"}
    uni = zarr.open_group(str(results / "features" / "demo" / "uni2h.zarr"), mode="r")
    assert list(uni["spot_key"][:]) == list(splits["key"])
    assert uni.attrs["encoder"]["impl"] == "smoke"
    for n in range(1, 7):
        table = (results / "tables" / f"table{n}.md").read_text()
        assert "made with smoke (weight-free) encoders" in table, n
        assert (results / "tables" / f"table{n}.tsv").exists()
    # PTPL: the test donor trains no DeepSpot model; the demo's genes are HGNC symbols, 594 of 600 protein-coding
    plan = json.loads((results / "ptpl" / "demo_lodo.json").read_text())["fold_plan"]
    assert plan["test_donors"] == ["donor_C"] and [f["held_out_donor"] for f in plan["folds"]] == ["donor_A", "donor_B"]
    assert all("donor_C" not in f["train_donors"] for f in [*plan["folds"], plan["all_training_donors"]])
    gene_sets = json.loads((results / "expression" / "demo_gene_sets.json").read_text())["gene_sets"]
    assert gene_sets["protein_coding"]["protein_coding"] == 594 and gene_sets["protein_coding"]["list_genes"] == 19281
    model = results / "models" / "XAttn-PMA-Flow-p03"
    assert (model / "ema.safetensors").exists() and (model / "train_log.csv").exists()
    training = json.loads((model / "training.json").read_text())
    assert "stalled" in training["loss_check"]
    # GE tokens were encoded from the store's bins in training and sampling (the store keeps no tokens)
    ge_store = zarr.open_group(str(results / "features" / "demo" / "cancerfoundation.zarr"), mode="r")
    assert "bins" in ge_store and "tokens" not in ge_store
    assert training["ge_encoder"]["impl"] == "smoke" and training["ge_encoder"]["name"] == "cancerfoundation"
    assert (results / "figures" / "loss_curves" / "XAttn-PMA-Flow-p03.png").stat().st_size > 0
    assert (results / "figures" / "per_tissue_fid.png").exists()
    assert (results / "figures" / "matched_spots.png").exists()
    # a second run has nothing to do
    again = snakemake("--cores", "2", "all", "-n", *layered, cwd=work)
    assert "Nothing to be done" in again.stdout + again.stderr
