# Frozen-encoder feature stores, one Zarr store per cohort and encoder, rows in cohort spot order.


rule features_image:
    input:
        spots=cohort_spots,
        patches=cohort_patches,
        spots_list=cohort_list("spots"),
        patches_list=cohort_list("patches"),
    output:
        directory("results/features/{cohort}/{encoder}.zarr"),
    params:
        encoder_args=lambda wildcards: encoder_args(wildcards.encoder),
        batch_size=config["features"]["batch_size"],
        device=config["features"]["device"],
    log:
        "results/features/{cohort}/{encoder}.log",
    benchmark:
        "results/benchmarks/features/{cohort}/{encoder}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=job_mem_mb("features_image"),
        runtime=job_runtime("features_image"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit features --encoder {wildcards.encoder} {params.encoder_args}"
        " --spots @{input.spots_list} --patches @{input.patches_list} --out {output}"
        " --batch-size {params.batch_size} --device {params.device} > {log} 2>&1"


rule features_cancerfoundation:
    input:
        expression="results/expression/{cohort}.h5ad",
    output:
        directory("results/features/{cohort}/cancerfoundation.zarr"),
    params:
        encoder_args=cancerfoundation_args(),
        batch_size=config["features"]["batch_size"],
        device=config["features"]["device"],
    log:
        "results/features/{cohort}/cancerfoundation.log",
    benchmark:
        "results/benchmarks/features/{cohort}/cancerfoundation.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=job_mem_mb("features_cancerfoundation"),
        runtime=job_runtime("features_cancerfoundation"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit features --encoder cancerfoundation {params.encoder_args}"
        " --expression {input.expression} --out {output} --batch-size {params.batch_size} --device {params.device}"
        " > {log} 2>&1"
