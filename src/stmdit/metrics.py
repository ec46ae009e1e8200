"""Evaluation metrics of the paper: pure functions on numpy arrays (no files, no models).

FID (Tables 1, 3, 4, 6)
    `fid(real, gen)` on H0-mini features. Tr sqrt(S1 S2) is taken through a symmetric
    eigenproblem: sum sqrt(eig(F^T S2 F)) with S1 = F F^T (Cholesky, or the eigen square root
    when S1 is singular), which stays real and finite for rank-deficient covariances (few
    spots, 768-d), where `scipy.linalg.sqrtm` needs an eps offset, and is ~10x faster than
    sqrtm at 768-d. `fid_bootstrap` gives the point estimate, the bootstrap mean (reported by
    the paper's tables) and a spot-level percentile CI (see its docstring for the exact
    resampling, RNG stream and why the mean sits above the point); `fid_per_label` splits by
    tissue label. Replicates with more spots than dimensions take their covariances from the
    bootstrap multiplicities (`bootstrap_weighted_statistics`), `threads` at once.

Transcriptomic fidelity (Table 2)
    `fit_oracle` (UNI2-h -> PCA -> Ridge per k) and `fit_midnight_mlp` (Midnight -> MLP on every
    gene it is given: the protein-coding genes in the pipeline, paper D.4; sklearn, or the same MLP
    in torch: `stmdit.mlp_torch`) are fitted on REAL train spots (once per cohort in the pipeline);
    `transcriptomic_fidelity` applies one to the features of real and generated TEST tiles and
    scores them against the real test expression:
    - genes are ranked once by variance over the TRAIN spots; the k grid is capped at the number
      of genes (the k actually used are reported);
    - curve[k] = median over the top-k genes of the per-gene Pearson r (over test spots) between
      predicted and real expression; a gene whose prediction or truth is constant gets r = 0;
    - AUC = arithmetic mean of curve[k] over the k grid (every k weighted equally; no trapezoid
      in k), so AUC lies in [-1, 1] and a regressor without information scores 0;
    - the null is 0 by construction and is also measured, as a distribution: the real test
      features' predictions scored against the test expression under `n_perm` random
      permutations of the spot correspondence (`permutation_null`). Its AUC is the mean over
      permutations and its interval their percentiles: what a regressor with no information
      about the spot scores on these test spots. (One fixed shuffle is one draw of that
      distribution; at ~60 test spots its sd is ~0.02, so a single draw at seed 42 read as
      +0.023 / +0.033 and every model's table repeated it.)
    - CIs: percentile bootstrap over test spots (predictions fixed, spots resampled).

Perturbation (Table 5)
    `interpolate_ge` moves a spot's GE embedding linearly toward a class centroid in
    CancerFoundation space; `perturbation_scores` scores the H0-mini features of the images
    generated along alpha (transition, monotonicity, composite; formulas in its docstring);
    `perturbation_summary` gives the median per pair and the three-pair mean.

OOD (Table 3)
    `subsample_keys` (at most 10,000 spots at seed 42), `delta_baseline`, `delta_ood`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from scipy import sparse, stats

from stmdit.errors import InputError

PAPER_KS = (50, 100, 200, 500, 1000)
PAPER_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
PAPER_PAIRS = (("Tumor", "Stroma"), ("Tumor", "Immune"), ("Immune", "Tumor"))


# ---------------------------------------------------------------------------------------------
# Input checks


def as_feature_matrix(features: Any, source: Any = None, name: str = "features", min_rows: int = 2) -> np.ndarray:
    """`features` as a finite float64 (n, d) matrix; InputError naming `source` otherwise."""
    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim != 2:
        raise InputError(source, f"{name}: expected a 2-D (spots, dim) matrix, got shape {matrix.shape}")
    if matrix.shape[0] < min_rows:
        raise InputError(source, f"{name}: needs at least {min_rows} spots, got {matrix.shape[0]}")
    if not np.isfinite(matrix).all():
        raise InputError(source, f"{name}: contains NaN or infinite values")
    return matrix


def _check_same_dim(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise InputError(None, f"{what}: feature dimensions differ ({a.shape[1]} vs {b.shape[1]})")


def _check_paired(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise InputError(
            None,
            f"{what}: paired rows need the same number of spots ({a.shape[0]} vs {b.shape[0]}); "
            "align them by spot key, or use paired=False",
        )


# ---------------------------------------------------------------------------------------------
# FID


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (n - 1)-normalised covariance of (n, d) features, in float64."""
    matrix = as_feature_matrix(features)
    return matrix.mean(axis=0), np.cov(matrix, rowvar=False).reshape(matrix.shape[1], matrix.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (eigenvalues below 0 from rounding set to 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _covariance_factor(sigma: np.ndarray) -> np.ndarray:
    """F with F F^T = sigma: Cholesky when sigma is positive definite (cheap), else the
    symmetric eigen square root (rank-deficient covariances: fewer spots than dimensions)."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        return _psd_sqrt(sigma)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrt(sigma1 @ sigma2) for PSD covariances.

    With sigma1 = F1 F1^T and sigma2 = F2 F2^T, sigma1 sigma2 is similar to the PSD matrix
    F1^T sigma2 F1 = C C^T with C = F1^T F2, so the trace is the sum of the square roots of the
    eigenvalues of C C^T (one triangular product and one symmetric Gram product when both
    factors are Cholesky factors, instead of two general d x d products).
    """
    from scipy.linalg import blas

    try:
        lower1 = np.linalg.cholesky(sigma1)
        factor2 = _covariance_factor(sigma2)
        cross = blas.dtrmm(1.0, lower1, factor2, side=0, lower=1, trans_a=1)  # lower1^T @ factor2
    except np.linalg.LinAlgError:
        cross = _psd_sqrt(sigma1).T @ _covariance_factor(sigma2)
    middle = cross @ cross.T
    eigenvalues = np.linalg.eigvalsh(middle)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr sqrt(S1 S2) between two Gaussians."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise InputError(
            None, f"Frechet distance: shapes do not match (mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape})"
        )
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(distance, 0.0))


def frechet_distance_of_features(real: np.ndarray, gen: np.ndarray) -> float:
    """The Frechet distance of the two sets' Gaussians, computed from the centred features A, B
    instead of their d x d covariances: S1 S2 has the same non-zero eigenvalues as
    (A B^T)(A B^T)^T / ((n-1)(m-1)), so Tr sqrt(S1 S2) is the sum of the singular values of
    A B^T / sqrt((n-1)(m-1)). Exact, and an n x m problem instead of a d x d one."""
    real, gen = np.asarray(real, np.float64), np.asarray(gen, np.float64)
    n, m = len(real), len(gen)
    a, b = real - real.mean(axis=0), gen - gen.mean(axis=0)
    diff = real.mean(axis=0) - gen.mean(axis=0)
    singular_values = np.linalg.svd(a @ b.T / math.sqrt((n - 1) * (m - 1)), compute_uv=False)
    distance = diff @ diff + (a * a).sum() / (n - 1) + (b * b).sum() / (m - 1) - 2.0 * singular_values.sum()
    return float(max(distance, 0.0))


def fid(real_features: np.ndarray, gen_features: np.ndarray) -> float:
    """Frechet Inception-style distance between two feature sets (any dim; H0-mini: 768). With
    fewer spots than dimensions (the demo, per-tissue FID, bootstrap replicates of small test
    sets) it is computed from the features themselves, else from the covariances; both exact."""
    real = as_feature_matrix(real_features, name="real features")
    gen = as_feature_matrix(gen_features, name="generated features")
    _check_same_dim(real, gen, "FID")
    if min(len(real), len(gen)) <= real.shape[1]:
        return frechet_distance_of_features(real, gen)
    return frechet_distance(*feature_statistics(real), *feature_statistics(gen))


def bootstrap_indices(rng: np.random.Generator, n: int) -> np.ndarray:
    """One bootstrap resample of n spot indices (with replacement) from `rng`."""
    return rng.integers(0, n, size=n)


def percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """(alpha/2, 1 - alpha/2) percentiles, numpy's default linear interpolation."""
    lo, hi = np.percentile(np.asarray(values, np.float64), [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def bootstrap_weighted_statistics(features: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (n - 1)-normalised covariance of features[rows] (rows drawn with replacement),
    from the bootstrap multiplicities w = bincount(rows): mean = w X / n and covariance
    = Y^T Y / (n - 1) with Y = sqrt(w) (X - mean) over the spots drawn at least once. Equal to
    `feature_statistics(features[rows])` up to summation order (float rounding); one symmetric
    Gram product (BLAS syrk) of ~63% of the rows instead of a gather and `np.cov`."""
    weights = np.bincount(rows, minlength=len(features))
    drawn = np.flatnonzero(weights)
    counts = weights[drawn].astype(np.float64)
    scaled = features[drawn]  # the one copy, centred and scaled in place
    total = counts.sum()
    mean = counts @ scaled / total
    scaled -= mean
    scaled *= np.sqrt(counts)[:, None]
    return mean, (scaled.T @ scaled) / (total - 1)


@contextlib.contextmanager
def _replicate_pool(threads: int):
    """An executor running `threads` replicates at once, BLAS limited to one thread each."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        yield pool


def _replicate_fid(real: np.ndarray, gen: np.ndarray, real_rows: np.ndarray, gen_rows: np.ndarray) -> float:
    """`fid(real[real_rows], gen[gen_rows])`: with more spots than dimensions through weighted
    covariances (no gathered copy), else (few spots, the feature-space path) through the gather."""
    if min(len(real_rows), len(gen_rows)) <= real.shape[1]:
        return fid(real[real_rows], gen[gen_rows])
    return frechet_distance(*bootstrap_weighted_statistics(real, real_rows),
                            *bootstrap_weighted_statistics(gen, gen_rows))


def fid_bootstrap(
    real: np.ndarray,
    gen: np.ndarray,
    n_boot: int = 1000,
    seed: int = 42,
    alpha: float = 0.05,
    paired: bool = True,
    threads: int = 1,
    keep_replicates: bool = False,
) -> dict[str, Any]:
    """FID with a (1 - alpha) percentile bootstrap CI over spots.

    paired=True (the pipeline's case: row i of `gen` was generated from reference spot i of
    `real`, aligned by spot key): each replicate draws ONE set of n spot indices with
    replacement and takes those rows of both, so a replicate keeps real/generated pairs together.
    paired=False: real and generated rows are resampled independently (real first).
    RNG stream: `numpy.random.default_rng(seed)`; per replicate `rng.integers(0, n, size=n)`
    (paired), or that for real then for generated (unpaired).

    Returns dict(point, mean, lo, hi, n_boot, interval, seed, alpha, paired, n_real, n_gen):
    point = FID on all spots, mean = mean of the replicates (what the paper's tables report),
    [lo, hi] = their percentile interval. A replicate holds each spot 0, 1, 2... times (~37% of
    the spots are missing), which adds estimation noise to its feature means and covariances, and
    FID, a squared distance, grows with that noise: `mean` and the interval sit above `point`
    (with few spots the point can lie below `lo`), while `mean` lies inside the interval unless
    the replicates are extremely skewed. With n_boot=0, mean, lo and hi are None.
    keep_replicates: also return the replicate FIDs under "replicates" (for `replicate_difference`).

    A replicate is exactly `fid(real[real_rows], gen[gen_rows])`, computed without the gathered
    copy when there are more spots than dimensions (`_replicate_fid`). `threads` replicates run at
    once, each on one BLAS thread (numpy releases the GIL), so the values do not depend on it.
    """
    real = as_feature_matrix(real, name="real features")
    gen = as_feature_matrix(gen, name="generated features")
    _check_same_dim(real, gen, "FID bootstrap")
    if paired:
        _check_paired(real, gen, "FID bootstrap")
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    chunk = 4 * max(1, threads)
    with _replicate_pool(threads) as pool:
        for start in range(0, n_boot, chunk):
            draws = []
            for _ in range(min(chunk, n_boot - start)):  # drawn in replicate order: the RNG stream
                real_rows = bootstrap_indices(rng, len(real))
                draws.append((real_rows, real_rows if paired else bootstrap_indices(rng, len(gen))))
            values = pool.map(lambda rows: _replicate_fid(real, gen, *rows), draws)
            replicates[start : start + len(draws)] = list(values)
    lo, hi = percentile_interval(replicates, alpha) if n_boot > 0 else (None, None)
    result = {
        "point": fid(real, gen),
        "mean": float(replicates.mean()) if n_boot > 0 else None,
        "lo": lo,
        "hi": hi,
        "n_boot": int(n_boot),
        "interval": "percentile of the bootstrap replicates (contains 'mean', not necessarily 'point')",
        "seed": int(seed),
        "alpha": float(alpha),
        "paired": bool(paired),
        "n_real": int(len(real)),
        "n_gen": int(len(gen)),
    }
    if keep_replicates:
        result["replicates"] = replicates
    return result


def replicate_difference(a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> dict[str, Any]:
    """FID(a) - FID(b) per bootstrap replicate, from the "replicates" of two paired
    `fid_bootstrap(..., keep_replicates=True)` runs over the same real spots with the same seed:
    replicate i then resamples the same spots for both, so the real spots' sampling noise, shared by
    the two FIDs, cancels. Returns dict(mean, lo, hi, n_boot, alpha): the mean difference and its
    (1 - alpha) percentile interval; hi < 0 says a lies below b on these spots."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"replicate_difference needs two equally long replicate series, got {a.shape} and {b.shape}")
    difference = a - b
    lo, hi = percentile_interval(difference, alpha)
    return {"mean": float(difference.mean()), "lo": lo, "hi": hi, "n_boot": int(len(difference)), "alpha": float(alpha)}


def differences_from(replicates: dict[str, np.ndarray], reference: str, alpha: float = 0.05) -> dict[str, dict]:
    """`replicate_difference` of every named replicate series against `reference`'s ({} without it)."""
    if reference not in replicates:
        return {}
    return {name: replicate_difference(series, replicates[reference], alpha)
            for name, series in replicates.items() if name != reference}


def fid_per_label(
    real: np.ndarray,
    gen: np.ndarray,
    labels: Sequence[Hashable],
    min_spots: int = 50,
    n_boot: int = 0,
    seed: int = 42,
    alpha: float = 0.05,
    threads: int = 1,
) -> dict[str, Any]:
    """FID per tissue label; `real`, `gen` and `labels` are row-aligned by spot key.

    Labels with fewer than `min_spots` spots are skipped and listed with the reason. Returns
    {"labels": {label: fid_bootstrap dict}, "skipped": {label: reason}, "min_spots": int}.
    """
    real = as_feature_matrix(real, name="real features")
    gen = as_feature_matrix(gen, name="generated features")
    _check_paired(real, gen, "per-tissue FID")
    labels = np.asarray(labels).astype(str)
    if labels.shape != (len(real),):
        raise InputError(None, f"per-tissue FID: {labels.shape[0]} labels for {len(real)} spots")
    per_label, skipped = {}, {}
    for label in sorted(set(labels)):
        rows = np.flatnonzero(labels == label)
        if len(rows) < max(min_spots, 2):
            skipped[label] = f"{len(rows)} spots (< {min_spots})"
            continue
        per_label[label] = fid_bootstrap(real[rows], gen[rows], n_boot=n_boot, seed=seed, alpha=alpha,
                                         threads=threads)
    return {"labels": per_label, "skipped": skipped, "min_spots": int(min_spots)}


# ---------------------------------------------------------------------------------------------
# Transcriptomic fidelity


def log1p_cp10k(counts: Any) -> np.ndarray:
    """log1p of counts per 10k (dense or sparse raw counts) as float32; empty spots stay 0."""
    counts = counts.toarray() if sparse.issparse(counts) else np.asarray(counts)
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    scaled = np.divide(counts * 1e4, totals, out=np.zeros_like(counts), where=totals > 0)
    return np.log1p(scaled).astype(np.float32)


VARIANCE_BLOCK_COLUMNS = 1024


def _column_variance(matrix: Any, block_columns: int = VARIANCE_BLOCK_COLUMNS) -> np.ndarray:
    """Per-column variance (E[x^2] - E[x]^2 in float64 for sparse input). Sparse input goes through
    float64 CSC copies of `block_columns` columns at a time, never of the whole matrix; each column's
    sums are the same as from one whole copy."""
    if sparse.issparse(matrix):
        matrix = matrix if matrix.format in ("csr", "csc") else sparse.csr_matrix(matrix)
        variances = [np.empty(0)]
        for start in range(0, matrix.shape[1], block_columns):
            block = sparse.csc_matrix(matrix[:, start : start + block_columns], dtype=np.float64)
            mean = np.asarray(block.mean(axis=0)).ravel()
            variances.append(np.asarray(block.multiply(block).mean(axis=0)).ravel() - mean**2)
        return np.concatenate(variances)
    return np.asarray(matrix, np.float64).var(axis=0)


def rank_genes_by_variance(train_expression: Any) -> np.ndarray:
    """Gene column indices by decreasing variance over the train spots (ties: lower index first)."""
    variance = _column_variance(train_expression)
    return np.argsort(-variance, kind="stable")


def capped_ks(ks: Sequence[int], n_genes: int) -> tuple[int, ...]:
    """The k grid with every k capped at the number of genes (duplicates after capping dropped)."""
    return tuple(dict.fromkeys(min(int(k), n_genes) for k in ks))


def _dense_columns(matrix: Any, columns: np.ndarray) -> np.ndarray:
    selected = matrix[:, columns]
    selected = selected.toarray() if sparse.issparse(selected) else np.asarray(selected)
    return selected.astype(np.float64)


def ridge_alpha(k: int, n_components: int = 256, scale: float = 100.0) -> float:
    """The paper's Ridge penalty for the top-k genes: 100 / (256 k)."""
    return scale / (n_components * k)


@dataclass
class OracleRegressor:
    """UNI2-h features -> PCA -> one Ridge per k on the top-k genes (by train variance)."""

    pca: Any
    ridges: dict[int, Any]
    gene_rank: np.ndarray
    ks: tuple[int, ...]
    name: str = "oracle"

    def predict_by_k(self, features: np.ndarray) -> dict[int, np.ndarray]:
        """k -> (n, k) predictions of genes gene_rank[:k]."""
        projected = self.pca.transform(as_feature_matrix(features, min_rows=1))
        return {k: self.ridges[k].predict(projected).reshape(len(projected), k) for k in self.ks}


@dataclass
class MidnightMLPRegressor:
    """Midnight features -> (standardise) -> MLPRegressor on every given gene; negatives clipped."""

    model: Any
    gene_rank: np.ndarray
    ks: tuple[int, ...]
    name: str = "midnight_mlp"

    def predict_by_k(self, features: np.ndarray, block_rows: int = 2048) -> dict[int, np.ndarray]:
        """k -> (n, k) predictions of genes gene_rank[:k], negatives clipped to 0. Predicted in
        blocks of rows, keeping only the top-max(k) genes: never n x all genes at once."""
        features = as_feature_matrix(features, min_rows=1)
        top = self.gene_rank[: max(self.ks)]
        kept = []
        for start in range(0, len(features), block_rows):
            block = self.model.predict(features[start : start + block_rows])
            kept.append(np.clip(block.reshape(len(block), -1)[:, top], 0.0, None))
        predictions = np.concatenate(kept)
        return {k: predictions[:, :k] for k in self.ks}


def fit_oracle(
    train_features: np.ndarray,
    train_expression: Any,
    ks: Sequence[int] = PAPER_KS,
    n_components: int = 256,
    alpha_scale: float = 100.0,
    seed: int = 0,
) -> OracleRegressor:
    """Fit the Oracle on REAL train spots.

    `train_expression` (n, genes): the HVG expression (log-normalised; dense or sparse), rows
    aligned with `train_features` (UNI2-h, 1536-d). PCA keeps min(n_components, n - 1, dim)
    components; the Ridge for k uses alpha = alpha_scale / (n_components * k) with the requested
    n_components (the paper's 100 / (256 k)).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge

    features = as_feature_matrix(train_features, name="train features", min_rows=3)
    if train_expression.shape[0] != len(features):
        raise InputError(None, f"Oracle: {train_expression.shape[0]} expression rows for {len(features)} feature rows")
    gene_rank = rank_genes_by_variance(train_expression)
    ks = capped_ks(ks, len(gene_rank))
    pca = PCA(n_components=min(n_components, len(features) - 1, features.shape[1]), random_state=seed)
    projected = pca.fit_transform(features)
    ridges = {}
    for k in ks:
        target = _dense_columns(train_expression, gene_rank[:k])
        ridges[k] = Ridge(alpha=ridge_alpha(k, n_components, alpha_scale)).fit(projected, target)
    return OracleRegressor(pca=pca, ridges=ridges, gene_rank=gene_rank, ks=ks)


MLP_IMPLS = ("sklearn", "torch")


def dense_float32(matrix: Any) -> np.ndarray:
    """All of `matrix` as dense float32 (the one allowed dense spots x genes matrix: sklearn's MLP
    targets); the same values as densifying in float64 first, without the float64 copy."""
    dense = matrix.toarray() if sparse.issparse(matrix) else np.asarray(matrix)
    return dense.astype(np.float32, copy=False)


def fit_midnight_mlp(
    train_features: np.ndarray,
    train_expression: Any,
    ks: Sequence[int] = PAPER_KS,
    hidden_layer_sizes: Sequence[int] = (1024, 1024),
    max_iter: int = 200,
    seed: int = 0,
    standardize: bool = True,
    impl: str = "sklearn",
    device: str = "auto",
    **mlp_kwargs: Any,
) -> MidnightMLPRegressor:
    """Fit Midnight+MLP on REAL train spots.

    `train_expression` (n, genes): log1p CP10k (library size over all genes, see `log1p_cp10k`) of
    the genes to regress (the evaluate stage passes the protein-coding ones). Features are
    standardised with the train mean/std first when `standardize` (sklearn's MLP is sensitive
    to feature scale). impl "sklearn" (the paper's, the reference): `MLPRegressor` on dense
    float32 targets, extra keyword arguments go to it. impl "torch": the same network, loss and
    optimiser in torch on `device`, mini-batches densified from sparse targets
    (`stmdit.mlp_torch`; always standardised).
    """
    features = as_feature_matrix(train_features, name="train features", min_rows=3)
    if train_expression.shape[0] != len(features):
        raise InputError(None, f"Midnight+MLP: {train_expression.shape[0]} expression rows for {len(features)} feature rows")
    if impl not in MLP_IMPLS:
        raise InputError(None, f"Midnight+MLP: impl must be one of {list(MLP_IMPLS)}, got {impl!r}")
    gene_rank = rank_genes_by_variance(train_expression)
    if impl == "torch":
        from stmdit.mlp_torch import fit_torch_mlp

        model = fit_torch_mlp(features, train_expression, hidden_layer_sizes, max_iter, seed, device=device,
                              **mlp_kwargs)
        return MidnightMLPRegressor(model=model, gene_rank=gene_rank, ks=capped_ks(ks, len(gene_rank)))

    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = features.astype(np.float32)  # what the MLP is fitted on; the float64 copy is freed before the targets
    target = dense_float32(train_expression)
    mlp = MLPRegressor(hidden_layer_sizes=tuple(hidden_layer_sizes), max_iter=max_iter, random_state=seed, **mlp_kwargs)
    model = make_pipeline(StandardScaler(), mlp) if standardize else mlp
    model.fit(features, target)
    return MidnightMLPRegressor(model=model, gene_rank=gene_rank, ks=capped_ks(ks, len(gene_rank)))


def pearson_per_gene(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r per column (gene) over rows (spots); 0 where either column is constant."""
    predicted = np.asarray(predicted, np.float64)
    true = np.asarray(true, np.float64)
    if predicted.shape != true.shape:
        raise InputError(None, f"Pearson: prediction shape {predicted.shape} != truth shape {true.shape}")
    p = predicted - predicted.mean(axis=0)
    t = true - true.mean(axis=0)
    constant = (np.ptp(predicted, axis=0) == 0) | (np.ptp(true, axis=0) == 0)
    denominator = np.sqrt((p * p).sum(axis=0) * (t * t).sum(axis=0))
    r = np.divide((p * t).sum(axis=0), denominator, out=np.zeros(p.shape[1]), where=~constant & (denominator > 0))
    return np.clip(r, -1.0, 1.0)


def fidelity_curve(predictions: Mapping[int, np.ndarray], true_by_k: Mapping[int, np.ndarray]) -> dict[str, Any]:
    """{"ks", "curve" (median r per k), "auc" (mean of the curve)} from per-k predictions."""
    ks = sorted(predictions)
    curve = [float(np.median(pearson_per_gene(predictions[k], true_by_k[k]))) for k in ks]
    return {"ks": ks, "curve": curve, "auc": float(np.mean(curve))}


class _WeightedPearson:
    """Per-gene Pearson r of row-reweighted data (weights = bootstrap multiplicities).

    A resample's r follows from five weighted column sums, so a batch of replicates is one
    matrix product instead of gathering n x k rows per replicate.
    """

    def __init__(self, predicted: np.ndarray, true: np.ndarray):
        p = np.asarray(predicted, np.float64)
        t = np.asarray(true, np.float64)
        p, t = p - p.mean(axis=0), t - t.mean(axis=0)
        self.k = p.shape[1]
        self.columns = np.hstack([p, t, p * p, t * t, p * t])
        # A resampled column counts as constant when its variance is at rounding level.
        self.var_floor_p = 1e-10 * np.maximum((p * p).mean(axis=0), 1e-300)
        self.var_floor_t = 1e-10 * np.maximum((t * t).mean(axis=0), 1e-300)

    def r(self, weights: np.ndarray) -> np.ndarray:
        """(B, k) Pearson r for B weight vectors (B, n), each summing to n."""
        sums = (weights @ self.columns) / weights.sum(axis=1, keepdims=True)
        m_p, m_t, s_pp, s_tt, s_pt = np.split(sums, 5, axis=1)
        var_p, var_t = s_pp - m_p**2, s_tt - m_t**2
        ok = (var_p > self.var_floor_p) & (var_t > self.var_floor_t)
        r = np.divide(s_pt - m_p * m_t, np.sqrt(np.abs(var_p * var_t)), out=np.zeros_like(var_p), where=ok)
        return np.clip(r, -1.0, 1.0)


def bootstrap_auc(
    predictions: Mapping[int, np.ndarray],
    true_by_k: Mapping[int, np.ndarray],
    n_boot: int = 1000,
    seed: int = 42,
    alpha: float = 0.05,
    batch: int = 100,
    gene_chunk: int = 250,
) -> dict[str, Any]:
    """Percentile CI of the AUC over test spots: predictions fixed, spots resampled.

    RNG stream: `default_rng(seed)`, one `rng.integers(0, n, size=n)` per replicate; replicate b
    is exactly the AUC of rows idx_b of predictions and truth. Memory stays at
    n_boot x n multiplicities plus n x 5 x gene_chunk float64 (~120 MB at 11,776 spots).
    """
    ks = sorted(predictions)
    n = len(next(iter(predictions.values())))
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n), np.float32)
    for b in range(n_boot):
        counts[b] = np.bincount(bootstrap_indices(rng, n), minlength=n)
    medians = np.empty((n_boot, len(ks)))
    for j, k in enumerate(ks):
        r = np.empty((n_boot, k))
        for g in range(0, k, gene_chunk):
            genes = slice(g, min(g + gene_chunk, k))
            scorer = _WeightedPearson(predictions[k][:, genes], true_by_k[k][:, genes])
            for b in range(0, n_boot, batch):
                r[b : b + batch, genes] = scorer.r(counts[b : b + batch].astype(np.float64))
        medians[:, j] = np.median(r, axis=1)
    lo, hi = percentile_interval(medians.mean(axis=1), alpha) if n_boot > 0 else (None, None)
    return {"lo": lo, "hi": hi, "n_boot": int(n_boot), "seed": int(seed), "alpha": float(alpha)}


def _standardised_columns(matrix: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to unit norm; constant columns become 0 (their r is 0, as in
    `pearson_per_gene`)."""
    matrix = np.asarray(matrix, np.float64)
    centred = matrix - matrix.mean(axis=0)
    norm = np.sqrt((centred * centred).sum(axis=0))
    usable = (np.ptp(matrix, axis=0) > 0) & (norm > 0)
    return np.divide(centred, norm, out=np.zeros_like(centred), where=usable)


def permutation_null(
    predictions: Mapping[int, np.ndarray],
    true_by_k: Mapping[int, np.ndarray],
    n_perm: int = 1000,
    seed: int = 42,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The AUC's distribution when predictions carry no information about their spot.

    Each replicate scores the same predictions against the truth with the spot correspondence
    permuted (rows of the predictions reordered), so every marginal (the genes' expression, the
    regressor's output, constant columns) stays as it is and only the pairing is broken. The
    Pearson r of a permutation is exactly `pearson_per_gene(predictions[perm], truth)`.
    RNG stream: `default_rng(seed)`, one `rng.permutation(n)` per replicate.

    Returns {"auc": mean over permutations, "curve": mean per k, "lo", "hi" (percentiles),
    "sd", "n_perm", "seed", "alpha"}.
    """
    if n_perm < 1:
        raise InputError(None, f"permutation null: needs at least one permutation, got {n_perm}")
    ks = sorted(predictions)
    n = len(next(iter(predictions.values())))
    standardised = {k: (_standardised_columns(predictions[k]), _standardised_columns(true_by_k[k])) for k in ks}
    rng = np.random.default_rng(seed)
    medians = np.empty((n_perm, len(ks)))
    for b in range(n_perm):
        order = rng.permutation(n)
        for j, k in enumerate(ks):
            predicted, true = standardised[k]
            medians[b, j] = np.median(np.clip((predicted[order] * true).sum(axis=0), -1.0, 1.0))
    aucs = medians.mean(axis=1)
    lo, hi = percentile_interval(aucs, alpha)
    return {"ks": ks, "curve": medians.mean(axis=0).tolist(), "auc": float(aucs.mean()), "lo": lo, "hi": hi,
            "sd": float(aucs.std(ddof=1)) if n_perm > 1 else 0.0, "n_perm": int(n_perm), "seed": int(seed),
            "alpha": float(alpha)}


def _score_predictions(predictions, true_by_k, n_boot, seed, alpha) -> dict[str, Any]:
    scored = fidelity_curve(predictions, true_by_k)
    scored.update(bootstrap_auc(predictions, true_by_k, n_boot=n_boot, seed=seed, alpha=alpha))
    return scored


def _score_features(regressor, features, true_by_k, n_boot, seed, alpha) -> dict[str, Any]:
    return _score_predictions(regressor.predict_by_k(features), true_by_k, n_boot, seed, alpha)


def transcriptomic_fidelity(
    regressor: OracleRegressor | MidnightMLPRegressor,
    test_expression: Any,
    real_features: np.ndarray,
    generated_features: Mapping[str, np.ndarray],
    n_boot: int = 1000,
    seed: int = 42,
    alpha: float = 0.05,
    n_perm: int = 1000,
    controls: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Score a fitted regressor on test spots (all inputs row-aligned by spot key).

    `test_expression`: real test expression in the space the regressor was fitted on (HVGs for
    the Oracle, log1p CP10k of all genes for Midnight+MLP). `real_features`: encoder features of
    the real test tiles (the ceiling); `generated_features`: regime -> features of the generated
    tiles of the same spots; `controls`: name -> features of tiles without information about
    their spot (e.g. "noise_tiles"), scored like generated tiles and stored under "null".
    Returns the `regressors[name]` entry of auc.json:
    {"ks", "real": {curve, auc, lo, hi, ...}, "generated": {regime: ...},
     "null": {"by_construction": 0.0, "empirical": `permutation_null` of the real features'
     predictions ({curve, auc, lo, hi, sd, n_perm, ...}), "empirical_method",
     control name: {curve, auc, lo, hi, ...}}}.
    """
    real = as_feature_matrix(real_features, name="real test features")
    if test_expression.shape[0] != len(real):
        raise InputError(None, f"fidelity: {test_expression.shape[0]} expression rows for {len(real)} test spots")
    top = _dense_columns(test_expression, regressor.gene_rank[: max(regressor.ks)])
    true_by_k = {k: top[:, :k] for k in regressor.ks}  # views of the top-max(k) genes, not one copy per k

    def score(inputs: Mapping[str, np.ndarray], what: str) -> dict[str, Any]:
        scored = {}
        for name, features in inputs.items():
            features = as_feature_matrix(features, name=f"{what} features ({name})")
            _check_paired(real, features, f"fidelity ({name})")
            scored[name] = _score_features(regressor, features, true_by_k, n_boot, seed, alpha)
            del features  # a lazy mapping (evaluate.GeneratedStores) then holds one store at a time
        return scored

    generated = score(generated_features, "generated")
    real_predictions = regressor.predict_by_k(real)
    return {
        "ks": list(regressor.ks),
        "real": _score_predictions(real_predictions, true_by_k, n_boot, seed, alpha),
        "generated": generated,
        "null": {
            "by_construction": 0.0,
            "empirical": permutation_null(real_predictions, true_by_k, n_perm=n_perm, seed=seed, alpha=alpha),
            "empirical_method": f"predictions of the real test features scored with the spot correspondence "
                                f"permuted, {n_perm} permutations (seed {seed}): mean and percentile interval",
            **score(controls or {}, "control"),
        },
    }


# ---------------------------------------------------------------------------------------------
# Perturbation


def class_centroids(
    embeddings: np.ndarray, labels: Sequence[Hashable], mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Mean embedding per label. Embeddings (n, d) or tokens (n, T, d); with a token mask
    (n, T), each token position is averaged over the spots where it is valid."""
    embeddings = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels).astype(str)
    if len(labels) != len(embeddings):
        raise InputError(None, f"centroids: {len(labels)} labels for {len(embeddings)} spots")
    centroids = {}
    for label in sorted(set(labels)):
        rows = labels == label
        if mask is None:
            centroids[label] = embeddings[rows].mean(axis=0)
        else:
            weights = np.asarray(mask, np.float64)[rows][..., None]
            centroids[label] = (embeddings[rows] * weights).sum(axis=0) / np.maximum(weights.sum(axis=0), 1.0)
    return centroids


def interpolate_ge(source_ge: np.ndarray, target_centroid: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * source + alpha * target, in CancerFoundation space.

    Works for CLS embeddings ((d,) or (n, d) against a (d,) centroid) and for tokens
    ((T, d) or (n, T, d) against a (T, d) centroid): tokens are interpolated position-wise.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(None, f"interpolate_ge: alpha must lie in [0, 1], got {alpha}")
    source = np.asarray(source_ge, np.float64)
    target = np.asarray(target_centroid, np.float64)
    if source.shape[-target.ndim :] != target.shape:
        raise InputError(None, f"interpolate_ge: source shape {source.shape} does not end in centroid shape {target.shape}")
    return (1.0 - alpha) * source + alpha * target


def choose_reference_spots(
    keys: Sequence[str], labels: Sequence[Hashable], source_label: str, n: int = 100, seed: int = 42
) -> list[str]:
    """Up to n spot keys of class `source_label`, drawn without replacement at `seed` (key order kept)."""
    keys = np.asarray(keys).astype(str)
    candidates = np.flatnonzero(np.asarray(labels).astype(str) == str(source_label))
    if len(candidates) > n:
        candidates = np.sort(np.random.default_rng(seed).choice(candidates, size=n, replace=False))
    return keys[candidates].tolist()


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(y) == 0:
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


def perturbation_scores(
    features_by_alpha: np.ndarray,
    alphas: Sequence[float],
    source_centroid: np.ndarray,
    target_centroid: np.ndarray,
    monotonicity_weight: float = 1.0,
) -> dict[str, Any]:
    """Scores of one (source -> target) pair over its reference spots.

    `features_by_alpha` (n_ref, n_alpha, d): H0-mini features of the image generated from each
    reference spot at each alpha (sorted increasing; the paper: 0, .25, .5, .75, 1). With
    x_a the features at alpha a and c_src, c_tgt the H0-mini class centroids, per spot:
      transition   = (||x_first - c_tgt|| - ||x_last - c_tgt||) / ||c_src - c_tgt||
                     (first/last = smallest/largest alpha: the fraction of the source-target
                     centroid distance moved toward the target; 1 = arrived, < 0 = moved away);
      monotonicity = -Spearman(alpha, ||x_a - c_tgt||) (1 = distance falls at every step;
                     0 when the distance is constant);
      composite    = transition + monotonicity_weight * monotonicity.
    Each summary is the median over reference spots of the per-spot value.
    """
    features = np.asarray(features_by_alpha, np.float64)
    alphas = np.asarray(alphas, np.float64)
    if features.ndim != 3 or features.shape[1] != len(alphas):
        raise InputError(None, f"perturbation: expected (n_ref, {len(alphas)}, dim) features, got {features.shape}")
    if len(alphas) < 2 or np.any(np.diff(alphas) <= 0):
        raise InputError(None, f"perturbation: alphas must be at least two increasing values, got {alphas.tolist()}")
    source, target = np.asarray(source_centroid, np.float64), np.asarray(target_centroid, np.float64)
    centroid_distance = float(np.linalg.norm(source - target))
    if centroid_distance == 0:
        raise InputError(None, "perturbation: source and target centroids coincide")
    distance = np.linalg.norm(features - target, axis=2)  # (n_ref, n_alpha)
    transition = (distance[:, 0] - distance[:, -1]) / centroid_distance
    monotonicity = np.array([-_spearman(alphas, row) for row in distance])
    composite = transition + monotonicity_weight * monotonicity
    return {
        "transition": float(np.median(transition)),
        "monotonicity": float(np.median(monotonicity)),
        "composite": float(np.median(composite)),
        "n_ref": int(len(features)),
        "alphas": alphas.tolist(),
        "monotonicity_weight": float(monotonicity_weight),
        "per_spot": {
            "transition": transition.tolist(),
            "monotonicity": monotonicity.tolist(),
            "composite": composite.tolist(),
        },
    }


def pair_label(source: str, target: str) -> str:
    """"Tumor", "Stroma" -> "T->S" (the paper's column names)."""
    return f"{source[:1].upper()}->{target[:1].upper()}"


def perturbation_summary(pair_scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{"pairs": pair_scores, "mean_composite": mean over pairs of the median composites}."""
    if not pair_scores:
        raise InputError(None, "perturbation summary: no pairs")
    return {
        "pairs": dict(pair_scores),
        "mean_composite": float(np.mean([scores["composite"] for scores in pair_scores.values()])),
    }


# ---------------------------------------------------------------------------------------------
# OOD


def subsample_keys(keys: Sequence[str], max_spots: int = 10_000, seed: int = 42) -> list[str]:
    """At most `max_spots` keys drawn without replacement at `seed`, in their original order."""
    keys = np.asarray(keys).astype(str)
    if len(keys) <= max_spots:
        return keys.tolist()
    chosen = np.random.default_rng(seed).choice(len(keys), size=max_spots, replace=False)
    return keys[np.sort(chosen)].tolist()


def delta_baseline(fid_baseline: float, fid_model: float) -> float:
    """Table 3: FID(sampler-matched no-GE baseline) - FID(model); > 0 = the model is better."""
    return float(fid_baseline) - float(fid_model)


def delta_ood(fid_uni: float, fid_uni_ge: float) -> float:
    """Table 3: FID(UNI) - FID(UNI+GE) of one model; > 0 = GE helps out of distribution."""
    return float(fid_uni) - float(fid_uni_ge)
