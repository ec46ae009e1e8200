# Ingest one slide: in-tissue spots, spot-centred patches and the A.3 filters.


rule spots:
    input:
        unpack(spots_inputs),
    output:
        spots="results/spots/{sample}.parquet",
        patches=directory("results/patches/{sample}.zarr"),
    params:
        sample_args=spots_sample_args,
        settings=config_flags(config["spots"]),
    log:
        "results/spots/{sample}.log",
    benchmark:
        "results/benchmarks/spots/{sample}.tsv"
    threads: 1
    resources:
        mem_mb=job_mem_mb("spots"),
        runtime=job_runtime("spots"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit spots {params.sample_args}"
        " --out-spots {output.spots} --out-patches {output.patches}"
        " {params.settings}"
        " > {log} 2>&1"
