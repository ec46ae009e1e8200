# DeepSpot pseudo-labels (PTPL): trained on the training cohort's train split (leave-one-donor-out over
# its training donors; the test donors and other cohorts get the model of all training donors), predicted
# for every cohort whose GE must come from DeepSpot, then embedded by CancerFoundation.


rule deepspot_train:
    input:
        expression=f"results/expression/{TRAIN_COHORT}.h5ad",
        features=f"results/features/{TRAIN_COHORT}/deepspot_fm.zarr",
        spots=spots_of(TRAIN_COHORT),
        spots_list=cohort_list("spots", TRAIN_COHORT),
        split=f"results/splits/{TRAIN_COHORT}.parquet",
    output:
        model=directory(f"results/ptpl/{TRAIN_COHORT}_deepspot"),
        lodo=f"results/ptpl/{TRAIN_COHORT}_lodo.json",
    params:
        settings=" ".join([
            f"--genes {config['gene_sets']['deepspot']}",
            f"--epochs {config['deepspot']['epochs']} --batch-size {config['deepspot']['batch_size']}",
            f"--n-ensemble {config['deepspot']['n_ensemble']} --hidden-dim {config['deepspot']['hidden_dim']}",
            f"--dropout {config['deepspot']['dropout']} --lr {config['deepspot']['lr']}",
            f"--weight-decay {config['deepspot']['weight_decay']} --seed {config['deepspot']['seed']}",
            "--standardize" if config["deepspot"]["standardize"] else "--no-standardize",
            "" if config["deepspot"]["baselines"] else "--no-baselines",
            f"--baselines-max-gb {config['deepspot']['baselines_max_gb']}",
            f"--mlp-hidden {config['deepspot']['mlp_hidden']} --mlp-max-iter {config['deepspot']['mlp_max_iter']}",
            f"--device {config['features']['device']}",
            "--bf16" if config["features"]["bf16"] else "--no-bf16",
        ]),
    log:
        f"results/ptpl/{TRAIN_COHORT}_deepspot.log",
    benchmark:
        "results/benchmarks/ptpl/deepspot_train.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=job_mem_mb("deepspot_train"),
        runtime=job_runtime("deepspot_train"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit deepspot-train --expression {input.expression} --features {input.features}"
        " --spots @{input.spots_list} --split {input.split} --out-model {output.model} --out-lodo {output.lodo} {params.settings} > {log} 2>&1"


rule deepspot_predict:
    input:
        model=rules.deepspot_train.output.model,
        features="results/features/{cohort}/deepspot_fm.zarr",
        spots=cohort_spots,
        spots_list=cohort_list("spots"),
    output:
        "results/ptpl/{cohort}.h5ad",
    params:
        device=config["features"]["device"],
        bf16="--bf16" if config["features"]["bf16"] else "--no-bf16",
    log:
        "results/ptpl/{cohort}.log",
    benchmark:
        "results/benchmarks/ptpl/{cohort}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=job_mem_mb("deepspot_predict"),
        runtime=job_runtime("deepspot_predict"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit deepspot-predict --model {input.model} --features {input.features} --spots @{input.spots_list}"
        " --out {output} --device {params.device} {params.bf16} > {log} 2>&1"


use rule features_cancerfoundation as features_cancerfoundation_ptpl with:
    # the same encoder over the DeepSpot pseudo-labels (PTPL) instead of the measured expression
    input:
        expression="results/ptpl/{cohort}.h5ad",
    output:
        directory("results/features/{cohort}/cancerfoundation_ptpl.zarr"),
    log:
        "results/features/{cohort}/cancerfoundation_ptpl.log",
    benchmark:
        "results/benchmarks/features/{cohort}/cancerfoundation_ptpl.tsv"
    resources:
        gpu=1,
        mem_mb=job_mem_mb("features_cancerfoundation_ptpl"),
        runtime=job_runtime("features_cancerfoundation_ptpl"),
