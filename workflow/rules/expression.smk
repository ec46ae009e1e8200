# Per-cohort expression (A.2): kept spots of all slides, gene filter, seurat_v3 HVGs, normalise;
# protein-coding flags from gene_sets.protein_coding (counts and list provenance in the JSON).


rule expression:
    input:
        spots=cohort_spots,
        matrices=cohort_matrices,
        spots_list=cohort_list("spots"),
        matrices_list=cohort_list("matrices"),
        gene_list=[PROTEIN_CODING_LIST] if PROTEIN_CODING_LIST not in ("hgnc", "none") else [],
    output:
        h5ad="results/expression/{cohort}.h5ad",
        gene_sets="results/expression/{cohort}_gene_sets.json",
    params:
        protein_coding=PROTEIN_CODING_LIST,
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
        mem_mb=job_mem_mb("expression"),
        runtime=job_runtime("expression"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit expression --cohort {wildcards.cohort} --spots @{input.spots_list} --matrices @{input.matrices_list}"
        " --out {output.h5ad} --min-spots-per-gene {params.min_spots_per_gene} --n-hvg {params.n_hvg}"
        " --target-sum {params.target_sum} --scale-max {params.scale_max}"
        " --protein-coding {params.protein_coding:q} --gene-sets-json {output.gene_sets} > {log} 2>&1"
