"""Train one STMDiT model from the feature stores (paper 2.2, Appendix C).

    stmdit train --settings '<json>' --split results/splits/demo.parquet
        --latents results/features/demo/sd3_vae.zarr --uni results/features/demo/uni2h.zarr
        [--ge results/features/demo/cancerfoundation.zarr] --out-dir results/models/NAME

`--settings` is the resolved model entry of config.yaml (see `TrainSettings`): the architecture, the
objective, the modality-dropout p and the optimisation settings. Everything a step does is a
function of (settings, step): the epoch's shuffle comes from (seed, epoch), each sample's noise,
timestep and dropout draws from (seed, step, spot key). So a run that stops (wall-clock budget,
SIGKILL) and restarts from its last checkpoint replays exactly the steps an uninterrupted run takes.

The budget is `steps` optimizer steps, or `epochs` passes over the train split (the paper trains
"up to 1,000 epochs", D.2), converted to ceil(epochs x steps per epoch) with steps per epoch =
train spots // effective batch (~723 in the paper).

Outputs in `--out-dir`: `training.json` (resolved settings, the budget in steps, provenance), `train_log.csv` (one row
per logged step), `checkpoints/step_N.pt` (model, EMA, optimizer, schedule, RNG, step), and, only
when the configured number of steps is reached, `config.json` + `ema.safetensors` (EMA weights,
the ones every later stage uses). A run that reaches its wall-clock budget saves a checkpoint and
exits with status 75 (EX_TEMPFAIL) so that Snakemake's `retries` resubmit it.

With `--nproc N` > 1 (several GPUs, or gloo processes on CPU) the command relaunches itself through
torchrun and trains with DistributedDataParallel: each rank takes an equal share of every
micro-batch, so the effective batch, and up to float rounding the result, are those of one process.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stmdit.errors import InputError
from stmdit.features import open_feature_store
from stmdit.ge_inputs import GeTokenSource, encoder_identity
from stmdit.loader import SpotFeatures
from stmdit.loss_floors import gaussian_loss, moment_loss, trivial_loss
from stmdit.model import DiTConfig, STMDiT, draw_spot_randomness, get_objective
from stmdit.model.dit import EMA_WEIGHTS_FILE
from stmdit.provenance import atomic_path, params_hash, provenance, write_json
from stmdit.split_table import TRAIN, VAL, split_keys
from stmdit.train_utils import (
    Ema,
    WallClock,
    latest_checkpoint,
    load_checkpoint,
    lr_factor,
    prune_checkpoints,
    keyed_seed,
    save_checkpoint,
)

log = logging.getLogger(__name__)

EXIT_RESUBMIT = 75  # EX_TEMPFAIL: stopped for the wall clock, resume in a new job
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "val_loss"]
STALL_FRACTION = 0.5  # stalled: still above moment_loss + this x (trivial_loss - moment_loss) at the end


@dataclass
class TrainSettings:
    """One model's training run. Defaults are the paper's (Appendix C)."""

    arch: dict = field(default_factory=dict)  # DiTConfig fields (B size when empty)
    objective: str = "ddpm"  # ddpm | flow
    p_drop: float = 0.1  # modality dropout of UNI and of GE, each independently
    steps: int = 100_000  # optimizer steps (ignored when `epochs` is set)
    epochs: float | None = None  # budget in passes over the train split: steps = ceil(epochs x steps/epoch)
    micro_batch: int = 32
    accumulation: int = 4  # effective batch = micro_batch x accumulation (x processes)
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    final_lr_fraction: float = 0.1
    grad_clip: float = 0.01
    ema_decay: float = 0.9999
    seed: int = 0
    log_every: int = 10
    val_every: int = 1000
    val_max_spots: int = 2048
    checkpoint_every: int = 1000
    keep_checkpoints: int = 1
    bf16: bool = True  # bf16 autocast on CUDA
    compile: bool = True  # torch.compile on CUDA
    compile_on_cpu: bool = False  # also compile on CPU (tests; slow to compile)
    device: str = "auto"  # auto | cpu | cuda
    budget_s: float | None = None  # wall-clock budget of one job; SLURM's end time is used too
    margin_s: float = 120.0  # checkpoint this long before the deadline
    loader_prefetch: int = 4
    tokens_in_memory_gb: float = 16.0  # GE tokens of the train split read into RAM when they fit

    @classmethod
    def from_json(cls, text: str) -> "TrainSettings":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}")
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    @property
    def model_config(self) -> DiTConfig:
        return DiTConfig.from_dict(self.arch)


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, "device cuda requested but no GPU is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def total_steps(settings: TrainSettings, steps_per_epoch: int) -> int:
    """The run's optimizer steps: `epochs` x steps per epoch (rounded up) when epochs is set, else `steps`."""
    if settings.epochs is None:
        return settings.steps
    if settings.epochs <= 0:
        raise InputError(None, f"training setting epochs must be positive, got {settings.epochs}")
    return max(1, math.ceil(settings.epochs * steps_per_epoch))


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(keyed_seed(seed, "epoch", epoch)).permutation(n)


class Trainer:
    def __init__(self, settings: TrainSettings, split: Path, latents: Path, uni: Path, ge: Path | None, out_dir: Path):
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.device = resolve_device(settings.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.config = settings.model_config
        if self.config.uses_ge and ge is None:
            raise InputError(None, f"model with ge_fusion={self.config.ge_fusion!r} needs a GE store (--ge)")
        ge_store = ge if self.config.uses_ge else None
        self.train_data = SpotFeatures(split_keys(split, TRAIN), latents, uni, ge_store, self.config.uses_ge_tokens,
                                       settings.tokens_in_memory_gb)
        val_keys = split_keys(split, VAL)[: settings.val_max_spots]
        self.val_data = SpotFeatures(val_keys, latents, uni, ge_store, self.config.uses_ge_tokens)
        self.ge_source = None  # encodes the GE bins of a batch into tokens on the device
        self.ge_encoder = None  # identity of the GE store's encoder, kept in training.json
        if ge_store is not None:
            if self.train_data.ge_bins is not None:
                self.ge_source = GeTokenSource(ge_store, self.device)
                self.ge_encoder = self.ge_source.identity
            else:
                self.ge_encoder = encoder_identity(open_feature_store(ge_store).attrs.get("encoder"))
        self.per_step = settings.micro_batch * settings.accumulation * self.dist.world
        if len(self.train_data) < self.per_step:
            raise InputError(split, f"{len(self.train_data)} train spots, fewer than one effective batch "
                                    f"({self.per_step}); lower micro_batch or accumulation")
        self.steps_per_epoch = len(self.train_data) // self.per_step
        self.total_steps = total_steps(settings, self.steps_per_epoch)
        self.objective = get_objective(settings.objective)
        self.latent_shape = tuple(self.train_data.latents.shape[1:])

        torch.manual_seed(settings.seed)
        self.model = STMDiT(self.config).to(self.device)
        self.ema = Ema(self.model, settings.ema_decay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, betas=settings.betas,
                                           weight_decay=settings.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, settings.warmup_steps, self.total_steps, settings.final_lr_fraction))
        self.step = 0
        self.forward_model = self._wrap(self.model)
        self.autocast = torch.bfloat16 if settings.bf16 and self.device.type == "cuda" else None
        log.info("model %s: %.2fM parameters, %s objective, p_drop %.2f, device %s, %d process(es)",
                 self.config.ge_fusion + (f"/{self.config.ge_tokens}" if self.config.ge_tokens else ""),
                 sum(p.numel() for p in self.model.parameters()) / 1e6, settings.objective, settings.p_drop,
                 self.device, self.dist.world)
        log.info("%d train spots, %d val spots; effective batch %d (%d x %d x %d); %d steps/epoch; %d steps",
                 len(self.train_data), len(self.val_data), self.per_step, settings.micro_batch, settings.accumulation,
                 self.dist.world, self.steps_per_epoch, self.total_steps)
        if settings.epochs is not None:
            log.info("budget: %g epochs x %d steps/epoch = %d steps", settings.epochs, self.steps_per_epoch,
                     self.total_steps)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        wrapped = model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.settings.compile and (self.device.type == "cuda" or self.settings.compile_on_cpu):
            log.info("torch.compile on %s", self.device)
            wrapped = torch.compile(wrapped)
        return wrapped

    # --- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        """Checkpoints of these settings: a changed setting (Snakemake reruns the job) starts afresh
        instead of resuming from a run it does not belong to."""
        return self.out_dir / "checkpoints" / resume_key(self.settings)

    def state(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "settings": json.dumps(dataclasses.asdict(self.settings)),
        }

    def save(self) -> None:
        if self.dist.main:
            save_checkpoint(self.checkpoint_dir / f"step_{self.step}.pt", self.state())
            prune_checkpoints(self.checkpoint_dir, self.settings.keep_checkpoints)
            log.info("checkpoint at step %d", self.step)

    def resume(self) -> None:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return
        state = load_checkpoint(path)
        saved = json.loads(state["settings"])
        current = json.loads(json.dumps(dataclasses.asdict(self.settings)))
        changed = {k for k in current if k not in ("budget_s", "margin_s", "device") and saved.get(k) != current[k]}
        if changed:
            raise InputError(path, f"checkpoint was made with other settings ({sorted(changed)}); "
                                   "delete the model's folder to start again")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)

    # --- one optimizer step ----------------------------------------------------------------------

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """This rank's dataset positions for each micro-batch of optimizer step `step`."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = epoch_order(self.settings.seed, epoch, len(self.train_data))  # cached per epoch
        chunk = order[position * self.per_step:(position + 1) * self.per_step]
        micro = self.settings.micro_batch * self.dist.world
        return [chunk[i * micro:(i + 1) * micro][self.dist.rank::self.dist.world]
                for i in range(self.settings.accumulation)]

    def batches_from(self, step: int):
        """(positions, batches) of every optimizer step from `step` on, read ahead on threads one
        epoch at a time."""
        while step < self.total_steps:
            epoch_end = min((step // self.steps_per_epoch + 1) * self.steps_per_epoch, self.total_steps)
            plans = [self.micro_batches(s) for s in range(step, epoch_end)]
            flat = [rows for plan in plans for rows in plan]
            stream = self.train_data.iterate(flat, prefetch=self.settings.loader_prefetch * self.settings.accumulation)
            for plan in plans:
                yield plan, [next(stream) for _ in plan]
            step = epoch_end

    def to_device(self, batch: dict) -> dict:
        return {
            "latent": batch["latent"].to(self.device, non_blocking=True),
            "uni": batch["uni"].to(self.device, non_blocking=True),
            "ge": None if batch["ge"] is None else self.complete_ge(batch["ge"].to(self.device)),
        }

    def complete_ge(self, ge):
        return ge if self.ge_source is None else self.ge_source.complete(ge)

    def train_step(self, batches: list[dict], positions: list[np.ndarray]) -> tuple[float, float, float]:
        """One optimizer step; returns (loss, grad norm before clipping, lr used)."""
        self.model.train()
        lr = self.schedule.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, (batch, rows) in enumerate(zip(batches, positions)):
            keys = [self.train_data.keys[r] for r in rows]
            draws = draw_spot_randomness(keys, seed=self.settings.seed, step=self.step,
                                           latent_shape=self.latent_shape, p_drop_uni=self.settings.p_drop)
            last = i == len(batches) - 1
            sync = contextlib.nullcontext() if last or self.dist.world == 1 else self.forward_model.no_sync()
            with sync:
                loss = self.objective.loss(self.forward_model, self.to_device(batch), draws, self.autocast)
                (loss / self.settings.accumulation).backward()
            total += loss.item() / self.settings.accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.ema.update(self.model)
        self.step += 1
        if self.dist.world > 1:
            import torch.distributed as dist

            reduced = torch.tensor([total], device=self.device)
            dist.all_reduce(reduced)
            total = reduced.item() / self.dist.world
        return total, float(grad_norm), lr

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Loss of the EMA weights on the val split, with fixed draws and no modality dropout."""
        model = STMDiT(self.config).to(self.device)
        model.load_state_dict(self.model.state_dict())
        self.ema.copy_to(model)
        model.eval()
        losses, counts = [], []
        size = self.settings.micro_batch
        for start in range(0, len(self.val_data), size):
            rows = np.arange(start, min(start + size, len(self.val_data)))
            draws = draw_spot_randomness([self.val_data.keys[r] for r in rows], seed=self.settings.seed,
                                           step=-1, latent_shape=self.latent_shape, p_drop_uni=0.0)
            loss = self.objective.loss(model, self.to_device(self.val_data.batch(rows)), draws, self.autocast)
            losses.append(loss.item() * len(rows))
            counts.append(len(rows))
        return sum(losses) / sum(counts)

    # --- the loop --------------------------------------------------------------------------------

    def run(self, clock: WallClock, stop_after: int | None = None) -> bool:
        """Train until `total_steps`; True when done, False when stopped for the wall clock."""
        from tqdm import tqdm

        self.resume()
        log_path = self.out_dir / "train_log.csv"
        if self.dist.main:
            truncate_log(log_path, self.step)
        started_steps, seconds_per_step, run_steps = self.step, 0.0, 0
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                        disable=not self.dist.main, mininterval=5)
        for plan, batches in self.batches_from(self.step):
            tick = time.perf_counter()
            loss, grad_norm, lr = self.train_step(batches, plan)
            elapsed = time.perf_counter() - tick
            seconds_per_step = elapsed if run_steps == 0 else 0.9 * seconds_per_step + 0.1 * elapsed
            run_steps += 1
            progress.update(1)
            if not math.isfinite(loss):
                raise RuntimeError(f"loss is {loss} at step {self.step}; lower lr or check the feature stores")
            done = self.step == self.total_steps
            row = None
            if self.step % self.settings.log_every == 0 or done or self.step == started_steps + 1:
                row = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch, "loss": loss,
                       "lr": lr, "grad_norm": grad_norm,
                       "samples_per_s": self.per_step / max(elapsed, 1e-9), "val_loss": ""}
                row.update(self.model.condition_norms())
            if self.step % self.settings.val_every == 0 or done:
                row = row or {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch}
                row["val_loss"] = self.validation_loss()
                log.info("step %d: val loss %.5f", self.step, row["val_loss"])
            if row is not None and self.dist.main:
                append_log(log_path, row)
            if done:
                break
            if self.step % self.settings.checkpoint_every == 0:
                self.save()
            leave = clock.must_stop(seconds_per_step) or (stop_after is not None and run_steps >= stop_after)
            if self.agree(leave or self.terminate_requested):
                self.save()
                progress.close()
                return False
        progress.close()
        if self.dist.main:
            self.save()
            self.write_final()
        return True

    terminate_requested = False

    def on_terminate(self, signum, frame) -> None:
        """SIGTERM (SLURM's time limit, scancel, preemption): checkpoint after the current step."""
        log.warning("received signal %d: checkpoint after this step and exit", signum)
        self.terminate_requested = True

    def agree(self, flag: bool) -> bool:
        """True when any process wants to stop, so all ranks stop at the same step."""
        if self.dist.world == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def write_final(self) -> None:
        ema_state = {name: self.ema.shadow[name].to(p.dtype) if name in self.ema.shadow else p
                     for name, p in self.model.state_dict().items()}
        # config.json first, ema.safetensors last: the weights' presence marks a finished model
        self.model.save_pretrained(self.out_dir, weights_name=EMA_WEIGHTS_FILE, state_dict=ema_state)
        log.info("wrote %s", self.out_dir / EMA_WEIGHTS_FILE)


def resume_key(settings: TrainSettings) -> str:
    """Hash of the settings that shape the weights (not budget, margin or device)."""
    values = dataclasses.asdict(settings)
    for name in ("budget_s", "margin_s", "device"):
        values.pop(name)
    return params_hash(values)


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows after `step` (a resumed run repeats the steps after its checkpoint)."""
    if not path.exists():
        return
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    kept = [r for r in rows if int(r["step"]) <= step]
    columns = list(rows[0].keys()) if rows else LOG_COLUMNS
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)


def append_log(path: Path, row: dict) -> None:
    exists = path.exists()
    if exists:
        with open(path) as fh:
            columns = next(csv.reader(fh))
    else:
        columns = LOG_COLUMNS + sorted(k for k in row if k not in LOG_COLUMNS)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        if not exists:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def train(settings: TrainSettings, split: Path, latents: Path, uni: Path, ge: Path | None, out_dir: Path,
          stop_after: int | None = None) -> bool:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(settings, split, latents, uni, ge, out_dir)
    if trainer.dist.main:
        inputs = [split, latents, uni] + ([ge] if ge is not None else [])
        write_json(out_dir / "training.json", {
            "settings": dataclasses.asdict(settings),
            "model_config": trainer.config.to_dict(),
            "processes": trainer.dist.world,
            "ge_encoder": trainer.ge_encoder,
            "budget": {"epochs": settings.epochs, "steps_per_epoch": trainer.steps_per_epoch,
                       "total_steps": trainer.total_steps, "train_spots": len(trainer.train_data),
                       "effective_batch": trainer.per_step},
            "provenance": provenance("train", dataclasses.asdict(settings), inputs),
        })
    clock = WallClock(settings.budget_s, settings.margin_s)
    previous = signal.signal(signal.SIGTERM, trainer.on_terminate)
    try:
        finished = trainer.run(clock, stop_after)
        if finished and trainer.dist.main:
            record_loss_check(out_dir / "training.json", loss_check(
                out_dir / "train_log.csv", settings.objective, trainer.train_data.latents, trainer.config))
        return finished
    finally:
        signal.signal(signal.SIGTERM, previous)
        if trainer.dist.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def loss_check(log_path: Path, objective: str, latents: np.ndarray, config: DiTConfig) -> dict:
    """Whether the finished run's loss stalled near the trivial floor: the mean training loss of the
    last quarter of the logged steps is still above the midpoint between the trivial loss
    (predicting the mean) and the per-element-moment loss (`moment_loss`), i.e. the model has not
    gone half the way to what per-element statistics alone give. A bottlenecked size stalls at
    ~1 - hidden / (p^2 C) of the epsilon loss, reported too. Also the loss of the exact denoiser of
    a Gaussian with the latents' channel covariance and spatial spectrum (`gaussian_loss`), and
    whether the final validation loss (training loss without validation) is still above it: then
    the model's samples are filtered noise in the data's colours, without shapes."""
    with open(log_path) as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["loss"]) for r in rows if r.get("loss") not in (None, "")]
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss") not in (None, "")]
    recent = losses[-max(1, len(losses) // 4):] if losses else []
    final = float(np.mean(recent)) if recent else float("nan")
    trivial, moments = trivial_loss(objective, latents), moment_loss(objective, latents)
    threshold = moments + STALL_FRACTION * (trivial - moments)
    gaussian = gaussian_loss(objective, latents)
    reached = val[-1] if val else final
    per_token = config.patch_size**2 * config.in_channels
    check = {
        "trivial_loss": trivial,
        "moment_loss": moments,
        "gaussian_loss": gaussian,
        "stall_threshold": threshold,
        "final_train_loss": final,
        "final_val_loss": val[-1] if val else None,
        "ratio": final / trivial,
        "stalled": bool(final > threshold),
        "above_gaussian": bool(reached > gaussian),
        "bottleneck_floor": (1 - config.hidden_size / per_token) if config.hidden_size < per_token else None,
    }
    if check["stalled"]:
        hint = (f"; the size is bottlenecked (hidden {config.hidden_size} < {per_token} values per token, "
                f"epsilon floor ~{check['bottleneck_floor']:.2f})" if check["bottleneck_floor"] is not None else "")
        log.warning("WARNING: the loss stalled near the trivial floor: final training loss %.4f is %.0f%% of %.4f, "
                    "the loss of predicting the mean (stall threshold %.4f, per-element-moment loss %.4f)%s. "
                    "The model has not learned its data: check the size, lr, steps and the feature stores.",
                    final, 100 * check["ratio"], trivial, threshold, moments, hint)
    else:
        log.info("final training loss %.4f = %.0f%% of the trivial loss %.4f (stall threshold %.4f)", final,
                 100 * check["ratio"], trivial, threshold)
    which = "validation" if val else "training"
    if check["above_gaussian"]:
        log.info("the final %s loss %.4f is above %.4f, the loss of the exact denoiser of a Gaussian with the "
                 "latents' channel covariance and spatial spectrum: the model has not yet learned the data's "
                 "second-order structure, and its samples will be filtered noise in the data's colours, without "
                 "shapes (train longer)", which, reached, gaussian)
    else:
        log.info("the final %s loss %.4f is below %.4f, the loss of the exact denoiser of a Gaussian with the "
                 "latents' channel covariance and spatial spectrum", which, reached, gaussian)
    return check


def record_loss_check(training_json: Path, check: dict) -> None:
    document = json.loads(Path(training_json).read_text())
    document["loss_check"] = check
    write_json(training_json, document)


def drop_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def relaunch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command under torchrun with `nproc` processes on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stmdit", *argv]
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd).returncode


def run(args: argparse.Namespace) -> None:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        argv = drop_option(sys.argv[1:], "--nproc")  # torchrun would take it as its own
        code = relaunch_with_torchrun(args.nproc, argv)
        if code:
            raise SystemExit(code)
        return
    try:
        settings = TrainSettings.from_json(args.settings)
        settings.model_config  # validate the architecture before reading any data
    except (ValueError, TypeError) as exc:
        raise InputError(None, f"--settings: {exc}") from None
    finished = train(settings, args.split, args.latents, args.uni, args.ge, args.out_dir, args.stop_after)
    if not finished:
        log.warning("stopped at the wall-clock budget; exit %d so the job is resubmitted and resumes", EXIT_RESUBMIT)
        raise SystemExit(EXIT_RESUBMIT)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train one STMDiT model (resumable)")
    p.add_argument("--settings", required=True, help="JSON of TrainSettings (the model's resolved config entry)")
    p.add_argument("--split", type=Path, required=True)
    p.add_argument("--latents", type=Path, required=True, help="sd3_vae feature store")
    p.add_argument("--uni", type=Path, required=True, help="uni2h feature store")
    p.add_argument("--ge", type=Path, default=None, help="cancerfoundation(_ptpl) feature store (GE models)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs); > 1 relaunches under torchrun with DDP")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave after this many steps in this run, as a wall-clock stop would (for tests)")
    p.set_defaults(func=run)
