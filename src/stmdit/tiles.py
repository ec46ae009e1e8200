"""The `tiles` stage: generated latents (and, with --store-images, their decoded images) for a
split's spots, from a trained model (paper 2.2, D.3).

    stmdit tiles --model-dir results/models/M --split results/splits/C.parquet --split-name test
        [--max-spots N --subsample-seed 42] --uni U.zarr [--ge G.zarr] --vae-impl smoke|real
        [--vae-weights P] [--vae-arch-json J] [--allow-hub] --regime uni_ge|uni|ge|uncond
        --steps 50 [--solver default|dpmpp_2m|heun|unipc] --seed 42 [--s-uni S --s-ge S] --batch-size 32
        [--device auto] [--bf16] [--store-images]
        --out results/tiles/M/C/REGIME.zarr

--s-uni and --s-ge default to the paper's guidance scales (`stmdit.regimes`).

The sampling itself (model, sampler, decoder, output store) is `stmdit.sampling`'s
`SamplingSession`; the real/generated grid is `stmdit.tile_grid`, perturbation sampling (the
Table 5 inputs) `stmdit.perturb`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from stmdit.cli import cli_params
from stmdit.errors import InputError
from stmdit.metrics import subsample_keys
from stmdit.model import REGIMES, UNI_GE
from stmdit.sampling import SamplingSession, SessionSettings, add_sampler_options, regime_uses_ge
from stmdit.solvers import solver_name
from stmdit.split_table import split_keys

log = logging.getLogger(__name__)


def run_tiles(args: argparse.Namespace) -> Path:
    session = SamplingSession(SessionSettings.from_args(args, args.regime))
    settings, trained = session.sampler, session.trained
    if regime_uses_ge(args.regime) and args.ge is None:
        raise InputError(None, f"regime {args.regime} needs the GE store (--ge)")
    keys = split_keys(args.split, args.split_name)
    if args.max_spots is not None:
        keys = subsample_keys(keys, args.max_spots, args.subsample_seed)
    conditions = session.store_conditions(keys, args.uni, args.ge)
    session.open_codec()
    log.info("sampling %d %s spots of %s with %s (%s, %s sampler, %d steps) in regime %s -> %s", len(keys),
             args.split_name, args.split, trained.path, trained.config.ge_fusion,
             solver_name(trained.objective, settings.solver),
             settings.steps, args.regime, args.out)
    inputs = [session.weights_path, args.split, args.uni] + ([args.ge] if args.ge else [])
    attrs = session.attrs("tiles", cli_params(args), inputs)
    attrs["spots"] = {"split": str(args.split), "split_name": args.split_name, "n": len(keys),
                      "max_spots": args.max_spots, "subsample_seed": args.subsample_seed}
    return session.generate(conditions, args.out, attrs)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tiles", help="generate the latents and images of a split's spots with a trained model")
    add_sampler_options(parser)
    parser.add_argument("--split-name", default="test")
    parser.add_argument("--max-spots", type=int, default=None, help="seeded subsample of at most this many spots")
    parser.add_argument("--subsample-seed", type=int, default=42)
    parser.add_argument("--ge", type=Path, default=None, help="cancerfoundation feature store (GE regimes)")
    parser.add_argument("--regime", choices=REGIMES, default=UNI_GE)
    parser.set_defaults(func=run_tiles)
