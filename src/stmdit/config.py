"""Configuration and sample sheet: loading, JSON-schema validation (defaults filled in) and the
helpers that derive targets from them. Snakemake's common.smk and the tests both use this, so bad
input fails the same way everywhere: one message naming the file, the key and the value."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

from stmdit.errors import InputError

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "workflow" / "schemas"
SAMPLE_COLUMNS_REQUIRED = ("sample", "donor", "cohort", "kind", "path")
SAMPLE_COLUMNS_OPTIONAL = ("image", "labels", "mpp")
RENAMED_CONFIG_KEYS = {"sample": "sampler"}  # old top-level key -> its new name
RENAMED_RESULTS = {"results/samples": "results/tiles"}  # old results folder -> its new name


def _load_schema(name: str, schema_dir: Path | None = None) -> dict:
    path = (schema_dir or SCHEMA_DIR) / name
    with open(path) as fh:
        return yaml.safe_load(fh)


def _fill_defaults(instance: Any, schema: dict) -> None:
    """Fill `default`s of object properties in place, recursively (also inside defaults)."""
    if not isinstance(instance, dict) or schema.get("type") not in ("object", None):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            _fill_defaults(instance[key], sub)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key, value in instance.items():
            if key not in schema.get("properties", {}):
                _fill_defaults(value, extra)


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def validate_config(config: dict, source: str | Path = "config", schema_dir: Path | None = None) -> dict:
    """Validate `config` against config.schema.yaml, fill defaults, and return a new dict.

    Raises InputError naming `source`, the key path and the offending value.
    """
    for old, new in RENAMED_CONFIG_KEYS.items():
        if old in config:
            raise InputError(source, f"config key {old} was renamed to {new}: rename the section (its keys are unchanged)")
    schema = _load_schema("config.schema.yaml", schema_dir)
    config = copy.deepcopy(config)
    _fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        raise InputError(source, f"config key {_dotted(err.absolute_path)} = {err.instance!r}: {err.message}")
    return config


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise InputError(path, f"cannot read config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML: {exc}") from None
    return validate_config(raw, path)


def check_renamed_results(targets, workdir: str | Path = ".") -> None:
    """One error for a target under a renamed results folder, or for that folder left on disk (the
    workflow would otherwise make everything in it again under the new name)."""
    for old, new in RENAMED_RESULTS.items():
        asked = [t for t in targets if str(t) == old or str(t).startswith(old + "/")]
        if asked:
            raise InputError(None, f"{old}/ was renamed to {new}/: ask for {new + asked[0][len(old):]}")
        if (Path(workdir) / old).is_dir() and not (Path(workdir) / new).exists():
            raise InputError(Path(workdir) / old, f"{old}/ was renamed to {new}/: `mv {old} {new}` keeps what "
                             "it holds (or remove it)")


def load_sample_sheet(path: str | Path, schema_dir: Path | None = None) -> pd.DataFrame:
    """Read and validate the sample sheet; returns it indexed by sample, in sheet order."""
    path = Path(path)
    try:
        sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    except FileNotFoundError:
        raise InputError(path, "sample sheet not found") from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot parse sample sheet as TSV: {exc}") from None
    sheet.columns = [c.strip() for c in sheet.columns]
    unknown = [c for c in sheet.columns if c not in SAMPLE_COLUMNS_REQUIRED + SAMPLE_COLUMNS_OPTIONAL]
    if unknown:
        raise InputError(path, f"unknown column(s) {unknown}; allowed: "
                               f"{list(SAMPLE_COLUMNS_REQUIRED + SAMPLE_COLUMNS_OPTIONAL)}")
    missing = [c for c in SAMPLE_COLUMNS_REQUIRED if c not in sheet.columns]
    if missing:
        raise InputError(path, f"missing required column(s) {missing}")
    if sheet.empty:
        raise InputError(path, "sample sheet has no rows")
    for col in SAMPLE_COLUMNS_OPTIONAL:
        if col not in sheet.columns:
            sheet[col] = ""
    sheet = sheet.apply(lambda s: s.str.strip())
    duplicated = sheet["sample"][sheet["sample"].duplicated()].unique().tolist()
    if duplicated:
        raise InputError(path, f"duplicate sample name(s) {duplicated}")

    schema = _load_schema("samples.schema.yaml", schema_dir)
    validator = jsonschema.Draft202012Validator(schema)
    for line, row in enumerate(sheet.to_dict("records"), start=2):
        record = {k: v for k, v in row.items() if v != ""}
        if "mpp" in record:
            try:
                record["mpp"] = float(record["mpp"])
            except ValueError:
                pass
        for err in validator.iter_errors(record):
            raise InputError(path, f"line {line}, column {_dotted(err.absolute_path)} = {err.instance!r}: {err.message}")
        if row["kind"] == "visium" and row["mpp"]:
            raise InputError(path, f"line {line}: mpp is only for kind=he slides (Visium scale comes from scalefactors)")
        if row["kind"] == "he" and (row["image"] or row["labels"]):
            raise InputError(path, f"line {line}: image/labels columns are only for kind=visium slides")
        if row["kind"] == "hest" and (row["image"] or row["mpp"]):
            raise InputError(path, f"line {line}: image/mpp columns are not for kind=hest samples (the HEST WSI and"
                                   " its metadata's pixel_size_um_estimated give them)")
    return sheet.set_index("sample", drop=False)


EXPRESSION_KINDS = ("visium", "hest")  # slides with spatial expression (Space Ranger or HEST-1k)


def counts_file(row) -> str:
    """The count matrix of a sample-sheet row with expression: the Space Ranger HDF5, or HEST's h5ad."""
    if row["kind"] == "hest":
        return f"{row['path']}/st/{row['sample']}.h5ad"
    return f"{row['path']}/filtered_feature_bc_matrix.h5"


def cohorts(sheet: pd.DataFrame) -> list[str]:
    """Cohort names in sheet order."""
    return list(dict.fromkeys(sheet["cohort"]))


def cohort_samples(sheet: pd.DataFrame, cohort: str) -> list[str]:
    return sheet.loc[sheet["cohort"] == cohort, "sample"].tolist()


def expression_cohorts(sheet: pd.DataFrame) -> list[str]:
    """Cohorts whose slides all carry spatial expression (Space Ranger or HEST slides)."""
    return [c for c in cohorts(sheet) if sheet.loc[sheet["cohort"] == c, "kind"].isin(EXPRESSION_KINDS).all()]


def check_cohorts(sheet: pd.DataFrame, path: str | Path) -> None:
    """A cohort mixes no H&E-only slides with slides carrying expression (Space Ranger and HEST slides
    may share a cohort): expression stages need every slide's counts."""
    for cohort in cohorts(sheet):
        kinds = set(sheet.loc[sheet["cohort"] == cohort, "kind"])
        if "he" in kinds and len(kinds) > 1:
            raise InputError(path, f"cohort {cohort!r} mixes slide kinds {sorted(kinds)}; put H&E-only slides in their own cohort")


def he_cohorts(sheet: pd.DataFrame) -> list[str]:
    """Cohorts of H&E-only slides (no expression)."""
    return [c for c in cohorts(sheet) if (sheet.loc[sheet["cohort"] == c, "kind"] == "he").all()]


def resolve_cohorts(config: dict, sheet: pd.DataFrame, sheet_path: str | Path) -> tuple[str, list[str], list[str]]:
    """(train cohort, OOD cohorts, log lines) from `train.cohort` / `train.ood_cohorts`.

    Unset (null), train.cohort is the sheet's only Visium cohort and ood_cohorts its only H&E-only
    cohort (none when it has none); with a choice to make, an InputError names the cohorts."""
    train = config["train"]
    visium, he = expression_cohorts(sheet), he_cohorts(sheet)
    named = f"(Visium: {', '.join(visium) or 'none'}; H&E-only: {', '.join(he) or 'none'})"
    notes = []
    cohort = train.get("cohort")
    if cohort is None:
        if len(visium) != 1:
            raise InputError(sheet_path, f"config key train.cohort is not set and the sheet has {len(visium)} Visium "
                                         f"cohorts {named}: set train.cohort to the one models train on")
        cohort = visium[0]
        notes.append(f"train.cohort not set: using the sheet's only Visium cohort {cohort!r}")
    elif cohort not in cohorts(sheet):
        raise InputError(sheet_path, f"config key train.cohort = {cohort!r}: no such cohort in the sample sheet {named}")
    elif cohort not in visium:
        raise InputError(sheet_path, f"config key train.cohort = {cohort!r}: not a Visium cohort {named}")
    ood = train.get("ood_cohorts")
    if ood is None:
        if len(he) > 1:
            raise InputError(sheet_path, f"config key train.ood_cohorts is not set and the sheet has {len(he)} "
                                         f"H&E-only cohorts {named}: list the ones Table 3 evaluates")
        ood = list(he)
        notes.append("train.ood_cohorts not set: " + (f"using the sheet's only H&E-only cohort {he[0]!r}" if he
                                                      else "the sheet has no H&E-only cohort (no Table 3 OOD rows)"))
    for name in ood:
        if name not in cohorts(sheet):
            raise InputError(sheet_path, f"config key train.ood_cohorts: {name!r} is not a cohort of the sample sheet {named}")
        if name == cohort:
            raise InputError(sheet_path, f"config key train.ood_cohorts: {name!r} is the training cohort")
    return cohort, list(ood), notes


def check_test_donors(config: dict, sheet: pd.DataFrame, cohort: str, source: str | Path) -> None:
    """Named test donors must be donors of their cohort; with `split.require_test_donors` (the paper
    configuration), the training cohort's test donor must be named."""
    split = config["split"]
    for name, donors in split["test_donors"].items():
        if name not in cohorts(sheet):
            continue  # a cohort of another sheet: unused
        present = sorted(set(sheet.loc[sheet["cohort"] == name, "donor"]))
        unknown = sorted(set(donors) - set(present))
        if unknown:
            raise InputError(source, f"config key split.test_donors.{name}: {unknown} are not donors of cohort "
                                     f"{name!r} (its donors: {', '.join(present)})")
    if split["require_test_donors"] and not split["test_donors"].get(cohort):
        present = sorted(set(sheet.loc[sheet["cohort"] == cohort, "donor"]))
        raise InputError(source, f"config key split.test_donors: this configuration requires the held-out test donor "
                                 f"of cohort {cohort!r} to be named (split.require_test_donors is true); set "
                                 f"split.test_donors: {{{cohort}: [DONOR]}} with DONOR one of {', '.join(present)}")
