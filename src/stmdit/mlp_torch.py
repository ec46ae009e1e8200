"""The Midnight+MLP regressor in torch: sklearn's MLPRegressor (the reference, paper D.4) rebuilt
for a GPU, streaming mini-batches from sparse targets instead of one dense spots x genes matrix.

Same as `sklearn.neural_network.MLPRegressor(hidden_layer_sizes, max_iter, random_state)` with
its defaults (the pipeline's call):
- ReLU hidden layers, identity output; Glorot-uniform weights and biases, bound
  sqrt(6 / (fan_in + fan_out));
- loss per mini-batch: mean over spots and genes of (y - p)^2 / 2, plus alpha / 2 x sum of the
  squared weights (not biases) / batch rows;
- Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8), batch_size min(200, n), rows shuffled every epoch;
- an epoch's loss is the row-weighted mean of its batch losses; training stops after max_iter
  epochs, or when the loss has not fallen by more than tol (1e-4) below the best for more than
  n_iter_no_change (10) epochs in a row.
The features are standardised with the train mean and std first (sklearn's StandardScaler in
the pipeline). Not bit-identical to sklearn (other random streams, float32 on the device).

The fitted model is a `NumpyMLP`: plain float32 arrays, predicting without torch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


@dataclass
class NumpyMLP:
    """Standardise, then ReLU layers and a linear output: predictions in float32 with numpy."""

    mean: np.ndarray
    scale: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    n_iter: int = 0
    loss_curve: list[float] | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        hidden = (np.asarray(features, np.float32) - self.mean) / self.scale
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = hidden @ weight + bias
            if layer < len(self.weights) - 1:
                np.maximum(hidden, 0.0, out=hidden)
        return hidden


def resolve_device(device: str) -> str:
    import torch

    from stmdit.errors import InputError

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(None, f"Midnight+MLP: device {device!r} asked for, but torch sees no CUDA device "
                               "(set evaluate.midnight_mlp.device to auto or cpu)")
    return device


def fit_torch_mlp(
    features: np.ndarray,
    target: Any,
    hidden_layer_sizes: Sequence[int] = (1024, 1024),
    max_iter: int = 200,
    seed: int = 0,
    *,
    alpha: float = 1e-4,
    batch_size: int = 200,
    learning_rate: float = 1e-3,
    tol: float = 1e-4,
    n_iter_no_change: int = 10,
    device: str = "auto",
) -> NumpyMLP:
    """Fit on (n, d) features and (n, genes) targets (scipy sparse or dense); each mini-batch of
    target rows is densified on its own (batch x genes float32)."""
    import torch

    device = resolve_device(device)
    features = np.asarray(features, np.float32)
    target = sp.csr_matrix(target, dtype=np.float32) if sp.issparse(target) else np.asarray(target, np.float32)
    n, n_out = target.shape
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale == 0] = 1.0  # StandardScaler leaves constant features unscaled
    x_all = torch.from_numpy((features - mean) / scale).to(device)

    generator = torch.Generator().manual_seed(seed)
    sizes = [features.shape[1], *hidden_layer_sizes, n_out]
    weights, biases = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weights.append(((torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound).to(device).requires_grad_())
        biases.append(((torch.rand(fan_out, generator=generator) * 2 - 1) * bound).to(device).requires_grad_())
    optimiser = torch.optim.Adam([*weights, *biases], lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
    batch = max(1, min(batch_size, n))

    def target_rows(rows: np.ndarray) -> torch.Tensor:
        block = target[rows]
        block = block.toarray() if sp.issparse(block) else block
        return torch.from_numpy(np.ascontiguousarray(block, np.float32)).to(device, non_blocking=True)

    best, stalled, curve = math.inf, 0, []
    started = time.perf_counter()
    order_rng = np.random.default_rng(seed)
    for epoch in range(max_iter):
        order = order_rng.permutation(n)
        total = 0.0
        for start in range(0, n, batch):
            rows = order[start : start + batch]
            hidden = x_all[torch.from_numpy(rows).to(device)]
            for layer, (weight, bias) in enumerate(zip(weights, biases)):
                hidden = hidden @ weight + bias
                if layer < len(weights) - 1:
                    hidden = torch.relu(hidden)
            penalty = sum((w * w).sum() for w in weights)
            loss = ((target_rows(rows) - hidden) ** 2).mean() / 2 + alpha / 2 * penalty / len(rows)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
        epoch_loss = total / n
        curve.append(epoch_loss)
        stalled = stalled + 1 if epoch_loss > best - tol else 0
        best = min(best, epoch_loss)
        log.info("torch MLP epoch %d: loss %.6f (%.1f s)", epoch + 1, epoch_loss, time.perf_counter() - started)
        if stalled > n_iter_no_change:
            break
    return NumpyMLP(mean=mean, scale=scale.astype(np.float32),
                    weights=[w.detach().cpu().numpy() for w in weights],
                    biases=[b.detach().cpu().numpy() for b in biases], n_iter=len(curve), loss_curve=curve)
