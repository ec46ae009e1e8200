"""The command line: `@FILE` arguments (the slide lists cohort rules pass)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stmdit.cli import build_parser
from stmdit.provenance import write_lines


def test_an_argument_file_stands_for_its_lines(tmp_path):
    spots = [f"results/spots/S{i:04d}.parquet" for i in range(1000)] + ["results/spots/with space.parquet"]
    write_lines(tmp_path / "spots.txt", spots)
    args = build_parser("split").parse_args(
        ["split", "--cohort", "c", "--spots", f"@{tmp_path / 'spots.txt'}", "--out", "x.parquet"])
    assert args.spots == [Path(s) for s in spots] and args.out == Path("x.parquet")


def test_an_argument_file_cannot_hold_a_line_break(tmp_path):
    with pytest.raises(ValueError, match="line break"):
        write_lines(tmp_path / "spots.txt", ["a\nb"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["sample", "features", "deepspot-train", "deepspot-predict", "eval-features"])
def test_bf16_is_on_by_default_as_in_the_config_and_can_be_turned_off(command):
    import yaml

    from stmdit.cli import BF16_DEFAULT

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    sections = schema["properties"]
    assert sections["features"]["properties"]["bf16"]["default"] is BF16_DEFAULT
    assert sections["sample"]["properties"]["bf16"]["default"] is BF16_DEFAULT
    action = next(a for a in build_parser(command)._subparsers._group_actions[0].choices[command]._actions
                  if a.dest == "bf16")
    assert action.default is True and "--no-bf16" in action.option_strings


def test_named_paths_are_parsed_once_with_the_option_in_every_error():
    from stmdit.cli import parse_named_paths
    from stmdit.errors import InputError

    assert parse_named_paths(["uni=a.zarr", "uni_ge=b=c.zarr"], "--samples") == {
        "uni": Path("a.zarr"), "uni_ge": Path("b=c.zarr")}
    for values, allowed, message in [(["a.zarr"], None, "NAME=PATH"), (["=a.zarr"], None, "NAME=PATH"),
                                     (["x=a.zarr"], ("uni",), "one of ['uni']"),
                                     (["uni=a", "uni=b"], None, "given twice")]:
        with pytest.raises(InputError, match="--gen-uni") as err:
            parse_named_paths(values, "--gen-uni", allowed)
        assert message in str(err.value)
