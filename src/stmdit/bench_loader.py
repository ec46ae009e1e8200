"""`stmdit bench loader`: the training loader of each GE fusion against an in-memory gather of the
same rows, the on-device cost of encoding GE bins into tokens, and the RAM training holds.

Synthetic stores in the layout and at the shapes `stmdit features` writes at paper scale: SD3
latents (16 x 32 x 32, float16), UNI2-h embeddings (1,536), a CancerFoundation store with the CLS
(256) and the bins of 1,199 genes (uint8) and the smoke encoder's provenance. They are written a
block of spots at a time, so `--spots 100000` never holds the cohort in float32.

Per fusion (`none` reads latents and UNI; `adaln` adds the GE CLS; `xattn-direct` and `xattn-pma`
add the GE bins, the same data for both: the token source is part of the model, not of the
loader): `SpotFeatures.iterate` over shuffled micro-batches, as training draws them, against
indexing the arrays the loader holds and converting them as it does. The encoder that turns bins
into tokens runs on the model's device inside the training step, so it is timed on its own: the
published CancerFoundation architecture (6 layers, 256-d, 1,200 tokens, random weights) against
one B-size XAttn-PMA training step on the same spots, both on this machine's CPU, and its FLOP per
spot against the issue's 2e11 FLOP of a B-size training step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stmdit.bench import benchmark

FUSIONS = ("none", "adaln", "xattn-direct", "xattn-pma")
LATENT_SHAPE = (16, 32, 32)
UNI_DIM = 1536
GE_DIM = 256
PAPER_GENES_IN_SEQUENCE = 1199
WRITE_BLOCK = 4096  # spots generated and written at a time
PAPER_TRAIN_SPOTS = 114_688  # the Visium spots the paper's models train on (all splits: an upper bound)
# a B-size DiT training step per sample (forward + backward, 256 latent tokens): the stores issue's figure
B_SIZE_TRAIN_FLOP_PER_SAMPLE = 2e11


def encoder_flop_per_spot(tokens: int, d: int = 256, d_hid: int = 512, layers: int = 6) -> float:
    """Forward FLOP of one spot through a post-norm transformer encoder: projections, attention, MLP."""
    per_layer = 2 * tokens * (4 * d * d + 2 * d * d_hid) + 4 * tokens * tokens * d
    return float(layers * per_layer)


def write_stores(root: Path, n: int, genes: int, rng: np.random.Generator) -> list[str]:
    from stmdit.encoders.smoke import SmokeCancerFoundation
    from stmdit.features import write_feature_store

    keys = [f"bench:{i:06d}" for i in range(n)]
    blocks = [(start, min(start + WRITE_BLOCK, n)) for start in range(0, n, WRITE_BLOCK)]
    write_feature_store(root / "sd3_vae.zarr", keys, (
        {"latent": rng.standard_normal((b - a, *LATENT_SHAPE), dtype=np.float32).astype(np.float16)}
        for a, b in blocks), {"latent": LATENT_SHAPE}, {})
    write_feature_store(root / "uni2h.zarr", keys, (
        {"embedding": rng.standard_normal((b - a, UNI_DIM), dtype=np.float32)} for a, b in blocks),
        {"embedding": (UNI_DIM,)}, {})
    encoder = SmokeCancerFoundation(seed=0)
    encoder.genes = [f"GENE{i:05d}" for i in range(genes)]
    # Visium-like sparsity: about a third of the genes expressed in a spot, in bins 1..50
    ge_blocks = ({"embedding": rng.standard_normal((b - a, GE_DIM), dtype=np.float32),
                  "bins": np.where(rng.random((b - a, genes)) < 0.35, rng.integers(1, 51, (b - a, genes)), 0)}
                 for a, b in blocks)
    attrs = {"stmdit": {"params": {"encoder": "cancerfoundation", "impl": "smoke", "seed": 0}},
             "encoder": encoder.describe()}
    write_feature_store(root / "cf.zarr", keys, ge_blocks, encoder.output_shapes, attrs,
                        extra_arrays={"token_genes": np.array(["<cls>", *encoder.genes], dtype=object)})
    return keys


def time_loader(data, batches: list[np.ndarray], prefetch: int, workers: int) -> float:
    started = time.perf_counter()
    for batch in data.iterate(batches, prefetch=prefetch, workers=workers):
        batch["latent"].sum()  # touch the data as a training step would
        if batch["ge"] is not None and batch["ge"].bins is not None:
            batch["ge"].bins.sum()
    return time.perf_counter() - started


def time_gather(data, batches: list[np.ndarray]) -> float:
    """The same rows of the arrays the loader holds, converted as it converts them, on this thread."""
    import torch

    started = time.perf_counter()
    for rows in batches:
        torch.from_numpy(data.latents[rows].astype(np.float32)).sum()
        torch.from_numpy(data.uni[rows].astype(np.float32))
        if data.ge_cls is not None:
            torch.from_numpy(data.ge_cls[rows].astype(np.float32))
        if data.ge_bins is not None:
            torch.from_numpy(data.ge_bins[rows]).sum()
    return time.perf_counter() - started


def time_encoder(spots: int, genes: int) -> dict[str, Any]:
    """The published CancerFoundation architecture at random weights, forward, against one B-size
    XAttn-PMA training step (forward and backward) on the same spots, both on this CPU in float32."""
    import torch

    from stmdit.encoders.cancerfoundation import CancerFoundationArgs, CancerFoundationModel
    from stmdit.loader import GeBatch
    from stmdit.model import DiTConfig, STMDiT, draw_spot_randomness, get_objective

    torch.manual_seed(0)
    encoder = CancerFoundationModel(genes + 3, 0, CancerFoundationArgs()).eval()
    ids = torch.arange(2, genes + 3).expand(spots, -1)
    values = torch.randint(0, 51, (spots, genes + 1)).float()
    padding = torch.zeros(ids.shape, dtype=torch.bool)
    with torch.inference_mode():
        encoder(ids[:1], values[:1], padding[:1])  # warm-up
        started = time.perf_counter()
        tokens = encoder(ids, values, padding)
        encoder_s = time.perf_counter() - started
    model = STMDiT(DiTConfig(ge_fusion="xattn", ge_tokens="pma")).train()  # the defaults are the B size
    batch = {"latent": torch.randn(spots, *LATENT_SHAPE), "uni": torch.randn(spots, UNI_DIM),
             "ge": GeBatch(tokens[:, 0].clone(), tokens.clone(), torch.ones(tokens.shape[:2], dtype=torch.bool))}
    draws = draw_spot_randomness(list(range(spots)), seed=0, step=0, latent_shape=LATENT_SHAPE, p_drop_uni=0.0)
    objective = get_objective("flow")
    objective.loss(model, batch, draws).backward()  # warm-up
    model.zero_grad()
    started = time.perf_counter()
    objective.loss(model, batch, draws).backward()
    step_s = time.perf_counter() - started
    flop = encoder_flop_per_spot(genes + 1)
    return {"spots": spots, "tokens": genes + 1, "cpu_ms_per_spot": round(1000 * encoder_s / spots, 1),
            "b_size_train_step_cpu_ms_per_spot": round(1000 * step_s / spots, 1),
            "measured_share_of_train_step": round(encoder_s / (encoder_s + step_s), 3),
            "gflop_per_spot": round(flop / 1e9, 1),
            "flop_share_of_b_size_train_step": round(flop / (flop + B_SIZE_TRAIN_FLOP_PER_SAMPLE), 3)}


def training_ram_gb(spots: int, genes: int) -> dict[str, float]:
    """What `SpotFeatures` holds for `spots` train spots, by the stored dtypes."""
    sizes = {"latents": 2 * int(np.prod(LATENT_SHAPE)), "uni": 4 * UNI_DIM, "ge_cls": 4 * GE_DIM, "ge_bins": genes}
    ram = {name: round(spots * size / 1e9, 2) for name, size in sizes.items()}
    ram["total"] = round(sum(ram.values()), 2)
    return ram


def _loader_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spots", type=int, default=2048, help="spots in the synthetic stores (issue 18: 100000)")
    p.add_argument("--genes", type=int, default=PAPER_GENES_IN_SEQUENCE, help="GE bins per spot (paper: 1,199)")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=1000, help="micro-batches timed per fusion")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=8)
    p.add_argument("--fusions", default=",".join(FUSIONS), help=f"comma-separated, of {', '.join(FUSIONS)}")
    p.add_argument("--encoder-spots", type=int, default=8, help="spots of the timed encoder batch (0: skip)")


@benchmark("loader", _loader_arguments)
def bench_loader(args: argparse.Namespace) -> dict[str, Any]:
    """Training loader per GE fusion vs an in-memory gather of the same rows, the GE encoder's cost, training RAM.

    A ratio near 1 means the loader costs no more than indexing arrays already in memory: it will not
    make the GPU wait. The issue's floor: 2,000 samples/s per process."""
    from stmdit.loader import SpotFeatures

    fusions = [f.strip() for f in args.fusions.split(",") if f.strip()]
    unknown = [f for f in fusions if f not in FUSIONS]
    if unknown:
        raise SystemExit(f"stmdit bench loader: unknown fusion(s) {unknown}; choose from {', '.join(FUSIONS)}")
    rng = np.random.default_rng(0)
    n = args.spots
    result: dict[str, Any] = {"benchmark": "loader", "spots": n, "genes": args.genes, "micro_batch": args.micro_batch,
                              "batches": args.batches, "workers": args.workers, "fusions": {}}
    print(f"loader bench: {n:,} spots, latents {LATENT_SHAPE} float16, UNI {UNI_DIM}, GE CLS {GE_DIM} + "
          f"{args.genes} bins (uint8); micro-batch {args.micro_batch}, {args.batches} micro-batches per fusion")
    with tempfile.TemporaryDirectory(prefix="stmdit-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        keys = write_stores(root, n, args.genes, rng)
        result["write_stores_s"] = round(time.perf_counter() - started, 1)
        order = rng.permutation(n)
        batches = [order[(i * args.micro_batch) % n:][: args.micro_batch] for i in range(args.batches)]
        for fusion in fusions:
            ge_store = None if fusion == "none" else root / "cf.zarr"
            started = time.perf_counter()
            data = SpotFeatures(keys, root / "sd3_vae.zarr", root / "uni2h.zarr", ge_store,
                                ge_tokens=fusion.startswith("xattn"))
            open_s = time.perf_counter() - started
            loader_s = time_loader(data, batches, args.prefetch, args.workers)
            memory_s = time_gather(data, batches)
            samples = len(batches) * args.micro_batch
            case = {"open_s": round(open_s, 1), "loader_samples_per_s": round(samples / loader_s),
                    "memory_samples_per_s": round(samples / memory_s),
                    "loader_over_memory": round(memory_s / loader_s, 3)}
            result["fusions"][fusion] = case
            print(f"  {fusion:>12}: loader {case['loader_samples_per_s']:>8,} samples/s, in-memory gather "
                  f"{case['memory_samples_per_s']:>8,} samples/s, ratio {case['loader_over_memory']}"
                  f" (stores read into memory in {case['open_s']} s)")
            del data
    if args.encoder_spots > 0:
        encoder = result["ge_encoder"] = time_encoder(args.encoder_spots, args.genes)
        print(f"  GE encoder (published CancerFoundation, {encoder['tokens']} tokens; on the model's device in "
              f"training, here on this CPU): {encoder['cpu_ms_per_spot']} ms/spot against "
              f"{encoder['b_size_train_step_cpu_ms_per_spot']} ms/spot for a B-size XAttn-PMA training step: "
              f"{encoder['measured_share_of_train_step']:.1%} of the two; by FLOP {encoder['gflop_per_spot']} "
              f"GFLOP/spot, {encoder['flop_share_of_b_size_train_step']:.1%} of a 2e11-FLOP B-size step")
    ram = result["training_ram_gb_at_paper_scale"] = training_ram_gb(PAPER_TRAIN_SPOTS, args.genes)
    print(f"  RAM a training process holds for {PAPER_TRAIN_SPOTS:,} spots: " +
          ", ".join(f"{k} {v} GB" for k, v in ram.items()))
    print(json.dumps(result))
    return result
