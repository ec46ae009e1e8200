"""Benchmarks run and report their measurements (never asserted as timings)."""

from __future__ import annotations

import argparse

import pytest
import yaml

from stmdit.bench import REPO, bench_dag
from stmdit.bench_loader import bench_loader, encoder_flop_per_spot


def test_paper_configuration_plans_every_model_on_18_slides():
    paper = REPO / "workflow" / "paper" / "config.yaml"
    result = bench_dag(argparse.Namespace(configfile=paper, slides=18, donors=7, he_slides=4))
    models = yaml.safe_load(paper.read_text())["models"]
    trained = [m for m, entry in models.items() if not entry.get("pretrained")]
    assert "PixCell-Pretrained-XL" in models and "PixCell-Pretrained-XL" not in trained  # loaded, never trained
    assert result["jobs_per_rule"]["train"] == len(trained) == 28
    assert result["jobs_per_rule"]["spots"] == 22 and result["jobs_per_rule"]["table6"] == 1
    assert all(result["jobs_per_rule"][f"table{n}"] == 1 for n in range(1, 7))


def test_no_job_command_grows_with_the_slides():
    """Cohort rules read their slide lists from files: at 300 slides (about 29 KB of paths in the
    expression command before) the longest job command stays a few KB."""
    paper = REPO / "workflow" / "paper" / "config.yaml"
    result = bench_dag(argparse.Namespace(configfile=paper, slides=300, donors=30, he_slides=4))
    assert result["jobs_per_rule"]["spots"] == 304 and result["jobs_per_rule"]["cohort_list"] >= 3
    assert 0 < result["longest_command_bytes"] < 10 * 1024, result["longest_command_rule"]


def test_loader_benchmark_reads_each_fusions_data_and_reports_ratios():
    result = bench_loader(argparse.Namespace(spots=96, genes=40, micro_batch=8, batches=6, workers=2, prefetch=2,
                                             fusions="none,adaln,xattn-pma", encoder_spots=1))
    assert set(result["fusions"]) == {"none", "adaln", "xattn-pma"}
    for case in result["fusions"].values():
        assert case["loader_samples_per_s"] > 0 and case["memory_samples_per_s"] > 0
        assert 0 < case["loader_over_memory"] < 100
    # the published encoder's FLOP: 6 layers of 2L(4d^2 + 2 d d_hid) + 4 L^2 d; at the paper's 1,200 tokens ~16 GFLOP
    assert abs(encoder_flop_per_spot(1200) - 16.4e9) < 0.1e9
    encoder = result["ge_encoder"]
    assert encoder["tokens"] == 41 and encoder["cpu_ms_per_spot"] > 0 and 0 < encoder["measured_share_of_train_step"] < 1
    ram = result["training_ram_gb_at_paper_scale"]
    assert ram["ge_bins"] == round(114_688 * 40 / 1e9, 2) and ram["latents"] == round(114_688 * 32768 / 1e9, 2)


def sample_bench_args(**overrides) -> argparse.Namespace:
    from stmdit.bench import _sample_arguments

    parser = argparse.ArgumentParser()
    _sample_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_sample_benchmark_counts_evaluations_and_measures_the_analytic_error(capsys):
    """Without a model: the analytic rows of every solver; Heun costs 2 N - 1 calls, each a forward
    over the 3 conditionings of dual guidance, and is closer to the exact distribution than Euler."""
    from stmdit.bench import bench_sample

    result = bench_sample(sample_bench_args(steps="10,20"))
    rows = {(r["name"], r["steps"]): r for r in result["rows"]}
    assert set(rows) == {(n, s) for n in ("ddim", "dpmpp_2m", "euler", "heun", "unipc") for s in (10, 20)}
    assert [rows["heun", s]["predictor_calls_per_tile"] for s in (10, 20)] == [19, 39]
    assert all(r["forward_rows_per_tile"] == 3 * r["predictor_calls_per_tile"] for r in rows.values())
    assert all("tiles_per_s" not in r and "fid" not in r for r in rows.values())
    for second, first in (("heun", "euler"), ("dpmpp_2m", "ddim"), ("unipc", "euler")):
        assert all(rows[second, s]["std_error"] < rows[first, s]["std_error"] for s in (10, 20))
    assert "heun" in capsys.readouterr().out


def test_fused_guidance_timing_reports_both_passes():
    import torch

    from stmdit.bench import time_fused_guidance
    from stmdit.loader import GeBatch
    from stmdit.model import guidance
    from stmdit.model.analytic import GaussianConfig, GaussianDenoiser

    model = GaussianDenoiser(GaussianConfig(objective="flow"))
    x = torch.randn(8, *model.config.latent_shape)
    uni, ge = torch.randn(8, model.config.uni_dim), GeBatch(torch.randn(8, model.config.ge_dim))
    timing = time_fused_guidance(model, x, torch.tensor(500.0), uni, ge, guidance.REGIME_SPECS["uni_ge"].conditions, 2)
    assert timing["fused_s"] > 0 and timing["separate_s"] > 0
    assert timing["separate_over_fused"] == timing["separate_s"] / timing["fused_s"]


def test_condition_cache_timing_reports_both_steps():
    import torch

    from stmdit.bench import time_condition_cache
    from stmdit.loader import GeBatch
    from stmdit.model.analytic import GaussianConfig, GaussianDenoiser

    model = GaussianDenoiser(GaussianConfig(objective="flow"))
    x = torch.randn(8, *model.config.latent_shape)
    uni, ge = torch.randn(8, model.config.uni_dim), GeBatch(torch.randn(8, model.config.ge_dim))
    timing = time_condition_cache(model, x, torch.tensor(500.0), uni, ge, "uni_ge", 2.5, 2.5, 2)
    assert timing["cached_s"] > 0 and timing["uncached_s"] > 0
    assert timing["uncached_over_cached"] == timing["uncached_s"] / timing["cached_s"]


def test_fid_benchmark_times_the_bootstrap_against_its_gram_floor(capsys):
    from stmdit.bench import bench_fid

    result = bench_fid(argparse.Namespace(n_spots=120, dim=16, n_boot=4, threads=1, seed=0))
    assert result["floor_s"] > 0 and result["bootstrap_s"] > 0
    assert abs(result["ratio"] - result["bootstrap_s"] / result["floor_s"]) < 0.01
    assert result["lo"] <= result["fid_mean"] <= result["hi"]
    assert "8 Gram products of 120 x 16" in capsys.readouterr().out


def test_midnight_mlp_benchmark_scales_each_impl_to_the_paper_size(capsys):
    from stmdit.bench import bench_midnight_mlp

    result = bench_midnight_mlp(argparse.Namespace(rows=40, features=8, genes=30, hidden="8", epochs=1,
                                                   impls="sklearn,torch", device="cpu", density=0.3,
                                                   paper_rows=400, paper_epochs=10, threads=1, seed=0))
    for impl in ("sklearn", "torch"):
        assert result[impl]["fit_s"] > 0
        assert result[impl]["paper_estimate_h"] == pytest.approx(result[impl]["fit_s"] * 100 / 3600)
    assert "estimated" in capsys.readouterr().out


def test_deepspot_benchmark_reports_peak_rss_per_spot(tmp_path):
    from stmdit.bench import _deepspot_arguments, bench_deepspot

    parser = argparse.ArgumentParser()
    _deepspot_arguments(parser)
    args = parser.parse_args(["--spots", "60", "120", "--genes", "40", "--nonzeros", "8", "--dim", "4",
                              "--hidden-dim", "4", "--threads", "1", "--keep", str(tmp_path)])
    result = bench_deepspot(args)
    assert [row["spots"] for row in result["rows"]] == [60, 120]
    assert all(row["train_rss_gb"] > 0.05 and row["predict_rss_gb"] > 0.05 for row in result["rows"])
    assert {"train_bytes_per_spot", "predict_bytes_per_spot", "train_projected_gb_115k"} <= set(result)
    import anndata as ad

    assert ad.read_h5ad(tmp_path / "deepspot_120" / "ptpl.h5ad").shape == (120, 40)


# --------------------------------------------------------------------------------------------
# bench scale: the synthetic cohort's formats, the rusage hook, and the benchmark end to end


def test_scale_cohort_matrix_is_a_10x_file_the_expression_step_reads(tmp_path):
    """Real gene symbols, 3,000-5,000 detected genes per spot, integer counts >= 1, labels' programs."""
    import numpy as np
    import pandas as pd

    from stmdit.expression import read_slide_counts
    from stmdit.genesets import load_gene_list
    from stmdit.scale_cohort import gene_table, write_10x_h5_blocks

    genes = gene_table(20_000)
    assert len(genes) == 20_000 and genes["symbol"].is_unique and {"TP53", "EGFR", "CD8A"} <= set(genes["symbol"])
    barcodes = np.array([f"AAAC{i:06d}-1" for i in range(40)])
    labels = np.array(["Tumor", "Stroma", "Immune", "Tumor"] * 10, dtype=object)
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    nnz = write_10x_h5_blocks(path, barcodes, labels, genes, seed=3, block=7)  # blocks that do not divide 40
    spots = pd.DataFrame({"barcode": barcodes[::-1], "key": [f"s:{b}" for b in barcodes[::-1]], "pxl_col": 0.0,
                          "pxl_row": 0.0})
    counts = read_slide_counts(path, spots)
    assert counts.shape == (40, 20_000) and counts.X.nnz == nnz
    detected = np.diff(counts.X.tocsr().indptr)
    assert 3_000 <= detected.mean() <= 5_000 and detected.min() > 2_000
    assert counts.X.data.min() >= 1 and np.all(counts.X.data == np.round(counts.X.data))
    coding = load_gene_list("hgnc").symbols
    assert np.isin(counts.var_names, list(coding)).mean() > 0.95


def test_scale_cohort_tiff_is_tiled_pyramidal_jpeg_written_tile_by_tile(tmp_path, demo_image):
    """A 4096 x 4096 RGB level 0 is 50 MB; the writer never holds more than a few tiles of it."""
    import tracemalloc

    import tifffile

    from stmdit.bigslide import DOWNSAMPLES, MirroredTissue, read_source, write_pyramidal_tiff

    tissue = MirroredTissue(read_source(demo_image), 4096, 4096)
    whole_level0 = 4096 * 4096 * 3
    tracemalloc.start()
    try:
        write_pyramidal_tiff(tmp_path / "slide.tif", tissue, mpp=0.25, tile=128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < whole_level0 / 8, f"writer held {peak / 1e6:.1f} MB"
    with tifffile.TiffFile(tmp_path / "slide.tif") as tif:
        levels = tif.series[0].levels
        assert [level.shape[:2] for level in levels] == [(4096 // d, 4096 // d) for d in (1, *DOWNSAMPLES)]
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (128, 128)
        assert page.compression == tifffile.COMPRESSION.JPEG


def test_scale_cohort_sheet_has_donors_replicated_slides_and_a_large_he_slide(tmp_path, demo_image):
    import pandas as pd

    from stmdit.config import load_sample_sheet
    from stmdit.scale_cohort import write_scale_cohort

    cohort = write_scale_cohort(tmp_path, visium_spots=200, he_spots=150, source_image=demo_image, n_genes=500,
                                he_gigapixels=0.05, log=lambda message: None)
    sheet = load_sample_sheet(cohort.sheet)
    visium = sheet[sheet["kind"] == "visium"]
    assert visium["donor"].nunique() >= 3 and cohort.visium_spots >= 200
    for _, row in visium.iterrows():
        assert pd.read_csv(row["labels"])["label"].isin(["Tumor", "Stroma", "Immune"]).all()
    assert any((tmp_path / "slides" / s / "outs" / "filtered_feature_bc_matrix.h5").is_symlink() for s in visium.index)
    he = sheet[sheet["kind"] == "he"]
    assert len(he) >= 2 and cohort.files["he_40x.tif"]["gigapixels"] >= 0.05


def test_every_stmdit_process_writes_its_peak_rss_when_asked(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "STMDIT_RUSAGE_DIR": str(tmp_path / "rusage"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "models.json"
    subprocess.run([sys.executable, "-m", "stmdit", "models-json", "--rows", "[]", "--out", str(out)], env=env,
                   check=True, capture_output=True)
    records = [json.loads(p.read_text()) for p in (tmp_path / "rusage").glob("*.json")]
    assert len(records) == 1 and records[0]["command"] == "models-json" and records[0]["exit_code"] == 0
    assert records[0]["argv"][-1] == str(out)
    assert 5e6 < records[0]["vmhwm_bytes"] < 2e9 and records[0]["wall_s"] >= records[0]["command_s"] > 0


SCALE_RULES = {"spots", "expression", "split", "features[uni2h]", "features[deepspot_fm]", "features[h0mini]",
               "features[midnight]", "features[sd3_vae]", "features[cancerfoundation]",
               "features[cancerfoundation_ptpl]", "deepspot_train", "deepspot_predict", "eval_regressor[oracle]",
               "eval_regressor[midnight_mlp]", "noise_features[uni2h]", "noise_features[midnight]", "fid", "ood_fid",
               "auc", "perturbation", "tables"}


def test_scale_table_projects_test_set_rules_by_their_test_spots():
    """fid and auc read the test spots only: they are projected per test spot to the paper's 11,776;
    ood_fid's subsample, capped at sampler.ood_max_spots, is already paper size at the larger size."""
    from stmdit.bench_scale import PAPER_TEST_SPOTS, PAPER_VISIUM_SPOTS, scale_table

    def rules(peak_auc, peak_ood, peak_split):
        return {("auc", "V"): {"jobs": 1, "peak_rss": peak_auc, "wall_s": 10.0, "out_bytes": 100},
                ("ood_fid", "H"): {"jobs": 1, "peak_rss": peak_ood, "wall_s": 10.0, "out_bytes": 100},
                ("split", "V"): {"jobs": 1, "peak_rss": peak_split, "wall_s": 1.0, "out_bytes": 100}}

    small = {"spots": {"V": 3000, "H": 2000}, "test_spots": {"test": 1000, "ood": 2000},
             "rules": rules(1e9 + 1000 * 2e5, 5e8, 1e9)}
    large = {"spots": {"V": 30000, "H": 20000}, "test_spots": {"test": 10000, "ood": 10000},
             "rules": rules(1e9 + 10000 * 2e5, 9e8, 1e9 + 27000 * 1e3)}
    table = {r["rule"]: r for r in scale_table([small, large], "V")}
    assert table["auc"]["spots"] == [1000, 10000] and table["auc"]["paper_spots"] == PAPER_TEST_SPOTS
    assert table["auc"]["rss_bytes_per_spot"] == pytest.approx(2e5)
    assert table["auc"]["projected_peak_gb"] == pytest.approx((1e9 + PAPER_TEST_SPOTS * 2e5) / 1e9, abs=0.01)
    assert table["ood_fid"]["spots"] == [2000, 10000] and table["ood_fid"]["projected_peak_gb"] == pytest.approx(0.9)
    assert table["split"]["spots"] == [3000, 30000] and table["split"]["paper_spots"] == PAPER_VISIUM_SPOTS
    assert table["split"]["projected_peak_gb"] == pytest.approx((1e9 + PAPER_VISIUM_SPOTS * 1e3) / 1e9, abs=0.01)


def test_bench_scale_measures_every_rule_at_two_sizes(tmp_path):
    """`stmdit bench scale` end to end at small sizes (few genes, small H&E slides): one row per rule
    with a peak RSS at each size, finite slopes and a projection to the paper's counts."""
    import json
    import math
    import os
    import subprocess
    import sys

    # PATH without the venv: the bench must run the rules with its own interpreter
    env = {**os.environ, "PATH": os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                                 if p != os.path.dirname(sys.executable))}
    command = [sys.executable, "-m", "stmdit", "bench", "scale", "--sizes", "120,1200", "--out", str(tmp_path),
               "--genes", "1500", "--he-gigapixels", "0.06", "--tile", "256", "--n-boot", "4"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads((tmp_path / "scale.json").read_text())
    rows = doc["table"]
    assert {r["rule"] for r in rows} == SCALE_RULES
    for row in rows:
        assert all(rss > 0 for rss in row["peak_rss_gb"]) and all(t > 0 for t in row["wall_s"]), row
        assert row["spots"][1] > row["spots"][0] and math.isfinite(row["time_loglog_slope"]), row
        assert row["projected_out_gb"] >= 0
    cohort_rows = [r for r in rows if r["rule"] != "spots"]
    assert all(r["projected_peak_gb"] is not None and r["projected_peak_gb"] > 0 for r in cohort_rows)
    assert doc["projected_disk_gb_measured_rules"] > 0
    # what is not run (sampling, training) is projected from the paper configuration's plan
    not_run = doc["not_run_projected"]
    assert not_run["tile_stores"] > 100 and not_run["tile_rows"] > 1_000_000 and not_run["trained_models"] > 20
    assert 0 < not_run["tile_bytes_per_row"] <= 16 * 32 * 32 * 2 and not_run["checkpoints_kept_per_model"] == [1]
    assert doc["projected_disk_gb_without_checkpoints"] == pytest.approx(
        doc["projected_disk_gb_measured_rules"] + not_run["tile_stores_gb"], abs=0.11)
    markdown = (tmp_path / "scale.md").read_text()
    assert "| deepspot_train | scale |" in markdown and "Projected disk at the paper's counts" in markdown
    assert "copies of the real features of the test spots" in result.stdout
    # every job's peak fits in what its rule asked Snakemake for (job_resources' formulas on the real inputs)
    assert all(r["mem_of_request"] is not None and r["mem_of_request"] < 1 for r in rows), \
        [(r["rule"], r["mem_of_request"]) for r in rows if not r["mem_of_request"] or r["mem_of_request"] >= 1]
    # --tabulate rebuilds the same table from the run folders, running nothing
    again = subprocess.run([*command, "--tabulate"], env=env, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((tmp_path / "scale.json").read_text())["table"] == rows
