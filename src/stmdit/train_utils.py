"""Pieces of the training loop that do not depend on the model: learning-rate schedule, EMA,
per-sample randomness, wall-clock budget and checkpoints."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import torch

from stmdit.provenance import atomic_path

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup_steps: int, total_steps: int, final_fraction: float = 0.1) -> float:
    """Linear warm-up from 0 to 1 over `warmup_steps`, then linear decay to `final_fraction` at
    `total_steps` (the paper: 1,000 warm-up steps, decay to 10%)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return 1.0 - (1.0 - final_fraction) * progress


class Ema:
    """Exponential moving average of parameters (float32), updated after every optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        self.shadow = {k: v.float().clone() for k, v in state.items()}

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))


def keyed_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed that depends only on `seed` and `parts` (e.g. step and dataset position, or a
    spot key), so draws do not depend on batch size, worker count or process count."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(seed: int, *parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(keyed_seed(seed, *parts))


# --- wall-clock budget -------------------------------------------------------------------------

def _parse_slurm_time(text: str) -> float | None:
    text = text.strip()
    if not text or text in ("N/A", "Unknown", "NONE"):
        return None
    if re.fullmatch(r"\d+", text):
        return float(text)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def slurm_end_time() -> float | None:
    """The running SLURM job's end time (epoch seconds), or None outside SLURM.

    Newer SLURM exports SLURM_JOB_END_TIME; otherwise ask squeue for the job's end time."""
    if "SLURM_JOB_END_TIME" in os.environ:
        return _parse_slurm_time(os.environ["SLURM_JOB_END_TIME"])
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _parse_slurm_time(out.stdout.splitlines()[0]) if out.returncode == 0 and out.stdout.strip() else None


class WallClock:
    """Tells the loop when to checkpoint and leave: before the job's end minus a safety margin.

    The deadline is the earliest of a configured budget (seconds from start) and the SLURM job's
    end time; with neither, training runs to the end."""

    def __init__(self, budget_s: float | None, margin_s: float, started: float | None = None):
        self.started = time.time() if started is None else started
        deadlines = []
        if budget_s:
            deadlines.append(self.started + budget_s)
        end = slurm_end_time()
        if end is not None:
            deadlines.append(end)
        self.deadline = min(deadlines) if deadlines else None
        self.margin_s = margin_s
        if self.deadline is not None:
            log.info("wall-clock deadline in %.0f s (margin %.0f s)", self.deadline - self.started, margin_s)

    def must_stop(self, seconds_per_step: float) -> bool:
        if self.deadline is None:
            return False
        return time.time() + seconds_per_step + self.margin_s >= self.deadline


# --- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically; it holds only tensors and plain Python values, so it loads
    with torch.load(weights_only=True)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return found[-1] if found else None


def prune_checkpoints(directory: Path, keep: int) -> None:
    found = sorted(directory.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    for old in found[:-keep] if keep > 0 else []:
        old.unlink()
