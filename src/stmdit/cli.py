"""`stmdit <step> ...`: one subcommand per pipeline step; Snakemake rules call these.

Each stage module registers its own subcommand through `register(subparsers)`, so a new step
is one entry in COMMANDS. Only the module of the command being run is imported, so a light step
does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from stmdit import __version__
from stmdit.errors import InputError

COMMANDS = {
    "fetch-demo-image": "stmdit.resources",
    "demo-data": "stmdit.demo",
    "spots": "stmdit.spots",
    "hest-sheet": "stmdit.hest_sheet",
    "expression": "stmdit.expression",
    "features": "stmdit.features",
    "split": "stmdit.split",
    "train": "stmdit.train",
    "deepspot-train": "stmdit.deepspot",
    "deepspot-predict": "stmdit.deepspot",
    "models-json": "stmdit.models_config",
    "sample": "stmdit.sample",
    "perturb-sample": "stmdit.perturb",
    "sample-grid": "stmdit.sample",
    "matched-spots": "stmdit.matched",
    "layout": "stmdit.layout",
    "palette": "stmdit.palette",
    "eval-features": "stmdit.evaluate",
    "fid": "stmdit.evaluate",
    "eval-regressor": "stmdit.evaluate",
    "auc": "stmdit.evaluate",
    "perturbation": "stmdit.evaluate",
    "table": "stmdit.report",
    "figure": "stmdit.report",
    "bench": "stmdit.bench",
    "resources": "stmdit.job_resources",
    "preflight": "stmdit.preflight",
    "loss-curve": "stmdit.report",
    "demo-checks": "stmdit.demo_checks",
    "virtual-sample": "stmdit.virtual.experiment",
    "virtual-report": "stmdit.virtual.report",
    "generate": "stmdit.virtual.generate",
}

log = logging.getLogger("stmdit")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; with `command`, only that command's module is imported."""
    # `@FILE` stands for FILE's lines, one argument each: cohort rules pass their slide lists so
    # (results/lists/), as a command line of 1,000 slides' paths would pass the kernel's limit
    parser = argparse.ArgumentParser(prog="stmdit", description=__doc__.splitlines()[0], fromfile_prefix_chars="@")
    parser.add_argument("--version", action="version", version=f"stmdit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<step>")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    started = time.perf_counter()
    log.info("stmdit %s: %s", __version__, " ".join(argv))
    try:
        args.func(args)
    except InputError as err:
        print(f"stmdit {args.command}: error: {err}", file=sys.stderr)
        return 2
    log.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return 0
