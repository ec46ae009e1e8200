"""`stmdit demo-checks`: the learning checks `make demo` prints, on hand-made evaluation JSONs."""

from __future__ import annotations

import argparse
import json

import pytest

from stmdit.demo_checks import learning_checks, run, stage_times


def interval(mean: float, half: float = 10.0) -> dict:
    return {"point": mean - 1, "mean": mean, "lo": mean - half, "hi": mean + half}


def write_eval(results, model: str, fid: dict, oracle_uni_ge: dict | None = None, null: dict | None = None):
    folder = results / "eval" / model / "demo"
    folder.mkdir(parents=True)
    (folder / "fid.json").write_text(json.dumps({"regimes": fid}))
    generated = {"uni_ge": {"auc": oracle_uni_ge["mean"], **oracle_uni_ge}} if oracle_uni_ge else {}
    null = null or {"auc": 0.0, "lo": -0.02, "hi": 0.02}
    (folder / "auc.json").write_text(json.dumps({"regressors": {
        "oracle": {"generated": generated, "null": {"empirical": null, "noise_tiles": null}}}}))


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
    for path, seconds in (("sample/M/demo/uni.tsv", 10.0), ("sample/M/demo/uncond.tsv", 5.0),
                          ("eval/M/demo/fid.tsv", 2.0), ("demo_data.tsv", 7.5)):
        (bench / path).parent.mkdir(parents=True, exist_ok=True)
        (bench / path).write_text(f"s\th:m:s\n{seconds}\t0:00:00\n")
    table = stage_times(bench).set_index("stage")
    assert table.loc["sample", "jobs"] == 2 and table.loc["sample", "seconds"] == pytest.approx(15.0)
    assert table.loc["fid", "seconds"] == pytest.approx(2.0) and table.loc["demo_data", "jobs"] == 1


def test_layout_check_passes_only_above_the_other_spot_null(tmp_path):
    write_eval(tmp_path, "Base", {"uni": interval(150), "uncond": interval(280)})
    folder = tmp_path / "eval" / "Base" / "demo"
    def layout(mean, follows):
        return {"regimes": {"uni": {"mean": mean, "lo": mean - 0.02, "hi": mean + 0.02, "follows_layout": follows,
                                    "null": {"mean": 0.0, "lo": -0.02, "hi": 0.02}}}}
    (folder / "layout.json").write_text(json.dumps(layout(0.003, False)))
    assert by_name(learning_checks(tmp_path, "demo"))["Base: uni tiles follow their spot's layout"] is False
    (folder / "layout.json").write_text(json.dumps(layout(0.3, True)))
    assert by_name(learning_checks(tmp_path, "demo"))["Base: uni tiles follow their spot's layout"] is True
