# Train one model. A job that reaches its wall-clock budget checkpoints and exits 75; `retries`
# resubmit it and the next job resumes exactly where it stopped. Inside a cluster job (remote mode)
# the rule has no retries: rerunning there would restart training past the job's own deadline, over
# and over, until SLURM kills the job; the submitting Snakemake resubmits instead.


rule train:
    input:
        split=f"results/splits/{TRAIN_COHORT}.parquet",
        latents=f"results/features/{TRAIN_COHORT}/sd3_vae.zarr",
        uni=f"results/features/{TRAIN_COHORT}/uni2h.zarr",
        ge=lambda wildcards: (
            [f"results/features/{TRAIN_COHORT}/{MODELS[wildcards.model].ge_store}.zarr"]
            if MODELS[wildcards.model].uses_ge else []
        ),
    output:
        "results/models/{model}/ema.safetensors",
    params:
        settings=lambda wildcards: json.dumps(MODELS[wildcards.model].settings, sort_keys=True),
        ge=lambda wildcards, input: f"--ge {input.ge[0]}" if input.ge else "",
        out_dir=lambda wildcards: f"results/models/{wildcards.model}",
    log:
        "results/models/{model}/train.log",
    benchmark:
        "results/benchmarks/train/{model}.tsv"
    retries: 0 if workflow.remote_exec else config["train"]["max_resubmissions"]
    threads: 4
    resources:
        gpu=config["train"]["gpus"],
        mem_mb=job_mem_mb("train"),
        runtime=job_runtime("train"),  # one job's wall clock; not grown on resubmission
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit train --settings '{params.settings}' --split {input.split} --latents {input.latents}"
        " --uni {input.uni} {params.ge} --out-dir {params.out_dir} --nproc {resources.gpu} >> {log} 2>&1"
