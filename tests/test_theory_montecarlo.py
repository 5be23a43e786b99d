"""physai.theory against Monte Carlo ensembles of real networks: the infinite-width kernel with its 1/n shift, the
susceptibilities, the NTK mean, and the 1/n variance (leading order where the neglected O((L/n)^2) terms are
resolved below the Monte Carlo error, exact finite-width forms elsewhere). Seeds are fixed: every comparison is
deterministic. A test that compares m z-scores (estimate - theory) / standard error, errors estimated from the
samples themselves, bounds them all by ``bonferroni_bound(m)``: with probability >= 99% no false alarm over all m,
whatever their correlations (3.29 for 10 comparisons, 3.66 for 40)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from physai import theory as T
from physai.theory import bonferroni_bound
from physai.theory.finite_width import finite_width_kernel

X2 = np.array([[1.0, 0.5, 0.2, -0.4], [0.3, -1.0, 0.8, 0.5]])  # two inputs, correlation ~ -0.24
X1 = X2[:1]
CRITICAL = {"relu": 2.0, "tanh": 1.0, "linear": 1.0}


def z_scores(estimate, theory, sem):
    """The z-scores (estimate - theory) / sem of the entries with spread, flat; deterministic entries (layer 1)
    are compared to rounding instead. Of [..., P, P] symmetric arrays only the upper triangles count."""
    if estimate.ndim >= 2 and estimate.shape[-1] == estimate.shape[-2] and estimate.shape[-1] > 1:
        upper = np.triu_indices(estimate.shape[-1])
        estimate, theory, sem = (a[..., upper[0], upper[1]] for a in (estimate, theory, sem))
    spread = sem > 1e-9 * np.abs(theory).max()
    assert np.allclose(estimate[~spread], theory[~spread], rtol=1e-9, atol=1e-12)
    return (estimate - theory)[spread] / sem[spread]


def assert_within_bound(*z_arrays):
    """All z-scores (of one test) under the Bonferroni bound for their total number."""
    z = np.concatenate([np.ravel(z) for z in z_arrays])
    assert np.abs(z).max() < bonferroni_bound(z.size), (np.abs(z).max(), z.size)


# -- the streaming estimator ------------------------------------------------------------------------------------
def test_running_moments_match_direct_computation(rng):
    data = rng.gamma(2.0, size=(1000, 3, 2))
    moments = T.RunningMoments((3, 2))
    for part in np.split(data, [1, 8, 108, 500]):
        moments.update(part)
    centred = data - data.mean(0)
    assert moments.count == 1000
    assert np.allclose(moments.mean, data.mean(0), rtol=1e-13)
    assert np.allclose(moments.variance, data.var(0, ddof=1), rtol=1e-12)
    assert np.allclose(moments.M3, (centred**3).sum(0), rtol=1e-10)
    assert np.allclose(moments.M4, (centred**4).sum(0), rtol=1e-11)


def test_standard_errors_match_replicate_spread(rng):
    """The delta-method and jackknife (20 groups of 25) standard errors against the spread of the estimators over
    R = 400 independent replicates (N = 500 gamma samples each). The spread's own relative error is 1/sqrt(2R) =
    3.5% (the mean of 400 jackknife errors, each 1/sqrt(2 x 19) = 16% noisy, adds 0.8%), so 3 of them plus the
    estimators' O(1/N) bias stay inside 15%."""
    R, N, G = 400, 500, 20
    estimates, sems = [], []
    for _ in range(R):
        moments = T.RunningMoments((), groups=G)
        for g, part in enumerate(np.split(rng.gamma(2.0, size=N), G)):
            moments.update(part, group=g)
        _, jackknife = moments.jackknife(lambda m: (m.mean, m.variance, m.normalized_variance))
        estimates.append((moments.mean, moments.variance, moments.normalized_variance))
        sems.append((moments.sem, moments.variance_sem, moments.normalized_variance_sem, *jackknife))
    spread = np.std(np.array(estimates, dtype=float), axis=0, ddof=1)
    sems = np.mean(np.array(sems, dtype=float), axis=0)
    assert np.allclose(sems[:3], spread, rtol=0.15)
    assert np.allclose(sems[3:], spread, rtol=0.15)


def test_jackknife_of_a_mean_is_the_batch_means_error(rng):
    """For the mean, leaving out one of G equal groups moves it by (mean - group mean) / (G - 1), so the jackknife
    error is exactly the batch-means one, std(group means) / sqrt(G); the groups also sum to the whole."""
    data = rng.standard_normal((600, 2))
    moments = T.RunningMoments((2,), groups=6)
    for g, part in enumerate(np.split(data, 6)):
        moments.update(part, group=g)
    value, sem = moments.jackknife(lambda m: m.mean)
    means = data.reshape(6, 100, 2).mean(1)
    assert np.allclose(value, data.mean(0), rtol=1e-13)
    assert np.allclose(sem, means.std(0, ddof=1) / np.sqrt(6), rtol=1e-10)
    assert sum(g.count for g in moments.groups) == 600
    with pytest.raises(ValueError, match="groups"):
        T.RunningMoments((2,), groups=1).jackknife(lambda m: m.mean)


@given(st.lists(st.integers(1, 60), min_size=1, max_size=6))
def test_running_moments_do_not_depend_on_batching(sizes):
    data = np.random.default_rng(sum(sizes)).standard_normal((sum(sizes), 2)) ** 3 + 5
    whole, parts = T.RunningMoments((2,)), T.RunningMoments((2,))
    whole.update(data)
    for part in np.split(data, np.cumsum(sizes)[:-1]):
        parts.update(part)
    for name in ("mean_", "M2", "M3", "M4"):
        assert np.allclose(getattr(parts, name), getattr(whole, name), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["metric", "weights"])
def test_same_seed_same_bits_whatever_the_batch(method):
    runs = [T.sample_mlp(X2, "tanh", 3, 8, 150, method=method, ntk=method == "weights", batch=batch, seed=5)
            for batch in (7, 64, 1000)]
    for run in runs[1:]:
        assert np.array_equal(run.kernel.mean, runs[0].kernel.mean)
        assert np.array_equal(run.metric.M2, runs[0].metric.M2)
        assert np.array_equal(run.kernel.groups[3].M4, runs[0].kernel.groups[3].M4)
        if method == "weights":
            assert np.array_equal(run.ntk.mean, runs[0].ntk.mean)
    other = T.sample_mlp(X2, "tanh", 3, 8, 150, method=method, ntk=False, seed=6)
    assert not np.array_equal(other.kernel.mean, runs[0].kernel.mean)


def test_same_bits_with_singular_metrics():
    """ReLU of width 8, two inputs: about one network in 30 has a layer with fewer than two live neurons, a singular
    metric that Cholesky rejects. Only those networks are factored otherwise, so a batch of 64 (some with, some
    without such a network) and one of 2048 give the same bits."""
    runs = [T.sample_mlp(X2, "relu", 6, 8, 2048, C_W=2.0, method="metric", batch=batch, seed=5)
            for batch in (64, 2048)]
    assert np.array_equal(runs[0].kernel.mean, runs[1].kernel.mean)
    assert np.array_equal(runs[0].kernel.M2, runs[1].kernel.M2)


@pytest.mark.parametrize("method", ["metric", "weights"])
def test_the_same_input_twice(method):
    """A singular metric (two identical inputs): the samplers still draw, and the two inputs stay identical."""
    mc = T.sample_mlp(np.vstack([X1, X1]), "tanh", 4, 8, 200, C_b=0.1, C_W=1.5, method=method, seed=7)
    assert np.allclose(mc.kernel.mean[..., 0, 1], mc.kernel.mean[..., 0, 0], rtol=1e-12)
    assert np.allclose(mc.kernel.mean[..., 1, 1], mc.kernel.mean[..., 0, 0], rtol=1e-12)


# -- kernel and susceptibilities --------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", sorted(CRITICAL))
def test_kernel_matches_theory_with_its_1_over_n_shift(activation):
    """E[G^(l)] = K^(l) + G1^(l)/n for both inputs and their overlap, n = 64, L = 8, 10^4 networks. The neglected
    O(1/n^2) term was measured at n = 16, L = 10 with 4 10^4 networks: at most 3.5 standard errors there (ReLU
    overlap), which is (16/64)^2 = 1/16 of it, 0.2 standard errors at this size. 45 comparisons: 3 entries at
    layers 2..8 of the metric (layer 1's is fixed) and at layers 1..8 of the empirical kernel."""
    C_W = CRITICAL[activation]
    n, depth = 64, 8
    mc = T.sample_mlp(X2, activation, depth, n, 10_000, C_W=C_W, method="metric", ntk=False, seed=1)
    theory = finite_width_kernel(T.first_layer_kernel(X2, 0.0, C_W), activation, depth, 0.0, C_W)
    z_metric = z_scores(mc.metric.mean, theory.mean(n), mc.metric.sem)
    # The empirical kernel O^(l) = z.z/n has the same mean and a larger spread.
    z_kernel = z_scores(mc.kernel.mean, theory.mean(n), mc.kernel.sem)
    assert z_metric.size + z_kernel.size == 45
    assert_within_bound(z_metric, z_kernel)
    # Without the shift, tanh's kernel is visibly off at this size (the shift matters); ReLU's diagonal and every
    # linear entry have none.
    if activation == "tanh":
        assert np.abs(z_scores(mc.metric.mean, theory.K, mc.metric.sem)).max() > 4


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_susceptibilities_match_theory(activation):
    """Per-network estimates of chi_parallel and chi_perp (functions of the layer's metric G) average to
    E chi(G) = chi(K + G1/n) + chi''(K) V / (2n) + O(1/n^2) (delta method; chi'' by central differences).
    12 comparisons (2 susceptibilities at 6 layers)."""
    C_W, n, depth = CRITICAL[activation], 64, 6
    mc = T.sample_mlp(X1, activation, depth, n, 10_000, C_W=C_W, method="metric", ntk=False, seed=2)
    fw = T.finite_width(T.first_layer_kernel(X1, 0.0, C_W)[0, 0], activation, depth, 0.0, C_W)
    h = 1e-3 * fw.K

    def chi(K):
        return np.stack(T.susceptibilities(K, activation, C_W))

    second = (chi(fw.K + h) - 2 * chi(fw.K) + chi(fw.K - h)) / h**2
    expected = chi(fw.mean(n)) + second * fw.V / (2 * n)
    estimate, sem = mc.susceptibilities.mean[..., 0].T, mc.susceptibilities.sem[..., 0].T
    z = z_scores(estimate, expected, sem)
    assert z.size == 12
    assert_within_bound(z)


# -- NTK --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation,X", [("relu", X1), ("linear", X2), ("tanh", X1)], ids=["relu", "linear", "tanh"])
def test_ntk_mean_matches_theory(activation, X):
    """The NTK of neuron 0, whole networks of width 16, depth 6, 10^4 networks, layer-dependent learning rates.
    Its mean is exact at any width for linear networks and for ReLU with one input (the NTK is even in each
    neuron's incoming weights, whose sign decides sigma'), and for any activation at layers 1 and 2 (layer 1 is
    deterministic; layer 2's mean involves only the exactly Gaussian layer 1). Deeper, tanh's mean has an O(l/n)
    correction that physai does not compute: measured -0.49% +- 0.10% at layer 4 with 10^5 networks, i.e. 1.5
    standard errors of this test, so there it is not compared (see the slow extrapolation test)."""
    C_W, n, depth = CRITICAL[activation], 16, 6
    lambda_W = np.linspace(1.0, 0.5, depth)
    mc = T.sample_mlp(X, activation, depth, n, 10_000, C_W=C_W, lambda_b=0.3, lambda_W=lambda_W, seed=3)
    K, H = T.ntk_recursion(X, activation, depth, 0.0, C_W, lambda_b=0.3, lambda_W=lambda_W)
    exact = slice(None) if activation != "tanh" else slice(0, 2)
    z = [z_scores(mc.ntk.mean[exact], H[exact], mc.ntk.sem[exact])]
    if activation != "tanh":  # whole networks and the metric sampler: the same kernel law (exact mean here)
        z.append(z_scores(mc.metric.mean, K, mc.metric.sem))
    assert_within_bound(*z)


# -- the 1/n variance -------------------------------------------------------------------------------------------
#: Largest l / n at which Monte Carlo standard errors of a normalised variance are calibrated with 2 10^4 networks:
#: over 40 seeds the z-scores against the exact forms (ReLU and linear, n = 16 and 32, L = 10) spread by at most
#: 1.11 (+- 0.12 from 40 seeds) at l / n <= 0.2, and by 1.2 to 1.75 beyond, where the heavy tails of deep narrow
#: networks make both the delta-method and the 20-group jackknife errors too small in most samples (the log
#: transform does not help either).
CALIBRATED_DEPTH_OVER_WIDTH = 0.2
#: The largest spread of those z-scores beyond it (ReLU, n = 16, layer 9).
UNDERSTATEMENT = 1.75


@pytest.mark.parametrize("activation", ["linear", "relu"])
@pytest.mark.parametrize("n,depth", [(16, 10), (128, 6)])
def test_normalized_variance_matches_exact_finite_width_forms(activation, n, depth):
    """Var[O^(l)] / E[O^(l)]^2 against (1 + 2/n)^l - 1 and (1 + 5/n)^(l-1)(1 + 2/n) - 1, 2 10^4 networks, at the
    layers with l / n <= CALIBRATED_DEPTH_OVER_WIDTH (n = 16: layers 1..3; n = 128: all). At n = 16, L = 10
    (L/n = 0.6) the leading-order (V/K^2 + 2)/n is rejected at the 1% level (|z| > 2.58) even with the standard
    error scaled up by the largest understatement measured: the O((L/n)^2) terms it drops are far beyond the
    Monte Carlo error there (exact 12.0 and 2.25 for ReLU and linear, leading order 2.94 and 1.25)."""
    C_W = CRITICAL[activation]
    mc = T.sample_mlp(X1, activation, depth, n, 20_000, C_W=C_W, method="metric", ntk=False, seed=4)
    estimate, sem = mc.kernel.normalized_variance[:, 0, 0], mc.kernel.normalized_variance_sem[:, 0, 0]
    calibrated = np.arange(1, depth + 1) / n <= CALIBRATED_DEPTH_OVER_WIDTH
    exact = T.exact_normalized_variance(activation, depth, n)
    assert_within_bound(((estimate - exact) / sem)[calibrated])
    leading = T.finite_width(1.0, activation, depth, 0.0, C_W).normalized_variance(n)
    if n == 16:
        assert abs(estimate[-1] - leading[-1]) / (UNDERSTATEMENT * sem[-1]) > bonferroni_bound(1)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_leading_1_over_n_variance_coefficient(activation):
    """n Var[O^(l)] / E[O^(l)]^2 = c1 + c2/n + O(1/n^2): c1 = V/K^2 + 2 is the leading-order theory. It is fitted
    (weighted least squares in 1/n) to Monte Carlo at n = 32..256, L = 4, 10^4 networks each, so the O((L/n)^2)
    terms go into c2 instead of biasing c1. The fit's remaining O(1/n^2) bias, measured on the exact ReLU form
    (whose expansion coefficients are the larger: V/K^2 = 5(l - 1), against ~(2/3) l for tanh), must be below a
    third of the fit's relative standard error for the comparison to mean something."""
    C_W, depth, widths = CRITICAL[activation], 4, np.array([32, 64, 128, 256])
    values, sems = [], []
    for i, n in enumerate(widths):
        mc = T.sample_mlp(X1, activation, depth, int(n), 10_000, C_W=C_W, method="metric", ntk=False, seed=10 + i)
        values.append(n * mc.kernel.normalized_variance[:, 0, 0])
        sems.append(n * mc.kernel.normalized_variance_sem[:, 0, 0])
    values, sems = np.array(values), np.array(sems)
    fw = T.finite_width(T.first_layer_kernel(X1, 0.0, C_W)[0, 0], activation, depth, 0.0, C_W)
    relu_exact = np.array([n * T.exact_normalized_variance("relu", depth, int(n)) for n in widths])
    z = []  # one intercept per layer 2..L: 3 comparisons
    for layer in range(1, depth):
        design = np.stack([np.ones_like(widths, dtype=float), 1.0 / widths], axis=1) / sems[:, layer, None]
        cov = np.linalg.inv(design.T @ design)
        fit = cov @ design.T @ (values[:, layer] / sems[:, layer])
        c1_sem = np.sqrt(cov[0, 0])
        theory = fw.V[layer] / fw.K[layer] ** 2 + 2
        relu_fit = cov @ design.T @ (relu_exact[:, layer] / sems[:, layer])
        assert abs(relu_fit[0] / (5 * layer + 2) - 1) < c1_sem / theory / 3
        z.append((fit[0] - theory) / c1_sem)
    assert_within_bound(z)


# -- full-size runs ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("activation", sorted(CRITICAL))
@pytest.mark.parametrize("n", [16, 128])
def test_kernel_and_ntk_full_size(activation, n):
    """Whole networks, 10^4 per configuration, depth 10, widths 16 and 128: kernel (with its 1/n shift) and NTK
    where its mean is exact (tanh: layers 1 and 2 only; deeper it has an O(l/n) correction that physai does not
    compute, checked by extrapolation in test_tanh_ntk_mean_extrapolates_to_theory)."""
    C_W, depth = CRITICAL[activation], 10
    X = X1 if activation != "linear" else X2
    mc = T.sample_mlp(X, activation, depth, n, 10_000, C_W=C_W, seed=20, dtype="float32")
    K, H = T.ntk_recursion(X, activation, depth, 0.0, C_W)
    theory = finite_width_kernel(K[0], activation, depth, 0.0, C_W)
    # float32 forward passes: rounding ~1e-7 relative, far below the ~1e-3 standard errors.
    exact = slice(None) if activation != "tanh" else slice(0, 2)
    assert_within_bound(z_scores(mc.metric.mean, theory.mean(n), mc.metric.sem + 1e-6 * np.abs(K)),
                        z_scores(mc.ntk.mean[exact], H[exact], mc.ntk.sem[exact] + 1e-6 * np.abs(H[exact])))


@pytest.mark.slow
def test_tanh_ntk_mean_extrapolates_to_theory():
    """tanh's NTK mean is H (1 + c_l / n + O(1/n^2)) at layers l >= 3: a weighted least-squares fit of a + b / n to
    the Monte Carlo means at n = 8, 16, 32 (2 10^4 networks each, depth 6) has intercepts a within the Bonferroni
    bound of the infinite-width H at layers 3..6 (4 comparisons). The fit's residual (one degree of freedom per
    layer, chi-square bound at 1% over the 4 layers) bounds what the O(1/n^2) term could add."""
    depth, widths = 6, np.array([8, 16, 32])
    lambda_W = np.linspace(1.0, 0.5, depth)
    _, H = T.ntk_recursion(X1, "tanh", depth, 0.0, 1.0, lambda_b=0.3, lambda_W=lambda_W)
    means, sems = [], []
    for i, n in enumerate(widths):
        mc = T.sample_mlp(X1, "tanh", depth, int(n), 20_000, C_W=1.0, lambda_b=0.3, lambda_W=lambda_W,
                          seed=40 + i)
        means.append(mc.ntk.mean[:, 0, 0])
        sems.append(mc.ntk.sem[:, 0, 0])
    means, sems = np.array(means), np.array(sems)
    z, residuals = [], []
    for layer in range(2, depth):
        design = np.stack([np.ones(len(widths)), 1.0 / widths], axis=1) / sems[:, layer, None]
        y = means[:, layer] / sems[:, layer]
        cov = np.linalg.inv(design.T @ design)
        fit = cov @ design.T @ y
        z.append((fit[0] - H[layer, 0, 0]) / np.sqrt(cov[0, 0]))
        residuals.append(np.sum((design @ fit - y) ** 2))  # chi-square with 1 degree of freedom
    assert_within_bound(z)
    from scipy import stats

    assert max(residuals) < stats.chi2.isf(0.01 / len(residuals), 1)


@pytest.mark.slow
def test_hundred_thousand_networks_in_bounded_memory():
    """10^5 networks of width 64 and depth 10 stream through batches of 1000: the accumulators are all that
    persists, and the exact ReLU variance is met within the Bonferroni bound at every layer (10 comparisons,
    l / n <= 0.16: calibrated errors)."""
    import tracemalloc

    tracemalloc.start()
    mc = T.sample_mlp(X1, "relu", 10, 64, 100_000, C_W=2.0, method="metric", ntk=False, batch=1000, seed=30)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    draws_per_batch = 1000 * 10 * 64 * 8  # bytes of one batch of normals
    assert peak < 20 * draws_per_batch
    estimate, sem = mc.kernel.normalized_variance[:, 0, 0], mc.kernel.normalized_variance_sem[:, 0, 0]
    assert_within_bound((estimate - T.exact_normalized_variance("relu", 10, 64)) / sem)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="ntk"):
        T.sample_mlp(X1, "relu", 2, 4, 10, method="metric", ntk=True)
    with pytest.raises(ValueError, match="method"):
        T.sample_mlp(X1, "relu", 2, 4, 10, method="exact")
    with pytest.raises(ValueError, match="networks"):
        T.sample_mlp(X1, "relu", 2, 4, 1)
    with pytest.raises(ValueError, match="width"):
        T.sample_mlp(X1, "relu", 2, 0, 10)
    with pytest.raises(TypeError, match="dtype"):
        T.sample_mlp(X1, "relu", 2, 4, 10, dtype="int32")
    with pytest.raises(ValueError, match="lambda_b"):
        T.sample_mlp(X1, "relu", 2, 4, 10, lambda_b=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="batch"):
        T.RunningMoments((2,)).update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="groups"):
        T.sample_mlp(X1, "relu", 2, 4, 10, groups=-1)
    with pytest.raises(ValueError, match="group"):
        T.RunningMoments((2,), groups=2).update(np.zeros((3, 2)), group=2)
    with pytest.raises(ValueError, match="comparisons"):
        bonferroni_bound(0)
    with pytest.raises(ValueError, match="alpha"):
        bonferroni_bound(3, alpha=1.5)
