"""Sampling: the samplers land on x0 for oracle models, samples do not depend on the batch, guidance
with s = 1 is the conditional model, perturbation rows share their reference spot's noise, and the
grid PNG is written."""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from stmdit import sampling, tile_grid, tiles
from stmdit import solvers
from stmdit.errors import InputError
from stmdit.features import write_feature_store
from stmdit.image_stores import open_image_store
from stmdit.loader import GeBatch
from stmdit.model import DiTConfig, STMDiT, get_objective
from stmdit.provenance import provenance, write_json
from stmdit.train_utils import keyed_generator
from stmdit.zarr_rows import string_values

torch.set_num_threads(1)

# patch 8 on 16 x 32 x 32 latents: 16 tokens, and the smoke VAE decodes to 256 px
TINY = {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "in_channels": 16, "latent_size": 32,
        "allow_bottleneck": True,  # 1,024 values per token through 32: fine for untrained plumbing tests
        "uni_dim": 16, "ge_dim": 8, "ge_source_heads": 2, "n_ge_queries": 4, "max_ge_tokens": 6}
LATENT_SHAPE = (16, 32, 32)
LABELS = {"train": ["Tumor"] * 4 + ["Stroma"] * 3 + ["Immune"] * 3, "test": ["Tumor", "Tumor", "Tumor", "Stroma",
                                                                              "Stroma", "Immune", "Immune"]}
STEPS = 4


def cli(*argv: str):
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    tiles.register(subparsers)
    tile_grid.register(subparsers)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def save_model(folder: Path, arch: dict, objective: str = "ddpm", ge_inert: bool = False, seed: int = 0) -> Path:
    """A model folder as `stmdit train` leaves it, with randomised (untrained) weights. `ge_inert`
    keeps the GE cross-attention outputs at zero: GE then has no effect on the prediction."""
    torch.manual_seed(seed)
    model = STMDiT(DiTConfig(**arch))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not (ge_inert and ".ge_attn.to_out" in name):
                parameter.normal_(0.0, 0.08)
    model.save_pretrained(folder, weights_name="ema.safetensors")
    settings = {"arch": arch, "objective": objective, "p_drop": 0.5}
    write_json(folder / "training.json", {"settings": settings, "provenance": provenance("train", settings)})
    return folder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Feature stores, split and expression of 17 spots (10 train, 7 test) with tissue labels."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    splits = [(s, label) for s in ("train", "test") for label in LABELS[s]]
    keys = [f"s{i % 2}:bc{i:03d}" for i in range(len(splits))]
    n = len(keys)
    tokens = rng.standard_normal((n, 6, 8)).astype(np.float32)
    mask = np.ones((n, 6), dtype=bool)
    mask[::3, 4:] = False
    tokens[~mask] = 0.0
    write_feature_store(root / "uni2h.zarr", keys, [{"embedding": rng.standard_normal((n, 16)).astype(np.float32)}],
                        {"embedding": (16,)}, {})
    write_feature_store(root / "cf.zarr", keys, [{"embedding": tokens[:, 0], "tokens": tokens, "token_mask": mask}],
                        {"embedding": (8,), "tokens": (6, 8), "token_mask": (6,)}, {})
    table = pd.DataFrame({"key": keys, "split": [s for s, _ in splits], "label": [lab for _, lab in splits]})
    table[["key", "split"]].to_parquet(root / "split.parquet")
    ad.AnnData(X=np.zeros((n, 3), np.float32), obs=pd.DataFrame({"label": table["label"].to_numpy()},
                                                                index=keys)).write_h5ad(root / "expr.h5ad")
    # spots table + patches store (solid colours) for the grid
    table.assign(keep=True)[["key", "label", "keep"]].to_parquet(root / "spots.parquet")
    group = zarr.open_group(str(root / "patches.zarr"), mode="w", zarr_format=3)
    colours = (np.arange(n) * 13 % 250).astype(np.uint8)
    group.create_array("images", data=np.broadcast_to(colours[:, None, None, None], (n, 256, 256, 3)).copy())
    group.create_array("spot_key", shape=(n,), dtype=str, chunks=(n,))[:] = np.array(keys, dtype=object)
    return {"root": root, "keys": keys, "table": table, "colours": colours}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "xattn": save_model(root / "xattn", {**TINY, "ge_fusion": "xattn", "ge_tokens": "pma"}),
        "inert": save_model(root / "inert", {**TINY, "ge_fusion": "xattn", "ge_tokens": "pma"}, ge_inert=True),
        "uni_only": save_model(root / "uni_only", {**TINY, "ge_fusion": "none"}, objective="flow"),
    }


def tiles_args(cohort, model: Path, out: Path, regime: str = "uni_ge", batch_size: int = 32, *extra) -> list:
    root = cohort["root"]
    return ["tiles", "--model-dir", model, "--split", root / "split.parquet", "--split-name", "test",
            "--uni", root / "uni2h.zarr", "--ge", root / "cf.zarr", "--vae-impl", "smoke", "--regime", regime,
            "--steps", STEPS, "--seed", 42, "--batch-size", batch_size, "--device", "cpu", "--out", out, *extra]


def read_store(path: Path) -> dict:
    """A tile store's arrays; `images` its pixels, stored or decoded by the smoke VAE."""
    group = zarr.open_group(str(path), mode="r")
    tiles = open_image_store(path, decoder=sampling.StoreDecoder(sampling.CodecSettings(), "cpu"))
    out = {"latent": np.asarray(group["latent"][:]), "images": tiles.read_rows(np.arange(len(tiles)))}
    out["spot_key"] = list(string_values(group["spot_key"][:]))
    out["attrs"] = dict(group.attrs)
    out["group"] = group
    out["path"] = path
    return out


@pytest.fixture(scope="module")
def uni_ge_tiles(cohort, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "uni_ge.zarr"
    cli(*tiles_args(cohort, models["xattn"], out, batch_size=3))
    return read_store(out)


# --- samplers on constructed predictions with a known answer ------------------------------------


class OracleVelocity(torch.nn.Module):
    """The exact rectified-flow velocity toward x0: on x_t = t noise + (1 - t) x0 (model timestep
    1000 t) it returns noise - x0 = (x_t - x0) / t."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t):
        return (x - self.x0) / (torch.as_tensor(t, dtype=x.dtype) / 1000.0)


class OracleEpsilon(torch.nn.Module):
    """The exact DDPM epsilon of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for a known x0."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0.double()
        self.alphas_cumprod = get_objective("ddpm").scheduler.alphas_cumprod.double()

    def forward(self, x, t):
        abar = self.alphas_cumprod[int(t)]
        return ((x.double() - abar.sqrt() * self.x0) / (1 - abar).sqrt()).float()


@pytest.mark.parametrize("solver", ["default", "heun"])
def test_flow_solvers_with_oracle_velocity_land_on_x0(solver):
    x0 = torch.randn(2, *LATENT_SHAPE)
    noise = sampling.initial_noise(["a", "b"], 42, LATENT_SHAPE)
    landed = sampling.denoise(OracleVelocity(x0), noise, "flow", steps=7, solver=solver)
    torch.testing.assert_close(landed, x0, atol=1e-5, rtol=1e-5)
    assert (noise - x0).abs().mean() > 0.5  # the sampler really moved


@pytest.mark.parametrize("solver", ["default", "dpmpp_2m"])
def test_ddpm_solvers_with_oracle_epsilon_land_on_x0(solver):
    x0 = torch.randn(2, *LATENT_SHAPE)
    noise = sampling.initial_noise(["a", "b"], 42, LATENT_SHAPE)
    landed = sampling.denoise(OracleEpsilon(x0), noise, "ddpm", steps=10, solver=solver)
    torch.testing.assert_close(landed, x0, atol=1e-4, rtol=1e-4)
    scheduler = solvers.build_scheduler("ddpm", 10, solver=solver)
    assert scheduler.timesteps[0] == 999 and not scheduler.config.get("clip_sample", False)
    torch.testing.assert_close(scheduler.alphas_cumprod, get_objective("ddpm").scheduler.alphas_cumprod)


def test_noise_depends_only_on_seed_and_key():
    both = sampling.initial_noise(["s0:a", "s1:b"], 42, LATENT_SHAPE)
    alone = sampling.initial_noise(["s1:b"], 42, LATENT_SHAPE)
    assert torch.equal(both[1], alone[0]) and not torch.equal(both[0], both[1])
    assert torch.equal(alone[0], torch.randn(LATENT_SHAPE, generator=keyed_generator(42, "sample", "s1:b")))
    assert not torch.equal(alone, sampling.initial_noise(["s1:b"], 43, LATENT_SHAPE))


# --- sampling from model folders -----------------------------------------------------------------


def test_tile_store_layout_and_attrs(uni_ge_tiles, cohort, models):
    test_keys = cohort["table"].query("split == 'test'")["key"].tolist()
    assert uni_ge_tiles["spot_key"] == test_keys
    latent, images = uni_ge_tiles["latent"], uni_ge_tiles["images"]
    assert latent.dtype == np.float16 and latent.shape == (len(test_keys), *LATENT_SHAPE)
    assert "images" not in uni_ge_tiles["group"]  # sampler.store_images is off by default
    assert images.dtype == np.uint8 and images.shape == (len(test_keys), 256, 256, 3)
    assert np.isfinite(latent).all() and images.std() > 0
    attrs = uni_ge_tiles["attrs"]
    assert attrs["sampler"]["name"] == "ddim" and attrs["sampler"]["regime"] == "uni_ge"
    assert attrs["sampler"]["steps"] == STEPS and attrs["sampler"]["s_uni"] == 4.0 and attrs["sampler"]["s_ge"] == 3.0
    assert attrs["sampler"]["scheduler_config"]["set_alpha_to_one"] is True
    assert attrs["model"]["folder"] == str(models["xattn"]) and attrs["model"]["settings_hash"]
    assert attrs["encoders"] == {"sd3_vae": "smoke"} and attrs["decoder"]["impl"] == "smoke"
    assert attrs["stmdit"]["step"] == "tiles" and attrs["stmdit"]["params"]["regime"] == "uni_ge"
    # decoded with the smoke VAE from the stored latents
    from stmdit.encoders import load_encoder

    np.testing.assert_array_equal(images, load_encoder("sd3_vae", "smoke", device="cpu").decode(latent.astype(np.float32)))


def test_tiles_do_not_depend_on_batch_size_or_other_spots(uni_ge_tiles, cohort, models, tmp_path):
    model_dir = models["xattn"]
    for batch_size in (1, 32):
        out = tmp_path / f"bs{batch_size}.zarr"
        cli(*tiles_args(cohort, model_dir, out, batch_size=batch_size))
        np.testing.assert_array_equal(read_store(out)["latent"], uni_ge_tiles["latent"])
    # a subset of the spots, through the library, in another order
    trained = sampling.load_trained_model(model_dir)
    keys = uni_ge_tiles["spot_key"]
    subset = [keys[4], keys[1]]
    conditions = sampling.StoreConditions(subset, cohort["root"] / "uni2h.zarr", cohort["root"] / "cf.zarr",
                                          trained.config)
    uni, ge = conditions.batch(np.arange(2))
    latents = sampling.sample_latents(trained.model, "ddpm", subset, uni, ge, sampling.SamplerSettings(steps=STEPS))
    np.testing.assert_array_equal(latents.numpy().astype(np.float16), uni_ge_tiles["latent"][[4, 1]])
    # the unconditional regime runs ONE conditioning: batch 1 is a single model row before padding
    single = sampling.sample_latents(trained.model, "ddpm", keys[:1], uni[:1], None,
                                     sampling.SamplerSettings(regime="uncond", steps=STEPS))
    three = sampling.sample_latents(trained.model, "ddpm", keys[:3], None, None,
                                    sampling.SamplerSettings(regime="uncond", steps=STEPS))
    assert torch.equal(single[0], three[0])


def test_guidance_with_scale_one_equals_the_conditional_model(cohort, models):
    trained = sampling.load_trained_model(models["xattn"])
    keys = cohort["table"].query("split == 'test'")["key"].tolist()[:3]
    conditions = sampling.StoreConditions(keys, cohort["root"] / "uni2h.zarr", cohort["root"] / "cf.zarr",
                                          trained.config)
    uni, ge = conditions.batch(np.arange(3))
    guided = sampling.sample_latents(trained.model, "ddpm", keys, uni, ge,
                                     sampling.SamplerSettings(steps=STEPS, s_uni=1.0, s_ge=1.0))

    def conditional(x, t):
        return trained.model(x, torch.as_tensor(t, dtype=x.dtype).expand(len(x)), uni, ge)

    plain = sampling.denoise(conditional, sampling.initial_noise(keys, 42, LATENT_SHAPE), "ddpm", STEPS)
    torch.testing.assert_close(guided, plain, atol=1e-4, rtol=1e-4)
    default = sampling.sample_latents(trained.model, "ddpm", keys, uni, ge, sampling.SamplerSettings(steps=STEPS))
    assert (default - plain).abs().max() > 1e-2  # s_uni 4, s_ge 3 do change the sample


def test_bf16_autocast_path_runs_on_cpu(cohort, models):
    trained = sampling.load_trained_model(models["xattn"])
    keys = cohort["keys"][:2]
    uni = torch.randn(2, 16)
    ge = GeBatch(torch.randn(2, 8))
    noise = sampling.pad_rows(sampling.initial_noise(keys, 42, LATENT_SHAPE))
    fp32 = sampling.guided_predictor(trained.model, sampling.pad_rows(uni), sampling.pad_ge(ge), "uni_ge", 4.0, 3.0)
    bf16 = sampling.guided_predictor(trained.model, sampling.pad_rows(uni), sampling.pad_ge(ge), "uni_ge", 4.0, 3.0,
                                     autocast_dtype=torch.bfloat16)
    # oneDNN's bf16 convolution on CPUs with AMX (torch 2.14.1) is wrong for the patch embedding
    # (Conv2d 16 -> 32, kernel 8: 121% mean error, 0.27% without oneDNN); the path under test is
    # autocast through the sampler, which production runs on CUDA only (autocast_dtype_for)
    with torch.backends.mkldnn.flags(enabled=False):
        a, b = sampling.denoise(fp32, noise, "ddpm", 2), sampling.denoise(bf16, noise, "ddpm", 2)
    assert b.dtype == torch.float32 and torch.isfinite(b).all() and not torch.equal(a, b)
    assert (a - b).abs().mean() < 0.1 * a.abs().mean()


def test_uni_only_flow_model_samples_uni_and_rejects_ge_regimes(cohort, models, tmp_path):
    for regime in ("uni_ge", "ge"):
        with pytest.raises(InputError) as error:
            cli(*tiles_args(cohort, models["uni_only"], tmp_path / "x.zarr", regime=regime))
        assert error.value.path == str(models["uni_only"]) and "UNI-only" in str(error.value)
    assert not (tmp_path / "x.zarr").exists()
    out = tmp_path / "uni.zarr"
    cli(*tiles_args(cohort, models["uni_only"], out, "uni", 4, "--max-spots", 5))
    store = read_store(out)
    assert store["attrs"]["sampler"]["name"] == "euler" and store["latent"].shape == (5, *LATENT_SHAPE)
    assert set(store["spot_key"]) <= set(cohort["table"].query("split == 'test'")["key"])
    with pytest.raises(InputError, match="solver 'dpmpp_2m' does not sample flow models"):
        cli(*tiles_args(cohort, models["uni_only"], tmp_path / "y.zarr", "uni", 4, "--max-spots", 5,
                         "--solver", "dpmpp_2m"))
    assert not (tmp_path / "y.zarr").exists()
    cli(*tiles_args(cohort, models["uni_only"], tmp_path / "heun.zarr", "uni", 4, "--max-spots", 5, "--solver", "heun"))
    sampler = read_store(tmp_path / "heun.zarr")["attrs"]["sampler"]
    assert sampler["name"] == "heun" and sampler["scheduler"] == "FlowMatchHeunDiscreteScheduler"
    assert sampler["predictor_calls_per_tile"] == 7 and sampler["forward_rows_per_tile"] == 14  # 2 x 4 - 1, x 2 rows


def test_bad_inputs_name_the_file(cohort, models, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(InputError) as error:
        cli(*tiles_args(cohort, missing, tmp_path / "x.zarr"))
    assert error.value.path == str(missing)
    partial = tmp_path / "partial_uni.zarr"
    keys = cohort["keys"][:-1]  # the last test spot is missing
    write_feature_store(partial, keys, [{"embedding": np.zeros((len(keys), 16), np.float32)}], {"embedding": (16,)}, {})
    args = tiles_args(cohort, models["xattn"], tmp_path / "x.zarr")
    args[args.index("--uni") + 1] = partial
    with pytest.raises(InputError) as error:
        cli(*args)
    assert error.value.path == str(partial) and "not in the store" in str(error.value)
    assert not (tmp_path / "x.zarr").exists()


# --- grid ------------------------------------------------------------------------------------------


def test_grid_png_has_the_layout_size_and_real_tiles(cohort, models, uni_ge_tiles, tmp_path):
    root = cohort["root"]
    uni = tmp_path / "uni.zarr"
    cli(*tiles_args(cohort, models["xattn"], uni, regime="uni"))
    out = tmp_path / "grid.png"
    cli("tile-grid", "--spots", root / "spots.parquet", "--patches", root / "patches.zarr", "--tiles",
        f"uni_ge={uni_ge_tiles['path']}", f"uni={uni}", "--per-class", 2, "--seed", 0,
        "--tile-px", 64, "--out", out)
    grid = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    # columns: 2 test spots of each of Immune, Stroma, Tumor; rows: real, uni_ge, uni
    assert grid.shape == (24 + 3 * (64 + 4), 96 + 6 * (64 + 4), 3)
    immune = cohort["table"].query("split == 'test' and label == 'Immune'").index
    first_real_tile = grid[24 + 32, 96 + 32]
    assert first_real_tile[0] in set(cohort["colours"][immune]) and len(set(first_real_tile)) == 1
    generated = grid[24 + 68:24 + 68 + 64, 96:96 + 64]
    assert generated.std() > 0  # a generated tile, not a flat real one


def test_grid_adds_the_real_tiles_decoded_from_their_latents(cohort, uni_ge_tiles, tmp_path):
    """With --latents, the second row is each real tile through the codec (a flat tile decodes to
    its own colour); a store without latents is named in the error."""
    root = cohort["root"]
    patches = zarr.open_group(str(root / "patches.zarr"), mode="r")
    from stmdit.encoders import load_encoder

    codec = load_encoder("sd3_vae", "smoke", device="cpu")
    keys = cohort["keys"]
    latents = codec.encode(np.asarray(patches["images"][:]))["latent"]
    write_feature_store(tmp_path / "sd3_vae.zarr", keys, [{"latent": latents}], {"latent": LATENT_SHAPE}, {})
    out = tmp_path / "grid.png"
    cli("tile-grid", "--spots", root / "spots.parquet", "--patches", root / "patches.zarr", "--tiles",
        f"uni_ge={uni_ge_tiles['path']}", "--latents", tmp_path / "sd3_vae.zarr", "--vae-impl", "smoke",
        "--per-class", 2, "--seed", 0, "--tile-px", 64, "--out", out)
    grid = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB).astype(int)
    assert grid.shape == (24 + 3 * (64 + 4), 96 + 6 * (64 + 4), 3)
    for column in range(6):
        x = 96 + column * 68
        real, decoded = grid[24 + 8:24 + 56, x + 8:x + 56], grid[92 + 8:92 + 56, x + 8:x + 56]
        assert np.abs(decoded - real).max() <= 2, column
    bad = tmp_path / "not_latents.zarr"
    write_feature_store(bad, keys, [{"embedding": np.zeros((len(keys), 4), np.float32)}], {"embedding": (4,)}, {})
    with pytest.raises(InputError) as error:
        cli("tile-grid", "--spots", root / "spots.parquet", "--patches", root / "patches.zarr", "--tiles",
            f"uni_ge={uni_ge_tiles['path']}", "--latents", bad, "--out", tmp_path / "bad.png")
    assert error.value.path == str(bad) and not (tmp_path / "bad.png").exists()


# --- tile stores: float16 latents, pixels decoded on demand ------------------------------------


def test_stored_images_are_the_decoded_stored_latents(uni_ge_tiles, cohort, models, tmp_path):
    """--store-images keeps the pixels a latents-only store decodes to, bit for bit, beside the same
    float16 latents; the float16 latents decode within a few grey levels of the float32 ones."""
    out = tmp_path / "with_images.zarr"
    cli(*tiles_args(cohort, models["xattn"], out, "uni_ge", 3, "--store-images"))
    group = zarr.open_group(str(out), mode="r")
    assert group["images"].dtype == np.uint8 and group.attrs["store_images"] is True
    np.testing.assert_array_equal(np.asarray(group["latent"][:]), uni_ge_tiles["latent"])
    np.testing.assert_array_equal(np.asarray(group["images"][:]), uni_ge_tiles["images"])
    stored = open_image_store(out)  # keeps pixels: no decoder needed
    np.testing.assert_array_equal(stored.read_rows([2, 0]), uni_ge_tiles["images"][[2, 0]])
    trained = sampling.load_trained_model(models["xattn"])
    keys = uni_ge_tiles["spot_key"]
    conditions = sampling.StoreConditions(keys, cohort["root"] / "uni2h.zarr", cohort["root"] / "cf.zarr", trained.config)
    exact = sampling.sample_latents(trained.model, "ddpm", keys, *conditions.batch(np.arange(len(keys))),
                                    sampling.SamplerSettings(steps=STEPS))
    from stmdit.encoders import load_encoder

    full = load_encoder("sd3_vae", "smoke", device="cpu").decode(exact).astype(int)
    difference = np.abs(full - uni_ge_tiles["images"])
    assert difference.mean() < 0.5


def test_a_latents_only_store_needs_the_decoder_it_was_sampled_for(uni_ge_tiles, tmp_path):
    path = uni_ge_tiles["path"]
    with pytest.raises(InputError, match="keeps latents only.*sd3_vae smoke") as error:
        open_image_store(path)
    assert error.value.path == str(path)

    class OtherDecoder:
        def identity(self):
            return {**uni_ge_tiles["attrs"]["decoder"], "scaling_factor": 1.0}

        def decode(self, latents):
            raise AssertionError("never decodes")

    with pytest.raises(InputError, match="another decoder: scaling_factor"):
        open_image_store(path, decoder=OtherDecoder())
    stale = tmp_path / "no_decoder.zarr"
    group = zarr.open_group(str(stale), mode="w")
    group.create_array("spot_key", shape=(2,), dtype=str, chunks=(2,))[:] = np.array(["a", "b"], dtype=object)
    group.create_array("latent", data=np.zeros((2, *LATENT_SHAPE), np.float16))
    with pytest.raises(InputError, match="records no decoder"):
        open_image_store(stale, decoder=sampling.StoreDecoder(sampling.CodecSettings(), "cpu"))


def test_a_model_trained_with_other_ge_weights_stops_sampling_in_one_line(cohort, models, tmp_path):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(models["xattn"], model)
    training = json.loads((model / "training.json").read_text())
    training["ge_encoder"] = {"name": "cancerfoundation", "impl": "real", "model": "CancerFoundation",
                              "weights_sha256": {"model.pth": "ab" * 32}}
    (model / "training.json").write_text(json.dumps(training))
    out = tmp_path / "tiles.zarr"
    with pytest.raises(InputError, match="the model was trained with CancerFoundation model.pth abababababab") as err:
        cli(*tiles_args(cohort, model, out))
    assert "training.json" in str(err.value) and "\n" not in str(err.value) and not out.exists()
