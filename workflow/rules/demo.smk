# The embedded demo cohort: Space Ranger-like folders + one H&E-only slide, from a real H&E.


if demo_outputs():

    rule demo_data:
        input:
            source_image=config["demo"]["source_image"],
            sheet=config["samples"],
        output:
            demo_outputs(),
        params:
            seed=config["demo"]["seed"],
            n_genes=config["demo"]["n_genes"],
        log:
            "results/resources/demo/demo_data.log",
        benchmark:
            "results/benchmarks/demo_data.tsv"
        conda:
            CONDA_CPU
        shell:
            "python -m stmdit demo-data --samples {input.sheet} --source-image {input.source_image}"
            " --seed {params.seed} --n-genes {params.n_genes} > {log} 2>&1"
