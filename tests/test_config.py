"""Config and sample-sheet validation: bad input names the file, the key and the value."""

from __future__ import annotations

import pytest
import yaml

from stmdit.config import load_config, load_sample_sheet, validate_config
from stmdit.errors import InputError

SHEET_HEADER = "sample\tdonor\tcohort\tkind\tpath\timage\tlabels\tmpp\n"


def write_sheet(tmp_path, rows, header=SHEET_HEADER):
    path = tmp_path / "samples.tsv"
    path.write_text(header + "".join(rows))
    return path


def test_default_config_is_valid_and_defaults_are_filled(repo_root):
    config = load_config(repo_root / "config.yaml")
    assert config["spots"]["min_foreground"] == 0.55
    assert config["spots"]["min_laplacian_var"] == 20
    assert config["expression"]["n_hvg"] == 3000
    assert config["features"]["encoders"]["uni2h"]["arch"] == {}
    filled = validate_config({"samples": "x.tsv"})
    assert filled["split"]["seed"] == 42 and filled["spots"]["exclude_labels"] == ["Whitespace", "Mixed"]


def test_config_error_names_key_and_value(tmp_path, repo_root):
    config = yaml.safe_load((repo_root / "config.yaml").read_text())
    config["spots"]["min_foreground"] = "lots"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(InputError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "spots.min_foreground" in message and "'lots'" in message


def test_config_rejects_unknown_key():
    with pytest.raises(InputError, match="spots"):
        validate_config({"samples": "x.tsv", "spots": {"min_forground": 0.5}})


def test_demo_sheet_is_valid(repo_root):
    sheet = load_sample_sheet(repo_root / "workflow" / "demo" / "samples.tsv")
    assert sheet["donor"].nunique() >= 4 and (sheet["kind"] == "visium").sum() >= 6
    assert (sheet["kind"] == "he").sum() == 1


@pytest.mark.parametrize(
    "rows, header, expected",
    [
        (["s1\td1\tc\tvisium\tp\t\t\t\n", "s1\td2\tc\tvisium\tq\t\t\t\n"], SHEET_HEADER, "duplicate sample"),
        (["s1\td1\tc\tvisium\tp\t\t\t\tx\n"], SHEET_HEADER.strip() + "\tcolour\n", "unknown column"),
        (["../evil\td1\tc\tvisium\tp\t\t\t\n"], SHEET_HEADER, "'../evil'"),
        (["s 1\td1\tc\tvisium\tp\t\t\t\n"], SHEET_HEADER, "column sample"),
        (["s1\td1\tc\tslide\tp\t\t\t\n"], SHEET_HEADER, "column kind"),
        (["s1\td1\tc\the\tp.svs\t\t\t-1\n"], SHEET_HEADER, "column mpp"),
        (["s1\td1\tc\tvisium\tp\t\t\t\n"], "sample\tdonor\tcohort\tkind\n", "missing required column"),
    ],
)
def test_bad_sample_sheets(tmp_path, rows, header, expected):
    path = write_sheet(tmp_path, rows, header)
    with pytest.raises(InputError) as err:
        load_sample_sheet(path)
    assert str(path) in str(err.value) and expected in str(err.value)
