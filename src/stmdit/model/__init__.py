"""The STMDiT denoiser, its GE fusion variants, training objectives and guidance."""

from stmdit.model.analytic import GaussianConfig, GaussianDenoiser
from stmdit.model.dit import DiTConfig, STMDiT, count_parameters
from stmdit.model.fusion import GE_FUSIONS, TOKEN_SOURCES, GeFusion, TokenSource, register_fusion, register_token_source
from stmdit.model.guidance import (
    GE,
    REGIME_SPECS,
    REGIMES,
    UNCOND,
    UNI,
    UNI_GE,
    dual_guidance,
    guided_prediction,
    regime_spec,
    single_guidance,
)
from stmdit.model.objectives import (
    OBJECTIVES,
    DiffusionObjective,
    SpotDraws,
    draw_spot_randomness,
    get_objective,
)

__all__ = [
    "DiTConfig", "STMDiT", "count_parameters", "GaussianConfig", "GaussianDenoiser",
    "GE_FUSIONS", "TOKEN_SOURCES", "GeFusion", "TokenSource", "register_fusion", "register_token_source",
    "GE", "REGIMES", "REGIME_SPECS", "UNCOND", "UNI", "UNI_GE",
    "dual_guidance", "guided_prediction", "regime_spec", "single_guidance",
    "OBJECTIVES", "DiffusionObjective", "SpotDraws", "draw_spot_randomness", "get_objective",
]
