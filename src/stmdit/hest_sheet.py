"""`stmdit hest-sheet`: a sample sheet of HEST-1k samples (kind hest) from HEST's metadata table.

    stmdit hest-sheet --metadata HEST_v1_1_0.csv --root /data/hest --cohort hest_skin \\
        --organ Skin --species "Homo sapiens" --technology Visium [--oncotree SKCM ...] \\
        [--disease-state ...] [--ids ID ...] [--donors donors.tsv] [--min-donors 3] --out hest_skin.tsv

Filters keep a row when its column equals one of the given values (case and surrounding blanks
ignored); several filters must all hold. A sample is dropped, and the printout says why, when a
filter fails, its id cannot name a sample, or one of its files (st/{id}.h5ad, wsis/{id}.tif,
metadata/{id}.json under --root) is missing.

Donors (splits are donor-level, so two people must never share a donor by accident, nor one person's
slides be read as several people's without the printout saying so):
- `patient`, when set and unique within its dataset (`dataset_title`): a label that every sample of
  a dataset of several samples carries ("Patient 1" on TENX153-156, whose `subseries` name patients
  P1, P2, P3 and P5) tells nobody apart and is not used;
- otherwise `dataset_title` + `subseries`, when `subseries` is set; otherwise the id (one donor per
  sample).
Donor names are `{dataset}_{label}` with `{dataset}` the dataset's first id in HEST's table (ids
are unique; titles are long) and the label's characters outside [A-Za-z0-9_.-] replaced by `_`;
from the id, the id itself. Labels that would collide after that replacement fall back to the id.
`--donors FILE` (TSV or CSV with columns id, donor) overrides any of them. The assignment is printed,
with where each donor came from.

The printout also gives, per technology, how many samples passed, which were dropped and why, and
the spots (from each h5ad's header; HEST's `spots_under_tissue` where it cannot be read) and donors
that remain. A training cohort needs at least `--min-donors` (3) donors: DeepSpot's
leave-one-donor-out needs two training donors and the split a test donor. With fewer, the command
stops with one line and writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stmdit.errors import InputError
from stmdit.hest import sample_files
from stmdit.provenance import atomic_path

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("dataset_title", "id", "organ", "species", "patient", "st_technology", "oncotree_code",
                    "disease_state", "subseries", "spots_under_tissue")
FILTERS = {"organ": "organ", "species": "species", "technology": "st_technology", "oncotree": "oncotree_code",
           "disease_state": "disease_state"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SHOWN_IDS = 8  # ids listed per drop reason in the printout


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def slug(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.-]", "_", text.strip())).strip("_.-")


def read_metadata_table(path: str | Path) -> pd.DataFrame:
    """HEST's metadata CSV (its byte-order mark ignored), every column as stripped text."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "HEST metadata table not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read HEST metadata table: {exc}") from None
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(path, f"HEST metadata table lacks column(s) {missing}")
    table = table.apply(lambda column: column.str.strip())
    duplicated = table["id"][table["id"].duplicated()]
    if len(duplicated):
        raise InputError(path, f"id {duplicated.iloc[0]!r} appears twice")
    return table


@dataclass(frozen=True)
class Donor:
    name: str
    source: str  # how it was chosen, for the printout


def assign_donors(table: pd.DataFrame) -> dict[str, Donor]:
    """id -> Donor for every row of the whole table, by the rules of the module docstring."""
    donors: dict[str, Donor] = {}
    for title, dataset in table.groupby("dataset_title", sort=False):
        key = min(dataset["id"], key=natural_key)
        labels = dataset.loc[dataset["patient"] != "", "patient"]
        placeholder = len(dataset) > 1 and len(labels) == len(dataset) and labels.nunique() == 1
        proposed: dict[str, Donor] = {}
        for row in dataset.itertuples():
            if row.patient and not placeholder:
                proposed[row.id] = Donor(f"{key}_{slug(row.patient)}", f"patient {row.patient!r}")
            elif row.subseries:
                why = f" (patient {row.patient!r} is on all {len(dataset)} samples of its dataset)" if placeholder else ""
                proposed[row.id] = Donor(f"{key}_{slug(row.subseries)}", f"subseries {row.subseries!r}{why}")
            else:
                proposed[row.id] = Donor(row.id, "id (no patient, no subseries)")
        # two different labels must not become one donor name
        raw = {sample: (d.source.split(" (")[0]) for sample, d in proposed.items()}
        by_name = defaultdict(set)
        for sample, donor in proposed.items():
            by_name[donor.name].add(raw[sample])
        for sample, donor in proposed.items():
            if len(by_name[donor.name]) > 1 or not NAME.match(donor.name):
                proposed[sample] = Donor(sample, f"id ({donor.source} is ambiguous as a name)")
        donors.update(proposed)
    return donors


def read_donor_map(path: str | Path) -> dict[str, str]:
    """id -> donor from a TSV or CSV with columns id, donor."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "donor mapping file not found")
    try:
        table = pd.read_csv(path, sep=None, engine="python", dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read donor mapping: {exc}") from None
    table.columns = [c.strip() for c in table.columns]
    if not {"id", "donor"} <= set(table.columns):
        raise InputError(path, f"donor mapping needs columns id and donor, found {list(table.columns)}")
    table = table.apply(lambda column: column.str.strip())
    duplicated = table["id"][table["id"].duplicated()]
    if len(duplicated):
        raise InputError(path, f"id {duplicated.iloc[0]!r} is mapped twice")
    bad = table["donor"][~table["donor"].str.match(NAME.pattern)]
    if len(bad):
        raise InputError(path, f"donor {bad.iloc[0]!r} is not a name (letters, digits, '_', '.', '-')")
    return dict(zip(table["id"], table["donor"]))


def spot_count(h5ad: Path) -> int | None:
    """Spots of an h5ad from its HDF5 header (obs index length); None when unreadable."""
    import h5py

    try:
        with h5py.File(h5ad, "r") as f:
            obs = f["obs"]
            index = obs.attrs.get("_index", "_index")
            return int(obs[index].shape[0])
    except Exception:  # noqa: BLE001  (any damage: the printout falls back to the table's number)
        return None


def drop_reason(row: pd.Series, filters: dict[str, list[str]], root: Path) -> str:
    for option, column in FILTERS.items():
        wanted = filters.get(option)
        if wanted and row[column].casefold() not in {w.strip().casefold() for w in wanted}:
            return f"{column} {row[column]!r} not in {wanted}"
    if filters.get("ids") and row["id"] not in filters["ids"]:
        return "id not in --ids"
    if not NAME.match(row["id"]):
        return f"id {row['id']!r} cannot name a sample"
    missing = [f"{path.parent.name}/{path.name}" for path in sample_files(root, row["id"]).values() if not path.is_file()]
    if missing:
        return "missing " + (", ".join(missing) if len(missing) < 3 else "st, wsis and metadata files")
    return ""


def reason_group(reason: str) -> str:
    """The kind of a drop reason: "missing files", "<column> filter", "--ids" or "bad id"."""
    if reason.startswith("missing"):
        return "missing files"
    if reason.startswith("id not in"):
        return "--ids"
    if reason.startswith("id "):
        return "bad id"
    return reason.split(" ")[0] + " filter"


def dropped_lines(dropped: pd.DataFrame) -> list[str]:
    lines = []
    for group, part in dropped.groupby(dropped["reason"].map(reason_group), sort=True):
        part = part.iloc[sorted(range(len(part)), key=lambda i: natural_key(part["id"].iloc[i]))]
        if group == "missing files":
            entries = [f"{i} ({reason.removeprefix('missing ')})" for i, reason in zip(part["id"], part["reason"])]
        else:
            entries = list(part["id"])
        shown = ", ".join(entries[:SHOWN_IDS]) + (f", ... ({len(entries) - SHOWN_IDS} more)"
                                                  if len(entries) > SHOWN_IDS else "")
        why = group if group == "missing files" else re.sub(r" '.*?' not in ", " not in ", part["reason"].iloc[0])
        lines.append(f"  dropped {len(part)} ({why}): {shown}")
    return lines


def build_sheet(metadata: str | Path, root: str | Path, cohort: str, filters: dict[str, list[str]],
                donor_map: str | Path | None = None, min_donors: int = 3) -> tuple[pd.DataFrame, list[str]]:
    """(sample sheet, printout lines); InputError when fewer than `min_donors` donors remain."""
    if not NAME.match(cohort):
        raise InputError(None, f"--cohort {cohort!r} is not a name (letters, digits, '_', '.', '-')")
    table = read_metadata_table(metadata)
    root_path = Path(root)
    donors = assign_donors(table)
    mapped = read_donor_map(donor_map) if donor_map else {}
    unknown = sorted(set(mapped) - set(table["id"]), key=natural_key)
    if unknown:
        raise InputError(donor_map, f"id(s) {unknown[:5]} are not in {metadata}")
    for sample, name in mapped.items():
        donors[sample] = Donor(name, f"--donors {Path(donor_map).name}")

    table["reason"] = [drop_reason(row, filters, root_path) for _, row in table.iterrows()]
    kept = table[table["reason"] == ""].copy()
    kept["donor"] = [donors[s].name for s in kept["id"]]
    spots = {}
    for sample, listed in zip(kept["id"], kept["spots_under_tissue"]):
        counted = spot_count(sample_files(root_path, sample)["st"])
        spots[sample] = counted if counted is not None else int(float(listed or 0))
    kept["spots"] = kept["id"].map(spots)

    lines = [f"HEST cohort {cohort!r} from {metadata} ({len(table)} samples), root {root}"]
    for tech in sorted(set(table["st_technology"]) | set(filters.get("technology") or []), key=str.casefold):
        rows = table[table["st_technology"] == tech]
        passed = kept[kept["st_technology"] == tech]
        lines.append(f"{tech or '(no technology)'}: {len(passed)} passed, {len(rows) - len(passed)} dropped;"
                     f" {int(passed['spots'].sum()):,} spots and {passed['donor'].nunique()} donor(s) remain")
        lines += dropped_lines(rows[rows["reason"] != ""])
    lines.append(f"donors ({kept['donor'].nunique()}; rule: patient when set and unique within its dataset, else"
                 " dataset + subseries, else id; --donors overrides):")
    for donor, part in kept.groupby("donor", sort=False):
        ids = sorted(part["id"], key=natural_key)
        lines.append(f"  {donor}: {', '.join(ids)} <- {donors[ids[0]].source} [{part['dataset_title'].iloc[0]}]")
    n_donors = kept["donor"].nunique()
    if n_donors < min_donors:
        raise InputError(metadata, f"cohort {cohort!r} has {n_donors} donor(s) after the filters and file checks"
                                   f" ({', '.join(sorted(kept['donor'].unique())) or 'none'}); a training cohort needs"
                                   f" at least {min_donors} (DeepSpot's leave-one-donor-out plus a test donor)")
    sheet = pd.DataFrame({"sample": kept["id"], "donor": kept["donor"], "cohort": cohort, "kind": "hest",
                          "path": str(root)})
    return sheet.reset_index(drop=True), lines


def run(args: argparse.Namespace) -> None:
    filters = {name: getattr(args, name) for name in (*FILTERS, "ids") if getattr(args, name)}
    sheet, lines = build_sheet(args.metadata, args.root, args.cohort, filters, args.donors, args.min_donors)
    with atomic_path(args.out) as tmp:
        sheet.to_csv(tmp, sep="\t", index=False)
    print("\n".join(lines))
    print(f"wrote {args.out}: {len(sheet)} samples of {sheet['donor'].nunique()} donors (kind hest)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("hest-sheet", help="a sample sheet of HEST-1k samples from HEST's metadata table")
    p.add_argument("--metadata", required=True, type=Path, help="HEST's metadata CSV (HEST_v1_1_0.csv)")
    p.add_argument("--root", required=True, help="the HEST root holding st/, wsis/ and metadata/")
    p.add_argument("--cohort", required=True, help="cohort name of every row")
    p.add_argument("--organ", nargs="+", help="keep these organs (column organ), e.g. Skin")
    p.add_argument("--species", nargs="+", help='keep these species, e.g. "Homo sapiens"')
    p.add_argument("--technology", nargs="+", help="keep these st_technology values: Visium, Visium HD, Xenium, ...")
    p.add_argument("--oncotree", nargs="+", help="keep these oncotree_code values, e.g. SKCM")
    p.add_argument("--disease-state", dest="disease_state", nargs="+", help="keep these disease_state values")
    p.add_argument("--ids", nargs="+", help="keep only these HEST ids")
    p.add_argument("--donors", type=Path, default=None, help="TSV/CSV with columns id, donor: overrides the rules")
    p.add_argument("--min-donors", type=int, default=3, help="fewest donors a cohort may have (default 3)")
    p.add_argument("--out", required=True, type=Path, help="the sample sheet (TSV) to write")
    p.set_defaults(func=run)
