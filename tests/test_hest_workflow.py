"""The workflow on a sheet that mixes a Space Ranger cohort and a HEST cohort (HEST-format copies of
the real mouse muscle Visium folder of shared/data, three donors; the Space Ranger cohort is that
folder twice, two donors), at plumbing size (tests/e2e/config.yaml
over config.yaml, mouse genes so no protein-coding list): ingestion through expression, features and
splits, the stages whose inputs differ between the two kinds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from hest_format import write_hest_sample
from stmdit.hest import sample_files

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"
TARGETS = [
    "results/splits/sr.parquet", "results/splits/hest.parquet",
    "results/features/sr/uni2h.zarr", "results/features/hest/uni2h.zarr",
    "results/features/sr/cancerfoundation.zarr", "results/features/hest/cancerfoundation.zarr",
]


@pytest.mark.slow
def test_a_space_ranger_and_a_hest_cohort_run_through_features_and_splits(tmp_path, visium_folders):
    work = tmp_path / "repo"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".venv", "results", ".snakemake", ".git", "*.svs"))
    root = tmp_path / "hest"
    write_hest_sample(visium_folders["sr1"], root, "MUSA")
    for copy in ("MUSB", "MUSC"):  # more donors: copies of the muscle sample under their own ids
        for name, path in sample_files(root, "MUSA").items():
            shutil.copy(path, sample_files(root, copy)[name])
    sheet = tmp_path / "samples.tsv"
    sheet.write_text(
        "sample\tdonor\tcohort\tkind\tpath\n"
        f"sr_muscle\tmouse_m\tsr\tvisium\t{visium_folders['sr1']}\n"
        f"sr_muscle_copy\tmouse_n\tsr\tvisium\t{visium_folders['sr1']}\n"
        f"MUSA\tmouse_a\thest\thest\t{root}\n"
        f"MUSB\tmouse_b\thest\thest\t{root}\n"
        f"MUSC\tmouse_c\thest\thest\t{root}\n"
    )
    overlay = tmp_path / "hest.yaml"
    overlay.write_text(yaml.safe_dump({
        "samples": str(sheet),
        "gene_sets": {"protein_coding": "none", "midnight_mlp": "all", "deepspot": "hvg"},
        "train": {"cohort": "hest"},
        "split": {"test_donors": {"hest": ["mouse_c"]}},
        "features": {"image_encoders": ["uni2h"],  # the smoke CancerFoundation on fewer genes: cheaper
                     "encoders": {"cancerfoundation": {"impl": "smoke", "max_genes": 128, "seed": 0}}},
    }))
    result = subprocess.run(
        [str(SNAKEMAKE), "--cores", "2", *TARGETS, "--configfile", "config.yaml", "tests/e2e/config.yaml", str(overlay)],
        cwd=work, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(work / "src")},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    results = work / "results"

    # the HEST copy of the muscle folder ingests to the Space Ranger folder's spots and keep decisions
    sr, hest_copy = (pd.read_parquet(results / "spots" / f"{s}.parquet") for s in ("sr_muscle", "MUSA"))
    assert list(sr["barcode"]) == list(hest_copy["barcode"]) and (sr["keep"] == hest_copy["keep"]).all()
    log = (results / "spots" / "MUSA.log").read_text()
    assert "Visium spots: patches around a 65 um spot (Space Ranger's spot_diameter_fullres; metadata spot_diameter 55 um is the physical spot), spacing 100 um" in log

    splits = pd.read_parquet(results / "splits" / "hest.parquet")
    assert set(splits.loc[splits["split"] == "test", "donor"]) == {"mouse_c"}
    assert set(splits["sample"]) == {"MUSA", "MUSB", "MUSC"}
    expression = ad.read_h5ad(results / "expression" / "hest.h5ad")
    assert list(expression.obs_names) == list(splits["key"])
    # raw counts of the HEST cohort are the Space Ranger counts of the same spots
    sr_expression = ad.read_h5ad(results / "expression" / "sr.h5ad")
    muscle = expression[expression.obs["sample"] == "MUSA"]
    same = sr_expression[sr_expression.obs["sample"] == "sr_muscle"]
    genes = muscle.var_names.intersection(same.var_names)
    assert len(genes) > 1000 and muscle.n_obs == same.n_obs
    np.testing.assert_array_equal(muscle[:, genes].layers["counts"].toarray(), same[:, genes].layers["counts"].toarray())
    for cohort in ("sr", "hest"):
        for encoder in ("uni2h", "cancerfoundation"):
            store = zarr.open_group(str(results / "features" / cohort / f"{encoder}.zarr"), mode="r")
            assert store["spot_key"].shape[0] == len(pd.read_parquet(results / "splits" / f"{cohort}.parquet"))
