"""Encoder registry: real loaders against tiny instances of the same architectures saved in their
original checkpoint formats, CancerFoundation's binning and gene list, and the smoke stand-ins."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from stmdit.encoders import REGISTRY, get_spec, load_encoder
from stmdit.encoders.base import IMAGENET_MEAN, IMAGENET_STD, subtile_bounds
from stmdit.encoders.cancerfoundation import (
    CancerFoundationArgs,
    CancerFoundationModel,
    bin_counts,
    bin_spot,
    select_genes,
    spot_rng,
)
from stmdit.encoders.vit import HOPTIMUS_MEAN, HOPTIMUS_STD
from stmdit.errors import InputError

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}


def make_images(n: int, seed: int = 0, size: int = 256) -> np.ndarray:
    """Smooth colour gradients plus a random bright square: H&E-like enough to move every statistic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        base = np.stack([a * yy + b * xx + c for a, b, c in rng.uniform(-0.5, 0.5, (3, 3)) + [0, 0, 0.5]], axis=-1)
        side = size // 4
        r0, c0 = rng.integers(0, size - side, 2)
        base[r0:r0 + side, c0:c0 + side] = rng.uniform(0, 1, 3)
        images[i] = np.clip(base * 255, 0, 255).astype(np.uint8)
    return images


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter (layer scales too), so every weight shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def reference_pixels(images: np.ndarray, size: int, mean, std, mode="bilinear") -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
    if mode == "bicubic":
        x = x.clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------
# timm encoders


def save_timm(model: torch.nn.Module, directory, fmt: str = "bin", config: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def uni2h_tiny():
    return randomize(timm.create_model(
        "vit_giant_patch14_224", pretrained=False, patch_size=14, init_values=1e-5, mlp_ratio=2.66667 * 2,
        num_classes=0, no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
        reg_tokens=8, dynamic_img_size=True, **TINY_VIT,
    ))


def test_uni2h_real_loader_matches_the_saved_model(tmp_path):
    model = uni2h_tiny()
    weights = save_timm(model, tmp_path / "uni2h")
    encoder = load_encoder("uni2h", "real", weights=str(weights), arch=TINY_VIT, device="cpu")
    images = make_images(3)
    out = encoder.encode(images)["embedding"]
    with torch.no_grad():
        expected = model(reference_pixels(images, 28, IMAGENET_MEAN, IMAGENET_STD)).numpy()
    assert out.shape == (3, 32) and encoder.output_shapes == {"embedding": (32,)}
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert encoder.describe()["weights"].endswith("pytorch_model.bin")


def test_checkpoint_that_does_not_fit_the_architecture_is_an_error(tmp_path):
    state = uni2h_tiny().state_dict()
    del state["reg_token"]
    state["head.weight"] = torch.zeros(3, 32)
    (tmp_path / "bad").mkdir()
    torch.save(state, tmp_path / "bad" / "pytorch_model.bin")
    with pytest.raises(InputError, match="missing key.*reg_token.*unexpected key.*head.weight"):
        load_encoder("uni2h", "real", weights=str(tmp_path / "bad"), arch=TINY_VIT, device="cpu")


def test_hub_ids_need_permission_and_missing_paths_are_errors(tmp_path):
    with pytest.raises(InputError, match="allow_hub"):
        load_encoder("uni2h", "real", weights="MahmoodLab/UNI2-h", device="cpu")
    with pytest.raises(InputError, match="allow_hub"):
        load_encoder("h0mini", "real", device="cpu")
    with pytest.raises(InputError, match="not found"):
        load_encoder("uni2h", "real", weights=str(tmp_path / "nope" / "weights.bin"), device="cpu")
    with pytest.raises(InputError, match="no variant"):
        load_encoder("uni2h", "smoke", variant="uni")


def test_h0mini_reads_safetensors_and_timm_config(tmp_path):
    model = randomize(timm.create_model(
        "vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, mlp_ratio=3.0,
        mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, **TINY_VIT,
    ))
    config = {"architecture": "vit_base_patch14_reg4_dinov2", "num_classes": 0, "model_args": {"mlp_ratio": 3.0}}
    weights = save_timm(model, tmp_path / "h0mini", fmt="safetensors", config=config)
    encoder = load_encoder("h0mini", "real", weights=str(weights), arch={**TINY_VIT, "mlp_ratio": 3.0}, device="cpu")
    images = make_images(2, seed=1)
    with torch.no_grad():
        expected = model.forward_features(reference_pixels(images, 28, HOPTIMUS_MEAN, HOPTIMUS_STD, "bicubic"))[:, 0]
    np.testing.assert_allclose(encoder.encode(images)["embedding"], expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["uni", "hoptimus0"])
def test_deepspot_fm_embeds_tile_and_3x3_subtiles(tmp_path, variant):
    if variant == "uni":
        arch = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}
        model = timm.create_model("vit_large_patch16_224", pretrained=False, init_values=1e-5, num_classes=0,
                                  dynamic_img_size=True, **arch)
        mean, std, mode = IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    else:
        arch = dict(TINY_VIT)
        model = timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, init_values=1e-5,
                                  num_classes=0, mlp_ratio=5.33334, global_pool="token", dynamic_img_size=False, **arch)
        mean, std, mode = HOPTIMUS_MEAN, HOPTIMUS_STD, "bicubic"
    model = randomize(model)
    weights = save_timm(model, tmp_path / variant)
    encoder = load_encoder("deepspot_fm", "real", weights=str(weights), arch=arch, variant=variant, device="cpu")
    images = make_images(2, seed=2)
    out = encoder.encode(images)
    size = arch["img_size"]
    assert out["embedding"].shape == (2, 32) and out["subtiles"].shape == (2, 9, 32)
    with torch.no_grad():
        np.testing.assert_allclose(out["embedding"], model(reference_pixels(images, size, mean, std, mode)).numpy(),
                                   rtol=1e-4, atol=1e-5)
        bounds = subtile_bounds(256, 3)
        for k, ((r0, r1), (c0, c1)) in enumerate([(r, c) for r in bounds for c in bounds]):
            crop = np.ascontiguousarray(images[:, r0:r1, c0:c1])
            expected = model(reference_pixels(crop, size, mean, std, mode)).numpy()
            np.testing.assert_allclose(out["subtiles"][:, k], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(out["subtiles"][:, 0], out["subtiles"][:, 8])


# ---------------------------------------------------------------------------------------------
# transformers (Midnight) and diffusers (SD3 VAE)


def test_midnight_real_loader_is_cls_plus_mean_patch_token(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    model = randomize(Dinov2Model(config))
    model.save_pretrained(tmp_path / "midnight")
    encoder = load_encoder("midnight", "real", weights=str(tmp_path / "midnight"), arch={"input_size": 28}, device="cpu")
    images = make_images(2, seed=3)
    with torch.no_grad():
        hidden = model(pixel_values=reference_pixels(images, 28, (0.5,) * 3, (0.5,) * 3)).last_hidden_state
    expected = torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1).numpy()
    out = encoder.encode(images)["embedding"]
    assert out.shape == (2, 64)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False,
    )
    return randomize(vae, seed=1)


def test_sd3_vae_real_loader_stores_shifted_scaled_mean_and_decodes(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "sd3" / "vae")
    encoder = load_encoder("sd3_vae", "real", weights=str(tmp_path / "sd3"), arch={"input_size": 32}, device="cpu")
    images = make_images(2, seed=4, size=32)
    latent = encoder.encode(images)["latent"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        expected = ((mean - 0.0609) * 1.5305).numpy()
        decoded = vae.decode(torch.from_numpy(expected) / 1.5305 + 0.0609).sample.clamp(-1, 1)
    assert latent.shape == (2, 16, 16, 16) and encoder.output_shapes == {"latent": (16, 16, 16)}
    np.testing.assert_allclose(latent, expected, rtol=1e-4, atol=1e-5)
    again = encoder.encode(images)["latent"]
    np.testing.assert_array_equal(latent, again)  # the mean, not a sample
    np.testing.assert_allclose(encoder.decode_tensor(torch.from_numpy(latent)).numpy(), decoded.numpy(), atol=1e-4)
    assert encoder.decode(latent).shape == (2, 32, 32, 3)
    assert encoder.describe()["preprocessing"]["shift_factor"] == pytest.approx(0.0609)


# ---------------------------------------------------------------------------------------------
# CancerFoundation: binning, gene list, checkpoint layouts


def scgpt_digitize(row: np.ndarray, n_bins: int) -> np.ndarray:
    """scGPT's binning for tie-free rows: digitize by the quantiles of the non-zero values."""
    out = np.zeros(row.shape, dtype=np.int64)
    nonzero = row > 0
    edges = np.quantile(row[nonzero], np.linspace(0, 1, n_bins - 1))
    out[nonzero] = np.digitize(row[nonzero], edges)
    return out


def test_binning_equals_scgpt_quantile_bins_without_ties():
    rng = np.random.default_rng(0)
    row = np.zeros(260)
    row[rng.choice(260, 200, replace=False)] = rng.permutation(np.arange(1, 201)) * 1.5
    bins = bin_spot(row, 51, spot_rng(0, "s:a"))
    np.testing.assert_array_equal(bins, scgpt_digitize(row, 51))
    assert bins.min() == 0 and bins[row > 0].min() == 1 and bins.max() == 50


def test_ties_are_broken_by_a_seeded_permutation_per_spot():
    row = np.array([0, 1, 1, 1, 1, 1, 1, 2, 2, 5, 9, 0, 1, 1, 3, 3, 3, 3, 7, 1])
    first = bin_spot(row, 11, spot_rng(0, "s:a"))
    np.testing.assert_array_equal(first, bin_spot(row, 11, spot_rng(0, "s:a")))
    others = [bin_spot(row, 11, spot_rng(seed, "s:a")) for seed in range(1, 6)]
    assert any(not np.array_equal(first, o) for o in others)
    assert not np.array_equal(first, bin_spot(row, 11, spot_rng(0, "s:b")))
    for bins in [first, *others]:
        for value in np.unique(row):  # a tie group always occupies the same bins, only their order moves
            np.testing.assert_array_equal(np.sort(bins[row == value]), np.sort(first[row == value]))
        assert all(bins[row == a].max() <= bins[row == b].min() for a, b in [(1, 2), (2, 3), (3, 5), (7, 9)])
    assert (first[row == 0] == 0).all() and first.max() == 10


def test_zero_and_single_count_spots_and_batch_independence():
    counts = np.array([[0, 0, 0, 0], [0, 4, 0, 0], [3, 1, 1, 2]])
    keys = ["s:zero", "s:one", "s:many"]
    bins = bin_counts(counts, keys, 51, seed=0)
    np.testing.assert_array_equal(bins[0], 0)
    np.testing.assert_array_equal(bins[1], [0, 50, 0, 0])
    assert bins[2, 0] == 50 and bins[2, 3] == 33 and set(bins[2, 1:3]) == {1, 17}
    alone = np.vstack([bin_counts(counts[i:i + 1], keys[i:i + 1], 51, seed=0) for i in range(3)])
    np.testing.assert_array_equal(bins, alone)


def test_gene_list_is_top_ranked_vocab_hvgs():
    names = ["A", "B", "C", "D", "E", "F"]
    rank = [3.0, np.nan, 0.0, 1.0, 2.0, 5.0]
    flags = [True, False, True, True, True, False]
    assert list(select_genes(names, rank, 10, flags)) == [2, 3, 4, 0]
    assert list(select_genes(names, rank, 2, flags)) == [2, 3]
    assert list(select_genes(names, rank, 10, flags, usable={"A", "D", "F"})) == [3, 0]
    assert list(select_genes(names, rank, 10)) == [2, 3, 4, 0, 5]


TINY_CF = {"embsize": 16, "nheads": 2, "d_hid": 32, "nlayers": 2, "n_bins": 11, "max_seq_len": 12, "dropout": 0.2}
GENES = ["CD3E", "MS4A1", "EPCAM", "KRT19", "ACTB", "PTPRC", "COL1A1", "VIM", "MKI67", "SPP1"]


def cf_vocab() -> dict[str, int]:
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2}
    vocab.update({g: i + 3 for i, g in enumerate(GENES + ["NOTUSED"])})
    return vocab


def released_layout(state: dict) -> dict:
    """The pre-training model's names: attention wrapped in CFLayer's MHA, plus decoder heads."""
    out = {k.replace(".self_attn.", ".self_attn.self_attn."): v for k, v in state.items()}
    out["decoder.fc.0.weight"] = torch.zeros(16, 16)
    out["mvc_decoder.gene2query.weight"] = torch.zeros(16, 16)
    out["flag_encoder.weight"] = torch.zeros(2, 16)
    return out


def scgpt_layout(state: dict) -> dict:
    """scGPT's names (encoder = gene encoder, transformer_encoder, flash-attention Wqkv) under DDP's prefix."""
    out = {}
    for k, v in state.items():
        if k.startswith("gene_encoder."):
            k = "encoder." + k[len("gene_encoder."):]
        elif k.startswith("encoder."):
            k = "transformer_encoder." + k[len("encoder."):]
        k = k.replace(".self_attn.in_proj_weight", ".self_attn.Wqkv.weight").replace(".self_attn.in_proj_bias", ".self_attn.Wqkv.bias")
        out["module." + k] = v
    return out


def write_cf_checkpoint(directory, state: dict, args: dict = TINY_CF):
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "model.pth")
    (directory / "args.json").write_text(json.dumps({**args, "trunc_by_sample": True, "n_layers_cls": 3}))
    (directory / "vocab.json").write_text(json.dumps(cf_vocab()))
    return directory


def tiny_cf_model() -> CancerFoundationModel:
    return randomize(CancerFoundationModel(len(cf_vocab()), 0, CancerFoundationArgs(**TINY_CF)), seed=5)


@pytest.mark.parametrize("layout", ["plain", "released", "scgpt"])
def test_cancerfoundation_real_loader_matches_saved_model(tmp_path, layout):
    model = tiny_cf_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"plain": state, "released": released_layout(state), "scgpt": scgpt_layout(state)}[layout]
    directory = write_cf_checkpoint(tmp_path / "cf", state)
    encoder = load_encoder("cancerfoundation", "real", weights=str(directory), device="cpu", seed=3)
    encoder.configure(gene_selection="hvg_rank", l2_normalize=False, binning="rank")
    names = np.array(GENES + ["NOVOCAB"])
    rank = np.arange(len(names), dtype=float)[::-1]  # NOVOCAB most variable, CD3E least
    columns = encoder.choose_genes(names, rank, max_genes=8)
    assert encoder.genes == ["SPP1", "MKI67", "VIM", "COL1A1", "PTPRC", "ACTB", "KRT19", "EPCAM"]
    assert list(columns) == [9, 8, 7, 6, 5, 4, 3, 2]
    counts = np.random.default_rng(1).poisson(2.0, (3, 8))
    counts[1] = 0
    keys = ["s:a", "s:b", "s:c"]
    out = encoder.encode(counts, keys)
    assert out["tokens"].shape == (3, 9, 16) and out["embedding"].shape == (3, 16)
    assert out["token_mask"].all() and np.isfinite(out["tokens"]).all()

    vocab = cf_vocab()
    genes = torch.tensor([[vocab["<cls>"]] + [vocab[g] for g in encoder.genes]] * 3)
    values = torch.cat([torch.full((3, 1), -2.0), torch.from_numpy(bin_counts(counts, keys, 11, 3)).float()], dim=1)
    with torch.no_grad():
        expected = model(genes, values, torch.zeros(3, 9, dtype=torch.bool)).numpy()
    np.testing.assert_allclose(out["tokens"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["embedding"], expected[:, 0], rtol=1e-4, atol=1e-5)


def test_cancerfoundation_unknown_or_missing_weights_are_errors(tmp_path):
    state = dict(tiny_cf_model().state_dict())
    extra = {**state, "mystery_head.weight": torch.zeros(2)}
    with pytest.raises(InputError, match="unexpected key.*mystery_head"):
        load_encoder("cancerfoundation", "real", weights=str(write_cf_checkpoint(tmp_path / "a", extra)), device="cpu")
    missing = {k: v for k, v in state.items() if not k.startswith("value_encoder.linear2")}
    with pytest.raises(InputError, match="missing key.*value_encoder.linear2"):
        load_encoder("cancerfoundation", "real", weights=str(write_cf_checkpoint(tmp_path / "b", missing)), device="cpu")
    (tmp_path / "c").mkdir()
    with pytest.raises(InputError, match="missing \\['model.pth'"):
        load_encoder("cancerfoundation", "real", weights=str(tmp_path / "c"), device="cpu")
    with pytest.raises(InputError, match="needs weights"):
        load_encoder("cancerfoundation", "real", device="cpu")


def test_cancerfoundation_arch_override_sizes_the_model(tmp_path):
    big = {**TINY_CF, "embsize": 24, "d_hid": 48}
    model = randomize(CancerFoundationModel(len(cf_vocab()), 0, CancerFoundationArgs(**big)))
    directory = write_cf_checkpoint(tmp_path / "cf", model.state_dict(), args=TINY_CF)  # args.json says 16
    with pytest.raises(InputError, match="wrong shape"):
        load_encoder("cancerfoundation", "real", weights=str(directory), device="cpu")
    encoder = load_encoder("cancerfoundation", "real", weights=str(directory), arch={"embsize": 24, "d_hid": 48},
                           device="cpu")
    assert encoder.dim == 24


# ---------------------------------------------------------------------------------------------
# Smoke stand-ins


@pytest.mark.parametrize("name", ["uni2h", "sd3_vae", "deepspot_fm", "h0mini", "midnight"])
def test_smoke_image_encoders_are_deterministic_content_sensitive_and_shaped(name):
    images = make_images(3, seed=7)
    first = load_encoder(name, "smoke", device="cpu").encode(images)
    second = load_encoder(name, "smoke", device="cpu").encode(images)
    other = load_encoder(name, "smoke", device="cpu").encode(make_images(3, seed=8))
    assert {k: v.shape[1:] for k, v in first.items()} == get_spec(name).output_shapes()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
        assert first[key].dtype == np.float32
        assert not np.allclose(first[key], other[key])
        assert not np.allclose(first[key][0], first[key][1])  # different patches, different rows


def test_smoke_embedding_of_one_patch_does_not_depend_on_its_batch():
    encoder = load_encoder("uni2h", "smoke", device="cpu")
    images = make_images(4, seed=9)
    together = encoder.encode(images)["embedding"]
    alone = np.vstack([encoder.encode(images[i:i + 1])["embedding"] for i in range(4)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_smoke_vae_decode_of_encode_is_the_blurred_image():
    vae = load_encoder("sd3_vae", "smoke", device="cpu")
    images = make_images(2, seed=10)
    latent = vae.encode(images)["latent"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    blurred = F.interpolate(F.avg_pool2d(x, 8), scale_factor=8, mode="bilinear", align_corners=False)
    expected = ((blurred.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    decoded = vae.decode(latent)
    assert decoded.dtype == np.uint8 and decoded.shape == images.shape
    assert np.abs(decoded.astype(float) - expected).max() <= 1
    assert np.abs(decoded.astype(float) - images).mean() < 12  # smooth images survive the blur


def test_smoke_cancerfoundation_follows_the_counts():
    encoder = load_encoder("cancerfoundation", "smoke", seed=0)
    names = [f"G{i}" for i in range(30)]
    encoder.choose_genes(names, np.arange(30.0), max_genes=20)
    counts = np.random.default_rng(0).poisson(1.5, (4, 20))
    counts[3] = 0
    out = encoder.encode(counts, ["a", "b", "c", "d"])
    assert out["tokens"].shape == (4, 21, 256) and out["embedding"].shape == (4, 256)
    np.testing.assert_array_equal(out["tokens"][:, 0], out["embedding"])
    assert np.isfinite(out["tokens"]).all() and out["token_mask"].all()
    assert not np.allclose(out["embedding"][0], out["embedding"][1])
    again = load_encoder("cancerfoundation", "smoke", seed=0)
    again.choose_genes(names, np.arange(30.0), max_genes=20)
    np.testing.assert_array_equal(again.encode(counts, ["a", "b", "c", "d"])["tokens"], out["tokens"])


def test_registry_lists_every_encoder_with_shapes():
    assert set(REGISTRY) == {"uni2h", "sd3_vae", "cancerfoundation", "deepspot_fm", "h0mini", "midnight"}
    assert get_spec("uni2h").output_shapes() == {"embedding": (1536,)}
    assert get_spec("deepspot_fm").output_shapes("hoptimus0")["subtiles"] == (9, 1536)
    assert get_spec("midnight").output_shapes() == {"embedding": (3072,)}
    with pytest.raises(InputError, match="unknown encoder"):
        get_spec("resnet")
