# Config and sample-sheet validation (at parse time, before any job runs) and target lists.
import json
import re
import sys
from pathlib import Path

from stmdit.config import (
    check_cohorts,
    cohort_samples,
    cohorts,
    expression_cohorts,
    load_sample_sheet,
    validate_config,
)
from stmdit.errors import InputError

# Rules run the checkout's own code (python -m stmdit) in whichever environment runs the job:
# the project's .venv, or a per-rule conda env from envs/ (--sdm conda).
# (braces doubled twice: once for this f-string, once for Snakemake's own formatting)
shell.prefix(f"set -euo pipefail; export PYTHONPATH='{workflow.basedir}/src'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

CONDA_CPU = "../../envs/cpu.yaml"
CONDA_GPU = "../../envs/gpu.yaml"
DEMO_ROOT = "results/resources/demo"

try:
    config = validate_config(config, source="config (config.yaml and --config/--configfile)")
    SAMPLES = load_sample_sheet(config["samples"])
    check_cohorts(SAMPLES, config["samples"])
except InputError as err:
    sys.exit(f"stmdit: error: {err}")

COHORTS = cohorts(SAMPLES)
EXPRESSION_COHORTS = expression_cohorts(SAMPLES)
IMAGE_ENCODERS = config["features"]["image_encoders"]
SAMPLE_PATTERN = "|".join(map(re.escape, SAMPLES["sample"]))
COHORT_PATTERN = "|".join(map(re.escape, COHORTS))
IMAGE_ENCODER_PATTERN = "|".join(IMAGE_ENCODERS)


def sample_row(sample):
    return SAMPLES.loc[sample]


def spots_inputs(wildcards):
    """The raw files of one slide (the demo slides are made by demo_data)."""
    row = sample_row(wildcards.sample)
    if row["kind"] == "he":
        files = {"slide": row["path"]}
    else:
        files = {
            "matrix": f"{row['path']}/filtered_feature_bc_matrix.h5",
            "scalefactors": f"{row['path']}/spatial/scalefactors_json.json",
        }
        if row["image"]:
            files["image"] = row["image"]
        if row["labels"]:
            files["labels"] = row["labels"]
    return files


def spots_sample_args(wildcards):
    """Sample-sheet fields of one slide as CLI flags."""
    row = sample_row(wildcards.sample)
    args = [
        f"--sample {row['sample']}",
        f"--donor {row['donor']}",
        f"--cohort {row['cohort']}",
        f"--kind {row['kind']}",
        f"--path '{row['path']}'",
    ]
    for column in ("image", "labels", "mpp"):
        if row[column]:
            args.append(f"--{column} '{row[column]}'")
    return " ".join(args)


def cohort_spots(wildcards):
    return [f"results/spots/{s}.parquet" for s in cohort_samples(SAMPLES, wildcards.cohort)]


def cohort_patches(wildcards):
    return [f"results/patches/{s}.zarr" for s in cohort_samples(SAMPLES, wildcards.cohort)]


def cohort_matrices(wildcards):
    return [
        f"{SAMPLES.loc[s, 'path']}/filtered_feature_bc_matrix.h5"
        for s in cohort_samples(SAMPLES, wildcards.cohort)
    ]


def encoder_args(name):
    """CLI flags of one encoder's config entry."""
    entry = config["features"]["encoders"].get(name, {"impl": "smoke"})
    args = [f"--impl {entry['impl']}"]
    if entry.get("weights"):
        args.append(f"--weights '{entry['weights']}'")
    if entry.get("arch"):
        args.append(f"--arch-json '{json.dumps(entry['arch'])}'")
    if entry.get("variant"):
        args.append(f"--variant {entry['variant']}")
    if config["features"]["allow_hub"]:
        args.append("--allow-hub")
    if config["features"]["bf16"]:
        args.append("--bf16")
    return " ".join(args)


def demo_outputs():
    """What the demo_data job writes: every sample-sheet file that lies under DEMO_ROOT."""
    files = []
    for _, row in SAMPLES.iterrows():
        if not row["path"].startswith(f"{DEMO_ROOT}/"):
            continue
        if row["kind"] == "he":
            files.append(row["path"])
            continue
        files += [
            f"{row['path']}/filtered_feature_bc_matrix.h5",
            f"{row['path']}/spatial/scalefactors_json.json",
        ]
        files += [row[c] for c in ("image", "labels") if row[c]]
    return files


def all_targets():
    targets = []
    targets += expand("results/spots/{sample}.parquet", sample=SAMPLES["sample"])
    targets += expand("results/expression/{cohort}.h5ad", cohort=EXPRESSION_COHORTS)
    targets += expand("results/features/{cohort}/{encoder}.zarr", cohort=COHORTS, encoder=IMAGE_ENCODERS)
    targets += expand("results/features/{cohort}/cancerfoundation.zarr", cohort=EXPRESSION_COHORTS)
    targets += expand("results/splits/{cohort}.parquet", cohort=COHORTS)
    return targets
