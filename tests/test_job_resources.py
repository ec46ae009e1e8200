"""Job resources from input sizes: the probes read real files' headers, the formulas grow with the
data and the attempt, and Snakemake evaluates them per job once the inputs exist."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from stmdit import job_resources as jr
from stmdit.demo import write_10x_h5
from stmdit.features import write_feature_store
from stmdit.provenance import write_parquet

SRC = Path(__file__).resolve().parents[1] / "src"
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def spots_table(path: Path, n: int) -> Path:
    write_parquet(pd.DataFrame({"key": [f"s:{i}" for i in range(n)], "keep": True}), path, {})
    return path


def test_probes_read_spots_counts_pixels_and_store_bytes_from_headers(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    counts = sp.random(37, 50, density=0.2, format="csr", random_state=0, dtype=np.float32)
    counts.data[:] = rng.integers(1, 9, counts.nnz)
    write_10x_h5(tmp_path / "m.h5", counts, [f"b{i}" for i in range(37)], [f"g{i}" for i in range(50)], "L")
    adata = ad.AnnData(X=sp.csr_matrix(counts.shape, dtype=np.float32), layers={"counts": counts})
    adata.write_h5ad(tmp_path / "cohort.h5ad")
    tifffile.imwrite(tmp_path / "slide.tif", np.zeros((300, 200, 3), np.uint8), tile=(64, 64))
    batches = [{"embedding": np.ones((10, 16), np.float32), "subtiles": np.ones((10, 9, 4), np.float32)}] * 3
    write_feature_store(tmp_path / "f.zarr", [f"k{i}" for i in range(30)], iter(batches),
                        {"embedding": (16,), "subtiles": (9, 4)}, {})
    spots_table(tmp_path / "a.parquet", 11), spots_table(tmp_path / "b.parquet", 13)

    assert jr.measure({"m": [tmp_path / "m.h5"]}) == jr.InputSizes(spots=37, nnz=counts.nnz)
    h5ad = jr.measure({"e": [tmp_path / "cohort.h5ad"]})
    assert (h5ad.spots, h5ad.nnz, h5ad.dense_mb) == (37, counts.nnz, 37 * 50 * 4 / 1e6)
    assert jr.measure({"s": [tmp_path / "slide.tif"]}).gigapixels == 300 * 200 / 1e9
    # slides of one input add up (a cohort); different inputs of the same spots do not
    assert jr.measure({"spots": [tmp_path / "a.parquet", tmp_path / "b.parquet"], "f": [tmp_path / "f.zarr"]}).spots == 30
    store = jr.measure({"f": [tmp_path / "f.zarr"]}, loads=("f",))
    # float32 embedding, float16 sub-tiles, 8-byte keys (as stored)
    assert store.spots == 30 and store.loaded_mb == pytest.approx(30 * (16 * 4 + 36 * 2 + 8) / 1e6)
    assert jr.measure({"f": [tmp_path / "f.zarr"]}).loaded_mb == 0  # not loaded whole by this rule
    # missing or unreadable inputs add nothing (the job itself reports them), planning never stops
    (tmp_path / "empty.h5").touch()
    assert jr.measure({"x": [tmp_path / "empty.h5", tmp_path / "missing.parquet"]}) == jr.InputSizes()


def test_requests_grow_with_the_data_and_the_attempt():
    small, large = jr.InputSizes(spots=10_000, nnz=40_000_000), jr.InputSizes(spots=1_000_000, nnz=4_000_000_000)
    for rule in ("expression", "features_image", "split"):
        assert jr.job_request(rule, large)["mem_mb"] > jr.job_request(rule, small)["mem_mb"]
        assert jr.job_request(rule, large)["runtime"] > jr.job_request(rule, small)["runtime"]
    first, second = jr.job_request("expression", large, 1), jr.job_request("expression", large, 2)
    assert second == {"mem_mb": 2 * first["mem_mb"], "runtime": 2 * first["runtime"]}
    # train's retries resume a run stopped at its wall clock: the same request every time
    assert jr.job_request("train", large, 5) == jr.job_request("train", large, 1)
    # expression: 1 GB + 12 bytes per stored count
    assert jr.job_request("expression", large)["mem_mb"] == 1000 + 12 * 4000


def test_paper_scale_requests_keep_the_design_bounds():
    """At 115,000 spots: `spots` at most 2 GB, the once-per-cohort Midnight+MLP fit at most 16 GB,
    every other job at most 8 GB."""
    from dataclasses import replace

    for rule in jr.FORMULAS:
        request = jr.job_request(rule, replace(jr.PAPER_SCALE, loaded_mb=jr.PAPER_LOADED_MB.get(rule, 0.0)))
        bound = {"spots": 2000, "eval_regressor_midnight_mlp": 16_000}.get(rule, 8000)
        assert request["mem_mb"] <= bound, (rule, request)
    table = jr.formula_table()
    assert all(f"`{rule}`" in table for rule in jr.FORMULAS)


def run_snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([str(SNAKEMAKE), "--cores", "1", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


SNAKEFILE = """
from stmdit import job_resources

rule all:
    input: "done.txt"

rule make_spots:
    output: "spots.parquet"
    run:
        import pandas as pd
        from stmdit.provenance import write_parquet
        write_parquet(pd.DataFrame({"key": range(4321)}), output[0], {})

rule split:
    input: spots="spots.parquet"
    output: "done.txt"
    resources:
        mem_mb=job_resources.mem_mb("split"),
        runtime=job_resources.runtime("split"),
    shell:
        # the first attempt fails (as if out of memory); each attempt records what it was given
        "echo {resources.mem_mb} {resources.runtime} >> attempts.txt;"
        " test $(wc -l < attempts.txt) -ge 2 && cp attempts.txt {output}"
"""


def test_snakemake_sizes_a_job_from_inputs_made_in_the_same_run_and_grows_it_on_retry(tmp_path):
    (tmp_path / "Snakefile").write_text(textwrap.dedent(SNAKEFILE))
    planned = run_snakemake(tmp_path, "-n", "-p")
    assert planned.returncode == 0, planned.stderr
    assert "mem_mb=<TBD>" in planned.stdout + planned.stderr  # its input is still to be made

    done = run_snakemake(tmp_path, "--retries", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = jr.InputSizes(spots=4321)
    expected = [jr.job_request("split", sizes, attempt) for attempt in (1, 2)]
    recorded = [line.split() for line in (tmp_path / "attempts.txt").read_text().splitlines()]
    assert recorded == [[str(e["mem_mb"]), str(e["runtime"])] for e in expected]
    assert expected[1]["mem_mb"] == 2 * expected[0]["mem_mb"] > 500


def test_readme_shows_the_formula_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert jr.formula_table() in readme


def test_every_gpu_rule_goes_to_the_gpu_partition_in_the_slurm_profile():
    """A rule that declares `gpu` must be listed under the slurm profile's set-resources (the
    profile's own rule); a rule listed there must exist."""
    import re

    import yaml

    repo = Path(__file__).resolve().parents[1]
    text = "\n".join(p.read_text() for p in sorted((repo / "workflow" / "rules").glob("*.smk")))
    blocks = re.split(r"\n(?=rule \w+:|use rule \w+ as \w+)", text)
    gpu_rules = set()
    for block in blocks:
        name = re.match(r"(?:rule (\w+):|use rule \w+ as (\w+))", block)
        if name and re.search(r"^\s+gpu=", block, re.M):
            gpu_rules.add(name.group(1) or name.group(2))
    listed = set(yaml.safe_load((repo / "slurm" / "config.v8+.yaml").read_text())["set-resources"])
    assert {"tiles", "eval_features", "palette", "texture"} <= gpu_rules
    gpu_rules.discard("eval_regressor")  # a GPU only with evaluate.midnight_mlp.impl torch: the profile says so
    assert gpu_rules - listed == set(), "GPU rules missing from slurm/config.v8+.yaml set-resources"
    assert listed - gpu_rules == set(), "set-resources names rules that declare no gpu"
