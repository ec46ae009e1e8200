"""The matched-spot figure on small synthetic stores: 8 GE clusters with known marker genes."""

from __future__ import annotations

import argparse

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from PIL import Image

from stmdit import matched
from stmdit.errors import InputError
from stmdit.features import write_feature_store

N_CLUSTERS, PER_CLUSTER, N_GENES = 8, 5, 30
SAMPLER = {"seed": 42, "s_uni": 4.0, "s_ge": 3.0, "steps": 50, "solver": "default"}


def run_cli(*argv):
    parser = argparse.ArgumentParser()
    matched.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def image_store(path, keys, images, sampler=None, params=None):
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("spot_key", shape=(len(keys),), dtype=str)[:] = np.array(keys, dtype=object)
    group.create_array("images", data=images, chunks=(4, *images.shape[1:]))
    if sampler is not None:
        group.attrs.update({"sampler": sampler, "stmdit": {"params": params}})
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """40 test spots in 8 well-separated GE clusters (cluster c: genes G{3c}..G{3c+2} high), 10 train
    spots; patches coloured by cluster; three models' samples of the test spots."""
    root = tmp_path_factory.mktemp("matched")
    rng = np.random.default_rng(0)
    cluster = np.repeat(np.arange(N_CLUSTERS), PER_CLUSTER)
    rng.shuffle(cluster)
    test = [f"s0:t{i:03d}" for i in range(len(cluster))]
    train = [f"s0:r{i:03d}" for i in range(10)]
    keys = test + train
    centres = rng.standard_normal((N_CLUSTERS, 16)) * 10
    cls = np.concatenate([centres[cluster] + rng.standard_normal((len(test), 16)), rng.standard_normal((10, 16))])
    write_feature_store(root / "cf.zarr", keys, [{"embedding": cls.astype(np.float32)}], {"embedding": (16,)}, {})
    counts = rng.poisson(2.0, (len(keys), N_GENES)).astype(np.float32)
    for i, c in enumerate(cluster):
        counts[i, 3 * c:3 * c + 3] += [60, 40, 30]
    genes = [f"G{j}" for j in range(N_GENES)]
    adata = ad.AnnData(X=np.zeros_like(counts), obs=pd.DataFrame(index=keys), var=pd.DataFrame(index=genes))
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.write_h5ad(root / "expr.h5ad")
    pd.DataFrame({"key": keys, "split": ["test"] * len(test) + ["train"] * 10}).to_parquet(root / "split.parquet")
    palette = rng.integers(0, 255, (N_CLUSTERS, 3)).astype(np.uint8)
    real = np.broadcast_to(palette[cluster][:, None, None, :], (len(test), 32, 32, 3)).copy()
    image_store(root / "patches.zarr", test, real)
    params = {"uni": "uni2h.zarr", "ge": "cf.zarr"}
    stores = {}
    for m, name in enumerate(("PixCell-B", "AdaLN-p05", "XAttn-PMA")):
        images = rng.integers(0, 255, (len(test), 32, 32, 3)).astype(np.uint8)
        stores[name] = image_store(root / f"{name}.zarr", test[::-1], images[::-1], SAMPLER,
                                   {**params, "ge": None} if m == 0 else params)
    return {"root": root, "test": test, "cluster": cluster, "cls": cls, "stores": stores}


def args_for(cohort, out, stores):
    root = cohort["root"]
    return ["matched-spots", "--ge", root / "cf.zarr", "--split", root / "split.parquet", "--expression",
            root / "expr.h5ad", "--patches", root / "patches.zarr", "--tiles",
            *(f"{name}={path}" for name, path in stores.items()), "--seed", 0, "--out", out]


def test_rows_are_ge_clusters_with_their_marker_genes_and_central_spot(cohort):
    root = cohort["root"]
    clusters = matched.matched_clusters(root / "cf.zarr", root / "split.parquet", root / "expr.h5ad",
                                        set(cohort["test"]), 8, 0)
    assert len(clusters) == N_CLUSTERS and all(c.size == PER_CLUSTER for c in clusters)
    truth = dict(zip(cohort["test"], cohort["cluster"]))
    seen = set()
    for c in clusters:
        true_cluster = truth[c.key]
        members = [k for k in cohort["test"] if truth[k] == true_cluster]
        seen.add(true_cluster)
        assert sorted(c.genes) == sorted(f"G{3 * true_cluster + j}" for j in range(3))
        # the shown spot is the member nearest the members' mean embedding
        rows = [cohort["test"].index(k) for k in members]
        centre = cohort["cls"][rows].mean(axis=0)
        assert c.key == members[int(np.argmin(np.linalg.norm(cohort["cls"][rows] - centre, axis=1)))]
    assert seen == set(range(N_CLUSTERS))


def test_figure_has_a_row_per_cluster_and_a_column_per_model(cohort, tmp_path):
    out = tmp_path / "matched.png"
    run_cli(*args_for(cohort, out, cohort["stores"]))
    width, height = Image.open(out).size
    two = tmp_path / "two.png"
    run_cli(*args_for(cohort, two, dict(list(cohort["stores"].items())[:1])))
    width_two, height_two = Image.open(two).size
    assert height > 8 * 100 and abs(height - height_two) < 40  # 8 rows either way
    assert width - width_two > 2 * 150  # two more model columns


def test_unmatched_samples_store_is_named(cohort, tmp_path):
    images = np.zeros((len(cohort["test"]), 32, 32, 3), np.uint8)
    other = image_store(tmp_path / "other.zarr", cohort["test"], images, {**SAMPLER, "seed": 7},
                        {"uni": "uni2h.zarr", "ge": "cf.zarr"})
    stores = {**cohort["stores"], "Other": other}
    with pytest.raises(InputError, match="seed = 7") as err:
        run_cli(*args_for(cohort, tmp_path / "x.png", stores))
    assert err.value.path == str(other) and not (tmp_path / "x.png").exists()
