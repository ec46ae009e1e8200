"""What `make demo` prints at the end: whether the demo's own numbers show the models learning,
and how long each stage took.

    stmdit demo-checks --results results --cohort demo [--strict]

The checks read the evaluation JSONs the workflow wrote (`eval/{model}/{cohort}/fid.json`,
`auc.json`, `palette.json`, `texture.json`); each names the numbers it compared. FID intervals are
the spot-level bootstrap's 95% percentile intervals. "Below FID(uncond)" means the paired bootstrap
difference from uncond lies below -2% of FID(uncond) (for fid.json files without it: the two
intervals are disjoint). `--strict` exits 1 when a check fails. Lines marked INFO are diagnostics,
neither passes nor failures: the token mosaic and the roughness by block size (`texture.json`), each
model's final loss against a Gaussian with its latents' spectrum (`models/*/training.json`), and the
layout agreement (`layout.json`), which is no check because UNI2-h is a crop- and flip-invariant
embedding: a UNI-conditioned tile is expected to share its spot's palette and texture, not its
layout. Stage times are the sums of the jobs' wall-clock seconds from
`benchmarks/` (jobs may have run side by side, so they add up to more than the run took).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stmdit.eval_json import load_eval_json

log = logging.getLogger(__name__)

# The smallest FID gain over uncond, as a fraction of FID(uncond), that "below FID(uncond)" accepts:
# a paired interval can exclude 0 by a hundredth of a point (tiles that are uncond's, on 200 resamples)
MIN_FID_GAIN = 0.02


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: information only, neither a pass nor a failure
    detail: str


def _interval(entry: dict) -> str:
    centre = entry.get("mean", entry.get("auc", entry.get("point")))
    return f"{centre:.3f} [{entry['lo']:.3f}, {entry['hi']:.3f}]"


def _below(a: dict, b: dict) -> bool:
    """a's interval lies entirely below b's."""
    return a["hi"] < b["lo"]


def _below_uncond(entry: dict, uncond: dict) -> tuple[bool, str]:
    """Whether a regime's FID lies below FID(uncond) on the same spots, and the numbers. With the
    paired bootstrap difference in fid.json (`minus_uncond`): its interval lies below
    -MIN_FID_GAIN x FID(uncond), so a regime whose tiles are uncond's to within a fraction of an FID
    point does not pass on a tight interval alone. Without it (fid.json files written before it):
    the two intervals are disjoint, a stricter test."""
    marginal = f"{_interval(entry)} vs {_interval(uncond)}"
    difference = entry.get("minus_uncond")
    if difference is None:
        return _below(entry, uncond), marginal
    bound = -MIN_FID_GAIN * uncond["mean"]
    return difference["hi"] < bound, f"{marginal}; paired difference {_interval(difference)}, needs < {bound:.1f}"


def fid_checks(fid_files: dict[str, Path]) -> list[Check]:
    checks = []
    ge_beats_uncond = []
    for model, path in sorted(fid_files.items()):
        regimes = load_eval_json(path)["regimes"]
        uncond = regimes["uncond"]
        for regime in ("uni", "uni_ge"):
            if regime in regimes:
                checks.append(Check(f"{model}: FID({regime}) below FID(uncond)", *_below_uncond(regimes[regime], uncond)))
        if "ge" in regimes:
            ge_beats_uncond.append((model, *_below_uncond(regimes["ge"], uncond)))
        for regime, entry in regimes.items():
            if entry.get("mean") is not None:
                inside = entry["lo"] <= entry["mean"] <= entry["hi"]
                checks.append(Check(f"{model}: reported FID({regime}) lies in its interval", inside, _interval(entry)))
    if ge_beats_uncond:
        winners = [m for m, ok, _ in ge_beats_uncond if ok]
        checks.append(Check("a GE model's FID(ge) below its FID(uncond)", bool(winners),
                            "; ".join(f"{m}: {d}" for m, _, d in ge_beats_uncond)))
    return checks


def auc_checks(auc_files: dict[str, Path]) -> list[Check]:
    checks = []
    oracle_above_zero = []
    for model, path in sorted(auc_files.items()):
        regressors = load_eval_json(path)["regressors"]
        oracle = regressors["oracle"]
        if "uni_ge" in oracle["generated"]:
            entry = oracle["generated"]["uni_ge"]
            oracle_above_zero.append((model, entry["lo"] > 0, _interval(entry)))
        for name, scored in regressors.items():
            for null_name in ("empirical", "noise_tiles"):
                null = scored.get("null", {}).get(null_name)
                if null is None:
                    continue
                covers = null["lo"] <= 0 <= null["hi"]
                checks.append(Check(f"{model}: {name} null ({null_name}) covers 0", covers, _interval(null)))
    if oracle_above_zero:
        checks.append(Check("a GE model's Oracle AUC of UNI+GE tiles above 0",
                            any(ok for _, ok, _ in oracle_above_zero),
                            "; ".join(f"{m}: {d}" for m, _, d in oracle_above_zero)))
    return checks


def palette_checks(palette_files: dict[str, Path], models: list[str]) -> list[Check]:
    """UNI-conditioned tiles carry their spot's palette: mean-colour r above the other-spot null."""
    checks = []
    for model in models:
        if model not in palette_files:
            checks.append(Check(f"{model}: palette.json exists", False, "no palette.json beside its fid.json"))
            continue
        regimes = load_eval_json(palette_files[model], "palette")["regimes"]
        for regime in ("uni", "uni_ge"):
            if regime in regimes:
                entry = regimes[regime]
                checks.append(Check(f"{model}: {regime} tiles carry their spot's palette", entry["carries_palette"],
                                    f"r {_interval(entry)} vs other spots {_interval(entry['null'])}"))
    return checks


def texture_checks(texture_files: dict[str, Path], models: list[str]) -> list[Check]:
    """UNI-conditioned tiles have the tissue's texture: grey roughness within `texture.TARGET` times
    that of the same spots' real latents through the VAE (the `real (VAE)` row)."""
    checks = []
    for model in models:
        if model not in texture_files:
            checks.append(Check(f"{model}: texture.json exists", False, "no texture.json beside its fid.json"))
            continue
        texture = load_eval_json(texture_files[model], "texture")
        low, high = texture["target"]  # written by every `stmdit texture`
        for regime in ("uni", "uni_ge"):
            if regime in texture["regimes"]:
                entry = texture["regimes"][regime]
                checks.append(Check(f"{model}: {regime} tiles have the tissue's texture", entry["within_target"],
                                    f"roughness {entry['ratio']:.3f} [{entry['lo']:.3f}, {entry['hi']:.3f}] x real (VAE),"
                                    f" target {low:g}-{high:g}"))
    return checks


def mosaic_lines(texture_files: dict[str, Path]) -> list[Check]:
    """How much a tile's roughness jumps at the borders of the denoiser's token grid (`texture.json`
    cell_border, 32 px: the demo's patch 4 on 8-px latent pixels), one information line per model."""
    lines = []
    for model, path in sorted(texture_files.items()):
        regimes = load_eval_json(path, "texture")["regimes"]
        parts = [f"{regime} {regimes[regime]['cell_border']['32']['generated']:.2f}"
                 f" (real (VAE) {regimes[regime]['cell_border']['32']['real_vae']:.2f})"
                 for regime in ("uni", "uni_ge") if "32" in regimes.get(regime, {}).get("cell_border", {})]
        if parts:
            lines.append(Check(f"{model}: 32-px token mosaic, border / inner roughness (diagnostic, not a check)", None,
                               "; ".join(parts)))
    return lines


def scale_lines(texture_files: dict[str, Path]) -> list[Check]:
    """Generated over real (VAE) grey roughness per block size (`texture.json` scales), one
    information line per model: below 1 at 64 px for tiles without the tissue's large structures."""
    lines = []
    for model, path in sorted(texture_files.items()):
        regimes = load_eval_json(path, "texture")["regimes"]
        parts = [f"{regime} " + ", ".join(f"{size} px {entry['ratio']:.2f}"
                                     for size, entry in sorted(regimes[regime]["scales"].items(), key=lambda s: int(s[0])))
                 for regime in ("uni", "uni_ge") if regimes.get(regime, {}).get("scales")]
        if parts:
            lines.append(Check(f"{model}: roughness by block size, generated / real (VAE) (diagnostic, not a check)",
                               None, "; ".join(parts)))
    return lines


def gaussian_lines(results: Path) -> list[Check]:
    """Each trained model's final validation loss against the loss of the exact denoiser of a
    Gaussian with its latents' spectrum (`training.json` loss_check), one information line per model:
    above it, the model's tiles are filtered noise in the tissue's colours."""
    lines = []
    for path in sorted(results.glob("models/*/training.json")):
        check = json.loads(path.read_text()).get("loss_check") or {}
        if check.get("gaussian_loss") is None:
            continue  # trained before the reference existed
        reached = check["final_val_loss"] if check.get("final_val_loss") is not None else check["final_train_loss"]
        verdict = "above: no shapes yet" if check["above_gaussian"] else "below"
        lines.append(Check(f"{path.parent.name}: final loss against a Gaussian with the latents' spectrum "
                           "(diagnostic, not a check)", None,
                           f"{reached:.3f} vs {check['gaussian_loss']:.3f} ({verdict}; trivial {check['trivial_loss']:.3f})"))
    return lines


def layout_lines(layout_files: dict[str, Path]) -> list[Check]:
    """The layout agreement of the uni and uni_ge tiles, one information line per model."""
    lines = []
    for model, path in sorted(layout_files.items()):
        regimes = load_eval_json(path, "layout")["regimes"]
        parts = [f"{regime} r {_interval(regimes[regime])} vs other spots {_interval(regimes[regime]['null'])}"
                 for regime in ("uni", "uni_ge") if regime in regimes]
        if parts:
            lines.append(Check(f"{model}: layout agreement (diagnostic, not a check)", None, "; ".join(parts)))
    return lines


def learning_checks(results: Path, cohort: str) -> list[Check]:
    def files(name):
        return {p.parts[-3]: p for p in results.glob(f"eval/*/{cohort}/{name}")}

    fid_files = files("fid.json")
    if not fid_files:
        return [Check("evaluation JSONs exist", False, f"no {results}/eval/*/{cohort}/fid.json")]
    palette_files, texture_files = files("palette.json"), files("texture.json")
    models = sorted(set(fid_files) | set(palette_files) | set(texture_files))  # PTPL models have no fid.json here
    return (fid_checks(fid_files) + auc_checks(files("auc.json")) + palette_checks(palette_files, models)
            + texture_checks(texture_files, models) + mosaic_lines(texture_files) + scale_lines(texture_files)
            + gaussian_lines(results) + layout_lines(files("layout.json")))


def stage_times(benchmarks: Path) -> pd.DataFrame:
    """Jobs and summed wall-clock seconds per stage (the benchmark file's folder, or its name)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for path in sorted(benchmarks.rglob("*.tsv")):
        relative = path.relative_to(benchmarks)
        stage = relative.parts[0] if len(relative.parts) > 1 and relative.parts[0] != "eval" else path.stem
        try:
            seconds = float(pd.read_csv(path, sep="\t")["s"].iloc[-1])
        except (OSError, ValueError, KeyError, IndexError):
            continue
        totals[stage][0] += 1
        totals[stage][1] += seconds
    table = pd.DataFrame([(s, int(n), t) for s, (n, t) in totals.items()], columns=["stage", "jobs", "seconds"])
    return table.sort_values("seconds", ascending=False, ignore_index=True)


def run(args: argparse.Namespace) -> int:
    results = Path(args.results)
    times = stage_times(results / "benchmarks")
    print("\nTime per stage (sum of its jobs' wall-clock seconds):")
    for row in times.itertuples():
        print(f"  {row.stage:<32} {row.jobs:>4} jobs {row.seconds:>8.1f} s")
    print(f"  {'all jobs':<32} {int(times['jobs'].sum()):>4} jobs {times['seconds'].sum():>8.1f} s")
    checks = learning_checks(results, args.cohort)
    print(f"\nDo the demo's models learn? ({args.cohort}: eval JSONs under {results}/eval/)")
    for check in checks:
        mark = "INFO" if check.passed is None else "PASS" if check.passed else "FAIL"
        print(f"  [{mark}] {check.name}: {check.detail}")
    scored = [c for c in checks if c.passed is not None]
    failed = sum(not c.passed for c in scored)
    print(f"  {len(scored) - failed} of {len(scored)} checks pass")
    print(f"  Look at the grids too: {results}/figures/grid_*_{args.cohort}.png")
    return 1 if failed and args.strict else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo-checks", help="print whether the demo's numbers show learning, and stage times")
    p.add_argument("--results", default="results")
    p.add_argument("--cohort", default="demo")
    p.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    p.set_defaults(func=lambda a: sys.exit(run(a)))
