"""The conditioning regimes of Table 1 and the paper's guidance scales, without torch.

A regime names which conditions reach the denoiser at sampling: uni_ge (both, dual guidance), uni
(GE nulled), ge (UNI nulled), uncond (both nulled). A UNI-only model samples uni and uncond. The
model code (`stmdit.model.guidance`), the model table (`stmdit.models_config`), the evaluation JSONs
(`stmdit.eval_json`) and the command-line defaults all take these names and numbers from here.
"""

UNI_GE = "uni_ge"
UNI = "uni"
GE = "ge"
UNCOND = "uncond"
REGIMES = (UNI_GE, UNI, GE, UNCOND)
REGIMES_UNI_ONLY = (UNI, UNCOND)

# the paper's guidance scales (D.3): every default of s_uni / s_ge is one of these
PAPER_S_UNI = 4.0
PAPER_S_GE = 3.0
