"""The model families of config.yaml, resolved: what each model is, how it trains, how it samples,
which regimes and tables it has. The Snakefile (target lists, rule params) and `stmdit models-json`
(the rows of the tables) both read models through here, so they cannot disagree.

A `models:` entry (its key is the model id used in every path, its `name` the paper's row label):

    fusion: none | adaln | xattn     tokens: direct | pma | perceiver | gsa (xattn only)
    objective: ddpm | flow | flow_x0 p: modality dropout       ge_source: visium | ptpl
    tables: [1, 2, ...]              baseline: id of the sampler-matched no-GE model (Table 3)
    arch: {DiTConfig overrides}      settings: {TrainSettings overrides}
    perturbation_uni_null: bool
    pretrained: folder with config.json + ema.safetensors (not trained), or {format: stmdit | pixcell,
                path: ...}; pixcell is PixCell's diffusers layout. An entry whose path is null is skipped.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stmdit.dit_config import DiTConfig
from stmdit.errors import InputError
from stmdit.provenance import write_json
from stmdit.regimes import REGIMES as REGIMES_GE, REGIMES_UNI_ONLY

# The ODE each objective's samplers solve: flow_x0 predicts x0 but samples the flow's ODE (stmdit.solvers).
OBJECTIVE_ODE = {"ddpm": "ddpm", "flow": "flow", "flow_x0": "flow"}
SAMPLERS = {"ddpm": "ddim", "flow": "euler", "flow_x0": "euler"}  # the default solver's; the others are
# named as their solver. No heun for flow_x0: its correction at sigma = 1/1000 multiplies the x0 error by
# (sigma - 1/1000) / (2/1000), about 26 at 20 steps
OBJECTIVE_SOLVERS = {"ddpm": ("default", "dpmpp_2m"), "flow": ("default", "heun", "unipc"),  # stmdit.solvers
                     "flow_x0": ("default", "unipc")}
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
@dataclass(frozen=True)
class ResolvedModel:
    model: str
    name: str
    fusion: str
    tokens: str | None
    objective: str
    p: float | None
    ge_source: str | None  # visium | ptpl | None (UNI only)
    tables: tuple[int, ...]
    baseline: str | None
    pretrained: str | None
    perturbation_uni_null: bool
    settings: dict[str, Any] = field(default_factory=dict)  # TrainSettings fields, resolved
    pretrained_format: str = "stmdit"  # stmdit | pixcell
    solver: str = "default"  # sampler.solver (stmdit.solvers)

    @property
    def uses_ge(self) -> bool:
        return self.fusion != "none"

    @property
    def ptpl(self) -> bool:
        return self.ge_source == "ptpl"

    @property
    def trained(self) -> bool:
        return self.pretrained is None

    @property
    def sampler(self) -> str:
        return SAMPLERS[self.objective] if self.solver == "default" else self.solver

    @property
    def regimes(self) -> tuple[str, ...]:
        return REGIMES_GE if self.uses_ge else REGIMES_UNI_ONLY

    @property
    def ge_store(self) -> str | None:
        """Feature-store name of the model's GE condition on its training cohort."""
        if not self.uses_ge:
            return None
        return "cancerfoundation_ptpl" if self.ptpl else "cancerfoundation"

    def row(self) -> dict[str, Any]:
        """The model as the report's models file describes it."""
        architecture = {"none": "PixCell", "adaln": "AdaLN"}.get(self.fusion, f"XAttn-{(self.tokens or '').upper()}")
        if self.fusion == "xattn" and self.tokens == "perceiver":
            architecture = "XAttn-Perceiver"
        if self.ptpl:
            architecture = f"PTPL-{architecture}"
        return {"model": self.model, "name": self.name, "p": self.p, "family": self.fusion,
                "architecture": architecture, "sampler": self.sampler, "baseline": self.baseline,
                "ptpl": self.ptpl, "tables": list(self.tables)}


def resolve_models(config: dict) -> dict[str, ResolvedModel]:
    """Every `models:` entry of a validated config, with its training settings resolved:
    package defaults < `train.settings` < size (`train.sizes[train.size]`) and per-family batch
    layout < the entry's own `arch` / `settings`."""
    train = config["train"]
    size = train["sizes"].get(train["size"])
    if size is None:
        raise InputError(None, f"config key train.size = {train['size']!r}: not one of train.sizes {sorted(train['sizes'])}")
    resolved: dict[str, ResolvedModel] = {}
    for model, entry in config["models"].items():
        if model in skipped_models(config):
            continue
        if not MODEL_NAME.match(model):
            raise InputError(None, f"config key models.{model}: a model id may hold letters, digits, '_', '.', '-'")
        fusion = entry.get("fusion", "none")
        tokens = entry.get("tokens")
        if (fusion == "xattn") != (tokens is not None):
            raise InputError(None, f"config key models.{model}: 'tokens' goes with fusion xattn and only with it")
        uses_ge = fusion != "none"
        family = "ge" if uses_ge else "uni_only"
        arch = {**size, **entry.get("arch", {}), "ge_fusion": fusion, "ge_tokens": tokens}
        inherited = dict(train["settings"])
        own = entry.get("settings", {})
        for where, values in (("train.settings", inherited), (f"models.{model}.settings", own)):
            if "steps" in values and "epochs" in values:
                raise InputError(None, f"config key {where}: give the training budget as steps or as epochs, not both")
        if "steps" in own or "epochs" in own:  # a model's own budget replaces the inherited one
            inherited.pop("steps", None), inherited.pop("epochs", None)
        try:  # the denoiser that `stmdit train` will build, checked now rather than when training starts
            DiTConfig.from_dict(arch)
        except ValueError as exc:
            where = f"train.sizes.{train['size']}" + (f" / models.{model}.arch" if entry.get("arch") else "")
            raise InputError(None, f"config key {where} (model {model}): {exc}") from None
        settings = {
            **inherited,
            "micro_batch": train["micro_batch"][family],
            "accumulation": train["accumulation"][family],
            **own,
            "arch": arch,
            "objective": entry.get("objective", "ddpm"),
            "p_drop": entry.get("p", 0.1),
        }
        solver = (config.get("sampler") or {}).get("solver", "default")
        if solver not in OBJECTIVE_SOLVERS[settings["objective"]]:
            raise InputError(None, f"config key sampler.solver = {solver!r}: does not sample {settings['objective']} "
                                   f"models such as {model} (use one of "
                                   f"{', '.join(OBJECTIVE_SOLVERS[settings['objective']])})")
        baseline = entry.get("baseline")
        if baseline is not None and baseline not in config["models"]:
            raise InputError(None, f"config key models.{model}.baseline = {baseline!r}: no such model")
        resolved[model] = ResolvedModel(
            model=model,
            name=entry.get("name", model),
            fusion=fusion,
            tokens=tokens,
            objective=entry.get("objective", "ddpm"),
            p=entry.get("p") if uses_ge else None,
            ge_source=(entry.get("ge_source", "visium") if uses_ge else None),
            tables=tuple(entry.get("tables", [1, 2, 3, 4, 5, 6])),
            baseline=baseline,
            pretrained=pretrained_path(entry.get("pretrained")),
            perturbation_uni_null=bool(entry.get("perturbation_uni_null", False)),
            settings=settings,
            pretrained_format=(entry["pretrained"].get("format", "stmdit")
                               if isinstance(entry.get("pretrained"), dict) else "stmdit"),
            solver=solver,
        )
    return resolved


def pretrained_path(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("path")
    return value


def skipped_models(config: dict) -> dict[str, str]:
    """Models left out of the plan, with the reason: pretrained entries without a path."""
    return {
        model: f"model {model}: skipped, its pretrained {entry['pretrained'].get('format')} weights have no path "
               f"(set models.{model}.pretrained.path to include it)"
        for model, entry in config["models"].items()
        if isinstance(entry.get("pretrained"), dict) and not entry["pretrained"].get("path")
    }


def model_rows(models: dict[str, ResolvedModel]) -> list[dict[str, Any]]:
    rows = [m.row() for m in models.values()]
    for m in models.values():
        if m.uses_ge and m.perturbation_uni_null:
            rows.append({"model": uni_null_id(m.model), "name": f"{m.name} (UNI-null)", "p": m.p, "family": m.fusion,
                         "sampler": m.sampler, "ptpl": m.ptpl, "tables": [5]})
    return rows


def uni_null_id(model: str) -> str:
    """Id of a model's UNI-null perturbation row (what `stmdit perturbation --variant uni_null` writes)."""
    return f"{model}@uni_null"


def write_models_json(rows_json: str, out: Path) -> None:
    try:
        rows = json.loads(rows_json)
    except json.JSONDecodeError as exc:
        raise InputError(None, f"--rows is not valid JSON: {exc}") from None
    write_json(out, {"models": rows})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models-json", help="write the table rows of the configured models")
    p.add_argument("--rows", required=True, help="JSON list of model rows (from the config)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=lambda a: write_models_json(a.rows, a.out))

