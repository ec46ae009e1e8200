"""The command line: `@FILE` arguments (the slide lists cohort rules pass)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stmdit.cli import build_parser, main
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


@pytest.mark.parametrize("command", ["tiles", "features", "deepspot-train", "deepspot-predict", "eval-features"])
def test_bf16_is_on_by_default_as_in_the_config_and_can_be_turned_off(command):
    import yaml

    from stmdit.cli import BF16_DEFAULT

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    sections = schema["properties"]
    assert sections["features"]["properties"]["bf16"]["default"] is BF16_DEFAULT
    assert sections["sampler"]["properties"]["bf16"]["default"] is BF16_DEFAULT
    action = next(a for a in build_parser(command)._subparsers._group_actions[0].choices[command]._actions
                  if a.dest == "bf16")
    assert action.default is True and "--no-bf16" in action.option_strings


def test_named_paths_are_parsed_once_with_the_option_in_every_error():
    from stmdit.cli import parse_named_paths
    from stmdit.errors import InputError

    assert parse_named_paths(["uni=a.zarr", "uni_ge=b=c.zarr"], "--tiles") == {
        "uni": Path("a.zarr"), "uni_ge": Path("b=c.zarr")}
    for values, allowed, message in [(["a.zarr"], None, "NAME=PATH"), (["=a.zarr"], None, "NAME=PATH"),
                                     (["x=a.zarr"], ("uni",), "one of ['uni']"),
                                     (["uni=a", "uni=b"], None, "given twice")]:
        with pytest.raises(InputError, match="--gen-uni") as err:
            parse_named_paths(values, "--gen-uni", allowed)
        assert message in str(err.value)


def test_provenance_params_of_a_command_hash_the_same_in_every_process():
    """The dispatched function is not a parameter: its address would change the hash from run to run."""
    import subprocess
    import sys

    code = ("from stmdit.cli import build_parser, cli_params; from stmdit.provenance import params_hash; "
            "args = build_parser('layout-probe').parse_args(['layout-probe', '--model-dir', 'm', '--split', 's', "
            "'--latents', 'l', '--uni', 'u', '--out', 'o']); print(params_hash(cli_params(args)), 'func' in vars(args))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][1] == "True", runs


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model-dir", "m"], "command sample was renamed to tiles: stmdit tiles ..."),
    (["perturb-sample"], "command perturb-sample was renamed to perturbed-tiles: stmdit perturbed-tiles ..."),
    (["sample-grid"], "command sample-grid was renamed to tile-grid: stmdit tile-grid ..."),
    (["virtual-sample"], "command virtual-sample was renamed to virtual-tiles: stmdit virtual-tiles ..."),
    (["palette", "--patches", "p.zarr", "--samples", "uni=a.zarr"], "option --samples of stmdit palette was renamed to --tiles"),
])
def test_a_renamed_command_or_option_stops_with_one_line_naming_the_new_name(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"stmdit: error: {message}\n"


def test_the_sample_sheet_option_keeps_its_name():
    args = build_parser("demo-data").parse_args(["demo-data", "--samples", "s.tsv", "--source-image", "i.svs",
                                                 ])
    assert args.samples == Path("s.tsv")
