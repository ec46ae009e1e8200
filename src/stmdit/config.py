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
    return sheet.set_index("sample", drop=False)


def cohorts(sheet: pd.DataFrame) -> list[str]:
    """Cohort names in sheet order."""
    return list(dict.fromkeys(sheet["cohort"]))


def cohort_samples(sheet: pd.DataFrame, cohort: str) -> list[str]:
    return sheet.loc[sheet["cohort"] == cohort, "sample"].tolist()


def expression_cohorts(sheet: pd.DataFrame) -> list[str]:
    """Cohorts whose slides all carry Visium expression."""
    return [c for c in cohorts(sheet) if (sheet.loc[sheet["cohort"] == c, "kind"] == "visium").all()]


def check_cohorts(sheet: pd.DataFrame, path: str | Path) -> None:
    """A cohort mixes no slide kinds: expression stages need all slides to be Visium."""
    for cohort in cohorts(sheet):
        kinds = set(sheet.loc[sheet["cohort"] == cohort, "kind"])
        if len(kinds) > 1:
            raise InputError(path, f"cohort {cohort!r} mixes slide kinds {sorted(kinds)}; put H&E-only slides in their own cohort")
