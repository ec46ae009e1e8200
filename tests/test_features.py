"""Features stage: stores of a tiny cohort (two fake samples written in the COMMON.md formats),
row order, layout, attributes, batch-size independence, bad input and atomic writes."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import zarr

from stmdit.cli import main
from stmdit.encoders import load_encoder
from stmdit.errors import InputError
from stmdit.ge_inputs import GeTokenSource
from stmdit.loader import GeBatch
from stmdit.features import array_layout, open_feature_store, read_feature_rows, write_feature_store
from stmdit.provenance import provenance, write_parquet
from stmdit.zarr_rows import read_array_rows

from test_encoders import GENES, TINY_CF, make_images, randomize, tiny_cf_model, write_cf_checkpoint

SPOT_COLUMNS = ["key", "sample", "donor", "cohort", "barcode", "array_row", "array_col", "pxl_row", "pxl_col",
                "diameter_px", "foreground", "laplacian_var", "tissue_fraction", "label", "keep", "reason"]


def write_sample(root, sample: str, keep: list[bool], seed: int):
    """results/spots/{sample}.parquet and results/patches/{sample}.zarr as the spots stage writes them."""
    n = len(keep)
    barcodes = [f"AC{seed}{i:03d}-1" for i in range(n)]
    spots = pd.DataFrame({
        "key": [f"{sample}:{b}" for b in barcodes], "sample": sample, "donor": f"donor_{sample}", "cohort": "demo",
        "barcode": barcodes, "array_row": np.arange(n), "array_col": np.arange(n) * 2,
        "pxl_row": np.arange(n) * 100.0, "pxl_col": np.arange(n) * 90.0, "diameter_px": 110.0,
        "foreground": 0.8, "laplacian_var": 50.0, "tissue_fraction": 0.7, "label": "",
        "keep": keep, "reason": ["" if k else "blur" for k in keep],
    })[SPOT_COLUMNS]
    spots_path = root / "spots" / f"{sample}.parquet"
    spots_path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(spots, spots_path, provenance("spots", {}, []))
    patches_path = root / "patches" / f"{sample}.zarr"
    group = zarr.open_group(str(patches_path), mode="w", zarr_format=3)
    images = group.create_array("images", shape=(n, 256, 256, 3), dtype="uint8", chunks=(4, 256, 256, 3))
    images[:] = make_images(n, seed=seed)
    keys = group.create_array("spot_key", shape=(n,), dtype=str, chunks=(n,))
    keys[:] = spots["key"].to_numpy(dtype=object)
    group.attrs["stmdit"] = provenance("spots", {}, [])
    return spots_path, patches_path, spots


@pytest.fixture()
def cohort(tmp_path):
    a = write_sample(tmp_path, "a", [True, False, True, True, True, False, True, True, True], seed=1)
    b = write_sample(tmp_path, "b", [False, True, True, True, False, True], seed=2)
    kept = pd.concat([a[2][a[2]["keep"]], b[2][b[2]["keep"]]])
    return {"spots": [str(a[0]), str(b[0])], "patches": [str(a[1]), str(b[1])], "keys": kept["key"].tolist(),
            "root": tmp_path}


def image_args(cohort, encoder, out, *extra):
    return ["features", "--encoder", encoder, "--impl", "smoke", "--spots", *cohort["spots"],
            "--patches", *cohort["patches"], "--out", str(out), "--device", "cpu", *extra]


def kept_images(cohort) -> np.ndarray:
    parts = []
    for spots_path, patches_path in zip(cohort["spots"], cohort["patches"]):
        keep = pd.read_parquet(spots_path)["keep"].to_numpy()
        parts.append(zarr.open_group(patches_path, mode="r")["images"][:][keep])
    return np.concatenate(parts)


def test_uni2h_store_rows_are_the_kept_spots_in_cohort_order(cohort, tmp_path):
    out = tmp_path / "features" / "demo" / "uni2h.zarr"
    assert main(image_args(cohort, "uni2h", out, "--batch-size", "4")) == 0
    store = open_feature_store(out)
    assert list(store["spot_key"][:]) == cohort["keys"]
    embedding = store["embedding"]
    assert embedding.shape == (11, 1536) and embedding.dtype == np.float32
    expected = load_encoder("uni2h", "smoke", device="cpu").encode(kept_images(cohort))["embedding"]
    np.testing.assert_allclose(embedding[:], expected, rtol=1e-5, atol=1e-6)
    attrs = store.attrs.asdict()
    assert attrs["encoder"]["name"] == "uni2h" and attrs["encoder"]["impl"] == "smoke"
    assert attrs["encoder"]["shapes"] == {"embedding": [1536]}
    assert attrs["encoder"]["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert attrs["stmdit"]["step"] == "features" and attrs["stmdit"]["params"]["encoder"] == "uni2h"
    assert set(attrs["stmdit"]["inputs"]) == set(cohort["spots"] + cohort["patches"])
    assert not list(out.parent.glob(".*tmp*"))


def test_results_do_not_depend_on_batch_size(cohort, tmp_path):
    for encoder in ("sd3_vae", "deepspot_fm"):
        small, large = tmp_path / f"{encoder}_3.zarr", tmp_path / f"{encoder}_64.zarr"
        assert main(image_args(cohort, encoder, small, "--batch-size", "3")) == 0
        assert main(image_args(cohort, encoder, large, "--batch-size", "64")) == 0
        a, b = open_feature_store(small), open_feature_store(large)
        for name in a.attrs["encoder"]["shapes"]:
            np.testing.assert_array_equal(a[name][:], b[name][:])


def test_vae_and_deepspot_layout_and_dtypes(cohort, tmp_path):
    vae_out, ds_out = tmp_path / "sd3_vae.zarr", tmp_path / "deepspot_fm.zarr"
    assert main(image_args(cohort, "sd3_vae", vae_out)) == 0
    assert main(image_args(cohort, "deepspot_fm", ds_out, "--variant", "hoptimus0")) == 0
    latent = open_feature_store(vae_out)["latent"]
    assert latent.shape == (11, 16, 32, 32) and latent.dtype == np.float16
    assert latent.chunks == (8, 16, 32, 32) and latent.shards[0] == 16
    deepspot = open_feature_store(ds_out)
    assert deepspot["embedding"].shape == (11, 1536) and deepspot["subtiles"].shape == (11, 9, 1536)
    assert deepspot.attrs["encoder"]["shapes"]["subtiles"] == [9, 1536]
    vae = load_encoder("sd3_vae", "smoke", device="cpu")
    expected = vae.encode(kept_images(cohort))["latent"].astype(np.float16)
    np.testing.assert_array_equal(latent[:], expected)


def test_layout_puts_one_big_row_or_a_few_small_rows_per_chunk():
    assert array_layout(100_000, (1200, 256), 2) == ((1, 1200, 256), (109, 1200, 256))
    assert array_layout(100_000, (16, 32, 32), 2) == ((8, 16, 32, 32), (2048, 16, 32, 32))
    chunks, shards = array_layout(100_000, (1536,), 4)
    assert chunks == (42, 1536) and shards[0] % 42 == 0 and shards[0] * 1536 * 4 <= 64 * 2**20
    assert array_layout(7, (256,), 4) == ((7, 256), (7, 256))


@pytest.mark.parametrize("rows", [
    [37, 2, 2, 180, 99, 0, 199],          # sparse: concurrent row ranges
    list(range(199, 9, -1)) + [5, 5, 7],  # dense: one range read
    [],
])
def test_read_array_rows_matches_numpy_on_a_sharded_array(tmp_path, rows):
    data = np.random.default_rng(0).standard_normal((200, 6, 5)).astype(np.float16)
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, dtype="float16", chunks=(1, 6, 5),
                              shards=(64, 6, 5))
    array[:] = data
    np.testing.assert_array_equal(read_array_rows(array, rows), data[np.array(rows, dtype=int)])
    with pytest.raises(IndexError):
        read_array_rows(array, [200])


def test_read_feature_rows_in_requested_order(cohort, tmp_path):
    out = tmp_path / "h0mini.zarr"
    assert main(image_args(cohort, "h0mini", out)) == 0
    keys = [cohort["keys"][i] for i in (5, 0, 5, 9)]
    rows = read_feature_rows(out, keys)
    full = open_feature_store(out)["embedding"][:]
    np.testing.assert_array_equal(rows["embedding"], full[[5, 0, 5, 9]])
    with pytest.raises(InputError, match="h0mini.zarr.*not in the feature store, e.g. a:nope"):
        read_feature_rows(out, [cohort["keys"][0], "a:nope"])
    with pytest.raises(InputError, match="not found"):
        read_feature_rows(tmp_path / "missing.zarr", keys)


def test_empty_cohort_and_misaligned_patches_are_errors(cohort, tmp_path, capsys):
    empty = write_sample(tmp_path / "empty", "c", [False, False], seed=3)
    out = tmp_path / "empty.zarr"
    args = ["features", "--encoder", "uni2h", "--impl", "smoke", "--spots", str(empty[0]),
            "--patches", str(empty[1]), "--out", str(out), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stmdit features: error:") and "no kept spots" in err[-1]
    assert not out.exists()
    swapped = image_args({**cohort, "patches": cohort["patches"][::-1]}, "uni2h", out)
    assert main(swapped) == 2
    assert "rows do not match the spots table" in capsys.readouterr().err
    assert not out.exists()


def test_an_error_mid_run_leaves_no_store(cohort, tmp_path, monkeypatch):
    from stmdit.encoders.base import ImageEncoder

    calls = {"n": 0}
    original = ImageEncoder.encode

    def failing_encode(self, images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("encoder crashed")
        return original(self, images)

    monkeypatch.setattr(ImageEncoder, "encode", failing_encode)
    out = tmp_path / "features" / "uni2h.zarr"
    with pytest.raises(RuntimeError, match="encoder crashed"):
        main(image_args(cohort, "uni2h", out, "--batch-size", "2"))
    assert calls["n"] == 2
    assert not out.exists() and not list(out.parent.iterdir())


def test_non_finite_or_missing_outputs_leave_no_store(tmp_path):
    out = tmp_path / "x.zarr"
    bad = {"embedding": np.array([[0.0, np.nan]], dtype=np.float32)}
    with pytest.raises(ValueError, match="NaN"):
        write_feature_store(out, ["s:a"], [bad], {"embedding": (2,)}, {})
    with pytest.raises(ValueError, match="float16 range"):
        write_feature_store(out, ["s:a"], [{"latent": np.full((1, 2), 1e6)}], {"latent": (2,)}, {})
    with pytest.raises(RuntimeError, match="1 rows for 2 spots"):
        write_feature_store(out, ["s:a", "s:b"], [{"embedding": np.zeros((1, 2))}], {"embedding": (2,)}, {})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# CancerFoundation on the cohort h5ad


def write_expression(path, n_spots=12, seed=0):
    """A tiny results/expression/{cohort}.h5ad: raw counts layer, HVG flags and ranks."""
    rng = np.random.default_rng(seed)
    genes = GENES + ["NOVOCAB", "LOWVAR"]
    counts = rng.poisson(rng.uniform(0.2, 3.0, len(genes)), (n_spots, len(genes)))
    counts[2] = 0
    obs = pd.DataFrame({"sample": ["a"] * 6 + ["b"] * (n_spots - 6), "donor": "d", "label": ""},
                       index=[f"{'a' if i < 6 else 'b'}:BC{i:02d}-1" for i in range(n_spots)])
    var = pd.DataFrame(index=genes)
    var["highly_variable_rank"] = [5, 3, 8, 1, 0, 9, 2, 7, 4, 6, 0.5, np.nan]
    var["highly_variable"] = np.isfinite(var["highly_variable_rank"].to_numpy())
    adata = ad.AnnData(X=sp.csr_matrix(np.log1p(counts).astype(np.float32)), obs=obs, var=var)
    adata.layers["counts"] = sp.csr_matrix(counts.astype(np.int64))
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return adata


def test_cancerfoundation_smoke_store_follows_obs_order_and_hvg_ranks(tmp_path):
    h5ad = tmp_path / "expression" / "demo.h5ad"
    adata = write_expression(h5ad)
    out = tmp_path / "cf.zarr"
    def args(out, batch_size):
        return ["features", "--encoder", "cancerfoundation", "--impl", "smoke", "--expression", str(h5ad),
                "--out", str(out), "--max-genes", "6", "--seed", "0", "--batch-size", str(batch_size), "--device", "cpu"]

    assert main(args(out, 5)) == 0
    store = open_feature_store(out)
    assert list(store["spot_key"][:]) == list(adata.obs_names)
    assert list(store["token_genes"][:]) == ["<cls>", "ACTB", "NOVOCAB", "KRT19", "COL1A1", "MS4A1", "MKI67"]
    # the store keeps the CLS and the encoder's input (bins), not the 7 x 256 tokens
    assert "tokens" not in store and "token_mask" not in store
    assert store["bins"].shape == (12, 6) and store["bins"].dtype == np.uint8
    assert store["bins"][:].max() <= 50 and not store["bins"][2].any()  # spot 2 has no counts: all bin 0
    assert store["embedding"].shape == (12, 256) and store["embedding"].dtype == np.float32
    encoder = store.attrs["encoder"]
    assert encoder["name"] == "cancerfoundation" and encoder["preprocessing"]["genes"] == 6
    assert store.attrs["stmdit"]["params"]["max_genes"] == 6
    again = tmp_path / "cf_batch64.zarr"
    assert main(args(again, 64)) == 0
    for name in ("bins", "embedding"):
        np.testing.assert_array_equal(open_feature_store(again)[name][:], store[name][:])
    tokens, mask = GeTokenSource(out).rows(np.arange(12))
    assert tokens.shape == (12, 7, 256) and tokens.dtype == torch.float32 and mask.all()
    np.testing.assert_array_equal(tokens[:, 0].numpy(), store["embedding"][:])  # the CLS is token 0


def test_cancerfoundation_real_store_uses_vocab_genes_only(tmp_path):
    h5ad = tmp_path / "demo.h5ad"
    write_expression(h5ad)
    model = tiny_cf_model()
    weights = write_cf_checkpoint(tmp_path / "cf_weights", model.state_dict())
    out = tmp_path / "cf_real.zarr"
    args = ["features", "--encoder", "cancerfoundation", "--impl", "real", "--weights", str(weights),
            "--expression", str(h5ad), "--out", str(out), "--max-genes", "1199", "--seed", "1", "--device", "cpu",
            "--gene-selection", "hvg_rank"]  # the pipeline's ranks (cell_ranger needs more genes than this)
    assert main(args) == 0
    store = open_feature_store(out)
    genes = list(store["token_genes"][:])
    # every vocab HVG fits (max_seq_len 12 allows 11); NOVOCAB is not in the vocab, LOWVAR is no HVG
    assert genes[0] == "<cls>" and "NOVOCAB" not in genes and "LOWVAR" not in genes
    assert genes[1:] == ["ACTB", "KRT19", "COL1A1", "MS4A1", "MKI67", "CD3E", "SPP1", "VIM", "EPCAM", "PTPRC"]
    assert store["bins"].shape == (12, 10)
    tokens, _ = GeTokenSource(out).rows(np.arange(12))
    assert tokens.shape == (12, 11, TINY_CF["embsize"]) and torch.isfinite(tokens).all()
    recorded = json.loads(json.dumps(store.attrs["encoder"]))
    assert recorded["weights"] == str(weights)
    assert set(recorded["weights_sha256"]) == {"model.pth", "args.json", "vocab.json"}


def test_ge_tokens_from_stored_bins_are_the_encoders_float32_tokens_bit_for_bit(tmp_path):
    """Goal 1 of the stores issue: the tokens a model attends to, encoded from the stored bins, equal
    what the encoder computes from the counts before the float16 cast that stores used to apply."""
    h5ad = tmp_path / "demo.h5ad"
    adata = write_expression(h5ad, n_spots=40)
    weights = write_cf_checkpoint(tmp_path / "cf_weights", tiny_cf_model().state_dict())
    out = tmp_path / "cf.zarr"
    assert main(["features", "--encoder", "cancerfoundation", "--impl", "real", "--weights", str(weights),
                 "--expression", str(h5ad), "--out", str(out), "--seed", "3", "--device", "cpu", "--batch-size", "16",
                 "--gene-selection", "hvg_rank", "--binning", "reference"]) == 0
    store = open_feature_store(out)
    genes = [str(g) for g in store["token_genes"][1:]]
    keys = [str(k) for k in store["spot_key"][:]]
    # the reference: the released network run on this encoder's bins of the h5ad's counts
    encoder = load_encoder("cancerfoundation", "real", weights=str(weights), device="cpu", seed=3)
    encoder.configure(binning="reference")
    encoder.genes = genes
    counts = adata.layers["counts"].toarray()[:, [list(adata.var_names).index(g) for g in genes]]
    bins = encoder.bins(counts, keys)
    np.testing.assert_array_equal(store["bins"][:], bins)
    ids = torch.tensor([encoder.vocab["<cls>"]] + [encoder.vocab[g] for g in genes]).expand(len(keys), -1)
    values = torch.cat([torch.full((len(keys), 1), -2.0), torch.from_numpy(bins).float()], dim=1)
    with torch.no_grad():
        expected = encoder.network(ids, values, torch.zeros(ids.shape, dtype=torch.bool))
    source = GeTokenSource(out)
    tokens, mask = source.rows(np.arange(len(keys)))
    assert torch.equal(tokens, expected) and mask.all()
    # a batch of other spots (the loader's random micro-batches) gives the same rows
    picked = np.array([7, 0, 31, 12, 5])
    assert torch.equal(source.rows(picked)[0], expected[picked])
    assert torch.equal(source.complete(GeBatch(expected[picked, 0], bins=torch.from_numpy(bins[picked]))).tokens,
                       expected[picked])
    # within float16 rounding of the tokens stores held before (float16 of the same values)
    stored_before = expected.numpy().astype(np.float16)
    half_ulp = np.spacing(np.abs(stored_before)).astype(np.float32) / 2  # float16's
    assert (np.abs(tokens.numpy() - stored_before.astype(np.float32)) <= half_ulp).all()

    # other weights at the recorded path: one error naming the store and both digests
    write_cf_checkpoint(weights, randomize(tiny_cf_model(), seed=11).state_dict())
    with pytest.raises(InputError, match="is not the one that wrote this store") as error:
        GeTokenSource(out)
    assert str(out) in str(error.value) and "model.pth" in str(error.value) and "\n" not in str(error.value)


def test_cancerfoundation_input_errors(tmp_path, capsys):
    h5ad = tmp_path / "demo.h5ad"
    adata = write_expression(h5ad)
    del adata.layers["counts"]
    no_counts = tmp_path / "nocounts.h5ad"
    adata.write_h5ad(no_counts)
    out = tmp_path / "cf.zarr"
    base = ["features", "--encoder", "cancerfoundation", "--impl", "smoke", "--out", str(out), "--device", "cpu"]
    assert main(base + ["--expression", str(no_counts)]) == 2
    assert 'layers["counts"] is missing' in capsys.readouterr().err
    assert main(base + ["--expression", str(tmp_path / "absent.h5ad")]) == 2
    assert main(base) == 2
    assert "needs --expression" in capsys.readouterr().err
    assert not out.exists()


def test_sampling_refuses_a_ge_store_written_by_other_weights_than_the_models_training(tmp_path):
    from stmdit.ge_inputs import check_trained_encoder, encoder_identity, same_encoder

    h5ad = tmp_path / "demo.h5ad"
    write_expression(h5ad)
    weights = {name: write_cf_checkpoint(tmp_path / name, randomize(tiny_cf_model(), seed=seed).state_dict())
               for name, seed in (("a", 1), ("b", 2))}
    out = tmp_path / "cf.zarr"
    assert main(["features", "--encoder", "cancerfoundation", "--impl", "real", "--weights", str(weights["a"]),
                 "--expression", str(h5ad), "--out", str(out), "--device", "cpu", "--gene-selection", "hvg_rank"]) == 0
    source = GeTokenSource(out)
    trained_with = {name: encoder_identity(load_encoder("cancerfoundation", "real", weights=str(path),
                                                        device="cpu").describe()) for name, path in weights.items()}
    model_json = tmp_path / "training.json"
    check_trained_encoder(trained_with["a"], source.identity, model_json, out)  # the same weights: nothing to say
    check_trained_encoder(None, source.identity, model_json, out)  # a model trained before the record was kept
    with pytest.raises(InputError, match="the model was trained with CancerFoundation") as error:
        check_trained_encoder(trained_with["b"], source.identity, model_json, out)
    assert "training.json" in str(error.value) and str(out) in str(error.value)
    # a record of model.pth alone (stores written before args and vocab were hashed) still compares
    older = {**trained_with["a"], "weights_sha256": {"model.pth": trained_with["a"]["weights_sha256"]["model.pth"]}}
    assert same_encoder(older, source.identity)
    older["weights_sha256"] = {"model.pth": trained_with["b"]["weights_sha256"]["model.pth"]}
    assert not same_encoder(older, source.identity)
    with pytest.raises(InputError):
        check_trained_encoder(older, source.identity, tmp_path / "training.json", out)


def test_a_ge_store_with_neither_bins_nor_tokens_says_how_to_rebuild_it(tmp_path):
    keys = ["a:1", "a:2"]
    write_feature_store(tmp_path / "cf.zarr", keys, [{"embedding": np.zeros((2, 8), np.float32)}], {"embedding": (8,)},
                        {})
    with pytest.raises(InputError, match="rebuild it with stmdit features --encoder cancerfoundation"):
        GeTokenSource(tmp_path / "cf.zarr")
