"""Every conditioning path carries its condition into generated samples.

A synthetic conditional dataset with two independent factors over a fixed spatial texture shared
by all samples: UNI sets a tone (the latent's mean along one channel direction), GE a colour
strength (along an orthogonal channel direction); both are uniform on [-1, 1]. For each
fusion variant a small, non-bottlenecked denoiser is trained with the project's flow objective (and,
for PMA cross-attention, the x0-parametrised flow_x0 too) and per-sample draws, then sampled through the project's own sampler (`sample_latents`, Euler, all
regimes). The samples' layout and colour are read back and compared with the truth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stmdit.loader import GeBatch
from stmdit.model import DiTConfig, STMDiT, draw_spot_randomness, get_objective
from stmdit.sampling import SamplerSettings, sample_latents

C, SIDE, UNI_DIM, GE_DIM, N_TOKENS = 4, 8, 16, 16, 6
N_TRAIN, N_EVAL = 512, 128
LR = 2e-3
SAMPLE_STEPS = 20
P_DROP = 0.3
TRAIN_STEPS, BATCH = 1000, 64
VARIANTS = [("none", None), ("adaln", None)] + [("xattn", s) for s in ("direct", "pma", "perceiver", "gsa")]
VARIANT_IDS = [f if s is None else f"{f}-{s}" for f, s in VARIANTS]

_basis = np.random.default_rng(0)
_q, _ = np.linalg.qr(_basis.standard_normal((C, 2)))
TONE, COLOUR = (torch.tensor(_q[:, i], dtype=torch.float32) for i in range(2))  # orthonormal
UNI_DIRECTION = torch.tensor(_basis.standard_normal(UNI_DIM), dtype=torch.float32)
GE_DIRECTION = torch.tensor(_basis.standard_normal(GE_DIM), dtype=torch.float32)
GENE_VECTORS = torch.tensor(_basis.standard_normal((N_TOKENS, GE_DIM)), dtype=torch.float32) / 2
TEXTURE = torch.tensor(_basis.standard_normal((C, SIDE, SIDE)), dtype=torch.float32) * 0.3
TEXTURE -= torch.einsum("chw,c->hw", TEXTURE, TONE)[None] * TONE[:, None, None]
TEXTURE -= torch.einsum("chw,c->hw", TEXTURE, COLOUR)[None] * COLOUR[:, None, None]
PIXEL_NOISE = 0.05


def conditions(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tone, strength), independent, each ~ U(-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    side = torch.rand(n, generator=g) * 2 - 1
    strength = torch.rand(n, generator=g) * 2 - 1
    return side, strength


def encode(side: torch.Tensor, strength: torch.Tensor, seed: int) -> tuple[torch.Tensor, GeBatch]:
    """UNI embeds the tone, GE (CLS and tokens) the colour strength, each with some noise."""
    g = torch.Generator().manual_seed(seed + 1)
    uni = side[:, None] * UNI_DIRECTION + 0.1 * torch.randn(len(side), UNI_DIM, generator=g)
    cls = strength[:, None] * GE_DIRECTION + 0.1 * torch.randn(len(side), GE_DIM, generator=g)
    tokens = GENE_VECTORS[None] + strength[:, None, None] * GE_DIRECTION[None, None]
    tokens = tokens + 0.1 * torch.randn(tokens.shape, generator=g)
    return uni, GeBatch(cls, tokens, torch.ones(len(side), N_TOKENS, dtype=torch.bool))


def latents(side: torch.Tensor, strength: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    tone = side[:, None, None, None] * 0.6 * TONE[None, :, None, None]
    colour = strength[:, None, None, None] * COLOUR[None, :, None, None]
    return TEXTURE[None] + tone + colour + PIXEL_NOISE * torch.randn(len(side), C, SIDE, SIDE, generator=g)


def read_factors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tone, colour strength, texture score) of latents: the projections the data was built from
    (1 when the sample carries the shared texture)."""
    tone = torch.einsum("bchw,c->b", x, TONE) / (SIDE * SIDE) / 0.6
    colour = torch.einsum("bchw,c->b", x, COLOUR) / (SIDE * SIDE)
    texture = torch.einsum("bchw,chw->b", x, TEXTURE) / (TEXTURE**2).sum()
    return tone, colour, texture


def config(fusion: str, tokens: str | None) -> DiTConfig:
    # hidden 64 >= patch^2 x channels = 2 x 2 x 4 = 16: no bottleneck
    return DiTConfig(hidden_size=64, depth=2, num_heads=4, patch_size=2, in_channels=C, latent_size=SIDE,
                     uni_dim=UNI_DIM, ge_dim=GE_DIM, ge_source_heads=2, n_ge_queries=4, max_ge_tokens=N_TOKENS,
                     ge_fusion=fusion, ge_tokens=tokens)


def train(fusion: str, tokens: str | None, objective_name: str = "flow") -> STMDiT:
    torch.manual_seed(0)
    model = STMDiT(config(fusion, tokens))
    side, strength = conditions(N_TRAIN, seed=1)
    uni, ge = encode(side, strength, seed=1)
    x0 = latents(side, strength, seed=1)
    objective = get_objective(objective_name)
    optimiser = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    order = torch.Generator().manual_seed(2)
    for step in range(TRAIN_STEPS):
        rows = torch.randint(0, N_TRAIN, (BATCH,), generator=order)
        draws = draw_spot_randomness(rows.tolist(), seed=0, step=step, latent_shape=(C, SIDE, SIDE),
                                       p_drop_uni=P_DROP)
        batch = {"latent": x0[rows], "uni": uni[rows],
                 "ge": GeBatch(ge.cls[rows], ge.tokens[rows], ge.token_mask[rows]) if model.config.uses_ge else None}
        for group in optimiser.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / 50) * (1 - 0.9 * step / TRAIN_STEPS)
        loss = objective.loss(model, batch, draws)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
    return model.eval()


def sample(model: STMDiT, regime: str, uni, ge, objective: str = "flow") -> torch.Tensor:
    keys = [f"eval:{i}" for i in range(len(uni))]
    settings = SamplerSettings(regime=regime, steps=SAMPLE_STEPS, seed=42, s_uni=1.0, s_ge=1.0, batch_size=N_EVAL)
    return sample_latents(model, objective, keys, uni, ge if model.config.uses_ge else None, settings)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


@pytest.fixture(scope="module")
def evaluation():
    side, strength = conditions(N_EVAL, seed=7)
    uni, ge = encode(side, strength, seed=7)
    return side, strength, uni, ge


@pytest.mark.parametrize(("fusion", "tokens", "objective"),
                         [(f, s, "flow") for f, s in VARIANTS] + [("xattn", "pma", "flow_x0")],
                         ids=VARIANT_IDS + ["xattn-pma-flow_x0"])
def test_samples_follow_their_conditions(fusion, tokens, objective, evaluation):
    torch.set_num_threads(2)
    side, strength, uni, ge = evaluation
    model = train(fusion, tokens, objective)
    data = latents(side, strength, seed=7)
    data_max = data.abs().max()

    regimes = ("uni_ge", "uni", "ge", "uncond") if model.config.uses_ge else ("uni", "uncond")
    samples = {regime: sample(model, regime, uni, ge, objective) for regime in regimes}
    for regime, x in samples.items():
        assert torch.isfinite(x).all() and x.abs().max() < 1.5 * data_max, f"{regime}: samples left the data range"

    for regime, x in samples.items():
        assert abs(float(read_factors(x)[2].mean()) - 1.0) < 0.1, f"{regime}: the shared texture is missing"

    # UNI-conditioned samples take their spot's tone
    tone, colour, _ = read_factors(samples["uni"])
    assert corr(tone, side) > 0.8, "uni: tone does not follow UNI"
    if model.config.uses_ge:
        for regime in ("uni_ge", "ge"):
            _, colour_, _ = read_factors(samples[regime])
            assert corr(colour_, strength) > 0.8, f"{regime}: colour does not follow GE"
        tone_, _, _ = read_factors(samples["uni_ge"])
        assert corr(tone_, side) > 0.8, "uni_ge: tone does not follow UNI"
        # with UNI nulled the tone is the marginal's, not the spot's
        tone_, _, _ = read_factors(samples["ge"])
        assert abs(corr(tone_, side)) < 0.3, "ge: tone follows UNI although UNI is nulled"
    # with GE nulled (or absent: `none`) the colour carries nothing of the spot's GE
    assert abs(corr(colour, strength)) < 0.3, "uni: colour follows GE although GE is nulled or absent"

    # unconditional samples follow neither spot and match the marginal: centred, spread like the data
    # within a bound. At this budget the null branch is under-dispersed (per-element spread measured
    # at 0.45-0.5 of the data's for p = 0.3; 0.99 for a model trained with p = 1, i.e. always null;
    # 0.02 for p = 0, an untrained null token), so the bound catches a dead null token or a
    # diverging sampler, not the last factor of two.
    x = samples["uncond"]
    tone, colour, _ = read_factors(x)
    assert abs(corr(tone, side)) < 0.3 and abs(corr(colour, strength)) < 0.3
    assert abs(float(tone.mean())) < 0.2 and abs(float(colour.mean())) < 0.2, "uncond: samples are off-centre"
    spread = float((x.var(dim=0) / data.var(dim=0)).mean())
    assert 0.3 < spread < 1.4, f"uncond: per-element spread is {spread:.2f} of the data's"
