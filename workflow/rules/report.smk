# The paper's tables and the figures, built from the evaluation JSONs only. Each table has its own
# target rule (`snakemake table2`, or `snakemake results/tables/table2.md`).


rule models_json:
    output:
        "results/tables/models.json",
    params:
        rows=json.dumps(model_rows(MODELS), sort_keys=True),
    log:
        "results/tables/models.log",
    threads: 1
    resources:
        mem_mb=job_mem_mb("models_json"),
        runtime=job_runtime("models_json"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit models-json --rows '{params.rows}' --out {output} > {log} 2>&1"


for _n in range(1, 7):

    rule:
        name:
            f"table{_n}"
        input:
            evals=table_evals(_n),
            models="results/tables/models.json",
        output:
            tsv=report(f"results/tables/table{_n}.tsv", category="Tables"),
            md=f"results/tables/table{_n}.md",
        params:
            n=_n,
            config_hash=CONFIG_HASH,
        log:
            f"results/tables/table{_n}.log",
        threads: 1
        resources:
            mem_mb=job_mem_mb("table"),
            runtime=job_runtime("table"),
        conda:
            CONDA_CPU
        shell:
            "python -m stmdit table --n {params.n} --evals {input.evals} --models-json {input.models}"
            " --out-tsv {output.tsv} --out-md {output.md} --config-hash {params.config_hash} > {log} 2>&1"


rule figure_per_tissue_fid:
    input:
        evals=table_evals(1) or table_evals(4),
        models="results/tables/models.json",
    output:
        report("results/figures/per_tissue_fid.png", category="Figures", caption="../report/per_tissue_fid.rst"),
    log:
        "results/figures/per_tissue_fid.log",
    threads: 1
    resources:
        mem_mb=job_mem_mb("figure_per_tissue_fid"),
        runtime=job_runtime("figure_per_tissue_fid"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit figure --kind per-tissue-fid --evals {input.evals} --models-json {input.models}"
        " --out {output} > {log} 2>&1"


rule figure_auc_curves:
    input:
        evals=table_evals(2),
        models="results/tables/models.json",
    output:
        report("results/figures/auc_curves.png", category="Figures", caption="../report/auc_curves.rst"),
    log:
        "results/figures/auc_curves.log",
    threads: 1
    resources:
        mem_mb=job_mem_mb("figure_auc_curves"),
        runtime=job_runtime("figure_auc_curves"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit figure --kind auc-curves --evals {input.evals} --models-json {input.models}"
        " --out {output} > {log} 2>&1"


rule figure_matched_spots:
    input:
        ge=f"results/features/{TRAIN_COHORT}/cancerfoundation.zarr",
        split=f"results/splits/{TRAIN_COHORT}.parquet",
        expression=f"results/expression/{TRAIN_COHORT}.h5ad",
        patches=cohort_paths(TRAIN_COHORT, "patches"),
        patches_list=cohort_list("patches", TRAIN_COHORT),
        tiles=list(matched_spot_stores().values()),
    output:
        report("results/figures/matched_spots.png", category="Figures", caption="../report/matched_spots.rst"),
    params:
        tiles=" ".join(f"{model}={path}" for model, path in matched_spot_stores().items()),
        vae=vae_args(),
        seed=config["evaluate"]["seed"],
    log:
        "results/figures/matched_spots.log",
    threads: 1
    resources:
        mem_mb=job_mem_mb("figure_matched_spots"),
        runtime=job_runtime("figure_matched_spots"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit matched-spots --ge {input.ge} --split {input.split} --expression {input.expression}"
        " --patches @{input.patches_list} --tiles {params.tiles} {params.vae} --n-clusters 8 --seed {params.seed}"
        " --out {output} > {log} 2>&1"


rule figure_loss_curve:
    input:
        weights="results/models/{model}/ema.safetensors",
    output:
        report("results/figures/loss_curves/{model}.png", category="Figures", subcategory="Training",
               caption="../report/loss_curve.rst"),
    params:
        train_log=lambda wildcards: f"results/models/{wildcards.model}/train_log.csv",
        training_json=lambda wildcards: f"results/models/{wildcards.model}/training.json",
        name=lambda wildcards: MODELS[wildcards.model].name,
    log:
        "results/figures/loss_curves/{model}.log",
    threads: 1
    resources:
        mem_mb=job_mem_mb("figure_loss_curve"),
        runtime=job_runtime("figure_loss_curve"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit loss-curve --train-log {params.train_log} --training-json {params.training_json}"
        " --name '{params.name}' --out {output} > {log} 2>&1"
