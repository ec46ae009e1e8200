"""The denoiser, its GE fusion variants, the objectives and guidance, on tiny models (CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from stmdit.errors import InputError
from stmdit.loader import GeBatch
from stmdit.model import (
    GE_FUSIONS,
    REGIMES,
    TOKEN_SOURCES,
    DiTConfig,
    STMDiT,
    count_parameters,
    draw_spot_randomness,
    dual_guidance,
    get_objective,
    guided_prediction,
    single_guidance,
)
from stmdit.model.guidance import batched_predictions

torch.set_num_threads(1)

B, C, SIDE, UNI_DIM, GE_DIM, N_TOKENS = 8, 4, 8, 24, 16, 12
VARIANTS = [("none", None), ("adaln", None)] + [("xattn", source) for source in ("direct", "pma", "perceiver", "gsa")]
GE_VARIANTS = VARIANTS[1:]
VARIANT_IDS = [f if s is None else f"{f}-{s}" for f, s in VARIANTS]


def tiny_config(fusion: str = "none", tokens: str | None = None) -> DiTConfig:
    return DiTConfig(hidden_size=32, depth=2, num_heads=2, in_channels=C, latent_size=SIDE, uni_dim=UNI_DIM,
                     ge_dim=GE_DIM, ge_source_heads=2, n_ge_queries=4, max_ge_tokens=64,
                     ge_fusion=fusion, ge_tokens=tokens)


def tiny_model(fusion="none", tokens=None, seed=0) -> STMDiT:
    torch.manual_seed(seed)
    return STMDiT(tiny_config(fusion, tokens))


def randomize(model: STMDiT, skip_ge: bool = False, seed: int = 1) -> STMDiT:
    """Give every (optionally: every non-GE) parameter random values, as after training, so the
    zero-initialised layers no longer hide the inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if skip_ge and (name.startswith("fusion.") or ".ge_attn." in name):
                continue
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def make_batch(seed: int = 1) -> dict:
    """Latents that depend on the GE CLS and on UNI; padded token sequences of varied length."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(B, GE_DIM, generator=g)
    uni = torch.randn(B, UNI_DIM, generator=g)
    tokens = torch.randn(B, N_TOKENS, GE_DIM, generator=g)
    lengths = torch.randint(3, N_TOKENS + 1, (B, 1), generator=g)
    mask = torch.arange(N_TOKENS)[None] < lengths
    latent = (cls @ torch.randn(GE_DIM, C * SIDE * SIDE, generator=g) / 4).reshape(B, C, SIDE, SIDE)
    latent = latent + 0.3 * (uni @ torch.randn(UNI_DIM, C * SIDE * SIDE, generator=g) / 5).reshape(B, C, SIDE, SIDE)
    return {"latent": latent, "uni": uni, "ge": GeBatch(cls, tokens, mask)}


def other_ge(ge: GeBatch, seed: int = 7) -> GeBatch:
    g = torch.Generator().manual_seed(seed)
    return GeBatch(torch.randn(ge.cls.shape, generator=g), torch.randn(ge.tokens.shape, generator=g), ge.token_mask)


def fixed_draws(p_drop: float = 0.0):
    return draw_spot_randomness(range(B), seed=0, step=0, latent_shape=(C, SIDE, SIDE), p_drop_uni=p_drop)


def train(model, batch, objective_name="ddpm", steps=40, lr=1e-3, p_drop=0.0) -> list[float]:
    objective = get_objective(objective_name)
    draws = fixed_draws(p_drop)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = objective.loss(model, batch, draws)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def predict(model, batch, ge="same", **drops):
    x = batch["latent"]
    t = torch.linspace(10, 990, B)
    with torch.no_grad():
        return model(x, t, batch["uni"], batch["ge"] if ge == "same" else ge, **drops)


# --- variants, shapes, training --------------------------------------------------------------

def test_registry_lists_every_variant():
    assert set(GE_FUSIONS) == {"none", "adaln", "xattn"}
    assert set(TOKEN_SOURCES) == {"direct", "pma", "perceiver", "gsa"}


@pytest.mark.parametrize("fusion,tokens", VARIANTS, ids=VARIANT_IDS)
def test_variant_forward_shape_and_ddpm_loss_falls(fusion, tokens):
    model = tiny_model(fusion, tokens)
    batch = make_batch()
    out = predict(model, batch)
    assert out.shape == (B, C, SIDE, SIDE)
    assert (fusion == "none") == (not any(n.startswith("fusion.") for n, _ in model.named_parameters()))
    losses = train(model, batch, "ddpm", steps=40)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0], losses[::10]


@pytest.mark.parametrize("fusion,tokens", [("none", None), ("adaln", None), ("xattn", "perceiver")],
                         ids=["none", "adaln", "xattn-perceiver"])
def test_flow_loss_falls(fusion, tokens):
    losses = train(tiny_model(fusion, tokens), make_batch(), "flow", steps=60)
    assert losses[-1] < 0.7 * losses[0], losses[::10]


def test_b_size_parameter_counts_on_meta_device():
    counts = {f"{f}-{s}": count_parameters(DiTConfig(ge_fusion=f, ge_tokens=s)) for f, s in VARIANTS}
    uni_only = counts["none-None"]
    assert 110e6 < uni_only < 160e6  # PixArt-B scale
    assert 0.3e6 < counts["adaln-None"] - uni_only < 2e6  # a 256 -> 768 MLP and a gate
    # xattn: 12 extra cross-attentions of 4 x 768^2 weights each, plus the token source.
    for source in ("direct", "pma", "perceiver", "gsa"):
        extra = counts[f"xattn-{source}"] - uni_only
        assert 12 * 4 * 768**2 < extra < 12 * 4 * 768**2 + 3e6, (source, extra)
    with torch.device("meta"):
        model = STMDiT(DiTConfig(ge_fusion="xattn", ge_tokens="perceiver"))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_names_raise_clear_errors():
    with pytest.raises(ValueError, match="known: adaln, none, xattn"):
        tiny_config("film")
    with pytest.raises(ValueError, match="known: direct, gsa, perceiver, pma"):
        tiny_config("xattn", "lstm")
    with pytest.raises(ValueError, match="needs ge_tokens"):
        tiny_config("xattn", None)
    with pytest.raises(ValueError, match="only used by token fusions"):
        tiny_config("adaln", "pma")
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("edm")


def test_input_shapes_are_checked():
    model = tiny_model("xattn", "direct")
    batch = make_batch()
    with pytest.raises(ValueError, match="latents must have shape"):
        model(torch.zeros(B, C, SIDE + 2, SIDE), torch.zeros(B), batch["uni"], batch["ge"])
    with pytest.raises(ValueError, match="UNI must have shape"):
        model(batch["latent"], torch.zeros(B), batch["uni"][:, :5], batch["ge"])
    too_long = GeBatch(batch["ge"].cls, torch.zeros(B, 65, GE_DIM), torch.ones(B, 65, dtype=torch.bool))
    with pytest.raises(ValueError, match="exceed max_ge_tokens"):
        model(batch["latent"], torch.zeros(B), batch["uni"], too_long)


# --- null tokens, masks, fall-backs ---------------------------------------------------------

@pytest.mark.parametrize("fusion,tokens", GE_VARIANTS, ids=VARIANT_IDS[1:])
def test_dropped_conditions_use_null_tokens(fusion, tokens):
    model = randomize(tiny_model(fusion, tokens))
    batch = make_batch()
    everyone = torch.ones(B, dtype=torch.bool)
    kept = predict(model, batch)
    ge_dropped = predict(model, batch, drop_ge=everyone)
    assert not torch.allclose(kept, ge_dropped, atol=1e-4)
    torch.testing.assert_close(ge_dropped, predict(model, batch, ge=other_ge(batch["ge"]), drop_ge=everyone))
    torch.testing.assert_close(ge_dropped, predict(model, batch, ge=None))
    uni_dropped = predict(model, batch, drop_uni=everyone)
    assert not torch.allclose(kept, uni_dropped, atol=1e-4)
    with torch.no_grad():
        x, t = batch["latent"], torch.linspace(10, 990, B)
        torch.testing.assert_close(uni_dropped, model(x, t, torch.randn(B, UNI_DIM), batch["ge"], drop_uni=everyone))
        torch.testing.assert_close(uni_dropped, model(x, t, None, batch["ge"]))
    # per-sample flags: only the flagged samples change
    some = torch.tensor([True, False] * (B // 2))
    partly = predict(model, batch, drop_ge=some)
    torch.testing.assert_close(partly[~some], kept[~some])
    torch.testing.assert_close(partly[some], ge_dropped[some])


@pytest.mark.parametrize("source", sorted(TOKEN_SOURCES))
def test_padded_tokens_do_not_change_the_output(source):
    model = randomize(tiny_model("xattn", source))
    batch = make_batch()
    ge = batch["ge"]
    assert (~ge.token_mask).any()
    noisy_padding = GeBatch(ge.cls, torch.where(ge.token_mask[..., None], ge.tokens, 1e3 * torch.randn_like(ge.tokens)),
                            ge.token_mask)
    torch.testing.assert_close(predict(model, batch, ge=noisy_padding), predict(model, batch), rtol=0, atol=1e-6)
    real_changed = GeBatch(ge.cls, ge.tokens.clone(), ge.token_mask)
    real_changed.tokens[:, 0] = torch.randn(B, GE_DIM, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(predict(model, batch, ge=real_changed), predict(model, batch), atol=1e-4)


def test_missing_tokens_fall_back_to_the_cls_token():
    model = randomize(tiny_model("xattn", "pma"))
    batch = make_batch()
    cls = batch["ge"].cls
    as_one_token = GeBatch(cls, cls[:, None, :], torch.ones(B, 1, dtype=torch.bool))
    torch.testing.assert_close(predict(model, batch, ge=GeBatch(cls)), predict(model, batch, ge=as_one_token))
    # a spot whose mask has no real token also falls back to its CLS
    empty = GeBatch(cls, batch["ge"].tokens, torch.zeros(B, N_TOKENS, dtype=torch.bool))
    torch.testing.assert_close(predict(model, batch, ge=empty), predict(model, batch, ge=as_one_token))


@pytest.mark.parametrize("fusion,tokens", [("adaln", None), ("xattn", "direct"), ("xattn", "gsa")],
                         ids=["adaln", "xattn-direct", "xattn-gsa"])
def test_ge_branch_starts_silent_then_learns(fusion, tokens):
    model = randomize(tiny_model(fusion, tokens), skip_ge=True)  # a trained backbone, fresh GE branch
    batch = make_batch()
    before = predict(model, batch)
    assert before.abs().mean() > 1e-2
    torch.testing.assert_close(predict(model, batch, ge=other_ge(batch["ge"])), before, rtol=0, atol=0)
    norms = model.condition_norms()
    assert norms.get("ge_gate", 0.0) == 0.0 and norms.get("ge_xattn_out_norm", 0.0) == 0.0
    train(model, batch, "ddpm", steps=5, lr=1e-2)
    assert not torch.allclose(predict(model, batch, ge=other_ge(batch["ge"])), predict(model, batch), atol=1e-4)
    norms = model.condition_norms()
    assert norms["ge_gate" if fusion == "adaln" else "ge_xattn_out_norm"] > 0
    assert norms["ge_proj_norm"] > 0 and norms["uni_proj_norm"] > 0


# --- persistence -----------------------------------------------------------------------------

@pytest.mark.parametrize("fusion,tokens", [("adaln", None), ("xattn", "perceiver")], ids=["adaln", "xattn-perceiver"])
def test_save_load_round_trip(tmp_path, fusion, tokens):
    model = randomize(tiny_model(fusion, tokens))
    batch = make_batch()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["ge_fusion"] == fusion and saved["provenance"]["step"] == "model"
    loaded = STMDiT.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.uni_null, model.uni_null, rtol=0, atol=0)
    null_name = "null_cls" if fusion == "adaln" else "null_tokens"
    torch.testing.assert_close(getattr(loaded.fusion, null_name), getattr(model.fusion, null_name), rtol=0, atol=0)
    everyone = torch.ones(B, dtype=torch.bool)
    for drops in ({}, {"drop_uni": everyone, "drop_ge": everyone}):
        torch.testing.assert_close(predict(loaded, batch, **drops), predict(model, batch, **drops), rtol=0, atol=0)


def test_from_pretrained_rejects_bad_input(tmp_path):
    model = tiny_model("adaln")
    with pytest.raises(InputError, match="config not found"):
        STMDiT.from_pretrained(tmp_path / "absent")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="model.safetensors: cannot read"):
        STMDiT.from_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(InputError, match="do not match the config"):
        STMDiT.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "width": 3}))
    with pytest.raises(InputError, match="unknown DiTConfig field"):
        STMDiT.from_pretrained(tmp_path / "m")


def test_save_pretrained_takes_an_ema_state_dict(tmp_path):
    model = tiny_model("none")
    ema_state = {k: v + 1.0 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "m", weights_name="ema.safetensors", state_dict=ema_state)
    loaded = STMDiT.from_pretrained(tmp_path / "m", weights_name="ema.safetensors")
    torch.testing.assert_close(loaded.proj_out.weight, model.proj_out.weight + 1.0)


# --- objectives and per-sample randomness ---------------------------------------------------

def test_ddpm_and_flow_targets():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, C, SIDE, SIDE, generator=g), torch.randn(4, C, SIDE, SIDE, generator=g)
    u = torch.tensor([0.0, 0.25, 0.5, 0.9999])
    ddpm = get_objective("ddpm").prepare(x0, noise, u)
    steps = torch.tensor([0, 250, 500, 999])
    assert torch.equal(ddpm.timestep, steps.float())
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[steps].float()
    expected = alpha_bar.sqrt()[:, None, None, None] * x0 + (1 - alpha_bar).sqrt()[:, None, None, None] * noise
    torch.testing.assert_close(ddpm.x_t, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ddpm.target, noise)
    flow = get_objective("flow").prepare(x0, noise, u)
    torch.testing.assert_close(flow.x_t[0], x0[0])
    torch.testing.assert_close(flow.x_t[2], 0.5 * (x0[2] + noise[2]))
    torch.testing.assert_close(flow.target, noise - x0)
    torch.testing.assert_close(flow.timestep, u * 1000)
    flow_x0 = get_objective("flow_x0")
    x0_batch = flow_x0.prepare(x0, noise, u)
    assert torch.equal(x0_batch.x_t, flow.x_t) and torch.equal(x0_batch.timestep, flow.timestep)
    assert torch.equal(x0_batch.target, x0)
    assert torch.equal(flow_x0.x0_from_prediction(x0_batch.x_t, x0_batch.timestep, x0), x0)
    # the velocity it steps with is noise - x0, the flow's target, wherever t > 0
    velocity = flow_x0.solver_prediction(x0_batch.x_t[1:], x0_batch.timestep[1:], x0[1:])
    torch.testing.assert_close(velocity, (noise - x0)[1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flow_x0.solver_prediction(x0_batch.x_t[2:3], x0_batch.timestep[2], x0[2:3]),
                               (noise - x0)[2:3], rtol=1e-5, atol=1e-5)  # a scalar timestep, as the solvers pass
    with pytest.raises(ValueError, match="t = 0"):
        flow_x0.solver_prediction(x0_batch.x_t[:1], x0_batch.timestep[:1], x0[:1])


def test_draws_do_not_depend_on_batch_composition():
    keys = [f"s1:AAAC-{i}" for i in range(6)]
    full = draw_spot_randomness(keys, seed=5, step=12, latent_shape=(C, SIDE, SIDE), p_drop_uni=0.5)
    alone = draw_spot_randomness(keys[3:4], seed=5, step=12, latent_shape=(C, SIDE, SIDE), p_drop_uni=0.5)
    shuffled = draw_spot_randomness(keys[::-1], seed=5, step=12, latent_shape=(C, SIDE, SIDE), p_drop_uni=0.5)
    for field in ("noise", "u", "drop_uni", "drop_ge"):
        assert torch.equal(getattr(alone, field)[0], getattr(full, field)[3])
        assert torch.equal(getattr(shuffled, field).flip(0), getattr(full, field))
    next_step = draw_spot_randomness(keys, seed=5, step=13, latent_shape=(C, SIDE, SIDE), p_drop_uni=0.5)
    assert not torch.equal(next_step.noise, full.noise)


def regime_counts(drop_uni: np.ndarray, drop_ge: np.ndarray) -> np.ndarray:
    """Counts of (both kept, UNI only, GE only, both dropped)."""
    return np.array([(~drop_uni & ~drop_ge).sum(), (~drop_uni & drop_ge).sum(),
                     (drop_uni & ~drop_ge).sum(), (drop_uni & drop_ge).sum()])


def test_modality_dropout_is_independent_per_condition():
    p, n = 0.3, 20_000
    draws = draw_spot_randomness(range(n), seed=11, step=0, latent_shape=(1,), p_drop_uni=p)
    expected = n * np.array([(1 - p) ** 2, (1 - p) * p, p * (1 - p), p**2])
    observed = regime_counts(draws.drop_uni.numpy(), draws.drop_ge.numpy())
    # A correct implementation fails this with probability 1e-6.
    assert chisquare(observed, expected).pvalue > 1e-6, observed
    # The same test rejects joint dropout (one draw drops both), so it can tell them apart.
    joint = draws.drop_uni.numpy()
    assert chisquare(regime_counts(joint, joint), expected).pvalue < 1e-12


def test_bf16_autocast_and_gradient_checkpointing_on_cpu():
    batch = make_batch()
    objective = get_objective("flow")
    model = randomize(tiny_model("xattn", "pma"))
    full = objective.loss(model, batch, fixed_draws(0.3))
    bf16 = objective.loss(model, batch, fixed_draws(0.3), autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
    assert abs(bf16.item() - full.item()) < 0.05 * full.item()
    full.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    objective.loss(model, batch, fixed_draws(0.3)).backward()
    for expected, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6)


# --- guidance --------------------------------------------------------------------------------

def guidance_setup(fusion="xattn", tokens="pma"):
    """In float64: the identities compare one batched forward with separate ones, and float32 GEMMs
    of different batch sizes round differently on some CPUs (up to 8e-4 here, against 1e-5)."""
    model = randomize(tiny_model(fusion, tokens)).eval().double()
    batch = make_batch()
    ge = batch["ge"]
    ge = GeBatch(ge.cls.double(), ge.tokens.double(), ge.token_mask)
    return model, batch["latent"].double(), torch.linspace(10, 990, B, dtype=torch.float64), batch["uni"].double(), ge


@torch.no_grad()
def test_dual_guidance_identities():
    model, x, t, uni, ge = guidance_setup()
    yes, no = torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    e00, eu0, eug = (model(x, t, uni, ge, drop_uni=du, drop_ge=dg) for du, dg in ((yes, yes), (no, yes), (no, no)))
    assert not torch.allclose(eug, eu0, atol=1e-4) and not torch.allclose(eu0, e00, atol=1e-4)
    batched = batched_predictions(model, x, t, uni, ge, [(True, True), (False, True), (False, False)])
    for one_pass, separate in zip(batched, (e00, eu0, eug)):
        torch.testing.assert_close(one_pass, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dual_guidance(model, x, t, uni, ge, 1.0, 1.0), eug, rtol=1e-5, atol=1e-5)
    s_uni, s_ge = 4.0, 3.0
    expected = e00 + s_uni * (eu0 - e00) + s_ge * (eug - eu0)
    torch.testing.assert_close(guided_prediction(model, x, t, uni, ge, "uni_ge", s_uni, s_ge), expected,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided_prediction(model, x, t, uni, ge, "uni", s_uni, s_ge),
                               e00 + s_uni * (eu0 - e00), rtol=1e-4, atol=1e-4)
    e0g = model(x, t, uni, ge, drop_uni=yes, drop_ge=no)
    torch.testing.assert_close(guided_prediction(model, x, t, uni, ge, "ge", s_uni, s_ge),
                               e00 + s_ge * (e0g - e00), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(guided_prediction(model, x, t, uni, ge, "uncond"), e00, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_uni_only_model_uses_single_guidance():
    model, x, t, uni, _ = guidance_setup("none", None)
    yes, no = torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    e0, eu = model(x, t, uni, drop_uni=yes), model(x, t, uni, drop_uni=no)
    assert not torch.allclose(e0, eu, atol=1e-4)
    torch.testing.assert_close(single_guidance(model, x, t, uni, 1.0), eu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided_prediction(model, x, t, uni, None, "uni", s_uni=4.0),
                               e0 + 4.0 * (eu - e0), rtol=1e-4, atol=1e-4)
    for regime in ("uni_ge", "ge"):
        with pytest.raises(ValueError, match="needs a GE model"):
            guided_prediction(model, x, t, uni, None, regime)
    with pytest.raises(ValueError, match="known: uni_ge, uni, ge, uncond"):
        guided_prediction(model, x, t, uni, None, "both")
    assert REGIMES == ("uni_ge", "uni", "ge", "uncond")


@pytest.mark.parametrize("fusion,tokens", [("none", None), ("adaln", None), ("xattn", "pma"), ("xattn", "gsa")],
                         ids=["none", "adaln", "xattn-pma", "xattn-gsa"])
@torch.no_grad()
def test_condition_cache_gives_the_same_guided_steps_and_encodes_once(fusion, tokens, monkeypatch):
    """A sampler's cache holds the conditions' encoding from its first step: every later step's
    guided prediction is bit-identical to recomputing it, and the encoding runs once per regime."""
    from stmdit.model.guidance import ConditionCache

    model, x, t, uni, ge = guidance_setup(fusion, tokens)
    ge = ge if model.config.uses_ge else None
    regimes = ("uni_ge", "uni", "ge", "uncond") if model.config.uses_ge else ("uni", "uncond")
    calls = []
    encode = model.encode_conditions
    monkeypatch.setattr(model, "encode_conditions", lambda *a, **k: calls.append(1) or encode(*a, **k))
    for regime in regimes:
        cache, calls[:] = ConditionCache(), []
        for step, scale in enumerate((1.0, 0.6, 0.2)):
            x_step, t_step = x * scale + step, t * scale
            cached = guided_prediction(model, x_step, t_step, uni, ge, regime, 2.5, 2.5, cache=cache)
            fresh = guided_prediction(model, x_step, t_step, uni, ge, regime, 2.5, 2.5)
            assert torch.equal(cached, fresh), (regime, step)
        assert len(calls) == 1 + 3, regime  # the cache's one encoding, plus one per uncached call
