# Sampling: the four regimes of every model on its training cohort's test split (and, for PTPL
# models, uni_ge with Visium GE: the Table 6 swap), the seeded OOD subsample of H&E-only cohorts,
# the perturbation series of Table 5, and a real-vs-generated grid per model.


rule tiles:
    input:
        unpack(tiles_inputs),
    output:
        directory("results/tiles/{model}/{cohort}/{store}.zarr"),
    params:
        model_dir=lambda wildcards: model_dir(wildcards.model),
        ge=lambda wildcards, input: f"--ge {input.ge}" if "ge" in input.keys() else "",
        regime=lambda wildcards: "uni_ge" if wildcards.store == "uni_ge_visium" else wildcards.store,
        subsample=lambda wildcards: (
            f"--max-spots {config['sampler']['ood_max_spots']} --subsample-seed {config['sampler']['ood_seed']}"
            if wildcards.cohort in OOD_COHORTS else ""
        ),
        vae=vae_args(),
        sampler=sampler_args(),
    wildcard_constraints:
        store="uni_ge|uni|ge|uncond|uni_ge_visium",
    log:
        "results/tiles/{model}/{cohort}/{store}.log",
    benchmark:
        "results/benchmarks/tiles/{model}/{cohort}/{store}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=job_mem_mb("tiles"),
        runtime=job_runtime("tiles"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit tiles --model-dir {params.model_dir} --split {input.split} --split-name test"
        " {params.subsample} --uni {input.uni} {params.ge} {params.vae} --regime {params.regime}"
        " {params.sampler} --out {output} > {log} 2>&1"


rule perturbed_tiles:
    input:
        weights=model_weights,
        split="results/splits/{cohort}.parquet",
        expression="results/expression/{cohort}.h5ad",
        uni="results/features/{cohort}/uni2h.zarr",
        ge=lambda wildcards: tiles_ge_store(wildcards.model, wildcards.cohort, "uni_ge"),
    output:
        directory("results/tiles/{model}/{cohort}/{store}.zarr"),
    params:
        model_dir=lambda wildcards: model_dir(wildcards.model),
        uni_null=lambda wildcards: "--uni-null" if wildcards.store == "perturbation_uni_null" else "",
        perturbation=perturbation_args(),
        vae=vae_args(),
        sampler=sampler_args(seed=False),
    wildcard_constraints:
        store="perturbation|perturbation_uni_null",
    log:
        "results/tiles/{model}/{cohort}/{store}.log",
    benchmark:
        "results/benchmarks/perturbed_tiles/{model}/{cohort}/{store}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=job_mem_mb("perturbed_tiles"),
        runtime=job_runtime("perturbed_tiles"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit perturbed-tiles --model-dir {params.model_dir} --split {input.split}"
        " --expression {input.expression} --uni {input.uni} --ge {input.ge} {params.perturbation} {params.uni_null}"
        " {params.vae} {params.sampler} --out {output} > {log} 2>&1"


rule tile_grid:
    input:
        spots=cohort_spots,
        patches=cohort_patches,
        spots_list=cohort_list("spots"),
        patches_list=cohort_list("patches"),
        tiles=lambda wildcards: list(regime_tiles(wildcards).values()),
        latents="results/features/{cohort}/sd3_vae.zarr",
    output:
        report("results/figures/grid_{model}_{cohort}.png", category="Samples",
               caption="../report/grid.rst"),
    params:
        tiles=lambda wildcards: pairs_arg(regime_tiles(wildcards)),
        vae=vae_args(),
    log:
        "results/figures/grid_{model}_{cohort}.log",
    threads: 1
    resources:
        mem_mb=job_mem_mb("tile_grid"),
        runtime=job_runtime("tile_grid"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit tile-grid --spots @{input.spots_list} --patches @{input.patches_list} --tiles {params.tiles}"
        " --latents {input.latents} {params.vae} --per-class 4 --seed 0 --out {output} > {log} 2>&1"
