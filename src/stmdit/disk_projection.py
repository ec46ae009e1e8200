"""What `stmdit bench scale` cannot run at scale, projected from a plan and a measurement: the tile
stores every sampling job writes, and the training checkpoints.

- Tile stores: every `tiles` / `perturbed_tiles` output the configuration plans (`snakemake -n` of
  `all` on a generated sheet of the paper's 18 slides), with its rows (the test split's spots on the
  training cohort, the OOD subsample on an H&E-only cohort, pairs x references x alphas for a
  perturbation store), times the bytes per row of a latents-only tile store written by the real
  writer (`sampling.write_tile_store`) from SD3 latents of real patches.
- Checkpoints: per trained model, its parameters counted on the meta device, times the bytes of
  one full checkpoint (model, EMA and AdamW's two moments, float32) kept `keep_checkpoints` times,
  plus the finished model's `ema.safetensors`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TILE_OUTPUT = re.compile(r"results/tiles/(?P<model>[^/]+)/(?P<cohort>[^/]+)/(?P<store>[^/]+)\.zarr$")
FULL_CHECKPOINT_BYTES_PER_PARAMETER = 4 * 4  # model + EMA + AdamW exp_avg + exp_avg_sq, float32
EMA_BYTES_PER_PARAMETER = 4  # ema.safetensors, float32


@dataclass(frozen=True)
class PlannedStore:
    model: str
    cohort: str
    store: str
    rows: int


def planned_outputs(configfile: Path, slides: int = 18, donors: int = 7, he_slides: int = 4) -> list[str]:
    """Every output path `snakemake -n all` plans for `configfile` on a generated sheet (`bench dag`'s)."""
    from stmdit.bench import plan_on_generated_sheet

    out, _ = plan_on_generated_sheet(configfile, slides, donors, he_slides)
    outputs = []
    for line in out.splitlines():
        if line.startswith("    output: "):
            outputs += [p.strip() for p in line[len("    output: "):].split(",")]
    return outputs


def planned_tile_stores(config: dict, outputs: list[str], test_spots: int, ood_spots: int) -> list[PlannedStore]:
    """The tile stores among `outputs`, with the rows each holds at the given spot counts."""
    perturbation = config["evaluate"]["perturbation"]
    perturbation_rows = len(perturbation["pairs"]) * int(perturbation["n_ref"]) * len(perturbation["alphas"])
    ood_cohorts = set(config["train"].get("ood_cohorts") or [])
    stores = []
    for path in outputs:
        match = TILE_OUTPUT.search(path)
        if not match:
            continue
        store, cohort = match["store"], match["cohort"]
        if store.startswith("perturbation"):
            rows = perturbation_rows
        elif cohort in ood_cohorts:
            rows = min(ood_spots, int(config["sampler"]["ood_max_spots"]))
        else:
            rows = test_spots
        stores.append(PlannedStore(match["model"], cohort, store, rows))
    return stores


def tile_bytes_per_row(latent_store: Path, keys: list[str], work: Path) -> float:
    """Bytes on disk per row of a latents-only tile store written by `sampling.write_tile_store` from
    the SD3 latents of `keys` (as sampled latents would be: float16, the same codec and chunks)."""
    from stmdit.features import read_feature_rows
    from stmdit.sampling import write_tile_store

    latents = read_feature_rows(latent_store, keys, ["latent"])["latent"]
    out = work / "tile_store_bytes.zarr"
    write_tile_store(out, keys, [(latents, None)], {"bench_scale": "real latents in a tile store"})
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return size / len(keys)


def checkpoint_bytes(config: dict) -> dict[str, dict[str, Any]]:
    """model -> parameters and the bytes of its kept checkpoints and its ema.safetensors."""
    import torch

    from stmdit.model import STMDiT
    from stmdit.models_config import resolve_models
    from stmdit.train import TrainSettings

    out = {}
    for name, model in resolve_models(config).items():
        if not model.trained:
            continue
        settings = TrainSettings(**{k: v for k, v in model.settings.items()
                                    if k in TrainSettings.__dataclass_fields__})
        with torch.device("meta"):
            parameters = sum(p.numel() for p in STMDiT(settings.model_config).parameters())
        out[name] = {"parameters": parameters, "checkpoints_kept": settings.keep_checkpoints,
                     "checkpoint_bytes": parameters * FULL_CHECKPOINT_BYTES_PER_PARAMETER * settings.keep_checkpoints,
                     "ema_bytes": parameters * EMA_BYTES_PER_PARAMETER}
    return out


def projection(config: dict, outputs: list[str], bytes_per_row: float, test_spots: int, ood_spots: int
               ) -> dict[str, Any]:
    stores = planned_tile_stores(config, outputs, test_spots, ood_spots)
    rows = sum(s.rows for s in stores)
    checkpoints = checkpoint_bytes(config)
    return {
        "tile_stores": len(stores), "tile_rows": rows, "tile_bytes_per_row": round(bytes_per_row),
        "tile_stores_gb": round(rows * bytes_per_row / 1e9, 1),
        "trained_models": len(checkpoints),
        "checkpoints_gb": round(sum(c["checkpoint_bytes"] for c in checkpoints.values()) / 1e9, 1),
        "ema_weights_gb": round(sum(c["ema_bytes"] for c in checkpoints.values()) / 1e9, 1),
        "parameters_per_model_m": sorted({round(c["parameters"] / 1e6, 1) for c in checkpoints.values()}),
        "checkpoints_kept_per_model": sorted({c["checkpoints_kept"] for c in checkpoints.values()}),
    }


def describe(result: dict[str, Any], configfile: Path) -> str:
    return (f"Not run, projected for {configfile}: {result['tile_stores']} tile stores of {result['tile_rows']:,} rows "
            f"at {result['tile_bytes_per_row']:,} bytes/row (a latents-only tile store of this run's real SD3 latents) = "
            f"{result['tile_stores_gb']} GB; {result['trained_models']} trained models of "
            f"{', '.join(f'{p}M' for p in result['parameters_per_model_m'])} parameters: "
            f"{result['checkpoints_kept_per_model']} full checkpoint(s) each (model, EMA, AdamW moments, float32) = "
            f"{result['checkpoints_gb']} GB, plus their ema.safetensors {result['ema_weights_gb']} GB.")

