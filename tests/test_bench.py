"""Benchmarks run and report their measurements (never asserted as timings)."""

from __future__ import annotations

import argparse

import pytest
import yaml

from stmdit.bench import REPO, bench_dag, bench_loader


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


def test_loader_benchmark_reports_a_ratio():
    result = bench_loader(argparse.Namespace(spots=64, tokens=8, micro_batch=8, batches=6, workers=2, prefetch=2))
    assert result["loader_samples_per_s"] > 0 and result["memory_samples_per_s"] > 0
    assert result["loader_over_memory"] == round(result["loader_samples_per_s"] / result["memory_samples_per_s"], 3) or \
        abs(result["loader_over_memory"] - result["loader_samples_per_s"] / result["memory_samples_per_s"]) < 0.01


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
    assert set(rows) == {(n, s) for n in ("ddim", "dpmpp_2m", "euler", "heun") for s in (10, 20)}
    assert [rows["heun", s]["predictor_calls_per_tile"] for s in (10, 20)] == [19, 39]
    assert all(r["forward_rows_per_tile"] == 3 * r["predictor_calls_per_tile"] for r in rows.values())
    assert all("tiles_per_s" not in r and "fid" not in r for r in rows.values())
    for second, first in (("heun", "euler"), ("dpmpp_2m", "ddim")):
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
