# Config and sample-sheet validation (at parse time, before any job runs) and target lists.
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from stmdit.config import (
    check_cohorts,
    check_renamed_results,
    check_test_donors,
    cohort_samples,
    cohorts,
    counts_file,
    expression_cohorts,
    load_sample_sheet,
    resolve_cohorts,
    validate_config,
)
from stmdit import job_resources
from stmdit.hest import sample_files as hest_sample_files
from stmdit.errors import InputError
from stmdit.models_config import model_rows, resolve_models, skipped_models
from stmdit.provenance import params_hash

# Rules run the checkout's own code (python -m stmdit) in whichever environment runs the job:
# the project's .venv, or a per-rule conda env from envs/ (--sdm conda).
# (braces doubled twice: once for this f-string, once for Snakemake's own formatting)
shell.prefix(f"set -euo pipefail; export PYTHONPATH='{workflow.basedir}/src'${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")

CONDA_CPU = "../../envs/cpu.yaml"
CONDA_GPU = "../../envs/gpu.yaml"
DEMO_ROOT = "results/resources/demo"

CONFIG_SOURCE = "config (config.yaml, or the --configfile files, and --config)"
try:
    config = validate_config(config, source=CONFIG_SOURCE)
    check_renamed_results(sys.argv[1:])  # the targets: Snakemake sets its DAG's only after parsing this file
    SAMPLES = load_sample_sheet(config["samples"])
    check_cohorts(SAMPLES, config["samples"])
    TRAIN_COHORT, OOD_COHORTS, _notes = resolve_cohorts(config, SAMPLES, config["samples"])
    config["train"]["cohort"], config["train"]["ood_cohorts"] = TRAIN_COHORT, OOD_COHORTS
    check_test_donors(config, SAMPLES, TRAIN_COHORT, CONFIG_SOURCE)
    MODELS = resolve_models(config)
except InputError as err:
    sys.exit(f"stmdit: error: {err}")
for _skipped in skipped_models(config).values():
    print(f"stmdit: {_skipped}", file=sys.stderr)


def preflight_weights():
    """`stmdit preflight` on this configuration: bad weights stop the run before any job starts."""
    real = any(e.get("impl") == "real" for e in config["features"]["encoders"].values())
    if not real and not any(m.pretrained for m in MODELS.values()):
        return
    from stmdit.preflight import check_config, format_table

    checks = check_config(config)
    if any(c.failed for c in checks):
        print(format_table(checks), file=sys.stderr)
        raise WorkflowError("stmdit preflight: weights do not match the configuration (table above); "
                            "fix them, or run `stmdit preflight CONFIG...` to check again")


onstart:
    preflight_weights()


for _note in _notes:
    logger.info(f"stmdit: {_note}")

COHORTS = cohorts(SAMPLES)
EXPRESSION_COHORTS = expression_cohorts(SAMPLES)
IMAGE_ENCODERS = config["features"]["image_encoders"]
SAMPLE_PATTERN = "|".join(map(re.escape, SAMPLES["sample"]))
COHORT_PATTERN = "|".join(map(re.escape, COHORTS))
IMAGE_ENCODER_PATTERN = "|".join(IMAGE_ENCODERS)
CONFIG_HASH = params_hash(config)

# --- models, sampling, evaluation -------------------------------------------------------------
PROTEIN_CODING_LIST = config["gene_sets"]["protein_coding"]
_needs_list = [k for k in ("midnight_mlp", "deepspot") if config["gene_sets"][k] == "protein_coding"]
if PROTEIN_CODING_LIST == "none" and _needs_list:
    sys.exit(f"stmdit: error: config key gene_sets.protein_coding = 'none', but gene_sets.{_needs_list[0]} = "
             "'protein_coding' needs a list: give hgnc or a file, or set midnight_mlp: all and deepspot: hvg")
if PROTEIN_CODING_LIST not in ("hgnc", "none") and not Path(PROTEIN_CODING_LIST).is_file():
    sys.exit(f"stmdit: error: config key gene_sets.protein_coding = {PROTEIN_CODING_LIST!r}: file not found")
if TRAIN_COHORT not in EXPRESSION_COHORTS:
    sys.exit(f"stmdit: error: config key train.cohort = {TRAIN_COHORT!r}: not a Visium cohort")
GE_MODELS = [m for m in MODELS.values() if m.uses_ge]
PTPL_COHORTS = list(dict.fromkeys(
    ([TRAIN_COHORT] if any(m.ptpl for m in MODELS.values()) else []) + (OOD_COHORTS if GE_MODELS else [])
))
MODEL_PATTERN = "|".join(map(re.escape, MODELS))
SAMPLE_STORES = ("uni_ge", "uni", "ge", "uncond", "uni_ge_visium", "perturbation", "perturbation_uni_null")
EVAL_ENCODERS = ("h0mini", "uni2h", "midnight")


def sample_row(sample):
    return SAMPLES.loc[sample]


def spots_inputs(wildcards):
    """The raw files of one slide (the demo slides are made by demo_data)."""
    row = sample_row(wildcards.sample)
    if row["kind"] == "he":
        files = {"slide": row["path"]}
    elif row["kind"] == "hest":
        files = {name: str(path) for name, path in hest_sample_files(row["path"], row["sample"]).items()}
        if row["labels"]:
            files["labels"] = row["labels"]
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


def spots_of(cohort):
    return [f"results/spots/{s}.parquet" for s in cohort_samples(SAMPLES, cohort)]


# --- resources: mem_mb and runtime from the inputs' sizes (formulas: stmdit.job_resources) -----
def job_mem_mb(rule_name):
    return job_resources.mem_mb(rule_name)


def job_runtime(rule_name):
    return job_resources.runtime(rule_name)


# --- slide lists: cohort rules read `@results/lists/{cohort}/{kind}.txt` (one path a line) ------
# rather than every slide's path on the command line (1,000 slides would pass the kernel's limit
# on one argument). The list's rule reruns when the list changes (params), and its consumers with
# it; the slides' own files stay the consumers' inputs, so their changes rerun them too.
LIST_KINDS = ("spots", "patches", "matrices")


def cohort_paths(cohort, kind):
    samples = cohort_samples(SAMPLES, cohort)
    if kind == "spots":
        return spots_of(cohort)
    if kind == "patches":
        return [f"results/patches/{s}.zarr" for s in samples]
    if kind == "matrices":
        return [counts_file(SAMPLES.loc[s]) for s in samples]
    raise ValueError(kind)


def cohort_list(kind, cohort=None):
    """The list file of a cohort's `kind` paths: of `cohort`, else of the job's {cohort}."""
    return f"results/lists/{cohort}/{kind}.txt" if cohort else f"results/lists/{{cohort}}/{kind}.txt"


def cohort_spots(wildcards):
    return spots_of(wildcards.cohort)


def cohort_patches(wildcards):
    return cohort_paths(wildcards.cohort, "patches")


def cohort_matrices(wildcards):
    return cohort_paths(wildcards.cohort, "matrices")


def encoder_flags(entry, prefix="", bf16=False, variant=False):
    """CLI flags of one encoder's config entry, for a command that names them --{prefix}impl,
    --{prefix}weights, --{prefix}arch-json; --variant and --bf16 only for the commands that take them,
    --allow-hub from features.allow_hub."""
    args = [f"--{prefix}impl {entry['impl']}"]
    if entry.get("weights"):
        args.append(f"--{prefix}weights '{entry['weights']}'")
    if entry.get("arch"):
        args.append(f"--{prefix}arch-json '{json.dumps(entry['arch'])}'")
    if variant and entry.get("variant"):
        args.append(f"--variant {entry['variant']}")
    if config["features"]["allow_hub"]:
        args.append("--allow-hub")
    if bf16:
        args.append("--bf16" if config["features"]["bf16"] else "--no-bf16")
    return " ".join(args)


def encoder_args(name):
    """`stmdit features` flags of one encoder's config entry."""
    return encoder_flags(encoder_entry(name), bf16=True, variant=True)


def cancerfoundation_args():
    """`stmdit features --encoder cancerfoundation` flags: the encoder's, and max_genes, seed,
    gene_selection and l2_normalize where the config sets them (unset: the command's defaults)."""
    entry = encoder_entry("cancerfoundation")
    args = [encoder_args("cancerfoundation")]
    for key in ("max_genes", "seed", "gene_selection"):
        if entry.get(key) is not None:
            args.append(f"--{key.replace('_', '-')} {entry[key]}")
    if entry.get("l2_normalize") is not None:
        args.append("--l2-normalize" if entry["l2_normalize"] else "--no-l2-normalize")
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
    targets += expand("results/models/{model}/ema.safetensors", model=trained_models())
    targets += expand("results/tables/table{n}.md", n=TABLES)
    targets += expand("results/eval/{model}/{cohort}/{check}.json", model=list(MODELS), cohort=[TRAIN_COHORT],
                      check=["palette", "texture", "layout"])
    targets += report_figures()
    targets += virtual_targets()
    return targets


def encoder_entry(name):
    return config["features"]["encoders"].get(name, {"impl": "smoke"})


def model_dir(model):
    m = MODELS[model]
    return m.pretrained if m.pretrained else f"results/models/{model}"


def model_weights(wildcards):
    m = MODELS[wildcards.model]
    if m.pretrained_format == "pixcell":  # PixCell's diffusers layout (transformer/ under the release root)
        root = Path(m.pretrained)
        folder = root if (root / "config.json").is_file() else root / "transformer"
        return str(folder / "diffusion_pytorch_model.safetensors")
    return f"{model_dir(wildcards.model)}/ema.safetensors"


def tiles_ge_store(model, cohort, store):
    """The GE features a model is sampled with: its own source on the training cohort (Visium
    for `uni_ge_visium`, the Table 6 swap), DeepSpot predictions on H&E-only cohorts."""
    m = MODELS[model]
    if not m.uses_ge:
        return None
    if cohort in OOD_COHORTS:
        name = "cancerfoundation_ptpl"
    elif store == "uni_ge_visium":
        name = "cancerfoundation"
    else:
        name = m.ge_store
    return f"results/features/{cohort}/{name}.zarr"


def tiles_inputs(wildcards):
    files = {
        "weights": model_weights(wildcards),
        "split": f"results/splits/{wildcards.cohort}.parquet",
        "uni": f"results/features/{wildcards.cohort}/uni2h.zarr",
    }
    ge = tiles_ge_store(wildcards.model, wildcards.cohort, wildcards.store)
    if ge:
        files["ge"] = ge
    return files


def vae_args():
    return encoder_flags(encoder_entry("sd3_vae"), prefix="vae-")


def config_flags(section, skip=()):
    """A config section as its command's flags, each key as --key-with-dashes: a list gives its items
    quoted, true the bare flag, false --no-key (booleans are argparse BooleanOptionalAction, so either
    value is explicit), null nothing. Every key of the section (but `skip`) must be an option of the
    command, so a key added to the schema reaches the command without a rule edit."""
    args = []
    for key, value in section.items():
        if key in skip or value is None:
            continue
        flag = f"--{key.replace('_', '-')}"
        if value is False:
            args.append(f"--no-{key.replace('_', '-')}")
        elif value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args.append(" ".join([flag, *(f"'{item}'" for item in value)]))
        else:
            args.append(f"{flag} {value}")
    return " ".join(args)


def perturbation_args():
    """`evaluate.perturbation` as perturbed-tiles' flags (its seed is the series' own, not the sampler's)."""
    settings = config["evaluate"]["perturbation"]
    pairs = ",".join(f"{a}:{b}" for a, b in settings["pairs"])
    return (f"--pairs '{pairs}' --alphas {','.join(str(a) for a in settings['alphas'])} --n-ref {settings['n_ref']}"
            f" --seed {settings['seed']} --mode {settings['mode']}")


def sampler_args(seed=True):
    """The `sampler:` section as the flags of every command that generates tiles (tiles,
    perturbed-tiles, virtual-tiles); perturbed-tiles passes its own --seed (evaluate.perturbation.seed)
    and only the tiles rule subsamples H&E-only cohorts (ood_max_spots, ood_seed)."""
    return config_flags(config["sampler"], skip=("ood_max_spots", "ood_seed") + (() if seed else ("seed",)))


def regime_stores(model, cohort, encoder):
    """--generated arguments: regime=eval feature store of each regime the model is sampled in."""
    regimes = MODELS[model].regimes
    if cohort in OOD_COHORTS:
        regimes = [r for r in regimes if r in ("uni_ge", "uni")]
    return {r: f"results/eval/{model}/{cohort}/{r}_{encoder}.zarr" for r in regimes}


def regime_tiles(wildcards):
    """regime -> the tile store of each regime the model is sampled in, on the cohort."""
    return {r: f"results/tiles/{wildcards.model}/{wildcards.cohort}/{r}.zarr" for r in MODELS[wildcards.model].regimes}


def pairs_arg(mapping):
    return " ".join(f"{k}={v}" for k, v in mapping.items())


def models_in_table(n):
    return [m for m in MODELS.values() if n in m.tables]


def table_evals(n):
    """The evaluation JSONs table n is built from."""
    if n in (1, 4):
        return [f"results/eval/{m.model}/{TRAIN_COHORT}/fid.json" for m in models_in_table(n)]
    if n == 2:
        return [f"results/eval/{m.model}/{TRAIN_COHORT}/auc.json" for m in models_in_table(n)]
    if n == 3:
        models = {m.model for m in models_in_table(3)} | {m.baseline for m in models_in_table(3) if m.baseline}
        return [f"results/eval/{m}/{c}/ood_fid.json" for c in OOD_COHORTS for m in MODELS if m in models]
    if n == 5:
        files = []
        for m in models_in_table(5):
            if m.uses_ge:
                files.append(f"results/eval/{m.model}/{TRAIN_COHORT}/perturbation.json")
                if m.perturbation_uni_null:
                    files.append(f"results/eval/{m.model}/{TRAIN_COHORT}/perturbation_uni_null.json")
        return files
    if n == 6:
        return [f"results/eval/{m.model}/{TRAIN_COHORT}/swap_fid.json" for m in models_in_table(6) if m.ptpl]
    raise ValueError(n)


TABLES = [n for n in range(1, 7) if table_evals(n)]


def trained_models():
    return [m.model for m in MODELS.values() if m.trained]


def eval_encoder_args(wildcards):
    return encoder_flags(encoder_entry(wildcards.encoder), bf16=True)


def regressor_fit_args(wildcards):
    """The CLI flags of one regressor's fit: the Oracle's PCA, or the MLP's size, impl and device."""
    evaluate = config["evaluate"]
    if wildcards.regressor == "oracle":
        return f"--pca {evaluate['pca']}"
    mlp = evaluate["midnight_mlp"]
    return (f"--mlp-hidden {','.join(map(str, evaluate['mlp_hidden']))} --mlp-max-iter {evaluate['mlp_max_iter']}"
            f" --mlp-impl {mlp['impl']} --device {mlp['device']} --midnight-genes {config['gene_sets']['midnight_mlp']}")


def regressor_features(wildcards):
    """The real-tile features a regressor is fitted on: UNI2-h (Oracle) or Midnight (Midnight+MLP)."""
    encoder = "uni2h" if wildcards.regressor == "oracle" else "midnight"
    return f"results/features/{wildcards.cohort}/{encoder}.zarr"


def regressor_gpus(wildcards):
    """1 for the Midnight+MLP fitted in torch on a GPU, else 0."""
    mlp = config["evaluate"]["midnight_mlp"]
    return int(wildcards.regressor == "midnight_mlp" and mlp["impl"] == "torch" and mlp["device"] != "cpu")


def matched_spot_stores():
    """model -> the tile store of the matched-spot figure: every column conditioned on the same
    Visium GE (PTPL models: their uni_ge_visium tiles), UNI-only models in their uni regime."""
    stores = {}
    for model, m in MODELS.items():
        store = "uni" if not m.uses_ge else ("uni_ge_visium" if m.ptpl else "uni_ge")
        stores[model] = f"results/tiles/{model}/{TRAIN_COHORT}/{store}.zarr"
    return stores


def report_figures():
    figures = expand("results/figures/grid_{model}_{cohort}.png", model=list(MODELS), cohort=[TRAIN_COHORT])
    if MODELS:
        figures.append("results/figures/matched_spots.png")
    figures += expand("results/figures/loss_curves/{model}.png", model=trained_models())
    if table_evals(1) or table_evals(4):
        figures.append("results/figures/per_tissue_fid.png")
    if table_evals(2):
        figures.append("results/figures/auc_curves.png")
    return figures


# --- virtual tissue experiments (rules in virtual.smk) ------------------------------------------
VIRTUAL = config["virtual"]
VIRTUAL_EXPERIMENTS = VIRTUAL["experiments"]
VIRTUAL_SPEC_KEYS = ("regime", "split", "slides", "spots", "max_spots", "edit", "doses", "control", "s_uni", "s_ge")


def check_virtual_experiments():
    """Parse-time checks the rules need (the rest: `stmdit virtual-tiles`, before any sampling)."""
    for name, entry in VIRTUAL_EXPERIMENTS.items():
        where = f"config key virtual.experiments.{name}"
        if entry["model"] not in MODELS:
            sys.exit(f"stmdit: error: {where}.model = {entry['model']!r}: not a model of this configuration "
                     f"(models: {', '.join(MODELS)})")
        if not MODELS[entry["model"]].uses_ge:
            sys.exit(f"stmdit: error: {where}.model = {entry['model']!r} is UNI-only (fusion none): a gene-expression "
                     "edit cannot reach it")
        cohort = entry.get("cohort") or TRAIN_COHORT
        if cohort not in EXPRESSION_COHORTS:
            sys.exit(f"stmdit: error: {where}.cohort = {cohort!r}: not a Visium cohort (needs expression to edit)")


check_virtual_experiments()


def virtual_cohort(experiment):
    return VIRTUAL_EXPERIMENTS[experiment].get("cohort") or TRAIN_COHORT


def virtual_spec_json(experiment):
    entry = VIRTUAL_EXPERIMENTS[experiment]
    spec = {k: entry[k] for k in VIRTUAL_SPEC_KEYS if entry.get(k) is not None}
    spec.update(seed=VIRTUAL["seed"], gene_sets=VIRTUAL["gene_sets"])
    return json.dumps(spec, sort_keys=True)


def virtual_inputs(wildcards):
    entry = VIRTUAL_EXPERIMENTS[wildcards.experiment]
    cohort = virtual_cohort(wildcards.experiment)
    return {
        "weights": model_weights(SimpleNamespace(model=entry["model"])),
        "split": f"results/splits/{cohort}.parquet",
        "expression": f"results/expression/{cohort}.h5ad",
        "uni": f"results/features/{cohort}/uni2h.zarr",
        "ge": f"results/features/{cohort}/cancerfoundation.zarr",
        "spots": spots_of(cohort),
        "spots_list": cohort_list("spots", cohort),
    }


def virtual_h0mini_args():
    """The configured H0-mini (features.encoders.h0mini) as virtual-report flags."""
    return encoder_flags(encoder_entry("h0mini"), prefix="h0mini-")


def virtual_targets():
    return [f"results/virtual/{e}/{f}" for e in VIRTUAL_EXPERIMENTS for f in ("summary.json", "montage.png")]
