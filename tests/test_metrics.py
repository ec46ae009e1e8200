"""Evaluation metrics against independent computations and constructed known answers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy import sparse, stats

from stmdit import metrics
from stmdit.errors import InputError

torch.set_num_threads(1)


def correlated_features(rng, n, dim, shift=0.0):
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + shift


# ---------------------------------------------------------------------------------------------
# FID


def fid_via_sqrtm(real, gen):
    """The classic formula with scipy's general matrix square root of S1 S2."""
    mu1, mu2 = real.mean(0), gen.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid_via_torch_eigvals(real, gen):
    """Tr sqrt(S1 S2) from the (complex) eigenvalues of the non-symmetric product, in torch."""
    r, g = torch.from_numpy(real), torch.from_numpy(gen)
    s1, s2 = torch.cov(r.T), torch.cov(g.T)
    trace_sqrt = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return float(((r.mean(0) - g.mean(0)) ** 2).sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)


def test_fid_agrees_with_independent_computations():
    rng = np.random.default_rng(0)
    real = correlated_features(rng, 400, 12)
    gen = correlated_features(rng, 300, 12, shift=0.3)
    value = metrics.fid(real, gen)
    assert value > 0.1
    assert value == pytest.approx(fid_via_sqrtm(real, gen), rel=1e-6)
    assert value == pytest.approx(fid_via_torch_eigvals(real, gen), rel=1e-6)


def test_frechet_distance_known_answers():
    mu1, mu2 = np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 1.0])
    sigma = np.diag([1.0, 4.0, 9.0])
    assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(1 + 4 + 4)
    # Diagonal covariances: sum (sqrt a - sqrt b)^2.
    assert metrics.frechet_distance(mu2, np.diag([1.0, 4.0, 9.0]), mu2, np.diag([4.0, 1.0, 1.0])) == pytest.approx(1 + 1 + 4)
    # Singular covariances (the non-Cholesky path): (1 - 2)^2 + (0 - 1)^2 + (2 - 0)^2.
    assert metrics.frechet_distance(mu2, np.diag([1.0, 0.0, 4.0]), mu2, np.diag([4.0, 1.0, 0.0])) == pytest.approx(6.0)


def test_fid_rank_deficient_is_finite_and_zero_on_itself():
    rng = np.random.default_rng(1)
    few = rng.normal(size=(10, 64))  # fewer spots than dimensions
    assert metrics.fid(few, few) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(metrics.fid(few, rng.normal(size=(12, 64))))


def test_fid_rejects_bad_features():
    with pytest.raises(InputError, match="NaN"):
        metrics.fid(np.full((5, 3), np.nan), np.zeros((5, 3)))
    with pytest.raises(InputError, match="dimensions differ"):
        metrics.fid(np.zeros((5, 3)), np.zeros((5, 4)))


@pytest.mark.parametrize("paired", [True, False])
def test_fid_bootstrap_matches_direct_reimplementation(paired):
    rng = np.random.default_rng(2)
    real = correlated_features(rng, 60, 5)
    gen = correlated_features(rng, 60, 5, shift=0.5)
    result = metrics.fid_bootstrap(real, gen, n_boot=40, seed=7, alpha=0.1, paired=paired)

    stream = np.random.default_rng(7)
    values = []
    for _ in range(40):
        i = stream.integers(0, 60, size=60)
        j = i if paired else stream.integers(0, 60, size=60)
        values.append(fid_via_sqrtm(real[i], gen[j]))
    lo, hi = np.percentile(values, [5, 95])
    assert result["lo"] == pytest.approx(lo, rel=1e-6)
    assert result["hi"] == pytest.approx(hi, rel=1e-6)
    assert result["point"] == pytest.approx(fid_via_sqrtm(real, gen), rel=1e-6)
    assert result["mean"] == pytest.approx(np.mean(values), rel=1e-6)
    assert (result["n_boot"], result["seed"], result["paired"], result["n_real"]) == (40, 7, paired, 60)


def test_fid_bootstrap_mean_lies_in_its_interval_where_the_point_does_not():
    # Few spots in many dimensions (the demo's case): duplicated spots inflate every replicate's FID.
    rng = np.random.default_rng(5)
    real, gen = correlated_features(rng, 40, 30), correlated_features(rng, 40, 30, shift=0.2)
    result = metrics.fid_bootstrap(real, gen, n_boot=50, seed=42)
    assert result["point"] < result["lo"]  # the percentile interval misses the point estimate ...
    assert result["lo"] <= result["mean"] <= result["hi"]  # ... and covers the bootstrap mean
    assert metrics.fid_bootstrap(real, gen, n_boot=0)["mean"] is None


def test_the_paired_difference_sees_a_gap_the_marginal_intervals_do_not_and_none_where_there_is_none():
    # The real spots' resampling moves both FIDs together; differencing per replicate cancels it.
    rng = np.random.default_rng(9)
    real = correlated_features(rng, 120, 8)
    closer, farther = real + rng.normal(0, 0.6, real.shape), real + rng.normal(0, 0.6, real.shape) + 0.15
    boot = {name: metrics.fid_bootstrap(real, gen, n_boot=200, seed=3, keep_replicates=True)
            for name, gen in {"closer": closer, "farther": farther, "same": closer.copy(),
                              "twin": real + rng.normal(0, 0.6, real.shape)}.items()}
    assert boot["closer"]["hi"] > boot["farther"]["lo"]  # the marginal intervals overlap ...
    gap = metrics.replicate_difference(boot["closer"]["replicates"], boot["farther"]["replicates"])
    assert gap["hi"] < 0  # ... the paired difference lies below 0
    assert gap["lo"] <= gap["mean"] <= gap["hi"]
    replicates = {name: entry["replicates"] for name, entry in boot.items()}
    differences = metrics.differences_from(replicates, "closer")
    assert set(differences) == {"farther", "same", "twin"}
    assert differences["same"]["lo"] == differences["same"]["hi"] == 0.0  # identical tiles: no difference
    assert differences["twin"]["lo"] < 0 < differences["twin"]["hi"]  # another draw of the same kind
    assert metrics.differences_from(replicates, "uncond") == {}
    with pytest.raises(ValueError, match="equally long"):
        metrics.replicate_difference(np.ones(3), np.ones(4))


def test_fid_bootstrap_paired_needs_aligned_rows():
    with pytest.raises(InputError, match="paired"):
        metrics.fid_bootstrap(np.zeros((10, 2)), np.ones((9, 2)), n_boot=2)


def test_fid_per_label_skips_small_labels():
    rng = np.random.default_rng(3)
    real, gen = rng.normal(size=(70, 4)), rng.normal(size=(70, 4)) + 1.0
    labels = np.array(["Tumor"] * 40 + ["Stroma"] * 25 + ["Immune"] * 5)
    result = metrics.fid_per_label(real, gen, labels, min_spots=20, n_boot=0)
    assert set(result["labels"]) == {"Tumor", "Stroma"}
    assert result["skipped"] == {"Immune": "5 spots (< 20)"}
    assert result["labels"]["Tumor"]["point"] == pytest.approx(metrics.fid(real[:40], gen[:40]))
    assert result["labels"]["Stroma"]["n_real"] == 25


# ---------------------------------------------------------------------------------------------
# Transcriptomic fidelity


def test_pearson_per_gene_matches_scipy():
    rng = np.random.default_rng(4)
    predicted = rng.normal(size=(50, 6))
    true = predicted * rng.normal(size=6) + rng.normal(size=(50, 6))
    true[:, 5] = 2.0  # constant truth: r = 0 by convention
    r = metrics.pearson_per_gene(predicted, true)
    expected = [stats.pearsonr(predicted[:, g], true[:, g]).statistic for g in range(5)]
    np.testing.assert_allclose(r[:5], expected, rtol=1e-10)
    assert r[5] == 0.0


def planted(rng, n, n_features=30, n_genes=60, signal=True):
    features = rng.normal(size=(n, n_features))
    weights = rng.normal(size=(n_features, n_genes)) * np.linspace(2.0, 0.5, n_genes)
    noise = rng.normal(size=(n, n_genes))
    return features, (features @ weights + noise if signal else noise * np.linspace(3.0, 0.5, n_genes))


def test_fidelity_curve_matches_scipy_pearson_and_median():
    rng = np.random.default_rng(5)
    features, expression = planted(rng, 300)
    oracle = metrics.fit_oracle(features[:200], expression[:200], ks=(5, 20, 100), n_components=16)
    assert oracle.ks == (5, 20, 60)  # 100 capped at the 60 genes
    predictions = oracle.predict_by_k(features[200:])
    true_by_k = {k: expression[200:, oracle.gene_rank[:k]] for k in oracle.ks}
    curve = metrics.fidelity_curve(predictions, true_by_k)
    expected = [
        np.median([stats.pearsonr(predictions[k][:, g], true_by_k[k][:, g]).statistic for g in range(k)])
        for k in oracle.ks
    ]
    np.testing.assert_allclose(curve["curve"], expected, rtol=1e-10)
    assert curve["auc"] == pytest.approx(np.mean(expected))
    # Genes ranked by TRAIN variance.
    train_variance = expression[:200].var(axis=0)
    assert np.all(np.diff(train_variance[oracle.gene_rank]) <= 0)


def test_oracle_recovers_planted_signal_and_nothing_from_noise():
    rng = np.random.default_rng(6)
    features, expression = planted(rng, 400)
    oracle = metrics.fit_oracle(features[:250], expression[:250], ks=(10, 30, 60), n_components=20)
    generated = {
        "uni_ge": features[250:] + 0.5 * rng.normal(size=features[250:].shape),
        "uni": rng.normal(size=features[250:].shape),  # no information about the spot
    }
    result = metrics.transcriptomic_fidelity(oracle, expression[250:], features[250:], generated, n_boot=50, seed=1)
    real, good, blind = result["real"], result["generated"]["uni_ge"], result["generated"]["uni"]
    assert real["auc"] > 0.6
    assert real["auc"] > good["auc"] > 0.3
    assert abs(blind["auc"]) < 0.15
    assert abs(result["null"]["empirical"]["auc"]) < 0.15 and result["null"]["by_construction"] == 0.0
    assert real["lo"] <= real["auc"] <= real["hi"]
    assert result["ks"] == [10, 30, 60]

    noise_features, noise_expression = planted(rng, 400, signal=False)
    noise_oracle = metrics.fit_oracle(noise_features[:250], noise_expression[:250], ks=(10, 30, 60), n_components=20)
    on_noise = metrics.transcriptomic_fidelity(noise_oracle, noise_expression[250:], noise_features[250:], {}, n_boot=0)
    assert abs(on_noise["real"]["auc"]) < 0.1


def count_cohort(rng, n_train=150, n_test=60, n_features=20, n_genes=80, signal=0.1):
    """log1p Poisson counts whose rates depend on the features (a Visium-like test set: ~60 spots)."""
    features = rng.normal(size=(n_train + n_test, n_features))
    rate = np.exp(0.5 + features @ (signal * rng.normal(size=(n_features, n_genes))))
    expression = np.log1p(rng.poisson(rate)).astype(np.float64)
    return features[:n_train], expression[:n_train], features[n_train:], expression[n_train:]


def test_no_information_scores_within_its_interval_of_zero_and_real_features_above_it():
    train_x, train_y, test_x, test_y = count_cohort(np.random.default_rng(0))
    oracle = metrics.fit_oracle(train_x, train_y, ks=(10, 40, 80), n_components=16)
    true_by_k = {k: test_y[:, oracle.gene_rank[:k]] for k in oracle.ks}
    predictions = oracle.predict_by_k(test_x)
    # the spread of a no-information AUC on these 60 spots, measured independently: 40 shuffles
    shuffled_aucs = [metrics.fidelity_curve({k: p[np.random.default_rng(100 + s).permutation(60)] for k, p in
                                             predictions.items()}, true_by_k)["auc"] for s in range(40)]
    spread = np.std(shuffled_aucs)
    assert 0.005 < spread < 0.1
    # At seed 13 the single fixed shuffle that used to be the null drew 0.076 [0.003, 0.133]: it excluded 0.
    for seed in (13, 3):
        noise = np.random.default_rng(seed).normal(size=test_x.shape)  # features of pure-noise tiles
        result = metrics.transcriptomic_fidelity(oracle, test_y, test_x, {"noise": noise}, n_boot=200, seed=seed,
                                                 n_perm=200)
        null, on_noise, real = result["null"]["empirical"], result["generated"]["noise"], result["real"]
        assert null["lo"] <= 0.0 <= null["hi"] and null["n_perm"] == 200
        assert abs(null["auc"]) < 0.3 * spread  # the null's own AUC is the distribution's mean, not one draw
        assert null["hi"] - null["lo"] == pytest.approx(2 * 1.96 * spread, rel=0.35)
        assert on_noise["lo"] <= 0.0 <= on_noise["hi"]
        assert real["lo"] > null["hi"] + 2 * spread  # an informative input scores clearly above the null
        assert real["lo"] <= real["auc"] <= real["hi"]


def test_permutation_null_equals_scoring_permuted_predictions():
    rng = np.random.default_rng(11)
    predicted = {k: rng.normal(size=(30, k)) for k in (2, 5)}
    predicted[5][:, 4] = 1.5  # a constant prediction: r = 0 in every permutation, as in pearson_per_gene
    true_by_k = {k: predicted[k] + rng.normal(size=(30, k)) for k in (2, 5)}
    null = metrics.permutation_null(predicted, true_by_k, n_perm=25, seed=4)
    stream = np.random.default_rng(4)
    aucs = []
    for _ in range(25):
        order = stream.permutation(30)
        aucs.append(metrics.fidelity_curve({k: p[order] for k, p in predicted.items()}, true_by_k)["auc"])
    assert null["auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert (null["lo"], null["hi"]) == pytest.approx(tuple(np.percentile(aucs, [2.5, 97.5])), abs=1e-12)
    assert null["sd"] == pytest.approx(np.std(aucs, ddof=1), abs=1e-12)


def test_bootstrap_auc_matches_direct_resampling():
    rng = np.random.default_rng(8)
    predicted = {k: rng.normal(size=(40, k)) for k in (3, 7)}
    true_by_k = {k: predicted[k] + rng.normal(size=(40, k)) for k in (3, 7)}
    true_by_k[7][:, 6] = np.where(np.arange(40) == 0, 1.0, 0.0)  # a sparse gene: often constant in a resample
    result = metrics.bootstrap_auc(predicted, true_by_k, n_boot=60, seed=3, alpha=0.05, batch=16, gene_chunk=2)

    stream = np.random.default_rng(3)
    aucs = []
    for _ in range(60):
        rows = stream.integers(0, 40, size=40)
        aucs.append(np.mean([np.median(metrics.pearson_per_gene(predicted[k][rows], true_by_k[k][rows])) for k in (3, 7)]))
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    assert result["lo"] == pytest.approx(lo, abs=1e-9)
    assert result["hi"] == pytest.approx(hi, abs=1e-9)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # tiny max_iter on purpose
def test_midnight_mlp_learns_signal_and_clips_negatives():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(300, 24))
    signal = features @ rng.normal(size=(24, 40)) / np.sqrt(24) + 1.0
    expression = np.clip(signal + 0.3 * rng.normal(size=signal.shape), 0.0, None)  # log-expression-like, >= 0
    regressor = metrics.fit_midnight_mlp(
        features[:200], expression[:200], ks=(10, 40, 100), hidden_layer_sizes=(64,), max_iter=300, seed=0
    )
    assert regressor.ks == (10, 40)
    raw = regressor.model.predict(features[200:])
    assert raw.min() < 0  # the MLP itself goes negative here ...
    predictions = regressor.predict_by_k(features[200:])
    assert min(p.min() for p in predictions.values()) == 0.0  # ... and the regressor clips it
    result = metrics.transcriptomic_fidelity(regressor, expression[200:], features[200:], {}, n_boot=0)
    assert result["real"]["auc"] > 0.6
    assert abs(result["null"]["empirical"]["auc"]) < 0.15


def test_log1p_cp10k_values():
    counts = np.array([[1, 3, 0], [0, 0, 0]])
    expected = np.log1p(np.array([[2500.0, 7500.0, 0.0], [0, 0, 0]]))
    for given in (counts, sparse.csr_matrix(counts)):
        values = metrics.log1p_cp10k(given)
        assert values.dtype == np.float32
        np.testing.assert_allclose(values, expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Perturbation


def test_interpolate_ge_cls_and_tokens():
    source, target = np.array([[0.0, 2.0], [4.0, 0.0]]), np.array([2.0, 2.0])
    np.testing.assert_allclose(metrics.interpolate_ge(source, target, 0.0), source)
    np.testing.assert_allclose(metrics.interpolate_ge(source, target, 1.0), [target, target])
    np.testing.assert_allclose(metrics.interpolate_ge(source, target, 0.25), [[0.5, 2.0], [3.5, 0.5]])
    tokens, centroid_tokens = np.zeros((3, 5, 4)), np.arange(20.0).reshape(5, 4)
    np.testing.assert_allclose(metrics.interpolate_ge(tokens, centroid_tokens, 0.5)[2], centroid_tokens / 2)
    with pytest.raises(InputError):
        metrics.interpolate_ge(source, target, 1.5)
    with pytest.raises(InputError):
        metrics.interpolate_ge(tokens, np.zeros((4, 5)), 0.5)


def test_class_centroids_with_token_mask():
    tokens = np.array([[[1.0], [5.0]], [[3.0], [9.0]]])
    mask = np.array([[True, True], [True, False]])
    centroids = metrics.class_centroids(tokens, ["Tumor", "Tumor"], mask=mask)
    np.testing.assert_allclose(centroids["Tumor"], [[2.0], [5.0]])


def trajectory(source, target, alphas, direction, rng, n_ref=5):
    """(n_ref, n_alpha, d) features moving from `source` along `direction` * (target - source)."""
    steps = np.asarray(alphas)[None, :, None] * direction * (target - source)
    offsets = 0.01 * rng.normal(size=(n_ref, 1, len(source)))
    return source + steps + offsets * (1 - np.asarray(alphas))[None, :, None]


def test_perturbation_scores_known_answers():
    rng = np.random.default_rng(10)
    c_src, c_tgt = np.array([0.0, 0.0, 0.0]), np.array([3.0, 4.0, 0.0])
    alphas = metrics.PAPER_ALPHAS
    toward = metrics.perturbation_scores(trajectory(c_src, c_tgt, alphas, 1.0, rng), alphas, c_src, c_tgt)
    assert toward["transition"] == pytest.approx(1.0, abs=0.01)
    assert toward["monotonicity"] == pytest.approx(1.0)
    assert toward["composite"] == pytest.approx(2.0, abs=0.01)
    away = metrics.perturbation_scores(trajectory(c_src, c_tgt, alphas, -1.0, rng), alphas, c_src, c_tgt, monotonicity_weight=0.5)
    assert away["transition"] == pytest.approx(-1.0, abs=0.01)
    assert away["monotonicity"] == pytest.approx(-1.0)
    assert away["composite"] == pytest.approx(-1.5, abs=0.01)
    still = metrics.perturbation_scores(np.repeat(c_src[None, None], 5, axis=1), alphas, c_src, c_tgt)
    assert (still["transition"], still["monotonicity"]) == (0.0, 0.0)

    summary = metrics.perturbation_summary({"T->S": toward, "T->I": away, "I->T": still})
    assert summary["mean_composite"] == pytest.approx((2.0 - 1.5 + 0.0) / 3, abs=0.01)
    assert metrics.pair_label("Tumor", "Stroma") == "T->S"


def test_choose_reference_spots_is_seeded_and_of_the_source_class():
    keys = [f"s:{i}" for i in range(300)]
    labels = ["Tumor" if i % 3 else "Immune" for i in range(300)]
    chosen = metrics.choose_reference_spots(keys, labels, "Tumor", n=100, seed=42)
    assert len(chosen) == 100 and len(set(chosen)) == 100
    assert all(int(k.split(":")[1]) % 3 for k in chosen)
    assert chosen == metrics.choose_reference_spots(keys, labels, "Tumor", n=100, seed=42)
    assert chosen != metrics.choose_reference_spots(keys, labels, "Tumor", n=100, seed=1)


# ---------------------------------------------------------------------------------------------
# OOD


def test_subsample_keys_and_deltas():
    keys = [f"tcga:{i:06d}" for i in range(25_000)]
    chosen = metrics.subsample_keys(keys)
    assert len(chosen) == 10_000 and len(set(chosen)) == 10_000
    assert chosen == sorted(chosen)  # original order kept
    assert chosen == metrics.subsample_keys(keys, 10_000, 42)
    assert chosen != metrics.subsample_keys(keys, 10_000, 0)
    assert metrics.subsample_keys(keys[:50]) == keys[:50]
    assert metrics.delta_baseline(747.1, 663.8) == pytest.approx(83.3)
    assert metrics.delta_ood(fid_uni=783.3 - 10.5, fid_uni_ge=783.3) == pytest.approx(-10.5)


@pytest.mark.parametrize("n, m", [(40, 55), (300, 250)])
def test_fid_from_features_equals_fid_from_covariances(n, m):
    """Fewer spots than dimensions takes the n x m path, more the d x d path: one distance."""
    rng = np.random.default_rng(3)
    mixing = rng.standard_normal((64, 64))
    real = rng.standard_normal((n, 64)) @ mixing
    gen = rng.standard_normal((m, 64)) @ mixing * 1.3 + 0.5
    statistics = metrics.feature_statistics
    from_covariances = metrics.frechet_distance(*statistics(real), *statistics(gen))
    assert metrics.frechet_distance_of_features(real, gen) == pytest.approx(from_covariances, rel=1e-6)
    assert metrics.fid(real, gen) == pytest.approx(from_covariances, rel=1e-6)
    assert metrics.fid(real, real) == pytest.approx(0.0, abs=1e-6 * from_covariances)


@pytest.mark.parametrize("paired", [True, False])
def test_fid_bootstrap_weighted_covariances_equal_the_gathered_replicates(paired):
    # More spots than dimensions: replicates go through bootstrap multiplicities, not a gathered copy.
    rng = np.random.default_rng(11)
    real = correlated_features(rng, 150, 24, shift=3.0)
    gen = correlated_features(rng, 150, 24, shift=3.2)
    result = metrics.fid_bootstrap(real, gen, n_boot=60, seed=5, paired=paired)

    stream = np.random.default_rng(5)  # the same indices, replicate by replicate
    values = []
    for _ in range(60):
        i = stream.integers(0, 150, size=150)
        j = i if paired else stream.integers(0, 150, size=150)
        mu1, s1 = real[i].mean(0), np.cov(real[i], rowvar=False)
        mu2, s2 = gen[j].mean(0), np.cov(gen[j], rowvar=False)
        values.append(metrics.frechet_distance(mu1, s1, mu2, s2))
        assert metrics._replicate_fid(real, gen, i, j) == pytest.approx(fid_via_sqrtm(real[i], gen[j]), rel=1e-6)
    lo, hi = np.percentile(values, [2.5, 97.5])
    assert result["lo"] == pytest.approx(lo, rel=1e-9)
    assert result["hi"] == pytest.approx(hi, rel=1e-9)
    assert result["mean"] == pytest.approx(np.mean(values), rel=1e-9)
    mean, cov = metrics.bootstrap_weighted_statistics(real, i)
    np.testing.assert_allclose(mean, real[i].mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(real[i], rowvar=False), rtol=1e-10, atol=1e-12)


def test_trace_sqrt_product_with_a_singular_covariance():
    rng = np.random.default_rng(4)
    low_rank = correlated_features(rng, 5, 8)  # 5 spots in 8 dims: a singular covariance
    full = correlated_features(rng, 50, 8)
    s1, s2 = np.cov(low_rank, rowvar=False), np.cov(full, rowvar=False)
    expected = np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-6)
    assert metrics.trace_sqrt_product(s2, s1) == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_torch_midnight_mlp_scores_within_the_sklearn_interval():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(600, 24))
    signal = features @ rng.normal(size=(24, 80)) / np.sqrt(24)
    expression = np.clip(signal + 0.5 * rng.normal(size=signal.shape), 0.0, None)  # half zeros, as counts are
    train = sparse.csr_matrix(expression[:400])  # the torch MLP streams its batches from sparse targets
    scored = {}
    for impl in metrics.MLP_IMPLS:
        regressor = metrics.fit_midnight_mlp(features[:400], train, ks=(10, 40, 80), hidden_layer_sizes=(64, 64),
                                             max_iter=200, seed=0, impl=impl, device="cpu")
        scored[impl] = metrics.transcriptomic_fidelity(regressor, expression[400:], features[400:], {}, n_boot=200,
                                                       n_perm=10)["real"]
    assert scored["sklearn"]["auc"] > 0.6
    assert scored["sklearn"]["lo"] <= scored["torch"]["auc"] <= scored["sklearn"]["hi"]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_torch_mlp_stops_when_the_loss_stalls_as_sklearn_does():
    from sklearn.neural_network import MLPRegressor

    from stmdit.mlp_torch import fit_torch_mlp

    rng = np.random.default_rng(1)
    features, target = rng.normal(size=(120, 6)), rng.normal(size=(120, 3))
    # tol larger than any improvement: epoch 1 sets the best loss, then 11 epochs without improvement.
    reference = MLPRegressor(hidden_layer_sizes=(8,), max_iter=50, tol=10.0, random_state=0).fit(features, target)
    fitted = fit_torch_mlp(features, target, (8,), max_iter=50, seed=0, tol=10.0, device="cpu")
    assert fitted.n_iter == reference.n_iter_ == 12
    assert fitted.predict(features[:5]).shape == (5, 3)
    # Same loss (and penalty) definition and the same descent: averaged over initialisations, the loss
    # curves start and end alike (one initialisation differs by its random draw).
    curves = {"sklearn": [], "torch": []}
    for seed in range(4):
        curves["sklearn"].append(MLPRegressor(hidden_layer_sizes=(64,), max_iter=30, random_state=seed)
                                 .fit(features, target).loss_curve_)
        curves["torch"].append(fit_torch_mlp(features, target, (64,), max_iter=30, seed=seed, device="cpu").loss_curve)
    for epoch in (0, -1):
        sk, th = (np.mean([c[epoch] for c in curves[impl]]) for impl in ("sklearn", "torch"))
        assert th == pytest.approx(sk, rel=0.15)


def test_fid_bootstrap_gives_the_same_interval_on_any_number_of_threads():
    rng = np.random.default_rng(12)
    real, gen = correlated_features(rng, 90, 10), correlated_features(rng, 90, 10, shift=0.3)
    one = metrics.fid_bootstrap(real, gen, n_boot=30, seed=1, threads=1)
    three = metrics.fid_bootstrap(real, gen, n_boot=30, seed=1, threads=3)
    assert (one["lo"], one["hi"], one["mean"]) == (three["lo"], three["hi"], three["mean"])


def test_blocked_column_variance_equals_one_whole_float64_copy():
    """The gene ranking's variances from CSC copies of a few columns at a time are bit-identical to
    those of one float64 CSC copy of the whole matrix (the former computation)."""
    rng = np.random.default_rng(21)
    counts = sparse.random(300, 50, density=0.2, format="csr", random_state=rng, dtype=np.float32)
    counts.data = np.log1p(rng.poisson(3.0, size=counts.nnz) + 1).astype(np.float32)
    whole = sparse.csc_matrix(counts, dtype=np.float64)
    mean = np.asarray(whole.mean(axis=0)).ravel()
    expected = np.asarray(whole.multiply(whole).mean(axis=0)).ravel() - mean**2
    for matrix in (counts, counts.tocsc(), sparse.coo_matrix(counts)):
        for block in (7, 50, 1024):
            np.testing.assert_array_equal(metrics._column_variance(matrix, block_columns=block), expected)
    assert metrics._column_variance(counts[:, :0]).shape == (0,)


def test_scoring_views_of_the_top_genes_equals_scoring_one_copy_per_k():
    """transcriptomic_fidelity's truth per k are views of one dense top-max(k) block: the curve,
    bootstrap and permutation null are bit-identical to those of a dense copy per k (the former path)."""
    train_x, train_y, test_x, test_y = count_cohort(np.random.default_rng(5))
    oracle = metrics.fit_oracle(train_x, sparse.csr_matrix(train_y), ks=(10, 40, 80), n_components=16)
    test_sparse = sparse.csr_matrix(test_y.astype(np.float32))
    noise = np.random.default_rng(6).normal(size=test_x.shape)
    result = metrics.transcriptomic_fidelity(oracle, test_sparse, test_x, {"noise": noise}, n_boot=30, seed=2,
                                             n_perm=30)
    copies = {k: metrics._dense_columns(test_sparse, oracle.gene_rank[:k]) for k in oracle.ks}
    assert all(c.flags.c_contiguous for c in copies.values())
    predictions = oracle.predict_by_k(test_x)
    assert result["real"] == metrics._score_predictions(predictions, copies, 30, 2, 0.05)
    assert result["generated"]["noise"] == metrics._score_features(oracle, noise, copies, 30, 2, 0.05)
    assert result["null"]["empirical"] == metrics.permutation_null(predictions, copies, n_perm=30, seed=2)
