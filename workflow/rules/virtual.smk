# Virtual tissue experiments (config `virtual`, stmdit.virtual): for each named experiment, the
# chosen spots generated unedited, edited (every dose) and with the control edit from the same
# noise, then the change per spot, its summary, a mosaic per slide and the dose-response montage.


rule virtual_tiles:
    input:
        unpack(virtual_inputs),
    output:
        directory("results/virtual/{experiment}/tiles.zarr"),
    params:
        model_dir=lambda wildcards: model_dir(VIRTUAL_EXPERIMENTS[wildcards.experiment]["model"]),
        spec=lambda wildcards: virtual_spec_json(wildcards.experiment),
        vae=vae_args(),
        sampler=sampler_args(),
    wildcard_constraints:
        experiment="|".join(map(re.escape, VIRTUAL_EXPERIMENTS)) or "$^",
    log:
        "results/virtual/{experiment}/tiles.log",
    benchmark:
        "results/benchmarks/virtual/{experiment}/tiles.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=job_mem_mb("virtual_tiles"),
        runtime=job_runtime("virtual_tiles"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit virtual-tiles --name {wildcards.experiment} --experiment-json '{params.spec}'"
        " --model-dir {params.model_dir} --split {input.split} --expression {input.expression}"
        " --uni {input.uni} --ge {input.ge} --spots @{input.spots_list} {params.vae}"
        " {params.sampler} --out {output} > {log} 2>&1"


rule virtual_report:
    input:
        tiles="results/virtual/{experiment}/tiles.zarr",
        spots=lambda wildcards: spots_of(virtual_cohort(wildcards.experiment)),
        patches=lambda wildcards: cohort_paths(virtual_cohort(wildcards.experiment), "patches"),
        spots_list=lambda wildcards: cohort_list("spots", virtual_cohort(wildcards.experiment)),
        patches_list=lambda wildcards: cohort_list("patches", virtual_cohort(wildcards.experiment)),
    output:
        summary=report("results/virtual/{experiment}/summary.json", category="Virtual experiments",
                       subcategory="{experiment}", caption="../report/virtual_summary.rst"),
        mosaics=report(directory("results/virtual/{experiment}/mosaics"), patterns=["{slide}.png"],
                       category="Virtual experiments", subcategory="{experiment}",
                       caption="../report/virtual_mosaic.rst"),
        mosaics_zarr=directory("results/virtual/{experiment}/mosaics.zarr"),
        montage=report("results/virtual/{experiment}/montage.png", category="Virtual experiments",
                       subcategory="{experiment}", caption="../report/virtual_montage.rst"),
    params:
        h0mini=virtual_h0mini_args(),
        vae=vae_args(),
        n_boot=VIRTUAL["n_boot"],
        seed=VIRTUAL["seed"],
        tile_px=VIRTUAL["mosaic_tile_px"],
        montage_tile_px=VIRTUAL["montage_tile_px"],
        per_class=VIRTUAL["montage_per_class"],
        device=config["sampler"]["device"],
    wildcard_constraints:
        experiment="|".join(map(re.escape, VIRTUAL_EXPERIMENTS)) or "$^",
    log:
        "results/virtual/{experiment}/report.log",
    benchmark:
        "results/benchmarks/virtual/{experiment}/report.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=job_mem_mb("virtual_report"),
        runtime=job_runtime("virtual_report"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit virtual-report --tiles {input.tiles} --spots @{input.spots_list} --patches @{input.patches_list}"
        " {params.h0mini} {params.vae} --device {params.device} --n-boot {params.n_boot} --seed {params.seed}"
        " --tile-px {params.tile_px} --montage-tile-px {params.montage_tile_px} --per-class {params.per_class}"
        " --summary {output.summary} --mosaics {output.mosaics} --mosaics-zarr {output.mosaics_zarr}"
        " --montage {output.montage} > {log} 2>&1"
