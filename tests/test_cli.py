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
