# Ingest one slide: in-tissue spots, spot-centred patches and the A.3 filters.


rule spots:
    input:
        unpack(spots_inputs),
    output:
        spots="results/spots/{sample}.parquet",
        patches=directory("results/patches/{sample}.zarr"),
    params:
        sample_args=spots_sample_args,
        patch_factor=config["spots"]["patch_factor"],
        patch_size=config["spots"]["patch_size"],
        grey_threshold=config["spots"]["grey_threshold"],
        min_foreground=config["spots"]["min_foreground"],
        min_laplacian_var=config["spots"]["min_laplacian_var"],
        saturation_threshold=config["spots"]["saturation_threshold"],
        value_threshold=config["spots"]["value_threshold"],
        min_tissue=config["spots"]["min_tissue"],
        exclude_labels=" ".join(f"'{label}'" for label in config["spots"]["exclude_labels"]),
        he_spot_diameter_um=config["spots"]["he_spot_diameter_um"],
        he_spot_spacing_um=config["spots"]["he_spot_spacing_um"],
        he_min_tissue=config["spots"]["he_min_tissue"],
        max_image_mb=config["spots"]["max_image_mb"],
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
        " --patch-factor {params.patch_factor} --patch-size {params.patch_size}"
        " --grey-threshold {params.grey_threshold} --min-foreground {params.min_foreground}"
        " --min-laplacian-var {params.min_laplacian_var}"
        " --saturation-threshold {params.saturation_threshold} --value-threshold {params.value_threshold}"
        " --min-tissue {params.min_tissue} --exclude-labels {params.exclude_labels}"
        " --he-spot-diameter-um {params.he_spot_diameter_um} --he-spot-spacing-um {params.he_spot_spacing_um}"
        " --he-min-tissue {params.he_min_tissue} --max-image-mb {params.max_image_mb}"
        " > {log} 2>&1"
