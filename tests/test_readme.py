"""Every snakemake command of the README, exactly as written, plans (-n) on a fresh copy of the
checkout (no demo image, no results), and the paper configuration refuses to plan without a named
test donor."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stmdit.bench import paper_sheet

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
PAPER = "workflow/paper/config.yaml"
# README commands that need a finished run: the message they must stop with on a fresh clone
# (after parsing the workflow, so the command itself is right).
NEEDS_RESULTS = {"snakemake --report report.zip": "marked for report but does not exist"}


def readme_commands() -> list[str]:
    """`snakemake ...` spans of the README (inline code and code blocks), in order, without repeats."""
    text = (REPO / "README.md").read_text()
    spans = re.findall(r"`(snakemake[^`]*)`", text)
    spans += [line.strip() for line in re.findall(r"^\s*(snakemake .*)$", text, re.MULTILINE)]
    return list(dict.fromkeys(span.split("#")[0].strip() for span in spans))


# Runs snakemake's own entry point (snakemake.cli.main, what the `snakemake` executable calls) once
# per argument list in one interpreter: each plan then costs its parsing and DAG, not a fresh
# start-up and import of snakemake (which is most of a dry run's time).
DRIVER = """
import contextlib, io, json, sys
from snakemake.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            if isinstance(exc.code, str):
                out.write(exc.code)
    results.append({"returncode": code or 0, "output": out.getvalue()})
print(json.dumps(results))
"""


def run_all(commands: list[list[str]], cwd: Path) -> list[dict]:
    """{"returncode", "output"} of snakemake with each argument list, run in `cwd` on its own `src`."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(cwd / "src")}
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """The checkout's files as git sees them (tracked and untracked-not-ignored): no demo image,
    no results, no .snakemake. Plus the files the README tells a user to write."""
    root = tmp_path_factory.mktemp("clone")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_symlink():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(source), root / name)
        elif source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    assert not (root / "resources" / "cmu_small_region.svs").exists()
    shutil.copy(root / "config.yaml", root / "my.yaml")
    # a user's own sheet: the demo's slides under other cohort names
    sheet = (root / "workflow" / "demo" / "samples.tsv").read_text()
    (root / "my_samples.tsv").write_text(sheet.replace("\tdemo_he\t", "\tmine_he\t").replace("\tdemo\t", "\tmine\t"))
    write_hest_cohort(root)
    return root


# HEST's table rows of the README's melanoma cohort (and two it filters out), for `stmdit hest-sheet`
MELANOMA_ROWS = [
    ("TENX115", "Human Skin Preview Data (Xenium Human Skin Gene Expression Panel)", "Skin", "Cancer", "SKCM",
     "Homo sapiens", "patient 2", "Xenium", "", "", "3886", ""),
    ("TENX117", "Human Skin Preview Data (Xenium Human Skin Gene Expression Panel with Custom Add-On)", "Skin",
     "Cancer", "SKCM", "Homo sapiens", "patient 1", "Xenium", "", "", "1830", ""),
    ("TENX158", "FFPE Human Skin Primary Dermal Melanoma with 5K Human Pan Tissue and Pathways Panel", "Skin",
     "Cancer", "SKCM", "Homo sapiens", "", "Xenium", "", "", "2179", ""),
    ("NCBI689", "A cellular hierarchy in melanoma uncouples growth and metastasis", "Skin", "Cancer", "SKCM",
     "Mus musculus", "", "Visium", "55", "100", "4992", "Visium melanoma_2"),
    ("TENX156", "Characterization of immune cell populations in the tumor microenvironment of colorectal cancer"
     " using high definition spatial profiling", "Bowel", "Cancer", "COAD", "Homo sapiens", "Patient 1", "Visium HD",
     "2", "2", "2179", "Visium HD, Sample P1 CRC"),
]


def readme_text() -> str:
    return (REPO / "README.md").read_text()


def write_hest_cohort(root: Path) -> None:
    """What the README's HEST section has the user do: HEST's table and samples under hest_data/, the
    README's `stmdit hest-sheet` command run exactly as written, and its hest_melanoma.yaml. The
    samples are Xenium-like pseudo-spots of the real muscle Visium folder (planning reads only their
    h5ad headers; without shared/data, a 4-spot stand-in)."""
    from conftest import SHARED_DATA
    from hest_format import hest_metadata, write_pseudo_spot_sample, write_pyramid
    from test_hest_sheet import write_table

    from stmdit.hest import sample_files

    write_table(root / "HEST_v1_1_0.csv", MELANOMA_ROWS)
    hest_root = root / "hest_data"
    muscle = SHARED_DATA / "visium" / "mouse_muscle_Vis5A_sr1"
    if muscle.exists():
        write_pseudo_spot_sample(muscle, hest_root, "TENX158")
    else:
        import anndata as ad
        import numpy as np

        files = sample_files(hest_root, "TENX158")
        for path in files.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        centres = np.array([[40.0, 40.0], [80.0, 40.0], [40.0, 80.0], [80.0, 80.0]])
        st = ad.AnnData(X=np.ones((4, 3), dtype=np.float32))
        st.obsm["spatial"] = centres
        st.write_h5ad(files["st"])
        write_pyramid(files["wsi"], np.full((128, 128, 3), 200, dtype=np.uint8), 2.5)
        files["metadata"].write_text(json.dumps(hest_metadata("TENX158", 2.5, (128, 128), 4, "Xenium")))
    for sample in ("TENX115", "TENX117", "NCBI689", "TENX156"):
        for name, path in sample_files(hest_root, "TENX158").items():
            shutil.copy(path, sample_files(hest_root, sample)[name])
    command = next(line for line in readme_text().splitlines() if line.startswith("stmdit hest-sheet "))
    result = subprocess.run([sys.executable, "-m", "stmdit", *shlex.split(command)[1:]], cwd=root, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Xenium: 3 passed, 0 dropped" in result.stdout, result.stdout
    block = re.search(r"```yaml\n# hest_melanoma.yaml\n(.*?)```", readme_text(), re.DOTALL)
    (root / "hest_melanoma.yaml").write_text(block.group(1))


def test_readme_commands_plan_on_a_fresh_clone(fresh_clone, tmp_path):
    commands = readme_commands()
    assert "snakemake all --configfile my.yaml" in commands and "snakemake all --config samples=my_samples.tsv" in commands
    # the paper configuration needs the user's sheet and test donor: a generated sheet stands in for them
    sheet = paper_sheet(tmp_path, 6, 3, 1, "10x_TuPro", "TCGA_SKCM")
    overlay = tmp_path / "site.yaml"
    overlay.write_text(yaml.safe_dump({"samples": str(sheet), "split": {"test_donors": {"10x_TuPro": ["D0"]}}}))
    if shutil.which("conda") is None:  # `--sdm conda` plans through conda itself
        commands = [c for c in commands if "--sdm conda" not in c]
    argv = []
    for command in commands:
        args = shlex.split(command)[1:]
        if PAPER in args:
            args.insert(args.index(PAPER) + 1, str(overlay))
        argv.append([*args, "-n", "--quiet", "rules"])
    outputs = {}
    for command, result in zip(commands, run_all(argv, fresh_clone)):
        if command in NEEDS_RESULTS:
            assert result["returncode"] != 0 and NEEDS_RESULTS[command] in result["output"], result["output"]
            continue
        assert result["returncode"] == 0, f"`{command} -n` failed:\n{result['output'][-3000:]}"
        outputs[command] = result["output"]
    # the README's HEST cohort: the sheet `stmdit hest-sheet` wrote, with the donors the README names
    hest = outputs["snakemake all --profile slurm --configfile workflow/paper/config.yaml hest_melanoma.yaml"]
    assert re.search(r"^spots\s+3$", hest, re.MULTILINE), hest[-3000:]
    sheet = pd.read_csv(fresh_clone / "hest_melanoma.tsv", sep="\t")
    assert list(sheet["sample"]) == ["TENX115", "TENX117", "TENX158"] and set(sheet["kind"]) == {"hest"}
    assert list(sheet["donor"]) == ["TENX115_patient_2", "TENX117_patient_1", "TENX158"]
    # plain snakemake on a fresh clone fetches the demo image first
    assert re.search(r"^fetch_demo_image\s+1$", outputs["snakemake"], re.MULTILINE), outputs["snakemake"]
    # the user's sheet: the cohorts default to its only Visium and H&E-only ones, and the log says so
    own = outputs["snakemake all --config samples=my_samples.tsv"]
    assert "using the sheet's only Visium cohort 'mine'" in own and "only H&E-only cohort 'mine_he'" in own
    # one command's --config does not reach the next (they share an interpreter)
    assert "'mine'" not in outputs["snakemake -n all"] and "cohort 'demo'" in outputs["snakemake -n all"]


def test_paper_configuration_fails_at_parse_time_without_a_test_donor(fresh_clone, tmp_path):
    sheet = paper_sheet(tmp_path, 6, 3, 1, "10x_TuPro", "TCGA_SKCM")
    overlay = tmp_path / "site.yaml"
    overlay.write_text(yaml.safe_dump({"samples": str(sheet)}))
    result = subprocess.run([str(SNAKEMAKE), "all", "-n", "--configfile", PAPER, str(overlay)], cwd=fresh_clone,
                            env={**os.environ, "PYTHONPATH": str(fresh_clone / "src")}, capture_output=True, text=True)
    assert result.returncode != 0
    assert "split.test_donors: this configuration requires the held-out test donor of cohort '10x_TuPro'" in \
        result.stderr and "D0, D1, D2" in result.stderr
    assert "Job stats" not in result.stdout + result.stderr  # nothing was planned
