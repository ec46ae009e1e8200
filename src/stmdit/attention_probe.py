"""`stmdit attention-probe`: where a trained denoiser's self-attention looks.

For real spots noised to a few levels, each block's self-attention weights are read per head and
summarised against uniform attention over the tile's tokens:
- `neighbours`: the mean weight on the 8 tokens around a query, times the token count (1 for
  uniform attention, above 1 when a head looks at its neighbours);
- `mean_distance`: the weight-averaged distance from a query to the tokens it reads, in tokens,
  next to `uniform_mean_distance`.

A model whose heads all sit at neighbours ~1 denoises each token from itself and the tile's mean:
its tiles come out as a mosaic of token squares (texture.json's `cell_border`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from stmdit.cli import cli_params
from stmdit.errors import InputError
from stmdit.probe_inputs import add_probe_inputs, open_latent_store
from stmdit.provenance import atomic_path, provenance

log = logging.getLogger(__name__)

DEFAULT_NOISE_LEVELS = (0.9, 0.7, 0.5, 0.2)


def attention_weights(attention, hidden: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, N) softmax weights of a diffusers self-`Attention` on `hidden` (B, N, C), with
    the local bias its processor adds, if any."""
    batch, tokens, _ = hidden.shape
    heads = attention.heads
    query = attention.to_q(hidden).view(batch, tokens, heads, -1).transpose(1, 2)
    key = attention.to_k(hidden).view(batch, tokens, heads, -1).transpose(1, 2)
    if attention.norm_q is not None:
        query, key = attention.norm_q(query), attention.norm_k(key)
    logits = (query @ key.transpose(-1, -2)) * attention.scale
    bias = getattr(attention.processor, "bias", None)
    if bias is not None:
        logits = logits + bias(logits.dtype)[None]
    return logits.float().softmax(dim=-1)


def token_distances(side: int) -> torch.Tensor:
    """(N, N) Euclidean distance between the tokens of a side x side grid, in tokens."""
    row, col = (i.flatten().float() for i in torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"))
    return torch.sqrt((row[:, None] - row[None, :]) ** 2 + (col[:, None] - col[None, :]) ** 2)


def locality(weights: torch.Tensor, side: int) -> dict[str, np.ndarray]:
    """Per head, summed over the batch's spots: `neighbours` (mean weight on the <= 8 surrounding
    tokens x N) and `mean_distance`, from (B, heads, N, N) weights."""
    distance = token_distances(side).to(weights.device)
    neighbour = ((distance > 0) & (distance < 1.5)).float()
    per_query = (weights * neighbour).sum(-1) / neighbour.sum(-1)  # (B, heads, N)
    return {
        "neighbours": (per_query.mean(dim=2) * side * side).sum(0).cpu().numpy(),
        "mean_distance": (weights * distance).sum(-1).mean(dim=2).sum(0).cpu().numpy(),
    }


@torch.inference_mode()
def probe_attention(model, objective, latents: torch.Tensor, uni: torch.Tensor, noise: torch.Tensor,
                    noise_level: float) -> list[dict[str, np.ndarray]]:
    """Per block, the heads' locality (summed over spots) of `model` on `latents` noised to
    `noise_level` with `noise`, conditioned on each spot's UNI (GE dropped)."""
    captured: list[tuple] = []

    def capture(module, args, kwargs):
        captured.append((module, args[0] if args else kwargs["hidden_states"]))

    handles = [block.attn.register_forward_pre_hook(capture, with_kwargs=True) for block in model.blocks]
    try:
        u = torch.full((len(latents),), noise_level, dtype=torch.float32, device=latents.device)
        noised = objective.prepare(latents.float(), noise, u)
        keep = torch.zeros(len(latents), dtype=torch.bool, device=latents.device)
        model(noised.x_t, noised.timestep, uni, None, drop_uni=keep, drop_ge=~keep)
    finally:
        for handle in handles:
            handle.remove()
    side = model.config.latent_size // model.config.patch_size
    return [locality(attention_weights(module, hidden), side) for module, hidden in captured]


def run_attention_probe(args: argparse.Namespace) -> Path:
    from stmdit.loader import store_rows
    from stmdit.metrics import subsample_keys
    from stmdit.model import get_objective
    from stmdit.sampling import StoreConditions, load_trained_model
    from stmdit.split_table import split_keys
    from stmdit.tile_decoder import resolve_device
    from stmdit.train_utils import keyed_generator
    from stmdit.zarr_rows import read_array_rows

    for level in args.noise_levels:
        if not 0.0 < level < 1.0:
            raise InputError(None, f"--noise-levels must lie in (0, 1), got {level}")
    device = resolve_device(args.device)
    trained = load_trained_model(args.model_dir, device)
    model, objective = trained.model.eval(), get_objective(trained.objective)
    latent_group = open_latent_store(args.latents, trained.config)
    shape = tuple(latent_group["latent"].shape[1:])
    keys = subsample_keys(split_keys(args.split, args.split_name), args.max_spots, args.seed)
    latents = torch.from_numpy(read_array_rows(latent_group["latent"], store_rows(latent_group, keys, args.latents))
                               .astype(np.float32))
    uni = torch.from_numpy(StoreConditions(keys, args.uni, None, trained.config, device, None,
                                           trained.path / "training.json").uni.astype(np.float32))
    noise = torch.stack([torch.randn(shape, generator=keyed_generator(args.seed, "attention-probe", k)) for k in keys])

    levels = {}
    for level in args.noise_levels:
        sums = None
        for start in range(0, len(keys), args.batch_size):
            rows = slice(start, start + args.batch_size)
            blocks = probe_attention(model, objective, latents[rows].to(device), uni[rows].to(device),
                                     noise[rows].to(device), level)
            sums = blocks if sums is None else [{m: s[m] + b[m] for m in s} for s, b in zip(sums, blocks)]
        levels[str(level)] = [{m: np.round(v.astype(float) / len(keys), 4).tolist() for m, v in block.items()}
                              for block in sums]
        log.info("noise level %.2f: neighbour weight over uniform, per block (heads): %s", level,
                 "; ".join(" ".join(f"{v:.2f}" for v in block["neighbours"]) for block in levels[str(level)]))
    side = trained.config.latent_size // trained.config.patch_size
    result = {
        "model": str(args.model_dir), "objective": trained.objective, "n": len(keys), "tokens": side * side,
        "measure": "self-attention weights per block and head on real latents noised to each level, with the "
                   "spot's UNI (GE dropped): neighbours = mean weight on the <= 8 surrounding tokens x the token "
                   "count (1 = uniform attention); mean_distance = weight-averaged query-key distance in tokens",
        "uniform_mean_distance": float(token_distances(side).mean()),
        "noise_levels": levels,
        "provenance": provenance("attention-probe", cli_params(args),
                                 inputs=[trained.path, args.split, args.latents, args.uni]),
    }
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return Path(args.out)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("attention-probe", help="where a trained denoiser's self-attention looks: weight "
                                                      "on neighbouring tokens against uniform, per block and head")
    add_probe_inputs(p)
    p.add_argument("--split-name", default="test", help="which split's spots to probe")
    p.add_argument("--noise-levels", type=float, nargs="+", default=list(DEFAULT_NOISE_LEVELS),
                   help="fractions of the way to pure noise, each in (0, 1)")
    p.add_argument("--max-spots", type=int, default=128, help="seeded subsample of the split")
    p.add_argument("--seed", type=int, default=42, help="spot subsample and noise")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, required=True, help="JSON written here")
    p.set_defaults(func=run_attention_probe)
