"""The paper's six tables and the evaluation figures, built from evaluation JSONs only.

    stmdit table --n N --evals results/eval/*/*/fid.json ... --models-json models.json
        --out-tsv results/tables/tableN.tsv --out-md results/tables/tableN.md
        [--cohort C] [--config-hash H]
    stmdit figure --kind per-tissue-fid|auc-curves --evals ... --out results/figures/F.png
        [--models-json models.json] [--regime uni_ge] [--regressor oracle]

The evaluation JSONs' layouts, builders and checks are `stmdit.eval_json`'s.

Which rows a table has comes from the models file (JSON list, or {"models": [...]}), one entry
per model: {"model": id in the eval paths, "name": the paper's row label, "p", "family",
"architecture" (Table 6 label), "sampler", "baseline" (id of the sampler-matched no-GE
baseline, Table 3), "ptpl", "tables": [table numbers]}. A model with "tables" appears in exactly
those tables (missing values render "-"); without it, in every table whose metric file it has.
Tables 1 and 4 share a layout: in the paper Table 1 lists the main models and Table 4 the full
p-sweep of every family, which the models file expresses through "tables".
A table's model columns use the model's "uni_ge" regime when it has one, else "uni".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from stmdit import __version__
from stmdit.errors import InputError
from stmdit.eval_json import (
    PERTURBATION_MODES,
    REGIMES,
    REGRESSORS,
    check_eval_json,
    load_eval_json,
    primary_regime,
)
from stmdit.figures import pyplot, save_figure
from stmdit.provenance import atomic_path

log = logging.getLogger(__name__)

TABLE_METRIC = {1: "fid", 2: "auc", 3: "ood_fid", 4: "fid", 5: "perturbation", 6: "swap_fid"}
TABLE_TITLES = {
    1: "Test FID (H0-mini) by conditioning regime",
    2: "Integrated AUC of transcriptomic fidelity (% of real-tile ceiling)",
    3: "Zero-shot out-of-distribution FID",
    4: "Test FID (H0-mini) by conditioning regime, all models",
    5: "Perturbation composite (median per pair; three-pair mean)",
    6: "PTPL models fed DeepSpot vs Visium GE: test FID",
}
PAPER_PAIR_ORDER = ("T->S", "T->I", "I->T")
SMOKE_LINE = "made with smoke (weight-free) encoders: numbers are not comparable to the paper"


# ---------------------------------------------------------------------------------------------
# Model rows


@dataclass(frozen=True)
class ModelRow:
    """One model as the tables show it (see the module docstring)."""

    model: str
    name: str
    p: float | None = None
    family: str | None = None
    architecture: str | None = None
    sampler: str | None = None
    baseline: str | None = None
    ptpl: bool = False
    tables: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], source: str | Path | None = None) -> "ModelRow":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(entry) - known)
        if unknown or "model" not in entry:
            raise InputError(source, f"model entry {dict(entry)}: needs 'model'; unknown keys {unknown} (known: {sorted(known)})")
        values = dict(entry)
        values.setdefault("name", values["model"])
        if values.get("tables") is not None:
            values["tables"] = tuple(int(n) for n in values["tables"])
        return cls(**values)


def load_model_rows(path: str | Path) -> list[ModelRow]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(path, f"cannot read the models file ({err})") from None
    entries = data.get("models") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise InputError(path, "expected a JSON list of models, or {\"models\": [...]}")
    return [ModelRow.from_dict(entry, path) for entry in entries]


def _as_rows(model_rows: Iterable) -> list[ModelRow]:
    return [row if isinstance(row, ModelRow) else ModelRow.from_dict(row) for row in model_rows]


# ---------------------------------------------------------------------------------------------
# Tables


def _index(eval_jsons: Iterable, metric: str, cohort: str | None) -> dict[str, dict]:
    """model -> the document of `metric` (of `cohort`, when given)."""
    index: dict[str, dict] = {}
    for doc in eval_jsons:
        doc = load_eval_json(doc) if isinstance(doc, (str, Path)) else doc
        check_eval_json(doc, doc.get("source"))
        if doc["metric"] != metric or (cohort is not None and doc["cohort"] != cohort):
            continue
        if doc["model"] in index:
            raise InputError(
                doc.get("source"),
                f"two {metric} results for model {doc['model']!r} (cohorts {index[doc['model']]['cohort']!r}, "
                f"{doc['cohort']!r}): choose one with cohort=",
            )
        index[doc["model"]] = doc
    return index


def _table_rows(n: int, rows: list[ModelRow], index: Mapping[str, dict]) -> list[ModelRow]:
    return [row for row in rows if (n in row.tables if row.tables is not None else row.model in index)]


def fid_shown(entry: Mapping[str, Any] | None) -> float | None:
    """The FID a table prints: the bootstrap mean (the paper's tables), or the point estimate for
    an entry without resamples (or from before "mean" was written)."""
    entry = entry or {}
    return entry["mean"] if entry.get("mean") is not None else entry.get("point")


def _fid_cells(prefix: str, entry: Mapping[str, Any] | None) -> dict[str, Any]:
    entry = entry or {}
    return {prefix: fid_shown(entry), f"{prefix} lo": entry.get("lo"), f"{prefix} hi": entry.get("hi"),
            f"{prefix} point": entry.get("point")}


def _fid_columns(prefix: str) -> list[str]:
    return [prefix, f"{prefix} lo", f"{prefix} hi", f"{prefix} point"]


def _fid_note(docs: Iterable[Mapping[str, Any]]) -> str:
    """What the FID cells of a table are, from its documents' entries."""
    entries = [e for doc in docs for e in (doc.get("regimes") or doc.get("conditions") or {}).values()]
    n_boot = sorted({int(e["n_boot"]) for e in entries if e.get("mean") is not None and e.get("n_boot")})
    note = ("FID on H0-mini features: bootstrap mean [95% percentile interval] over "
            f"{'/'.join(map(str, n_boot)) or 'N'} spot-level resamples (the paper's statistic); (point x) = FID "
            "of all spots, shown where it differs. Resampling with replacement duplicates spots, which inflates "
            "FID, so the point can lie below the interval, while the mean lies inside it. Deltas use the "
            "bootstrap means.")
    if any(e.get("mean") is None and e.get("point") is not None for e in entries):
        note += " Cells without resamples show the point estimate alone."
    return note


def _difference(a, b):
    return None if a is None or b is None else float(a) - float(b)


def _frame(n: int, records: list[dict], columns: list[str], docs: Iterable[dict], **attrs) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, columns=columns) if records else pd.DataFrame(columns=columns)
    df = df.astype(object).where(df.notna(), None)
    docs = list(docs)
    df.attrs.update(
        table=n,
        title=TABLE_TITLES[n],
        smoke=any(value == "smoke" for doc in docs for value in doc.get("encoders", {}).values()),
        sources=[doc.get("source", f"{doc['model']}/{doc['cohort']}/{doc['metric']}") for doc in docs],
        notes=[],
        ci_columns=[],
        point_columns=[],
        percent_columns={},
        formats={},
    )
    df.attrs.update(attrs)
    return df


def _fid_regime_table(n: int, index: Mapping[str, dict], rows: list[ModelRow]) -> pd.DataFrame:
    regime_columns = {"uni_ge": "UNI+GE", "uni": "UNI", "ge": "GE"}
    records = []
    for row in rows:
        regimes = index.get(row.model, {}).get("regimes", {})
        record = {"Model": row.name, "p": row.p}
        for regime, column in regime_columns.items():
            record.update(_fid_cells(column, regimes.get(regime)))
        record["Delta"] = _difference(record["UNI+GE"], record["UNI"])
        records.append(record)
    columns = ["Model", "p"] + [c for col in regime_columns.values() for c in _fid_columns(col)] + ["Delta"]
    formats = {col: ".1f" for col in regime_columns.values()} | {"Delta": "+.1f"}
    return _frame(n, records, columns, index.values(), ci_columns=list(regime_columns.values()), formats=formats,
                  point_columns=list(regime_columns.values()),
                  notes=["Delta = FID(UNI+GE) - FID(UNI).", _fid_note(index.values())])


def _auc_table(index: Mapping[str, dict], rows: list[ModelRow]) -> pd.DataFrame:
    ceiling_doc = next((index[row.model] for row in rows if row.model in index), None)
    notes = ["AUC = mean over k of the median per-gene Pearson r of the top-k genes (by train variance); "
             "% = AUC / real-tile AUC; [lo, hi] = 95% spot-level percentile bootstrap CI.",
             "Null = measured, not assumed (the paper's null is 0 by construction): the real test tiles' "
             "predictions scored with the spot correspondence permuted; mean over permutations and their "
             "2.5-97.5 percentiles, i.e. the range a regressor without information about the spot scores "
             "on these test spots: a model whose AUC lies inside it is indistinguishable from no information."]
    ceiling, null = {"Model": "Upper bound (real tiles)"}, {"Model": "Null"}
    noise = {"Model": "Null (noise tiles)"}
    for name, column in REGRESSORS.items():
        entry = (ceiling_doc or {}).get("regressors", {}).get(name)
        ceiling.update(_auc_cells(column, entry["real"] if entry else None, entry["real"]["auc"] if entry else None))
        null.update(_auc_cells(column, entry["null"]["empirical"] if entry else None, None))
        noise.update(_auc_cells(column, entry["null"].get("noise_tiles") if entry else None, None))
        if entry:
            method = entry["null"].get("empirical_method", "shuffled test features")
            notes.append(f"{column}: k = {entry['ks']}; null: {method}; ceiling and null from {ceiling_doc['model']}.")
    records = [ceiling, null]
    if any(noise[column] is not None for column in REGRESSORS.values()):
        records.append(noise)
        notes.append("Null (noise tiles): uniform-noise RGB tiles of the test spots through the same encoders and "
                     "regressors, with their bootstrap CI.")
    for row in rows:
        regressors = index.get(row.model, {}).get("regressors", {})
        record = {"Model": row.name}
        for name, column in REGRESSORS.items():
            entry = regressors.get(name)
            regime = primary_regime(entry["generated"]) if entry else None
            scored = entry["generated"][regime] if regime else None
            record.update(_auc_cells(column, scored, ceiling.get(column)))
        records.append(record)
    columns = ["Model"] + [c for col in REGRESSORS.values() for c in (col, f"{col} lo", f"{col} hi", f"{col} %")]
    return _frame(2, records, columns, index.values(), ci_columns=list(REGRESSORS.values()),
                  percent_columns={col: f"{col} %" for col in REGRESSORS.values()},
                  formats={col: ".3f" for col in REGRESSORS.values()}, notes=notes)


def _auc_cells(column: str, scored: Mapping[str, Any] | None, ceiling_auc: float | None) -> dict[str, Any]:
    scored = scored or {}
    auc = scored.get("auc")
    percent = None if auc is None or not ceiling_auc else 100.0 * auc / ceiling_auc
    return {column: auc, f"{column} lo": scored.get("lo"), f"{column} hi": scored.get("hi"), f"{column} %": percent}


def _ood_table(index: Mapping[str, dict], rows: list[ModelRow]) -> pd.DataFrame:
    def point(model: str | None, regime: str | None = None):
        regimes = index.get(model, {}).get("regimes", {}) if model else {}
        regime = regime or primary_regime(regimes)
        return fid_shown(regimes.get(regime)) if regime else None

    records = []
    for row in rows:
        regimes = index.get(row.model, {}).get("regimes", {})
        regime = primary_regime(regimes)
        record = {"Model": row.name, **_fid_cells("FID", regimes.get(regime) if regime else None)}
        record["Delta_baseline"] = _difference(point(row.baseline), record["FID"]) if row.baseline else None
        record["Delta_OOD(GE)"] = _difference(point(row.model, "uni"), point(row.model, "uni_ge"))
        records.append(record)
    columns = ["Model", *_fid_columns("FID"), "Delta_baseline", "Delta_OOD(GE)"]
    cohorts = sorted({doc["cohort"] for doc in index.values()})
    return _frame(3, records, columns, index.values(), ci_columns=["FID"], point_columns=["FID"],
                  formats={"FID": ".1f", "Delta_baseline": "+.1f", "Delta_OOD(GE)": "+.1f"},
                  notes=[f"Cohort {', '.join(cohorts) or '-'}; Delta_baseline = FID(sampler-matched no-GE baseline) - "
                         "FID(model); Delta_OOD = FID(UNI) - FID(UNI+GE).", _fid_note(index.values())])


def _perturbation_table(index: Mapping[str, dict], rows: list[ModelRow]) -> pd.DataFrame:
    seen = {pair for doc in index.values() for pair in doc["pairs"]}
    pairs = [p for p in PAPER_PAIR_ORDER if p in seen] + sorted(seen - set(PAPER_PAIR_ORDER))
    pairs = pairs or list(PAPER_PAIR_ORDER)
    records = []
    for row in rows:
        doc = index.get(row.model, {})
        record = {"Model": row.name, "p": row.p}
        record.update({pair: doc.get("pairs", {}).get(pair, {}).get("composite") for pair in pairs})
        # A mean over fewer pairs than the table shows would not be comparable: "-" instead.
        complete = all(record[pair] is not None for pair in pairs)
        record["mean"] = doc.get("mean_composite") if complete else None
        records.append(record)
    weights = ", ".join(f"{w:g}" for w in sorted({doc["monotonicity_weight"] for doc in index.values()})) or "1"
    return _frame(5, records, ["Model", "p", *pairs, "mean"], index.values(),
                  formats={col: "+.3f" for col in [*pairs, "mean"]},
                  notes=[f"composite = transition + {weights} x monotonicity, median over reference spots; "
                         "mean over the pairs (\"-\" when a pair is missing).",
                         perturbation_mode_note(index, rows)])


def perturbation_mode_note(index: Mapping[str, dict], rows: list[ModelRow]) -> str:
    """Which GE interpolation the rows of Table 5 used: one line, naming the rows when modes differ."""
    by_mode: dict[str, list[str]] = {}
    for row in rows:
        if row.model in index:
            by_mode.setdefault(index[row.model]["mode"], []).append(row.name)
    if not by_mode:
        return f"Perturbation mode: - (no rows); the paper's is centroid: {PERTURBATION_MODES['centroid']}."
    if len(by_mode) == 1:
        mode = next(iter(by_mode))
        return f"Perturbation mode {mode}: {PERTURBATION_MODES[mode]}."
    return "Perturbation modes differ between rows: " + "; ".join(
        f"{mode} ({PERTURBATION_MODES[mode]}): {', '.join(names)}" for mode, names in sorted(by_mode.items())) + "."


def _swap_table(index: Mapping[str, dict], rows: list[ModelRow]) -> pd.DataFrame:
    records = []
    for row in rows:
        conditions = index.get(row.model, {}).get("conditions", {})
        record = {"Architecture": row.architecture or row.name}
        record.update(_fid_cells("DeepSpot-cond", conditions.get("deepspot")))
        record.update(_fid_cells("Visium-cond", conditions.get("visium")))
        record["Delta"] = _difference(record["Visium-cond"], record["DeepSpot-cond"])
        records.append(record)
    columns = ["Architecture", *_fid_columns("DeepSpot-cond"), *_fid_columns("Visium-cond"), "Delta"]
    return _frame(6, records, columns, index.values(), ci_columns=["DeepSpot-cond", "Visium-cond"],
                  point_columns=["DeepSpot-cond", "Visium-cond"],
                  formats={"DeepSpot-cond": ".1f", "Visium-cond": ".1f", "Delta": "+.1f"},
                  notes=["Delta = FID(Visium-cond) - FID(DeepSpot-cond).", _fid_note(index.values())])


def build_table(n: int, eval_jsons: Iterable, model_rows: Iterable, cohort: str | None = None) -> pd.DataFrame:
    """Table n (1..6) of the paper as a DataFrame; missing values are None.

    `eval_jsons`: loaded documents or paths (only those of the table's metric are used);
    `model_rows`: `ModelRow`s or their dicts, in the order the rows should appear. FID/AUC columns
    come with "<col> lo" / "<col> hi" columns; rendering metadata is in `df.attrs`.
    """
    if n not in TABLE_METRIC:
        raise InputError(None, f"there is no table {n}: the paper has tables 1 to 6")
    index = _index(eval_jsons, TABLE_METRIC[n], cohort)
    rows = _table_rows(n, _as_rows(model_rows), index)
    used = {row.model: index[row.model] for row in rows if row.model in index}
    baselines = {row.baseline: index[row.baseline] for row in rows if n == 3 and row.baseline in index}
    if n in (1, 4):
        return _fid_regime_table(n, used, rows)
    if n == 2:
        return _auc_table(used, rows)
    if n == 3:
        return _ood_table(used | baselines, rows)
    if n == 5:
        return _perturbation_table(used, rows)
    return _swap_table(used, rows)


# ---------------------------------------------------------------------------------------------
# Rendering


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _format_number(value, spec: str) -> str:
    if _is_missing(value):
        return "-"
    if isinstance(value, (int, float, np.number)):
        return format(float(value), spec)
    return str(value)


def _format_p(value) -> str:
    return "-" if _is_missing(value) else f"{float(value):g}"


def markdown_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Display strings: CI columns as `291.5 [285.0, 298.1]`, FID columns with their point estimate
    appended when it differs from the shown value (`292.4 [285.0, 298.1] (point 291.5)`),
    percentages appended, "-" if missing."""
    attrs = df.attrs
    point_columns = attrs.get("point_columns", [])
    hidden = {f"{c} {suffix}" for c in attrs["ci_columns"] for suffix in ("lo", "hi")}
    hidden |= {f"{c} point" for c in point_columns}
    hidden |= set(attrs["percent_columns"].values())
    out = pd.DataFrame(index=df.index)
    for column in df.columns:
        if column in hidden:
            continue
        spec = attrs["formats"].get(column)
        cells = []
        for i in df.index:
            value = df.at[i, column]
            if column == "p":
                cells.append(_format_p(value))
                continue
            text = _format_number(value, spec) if spec else ("-" if _is_missing(value) else str(value))
            if text != "-" and column in attrs["ci_columns"]:
                lo, hi = df.at[i, f"{column} lo"], df.at[i, f"{column} hi"]
                if not (_is_missing(lo) or _is_missing(hi)):
                    text += f" [{_format_number(lo, spec)}, {_format_number(hi, spec)}]"
            if text != "-" and column in point_columns:
                point = df.at[i, f"{column} point"]
                if not _is_missing(point) and _format_number(point, spec) != _format_number(value, spec):
                    text += f" (point {_format_number(point, spec)})"
            percent_column = attrs["percent_columns"].get(column)
            if text != "-" and percent_column and not _is_missing(df.at[i, percent_column]):
                text += f" ({df.at[i, percent_column]:.0f}%)"
            cells.append(text)
        out[column] = cells
    return out


def render_markdown(df: pd.DataFrame) -> str:
    cells = markdown_cells(df)
    lines = ["| " + " | ".join(cells.columns) + " |", "|" + "---|" * len(cells.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def render_tsv(df: pd.DataFrame) -> str:
    """Tab-separated, one column per value (CI bounds separate), "-" for missing."""
    def cell(value) -> str:
        if _is_missing(value):
            return "-"
        return f"{float(value):.6g}" if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else str(value)

    lines = ["\t".join(df.columns)]
    lines += ["\t".join(cell(v) for v in row) for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def provenance_footer(df: pd.DataFrame, config_hash: str | None = None) -> list[str]:
    """stmdit version, config hash and the evaluation JSONs a table was built from."""
    lines = [f"stmdit {__version__}" + (f"; config hash {config_hash}" if config_hash else "")]
    lines.append("inputs: " + (", ".join(df.attrs.get("sources", [])) or "-"))
    return lines


def write_table(df: pd.DataFrame, tsv_path: str | Path, md_path: str | Path, footer_lines: Sequence[str] = ()) -> None:
    """Write the table as TSV (footer as trailing `# ` lines) and Markdown, both atomically.

    The footer is the table's notes, then `footer_lines`, then the smoke warning when any input
    was made with smoke encoders.
    """
    footer = [*df.attrs.get("notes", []), *footer_lines]
    if df.attrs.get("smoke"):
        footer.append(SMOKE_LINE)
    n = df.attrs.get("table")
    markdown = f"# Table {n}: {df.attrs.get('title', '')}\n\n" + render_markdown(df)
    markdown += "\n" + "".join(f"- {line}\n" for line in footer)
    with atomic_path(tsv_path) as tmp:
        tmp.write_text(render_tsv(df) + "".join(f"# {line}\n" for line in footer))
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown)


# ---------------------------------------------------------------------------------------------
# Figures


def _display_names(model_rows: Iterable | None) -> dict[str, str]:
    return {row.model: row.name for row in _as_rows(model_rows or [])}


def plot_per_tissue_fid(fid_docs: Sequence[Mapping], png_path: str | Path, regime: str = "uni_ge",
                        model_rows: Iterable | None = None) -> None:
    """Grouped bars: FID per tissue label (x) and model (bars): the bootstrap mean with its
    percentile interval when resampled (else the point estimate), as in the tables."""
    plt = pyplot()
    names = _display_names(model_rows)
    docs = [d for d in fid_docs if regime in d.get("per_tissue", {})]
    if not docs:
        raise InputError(None, f"no fid.json among the inputs has per-tissue FID for regime {regime!r}")
    labels = sorted({label for d in docs for label in d["per_tissue"][regime]["labels"]})
    width = 0.8 / len(docs)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) * len(docs) ** 0.5), 3.5))
    for i, doc in enumerate(docs):
        entries = doc["per_tissue"][regime]["labels"]
        x = np.arange(len(labels)) + (i - (len(docs) - 1) / 2) * width
        heights = [fid_shown(entries.get(label)) for label in labels]
        heights = [np.nan if height is None else height for height in heights]
        errors = [[_err(entries.get(label), "lo") for label in labels], [_err(entries.get(label), "hi") for label in labels]]
        ax.bar(x, heights, width, yerr=errors, capsize=2, label=names.get(doc["model"], doc["model"]))
    ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel(f"FID (H0-mini), {regime}")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, png_path)


def _err(entry: Mapping | None, side: str) -> float:
    if not entry or entry.get(side) is None:
        return 0.0
    return abs(fid_shown(entry) - entry[side])


def plot_auc_curves(auc_docs: Sequence[Mapping], png_path: str | Path, regressor: str = "oracle",
                    model_rows: Iterable | None = None) -> None:
    """Median per-gene Pearson r against k: each model (its UNI+GE regime, else UNI), the
    real-tile ceiling and the empirical null of the first document."""
    plt = pyplot()
    names = _display_names(model_rows)
    docs = [d for d in auc_docs if regressor in d.get("regressors", {})]
    if not docs:
        raise InputError(None, f"no auc.json among the inputs has the {regressor!r} regressor")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    first = docs[0]["regressors"][regressor]
    ax.plot(first["ks"], first["real"]["curve"], "k--", marker="o", label="real tiles")
    ax.plot(first["ks"], first["null"]["empirical"]["curve"], ":", color="grey", label="null (permuted spots)")
    for doc in docs:
        entry = doc["regressors"][regressor]
        regime = primary_regime(entry["generated"])
        if regime:
            ax.plot(entry["ks"], entry["generated"][regime]["curve"], marker=".", label=names.get(doc["model"], doc["model"]))
    ax.set_xscale("log")
    ax.set_xticks(first["ks"], [str(k) for k in first["ks"]])
    ax.minorticks_off()
    ax.set_xlabel("top-k genes (by train variance)")
    ax.set_ylabel("median Pearson r")
    ax.set_title(REGRESSORS.get(regressor, regressor))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, png_path)


def read_train_log(path: str | Path) -> pd.DataFrame:
    """step, loss, val_loss (NaN where not logged) of a `stmdit train` log."""
    path = Path(path)
    try:
        log_table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the training log: {exc}") from None
    missing = {"step", "loss", "val_loss"} - set(log_table.columns)
    if missing:
        raise InputError(path, f"not a train_log.csv: no column(s) {', '.join(sorted(missing))}")
    if log_table["loss"].notna().sum() == 0:
        raise InputError(path, "the training log has no loss rows")
    return log_table[["step", "loss", "val_loss"]].apply(pd.to_numeric, errors="coerce")


def plot_loss_curve(log_path: str | Path, png_path: str | Path, name: str,
                    trivial_loss: float | None = None, stall_threshold: float | None = None) -> None:
    """Training loss (each logged step) and EMA validation loss against the optimizer step, log y,
    with the trivial loss (predicting the mean) and the stall threshold of `train.loss_check` as
    horizontal lines when known."""
    plt = pyplot()
    table = read_train_log(log_path)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    train_rows = table.dropna(subset=["loss"])
    ax.plot(train_rows["step"], train_rows["loss"], lw=1, label="train (batch)")
    val_rows = table.dropna(subset=["val_loss"])
    if len(val_rows):
        ax.plot(val_rows["step"], val_rows["val_loss"], "o-", ms=3, label="validation (EMA)")
    if trivial_loss is not None:
        ax.axhline(trivial_loss, color="grey", ls="--", lw=1, label="trivial (predict the mean)")
    if stall_threshold is not None:
        ax.axhline(stall_threshold, color="tab:red", ls=":", lw=1, label="stalled above")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (MSE)")
    ax.set_title(name)
    ax.legend(fontsize="small")
    save_figure(fig, png_path)


def run_loss_curve(args: argparse.Namespace) -> None:
    check = {}
    if args.training_json is not None:
        try:
            check = json.loads(Path(args.training_json).read_text()).get("loss_check") or {}
        except (OSError, ValueError) as exc:
            raise InputError(args.training_json, f"cannot read training.json: {exc}") from None
    plot_loss_curve(args.train_log, args.out, args.name, check.get("trivial_loss"), check.get("stall_threshold"))
    log.info("wrote %s", args.out)


# ---------------------------------------------------------------------------------------------
# CLI


def run_table(args: argparse.Namespace) -> pd.DataFrame:
    docs = [load_eval_json(path) for path in args.evals]
    rows = load_model_rows(args.models_json)
    df = build_table(args.n, docs, rows, cohort=args.cohort)
    write_table(df, args.out_tsv, args.out_md, provenance_footer(df, args.config_hash))
    log.info("wrote table %d (%d rows) to %s and %s", args.n, len(df), args.out_tsv, args.out_md)
    return df


def run_figure(args: argparse.Namespace) -> None:
    docs = [load_eval_json(path) for path in args.evals]
    rows = load_model_rows(args.models_json) if args.models_json else None
    if args.kind == "per-tissue-fid":
        plot_per_tissue_fid([d for d in docs if d["metric"] == "fid"], args.out, args.regime, rows)
    else:
        plot_auc_curves([d for d in docs if d["metric"] == "auc"], args.out, args.regressor, rows)
    log.info("wrote %s", args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    table = subparsers.add_parser("table", help="render one of the paper's tables from evaluation JSONs")
    table.add_argument("--n", type=int, required=True, choices=sorted(TABLE_METRIC))
    table.add_argument("--evals", nargs="+", required=True, type=Path, help="evaluation JSONs (fid/auc/...)")
    table.add_argument("--models-json", required=True, type=Path, help="rows: model id, name, p, baseline, tables, ...")
    table.add_argument("--out-tsv", required=True, type=Path)
    table.add_argument("--out-md", required=True, type=Path)
    table.add_argument("--cohort", default=None, help="use only evaluations of this cohort")
    table.add_argument("--config-hash", default=None, help="hash of the config, printed in the footer")
    table.set_defaults(func=run_table)

    figure = subparsers.add_parser("figure", help="evaluation figures (per-tissue FID, AUC-vs-k)")
    figure.add_argument("--kind", required=True, choices=["per-tissue-fid", "auc-curves"])
    figure.add_argument("--evals", nargs="+", required=True, type=Path)
    figure.add_argument("--out", required=True, type=Path)
    figure.add_argument("--models-json", type=Path, default=None)
    figure.add_argument("--regime", default="uni_ge", choices=list(REGIMES))
    figure.add_argument("--regressor", default="oracle", choices=sorted(REGRESSORS))
    figure.set_defaults(func=run_figure)

    loss = subparsers.add_parser("loss-curve", help="training and validation loss of one model against the step")
    loss.add_argument("--train-log", required=True, type=Path, help="the model's train_log.csv")
    loss.add_argument("--training-json", type=Path, default=None, help="its training.json (trivial-loss line)")
    loss.add_argument("--name", required=True, help="title (the model's row label)")
    loss.add_argument("--out", required=True, type=Path)
    loss.set_defaults(func=run_loss_curve)
