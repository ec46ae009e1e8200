"""Benchmarks run and report their measurements (never asserted as timings)."""

from __future__ import annotations

import argparse

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


def test_loader_benchmark_reports_a_ratio():
    result = bench_loader(argparse.Namespace(spots=64, tokens=8, micro_batch=8, batches=6, workers=2, prefetch=2))
    assert result["loader_samples_per_s"] > 0 and result["memory_samples_per_s"] > 0
    assert result["loader_over_memory"] == round(result["loader_samples_per_s"] / result["memory_samples_per_s"], 3) or \
        abs(result["loader_over_memory"] - result["loader_samples_per_s"] / result["memory_samples_per_s"]) < 0.01
