"""The demo through `--profile slurm` on a real SLURM (tests/cluster/start.sh): GPU rules get a GPU.

Which rules want a GPU is read from the run itself (the resources Snakemake printed for every
job), where each job ran from the scheduler's own records, so the test stays right as rules are added.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
RUN_SECONDS = 540  # the whole test must stay under 10 minutes


def cluster_is_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not cluster_is_up(), reason="no SLURM here (start one: bash tests/cluster/start.sh)"),
]


def node_memory_mb() -> int:
    """The smallest RealMemory of the cluster's nodes."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%m"], capture_output=True, text=True, check=True).stdout
    return min(int(re.match(r"\d+", line).group()) for line in out.split())


def snakemake_jobs(log: str) -> list[tuple[str, bool, dict[str, str]]]:
    """(rule, runs locally, resources) of every job Snakemake announced in its log."""
    jobs, current = [], None
    for line in log.splitlines():
        if header := re.fullmatch(r"(localrule|rule) (\w+):", line):
            current = (header[2], header[1] == "localrule")
        elif current and (resources := re.fullmatch(r"\s+resources: (.*)", line)):
            pairs = (item.split("=", 1) for item in resources[1].split(", "))
            jobs.append((*current, {key: value for key, value in pairs}))
            current = None
    return jobs


def scheduler_records(run_id: str) -> list[dict[str, str]]:
    """SLURM's record of every job named `run_id`: from accounting, else from slurmctld's memory."""
    fields = ["JobIDRaw", "Partition", "AllocTRES", "Comment", "State"]
    sacct = subprocess.run(
        ["sacct", "-X", "-P", "-n", "--name", run_id, "-S", "now-1days", "--format", ",".join(fields)],
        capture_output=True,
        text=True,
    )
    if sacct.returncode == 0 and sacct.stdout.strip():
        return [dict(zip(fields, line.split("|"))) for line in sacct.stdout.splitlines()]
    # no accounting: finished jobs stay in `scontrol show job` for MinJobAge seconds
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, check=True).stdout
    records = []
    for line in out.splitlines():
        job = dict(re.findall(r"(\w+)=(\S*)", line))
        if job.get("JobName") == run_id:
            records.append(
                {
                    "JobIDRaw": job["JobId"],
                    "Partition": job["Partition"],
                    "AllocTRES": job.get("AllocTRES") or job.get("TRES", ""),
                    "Comment": job.get("Comment", ""),
                    "State": job["JobState"],
                }
            )
    return records


def rule_of(comment: str, rules: set[str]) -> str:
    """The plugin comments each job `rule_<rule>` or `rule_<rule>_wildcards_<values>`."""
    matches = [r for r in rules if comment == f"rule_{r}" or comment.startswith(f"rule_{r}_wildcards_")]
    assert matches, f"job comment {comment!r} names no rule of this run"
    return max(matches, key=len)


def gpus_in(tres: str) -> int:
    found = re.search(r"gres/gpu(?::[^=,]+)?=(\d+)", tres)
    return int(found[1]) if found else 0


TARGET = "results/tables/table6.md"  # every stage kind: data half, PTPL, train, sample, eval, report
E2E_CONFIG = ("--configfile", "config.yaml", "tests/e2e/config.yaml")  # the demo at plumbing size


def run_snakemake(work: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}:{os.environ['PATH']}"}
    command = [
        "timeout", "-k", "30", str(RUN_SECONDS),
        str(SNAKEMAKE), "--profile", "slurm", *args,
        # local-cluster overrides only: the rules ask for more memory than this node has, and
        # status checks start sooner; partitions and GPUs come from the shipped profile as is
        "--resources", f"mem_mb={node_memory_mb()}",
        "--slurm-init-seconds-before-status-checks", "5",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=RUN_SECONDS + 60)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode} (124: timed out)\n{log[-6000:]}"
    return result, log


@pytest.fixture(scope="module")
def slurm_demo(tmp_path_factory, demo_image):
    """A scratch checkout that ran the demo's Table 6 chain through `--profile slurm`."""
    work = tmp_path_factory.mktemp("slurm") / "repo"
    # symlinks=True keeps the top-level `slurm` link a link: `--profile slurm` must resolve through it
    shutil.copytree(
        REPO,
        work,
        symlinks=True,
        ignore=shutil.ignore_patterns(".venv", "results", ".snakemake", ".git", "*.svs", ".pytest_cache"),
    )
    assert (work / "slurm").is_symlink()
    (work / "resources").mkdir(exist_ok=True)
    shutil.copy(demo_image, work / "resources" / "cmu_small_region.svs")
    _, log = run_snakemake(work, TARGET, *E2E_CONFIG)
    return work, log


def test_demo_runs_through_slurm_profile_with_gpu_rules_on_gpus(slurm_demo):
    work, log = slurm_demo
    assert (work / TARGET).exists()

    run_id = re.search(r"SLURM run ID: (\S+)", log)[1]
    jobs = [(rule, resources) for rule, local, resources in snakemake_jobs(log) if not local and rule != "all"]
    rules = {rule for rule, _ in jobs}
    assert {"train", "tiles", "deepspot_train", "eval_features", "swap_fid"} <= rules
    wanted_gpus = {}
    for rule, resources in jobs:
        wanted_gpus.setdefault(rule, set()).add(int(resources.get("gpu", 0)))
    assert all(len(counts) == 1 for counts in wanted_gpus.values()), wanted_gpus
    wanted_gpus = {rule: counts.pop() for rule, counts in wanted_gpus.items()}

    records = scheduler_records(run_id)
    submitted = Counter(rule_of(record["Comment"], rules) for record in records)
    assert submitted == Counter(rule for rule, _ in jobs), "every job submitted exactly once"
    assert any(wanted_gpus.values()) and not all(wanted_gpus.values()), f"need GPU and CPU rules: {wanted_gpus}"

    for record in records:
        rule = rule_of(record["Comment"], rules)
        where = f"{rule} (SLURM job {record['JobIDRaw']}: {record})"
        assert record["State"] == "COMPLETED", where
        if wanted_gpus[rule]:
            assert record["Partition"] == "gpu", where
            assert gpus_in(record["AllocTRES"]) == wanted_gpus[rule], where
        else:
            assert record["Partition"] == "cpu", where
            assert gpus_in(record["AllocTRES"]) == 0, where


def test_training_longer_than_a_job_finishes_across_resubmissions(slurm_demo):
    """A 2-minute SLURM limit and a 90 s margin leave each job ~30 s: training needs several jobs.
    The job reads its end time from SLURM, checkpoints, exits 75, Snakemake resubmits, the next job
    resumes; the final weights equal an uninterrupted run's, bit for bit (CPU)."""
    import torch
    from safetensors.torch import load_file

    work, _ = slurm_demo
    override = work / "chained.yaml"
    override.write_text("train:\n  settings: {steps: 2000, margin_s: 90, checkpoint_every: 5000, val_every: 5000}\n")
    model = work / "results" / "models" / "PixCell-Flow-B"
    _, log = run_snakemake(
        work, str(model.relative_to(work) / "ema.safetensors"), *E2E_CONFIG, str(override),
        "--set-resources", "train:runtime=2", "train:slurm_partition=gpu",
    )
    run_id = re.search(r"SLURM run ID: (\S+)", log)[1]
    train_jobs = [r for r in scheduler_records(run_id) if r["Comment"].startswith("rule_train_")]
    assert len(train_jobs) >= 2, f"training fit in one job: {train_jobs}"
    # every earlier job left on its own before its limit (training exits 75, the job fails), none
    # was killed by SLURM (TIMEOUT)
    assert [r["State"] for r in train_jobs][-1] == "COMPLETED" and all(
        r["State"] == "FAILED" for r in train_jobs[:-1]), train_jobs
    train_log = (model / "train.log").read_text()  # Snakemake keeps the last attempt's log
    assert "resumed from" in train_log and "wall-clock deadline" in train_log, train_log[-3000:]

    settings = json.loads((model / "training.json").read_text())["settings"]
    settings["budget_s"] = None
    straight = work / "results" / "straight"
    inputs = ["--split", "results/splits/demo.parquet", "--latents", "results/features/demo/sd3_vae.zarr",
              "--uni", "results/features/demo/uni2h.zarr"]
    done = subprocess.run([sys.executable, "-m", "stmdit", "train", "--settings", json.dumps(settings), *inputs,
                           "--out-dir", str(straight)], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    chained, uninterrupted = load_file(str(model / "ema.safetensors")), load_file(str(straight / "ema.safetensors"))
    assert chained.keys() == uninterrupted.keys()
    for name in chained:
        assert torch.equal(chained[name], uninterrupted[name]), name
