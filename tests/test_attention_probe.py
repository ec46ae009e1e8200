"""The denoiser's optional local self-attention bias, and `stmdit attention-probe`, which reads where
a model's self-attention looks."""

from __future__ import annotations

import pytest
import torch

from stmdit.attention_probe import attention_weights, locality, probe_attention, token_distances
from stmdit.errors import InputError
from stmdit.model import DiTConfig, STMDiT, get_objective
from stmdit.model.dit import EMA_WEIGHTS_FILE

torch.set_num_threads(1)

SIDE = 8  # tokens per side: latent 16 at patch 2, the demo's 8 x 8 token grid


def config(local_bias: bool) -> DiTConfig:
    return DiTConfig(hidden_size=32, depth=2, num_heads=4, in_channels=4, latent_size=2 * SIDE, patch_size=2,
                     uni_dim=24, local_attention_bias=local_bias)


def model(local_bias: bool, seed: int = 0) -> STMDiT:
    torch.manual_seed(seed)
    return STMDiT(config(local_bias)).eval()


def inputs(batch: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 2 * SIDE, 2 * SIDE, generator=generator),
            torch.randn(batch, 4, 2 * SIDE, 2 * SIDE, generator=generator),
            torch.randn(batch, 24, generator=generator))


def test_the_bias_starts_as_a_gaussian_of_token_distance_with_widths_1_1_2_4():
    table = model(True).blocks[0].local_bias.table.detach()
    centre = SIDE - 1
    assert table.shape == (4, 2 * SIDE - 1, 2 * SIDE - 1)
    assert torch.all(table[:, centre, centre] == 0)
    one_step = table[:, centre, centre + 1]
    assert torch.allclose(one_step, torch.tensor([-0.5, -0.5, -0.125, -1 / 32]))
    assert torch.equal(table, table.flip(1)) and torch.equal(table, table.transpose(1, 2))
    assert model(False).blocks[0].local_bias is None


def test_probe_weights_are_the_weights_the_attention_applies():
    """The probe recomputes the softmax from the block's projections and bias: applied to the
    values, they must give the attention's own output, per spot and head."""
    net = model(True)
    with torch.no_grad():
        for p in net.parameters():  # trained-like values, so the logits are not all near 0
            p.add_(torch.randn_like(p) * 0.2)
    captured = []
    handle = net.blocks[1].attn.register_forward_hook(
        lambda module, args, kwargs, out: captured.append((args[0], out)), with_kwargs=True)
    x, _, uni = inputs()
    with torch.no_grad():
        net(x, torch.full((len(x),), 500.0), uni)
    handle.remove()
    hidden, out = captured[0]
    attention = net.blocks[1].attn
    weights = attention_weights(attention, hidden)
    value = attention.to_v(hidden).view(len(x), SIDE * SIDE, 4, -1).transpose(1, 2)
    mixed = (weights @ value).transpose(1, 2).reshape(len(x), SIDE * SIDE, -1)
    assert torch.allclose(attention.to_out[0](mixed), out, atol=1e-5)


def test_a_spot_denoised_in_a_batch_gets_the_same_bias_as_alone():
    """The bias is broadcast over the batch: every spot gets each head's own bias, whatever the
    batch holds."""
    net = model(True)
    with torch.no_grad():
        for block in net.blocks:
            block.local_bias.table.mul_(torch.tensor([1.0, 3.0, 0.0, -2.0])[:, None, None])
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x, _, uni = inputs(batch=3)
    t = torch.full((3,), 400.0)
    with torch.no_grad():
        together = net(x, t, uni)
        alone = torch.cat([net(x[i:i + 1], t[i:i + 1], uni[i:i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_the_probe_sees_local_heads_with_the_bias_and_uniform_ones_without():
    objective = get_objective("flow")
    x, noise, uni = inputs()
    with_bias = probe_attention(model(True), objective, x, uni, noise, 0.7)
    without = probe_attention(model(False), objective, x, uni, noise, 0.7)
    assert len(with_bias) == len(without) == 2
    for block in with_bias:
        neighbours = block["neighbours"] / len(x)
        assert neighbours[0] > 4 and neighbours[1] > 4, neighbours  # sigma 1: most weight within one token
        assert neighbours[3] < neighbours[2] < neighbours[0]
        assert block["mean_distance"][0] / len(x) < 1.5
    for block in without:
        neighbours = block["neighbours"] / len(x)
        assert ((neighbours > 0.7) & (neighbours < 1.4)).all(), neighbours
        assert abs(block["mean_distance"].mean() / len(x) - token_distances(SIDE).mean()) < 0.5


def test_locality_of_uniform_and_of_self_attention():
    tokens = SIDE * SIDE
    uniform = torch.full((1, 1, tokens, tokens), 1 / tokens)
    assert locality(uniform, SIDE)["neighbours"][0] == pytest.approx(1.0, abs=1e-5)
    assert locality(uniform, SIDE)["mean_distance"][0] == pytest.approx(float(token_distances(SIDE).mean()), abs=1e-5)
    itself = torch.eye(tokens)[None, None]
    assert locality(itself, SIDE)["neighbours"][0] == 0 and locality(itself, SIDE)["mean_distance"][0] == 0


def test_the_bias_learns_under_bf16_autocast_and_round_trips_strictly(tmp_path):
    net = model(True).train()
    x, noise, uni = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.full((len(x),), 300.0), uni)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out.float()).all()
    # proj_out starts at zero (PixArt), so only it gets a gradient on the first step: give it weights
    with torch.no_grad():
        net.proj_out.weight.normal_(std=0.02)
    net.zero_grad()
    net(x, torch.full((len(x),), 300.0), uni).pow(2).mean().backward()
    assert all(block.local_bias.table.grad.abs().sum() > 0 for block in net.blocks)

    net.save_pretrained(tmp_path / "local", EMA_WEIGHTS_FILE)
    loaded = STMDiT.from_pretrained(tmp_path / "local", EMA_WEIGHTS_FILE)
    assert loaded.config.local_attention_bias
    assert torch.equal(loaded.blocks[0].local_bias.table, net.blocks[0].local_bias.table)
    assert not any("local_bias" in name for name in model(False).state_dict())  # the paper's layout is unchanged

    (tmp_path / "plain").mkdir()
    model(False).save_pretrained(tmp_path / "plain", EMA_WEIGHTS_FILE)
    (tmp_path / "plain" / EMA_WEIGHTS_FILE).write_bytes((tmp_path / "local" / EMA_WEIGHTS_FILE).read_bytes())
    with pytest.raises(InputError, match="do not match the config"):
        STMDiT.from_pretrained(tmp_path / "plain", EMA_WEIGHTS_FILE)


def test_the_command_writes_its_json_and_refuses_latents_of_another_shape(tmp_path):
    import json

    import numpy as np
    import pandas as pd

    from stmdit.cli import main
    from stmdit.features import write_feature_store
    from stmdit.provenance import provenance, write_json

    rng = np.random.default_rng(0)
    keys = [f"s0:bc{i:03d}" for i in range(10)]
    uni = rng.standard_normal((10, 24)).astype(np.float32)
    write_feature_store(tmp_path / "uni2h.zarr", keys, [{"embedding": uni}], {"embedding": (24,)}, {})
    shape = (4, 2 * SIDE, 2 * SIDE)
    latents = rng.standard_normal((10, *shape)).astype(np.float32)
    write_feature_store(tmp_path / "sd3_vae.zarr", keys, [{"latent": latents}], {"latent": shape}, {})
    write_feature_store(tmp_path / "wrong.zarr", keys, [{"latent": np.zeros((10, 4, 8, 8), np.float32)}],
                        {"latent": (4, 8, 8)}, {})
    pd.DataFrame({"key": keys, "split": ["train"] * 4 + ["test"] * 6}).to_parquet(tmp_path / "split.parquet")
    folder = tmp_path / "model"
    model(True).save_pretrained(folder, EMA_WEIGHTS_FILE)
    settings = {"arch": config(True).to_dict(), "objective": "flow", "p_drop": 0.1}
    write_json(folder / "training.json", {"settings": settings, "provenance": provenance("train", settings)})

    def probe(latents: str, out: str) -> int:
        return main(["attention-probe", "--model-dir", str(folder), "--split", str(tmp_path / "split.parquet"),
                     "--latents", str(tmp_path / latents), "--uni", str(tmp_path / "uni2h.zarr"),
                     "--noise-levels", "0.8", "0.3", "--batch-size", "4", "--device", "cpu",
                     "--out", str(tmp_path / out)])

    assert probe("sd3_vae.zarr", "probe.json") == 0
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["n"] == 6 and result["tokens"] == SIDE * SIDE and set(result["noise_levels"]) == {"0.8", "0.3"}
    for blocks in result["noise_levels"].values():
        assert len(blocks) == 2 and all(len(block["neighbours"]) == 4 for block in blocks)
        assert all(block["neighbours"][0] > 4 for block in blocks)  # an untrained bias model: local first heads
    assert probe("wrong.zarr", "refused.json") != 0
    assert not (tmp_path / "refused.json").exists()
