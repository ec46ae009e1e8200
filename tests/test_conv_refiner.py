"""The denoiser's optional convolutional head (`conv_refiner_channels`, dit.ConvRefiner): it starts as
PixArt, reads the noisy latent across token borders with a 7 x 7 receptive field, learns, and keeps
the checkpoint layouts apart."""

from __future__ import annotations

import pytest
import torch

from stmdit.errors import InputError
from stmdit.model import DiTConfig, STMDiT
from stmdit.model.dit import EMA_WEIGHTS_FILE

torch.set_num_threads(1)

LATENT = 16  # latent pixels per side; patch 4 makes 4 x 4 tokens of 4 x 4 pixels


def config(refiner: int, **sizes) -> DiTConfig:
    return DiTConfig(hidden_size=64, depth=1, num_heads=4, in_channels=4, latent_size=LATENT, patch_size=4,
                     uni_dim=24, conv_refiner_channels=refiner, **sizes)


def model(refiner: int, seed: int = 0, **sizes) -> STMDiT:
    torch.manual_seed(seed)
    return STMDiT(config(refiner, **sizes))


def inputs(batch: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, LATENT, LATENT, generator=generator),
            torch.randn(batch, 24, generator=generator))


def test_a_new_refiner_predicts_what_pixart_predicts():
    x, uni = inputs()
    t = torch.tensor([900.0, 500.0, 100.0, 10.0])
    plain, refined = model(0).eval(), model(16).eval()
    assert set(plain.state_dict()) < set(refined.state_dict())
    # the shared weights are drawn the same way, and the zero last convolution adds nothing
    with torch.no_grad():
        plain.proj_out.weight.normal_(std=0.05, generator=torch.Generator().manual_seed(3))
        refined.proj_out.weight.copy_(plain.proj_out.weight)
        assert torch.equal(plain(x, t, uni), refined(x, t, uni))


def test_the_refiner_reads_the_noisy_latent_three_pixels_across_token_borders():
    net = model(8).eval()
    with torch.no_grad():  # transformer output 0 (PixArt's zero proj_out), so x reaches the output only here
        for conv in (net.refiner.conv_in, net.refiner.conv_mid, net.refiner.conv_out):
            conv.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(4))
    x, uni = inputs(batch=1)
    x.requires_grad_(True)
    row, col = 8, 8  # the top-left pixel of a token: its neighbours up and left lie in other tokens
    net(x, torch.tensor([500.0]), uni)[0, :, row, col].sum().backward()
    reach = x.grad[0].abs().sum(dim=0)
    offsets = torch.arange(LATENT)
    distance = torch.maximum((offsets[:, None] - row).abs(), (offsets[None, :] - col).abs())
    assert (reach[distance <= 3] > 0).all()
    assert (reach[distance > 3] == 0).all()
    assert reach[row - 3, col - 3] > 0  # three pixels into the diagonal neighbour token


def box_blur(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.full((x.shape[1], 1, 3, 3), 1 / 9)
    return torch.nn.functional.conv2d(x, kernel, padding=1, groups=x.shape[1])


def fit_a_blur(refiner: int, steps: int = 150) -> float:
    """Train the whole network to output a 3 x 3 blur of its input; the final loss over the target's
    variance."""
    net = model(refiner, seed=2).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(8, 4, LATENT, LATENT, generator=generator)
        target = box_blur(x)
        loss = (net(x, torch.full((8,), 500.0), torch.zeros(8, 24)) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x = torch.randn(32, 4, LATENT, LATENT, generator=generator)
    with torch.no_grad():
        target = box_blur(x)
        residual = (net(x, torch.full((32,), 500.0), torch.zeros(32, 24)) - target).pow(2).mean()
    return (residual / target.var()).item()


def test_the_refiner_learns_a_filter_across_token_borders_that_pixart_does_not():
    with_refiner, without = fit_a_blur(16), fit_a_blur(0)  # measured: 0.006 and 0.26
    assert with_refiner < 0.02
    assert without > 0.15  # PixArt blurs inside a token but not across its borders


def test_the_refiner_trains_under_bf16_autocast_and_round_trips_strictly(tmp_path):
    net = model(8).train()
    x, uni = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, torch.full((len(x),), 300.0), uni)
    (out.float() - x).pow(2).mean().backward()
    assert torch.isfinite(out.float()).all()
    assert net.refiner.conv_out.weight.grad.abs().sum() > 0

    net.save_pretrained(tmp_path / "refined", EMA_WEIGHTS_FILE)
    loaded = STMDiT.from_pretrained(tmp_path / "refined", EMA_WEIGHTS_FILE)
    assert loaded.config.conv_refiner_channels == 8
    assert torch.equal(loaded.refiner.conv_in.weight, net.refiner.conv_in.weight)

    (tmp_path / "plain").mkdir()
    model(0).save_pretrained(tmp_path / "plain", EMA_WEIGHTS_FILE)
    (tmp_path / "plain" / EMA_WEIGHTS_FILE).write_bytes((tmp_path / "refined" / EMA_WEIGHTS_FILE).read_bytes())
    with pytest.raises(InputError, match="do not match the config"):
        STMDiT.from_pretrained(tmp_path / "plain", EMA_WEIGHTS_FILE)


def test_a_learned_sigma_model_refines_both_halves_and_a_negative_width_is_refused():
    net = model(8, learned_sigma=True)
    assert net.refiner.conv_out.out_channels == 8
    assert net(*inputs()[:1], torch.full((4,), 10.0), inputs()[1]).shape == (4, 4, LATENT, LATENT)
    with pytest.raises(ValueError, match="conv_refiner_channels"):
        config(-1)
