"""DeepSpot pseudo-labels: hex neighbours, out-of-fold bookkeeping, clipping, standardisation,
learning a planted signal, determinism, and the PTPL h5ad feeding the CancerFoundation step.

A tiny synthetic cohort: three Visium donors (one slide each) on a hex grid, 16-d tile embeddings
driven by a 4-d latent, sub-tiles = tile + noise, and counts whose rates depend linearly and
non-linearly on the latent (and on the neighbours' mean latent); plus an H&E-only slide. Donor C is
the held-out test donor of the split."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from stmdit.cli import COMMANDS, main
from stmdit.deepspot import (
    TrainingConfig,
    donor_folds,
    hex_neighbour_index,
    leave_one_donor_out,
    load_model,
    load_model_dir,
    load_spot_features,
    neighbour_embeddings,
    iter_cohort_predictions,
    predict_log1p,
    read_cohort_spots,
    read_split_roles,
    register,
    save_weights,
    spot_models,
    train_deepspot,
)
from stmdit.deepspot_targets import read_training_cohort
from stmdit.errors import InputError
from stmdit.features import read_cohort_counts, write_feature_store
from stmdit.provenance import provenance, write_parquet
from stmdit.split import assign_splits

torch.set_num_threads(1)

SPOT_COLUMNS = ["key", "sample", "donor", "cohort", "barcode", "array_row", "array_col", "pxl_row", "pxl_col",
                "diameter_px", "foreground", "laplacian_var", "tissue_fraction", "label", "keep", "reason"]
DIM, LATENT, N_HVG, N_OTHER = 16, 4, 8, 4
N_PROTEIN_CODING = N_HVG + 2
TINY = dict(hidden_dim=16, n_ensemble=3, dropout=0.1, lr=1e-2, epochs=40, batch_size=32, seed=3, device="cpu")
ENCODER = {"name": "deepspot_fm", "impl": "smoke", "model": "test projection",
           "shapes": {"embedding": [DIM], "subtiles": [9, DIM]}}


def stmdit(argv: list[str]) -> int:
    """`stmdit <step>`: through the CLI once deepspot's commands are wired into it, else its own parser."""
    if argv[0] in COMMANDS:
        return main(argv)
    import argparse

    parser = argparse.ArgumentParser(prog="stmdit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except InputError:
        return 2
    return 0


def hex_positions(n_rows: int, n_cols: int) -> list[tuple[int, int]]:
    return [(r, 2 * c + (r % 2)) for r in range(n_rows) for c in range(n_cols)]


def write_slide(root, sample: str, donor: str, cohort: str, rng, n_rows=7, n_cols=6, drop=()):
    """Spots table (some spots filtered out) and the latent of each spot."""
    positions = hex_positions(n_rows, n_cols)
    n = len(positions)
    keep = np.ones(n, dtype=bool)
    keep[list(drop)] = False
    barcodes = [f"{sample}-{i:03d}" for i in range(n)]
    spots = pd.DataFrame({
        "key": [f"{sample}:{b}" for b in barcodes], "sample": sample, "donor": donor, "cohort": cohort,
        "barcode": barcodes, "array_row": [p[0] for p in positions], "array_col": [p[1] for p in positions],
        "pxl_row": np.arange(n) * 10.0, "pxl_col": np.arange(n) * 9.0, "diameter_px": 50.0,
        "foreground": 0.8, "laplacian_var": 50.0, "tissue_fraction": 0.7, "label": "",
        "keep": keep, "reason": np.where(keep, "", "blur"),
    })[SPOT_COLUMNS]
    path = root / "spots" / f"{sample}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(spots, path, provenance("spots", {}, []))
    latent = rng.standard_normal((n, LATENT))
    return path, spots[keep].reset_index(drop=True), latent[keep]


def write_store(path, keys, latent, rng, projection):
    tile = latent @ projection + 0.05 * rng.standard_normal((len(keys), DIM))
    subtiles = tile[:, None, :] + 0.1 * rng.standard_normal((len(keys), 9, DIM))
    batches = [{"embedding": tile.astype(np.float32), "subtiles": subtiles.astype(np.float32)}]
    write_feature_store(path, keys, batches, {"embedding": (DIM,), "subtiles": (9, DIM)}, {"encoder": ENCODER})


def planted_counts(spots: pd.DataFrame, latent: np.ndarray, rng) -> np.ndarray:
    """Poisson counts: HVG log-rates linear in the latent, plus |latent_0| and the neighbours' mean latent."""
    neighbours = hex_neighbour_index(spots["sample"], spots["array_row"], spots["array_col"])
    present = neighbours >= 0
    neighbour_mean = (latent[neighbours.clip(0)] * present[..., None]).sum(1) / present.sum(1, keepdims=True).clip(1)
    weights = np.random.default_rng(7).standard_normal((LATENT, N_HVG)) * 0.6
    log_rate = 2.5 + latent @ weights + 0.8 * np.abs(latent[:, :1]) + 0.4 * neighbour_mean[:, 1:2]
    hvg = rng.poisson(np.exp(log_rate))
    other = rng.poisson(30.0, size=(len(spots), N_OTHER))
    return np.concatenate([hvg, other], axis=1)


TINY_ARGS = ["--hidden-dim", "16", "--n-ensemble", "3", "--dropout", "0.1", "--lr", "1e-2", "--epochs", "40",
             "--batch-size", "32", "--seed", "3", "--device", "cpu", "--mlp-hidden", "16", "--mlp-max-iter", "100"]
TEST_DONOR = "C"


def build_cohort(root, other_test_donor: bool = False) -> dict:
    """Write the synthetic cohort under `root`, train and predict through the CLI. With
    `other_test_donor`, the test donor's latent (so its tiles and sub-tiles) and its counts are
    drawn anew; every other spot is written exactly as without it."""
    rng = np.random.default_rng(0)
    projection = rng.standard_normal((LATENT, DIM))
    spots_paths, tables, latents = [], [], []
    for sample, donor in (("s1", "A"), ("s2", "B"), ("s3", TEST_DONOR)):
        path, kept, latent = write_slide(root, sample, donor, "vis", rng, drop=(3, 10))
        spots_paths.append(path)
        tables.append(kept)
        latents.append(latent)
    spots = pd.concat(tables, ignore_index=True)
    latent = np.concatenate(latents)
    test_rows = np.flatnonzero(spots["donor"] == TEST_DONOR)
    image_latent = latent.copy()
    if other_test_donor:
        image_latent[test_rows] = np.random.default_rng(99).standard_normal((len(test_rows), LATENT)) * 2.0
    store = root / "features" / "vis" / "deepspot_fm.zarr"
    write_store(store, spots["key"].tolist(), image_latent, rng, projection)

    counts = planted_counts(spots, latent, rng)  # Poisson draws use up rng by their rates: same latent here
    if other_test_donor:
        counts[test_rows] = np.random.default_rng(98).poisson(50.0, size=(len(test_rows), counts.shape[1]))
    genes = [f"G{i}" for i in range(N_HVG)] + [f"O{i}" for i in range(N_OTHER)]
    adata = ad.AnnData(X=sp.csr_matrix(np.log1p(counts).astype(np.float32)),
                       obs=pd.DataFrame({"sample": spots["sample"].to_numpy(), "donor": spots["donor"].to_numpy()},
                                        index=spots["key"].to_numpy()),
                       var=pd.DataFrame(index=genes))
    adata.layers["counts"] = sp.csr_matrix(counts.astype(np.int32))
    adata.var["highly_variable"] = [True] * N_HVG + [False] * N_OTHER
    adata.var["highly_variable_rank"] = [float(r) for r in (3, 0, 1, 2, 7, 5, 4, 6)] + [np.nan] * N_OTHER
    adata.var["protein_coding"] = [True] * (N_HVG + 2) + [False] * (N_OTHER - 2)  # O2, O3: non-coding
    adata.uns["gene_sets"] = {"protein_coding": {"source": "test list", "version": "v1", "list_genes": 10,
                                                 "cohort_genes": N_HVG + N_OTHER, "protein_coding": N_PROTEIN_CODING}}
    expression = root / "expression" / "vis.h5ad"
    expression.parent.mkdir(parents=True)
    adata.write_h5ad(expression)
    split = root / "splits" / "vis.parquet"
    split.parent.mkdir(parents=True)
    write_parquet(assign_splits(spots, [TEST_DONOR], 0.2, seed=42), split, provenance("split", {}, []))

    he_path, he_spots, he_latent = write_slide(root, "h1", "T1", "he", rng, n_rows=4, n_cols=4)
    he_store = root / "features" / "he" / "deepspot_fm.zarr"
    write_store(he_store, he_spots["key"].tolist(), he_latent, rng, projection)

    model_dir = root / "models" / "deepspot" / "vis"
    lodo = root / "ptpl" / "vis_lodo.json"
    assert stmdit(["deepspot-train", "--expression", str(expression), "--features", str(store), "--spots",
                   *map(str, spots_paths), "--split", str(split), "--out-model", str(model_dir), "--out-lodo", str(lodo),
                   *TINY_ARGS]) == 0
    ptpl = root / "ptpl" / "vis.h5ad"
    assert stmdit(["deepspot-predict", "--model", str(model_dir), "--features", str(store), "--spots",
                   *map(str, spots_paths), "--out", str(ptpl), "--device", "cpu"]) == 0
    he_ptpl = root / "ptpl" / "he.h5ad"
    assert stmdit(["deepspot-predict", "--model", str(model_dir), "--features", str(he_store), "--spots", str(he_path),
                   "--out", str(he_ptpl), "--device", "cpu", "--batch-size", "5"]) == 0
    return {"root": root, "expression": expression, "store": store, "spots_paths": spots_paths, "spots": spots,
            "split": split, "model_dir": model_dir, "lodo": lodo, "ptpl": ptpl, "he_ptpl": he_ptpl,
            "he_store": he_store, "he_path": he_path, "tiny_args": TINY_ARGS}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_cohort(tmp_path_factory.mktemp("deepspot"))


def test_hex_neighbours_on_a_hand_built_grid():
    # sample a: (0,0) (0,2) (0,4) / (1,1) (1,3) / (2,2); sample b has (0,2) only
    sample = ["a", "a", "a", "a", "a", "a", "b"]
    row = [0, 0, 0, 1, 1, 2, 0]
    col = [0, 2, 4, 1, 3, 2, 2]
    index = hex_neighbour_index(sample, row, col)  # offsets: same row -2, +2; row-1 -1, +1; row+1 -1, +1
    assert index[0].tolist() == [-1, 1, -1, -1, -1, 3]
    assert index[1].tolist() == [0, 2, -1, -1, 3, 4]
    assert index[3].tolist() == [-1, 4, 0, 1, -1, 5]
    assert index[5].tolist() == [-1, -1, 3, 4, -1, -1]
    assert index[6].tolist() == [-1] * 6  # (0,2) of sample a is not a neighbour of sample b's spot
    with pytest.raises(ValueError, match="share sample"):
        hex_neighbour_index(["a", "a"], [0, 0], [2, 2])

    tile = torch.arange(7 * 2, dtype=torch.float32).reshape(7, 2) + 1
    gathered = neighbour_embeddings(tile, torch.as_tensor(index[[0, 6]]))
    assert gathered.shape == (2, 6, 2)
    assert torch.equal(gathered[0, 1], tile[1]) and torch.equal(gathered[0, 5], tile[3])
    assert torch.count_nonzero(gathered[0, [0, 2, 3, 4]]) == 0 and torch.count_nonzero(gathered[1]) == 0


def test_features_follow_the_spots_and_skip_filtered_neighbours(cohort):
    spots = cohort["spots"]
    features = load_spot_features(cohort["store"], spots)
    assert features.keys == spots["key"].tolist() and features.dim == DIM
    # spot s1 (1,1) neighbours (1,3), (0,0), (0,2), (2,0), (2,2); (1,-1) is off the grid
    row = spots.index[(spots["sample"] == "s1") & (spots["array_row"] == 1) & (spots["array_col"] == 1)][0]
    expected = [(1, -1), (1, 3), (0, 0), (0, 2), (2, 0), (2, 2)]
    s1 = spots[spots["sample"] == "s1"]
    lookup = {(r, c): i for i, r, c in zip(s1.index, s1["array_row"], s1["array_col"])}
    assert features.neighbours[row].tolist() == [lookup.get(p, -1) for p in expected]
    # dropped spot 3 of s1 sits at (0, 6): its neighbour (0, 4) sees a missing (zero) slot there
    row04 = lookup[(0, 4)]
    assert features.neighbours[row04, 1] == -1
    tile, subtiles, neighbours = features.batch(np.array([row04]), torch.device("cpu"))
    assert subtiles.shape == (1, 9, DIM) and neighbours.shape == (1, 6, DIM)
    assert torch.count_nonzero(neighbours[0, 1]) == 0 and torch.count_nonzero(neighbours[0, 0]) > 0


def test_lodo_report_shows_deepspot_learns_the_signal(cohort):
    report = json.loads(cohort["lodo"].read_text())
    assert [f["held_out_donor"] for f in report["fold_plan"]["folds"]] == ["A", "B"]  # C is the test donor
    assert report["genes"] == [f"G{i}" for i in range(N_HVG)] + ["O0", "O1"]  # the protein-coding genes
    assert report["gene_set"]["name"] == "protein_coding" and report["gene_set"]["source"] == "test list"
    assert report["gene_set"]["n_genes"] == N_PROTEIN_CODING and report["gene_set"]["hvgs_not_predicted"] == 0
    assert set(report["pearson"]) == {"deepspot", "ridge", "mlp"}
    deepspot = report["pearson"]["deepspot"]
    assert deepspot["median"] > 0.5 and deepspot["mean"] > 0.5, deepspot
    assert deepspot["n_genes"] == N_PROTEIN_CODING and len(report["per_gene"]["deepspot"]) == N_PROTEIN_CODING
    assert set(deepspot["per_donor"]) == {"A", "B"}
    assert set(report["test_donors_pearson"]) == {"deepspot", "ridge", "mlp"}
    assert report["test_donors_pearson"]["deepspot"]["median"] > 0.3  # the all-training-donor model on C
    assert report["pearson"]["ridge"]["median"] > 0.3  # a linear signal is there for the baseline too
    assert report["stmdit"]["step"] == "deepspot-train" and report["stmdit"]["params"]["seed"] == 3


def test_predictions_are_out_of_fold(cohort):
    ptpl = ad.read_h5ad(cohort["ptpl"])
    spots = cohort["spots"]
    assert list(ptpl.obs_names) == spots["key"].tolist()
    obs = ptpl.obs.astype(str)
    training_donor = (obs["donor"] != TEST_DONOR).to_numpy()
    assert (obs["fold_donor"][training_donor] == obs["donor"][training_donor]).all()
    assert (ptpl.obs["out_of_fold"].to_numpy() == training_donor).all()
    assert (obs["fold_donor"][~training_donor] == "").all()
    assert (obs["ptpl_model"][~training_donor] == "all_donors").all()
    assert set(ptpl.obs["ptpl_model"]) == {"lodo:A", "lodo:B", "all_donors"}
    assert json.loads(ptpl.uns["fold_plan"])["test_donors"] == [TEST_DONOR]
    config = json.loads((cohort["model_dir"] / "config.json").read_text())
    for fold in config["folds"]:
        assert fold["held_out_donor"] not in fold["train_donors"] and TEST_DONOR not in fold["train_donors"]
    assert config["all_donors"]["donors"] == ["A", "B"]

    # retraining on donor A's train-split spots, same seed, reproduces B's pseudo-labels; the
    # all-training-donor model does not
    training = read_training_cohort(cohort["expression"])
    roles = read_split_roles(cohort["split"], training.keys, training.donors)
    features = load_spot_features(cohort["store"], spots)
    held_out = np.flatnonzero(training.donors == "B")
    train_rows = np.flatnonzero(roles.trainable & (training.donors == "A"))
    assert 0 < len(train_rows) < (training.donors == "A").sum()  # A's validation spots never train
    model = train_deepspot(features, training.targets, train_rows, TrainingConfig(**TINY))
    retrained = predict_log1p(model, features, held_out, batch_size=16, device="cpu")
    np.testing.assert_allclose(ptpl.X[held_out], retrained, rtol=1e-5, atol=1e-5)
    models = load_model_dir(cohort["model_dir"])
    in_sample = predict_log1p(models.all_donors, features, held_out, device="cpu")
    assert np.abs(in_sample - retrained).max() > 1e-3
    # in-sample fit beats the out-of-fold fit on the held-out donor (the fold model never saw it)
    truth = training.targets[held_out].toarray()
    assert np.mean((in_sample - truth) ** 2) < np.mean((retrained - truth) ** 2)


def test_he_cohort_uses_the_all_donor_model(cohort):
    he = ad.read_h5ad(cohort["he_ptpl"])
    assert (he.obs["ptpl_model"] == "all_donors").all() and not he.obs["out_of_fold"].any()
    assert (he.obs["fold_donor"] == "").all() and (he.obs["donor"] == "T1").all()
    spots = read_cohort_spots([cohort["he_path"]])
    features = load_spot_features(cohort["he_store"], spots)
    models = load_model_dir(cohort["model_dir"])
    expected = predict_log1p(models.all_donors, features, np.arange(len(features)), device="cpu")
    np.testing.assert_allclose(he.X, expected, rtol=1e-5, atol=1e-6)  # written with batch size 5
    assert he.uns["stmdit"]["step"] == "deepspot-predict"


def test_negatives_are_clipped_and_pseudo_counts_match(cohort, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    ptpl = ad.read_h5ad(cohort["ptpl"])
    assert ptpl.X.dtype == np.float32 and ptpl.X.min() >= 0
    np.testing.assert_allclose(ptpl.layers["counts"].toarray(), np.expm1(ptpl.X), rtol=1e-6)
    assert ptpl.layers["counts"].dtype == np.float32

    model_dir = shutil.copytree(cohort["model_dir"], tmp_path / "model")
    for weights in model_dir.glob("*.safetensors"):  # fold models are read from disk when asked for
        state = load_file(str(weights))
        state["rho.bias"][:, 0] -= 50.0  # gene 0 now predicted far below zero
        save_file(state, str(weights))
    models = load_model_dir(model_dir)
    spots = cohort["spots"]
    features = load_spot_features(cohort["store"], spots)
    raw = predict_log1p(models.by_held_out_donor["A"], features, np.arange(len(spots)), device="cpu", clip=False)
    assert (raw[:, 0] < 0).all()
    fold_donor = spot_models(models, spots["donor"].to_numpy(), spots["cohort"].to_numpy())
    clipped = np.concatenate(list(iter_cohort_predictions(models, features, fold_donor, device="cpu")))
    assert (clipped[:, 0] == 0).all() and (clipped >= 0).all()
    assert (clipped[:, 1:] > 0).mean() > 0.9
    assert list(fold_donor) == [d if d != TEST_DONOR else "" for d in spots["donor"]]
    # a spot of another cohort is labelled by the all-training-donor model, whatever its donor is called
    fold_donor = spot_models(models, spots["donor"].to_numpy(), ["other"] * len(spots))
    assert (fold_donor == "").all()


def test_standardisation_is_inverted_exactly_once(cohort):
    training = read_training_cohort(cohort["expression"])
    features = load_spot_features(cohort["store"], cohort["spots"])
    rows = np.arange(len(features))
    targets = training.targets.toarray() + 5.0  # far from zero mean: a missing or double inversion shows
    model = train_deepspot(features, targets, rows, TrainingConfig(**{**TINY, "epochs": 60}))
    assert model.target_mean.min() > 5.0 and torch.all(model.target_scale > 0)
    predicted = predict_log1p(model, features, rows, device="cpu")
    gap = np.abs(predicted.mean(0) - targets.mean(0))
    assert gap.max() < 0.25 * targets.std(0).min(), gap
    r = [np.corrcoef(predicted[:, g], targets[:, g])[0, 1] for g in range(targets.shape[1])]
    assert np.median(r) > 0.7
    with torch.no_grad():  # the network itself works in standardised units
        standardised = model(*features.batch(rows, torch.device("cpu"))).numpy()
    assert np.abs(standardised.mean(0)).max() < 0.5


def test_same_seed_same_output_and_batch_size_independence(cohort):
    training = read_training_cohort(cohort["expression"])
    features = load_spot_features(cohort["store"], cohort["spots"])
    folds = donor_folds(training.donors, read_split_roles(cohort["split"], training.keys, training.donors))
    config = TrainingConfig(**{**TINY, "epochs": 5})
    runs = [leave_one_donor_out(features, training.targets, folds, config, baselines=False) for _ in range(2)]
    assert np.array_equal(runs[0].pearson["deepspot"], runs[1].pearson["deepspot"], equal_nan=True)
    rows = np.arange(len(features))
    assert np.array_equal(predict_log1p(runs[0].models["A"], features, rows, device="cpu"),
                          predict_log1p(runs[1].models["A"], features, rows, device="cpu"))
    other = leave_one_donor_out(features, training.targets, folds, TrainingConfig(**{**TINY, "epochs": 5, "seed": 4}),
                                baselines=False)
    assert not np.array_equal(runs[0].pearson["deepspot"], other.pearson["deepspot"], equal_nan=True)
    model = runs[0].models["A"]
    np.testing.assert_allclose(predict_log1p(model, features, rows, batch_size=7, device="cpu"),
                               predict_log1p(model, features, rows, batch_size=1000, device="cpu"), atol=1e-6)


def test_fold_models_written_as_trained_equal_the_models_kept_in_memory(cohort, tmp_path):
    """deepspot-train hands each fold model to disk once scored instead of holding every donor's model
    while the next trains: what is loaded back predicts exactly as the model kept in memory, and no
    trained model carries its last step's gradients (as large as its weights)."""
    training = read_training_cohort(cohort["expression"])
    features = load_spot_features(cohort["store"], cohort["spots"])
    folds = donor_folds(training.donors, read_split_roles(cohort["split"], training.keys, training.donors))
    config = TrainingConfig(**{**TINY, "epochs": 5})
    kept = leave_one_donor_out(features, training.targets, folds, config, baselines=False)
    saved = []

    def save(index, fold, model):
        assert all(p.grad is None for p in model.parameters())
        save_weights(tmp_path / f"fold{index}.safetensors", model, fold.held_out_donor)
        saved.append(fold.held_out_donor)

    streamed = leave_one_donor_out(features, training.targets, folds, config, baselines=False, save_model=save)
    assert saved == [f.held_out_donor for f in folds] and streamed.models == {}
    assert np.array_equal(kept.pearson["deepspot"], streamed.pearson["deepspot"], equal_nan=True)
    rows = np.arange(len(features))
    for index, fold in enumerate(folds):
        model = kept.models[fold.held_out_donor]
        loaded = load_model(tmp_path / f"fold{index}.safetensors", model.config)
        assert np.array_equal(predict_log1p(model, features, rows, device="cpu"),
                              predict_log1p(loaded, features, rows, device="cpu"))


def test_a_model_directory_holds_one_fold_model_at_a_time(cohort):
    import gc
    import weakref

    models = load_model_dir(cohort["model_dir"])
    donors = list(models.by_held_out_donor)
    assert len(donors) >= 2
    first = weakref.ref(models.by_held_out_donor[donors[0]])
    assert models.by_held_out_donor[donors[0]] is first()  # asked again: not read again
    models.by_held_out_donor[donors[1]]
    gc.collect()
    assert first() is None


def test_the_cli_reproduces_its_output(cohort, tmp_path):
    c = cohort
    model_dir, lodo, out = tmp_path / "model", tmp_path / "lodo.json", tmp_path / "vis.h5ad"
    assert stmdit(["deepspot-train", "--expression", str(c["expression"]), "--features", str(c["store"]), "--spots",
                 *map(str, c["spots_paths"]), "--split", str(c["split"]), "--out-model", str(model_dir),
                 "--out-lodo", str(lodo), *c["tiny_args"]]) == 0
    assert stmdit(["deepspot-predict", "--model", str(model_dir), "--features", str(c["store"]), "--spots",
                 *map(str, c["spots_paths"]), "--out", str(out), "--device", "cpu"]) == 0
    assert np.array_equal(ad.read_h5ad(out).X, ad.read_h5ad(c["ptpl"]).X)
    assert json.loads(lodo.read_text())["pearson"] == json.loads(c["lodo"].read_text())["pearson"]
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "all_donors.safetensors", "config.json", "lodo-00.safetensors", "lodo-01.safetensors"]


def test_ptpl_h5ad_feeds_the_cancerfoundation_step(cohort, tmp_path):
    counts = read_cohort_counts(cohort["ptpl"])
    assert counts.keys == cohort["spots"]["key"].tolist()
    assert counts.highly_variable.tolist() == [True] * N_HVG + [False] * 2  # the Visium cohort's flags
    ptpl = ad.read_h5ad(cohort["ptpl"])
    assert ptpl.var["protein_coding"].all() and ptpl.uns["gene_set"]["name"] == "protein_coding"
    assert ptpl.uns["gene_set"]["version"] == "v1" and ptpl.uns["gene_set"]["n_genes"] == N_PROTEIN_CODING
    out = tmp_path / "cancerfoundation.zarr"
    assert main(["features", "--encoder", "cancerfoundation", "--impl", "smoke", "--expression", str(cohort["ptpl"]),
                 "--out", str(out), "--max-genes", "5", "--device", "cpu"]) == 0
    import zarr

    group = zarr.open_group(str(out), mode="r")
    genes = [str(g) for g in group["token_genes"][:]]
    assert genes == ["<cls>", "G1", "G2", "G3", "G0", "G6"]  # the top-5 HVGs of the Visium cohort
    assert group["embedding"].shape == (len(counts.keys), 256)
    assert np.isfinite(np.asarray(group["embedding"][:])).all()


def test_bad_input_names_the_file(cohort, tmp_path):
    spots = cohort["spots"]
    short = tmp_path / "short.zarr"
    rng = np.random.default_rng(1)
    write_store(short, spots["key"].tolist()[:-4], rng.standard_normal((len(spots) - 4, LATENT)), rng,
                rng.standard_normal((LATENT, DIM)))
    with pytest.raises(InputError, match="not in the feature store") as err:
        load_spot_features(short, spots)
    assert err.value.path == str(short)

    # one training donor left (B and C held out): no fold can label A without learning from A
    one_donor = tmp_path / "one_training_donor.parquet"
    write_parquet(assign_splits(spots, ["B", "C"], 0.2, seed=42), one_donor, provenance("split", {}, []))
    args = ["deepspot-train", "--expression", str(cohort["expression"]), "--features", str(cohort["store"]),
            "--spots", *map(str, cohort["spots_paths"]), "--split", str(one_donor), "--out-model", str(tmp_path / "m"),
            "--out-lodo", str(tmp_path / "l.json")]
    assert stmdit(args) == 2
    assert not (tmp_path / "m").exists() and not (tmp_path / "l.json").exists()
    training = read_training_cohort(cohort["expression"])
    with pytest.raises(InputError, match="at least 2 training donors") as err:
        donor_folds(training.donors, read_split_roles(one_donor, training.keys, training.donors))
    assert err.value.path == str(one_donor)
    # a split whose donors disagree with the expression file's is refused
    relabelled = pd.read_parquet(cohort["split"]).assign(donor="A")
    wrong = tmp_path / "wrong_donors.parquet"
    relabelled.to_parquet(wrong)
    with pytest.raises(InputError, match="belongs to donor 'A' here") as err:
        read_split_roles(wrong, training.keys, training.donors)
    assert err.value.path == str(wrong)
    # an H&E store from another encoder is refused before predicting
    models = load_model_dir(cohort["model_dir"])
    models.config["encoder"]["model"] = "another backbone"
    from stmdit.deepspot import check_encoder_matches

    with pytest.raises(InputError, match="differs"):
        check_encoder_matches(models, load_spot_features(cohort["store"], spots), cohort["store"])


def test_register_adds_both_subcommands():
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["deepspot-predict", "--model", "m", "--features", "f", "--spots", "a", "b", "--out", "o"])
    assert args.batch_size == 1024 and [str(s) for s in args.spots] == ["a", "b"]
    args = parser.parse_args(["deepspot-train", "--expression", "e", "--features", "f", "--spots", "a", "--split", "s",
                              "--out-model", "m", "--out-lodo", "l", "--no-standardize"])
    assert args.standardize is False and args.n_ensemble == 10 and args.dropout == 0.3 and args.lr == 1e-4


def test_the_fold_plan_keeps_the_test_donor_out_of_every_training_set(cohort):
    report = json.loads(cohort["lodo"].read_text())
    plan = report["fold_plan"]
    assert plan["test_donors"] == [TEST_DONOR] and plan["training_donors"] == ["A", "B"]
    assert plan["split"] == str(cohort["split"]) and str(cohort["split"]) in json.dumps(report["stmdit"]["inputs"])
    split = pd.read_parquet(cohort["split"]).set_index("key")
    donors = cohort["spots"].set_index("key")["donor"]
    for fold in plan["folds"]:
        d = fold["held_out_donor"]
        assert fold["train_donors"] == sorted({"A", "B"} - {d}) and fold["train_splits"] == ["train"]
        assert fold["n_train_spots"] == int(((split["split"] == "train") & (split["donor"] != d)).sum())
        assert fold["labels"]["donors"] == [d] and fold["labels"]["n_spots"] == int((donors == d).sum())
        assert set(fold["labels"]["n_by_split"]) == {"train", "val"}
    final = plan["all_training_donors"]
    assert final["train_donors"] == ["A", "B"] and final["train_splits"] == ["train"]
    assert final["n_train_spots"] == int((split["split"] == "train").sum())
    assert final["labels"]["donors"] == [TEST_DONOR] and final["labels"]["n_by_split"] == {
        "test": int((donors == TEST_DONOR).sum())}
    assert TEST_DONOR not in {d for f in [*plan["folds"], final] for d in f["train_donors"]}
    # the PTPL h5ad carries the same plan
    assert json.loads(ad.read_h5ad(cohort["ptpl"]).uns["fold_plan"]) == plan


def test_the_test_donors_data_moves_no_training_donors_pseudo_label(cohort, tmp_path):
    other = build_cohort(tmp_path, other_test_donor=True)
    before, after = ad.read_h5ad(cohort["ptpl"]), ad.read_h5ad(other["ptpl"])
    test = (before.obs["donor"] == TEST_DONOR).to_numpy()
    # the inputs did change: the test donor's features and counts
    assert not np.array_equal(ad.read_h5ad(cohort["expression"]).layers["counts"][test].toarray(),
                              ad.read_h5ad(other["expression"]).layers["counts"][test].toarray())
    assert not np.array_equal(after.X[test], before.X[test])
    assert np.array_equal(after.X[~test], before.X[~test])  # bit-identical
    assert np.array_equal(ad.read_h5ad(other["he_ptpl"]).X, ad.read_h5ad(cohort["he_ptpl"]).X)
    lodo_before, lodo_after = json.loads(cohort["lodo"].read_text()), json.loads(other["lodo"].read_text())
    assert lodo_after["pearson"] == lodo_before["pearson"] and lodo_after["per_gene"] == lodo_before["per_gene"]
    assert lodo_after["test_donors_pearson"] != lodo_before["test_donors_pearson"]


def test_target_gene_sets(cohort, tmp_path):
    protein_coding = read_training_cohort(cohort["expression"])
    assert list(protein_coding.genes.index) == [f"G{i}" for i in range(N_HVG)] + ["O0", "O1"]
    assert protein_coding.genes["highly_variable_rank"].isna().tolist() == [False] * N_HVG + [True] * 2
    hvg = read_training_cohort(cohort["expression"], "hvg")
    assert list(hvg.genes.index) == ["G1", "G2", "G3", "G0", "G6", "G5", "G7", "G4"]  # HVG rank order
    assert hvg.gene_set["name"] == "hvg" and hvg.gene_set["n_genes"] == N_HVG
    np.testing.assert_array_equal(hvg.targets[:, 3].toarray(), protein_coding.targets[:, 0].toarray())  # G0, same library sizes
    unannotated = ad.read_h5ad(cohort["expression"])
    del unannotated.var["protein_coding"]
    path = tmp_path / "no_list.h5ad"
    unannotated.write_h5ad(path)
    with pytest.raises(InputError, match='protein_coding.. is missing') as err:
        read_training_cohort(path)
    assert err.value.path == str(path)
    assert read_training_cohort(path, "hvg").targets.shape == hvg.targets.shape


# ---------------------------------------------------------------------------------------------
# The streamed paths against the dense computations they replaced (issue 16: no spots x genes
# matrix is dense in full). Each pins the new path to the old one: bit-identical, or float rounding.


def dense_log1p_cp10k(counts, columns):
    """The old targets: the whole matrix at once, dense float32."""
    counts = sp.csr_matrix(counts)
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(1e4, library, out=np.zeros_like(library), where=library > 0)
    selected = sp.csr_matrix(sp.diags(scale) @ counts[:, columns].astype(np.float64))
    selected.data = np.log1p(selected.data)
    return selected.astype(np.float32).toarray()


def dense_train_deepspot(features, targets, rows, config):
    """The old training loop: dense targets of every training spot, standardised at once."""
    from stmdit.deepspot import DeepSpot
    import torch.nn.functional as F

    model = DeepSpot(features.dim, targets.shape[1], config.hidden_dim, config.n_ensemble, config.dropout,
                     seed=config.seed)
    y = torch.as_tensor(targets[rows], dtype=torch.float32)
    if config.standardize:
        scale = y.std(dim=0, unbiased=False)
        model.target_mean.copy_(y.mean(dim=0))
        model.target_scale.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))
    y = (y - model.target_mean) / model.target_scale
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[], device_type="cpu"):
        torch.manual_seed(config.seed)
        for _ in range(config.epochs):
            permutation = order.permutation(len(rows))
            for start in range(0, len(rows), config.batch_size):
                batch = permutation[start:start + config.batch_size]
                loss = F.mse_loss(model(*features.batch(rows[batch], torch.device("cpu"))).float(), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


def test_sparse_targets_read_in_blocks_equal_the_dense_targets(cohort):
    counts = ad.read_h5ad(cohort["expression"]).layers["counts"]
    for genes in ("protein_coding", "hvg"):
        whole = read_training_cohort(cohort["expression"], genes)
        blocked = read_training_cohort(cohort["expression"], genes, block_rows=5)
        assert blocked.targets.dtype == np.float32 and blocked.targets.values.dtype == np.uint16
        assert blocked.targets.values.nbytes + blocked.targets.columns.nbytes == 4 * blocked.targets.nnz  # CSR: 8
        columns = [list(ad.read_h5ad(cohort["expression"]).var_names).index(g) for g in whole.genes.index]
        np.testing.assert_array_equal(blocked.targets.toarray(), dense_log1p_cp10k(counts, columns))  # bit-identical
        np.testing.assert_array_equal(whole.targets.toarray(), blocked.targets.toarray())


@pytest.mark.parametrize("counts_kind", ["small integers", "integers past uint16", "float32 non-integers",
                                         "float64 non-integers", "genes past uint16"])
def test_compact_target_rows_equal_the_log1p_cp10k_matrix(counts_kind):
    from stmdit.deepspot_targets import TargetRows, log1p_cp10k

    rng = np.random.default_rng(3)
    n_genes = 140_000 if counts_kind == "genes past uint16" else 300
    counts = sp.random(200, n_genes, density=0.02 if n_genes == 300 else 0.001, format="csr", random_state=4)
    counts.data = {"integers past uint16": rng.integers(1, 200_000, counts.nnz).astype(np.float32),
                   "float32 non-integers": rng.gamma(1.0, 3.0, counts.nnz).astype(np.float32),
                   "float64 non-integers": rng.gamma(1.0, 3.0, counts.nnz)}.get(
                       counts_kind, rng.integers(1, 60, counts.nnz).astype(np.float32))
    empty = np.ones(200)
    empty[7] = 0
    counts = sp.csr_matrix(sp.diags(empty) @ counts).astype(counts.dtype)  # spot 7 has no counts
    counts.eliminate_zeros()
    columns = rng.permutation(n_genes)[: n_genes // 2]  # a subset, not in file order (HVG rank order)
    reference = log1p_cp10k(counts, columns).toarray()
    targets = TargetRows(counts.nnz, columns.size)
    for start in range(0, 200, 64):
        targets.append(counts[start:start + 64], columns)
    targets.finish()
    expected_values = {"small integers": np.uint16, "genes past uint16": np.uint16, "integers past uint16": np.uint32,
                       "float32 non-integers": np.float32, "float64 non-integers": np.float64}[counts_kind]
    assert targets.values.dtype == expected_values
    assert targets.columns.dtype == (np.int32 if counts_kind == "genes past uint16" else np.uint16)
    np.testing.assert_array_equal(targets.toarray(), reference)  # bit-identical
    rows = rng.permutation(200)[:37]
    np.testing.assert_array_equal(targets[rows].toarray(), reference[rows])
    np.testing.assert_array_equal(targets[5:9].toarray(), reference[5:9])
    np.testing.assert_array_equal(targets[rows, 10:50].toarray(), reference[rows, 10:50])  # a gene block
    np.testing.assert_array_equal(targets[rows, [3, 1]].toarray(), reference[rows][:, [3, 1]])


def test_training_on_sparse_targets_equals_the_dense_training(cohort):
    from stmdit.deepspot import target_moments

    training = read_training_cohort(cohort["expression"])
    features = load_spot_features(cohort["store"], cohort["spots"])
    rows = np.flatnonzero(training.donors != TEST_DONOR)[::2]
    dense = training.targets.toarray()
    for standardize in (True, False):
        config = TrainingConfig(**{**TINY, "epochs": 3, "standardize": standardize})
        new = train_deepspot(features, training.targets, rows, config).state_dict()
        old = dense_train_deepspot(features, dense, rows, config).state_dict()
        assert all(torch.equal(new[k], old[k]) for k in old)  # bit-identical weights and target moments
    # gene blocks (when all genes do not fit in one): the same moments to float32 rounding
    y = torch.as_tensor(dense[rows])
    mean, std = target_moments(training.targets, rows, max_bytes=4 * len(rows) * 3)  # 3 genes per block
    torch.testing.assert_close(mean, y.mean(dim=0), rtol=1e-6, atol=0)
    torch.testing.assert_close(std, y.std(dim=0, unbiased=False), rtol=1e-6, atol=0)


def test_running_pearson_sums_equal_the_two_pass_pearson():
    from stmdit.deepspot import PearsonSums, pearson_per_gene

    rng = np.random.default_rng(5)
    predicted = (rng.gamma(2.0, 1.5, size=(1000, 7)) + 3.0).astype(np.float32)
    observed = (predicted * 0.5 + rng.standard_normal((1000, 7))).astype(np.float32)
    predicted[:, 2] = 0.0  # constant prediction: NaN, as the two-pass formula gives
    observed[:, 4] = 1.25  # constant observation
    reference = pearson_per_gene(predicted, observed)
    parts = [PearsonSums(7).add(predicted[a:b], observed[a:b]) for a, b in ((0, 1), (1, 300), (300, 301), (301, 1000))]
    merged = PearsonSums(7)
    for part in parts:
        merged.merge(part)
    for sums in (merged, PearsonSums(7).add(predicted, observed)):
        r = sums.r()
        assert np.array_equal(np.isnan(r), np.isnan(reference)) and np.isnan(r[[2, 4]]).all()
        np.testing.assert_allclose(r, reference, rtol=1e-12, atol=1e-14)  # float64 rounding


def test_lodo_pearson_equals_the_dense_out_of_fold_pearson(cohort):
    from stmdit.deepspot import pearson_per_gene

    training = read_training_cohort(cohort["expression"])
    features = load_spot_features(cohort["store"], cohort["spots"])
    folds = donor_folds(training.donors, read_split_roles(cohort["split"], training.keys, training.donors))
    lodo = leave_one_donor_out(features, training.targets, folds, TrainingConfig(**{**TINY, "epochs": 3}),
                               baselines=True, mlp_hidden=8, mlp_max_iter=5, predict_batch_size=7)
    dense = training.targets.toarray()
    predictions = np.zeros_like(dense)  # the old out-of-fold matrix
    for fold in folds:
        predictions[fold.label_rows] = predict_log1p(lodo.models[fold.held_out_donor], features, fold.label_rows,
                                                     batch_size=7, device="cpu")
    np.testing.assert_allclose(lodo.pearson["deepspot"], pearson_per_gene(predictions[lodo.rows], dense[lodo.rows]),
                               rtol=1e-12, atol=1e-14)
    for fold in folds:
        reference = pearson_per_gene(predictions[fold.label_rows], dense[fold.label_rows])
        assert lodo.per_donor["deepspot"][fold.held_out_donor]["median"] == pytest.approx(
            float(np.median(reference[np.isfinite(reference)])), rel=1e-12)
    assert set(lodo.pearson) == {"deepspot", "ridge", "mlp"}


def test_baselines_are_skipped_above_their_memory_bound(cohort, tmp_path, caplog):
    from stmdit.deepspot import choose_baselines

    assert choose_baselines(True, 4.0, 1000, 600)[0]
    run, why = choose_baselines(True, 4.0, 114_688, 19_338)
    assert not run and "skipped" in why and "106.5 GB" in why
    assert choose_baselines(False, 4.0, 10, 10) == (False, "off (--no-baselines)")
    c = cohort
    lodo = tmp_path / "lodo.json"
    with caplog.at_level("INFO", logger="stmdit.deepspot"):
        assert stmdit(["deepspot-train", "--expression", str(c["expression"]), "--features", str(c["store"]),
                       "--spots", *map(str, c["spots_paths"]), "--split", str(c["split"]),
                       "--out-model", str(tmp_path / "m"), "--out-lodo", str(lodo), *c["tiny_args"],
                       "--epochs", "2", "--baselines-max-gb", "0.000001"]) == 0
    report = json.loads(lodo.read_text())
    assert set(report["pearson"]) == {"deepspot"} and report["baselines"]["run"] is False
    assert "RidgeCV and MLP baselines: skipped" in caplog.text


def test_streamed_ptpl_h5ad_equals_the_in_memory_one(cohort, tmp_path):
    from stmdit.deepspot import ptpl_skeleton, write_ptpl

    models = load_model_dir(cohort["model_dir"])
    spots = cohort["spots"]
    features = load_spot_features(cohort["store"], spots)
    # spots interleaved among the three models: blocks wait for every model's batch
    fold_donor = np.random.default_rng(2).choice(["", "A", "B"], size=len(spots)).astype(object)
    reference = np.zeros((len(spots), models.config["architecture"]["n_genes"]), dtype=np.float32)
    for held_out in sorted(set(fold_donor)):  # the old predict_cohort
        rows = np.flatnonzero(fold_donor == held_out)
        model = models.by_held_out_donor[held_out] if held_out else models.all_donors
        reference[rows] = predict_log1p(model, features, rows, batch_size=4, device="cpu")
    blocks = list(iter_cohort_predictions(models, features, fold_donor, batch_size=4, device="cpu"))
    assert len(blocks) > 3 and max(len(b) for b in blocks) < len(spots)
    np.testing.assert_array_equal(np.concatenate(blocks), reference)  # bit-identical

    skeleton = ptpl_skeleton(spots, models.genes, fold_donor, {"step": "test"}, models.config["fold_plan"],
                             models.config.get("gene_set"))
    old = skeleton.copy()
    old.X = reference
    old.layers["counts"] = sp.csr_matrix(np.expm1(reference).astype(np.float32))
    old_path, new_path = tmp_path / "old.h5ad", tmp_path / "new.h5ad"
    old.write_h5ad(old_path)
    write_ptpl(new_path, skeleton, iter(blocks))
    before, after = ad.read_h5ad(old_path), ad.read_h5ad(new_path)
    assert after.X.dtype == np.float32 and np.array_equal(after.X, before.X)
    assert sp.issparse(after.layers["counts"]) and after.layers["counts"].dtype == np.float32
    assert (after.layers["counts"] != before.layers["counts"]).nnz == 0
    assert after.layers["counts"].nnz == before.layers["counts"].nnz
    pd.testing.assert_frame_equal(after.obs, before.obs)
    pd.testing.assert_frame_equal(after.var, before.var)
    assert after.uns.keys() == before.uns.keys() and after.uns["fold_plan"] == before.uns["fold_plan"]
    assert json.dumps(after.uns["gene_set"], default=str) == json.dumps(before.uns["gene_set"], default=str)
    np.testing.assert_array_equal(after.obsm["spatial"], before.obsm["spatial"])
    backed = ad.read_h5ad(new_path, backed="r")  # readers take row blocks
    np.testing.assert_array_equal(backed.X[3:9], reference[3:9])
    backed.file.close()


def test_cancerfoundation_reads_ptpl_counts_in_row_blocks(cohort):
    from stmdit.features import iter_count_batches

    counts = read_cohort_counts(cohort["ptpl"])
    whole = sp.csr_matrix(ad.read_h5ad(cohort["ptpl"]).layers["counts"])  # the old in-memory read
    columns = np.array([3, 0, 5])
    batches = list(iter_count_batches(counts, columns, batch_size=4, block_rows=10))
    counts.source.close()
    np.testing.assert_array_equal(np.concatenate([b for b, _ in batches]), whole[:, columns].toarray())
    assert [k for _, keys in batches for k in keys] == counts.keys
    assert max(len(b) for b, _ in batches) == 4


def test_a_cohort_that_cannot_fit_fails_with_one_line(cohort, tmp_path, monkeypatch, capsys):
    import stmdit.memory_budget

    monkeypatch.setattr(stmdit.memory_budget, "available_bytes", lambda: 1000)
    c = cohort
    code = main(["deepspot-train", "--expression", str(c["expression"]), "--features", str(c["store"]),
                 "--spots", *map(str, c["spots_paths"]), "--split", str(c["split"]),
                 "--out-model", str(tmp_path / "m"), "--out-lodo", str(tmp_path / "l.json"), *c["tiny_args"]])
    assert code == 2 and not (tmp_path / "m").exists() and not (tmp_path / "l.json").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if str(c["expression"]) in line]
    assert len(lines) == 1 and "needs about" in lines[0] and "GB of memory" in lines[0]


def test_a_store_of_another_encoder_is_named_before_any_estimate(cohort, tmp_path):
    c = cohort
    uni_only = tmp_path / "uni.zarr"
    keys = c["spots"]["key"].tolist()
    write_feature_store(uni_only, keys, [{"embedding": np.zeros((len(keys), DIM), np.float32)}], {"embedding": (DIM,)},
                        {"encoder": ENCODER})
    with pytest.raises(InputError, match="deepspot_fm store") as err:
        from stmdit.deepspot import feature_memory_bytes, load_spot_features as load

        assert feature_memory_bytes(uni_only) == 0
        load(uni_only, c["spots"])
    assert err.value.path == str(uni_only)


def test_features_read_in_row_blocks_equal_one_read(cohort, monkeypatch):
    import stmdit.features as features_module
    from stmdit.features import read_feature_rows

    keys = cohort["spots"]["key"].tolist()
    whole = read_feature_rows(cohort["store"], keys, ["embedding", "subtiles"])
    monkeypatch.setattr(features_module, "READ_BLOCK_ROWS", 7)
    blocked = read_feature_rows(cohort["store"], keys, ["embedding", "subtiles"])
    shuffled = read_feature_rows(cohort["store"], keys[::-1], ["subtiles"])
    for name in ("embedding", "subtiles"):
        assert blocked[name].dtype == whole[name].dtype and np.array_equal(blocked[name], whole[name])
    assert np.array_equal(shuffled["subtiles"], whole["subtiles"][::-1])
