# The embedded demo cohort: Space Ranger-like folders + one H&E-only slide, from a real H&E.


def demo_outputs():
    """Files rule demo_data writes: every sample-sheet file that lies under DEMO_ROOT."""
    files = []
    for _, row in SAMPLES.iterrows():
        if not row["path"].startswith(DEMO_ROOT + "/"):
            continue
        if row["kind"] == "he":
            files.append(row["path"])
            continue
        files += [
            f"{row['path']}/filtered_feature_bc_matrix.h5",
            f"{row['path']}/spatial/scalefactors_json.json",
        ]
        files += [row[c] for c in ("image", "labels") if row[c]]
    return files


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
            "stmdit demo-data --samples {input.sheet} --source-image {input.source_image}"
            " --seed {params.seed} --n-genes {params.n_genes} > {log} 2>&1"
