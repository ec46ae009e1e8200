"""`stmdit bench scale`: each rule's peak memory, time and output size at two cohort sizes, run
through Snakemake on a synthetic cohort in the real formats (stmdit.scale_cohort), projected to the
paper's counts.

Per size: write the cohort; write a full configuration (config.yaml with the generated sheet,
smoke encoders, two models and lowered iteration counts; memory-deciding shapes stay the paper's:
20,000 genes, 1,536-d UNI, 3,072-d Midnight, the 1,024 x 1,024 Midnight+MLP, DeepSpot's 512 hidden
units); run the data stages through Snakemake; then, for the evaluation stages, write the generated
tiles' features as copies of the real features of the test spots, permuted among them (no diffusion
model is trained or sampled) and run fid, ood_fid, auc, perturbation and the tables through Snakemake with only those
rules allowed. Every `stmdit` process writes its exact peak RSS (VmHWM) and wall time to
$STMDIT_RUSAGE_DIR (stmdit.cli); records are attributed to rules by command and output path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from stmdit.bench import REPO, benchmark
from stmdit.disk_projection import describe as describe_projection

PAPER_VISIUM_SPOTS = 114_688
PAPER_HE_SPOTS = 89_576
PAPER_VISIUM_SLIDES = 18
PAPER_HE_SLIDES = 4          # `stmdit bench dag`'s OOD sheet
PAPER_GENES = 20_000
PAPER_TEST_SPOTS = 11_776    # Visium test spots (paper-numbers.md); what fid and auc read
PAPER_OOD_SPOTS = 10_000     # the seeded subsample of the H&E-only cohort that ood_fid reads
# rules whose jobs read only the test spots: their memory and time follow those, not the cohort
TEST_SPOT_RULES = {"fid": "test", "auc": "test", "ood_fid": "ood"}

STAGES = ("spots", "expression", "split", "features", "deepspot", "regressors", "eval")
IMAGE_ENCODERS = ["uni2h", "deepspot_fm", "h0mini", "midnight", "sd3_vae"]
DISK_LIMIT_GB = 250  # the stores issue's bound on everything but the training checkpoints
MODELS = {
    "PixCell-Flow-B": {"fusion": "none", "objective": "flow", "p": 0.1, "tables": [1, 2, 3, 4]},
    "PixCell-Flow-GE-B-p05": {"name": "PixCell-Flow-GE-B", "fusion": "adaln", "objective": "flow", "p": 0.5,
                              "baseline": "PixCell-Flow-B", "tables": [1, 2, 3, 4, 5]},
}
# Iteration counts lowered for time; what they were in config.yaml is printed beside them
LOWERED = {
    ("deepspot", "epochs"): 1, ("deepspot", "n_ensemble"): 2, ("deepspot", "baselines"): False,
    ("evaluate", "n_boot"): 20, ("evaluate", "auc_n_boot"): 20, ("evaluate", "null_n_perm"): 20,
    ("evaluate", "mlp_max_iter"): 2,
}
PAPER_SHAPES = {("evaluate", "mlp_hidden"): [1024, 1024], ("evaluate", "pca"): 256, ("deepspot", "hidden_dim"): 512}
EVAL_RULES = ["fid", "ood_fid", "auc", "perturbation", "models_json", *(f"table{n}" for n in range(1, 6))]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="5000,50000",
                   help="Visium spots of the cohort at each size, comma-separated (H&E-only spots: x 89,576/114,688)")
    p.add_argument("--out", type=Path, required=True, help="folder for cohorts, runs and the table (JSON + markdown)")
    p.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--genes", type=int, default=PAPER_GENES, help="genes of the count matrices")
    p.add_argument("--he-gigapixels", type=float, default=4.1, help="size of each H&E-only slide (0.25 um/px)")
    p.add_argument("--source-image", type=Path, default=REPO / "resources" / "cmu_small_region.svs",
                   help="the real H&E the slides are tiled from")
    p.add_argument("--tile", type=int, default=512, help="TIFF tile side in px")
    p.add_argument("--tabulate", action="store_true",
                   help="only rebuild the table from the runs already under --out (nothing is written or run)")
    p.add_argument("--paper-config", type=Path, default=REPO / "workflow" / "paper" / "config.yaml",
                   help="the configuration whose tile stores and checkpoints are projected from its plan")
    p.add_argument("--n-boot", type=int, default=20,
                   help="bootstrap resamples and permutations of FID and AUC (a fixed cost per job, not per spot)")


def bench_config(cohort, lowered: dict) -> dict[str, Any]:
    """config.yaml with the generated sheet, smoke encoders, two models and the LOWERED counts."""
    import yaml

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["samples"] = str(cohort.sheet)
    config.pop("demo", None)
    config["train"].update({"cohort": cohort.visium_cohort, "ood_cohorts": [cohort.he_cohort], "size": "tiny"})
    config["split"]["test_donors"] = {cohort.visium_cohort: [cohort.test_donor], cohort.he_cohort: ["HD0"]}
    config["features"]["image_encoders"] = list(IMAGE_ENCODERS)
    for encoder in config["features"]["encoders"].values():
        encoder["impl"] = "smoke"
    config["features"]["batch_size"] = 64
    config["models"] = MODELS
    config["virtual"]["experiments"] = {}
    for (section, key), value in {**lowered, **PAPER_SHAPES}.items():
        config[section][key] = value
    return config


def stage_targets(cohort, stages: set[str]) -> list[str]:
    v, h = cohort.visium_cohort, cohort.he_cohort
    targets = []
    if "spots" in stages:
        targets += [f"results/spots/{s}.parquet" for s in [*cohort.visium_slides, *cohort.he_slides]]
    if "expression" in stages:
        targets.append(f"results/expression/{v}.h5ad")
    if "split" in stages:
        targets += [f"results/splits/{c}.parquet" for c in (v, h)]
    if "features" in stages:
        targets += [f"results/features/{c}/{e}.zarr" for c in (v, h) for e in IMAGE_ENCODERS]
        targets.append(f"results/features/{v}/cancerfoundation.zarr")
    if "deepspot" in stages:
        targets += [f"results/ptpl/{v}_deepspot", f"results/ptpl/{h}.h5ad",
                    f"results/features/{h}/cancerfoundation_ptpl.zarr"]
    if "regressors" in stages or "eval" in stages:
        targets += [f"results/eval/regressors/{v}/{r}.joblib" for r in ("oracle", "midnight_mlp")]
        targets += [f"results/controls/{v}/noise_{e}.zarr" for e in ("uni2h", "midnight")]
    return targets


def run_snakemake(work: Path, config_path: Path, targets: list[str], cores: int, rusage: Path, log: Path,
                  allowed_rules: list[str] | None = None) -> float:
    command = [str(Path(sys.executable).parent / "snakemake"), *targets, "--snakefile", str(REPO / "Snakefile"),
               "--directory", str(work), "--configfile", str(config_path), "--cores", str(cores),
               "--rerun-triggers", "mtime", "--nolock"]
    if allowed_rules:
        command += ["--allowed-rules", *allowed_rules]
    # the rules' `python -m stmdit` must be this interpreter, with or without an activated venv
    env = {**os.environ, "STMDIT_RUSAGE_DIR": str(rusage),
           "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")])),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(log, "a") as out:
        code = subprocess.run(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"stmdit bench scale: snakemake failed (exit {code}); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))
    return time.perf_counter() - started


def write_generated_copies(work: Path, config: dict, cohort) -> dict[str, int]:
    """The evaluation inputs of the generated tiles, as copies of the real features of the test spots, permuted:
    results/eval/{model}/{cohort}/{regime}_{encoder}.zarr (the test split; on the H&E-only cohort its
    seeded subsample of sampler.ood_max_spots), and each GE model's perturbation store (rows of
    stmdit.perturb.perturbation_rows) with its features (the reference spot's real H0-mini features)."""
    import zarr

    from stmdit.features import read_feature_rows, write_feature_store
    from stmdit.metrics import subsample_keys
    from stmdit.models_config import resolve_models
    from stmdit.perturb import parse_alphas, perturbation_rows, read_spot_labels
    from stmdit.split_table import split_keys

    import logging

    logging.getLogger("stmdit.features").setLevel(logging.WARNING)  # one line per store otherwise
    results = work / "results"
    models = resolve_models(config)
    written: dict[str, int] = {}

    def copy(real: Path, keys: list[str], out: Path, seed: int, extra: dict | None = None) -> None:
        # each spot gets the real features of another test spot (a seeded permutation per store):
        # exact copies would make every FID 0, whose degenerate covariances are no measure of the cost
        group = zarr.open_group(str(real), mode="r")
        donors = list(np.random.default_rng(seed).permutation(np.asarray(keys, dtype=object)))
        embedding = read_feature_rows(real, donors, ["embedding"])["embedding"]
        attrs = {"encoder": dict(group.attrs.get("encoder") or {}), "encoders": dict(group.attrs.get("encoders") or {}),
                 "bench_scale": "real features of other test spots (a seeded permutation; no model was sampled)"}
        write_feature_store(out, keys, [{"embedding": embedding}], {"embedding": embedding.shape[1:]}, attrs,
                            extra_arrays=extra)
        written[str(out.relative_to(work))] = len(keys)

    v, h = cohort.visium_cohort, cohort.he_cohort
    test = split_keys(results / "splits" / f"{v}.parquet", "test")
    ood_test = subsample_keys(split_keys(results / "splits" / f"{h}.parquet", "test"),
                              config["sampler"]["ood_max_spots"], config["sampler"]["ood_seed"])
    for number, (name, model) in enumerate(models.items()):
        for index, regime in enumerate(model.regimes):
            seed = 1000 * number + index  # the same permutation for a regime's three encoders
            for encoder in ("h0mini", "uni2h", "midnight"):
                copy(results / "features" / v / f"{encoder}.zarr", test,
                     results / "eval" / name / v / f"{regime}_{encoder}.zarr", seed)
            if regime in ("uni_ge", "uni"):
                copy(results / "features" / h / "h0mini.zarr", ood_test,
                     results / "eval" / name / h / f"{regime}_h0mini.zarr", seed)
        if model.uses_ge and 5 in model.tables:  # Table 5's perturbation rows
            settings = config["evaluate"]["perturbation"]
            train = split_keys(results / "splits" / f"{v}.parquet", "train")
            expression = results / "expression" / f"{v}.h5ad"
            rows, _ = perturbation_rows([tuple(p) for p in settings["pairs"]],
                                        parse_alphas(",".join(map(str, settings["alphas"]))), test,
                                        read_spot_labels(expression, test), read_spot_labels(expression, train),
                                        settings["n_ref"], settings["seed"], settings["mode"])
            store = results / "tiles" / name / v / "perturbation.zarr"
            group = zarr.open_group(str(store), mode="w", zarr_format=3)
            for column in ("spot_key", "pair", "ref_key"):
                group.create_array(column, shape=(len(rows),), dtype=str)[:] = rows[column].to_numpy(dtype=object)
            group.create_array("alpha", data=rows["alpha"].to_numpy(dtype=np.float64))
            group.attrs.update({"perturbation": {"mode": settings["mode"]},
                                "encoders": {"cancerfoundation": "smoke"},
                                "bench_scale": "rows only: no images were sampled"})
            real = results / "features" / v / "h0mini.zarr"
            group_real = zarr.open_group(str(real), mode="r")
            embedding = read_feature_rows(real, rows["ref_key"].tolist(), ["embedding"])["embedding"]
            out = results / "eval" / name / v / "perturbation_h0mini.zarr"
            write_feature_store(out, rows["spot_key"].tolist(), [{"embedding": embedding}],
                                {"embedding": embedding.shape[1:]},
                                {"encoder": dict(group_real.attrs.get("encoder") or {}), "bench_scale": "copies"},
                                extra_arrays={"pair": rows["pair"].to_numpy(dtype=object),
                                              "ref_key": rows["ref_key"].to_numpy(dtype=object),
                                              "alpha": rows["alpha"].to_numpy(dtype=np.float64)})
            written[str(out.relative_to(work))] = len(rows)
    return written


# ---------------------------------------------------------------------------------------------
# attribution of the rusage records to rules


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


OUT_OPTIONS = ("--out", "--out-spots", "--out-patches", "--out-model", "--out-lodo", "--out-tsv", "--out-md")


def _path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    # symlinks (replicated slides) are not counted again
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.is_dir() else 0


def rule_of(record: dict, cohorts: tuple[str, str]) -> tuple[str, str] | None:
    """(rule label, cohort) of one stmdit process, or None for a process that is not a measured rule."""
    argv, command = record["argv"], record["command"]
    out = _option(argv, "--out") or _option(argv, "--out-spots") or _option(argv, "--out-model") or ""
    cohort = _option(argv, "--cohort") or next((c for c in sorted(cohorts, key=len, reverse=True)
                                                if f"/{c}/" in f"/{out}" or f"/{c}." in out or f"/{c}_" in out), "")
    if command == "spots":
        return "spots", cohort
    if command == "features":
        encoder = _option(argv, "--encoder")
        if encoder == "cancerfoundation" and "_ptpl" in out:
            encoder = "cancerfoundation_ptpl"
        return f"features[{encoder}]", cohort
    if command == "eval-features":
        return (f"noise_features[{_option(argv, '--encoder')}]", cohort) if "--noise-tiles-for" in argv else None
    if command == "eval-regressor":
        return f"eval_regressor[{_option(argv, '--regressor')}]", cohort
    if command == "fid":
        return {"fid": "fid", "ood": "ood_fid", "swap": "swap_fid"}[_option(argv, "--kind") or "fid"], cohort
    if command == "table":
        return "tables", cohorts[0]
    names = {"expression": "expression", "split": "split", "deepspot-train": "deepspot_train",
             "deepspot-predict": "deepspot_predict", "auc": "auc", "perturbation": "perturbation"}
    return (names[command], cohort) if command in names else None


def requested_resources(log: Path) -> dict[str, dict[str, float]]:
    """output path -> {"mem_mb", "runtime"} that Snakemake asked for the job writing it (the
    `resources:` line of each job in the run's log: job_resources' formulas on the real inputs)."""
    requested: dict[str, dict[str, float]] = {}
    outputs: list[str] = []
    for line in log.read_text().splitlines() if log.exists() else []:
        line = line.strip()
        if line.startswith("output:"):
            outputs = [o.strip() for o in line[len("output:"):].split(",") if o.strip()]
        elif line.startswith("resources:") and outputs:
            values = dict(part.strip().split("=", 1) for part in line[len("resources:"):].split(",") if "=" in part)
            if "mem_mb" in values and "runtime" in values:
                for output in outputs:
                    requested[output] = {"mem_mb": float(values["mem_mb"]), "runtime": float(values["runtime"])}
            outputs = []
    return requested


def collect(rusage: Path, work: Path, cohorts: tuple[str, str], log: Path | None = None) -> dict[tuple[str, str], dict]:
    """Per (rule, cohort): jobs, max peak RSS over jobs, summed wall time, summed output bytes, and
    for spots the spots per job (rows of its spots table)."""
    from stmdit.spots_table import read_spots_table

    rows: dict[tuple[str, str], dict] = {}
    requested = requested_resources(log) if log is not None else {}
    for path in sorted(rusage.glob("*.json")):
        record = json.loads(path.read_text())
        key = rule_of(record, cohorts)
        if key is None or record["exit_code"] != 0:
            continue
        row = rows.setdefault(key, {"jobs": 0, "peak_rss": 0, "wall_s": 0.0, "out_bytes": 0, "job_spots": [],
                                    "mem_of_request": None, "time_of_request": None})
        asked = next((requested[v] for o in OUT_OPTIONS if (v := _option(record["argv"], o)) in requested), None)
        if asked is not None:  # the job's peak and wall time as fractions of what Snakemake asked for it
            peak = max(record["vmhwm_bytes"], record["ru_maxrss_children_bytes"])
            row["mem_of_request"] = max(row["mem_of_request"] or 0.0, peak / (asked["mem_mb"] * 1e6))
            row["time_of_request"] = max(row["time_of_request"] or 0.0, record["wall_s"] / (asked["runtime"] * 60))
        row["jobs"] += 1
        row["peak_rss"] = max(row["peak_rss"], record["vmhwm_bytes"], record["ru_maxrss_children_bytes"])
        row["wall_s"] += record["wall_s"]
        cwd = Path(record.get("cwd", work))
        for option in OUT_OPTIONS:
            value = _option(record["argv"], option)
            if value:
                row["out_bytes"] += _path_bytes(cwd / value)
        if key[0] == "spots":
            row["job_spots"].append(len(read_spots_table(cwd / _option(record["argv"], "--out-spots"), ["key"])))
    return rows


def cohort_spots(work: Path, cohort) -> dict[str, int]:
    """Kept spots of each cohort (what the cohort rules read; the paper's counts are of kept spots)."""
    from stmdit.spots_table import read_spots_table

    counts = {}
    for name, slides in ((cohort.visium_cohort, cohort.visium_slides), (cohort.he_cohort, cohort.he_slides)):
        paths = [work / "results" / "spots" / f"{s}.parquet" for s in slides]
        counts[name] = sum(len(read_spots_table(p, ["key"], kept=True)) for p in paths if p.exists())
    return counts


def test_spots(work: Path, cohort, ood_max_spots: int) -> dict[str, int]:
    """The spots the test-set rules read: the Visium cohort's test split ("test") and the H&E-only
    cohort's test split capped at sampler.ood_max_spots ("ood"); {} before the split has run."""
    from stmdit.split_table import TEST, read_split_table

    splits = {basis: work / "results" / "splits" / f"{name}.parquet"
              for basis, name in (("test", cohort.visium_cohort), ("ood", cohort.he_cohort))}
    counts = {basis: int((read_split_table(path)["split"] == TEST).sum())
              for basis, path in splits.items() if path.exists()}
    if "ood" in counts:
        counts["ood"] = min(counts["ood"], ood_max_spots)
    return counts


def scale_table(measured: list[dict], visium_cohort: str) -> list[dict]:
    """One row per (rule, cohort) measured at the two extreme sizes: peak RSS at each, bytes per spot
    above the fixed base, the log-log slope of time, output bytes per spot, projections."""
    small, large = measured[0], measured[-1]
    table = []
    for key in sorted(large["rules"], key=lambda k: (list(STAGE_ORDER).index(_stage(k[0])), k)):
        if key not in small["rules"]:
            continue
        rule, cohort = key
        s, l = small["rules"][key], large["rules"][key]
        visium = cohort == visium_cohort
        paper_cohort = PAPER_VISIUM_SPOTS if visium else PAPER_HE_SPOTS  # what the outputs are projected to
        if rule == "spots":  # per-slide jobs: per-job spots, projected to a paper slide
            n_s, n_l = (max(r["job_spots"]) for r in (s, l))
            paper_job = PAPER_VISIUM_SPOTS / PAPER_VISIUM_SLIDES if visium else PAPER_HE_SPOTS / PAPER_HE_SLIDES
            n_time_s, n_time_l = sum(s["job_spots"]), sum(l["job_spots"])
        elif rule in TEST_SPOT_RULES and TEST_SPOT_RULES[rule] in large.get("test_spots", {}):
            basis = TEST_SPOT_RULES[rule]
            n_s, n_l = small["test_spots"][basis], large["test_spots"][basis]
            paper_job = PAPER_TEST_SPOTS if basis == "test" else PAPER_OOD_SPOTS
            paper_cohort = paper_job
            n_time_s, n_time_l = n_s, n_l
        else:
            n_s, n_l = small["spots"][cohort], large["spots"][cohort]
            paper_job = PAPER_VISIUM_SPOTS if visium else PAPER_HE_SPOTS
            n_time_s, n_time_l = n_s, n_l
        # below 3x more spots per job (the spots rows of an H&E slide whose tissue barely grew) the
        # difference of two peaks says nothing of the cost per spot: no per-spot figure, no projection
        per_spot = (l["peak_rss"] - s["peak_rss"]) / (n_l - n_s) if n_l >= 3 * n_s else float("nan")
        base = s["peak_rss"] - per_spot * n_s if per_spot == per_spot else float("nan")
        if per_spot < 0:  # a peak that fell as the data grew is noise, not a negative cost: the larger peak stays
            per_spot, base = 0.0, max(s["peak_rss"], l["peak_rss"])
        if per_spot != per_spot and n_l >= paper_job:  # the larger size already ran a paper-size job (a capped subsample)
            per_spot, base = 0.0, l["peak_rss"]
        slope = (math.log(l["wall_s"] / s["wall_s"]) / math.log(n_time_l / n_time_s)
                 if min(l["wall_s"], s["wall_s"]) > 0 and n_time_l != n_time_s else float("nan"))
        out_per_spot = l["out_bytes"] / max(n_time_l, 1)
        table.append({
            "rule": rule, "cohort": cohort, "jobs": [s["jobs"], l["jobs"]], "spots": [n_s, n_l],
            "peak_rss_gb": [round(s["peak_rss"] / 1e9, 3), round(l["peak_rss"] / 1e9, 3)],
            "wall_s": [round(s["wall_s"], 1), round(l["wall_s"], 1)],
            "rss_bytes_per_spot": _round(per_spot), "rss_base_gb": _round(base / 1e9, 3),
            "time_loglog_slope": _round(slope, 3), "out_bytes_per_spot": round(out_per_spot),
            "paper_spots": round(paper_job), "projected_peak_gb": _round((base + per_spot * paper_job) / 1e9, 2),
            "projected_out_gb": round(out_per_spot * paper_cohort / 1e9, 2),
            "mem_of_request": _round(l.get("mem_of_request") or float("nan"), 2),
            "time_of_request": _round(l.get("time_of_request") or float("nan"), 3),
        })
    return table


def _round(value: float, digits: int | None = None):
    """round(), None for nan (JSON null; the markdown prints a dash)."""
    return None if value != value else round(value, digits)


STAGE_ORDER = {"spots": 0, "expression": 1, "split": 2, "features": 3, "deepspot": 4, "regressors": 5, "eval": 6}


def _stage(rule: str) -> str:
    for prefix, stage in (("spots", "spots"), ("expression", "expression"), ("split", "split"),
                          ("features", "features"), ("deepspot", "deepspot"), ("noise_features", "regressors"),
                          ("eval_regressor", "regressors")):
        if rule.startswith(prefix):
            return stage
    return "eval"


def _fmt(value, spec: str) -> str:
    return value if isinstance(value, str) else format(value, spec)


def markdown_table(table: list[dict], sizes: list[int]) -> str:
    header = ("| rule | cohort | jobs | spots | peak RSS GB | RSS bytes/spot above base | base GB | wall s | "
              "time log-log slope | out bytes/spot | paper spots | projected peak GB | projected out GB | "
              "peak / mem_mb asked | wall / runtime asked |")
    lines = [header, "|" + "---|" * 15]
    for r in table:
        r = {k: ("-" if v is None else v) for k, v in r.items()}
        lines.append(f"| {r['rule']} | {r['cohort']} | {r['jobs'][0]} / {r['jobs'][1]} | {r['spots'][0]:,} / "
                     f"{r['spots'][1]:,} | {r['peak_rss_gb'][0]:.2f} / {r['peak_rss_gb'][1]:.2f} | "
                     f"{_fmt(r['rss_bytes_per_spot'], ',')} | {_fmt(r['rss_base_gb'], '.2f')} | "
                     f"{r['wall_s'][0]} / {r['wall_s'][1]} | "
                     f"{r['time_loglog_slope']} | {r['out_bytes_per_spot']:,} | {r['paper_spots']:,} | "
                     f"{_fmt(r['projected_peak_gb'], '.2f')} | {r['projected_out_gb']:.2f} | "
                     f"{_fmt(r.get('mem_of_request', '-'), '.2f')} | {_fmt(r.get('time_of_request', '-'), '.3f')} |")
    return "\n".join(lines)


def project_not_run(args: argparse.Namespace, run: dict) -> dict[str, Any] | None:
    """Tile stores and checkpoints of `--paper-config` (stmdit.disk_projection), the tile bytes per row
    measured on the larger run's SD3 latents of its test spots; None when that run has no latents."""
    from stmdit.config import load_config
    from stmdit.disk_projection import planned_outputs, projection, tile_bytes_per_row
    from stmdit.split_table import split_keys

    results = Path(run["work"]) / "results"
    latents = results / "features" / run["visium_cohort"] / "sd3_vae.zarr"
    split = results / "splits" / f"{run['visium_cohort']}.parquet"
    if not latents.exists() or not split.exists():
        return None
    bytes_per_row = tile_bytes_per_row(latents, split_keys(split, "test"), Path(run["work"]).parent)
    config = load_config(args.paper_config)
    outputs = planned_outputs(args.paper_config)
    return projection(config, outputs, bytes_per_row, PAPER_TEST_SPOTS, PAPER_OOD_SPOTS)


def cohort_of_sheet(sheet: Path) -> SimpleNamespace:
    """The cohort names and slides of a run's samples.tsv (what `--tabulate` needs of a ScaleCohort)."""
    import pandas as pd

    table = pd.read_csv(sheet, sep="\t")
    visium, he = table[table["kind"] == "visium"], table[table["kind"] == "he"]
    return SimpleNamespace(visium_cohort=str(visium["cohort"].iloc[0]), he_cohort=str(he["cohort"].iloc[0]),
                           visium_slides=visium["sample"].astype(str).tolist(), he_slides=he["sample"].astype(str).tolist(),
                           files={})


def measure_run(root: Path, size: int, phases: dict[str, float], cohort=None) -> dict[str, Any]:
    """One size's entry of the table, read from its run folder: spots, test spots, disk and each rule's
    rusage records joined with what Snakemake asked for the job."""
    import yaml

    if not (root / "rusage").is_dir():
        raise SystemExit(f"stmdit bench scale --tabulate: no run under {root}")
    cohort = cohort or cohort_of_sheet(root / "cohort" / "samples.tsv")
    config = yaml.safe_load((root / "bench.yaml").read_text())
    work = root / "work"
    return {"size": size, **{k: round(v, 1) for k, v in phases.items()}, "visium_cohort": cohort.visium_cohort,
            "work": str(work),
            "spots": cohort_spots(work, cohort), "test_spots": test_spots(work, cohort, config["sampler"]["ood_max_spots"]),
            "cohort_files": cohort.files, "disk_bytes": _path_bytes(root),
            "rules": collect(root / "rusage", work, (cohort.visium_cohort, cohort.he_cohort), root / "snakemake.log")}


@benchmark("scale", _arguments)
def bench_scale(args: argparse.Namespace) -> dict[str, Any]:
    """Each rule's exact peak RSS, time and output size through Snakemake at two cohort sizes, projected
    to the paper's counts."""
    import yaml

    from stmdit.scale_cohort import write_scale_cohort

    sizes = sorted({int(s) for s in str(args.sizes).split(",") if s.strip()})
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = stages - set(STAGES)
    if len(sizes) < 2 or unknown:
        raise SystemExit(f"stmdit bench scale: need two sizes or more (got {sizes}) and stages among {STAGES}"
                         f"{f' (unknown: {sorted(unknown)})' if unknown else ''}")
    args.out.mkdir(parents=True, exist_ok=True)
    lowered = {**LOWERED, **{("evaluate", key): args.n_boot for key in ("n_boot", "auc_n_boot", "null_n_perm")}}
    defaults = yaml.safe_load((REPO / "config.yaml").read_text())
    print(f"bench scale: sizes {sizes} Visium spots, stages {','.join(s for s in STAGES if s in stages)}, "
          f"{args.cores} cores, under {args.out}")
    print("  lowered for time: " + ", ".join(f"{a}.{b} {defaults[a].get(b)} -> {v}" for (a, b), v in lowered.items()))
    print("  paper shapes: " + ", ".join(f"{a}.{b} {v}" for (a, b), v in PAPER_SHAPES.items())
          + f", {args.genes:,} genes, image encoders {', '.join(IMAGE_ENCODERS)} (smoke, real output widths)")
    print("  generated tiles: copies of the real features of the test spots, permuted among them (no diffusion model"
          " trained or sampled)")
    print("  not run: train, tiles, perturbed-tiles (their stores and checkpoints are projected from the plan of "
          f"{args.paper_config.relative_to(REPO) if args.paper_config.is_relative_to(REPO) else args.paper_config})")
    measured = []
    for size in sizes:
        root = args.out / f"n{size}"
        work, rusage, log = root / "work", root / "rusage", root / "snakemake.log"
        if args.tabulate:
            measured.append(measure_run(root, size, phases={}))
            continue
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        he_spots = round(size * PAPER_HE_SPOTS / PAPER_VISIUM_SPOTS)
        cohort = write_scale_cohort(root / "cohort", size, he_spots, args.source_image, n_genes=args.genes,
                                    he_gigapixels=args.he_gigapixels, tile=args.tile,
                                    log=lambda message: print(message, flush=True))
        generate_s = time.perf_counter() - started
        print(f"size {size:,}: cohort written in {generate_s:.0f} s ({len(cohort.visium_slides)} Visium slides over "
              f"{len(cohort.donors)} donors, {cohort.visium_spots:,} spots in tissue; {len(cohort.he_slides)} H&E-only "
              f"slides of {cohort.files['he_40x.tif']['gigapixels']} gigapixels)", flush=True)
        config = bench_config(cohort, lowered)
        config_path = root / "bench.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        phases = {"data_s": run_snakemake(work, config_path, stage_targets(cohort, stages), args.cores, rusage, log)}
        if "eval" in stages:
            started = time.perf_counter()
            copies = write_generated_copies(work, config, cohort)
            phases["copies_s"] = time.perf_counter() - started
            targets = [f"results/tables/table{n}.md" for n in range(1, 6)]
            phases["eval_s"] = run_snakemake(work, config_path, targets, args.cores, rusage, log, EVAL_RULES)
            print(f"  generated-feature copies: {len(copies)} stores in {phases['copies_s']:.0f} s")
        entry = measure_run(root, size, {"generate_s": generate_s, **phases}, cohort)
        print("  snakemake: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
              + f"; {entry['disk_bytes'] / 1e9:.2f} GB on disk", flush=True)
        measured.append(entry)
    table = scale_table(measured, measured[-1]["visium_cohort"])
    projected_out = sum(r["projected_out_gb"] for r in table)
    not_run = project_not_run(args, measured[-1])
    total = projected_out + (not_run["tile_stores_gb"] if not_run else 0.0)
    result = {"benchmark": "scale", "sizes": sizes, "stages": sorted(stages), "cores": args.cores,
              "lowered": {f"{a}.{b}": v for (a, b), v in lowered.items()}, "table": table,
              "projected_disk_gb_measured_rules": round(projected_out, 1), "not_run_projected": not_run,
              "projected_disk_gb_without_checkpoints": round(total, 1),
              "runs": [{k: v for k, v in m.items() if k != "rules"} for m in measured]}
    markdown = markdown_table(table, sizes)
    footer = (f"\nProjected disk at the paper's counts ({PAPER_VISIUM_SPOTS:,} Visium spots, {PAPER_HE_SPOTS:,} "
              f"H&E-only pseudo-spots): {projected_out:.1f} GB of the measured rules' outputs.\n"
              + (describe_projection(not_run, args.paper_config) + "\n" if not_run else "")
              + f"Everything but the training checkpoints: {total:.1f} GB (limit {DISK_LIMIT_GB} GB)"
              + (f"; the checkpoints {not_run['checkpoints_gb'] + not_run['ema_weights_gb']:.1f} GB.\n" if not_run
                 else ".\n")
              + 
              "RSS per spot above base: (peak at the larger size - peak at the smaller) / spot difference (0, and the "
              "larger peak as the base, when the larger size peaked lower: noise); spots "
              "rows are per slide job (projected to a paper slide); fid and auc rows per test spot (projected to the "
              f"paper's {PAPER_TEST_SPOTS:,}), ood_fid per spot of its subsample (capped at sampler.ood_max_spots, "
              f"projected to {PAPER_OOD_SPOTS:,}); other rows per cohort.")
    print(markdown + footer)
    (args.out / "scale.md").write_text(markdown + "\n" + footer + "\n")
    (args.out / "scale.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"written: {args.out / 'scale.json'}, {args.out / 'scale.md'}")
    return result
