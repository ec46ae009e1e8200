"""Classifier-free guidance over all latent channels, and the conditioning regimes of Table 1.

Dual guidance (GE models):  e(0,0) + s_uni (e(u,0) - e(0,0)) + s_ge (e(u,g) - e(u,0))
Single guidance (UNI only): e(0) + s_uni (e(u) - e(0))

`e(a, b)` is the model prediction with UNI kept (u) or nulled (0) and GE kept (g) or nulled (0).
The conditionings a step needs are evaluated in one batched forward pass. Predictions may be
epsilon (ddpm) or velocity (flow): guidance is linear in either. A `ConditionCache` keeps the
repeated conditions and, for a model with `encode_conditions`, their encoding (UNI projection, GE
token source) from the first step of a batch of spots for all its later steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from stmdit.loader import GeBatch
from stmdit.regimes import GE, PAPER_S_GE, PAPER_S_UNI, REGIMES, UNCOND, UNI, UNI_GE  # noqa: F401


BOTH_NULL = (True, True)  # (drop_uni, drop_ge)
UNI_ONLY = (False, True)
GE_ONLY = (True, False)
BOTH_KEPT = (False, False)


@dataclass(frozen=True)
class Regime:
    """A conditioning regime: which guidance it uses and the (drop_uni, drop_ge) conditionings that
    guidance evaluates (the last one is the regime's own conditioning)."""

    name: str
    guidance: str  # "dual" | "uni" | "ge" | "none"
    conditions: tuple[tuple[bool, bool], ...]
    needs_ge_model: bool


REGIME_SPECS: dict[str, Regime] = {
    UNI_GE: Regime(UNI_GE, "dual", (BOTH_NULL, UNI_ONLY, BOTH_KEPT), needs_ge_model=True),
    UNI: Regime(UNI, "uni", (BOTH_NULL, UNI_ONLY), needs_ge_model=False),
    GE: Regime(GE, "ge", (BOTH_NULL, GE_ONLY), needs_ge_model=True),
    UNCOND: Regime(UNCOND, "none", (BOTH_NULL,), needs_ge_model=False),
}


def regime_spec(name: str) -> Regime:
    if name not in REGIME_SPECS:
        raise ValueError(f"unknown regime {name!r}; known: {', '.join(REGIMES)}")
    return REGIME_SPECS[name]


def _repeat_ge(ge: GeBatch | None, times: int) -> GeBatch | None:
    if ge is None:
        return None
    repeat = lambda t: None if t is None else torch.cat([t] * times)  # noqa: E731
    return GeBatch(repeat(ge.cls), repeat(ge.tokens), repeat(ge.token_mask))


@dataclass
class RepeatedConditions:
    """The inputs of one batched forward pass besides x and t: conditions repeated per conditioning."""

    uni: torch.Tensor | None
    ge: GeBatch | None
    drop_uni: torch.Tensor
    drop_ge: torch.Tensor
    encoded: Any = None  # the model's encode_conditions of the above, when it has one


@dataclass
class ConditionCache:
    """RepeatedConditions by conditioning list, valid for ONE uni/ge batch (a sampler's spots)."""

    entries: dict[tuple, RepeatedConditions] = field(default_factory=dict)


def repeated_conditions(model, uni, ge, conditions, batch_size: int, device) -> RepeatedConditions:
    n = len(conditions)
    flags = torch.tensor(conditions, dtype=torch.bool, device=device).repeat_interleave(batch_size, dim=0)
    repeated = RepeatedConditions(None if uni is None else torch.cat([uni] * n), _repeat_ge(ge, n),
                                  flags[:, 0], flags[:, 1])
    if hasattr(model, "encode_conditions"):
        repeated.encoded = model.encode_conditions(repeated.uni, repeated.ge, repeated.drop_uni, repeated.drop_ge,
                                                   n * batch_size)
    return repeated


def batched_predictions(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float,
    uni: torch.Tensor | None,
    ge: GeBatch | None,
    conditions: list[tuple[bool, bool]],
    cache: ConditionCache | None = None,
) -> list[torch.Tensor]:
    """The model's prediction under each (drop_uni, drop_ge) condition, in ONE forward pass over x
    repeated len(conditions) times. With `cache`, the conditions' part is computed once per list
    of conditionings (the caller keeps one cache per uni/ge batch)."""
    batch_size, n = x.shape[0], len(conditions)
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    t = t.expand(batch_size) if t.ndim == 0 else t
    key = tuple(conditions)
    repeated = cache.entries.get(key) if cache is not None else None
    if repeated is None:
        repeated = repeated_conditions(model, uni, ge, conditions, batch_size, x.device)
        if cache is not None:
            cache.entries[key] = repeated
    extra = {} if repeated.encoded is None else {"encoded": repeated.encoded}
    prediction = model(torch.cat([x] * n), torch.cat([t] * n), repeated.uni, repeated.ge,
                       drop_uni=repeated.drop_uni, drop_ge=repeated.drop_ge, **extra)
    return list(prediction.chunk(n, dim=0))


def dual_guidance(model, x, t, uni, ge, s_uni: float = PAPER_S_UNI, s_ge: float = PAPER_S_GE,
                  cache=None) -> torch.Tensor:
    """e(0,0) + s_uni (e(u,0) - e(0,0)) + s_ge (e(u,g) - e(u,0)), three conditionings in one pass."""
    e00, eu0, eug = batched_predictions(model, x, t, uni, ge, [BOTH_NULL, UNI_ONLY, BOTH_KEPT], cache)
    return e00 + s_uni * (eu0 - e00) + s_ge * (eug - eu0)


def single_guidance(model, x, t, uni, s_uni: float = PAPER_S_UNI, cache=None) -> torch.Tensor:
    """e(0) + s_uni (e(u) - e(0)), GE nulled: UNI-only models, or the "uni" regime of GE models."""
    e0, eu = batched_predictions(model, x, t, uni, None, [BOTH_NULL, UNI_ONLY], cache)
    return e0 + s_uni * (eu - e0)


def ge_guidance(model, x, t, ge, s_ge: float = PAPER_S_GE, cache=None) -> torch.Tensor:
    """e(0,0) + s_ge (e(0,g) - e(0,0)), UNI nulled: the "ge" regime."""
    e00, e0g = batched_predictions(model, x, t, None, ge, [BOTH_NULL, GE_ONLY], cache)
    return e00 + s_ge * (e0g - e00)


def guided_prediction(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor | float,
    uni: torch.Tensor | None,
    ge: GeBatch | None,
    regime: str = UNI_GE,
    s_uni: float = PAPER_S_UNI,
    s_ge: float = PAPER_S_GE,
    cache: ConditionCache | None = None,
) -> torch.Tensor:
    """The guided prediction of one denoising step in `regime` (one batched forward pass):
    uni_ge: dual guidance; uni: GE nulled, single guidance with s_uni; ge: UNI nulled, guidance on
    GE with s_ge; uncond: both nulled, no guidance. A UNI-only model accepts "uni" and "uncond".
    `cache`: one per uni/ge batch, shared by its denoising steps (see `ConditionCache`)."""
    spec = regime_spec(regime)
    if spec.needs_ge_model and not model.config.uses_ge:
        raise ValueError(f"regime {regime!r} needs a GE model; this model is UNI-only")
    if spec.guidance == "dual":
        return dual_guidance(model, x, t, uni, ge, s_uni, s_ge, cache)
    if spec.guidance == "uni":
        return single_guidance(model, x, t, uni, s_uni, cache)
    if spec.guidance == "ge":
        return ge_guidance(model, x, t, ge, s_ge, cache)
    return batched_predictions(model, x, t, None, None, [BOTH_NULL], cache)[0]
