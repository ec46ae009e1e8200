# Per-cohort expression (A.2): kept spots of all slides, gene filter, seurat_v3 HVGs, normalise.


rule expression:
    input:
        spots=cohort_spots,
        matrices=cohort_matrices,
    output:
        "results/expression/{cohort}.h5ad",
    params:
        min_spots_per_gene=config["expression"]["min_spots_per_gene"],
        n_hvg=config["expression"]["n_hvg"],
        target_sum=config["expression"]["target_sum"],
        scale_max=config["expression"]["scale_max"] or "none",
    log:
        "results/expression/{cohort}.log",
    benchmark:
        "results/benchmarks/expression/{cohort}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 16000 * attempt,
        runtime=lambda wildcards, attempt: 60 * attempt,
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit expression --cohort {wildcards.cohort} --spots {input.spots} --matrices {input.matrices}"
        " --out {output} --min-spots-per-gene {params.min_spots_per_gene} --n-hvg {params.n_hvg}"
        " --target-sum {params.target_sum} --scale-max {params.scale_max} > {log} 2>&1"
