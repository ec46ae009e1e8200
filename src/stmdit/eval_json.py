"""The evaluation JSONs: one file per model, cohort and metric, the contract between the metric
stages (`stmdit.evaluate`) and the tables and checks that read them (`stmdit.report`,
`stmdit.demo_checks`). Build one with a `*_json` function, write it with `write_eval_json` and
read it with `load_eval_json`: the three check the same layout, so producer and readers cannot
drift.

Evaluation JSON layouts (one file per model, cohort and metric; build them with the `*_json`
functions below and write them with `write_eval_json`, which checks the layout, so the producer
and this report cannot drift). Regimes are "uni_ge", "uni", "ge", "uncond"; a model has the
regimes it can be sampled in (a UNI-only baseline: "uni" only). An FID entry is what
`stmdit.metrics.fid_bootstrap` returns: {"point", "mean", "lo", "hi", "n_boot", "n_real", "n_gen",
...}; tables print the bootstrap mean with its percentile interval and the point next to it.

results/eval/{model}/{cohort}/fid.json          Tables 1 and 4
    {"metric": "fid", "model", "cohort",
     "regimes": {regime: FID entry},
     "per_tissue": {regime: {"labels": {label: FID entry}, "skipped": {label: reason}, "min_spots"}},
     "features": {"real": path, "generated": {regime: path}},
     "encoders": {"h0mini": "smoke" | "real"}, "provenance": {...}}
results/eval/{model}/{cohort}/auc.json          Table 2
    {"metric": "auc", "model", "cohort",
     "regressors": {"oracle" | "midnight_mlp": {"ks": [k...],
         "real": {"curve": [r per k], "auc", "lo", "hi"},      (real test tiles: the ceiling)
         "generated": {regime: {"curve", "auc", "lo", "hi"}},
         "null": {"by_construction": 0.0,
                  "empirical": {"curve", "auc", "lo", "hi", "sd", "n_perm"},   (permutation null)
                  "empirical_method": text,
                  "noise_tiles": {"curve", "auc", "lo", "hi"}}}},   (when noise tiles were scored)
     "features": {...}, "encoders": {"uni2h": ..., "midnight": ...}, "provenance": {...}}
    (a regressor entry is what `stmdit.metrics.transcriptomic_fidelity` returns)
results/eval/{model}/{cohort}/perturbation.json Table 5
    {"metric": "perturbation", "model", "cohort", "alphas": [...], "monotonicity_weight",
     "mode": "centroid" (GE between the source and target class centroids, paper D.7) | "spotwise",
     "pairs": {"T->S": {"source", "target", "transition", "monotonicity", "composite", "n_ref"}, ...},
     "mean_composite", "encoders": {"h0mini": ..., "cancerfoundation": ...}, "provenance": {...}}
results/eval/{model}/{ood cohort}/ood_fid.json  Table 3 (cohort = the H&E-only one)
    {"metric": "ood_fid", "model", "cohort", "n_subsample", "seed", "regimes": {regime: FID entry},
     "features": {...}, "encoders": {...}, "provenance": {...}}
results/eval/{model}/{cohort}/swap_fid.json     Table 6 (PTPL models fed DeepSpot vs Visium GE)
    {"metric": "swap_fid", "model", "cohort", "regime": "uni_ge",
     "conditions": {"deepspot": FID entry, "visium": FID entry},
     "features": {...}, "encoders": {...}, "provenance": {...}}
results/eval/{model}/{cohort}/{palette,texture,layout}.json   diagnostics (not in the paper; demo-checks)
    {"metric": "palette" | "texture" | "layout", "model", "cohort", "regimes": {regime: entry},
     "measure", "interval", ..., "provenance": {...}}; checked: the regimes, and a palette entry's "lo",
    "hi", "null" and "carries_palette" ("follows_layout" for layout; texture: "ratio", "lo", "hi",
    "within_target"). Files written before they named their metric are read as the metric asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from stmdit.errors import InputError
from stmdit.provenance import provenance, write_json
from stmdit.regimes import REGIMES, UNI, UNI_GE

FID_ENTRY_KEYS = ("point", "lo", "hi", "n_real", "n_gen")
EVAL_LAYOUTS = {
    "fid": ("model", "cohort", "regimes", "per_tissue", "features", "encoders", "provenance"),
    "auc": ("model", "cohort", "regressors", "features", "encoders", "provenance"),
    "perturbation": ("model", "cohort", "alphas", "monotonicity_weight", "mode", "pairs", "mean_composite", "encoders",
                     "provenance"),
    "ood_fid": ("model", "cohort", "n_subsample", "seed", "regimes", "features", "encoders", "provenance"),
    "swap_fid": ("model", "cohort", "regime", "conditions", "features", "encoders", "provenance"),
    "palette": ("regimes",),
    "texture": ("regimes", "target"),
    "layout": ("regimes",),
}
DIAGNOSTIC_ENTRY_KEYS = {"palette": ("lo", "hi", "null", "carries_palette"),
                         "layout": ("lo", "hi", "null", "follows_layout"),
                         "texture": ("ratio", "lo", "hi", "within_target")}
REGRESSORS = {"oracle": "Oracle", "midnight_mlp": "Midnight+MLP"}
# How a perturbation series interpolates the GE input (stmdit.perturb.MODES), as Table 5 states it.
PERTURBATION_MODES = {
    "centroid": "GE interpolated between the source and target class centroids (paper D.7)",
    "spotwise": "each reference spot's own GE interpolated toward the target class centroid (not the paper's)",
}


def primary_regime(regimes: Iterable[str]) -> str | None:
    """The regime a single-number column reports: UNI+GE when sampled, else UNI."""
    regimes = set(regimes)
    return next((r for r in (UNI_GE, UNI) if r in regimes), None)


def check_eval_json(doc: Mapping[str, Any], source: str | Path | None = None) -> None:
    """InputError naming `source` unless `doc` has the layout of its metric (module docstring)."""
    metric = doc.get("metric") if isinstance(doc, Mapping) else None
    if metric not in EVAL_LAYOUTS:
        raise InputError(source, f"not an stmdit evaluation JSON: 'metric' is {metric!r}, expected one of {sorted(EVAL_LAYOUTS)}")
    missing = [key for key in EVAL_LAYOUTS[metric] if key not in doc]
    if missing:
        raise InputError(source, f"{metric} JSON lacks {missing}")
    entries: dict[str, Any] = {}
    if metric in ("fid", "ood_fid"):
        entries = {f"regimes.{r}": e for r, e in doc["regimes"].items()}
        unknown = sorted(set(doc["regimes"]) - set(REGIMES))
        if unknown:
            raise InputError(source, f"unknown regimes {unknown} (known: {list(REGIMES)})")
    elif metric in DIAGNOSTIC_ENTRY_KEYS:
        for regime, entry in doc["regimes"].items():
            lacking = [key for key in DIAGNOSTIC_ENTRY_KEYS[metric] if key not in entry]
            if regime not in REGIMES or lacking:
                raise InputError(source, f"regimes.{regime}: expected a regime of {list(REGIMES)} with {lacking or '...'}")
    elif metric == "swap_fid":
        entries = {f"conditions.{c}": e for c, e in doc["conditions"].items()}
        if set(doc["conditions"]) != {"deepspot", "visium"}:
            raise InputError(source, f"swap_fid conditions must be deepspot and visium, got {sorted(doc['conditions'])}")
    for where, entry in entries.items():
        lacking = [key for key in FID_ENTRY_KEYS if key not in entry]
        if lacking:
            raise InputError(source, f"{where} lacks {lacking}")
    if metric == "auc":
        for name, entry in doc["regressors"].items():
            lacking = [key for key in ("ks", "real", "generated", "null") if key not in entry]
            if name not in REGRESSORS or lacking:
                raise InputError(source, f"regressor {name!r}: expected one of {sorted(REGRESSORS)} with ks/real/generated/null")
    if metric == "perturbation":
        for pair, entry in doc["pairs"].items():
            if "composite" not in entry:
                raise InputError(source, f"pair {pair!r} lacks 'composite'")


def _document(metric: str, model: str, cohort: str, params: Mapping[str, Any], inputs: Sequence, **content) -> dict:
    doc = {"metric": metric, "model": model, "cohort": cohort, **content}
    doc["provenance"] = provenance(metric, dict(params), list(inputs))
    check_eval_json(doc)
    return doc


def fid_json(model, cohort, regimes, features, encoders, params, inputs, per_tissue=None) -> dict:
    """fid.json: `regimes` maps regime -> `fid_bootstrap` result; `per_tissue` regime -> `fid_per_label`."""
    return _document("fid", model, cohort, params, inputs, regimes=dict(regimes), per_tissue=dict(per_tissue or {}),
                     features=dict(features), encoders=dict(encoders))


def auc_json(model, cohort, regressors, features, encoders, params, inputs) -> dict:
    """auc.json: `regressors` maps "oracle"/"midnight_mlp" -> `transcriptomic_fidelity` result."""
    return _document("auc", model, cohort, params, inputs, regressors=dict(regressors), features=dict(features),
                     encoders=dict(encoders))


def perturbation_json(model, cohort, pairs, alphas, monotonicity_weight, mode, encoders, params, inputs) -> dict:
    """perturbation.json: `pairs` maps "T->S" etc. -> `perturbation_scores` result plus source/target;
    `mode` is how the GE input was interpolated (PERTURBATION_MODES)."""
    if mode not in PERTURBATION_MODES:
        raise InputError(None, f"perturbation mode must be one of {sorted(PERTURBATION_MODES)}, got {mode!r}")
    composites = [entry["composite"] for entry in pairs.values()]
    return _document("perturbation", model, cohort, params, inputs, pairs=dict(pairs), alphas=list(alphas),
                     monotonicity_weight=float(monotonicity_weight), mode=mode,
                     mean_composite=float(np.mean(composites)), encoders=dict(encoders))


def ood_fid_json(model, cohort, regimes, n_subsample, seed, features, encoders, params, inputs) -> dict:
    """ood_fid.json on the H&E-only cohort: `regimes` as in fid.json (UNI+GE from PTPL GE)."""
    return _document("ood_fid", model, cohort, params, inputs, regimes=dict(regimes), n_subsample=int(n_subsample),
                     seed=int(seed), features=dict(features), encoders=dict(encoders))


def swap_fid_json(model, cohort, deepspot, visium, features, encoders, params, inputs, regime="uni_ge") -> dict:
    """swap_fid.json: FID entries of one PTPL model conditioned on DeepSpot and on Visium GE."""
    return _document("swap_fid", model, cohort, params, inputs, regime=regime,
                     conditions={"deepspot": dict(deepspot), "visium": dict(visium)}, features=dict(features),
                     encoders=dict(encoders))


def write_eval_json(path: str | Path, doc: Mapping[str, Any]) -> None:
    """Check the layout, then write atomically."""
    check_eval_json(doc, path)
    write_json(path, doc)


def load_eval_json(path: str | Path, metric: str | None = None) -> dict:
    """Read and check one evaluation JSON (of `metric`, when given); the file it came from is kept
    under "source"."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "evaluation JSON does not exist") from None
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON ({err})") from None
    if metric in DIAGNOSTIC_ENTRY_KEYS and isinstance(doc, dict):
        doc.setdefault("metric", metric)  # diagnostics written before they named their metric
    check_eval_json(doc, path)
    if metric is not None and doc["metric"] != metric:
        raise InputError(path, f"a {doc['metric']} JSON where a {metric} JSON was expected")
    doc["source"] = str(path)
    return doc
