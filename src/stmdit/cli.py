"""`stmdit <step> ...`: one subcommand per pipeline step; Snakemake rules call these.

Each stage module registers its own subcommand through `register(subparsers)`, so a new step
is one entry in COMMANDS. Only the module of the command being run is imported, so a light step
does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Sequence

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
    "tiles": "stmdit.tiles",
    "perturbed-tiles": "stmdit.perturb",
    "tile-grid": "stmdit.tile_grid",
    "matched-spots": "stmdit.matched",
    "layout": "stmdit.layout",
    "attention-probe": "stmdit.attention_probe",
    "palette": "stmdit.palette",
    "texture": "stmdit.texture",
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
    "virtual-tiles": "stmdit.virtual.experiment",
    "virtual-report": "stmdit.virtual.report",
    "generate": "stmdit.virtual.generate",
}

# Old names that stop with one line naming the new one (generated tiles no longer say "sample",
# which names a slide: the sample sheet's column and the {sample} wildcard).
RENAMED_COMMANDS = {"sample": "tiles", "perturb-sample": "perturbed-tiles", "sample-grid": "tile-grid",
                    "virtual-sample": "virtual-tiles"}
RENAMED_OPTIONS = {"--samples": ("--tiles", ("layout", "palette", "texture", "matched-spots", "tile-grid",
                                             "perturbation"))}

log = logging.getLogger("stmdit")

BF16_DEFAULT = True  # as the config schema's features.bf16 and sampler.bf16


def add_bf16_option(parser: argparse.ArgumentParser) -> None:
    """--bf16 / --no-bf16, on by default (as in the config): bf16 autocast on CUDA, ignored on CPU."""
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=BF16_DEFAULT,
                        help="bf16 autocast on CUDA (ignored on CPU); --no-bf16 runs float32")


def cli_params(args: argparse.Namespace) -> dict:
    """A command's parsed options as provenance parameters: paths as strings, without the dispatched
    function (its address would change the params hash from run to run)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k != "func" and not callable(v)}


def parse_named_paths(values: Sequence[str], option: str, allowed: Sequence[str] | None = None) -> dict[str, Path]:
    """["uni_ge=a.zarr", "uni=b.zarr"] -> {"uni_ge": Path("a.zarr"), ...} for an option given as
    NAME=PATH items; names from `allowed` when given, each at most once."""
    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path or (allowed is not None and name not in allowed):
            expected = f" with NAME one of {list(allowed)}" if allowed is not None else ""
            raise InputError(None, f"{option} {value!r}: expected NAME=PATH{expected}")
        if name in named:
            raise InputError(None, f"{option}: {name} is given twice")
        named[name] = Path(path)
    return named


RUSAGE_DIR_ENV = "STMDIT_RUSAGE_DIR"


def own_peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM of its address space since exec). ru_maxrss can carry the
    peak of the process that forked us (Linux records the parent's copied high-water mark at exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_elapsed_s() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included), from /proc."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def write_rusage_record(directory: str, command: str, argv: list[str], wall_s: float, exit_code: int) -> None:
    """One JSON per `stmdit` process into `directory` (env STMDIT_RUSAGE_DIR; read by `stmdit bench scale`)."""
    self_usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = process_elapsed_s()
    record = {"command": command, "argv": argv, "cwd": os.getcwd(), "wall_s": wall_s if elapsed is None else elapsed,
              "command_s": wall_s, "exit_code": exit_code,
              "vmhwm_bytes": own_peak_rss_bytes(), "ru_maxrss_self_bytes": self_usage.ru_maxrss * 1024,
              "ru_maxrss_children_bytes": children.ru_maxrss * 1024,
              "cpu_s": self_usage.ru_utime + self_usage.ru_stime + children.ru_utime + children.ru_stime}
    os.makedirs(directory, exist_ok=True)
    name = os.path.join(directory, f"{command}-{os.getpid()}-{time.time_ns()}.json")
    with open(name + ".tmp", "w") as out:
        json.dump(record, out)
    os.replace(name + ".tmp", name)


def renamed_error(command: str | None, argv: Sequence[str]) -> str | None:
    """The one-line error for a renamed command or option in `argv`, or None."""
    if command in RENAMED_COMMANDS:
        return f"command {command} was renamed to {RENAMED_COMMANDS[command]}: stmdit {RENAMED_COMMANDS[command]} ..."
    for old, (new, commands) in RENAMED_OPTIONS.items():
        if command in commands and any(a == old or a.startswith(old + "=") for a in argv):
            return f"option {old} of stmdit {command} was renamed to {new}"
    return None


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
    renamed = renamed_error(command, argv)
    if renamed:
        print(f"stmdit: error: {renamed}", file=sys.stderr)
        return 2
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    started = time.perf_counter()
    log.info("stmdit %s: %s", __version__, " ".join(argv))
    exit_code = 1
    try:
        args.func(args)
        exit_code = 0
    except InputError as err:
        print(f"stmdit {args.command}: error: {err}", file=sys.stderr)
        exit_code = 2
        return exit_code
    finally:
        if os.environ.get(RUSAGE_DIR_ENV):
            write_rusage_record(os.environ[RUSAGE_DIR_ENV], args.command, argv, time.perf_counter() - started,
                                exit_code)
    log.info("%s finished in %.1f s", args.command, time.perf_counter() - started)
    return 0
