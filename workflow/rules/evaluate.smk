# Evaluation: frozen-encoder features of generated tiles, then one JSON per metric (fid, auc,
# perturbation, ood_fid, swap_fid, palette, layout) under results/eval/{model}/{cohort}/; the AUC
# regressors are fitted once per training cohort (eval_regressor, results/eval/regressors/{cohort}/).


rule eval_features:
    input:
        "results/tiles/{model}/{cohort}/{store}.zarr",
    output:
        directory("results/eval/{model}/{cohort}/{store}_{encoder}.zarr"),
    params:
        encoder_args=eval_encoder_args,
        vae=vae_args(),
        batch_size=config["features"]["batch_size"],
        device=config["features"]["device"],
    wildcard_constraints:
        store="|".join(SAMPLE_STORES),
        encoder="|".join(EVAL_ENCODERS),
    log:
        "results/eval/{model}/{cohort}/{store}_{encoder}.log",
    benchmark:
        "results/benchmarks/eval_features/{model}/{cohort}/{store}_{encoder}.tsv"
    # one: on 2 cores two of these few-second jobs (mostly start-up) run at once; the SLURM profile
    # gives each 4 (set-threads)
    threads: 1
    resources:
        gpu=1,
        mem_mb=job_mem_mb("eval_features"),
        runtime=job_runtime("eval_features"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit eval-features --encoder {wildcards.encoder} {params.encoder_args} --images {input}"
        " {params.vae} --out {output} --batch-size {params.batch_size} --device {params.device} > {log} 2>&1"


rule noise_features:
    # Table 2's noise-tile null: pure-noise tiles of the test spots through an evaluation encoder.
    input:
        split="results/splits/{cohort}.parquet",
    output:
        directory("results/controls/{cohort}/noise_{encoder}.zarr"),
    params:
        encoder_args=eval_encoder_args,
        tile_size=config["spots"]["patch_size"],
        seed=config["evaluate"]["seed"],
        batch_size=config["features"]["batch_size"],
        device=config["features"]["device"],
    wildcard_constraints:
        encoder="|".join(EVAL_ENCODERS),
    log:
        "results/controls/{cohort}/noise_{encoder}.log",
    benchmark:
        "results/benchmarks/controls/{cohort}/noise_{encoder}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=job_mem_mb("noise_features"),
        runtime=job_runtime("noise_features"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit eval-features --encoder {wildcards.encoder} {params.encoder_args}"
        " --noise-tiles-for {input.split} --split-name test --tile-size {params.tile_size} --seed {params.seed}"
        " --out {output} --batch-size {params.batch_size} --device {params.device} > {log} 2>&1"


rule fid:
    input:
        real="results/features/{cohort}/h0mini.zarr",
        generated=lambda wildcards: list(regime_stores(wildcards.model, wildcards.cohort, "h0mini").values()),
        split="results/splits/{cohort}.parquet",
        expression="results/expression/{cohort}.h5ad",
    output:
        "results/eval/{model}/{cohort}/fid.json",
    params:
        generated=lambda wildcards: pairs_arg(regime_stores(wildcards.model, wildcards.cohort, "h0mini")),
        n_boot=config["evaluate"]["n_boot"],
        seed=config["evaluate"]["seed"],
        min_spots=config["evaluate"]["min_spots_per_tissue"],
    log:
        "results/eval/{model}/{cohort}/fid.log",
    benchmark:
        "results/benchmarks/eval/{model}/{cohort}/fid.tsv"
    threads: 2
    resources:
        mem_mb=job_mem_mb("fid"),
        runtime=job_runtime("fid"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit fid --real {input.real} --generated {params.generated} --split {input.split}"
        " --split-name test --expression {input.expression} --n-boot {params.n_boot} --seed {params.seed}"
        " --min-spots-per-tissue {params.min_spots} --model {wildcards.model} --cohort {wildcards.cohort}"
        " --kind fid --threads {threads} --out {output} > {log} 2>&1"


rule layout:
    # Layout agreement of the generated tiles with their spots' real patches: a diagnostic (UNI2-h is
    # crop-invariant). `palette` runs the same way with its own command.
    input:
        patches=cohort_patches,
        patches_list=cohort_list("patches"),
        tiles=lambda wildcards: list(regime_tiles(wildcards).values()),
    output:
        "results/eval/{model}/{cohort}/layout.json",
    params:
        command="layout",
        tiles=lambda wildcards: pairs_arg(regime_tiles(wildcards)),
        vae=vae_args(),
        device=config["sampler"]["device"],
        n_boot=config["evaluate"]["n_boot"],
        seed=config["evaluate"]["seed"],
    log:
        "results/eval/{model}/{cohort}/layout.log",
    benchmark:
        "results/benchmarks/eval/{model}/{cohort}/layout.tsv"
    threads: 1
    resources:
        gpu=1,  # tiles kept as latents are decoded (the real SD3 VAE wants a GPU at paper scale)
        mem_mb=job_mem_mb("layout"),
        runtime=job_runtime("layout"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit {params.command} --patches @{input.patches_list} --tiles {params.tiles} {params.vae}"
        " --device {params.device}"
        " --n-boot {params.n_boot} --seed {params.seed} --model {wildcards.model} --cohort {wildcards.cohort}"
        " --out {output} > {log} 2>&1"


use rule layout as palette with:
    # The pass/fail check of what UNI carries (demo-checks); layout.json beside it is a diagnostic.
    output:
        "results/eval/{model}/{cohort}/palette.json",
    params:
        command="palette",
        tiles=lambda wildcards: pairs_arg(regime_tiles(wildcards)),
        vae=vae_args(),
        device=config["sampler"]["device"],
        n_boot=config["evaluate"]["n_boot"],
        seed=config["evaluate"]["seed"],
    log:
        "results/eval/{model}/{cohort}/palette.log",
    benchmark:
        "results/benchmarks/eval/{model}/{cohort}/palette.tsv"
    resources:
        gpu=1,
        mem_mb=job_mem_mb("palette"),
        runtime=job_runtime("palette"),


rule texture:
    # Grey roughness of the generated tiles against the same spots' real latents through the VAE.
    input:
        latents="results/features/{cohort}/sd3_vae.zarr",
        tiles=lambda wildcards: list(regime_tiles(wildcards).values()),
    output:
        "results/eval/{model}/{cohort}/texture.json",
    params:
        tiles=lambda wildcards: pairs_arg(regime_tiles(wildcards)),
        vae=vae_args(),
        device=config["sampler"]["device"],
        n_boot=config["evaluate"]["n_boot"],
        seed=config["evaluate"]["seed"],
    log:
        "results/eval/{model}/{cohort}/texture.log",
    benchmark:
        "results/benchmarks/eval/{model}/{cohort}/texture.tsv"
    threads: 1
    resources:
        gpu=1,  # decodes the real latents and tiles kept as latents
        mem_mb=job_mem_mb("texture"),
        runtime=job_runtime("texture"),
    conda:
        CONDA_GPU
    shell:
        "python -m stmdit texture --latents {input.latents} --tiles {params.tiles} {params.vae} --device {params.device}"
        " --n-boot {params.n_boot} --seed {params.seed} --model {wildcards.model} --cohort {wildcards.cohort}"
        " --out {output} > {log} 2>&1"


rule ood_fid:
    input:
        real="results/features/{cohort}/h0mini.zarr",
        generated=lambda wildcards: list(regime_stores(wildcards.model, wildcards.cohort, "h0mini").values()),
        split="results/splits/{cohort}.parquet",
    output:
        "results/eval/{model}/{cohort}/ood_fid.json",
    params:
        generated=lambda wildcards: pairs_arg(regime_stores(wildcards.model, wildcards.cohort, "h0mini")),
        n_boot=config["evaluate"]["n_boot"],
        seed=config["evaluate"]["seed"],
    log:
        "results/eval/{model}/{cohort}/ood_fid.log",
    benchmark:
        "results/benchmarks/eval/{model}/{cohort}/ood_fid.tsv"
    threads: 2
    resources:
        mem_mb=job_mem_mb("ood_fid"),
        runtime=job_runtime("ood_fid"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit fid --real {input.real} --generated {params.generated} --split {input.split}"
        " --split-name test --n-boot {params.n_boot} --seed {params.seed} --model {wildcards.model}"
        " --cohort {wildcards.cohort} --kind ood --threads {threads} --out {output} > {log} 2>&1"


rule swap_fid:
    input:
        real="results/features/{cohort}/h0mini.zarr",
        deepspot="results/eval/{model}/{cohort}/uni_ge_h0mini.zarr",
        visium="results/eval/{model}/{cohort}/uni_ge_visium_h0mini.zarr",
        split="results/splits/{cohort}.parquet",
    output:
        "results/eval/{model}/{cohort}/swap_fid.json",
    params:
        n_boot=config["evaluate"]["n_boot"],
        seed=config["evaluate"]["seed"],
    log:
        "results/eval/{model}/{cohort}/swap_fid.log",
    benchmark:
        "results/benchmarks/eval/{model}/{cohort}/swap_fid.tsv"
    threads: 2
    resources:
        mem_mb=job_mem_mb("swap_fid"),
        runtime=job_runtime("swap_fid"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit fid --real {input.real} --generated deepspot={input.deepspot} visium={input.visium}"
        " --split {input.split} --split-name test --n-boot {params.n_boot} --seed {params.seed}"
        " --model {wildcards.model} --cohort {wildcards.cohort} --kind swap --threads {threads} --out {output} > {log} 2>&1"


rule eval_regressor:
    # The Oracle and the Midnight+MLP, fitted once per training cohort on its real train spots; every
    # model's auc job loads them.
    input:
        expression="results/expression/{cohort}.h5ad",
        split="results/splits/{cohort}.parquet",
        features=regressor_features,
    output:
        "results/eval/regressors/{cohort}/{regressor}.joblib",
    params:
        fit=regressor_fit_args,
        ks=",".join(map(str, config["evaluate"]["ks"])),
        seed=config["evaluate"]["seed"],
    wildcard_constraints:
        regressor="oracle|midnight_mlp",
    log:
        "results/eval/regressors/{cohort}/{regressor}.log",
    benchmark:
        "results/benchmarks/eval_regressor/{cohort}/{regressor}.tsv"
    threads: 2
    resources:
        gpu=regressor_gpus,
        mem_mb=job_mem_mb("eval_regressor_{regressor}"),
        runtime=job_runtime("eval_regressor_{regressor}"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit eval-regressor --regressor {wildcards.regressor} --expression {input.expression}"
        " --split {input.split} --features {input.features} --ks {params.ks} {params.fit} --seed {params.seed}"
        " --threads {threads} --out {output} > {log} 2>&1"


rule auc:
    input:
        expression="results/expression/{cohort}.h5ad",
        split="results/splits/{cohort}.parquet",
        oracle="results/eval/regressors/{cohort}/oracle.joblib",
        midnight_mlp="results/eval/regressors/{cohort}/midnight_mlp.joblib",
        real_uni="results/features/{cohort}/uni2h.zarr",
        real_midnight="results/features/{cohort}/midnight.zarr",
        noise_uni="results/controls/{cohort}/noise_uni2h.zarr",
        noise_midnight="results/controls/{cohort}/noise_midnight.zarr",
        gen_uni=lambda wildcards: list(regime_stores(wildcards.model, wildcards.cohort, "uni2h").values()),
        gen_midnight=lambda wildcards: list(regime_stores(wildcards.model, wildcards.cohort, "midnight").values()),
    output:
        "results/eval/{model}/{cohort}/auc.json",
    params:
        gen_uni=lambda wildcards: pairs_arg(regime_stores(wildcards.model, wildcards.cohort, "uni2h")),
        gen_midnight=lambda wildcards: pairs_arg(regime_stores(wildcards.model, wildcards.cohort, "midnight")),
        n_boot=config["evaluate"]["auc_n_boot"],
        n_perm=config["evaluate"]["null_n_perm"],
        seed=config["evaluate"]["seed"],
    log:
        "results/eval/{model}/{cohort}/auc.log",
    benchmark:
        "results/benchmarks/eval/{model}/{cohort}/auc.tsv"
    threads: 2
    resources:
        mem_mb=job_mem_mb("auc"),
        runtime=job_runtime("auc"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit auc --expression {input.expression} --split {input.split} --oracle {input.oracle}"
        " --real-uni {input.real_uni} --gen-uni {params.gen_uni} --midnight-mlp {input.midnight_mlp}"
        " --real-midnight {input.real_midnight} --gen-midnight {params.gen_midnight}"
        " --noise-uni {input.noise_uni} --noise-midnight {input.noise_midnight}"
        " --n-boot {params.n_boot} --n-perm {params.n_perm} --seed {params.seed} --threads {threads}"
        " --model {wildcards.model} --cohort {wildcards.cohort}"
        " --out {output} > {log} 2>&1"


rule perturbation:
    input:
        features="results/eval/{model}/{cohort}/{store}_h0mini.zarr",
        tiles="results/tiles/{model}/{cohort}/{store}.zarr",
        real="results/features/{cohort}/h0mini.zarr",
        expression="results/expression/{cohort}.h5ad",
        split="results/splits/{cohort}.parquet",
    output:
        "results/eval/{model}/{cohort}/{store}.json",
    params:
        variant=lambda wildcards: "uni_null" if wildcards.store.endswith("uni_null") else "default",
        weight=config["evaluate"]["perturbation"]["weight"],
    wildcard_constraints:
        store="perturbation|perturbation_uni_null",
    log:
        "results/eval/{model}/{cohort}/{store}.log",
    benchmark:
        "results/benchmarks/eval/{model}/{cohort}/{store}.tsv"
    threads: 1
    resources:
        mem_mb=job_mem_mb("perturbation"),
        runtime=job_runtime("perturbation"),
    conda:
        CONDA_CPU
    shell:
        "python -m stmdit perturbation --features {input.features} --tiles {input.tiles} --real {input.real}"
        " --expression {input.expression} --split {input.split} --weight {params.weight}"
        " --model {wildcards.model} --cohort {wildcards.cohort} --variant {params.variant} --out {output} > {log} 2>&1"
