# Virtual tissue experiments (config `virtual`, stmdit.virtual): for each named experiment, the
# chosen spots generated unedited, edited (every dose) and with the control edit from the same
# noise, then the change per spot, its summary, a mosaic per slide and the dose-response montage.

VIRTUAL = config["virtual"]
VIRTUAL_EXPERIMENTS = VIRTUAL["experiments"]
VIRTUAL_SPEC_KEYS = ("regime", "split", "slides", "spots", "max_spots", "edit", "doses", "control", "s_uni", "s_ge")


def check_virtual_experiments():
    """Parse-time checks the rules need (the rest: `stmdit virtual-sample`, before any sampling)."""
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
        "weights": model_weights(argparse_namespace(model=entry["model"])),
        "split": f"results/splits/{cohort}.parquet",
        "expression": f"results/expression/{cohort}.h5ad",
        "uni": f"results/features/{cohort}/uni2h.zarr",
        "ge": f"results/features/{cohort}/cancerfoundation.zarr",
        "spots": spots_of(cohort),
    }


def argparse_namespace(**values):
    from types import SimpleNamespace

    return SimpleNamespace(**values)


def virtual_h0mini_args():
    """The configured H0-mini (features.encoders.h0mini) as virtual-report flags."""
    entry = encoder_entry("h0mini")
    args = [f"--h0mini-impl {entry['impl']}"]
    if entry.get("weights"):
        args.append(f"--h0mini-weights '{entry['weights']}'")
    if entry.get("arch"):
        args.append(f"--h0mini-arch-json '{json.dumps(entry['arch'])}'")
    if config["features"]["allow_hub"]:
        args.append("--allow-hub")
    return " ".join(args)


def virtual_targets():
    return [f"results/virtual/{e}/{f}" for e in VIRTUAL_EXPERIMENTS for f in ("summary.json", "montage.png")]


rule virtual_sample:
    input:
        unpack(virtual_inputs),
    output:
        directory("results/virtual/{experiment}/tiles.zarr"),
    params:
        model_dir=lambda wildcards: model_dir(VIRTUAL_EXPERIMENTS[wildcards.experiment]["model"]),
        spec=lambda wildcards: virtual_spec_json(wildcards.experiment),
        vae=vae_args(),
        steps=config["sample"]["steps"],
        seed=config["sample"]["seed"],
        s_uni=config["sample"]["s_uni"],
        s_ge=config["sample"]["s_ge"],
        batch_size=config["sample"]["batch_size"],
        device=config["sample"]["device"],
        bf16="--bf16" if config["sample"]["bf16"] else "",
    wildcard_constraints:
        experiment="|".join(map(re.escape, VIRTUAL_EXPERIMENTS)) or "$^",
    log:
        "results/virtual/{experiment}/tiles.log",
    benchmark:
        "results/benchmarks/virtual/{experiment}/sample.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wildcards, attempt: 16000 * attempt,
        runtime=lambda wildcards, attempt: 120 * attempt,
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit virtual-sample --name {wildcards.experiment} --experiment-json '{params.spec}'"
        " --model-dir {params.model_dir} --split {input.split} --expression {input.expression}"
        " --uni {input.uni} --ge {input.ge} --spots {input.spots} {params.vae}"
        " --steps {params.steps} --seed {params.seed} --s-uni {params.s_uni} --s-ge {params.s_ge}"
        " --batch-size {params.batch_size} --device {params.device} {params.bf16} --out {output} > {log} 2>&1"


rule virtual_report:
    input:
        tiles="results/virtual/{experiment}/tiles.zarr",
        spots=lambda wildcards: spots_of(virtual_cohort(wildcards.experiment)),
        patches=lambda wildcards: [f"results/patches/{s}.zarr"
                                   for s in cohort_samples(SAMPLES, virtual_cohort(wildcards.experiment))],
    output:
        summary=report("results/virtual/{experiment}/summary.json", category="Virtual experiments",
                       subcategory="{experiment}", caption="../report/virtual_summary.rst"),
        mosaics=report(directory("results/virtual/{experiment}/mosaics"), patterns=["{slide}.png"],
                       category="Virtual experiments", subcategory="{experiment}",
                       caption="../report/virtual_mosaic.rst"),
        mosaics_zarr=directory("results/virtual/{experiment}/mosaics.zarr"),
        montage=report("results/virtual/{experiment}/montage.png", category="Virtual experiments",
                       subcategory="{experiment}", caption="../report/virtual_montage.rst"),
    params:
        h0mini=virtual_h0mini_args(),
        n_boot=VIRTUAL["n_boot"],
        seed=VIRTUAL["seed"],
        tile_px=VIRTUAL["mosaic_tile_px"],
        montage_tile_px=VIRTUAL["montage_tile_px"],
        per_class=VIRTUAL["montage_per_class"],
        device=config["sample"]["device"],
    wildcard_constraints:
        experiment="|".join(map(re.escape, VIRTUAL_EXPERIMENTS)) or "$^",
    log:
        "results/virtual/{experiment}/report.log",
    benchmark:
        "results/benchmarks/virtual/{experiment}/report.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit virtual-report --tiles {input.tiles} --spots {input.spots} --patches {input.patches}"
        " {params.h0mini} --device {params.device} --n-boot {params.n_boot} --seed {params.seed}"
        " --tile-px {params.tile_px} --montage-tile-px {params.montage_tile_px} --per-class {params.per_class}"
        " --summary {output.summary} --mosaics {output.mosaics} --mosaics-zarr {output.mosaics_zarr}"
        " --montage {output.montage} > {log} 2>&1"
