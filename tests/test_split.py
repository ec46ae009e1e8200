"""Donor-level splits: no donor leaks between the train pool and test; seeded and reproducible."""

from __future__ import annotations

import pandas as pd
import pytest

from stmdit.cli import main
from stmdit.errors import InputError
from stmdit.provenance import read_parquet_provenance
from stmdit.split import assign_splits, cap_spots_per_slide


def make_spots(n_per_slide=50):
    rows = []
    for donor, samples in {"d1": ["a", "b"], "d2": ["c"], "d3": ["e", "f"]}.items():
        for sample in samples:
            for i in range(n_per_slide):
                rows.append({"key": f"{sample}:bc{i}", "sample": sample, "donor": donor, "barcode": f"bc{i}",
                             "pxl_row": i, "pxl_col": i, "label": "", "keep": i % 10 != 0})
    return pd.DataFrame(rows)


def test_split_holds_out_donors_and_val_fraction():
    spots = make_spots()
    splits = assign_splits(spots, ["d3"], 0.1, seed=42)
    assert list(splits["key"]) == list(spots["key"])
    assert set(splits.loc[splits["donor"] == "d3", "split"]) == {"test"}
    assert "test" not in set(splits.loc[splits["donor"] != "d3", "split"])
    pool = (splits["split"] != "test").sum()
    assert (splits["split"] == "val").sum() == round(0.1 * pool)
    again = assign_splits(spots, ["d3"], 0.1, seed=42)
    assert splits.equals(again)
    other = assign_splits(spots, ["d3"], 0.1, seed=7)
    assert not splits["split"].equals(other["split"])


def test_auto_test_donor_is_one_whole_donor():
    splits = assign_splits(make_spots(), None, 0.1, seed=3)
    test_donors = set(splits.loc[splits["split"] == "test", "donor"])
    assert len(test_donors) == 1
    donor = test_donors.pop()
    assert (splits.loc[splits["donor"] == donor, "split"] == "test").all()


def test_unknown_or_all_test_donors_are_errors():
    with pytest.raises(InputError, match="not in the cohort"):
        assign_splits(make_spots(), ["d9"], 0.1, seed=0)
    with pytest.raises(InputError, match="nothing is left"):
        assign_splits(make_spots(), ["d1", "d2", "d3"], 0.1, seed=0)


def test_cap_per_slide_is_seeded_and_independent_of_other_slides():
    spots = make_spots()
    capped = cap_spots_per_slide(spots, 20, seed=1)
    assert capped.groupby("sample").size().max() == 20
    only_a = cap_spots_per_slide(spots[spots["sample"] == "a"], 20, seed=1)
    assert list(only_a["key"]) == list(capped.loc[capped["sample"] == "a", "key"])


def test_split_cli_writes_parquet_with_provenance(tmp_path):
    spots = make_spots()
    paths = []
    for sample, group in spots.groupby("sample", sort=False):
        path = tmp_path / f"{sample}.parquet"
        group.to_parquet(path)
        paths.append(str(path))
    out = tmp_path / "splits" / "c.parquet"
    code = main(["split", "--cohort", "c", "--spots", *paths, "--out", str(out), "--test-donors", "d2",
                 "--val-fraction", "0.2", "--seed", "5"])
    assert code == 0
    splits = pd.read_parquet(out)
    assert list(splits.columns) == ["key", "sample", "donor", "split"]
    assert len(splits) == spots["keep"].sum()
    assert set(splits.loc[splits["donor"] == "d2", "split"]) == {"test"}
    meta = read_parquet_provenance(out)
    assert meta["step"] == "split" and meta["params"]["seed"] == 5 and len(meta["params_hash"]) == 16
    bad = main(["split", "--cohort", "c", "--spots", *paths, "--out", str(tmp_path / "bad.parquet"),
                "--test-donors", "nobody"])
    assert bad == 2 and not (tmp_path / "bad.parquet").exists()
    assert not any(p.name.startswith(".") for p in (tmp_path / "splits").iterdir())
