"""The inputs the model probes share (`stmdit layout-probe`, `stmdit attention-probe`): a finished
model, a split table, and the real latents and UNI embeddings of its spots."""

from __future__ import annotations

import argparse
from pathlib import Path

import zarr

from stmdit.errors import InputError


def add_probe_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, required=True, help="finished model folder")
    parser.add_argument("--split", type=Path, required=True, help="split table (key, split)")
    parser.add_argument("--latents", type=Path, required=True, help="sd3_vae feature store (the real latents)")
    parser.add_argument("--uni", type=Path, required=True, help="uni2h feature store")


def open_latent_store(path: Path, config) -> zarr.Group:
    """The latent feature store at `path`, checked against the denoiser `config` (InputError naming
    the store when it holds no latents or latents of another shape)."""
    from stmdit.features import open_feature_store

    group = open_feature_store(path)
    if "latent" not in group:
        raise InputError(path, "not a latent store (needs the array latent)")
    shape = tuple(group["latent"].shape[1:])
    expected = (config.in_channels, config.latent_size, config.latent_size)
    if shape != expected:
        raise InputError(path, f"latents of shape {shape}; the model takes {expected}")
    return group
