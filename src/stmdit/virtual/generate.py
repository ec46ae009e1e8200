"""One-off generation outside Snakemake: a trained model, some spots (or an expression vector) and
an edit in; tiles out.

    stmdit generate --model-dir results/models/M --ge results/features/C/cancerfoundation.zarr
        (--expression results/expression/C.h5ad --keys S:BARCODE ... [--uni results/features/C/uni2h.zarr]
         | --vector counts.tsv [--noise-key NAME])
        [--edit "CD8A*4,MKI67+2"] [--gene-set NAME=G1,G2,...] [--split S.parquet] [--regime uni_ge|ge]
        [sampler options] --out-dir DIR

Writes DIR/tiles.zarr (arms `unedited` and, with --edit, `edited`, as `stmdit virtual-tiles`
stores them) and DIR/{arm}/{key}.png. A vector file is TSV or CSV with columns gene and count (raw
counts); genes the encoder does not read are ignored, the ones it reads and the vector lacks count 0.
With --keys and --uni the regime defaults to uni_ge (the spots' own UNI), otherwise ge (null UNI).
toward: edits need --split (their centroids are the train spots of a label).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stmdit.errors import InputError
from stmdit.ge_inputs import check_trained_encoder
from stmdit.model import GE, UNI_GE
from stmdit.split_table import TRAIN, split_keys

log = logging.getLogger(__name__)


OTHER_GENES = "<other genes>"


def read_vector(path: Path, genes: list[str]) -> np.ndarray:
    """(1, len(genes) + 1) raw counts of a gene,count table on `genes`, then the summed counts of its
    other genes (the encoder does not read them, but they belong to the spot's total, the unit of
    log1p CP10k edits)."""
    try:
        table = pd.read_csv(path, sep=None, engine="python")
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the expression vector: {exc}") from None
    if not {"gene", "count"} <= set(table.columns):
        raise InputError(path, f"the expression vector needs columns gene and count (found {list(table.columns)})")
    counts = pd.to_numeric(table["count"], errors="coerce")
    if counts.isna().any() or (counts < 0).any():
        raise InputError(path, "counts must be non-negative numbers")
    series = pd.Series(counts.to_numpy(np.float64), index=table["gene"].astype(str)).groupby(level=0).sum()
    read = series.index.intersection(pd.Index(genes))
    if read.empty:
        raise InputError(path, "no gene of the vector is among the genes the GE encoder reads")
    log.info("%s: %d of its %d genes are read by the encoder (%d encoder genes at 0)", path, len(read), len(series),
             len(genes) - len(read))
    other = float(series.drop(read).sum())
    return np.append(series.reindex(genes).fillna(0.0).to_numpy(), other)[None, :]


def parse_gene_sets(items: list[str]) -> dict[str, list[str]]:
    sets = {}
    for item in items or []:
        name, sep, genes = item.partition("=")
        if not sep or not name or not genes:
            raise InputError(None, f"--gene-set {item!r} is not NAME=GENE1,GENE2,...")
        sets[name] = [g.strip() for g in genes.split(",") if g.strip()]
    return sets


def run_generate(args: argparse.Namespace) -> Path:
    import scipy.sparse as sp

    from stmdit.features import open_feature_store
    from stmdit.tile_grid import write_png
    from stmdit.cli import cli_params
    from stmdit.sampling import SamplingSession, SessionSettings
    from stmdit.virtual.edits import check_reaches_encoder, parse_edit
    from stmdit.virtual.experiment import Arm, GeReencoder, class_centroids_log1p, read_uni, VirtualConditions

    if (args.vector is None) == (not args.keys):
        raise InputError(None, "give either --keys (with --expression) or --vector")
    if args.keys and args.expression is None:
        raise InputError(None, "--keys needs --expression (the cohort h5ad holding their counts)")
    regime = args.regime or (UNI_GE if args.keys and args.uni else GE)
    if regime == UNI_GE and (args.vector is not None or args.uni is None):
        raise InputError(None, "regime uni_ge needs --keys and --uni (a vector has no morphology)")
    session = SamplingSession(SessionSettings.from_args(
        args, regime, needs_ge_model="the model is UNI-only (ge_fusion none): expression cannot reach it"))
    config = session.config

    labels: list[str] = []
    centroids: dict[str, np.ndarray] = {}
    if args.vector is not None:
        group = open_feature_store(args.ge)
        from stmdit.zarr_rows import string_values

        encoder_genes = [str(g) for g in string_values(group["token_genes"][:])[1:]]
        genes = [*encoder_genes, OTHER_GENES]
        reencoder = GeReencoder(args.ge, genes, device=args.device)
        counts = read_vector(args.vector, encoder_genes)
        keys = [args.noise_key]
    else:
        from stmdit.expression import read_cohort_h5ad

        adata = read_cohort_h5ad(args.expression)
        genes = [str(g) for g in adata.var_names]
        reencoder = GeReencoder(args.ge, genes, device=args.device)
        obs = pd.Index([str(k) for k in adata.obs_names])
        keys = [str(k) for k in args.keys]
        missing = [k for k in keys if k not in obs]
        if missing:
            raise InputError(args.expression, f"spot key {missing[0]!r} is not in the cohort")
        matrix = sp.csr_matrix(adata.layers["counts"])
        counts = matrix[obs.get_indexer(keys)].toarray().astype(np.float64)
        if "label" in adata.obs:
            labels = sorted(adata.obs["label"].astype(str).unique())
    arms = [Arm("unedited", None, None, "")]
    if args.edit:
        edit = parse_edit(args.edit, genes, parse_gene_sets(args.gene_set), labels, "--edit")
        check_reaches_encoder(edit, reencoder.genes, "--edit")
        if edit.labels:
            if args.split is None or args.vector is not None:
                raise InputError(None, "toward: edits need --keys, --expression and --split (train-spot centroids)")
            train = obs.intersection(pd.Index(split_keys(args.split, TRAIN)))
            train_labels = adata.obs["label"].astype(str).reindex(train).to_numpy()
            centroids = class_centroids_log1p(matrix[obs.get_indexer(train)].toarray(), train_labels, edit.labels)
        arms.append(Arm("edited", None, edit, edit.text()))
    check_trained_encoder(session.trained.ge_encoder, reencoder.identity,
                          session.trained.path / "training.json", args.ge)
    uni = read_uni(args.uni, keys, config) if regime == UNI_GE else None
    conditions = VirtualConditions(keys, arms, counts, genes, reencoder, uni, centroids, config.uses_ge_tokens)
    session.open_codec()
    out_dir = Path(args.out_dir)
    attrs = session.attrs("generate", cli_params(args),
                          [session.weights_path, args.ge, *(p for p in (args.expression, args.uni, args.vector) if p)])
    attrs["virtual"] = {"experiment": "generate", "arms": [{"arm": a.name, "dose": None, "edit": a.text} for a in arms],
                        "n_spots": len(keys), "noise": "per spot: keyed_generator(seed, 'sample', key)"}
    extra = {"arm": np.array([arms[a].name for a in conditions.arm_index], dtype=object),
             "ref_key": np.array(conditions.noise_keys, dtype=object)}
    store = session.generate(conditions, out_dir / "tiles.zarr", attrs, extra_arrays=extra)
    from stmdit.image_stores import open_image_store

    tiles = open_image_store(store, decoder=session.store_decoder())
    for row, key in enumerate(conditions.keys):
        arm, spot = key.split("|", 1)
        write_png(out_dir / arm / f"{spot.replace(':', '_').replace('/', '_')}.png", tiles.read_rows([row])[0])
    log.info("wrote %s and %d PNGs under %s", store, len(conditions), out_dir)
    return store


def register(subparsers: argparse._SubParsersAction) -> None:
    from stmdit.sampling import add_sampler_options

    p = subparsers.add_parser("generate", help="one-off tiles of spots (or an expression vector), unedited and edited")
    add_sampler_options(p)
    for action in p._actions:  # generate writes a folder, and the split is only for toward: edits
        if action.dest in ("out", "split", "uni"):
            action.required = False
        if action.dest == "out":
            action.help = argparse.SUPPRESS
    p.add_argument("--ge", type=Path, required=True, help="cancerfoundation feature store (encoder and gene list)")
    p.add_argument("--expression", type=Path, help="cohort h5ad holding the --keys' raw counts")
    p.add_argument("--keys", nargs="+", help="spot keys (sample:barcode)")
    p.add_argument("--vector", type=Path, help="TSV/CSV with columns gene, count: one spot's raw counts")
    p.add_argument("--noise-key", default="vector", help="the noise key of a --vector spot")
    p.add_argument("--edit", help="edit (grammar: stmdit.virtual.edits / config.yaml virtual)")
    p.add_argument("--gene-set", action="append", help="NAME=G1,G2,... usable in --edit (repeatable)")
    p.add_argument("--regime", choices=(UNI_GE, GE), help="default: uni_ge with --keys and --uni, else ge")
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(func=run_generate)
