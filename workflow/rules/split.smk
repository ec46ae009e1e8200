# Donor-level train/val/test split per cohort.


rule split:
    input:
        spots=cohort_spots,
        spots_list=cohort_list("spots"),
    output:
        "results/splits/{cohort}.parquet",
    params:
        test_donors=lambda wildcards: " ".join(config["split"]["test_donors"].get(wildcards.cohort, [])) or "auto",
        val_fraction=config["split"]["val_fraction"],
        seed=config["split"]["seed"],
        max_spots_per_slide=config["split"]["max_spots_per_slide"] or "none",
        all_test=lambda wildcards: "--all-test" if wildcards.cohort not in EXPRESSION_COHORTS else "",
    log:
        "results/splits/{cohort}.log",
    benchmark:
        "results/benchmarks/split/{cohort}.tsv"
    threads: 1
    resources:
        mem_mb=job_mem_mb("split"),
        runtime=job_runtime("split"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit split --cohort {wildcards.cohort} --spots @{input.spots_list} --out {output}"
        " --test-donors {params.test_donors} --val-fraction {params.val_fraction} --seed {params.seed}"
        " --max-spots-per-slide {params.max_spots_per_slide} {params.all_test} > {log} 2>&1"
