"""Real checkpoints at first contact: published architectures built at full size on the meta
device and written as the releases write them (safetensors headers over sparse files, no tensor
memory), strict loaders, CancerFoundation's reference path, and `stmdit preflight`."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from stmdit.encoders import load_encoder
from stmdit.encoders.base import read_safetensors_header, read_state_dict
from stmdit.errors import InputError
from stmdit.preflight import check_config

REPO = Path(__file__).resolve().parents[1]
DTYPE_NAMES = {torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2), torch.int64: ("I64", 8)}


def write_sparse_safetensors(path: Path, shapes: dict, dtype: str = "F16", width: int = 2) -> Path:
    """A valid safetensors file with these shapes whose data is a sparse hole: a full-size
    checkpoint in a few kB of disk and no memory."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = width * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.truncate(8 + len(blob) + offset)
    return path


def meta_state_shapes(build) -> dict:
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def h0mini_published():
    # bioptimus/H0-mini card: timm.create_model("hf-hub:bioptimus/H0-mini", mlp_layer=SwiGLUPacked,
    # act_layer=SiLU) on vit_base_patch14_reg4_dinov2 at 224 px; its checkpoint's fc1 is (4096, 768)
    return timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=224, num_classes=0,
                             mlp_ratio=4096 / 768, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)


def test_h0mini_full_size_release_loads_without_a_config(tmp_path):
    shapes = meta_state_shapes(h0mini_published)
    assert shapes["blocks.0.mlp.fc1.weight"] == (4096, 768) and shapes["reg_token"] == (1, 4, 768)
    weights = write_sparse_safetensors(tmp_path / "H0-mini" / "model.safetensors", shapes)
    encoder = load_encoder("h0mini", "real", weights=str(weights.parent), device="cpu")  # no config.json
    assert encoder.output_shapes == {"embedding": (768,)}
    assert encoder.preprocess.input_size == 224 and encoder.preprocess.interpolation == "bicubic"

    # timm's default mlp_ratio 4 is what a bare create_model builds: it must not pass
    default = meta_state_shapes(lambda: timm.create_model(
        "vit_base_patch14_reg4_dinov2", pretrained=False, img_size=224, num_classes=0,
        mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU))
    wrong = write_sparse_safetensors(tmp_path / "wrong" / "model.safetensors", default)
    with pytest.raises(InputError, match=r"wrong shape.*fc1.weight \(3072, 768\) != \(4096, 768\)"):
        load_encoder("h0mini", "real", weights=str(wrong.parent), device="cpu")
    # a config.json that contradicts the published architecture is an error naming it
    (weights.parent / "config.json").write_text(json.dumps({"architecture": "vit_base_patch14_reg4_dinov2",
                                                            "model_args": {"mlp_ratio": 4.0}}))
    with pytest.raises(InputError, match="config.json: config sets mlp_ratio = 4.0"):
        load_encoder("h0mini", "real", weights=str(weights.parent), device="cpu")


def uni2h_published():
    # MahmoodLab/UNI2-h card: timm_kwargs of the model card
    return timm.create_model("vit_giant_patch14_224", pretrained=False, img_size=224, patch_size=14, depth=24,
                             num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0,
                             no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
                             reg_tokens=8, dynamic_img_size=True)


def vae_config(**changes) -> dict:
    # stabilityai/stable-diffusion-3-medium-diffusers vae/config.json (AutoencoderKL, 16 channels)
    config = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
              "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
              "act_fn": "silu", "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
              "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
    config.update(changes)
    return config


def vae_shapes(config: dict) -> dict:
    from diffusers import AutoencoderKL

    return meta_state_shapes(lambda: AutoencoderKL.from_config(config))


def write_vae(folder: Path, shapes: dict, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    write_sparse_safetensors(folder / "diffusion_pytorch_model.safetensors", shapes)
    return folder


def test_sd3_vae_missing_key_is_an_error_not_a_warning(tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    tiny = vae_config(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, layers_per_block=1)
    vae = AutoencoderKL.from_config(tiny)
    state = {k: v.contiguous() for k, v in vae.state_dict().items() if k != "decoder.conv_out.weight"}
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(tiny))
    save_file(state, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(InputError, match=r"1 missing keys.*decoder.conv_out.weight"):
        load_encoder("sd3_vae", "real", weights=str(tmp_path), device="cpu")


def test_cancerfoundation_model_pth_saved_as_a_state_dict_loads_and_pickled_objects_are_refused(tmp_path):
    from collections import OrderedDict

    from stmdit.encoders.cancerfoundation import CancerFoundationArgs, CancerFoundationModel

    args = CancerFoundationArgs(embsize=16, nheads=2, d_hid=32, nlayers=1, n_bins=11, max_seq_len=12)
    model = CancerFoundationModel(20, 0, args, batchnorm=True)
    # BoevaLab/CancerFoundation model/embedding.py reads torch.load(model.pth) as a Mapping[str, Tensor]
    torch.save(OrderedDict(model.state_dict()), tmp_path / "model.pth")
    state = read_state_dict(tmp_path / "model.pth")
    assert "bn.running_mean" in state and all(isinstance(v, torch.Tensor) for v in state.values())

    import argparse

    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    with pytest.raises(InputError, match="pickles a argparse.Namespace object.*not unpickled"):
        read_state_dict(tmp_path / "pickled.pth")


# ---------------------------------------------------------------------------------------------
# CancerFoundation's reference path on real counts


def reference_bins(row: np.ndarray, n_bins: int, rands: np.ndarray) -> np.ndarray:
    """BoevaLab/CancerFoundation model/data_collator.py `binning`, rewritten: quantile edges of the
    non-zero counts, left/right digitize, a uniform draw between them."""
    out = np.zeros(row.size, dtype=np.int64)
    nz = np.flatnonzero(row > 0)
    if nz.size == 0:
        return out
    edges = np.quantile(row[nz], np.linspace(0, 1, n_bins - 1))
    left = np.searchsorted(edges, row[nz], side="right")
    right = np.searchsorted(edges, row[nz], side="left")
    out[nz] = np.ceil(rands[: nz.size] * (right - left) + left).astype(np.int64)
    return out


@pytest.fixture(scope="module")
def visium_counts():
    folder = REPO.parent / "shared" / "data" / "visium" / "mouse_placenta_cytassist_sr3"
    if not folder.is_dir():
        folder = Path("/work/shared/data/visium/mouse_placenta_cytassist_sr3")
    if not folder.is_dir():
        pytest.skip("real Visium data not present")
    import scanpy as sc

    adata = sc.read_10x_h5(str(next(folder.rglob("filtered_feature_bc_matrix.h5"))))
    adata.var_names_make_unique()
    adata = adata[:600].copy()
    sc.pp.filter_genes(adata, min_cells=10)  # as the expression stage does
    adata.obs["sample"] = np.where(np.arange(adata.n_obs) < 300, "s1", "s2")
    return adata


def test_cancerfoundation_reference_gene_choice_and_binning_on_real_counts(visium_counts):
    import scanpy as sc
    import scipy.sparse as sp

    from stmdit.encoders.cancerfoundation import bin_counts, select_genes_cell_ranger, spot_rng

    adata = visium_counts
    vocab = set(adata.var_names[::3])  # a vocabulary that knows a third of the genes
    ours = select_genes_cell_ranger(adata.var_names, adata.X, 1199, vocab, adata.obs["sample"].to_numpy())
    # the reference: subset to vocab genes, then cell_ranger HVGs with the batch key, in var order
    ref = adata[:, adata.var_names.isin(list(vocab))].copy()
    sc.pp.highly_variable_genes(ref, n_top_genes=1199, flavor="cell_ranger", batch_key="sample")
    assert list(adata.var_names[ours]) == list(ref.var_names[ref.var["highly_variable"]])
    assert 1000 < len(ours) <= 1199

    counts = sp.csr_matrix(adata.X)[:, ours].toarray()[:60]
    keys = [f"s1:{i}" for i in range(len(counts))]
    ours_bins = bin_counts(counts, keys, 51, seed=0, binning="reference")
    for i, row in enumerate(counts):
        draws = spot_rng(0, keys[i]).random(int((row > 0).sum()))
        np.testing.assert_array_equal(ours_bins[i], reference_bins(row, 51, draws))
    assert len(np.unique(ours_bins)) == 51  # real counts fill every bin


def test_cancerfoundation_encoder_follows_the_reference_by_default(tmp_path):
    from stmdit.encoders.cancerfoundation import CancerFoundationArgs, CancerFoundationModel

    genes = [f"G{i}" for i in range(30)]
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, **{g: i + 3 for i, g in enumerate(genes)}}
    args = {"embsize": 16, "nheads": 2, "d_hid": 32, "nlayers": 1, "n_bins": 11, "max_seq_len": 12, "dropout": 0.2}
    model = CancerFoundationModel(len(vocab), 0, CancerFoundationArgs(**args))
    (tmp_path / "cf").mkdir()
    torch.save(model.state_dict(), tmp_path / "cf" / "model.pth")
    (tmp_path / "cf" / "args.json").write_text(json.dumps(args))
    (tmp_path / "cf" / "vocab.json").write_text(json.dumps(vocab))
    encoder = load_encoder("cancerfoundation", "real", weights=str(tmp_path / "cf"), device="cpu")
    assert (encoder.gene_selection, encoder.l2_normalize, encoder.binning) == ("cell_ranger", True, "reference")
    counts = np.random.default_rng(0).negative_binomial(2, 0.3, (40, 30)).astype(float)
    counts[:, :10] *= np.random.default_rng(1).uniform(0, 6, (40, 1))  # ten clearly variable genes
    columns = encoder.choose_genes(genes, np.arange(30.0), 11, counts=counts, batches=["a"] * 20 + ["b"] * 20)
    assert len(columns) == 11 and list(columns) == sorted(columns)  # the reference keeps var order
    out = encoder.encode(counts[:4, columns], [f"a:{i}" for i in range(4)])
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-5)
    assert encoder.describe()["weights_sha256"]["model.pth"]


# ---------------------------------------------------------------------------------------------
# stmdit preflight


def base_config(tmp_path: Path, encoders: dict, models: dict | None = None, allow_hub: bool = False) -> dict:
    from stmdit.config import load_config, validate_config

    config = load_config(REPO / "config.yaml")
    config["features"]["encoders"].update(encoders)
    config["features"]["allow_hub"] = allow_hub
    if models:
        config["models"].update(models)
        config["sampler"]["solver"] = "default"  # the demo's unipc samples flow models only; these add ddpm ones
    return validate_config(config)


def test_preflight_passes_full_size_releases_and_names_each_broken_one(tmp_path):
    good_uni = write_sparse_safetensors(tmp_path / "UNI2-h" / "model.safetensors", meta_state_shapes(uni2h_published))
    h0 = meta_state_shapes(h0mini_published)
    bad_h0 = write_sparse_safetensors(tmp_path / "H0-mini" / "model.safetensors",
                                      {**h0, "blocks.3.mlp.fc1.weight": (3072, 768)})
    missing = {k: v for k, v in vae_shapes(vae_config()).items() if k != "decoder.conv_out.weight"}
    vae_missing_key = write_vae(tmp_path / "sd3" / "vae", missing, vae_config())
    vae_no_config = write_vae(tmp_path / "sd3b", vae_shapes(vae_config()))
    truncated = tmp_path / "trunc" / "model.safetensors"
    write_sparse_safetensors(truncated, h0)
    with open(truncated, "r+b") as handle:
        handle.truncate(truncated.stat().st_size - 4096)
    config = base_config(tmp_path, {
        "uni2h": {"impl": "real", "weights": str(good_uni.parent)},
        "h0mini": {"impl": "real", "weights": str(bad_h0.parent)},
        "sd3_vae": {"impl": "real", "weights": str(vae_missing_key.parent)},
        "midnight": {"impl": "real", "weights": "kaiko-ai/midnight"},
        "deepspot_fm": {"impl": "real", "weights": str(truncated), "variant": "uni"},
    })
    checks = {c.name: c for c in check_config(config)}
    assert checks["uni2h"].status == "ok"
    assert checks["h0mini"].failed and "blocks.3.mlp.fc1.weight (3072, 768) != (4096, 768)" in checks["h0mini"].problem
    assert checks["sd3_vae"].failed and "missing key" in checks["sd3_vae"].problem
    assert "decoder.conv_out.weight" in checks["sd3_vae"].problem
    assert checks["midnight"].failed and "allow_hub" in checks["midnight"].problem
    assert checks["deepspot_fm"].failed and "truncated safetensors" in checks["deepspot_fm"].problem
    assert all("\n" not in c.problem for c in checks.values())

    config["features"]["encoders"]["sd3_vae"]["weights"] = str(vae_no_config)
    (check,) = [c for c in check_config(config) if c.name == "sd3_vae"]
    assert check.failed and "config.json: missing" in check.problem


def test_preflight_cli_prints_one_table_and_exits_non_zero(tmp_path):
    h0 = write_sparse_safetensors(tmp_path / "H0-mini" / "model.safetensors", meta_state_shapes(h0mini_published))
    overlay = tmp_path / "cluster.yaml"
    overlay.write_text(json.dumps({"features": {"encoders": {
        "h0mini": {"impl": "real", "weights": str(h0.parent)},
        "uni2h": {"impl": "real", "weights": "MahmoodLab/UNI2-h"},
    }}}))
    cmd = [sys.executable, "-m", "stmdit", "preflight", str(REPO / "config.yaml"), str(overlay)]
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["encoder", "weights", "status", "problem"]
    h0_line = next(line for line in lines if line.startswith("h0mini"))
    assert " ok" in h0_line
    uni_line = next(line for line in lines if line.startswith("uni2h"))
    assert "FAIL" in uni_line and "allow_hub" in uni_line
    assert "1 of 2 weight checks failed (first: uni2h)" in done.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# PixCell-256 in the project's denoiser


def tiny_pixcell(tmp_path: Path, interpolation_scale: float = 0.5) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    """A tiny diffusers PixArt transformer with PixCell-256's options (ada_norm_single, no additional
    conditions, one UNI token, learned sigma, interpolation scale 0.5), saved in the release's
    layout with the unconditional UNI embedding in the caption projection."""
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=12, norm_type="ada_norm_single",
        interpolation_scale=interpolation_scale, use_additional_conditions=False, num_embeds_ada_norm=1000,
    ).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    folder = tmp_path / "PixCell-256" / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    uncond = torch.randn(1, 12)
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    save_file({**state, "caption_projection.uncond_embedding": uncond},
              str(folder / "diffusion_pytorch_model.safetensors"))
    return folder.parent, model, uncond


def test_pixcell_release_loads_into_the_denoiser_and_matches_diffusers_forward(tmp_path):
    from stmdit.model.pixcell import load_pixcell
    from stmdit.sampling import load_trained_model

    root, reference, uncond = tiny_pixcell(tmp_path)
    ours = load_pixcell(root).eval()
    assert ours.config.interpolation_scale == 0.5 and ours.config.learned_sigma
    x, t, uni = torch.randn(3, 4, 8, 8), torch.tensor([1.0, 400.0, 999.0]), torch.randn(3, 12)
    with torch.no_grad():
        expected = reference(x, encoder_hidden_states=uni[:, None], timestep=t).sample[:, :4]
        expected_null = reference(x, encoder_hidden_states=uncond.expand(3, 1, 12), timestep=t).sample[:, :4]
        got, got_null = ours(x, t, uni), ours(x, t, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_null, expected_null, rtol=1e-5, atol=1e-5)

    trained = load_trained_model(root)  # the sampling stage's entry point
    assert trained.objective == "ddpm" and trained.settings["pretrained"]["format"] == "pixcell"

    # the release's interpolation scale matters: a model built at scale 1 does not reproduce it
    config_path = root / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "interpolation_scale": 1.0}))
    with torch.no_grad():
        wrong = load_pixcell(root).eval()(x, t, uni)
    assert (wrong - expected).abs().max() > 1e-3

    config_path.write_text(json.dumps({**config, "caption_num_tokens": 16}))
    with pytest.raises(InputError, match="PixCell-1024"):
        load_pixcell(root)


def pixcell_256_config() -> dict:
    # StonyBrook-CVLab/PixCell-256 transformer: PixArt-XL/2 (cvlab-stonybrook/PixCell
    # controlnet/pixcell_transformer_2d.py defaults: 16 heads x 72, 28 layers, cross-attention 1152),
    # SD3 latents 16 x 32 x 32, learned sigma, UNI-2h 1536-d, pe_interpolation 0.5
    # (configs/pan_cancer/pixart_20x_256.py)
    return {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72,
            "in_channels": 16, "out_channels": 32, "num_layers": 28, "sample_size": 32, "patch_size": 2,
            "cross_attention_dim": 1152, "caption_channels": 1536, "norm_type": "ada_norm_single",
            "interpolation_scale": 0.5, "use_additional_conditions": False, "num_embeds_ada_norm": 1000,
            "activation_fn": "gelu-approximate", "attention_bias": True}


def test_preflight_plans_the_full_size_pixcell_release_and_the_paper_row(tmp_path):
    from diffusers import PixArtTransformer2DModel

    from stmdit.models_config import resolve_models, skipped_models

    config = pixcell_256_config()
    shapes = meta_state_shapes(lambda: PixArtTransformer2DModel.from_config(config))
    assert shapes["proj_out.weight"] == (2 * 2 * 32, 1152) and len([k for k in shapes if k.endswith("attn2.to_q.weight")]) == 28
    folder = tmp_path / "PixCell-256" / "transformer"
    write_sparse_safetensors(folder / "diffusion_pytorch_model.safetensors",
                             {**shapes, "caption_projection.uncond_embedding": (1, 1536)})
    (folder / "config.json").write_text(json.dumps(config))
    entry = {"name": "PixCell-Pretrained-XL", "fusion": "none", "objective": "ddpm", "tables": [1, 2, 3],
             "pretrained": {"format": "pixcell", "path": str(folder.parent)}}
    cfg = base_config(tmp_path, {}, {"PixCell-Pretrained-XL": entry})
    (check,) = [c for c in check_config(cfg) if c.name == "model PixCell-Pretrained-XL"]
    assert check.status == "ok", check.problem
    assert resolve_models(cfg)["PixCell-Pretrained-XL"].pretrained == str(folder.parent)

    (folder / "config.json").write_text(json.dumps({**config, "num_layers": 24}))
    (check,) = [c for c in check_config(cfg) if c.name == "model PixCell-Pretrained-XL"]
    assert check.failed and "unexpected key" in check.problem and "blocks.24" in check.problem

    cfg["models"]["PixCell-Pretrained-XL"]["pretrained"]["path"] = None
    assert "PixCell-Pretrained-XL" not in resolve_models(cfg)
    assert "skipped" in skipped_models(cfg)["PixCell-Pretrained-XL"]


def test_preflight_checks_a_cancerfoundation_folder_from_its_torch_file(tmp_path):
    from stmdit.encoders.cancerfoundation import CancerFoundationArgs, CancerFoundationModel

    args = {"embsize": 16, "nheads": 2, "d_hid": 32, "nlayers": 2, "n_bins": 11, "max_seq_len": 12, "dropout": 0.2}
    vocab = {"<pad>": 0, "<cls>": 1, "<eoc>": 2, "A": 3, "B": 4}
    folder = tmp_path / "cf"
    folder.mkdir()
    state = CancerFoundationModel(len(vocab), 0, CancerFoundationArgs(**args)).state_dict()
    # the released pre-training names: attention wrapped once more, plus an unused decoder head
    torch.save({k.replace(".self_attn.", ".self_attn.self_attn."): v for k, v in state.items()}
               | {"decoder.fc.0.weight": torch.zeros(4, 4)}, folder / "model.pth")
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    cfg = base_config(tmp_path, {"cancerfoundation": {"impl": "real", "weights": str(folder)}})
    (check,) = check_config(cfg)
    assert check.status == "ok", check.problem
    (folder / "args.json").write_text(json.dumps({**args, "nlayers": 3}))
    (check,) = check_config(cfg)
    assert check.failed and "missing key" in check.problem and "encoder.layers.2" in check.problem
    (folder / "vocab.json").unlink()
    (check,) = check_config(cfg)
    assert check.failed and "vocab.json: missing" in check.problem


def test_workflow_with_bad_weights_stops_at_start_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"features:\n  encoders:\n    h0mini: {{impl: real, weights: {tmp_path / 'absent'}}}\n")
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    done = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-j1", "--configfile",
                           str(REPO / "config.yaml"), str(bad), "--", "all"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "h0mini" in done.stderr and "FAIL" in done.stderr and "stmdit preflight" in done.stderr
    assert "weights for encoder h0mini not found" in done.stderr
    assert re.search(r"^(local)?rule \w+:", done.stdout + done.stderr, re.MULTILINE) is None  # no job started
