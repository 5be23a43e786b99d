"""Sharpness of two-layer networks on the fused HVP: against dense eigh of the explicit Hessian (built both from
the native HVP and, independently, by torch autograd), power vs Lanczos, tracking inside training."""
import numpy as np
import pytest

import physai
from physai.twolayer import ACTIVATIONS, TwoLayer


def problem(activation="tanh", E=2, n=24, d=3, m=6, k=1, seed=0, dtype=np.float64):
    net = TwoLayer(d, m, k, activation, "standard", ensemble=E, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    net.b[:] = 0.2 * rng.standard_normal(net.b.shape)
    X = rng.standard_normal((n, d)).astype(dtype)
    Y = np.sin(2 * X[:, :k]).astype(dtype)
    return net, X, Y


def dense_hessian_from_hvp(net, X, Y):
    op = net.hessian_operator(X, Y)
    P = net.num_params
    columns = [op.matvec(np.repeat(np.eye(P)[i][None], net.ensemble, axis=0)) for i in range(P)]
    return np.stack(columns, axis=2)  # [E, P, P]


def top_eigs(H, k):
    values, vectors = np.linalg.eigh(H)
    return values[..., ::-1][..., :k], vectors[..., ::-1][..., :k]


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a != "linear"])
def test_top_k_matches_dense_eigh(activation):
    net, X, Y = problem(activation)
    H = dense_hessian_from_hvp(net, X, Y)
    np.testing.assert_allclose(H, H.transpose(0, 2, 1), atol=1e-12)
    values, vectors = top_eigs(H, 3)
    result = net.sharpness(X, Y, k=3, tol=1e-10)
    assert result.converged.all()
    # residuals <= 1e-10 |theta|, gaps >= 0.03: seen 2e-15 on values, 4e-11 on vectors
    np.testing.assert_allclose(result.values, values, rtol=1e-12)
    for e in range(net.ensemble):
        for j in range(3):
            expected = vectors[e, :, j]
            got = result.vectors[e, j]
            np.testing.assert_allclose(got, np.sign(got @ expected) * expected, atol=5e-9, err_msg=f"{e}, {j}")


def test_dense_hessian_from_hvp_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    from physai.twolayer.torch import torch_loss, torch_reference

    net, X, Y = problem("gelu", E=1)
    H = dense_hessian_from_hvp(net, X, Y)[0]
    m, d, k = net.m, net.d, net.k
    s = net.scaling

    def loss_of(flat):
        W, b, a = flat[:m * d].reshape(m, d), flat[m * d:m * d + m], flat[m * d + m:].reshape(k, m)
        F = torch_reference(torch.tensor(X), W, b, a, activation="gelu", input_scale=s.input_scale,
                            output_scale=s.output_scale)
        return torch_loss(F, torch.tensor(Y))

    flat = torch.tensor(net.flatten((net.W, net.b, net.a))[0])
    expected = torch.autograd.functional.hessian(loss_of, flat).numpy()
    np.testing.assert_allclose(H, expected, rtol=1e-12, atol=5e-14)
    np.testing.assert_allclose(net.sharpness(X, Y, tol=1e-10).values[0, 0], np.linalg.eigvalsh(expected)[-1],
                               rtol=1e-12)


def test_power_and_lanczos_agree_and_lanczos_needs_fewer_hvps():
    net, X, Y = problem("tanh", E=3, n=60, d=5, m=20)
    lanczos = net.sharpness(X, Y, method="lanczos", tol=1e-8)
    power = net.sharpness(X, Y, method="power", tol=1e-8, max_matvecs=20000)
    assert lanczos.converged.all() and power.converged.all()
    np.testing.assert_allclose(lanczos.values[:, 0], power.values[:, 0], rtol=1e-12)
    print("HVPs per member, Lanczos:", lanczos.matvecs, "power:", power.matvecs)
    assert (lanczos.matvecs < power.matvecs).all()


def test_ensemble_members_have_their_own_spectrum():
    net, X, Y = problem("softplus", E=3)
    # A shared v0: random starts come from the member's index, which differs between the two calls.
    v0 = np.random.default_rng(3).standard_normal((3, net.num_params))
    together = net.sharpness(X, Y, k=2, tol=1e-10, v0=v0)
    for e in range(3):
        single = TwoLayer(net.d, net.m, net.k, "softplus", ensemble=1, dtype=np.float64)
        single.W, single.b, single.a = net.W[e:e + 1].copy(), net.b[e:e + 1].copy(), net.a[e:e + 1].copy()
        alone = single.sharpness(X, Y, k=2, tol=1e-10, v0=v0[e:e + 1])
        # Members share neither HVP work nor solver work: each computes exactly what it computes alone.
        for field in ("values", "vectors", "matvecs", "converged"):
            np.testing.assert_array_equal(getattr(alone, field)[0], getattr(together, field)[e], err_msg=field)


def test_hessian_operator_works_with_generic_spectrum_solvers():
    from physai.spectrum import lanczos

    net, X, Y = problem("erf")
    generic = lanczos(net.hessian_operator(X, Y), k=2, tol=1e-10)
    fused = net.sharpness(X, Y, k=2, tol=1e-10)
    # the same solver on the same HVP, only called through Python: the same bits
    for field in ("values", "vectors", "matvecs", "converged"):
        np.testing.assert_array_equal(getattr(generic, field), getattr(fused, field), err_msg=field)


def test_tracked_sharpness_equals_fresh_computation():
    net, X, Y = problem("tanh", E=2, n=40, d=4, m=10)
    start = (net.W.copy(), net.b.copy(), net.a.copy())
    lrs = np.array([0.2, 0.5])
    tracked = net.train(X, Y, lrs, 30, track_sharpness_every=10, sharpness_tol=1e-9)
    np.testing.assert_array_equal(tracked.sharpness_steps, [0, 10, 20])
    assert tracked.sharpness.shape == (3, 2) and tracked.matvecs.shape == (3, 2)
    replay = TwoLayer(4, 10, 1, "tanh", ensemble=2, dtype=np.float64)
    replay.W, replay.b, replay.a = (x.copy() for x in start)
    cold_matvecs = np.zeros_like(tracked.matvecs)
    for row, step in enumerate(tracked.sharpness_steps):
        fresh = replay.sharpness(X, Y, tol=1e-9)
        np.testing.assert_allclose(tracked.sharpness[row], fresh.values[:, 0], rtol=1e-12)
        cold_matvecs[row] = fresh.matvecs
        untracked = replay.train(X, Y, lrs, 10)
        np.testing.assert_allclose(untracked.losses, tracked.losses[step:step + 10], rtol=1e-12)
    # The first estimate is a cold start from seed 0, like fresh's (which adds one HVP: the true residual check of
    # certified_top_k); the later ones start from the previous top eigenvector, which must beat a cold start on the
    # same Hessian.
    np.testing.assert_array_equal(tracked.matvecs[0] + 1, cold_matvecs[0])
    assert (tracked.matvecs[1:] < cold_matvecs[1:]).all(), (tracked.matvecs, cold_matvecs)


def test_a_diverging_member_does_not_stop_the_sweep():
    net, X, Y = problem("tanh", E=2, n=40, d=4, m=10)
    alone = TwoLayer.from_arrays(net.W[:1].copy(), net.b[:1].copy(), net.a[:1].copy(), "tanh")
    result = net.train(X, Y, np.array([0.1, 1e4]), 50, track_sharpness_every=5)
    assert not np.isfinite(result.losses[-1, 1])
    np.testing.assert_array_equal(result.diverged, [False, True])
    # sharpness is NaN exactly from the first tracked step whose loss is no longer finite
    diverged = ~np.isfinite(result.losses[result.sharpness_steps, 1])
    assert diverged.any() and not diverged.all()
    np.testing.assert_array_equal(np.isnan(result.sharpness[:, 1]), diverged)
    # the healthy member trains and is tracked as if it were alone
    single = alone.train(X, Y, 0.1, 50, track_sharpness_every=5)
    np.testing.assert_allclose(result.losses[:, 0], single.losses[:, 0], rtol=1e-12)
    np.testing.assert_allclose(result.sharpness[:, 0], single.sharpness[:, 0], rtol=1e-12)
    np.testing.assert_array_equal(result.matvecs[:, 0], single.matvecs[:, 0])
    np.testing.assert_array_equal(result.matvecs[diverged, 1], 0)  # a diverged member costs no HVPs


@pytest.mark.parametrize("n", [40, 300])  # 300 rows: a lone member's HVP runs in row blocks
def test_a_lone_diverging_member_gets_nan_sharpness(n):
    net, X, Y = problem("tanh", E=1, n=n, d=4, m=10)
    result = net.train(X, Y, 1e6, 30, track_sharpness_every=3)
    diverged = ~np.isfinite(result.losses[result.sharpness_steps, 0])
    assert diverged.any() and not diverged.all()
    np.testing.assert_array_equal(np.isnan(result.sharpness[:, 0]), diverged)
    np.testing.assert_array_equal(result.matvecs[diverged, 0], 0)


P = problem()[0].num_params


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=10**6), ValueError, "k:"),
    (dict(k=P + 1), ValueError, "k:"),
    (dict(k=0), ValueError, "k:"),
    (dict(k=1.0), TypeError, "k:"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(tol=-1.0), ValueError, "tol"),
    (dict(tol=np.nan), ValueError, "tol"),
    (dict(tol=np.inf), ValueError, "tol"),
    (dict(max_matvecs=0), ValueError, "max_matvecs"),
    (dict(k=2, max_matvecs=1), ValueError, "max_matvecs"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(method="arnoldi"), ValueError, "method"),
    (dict(method="power", k=2), ValueError, "k:"),
    (dict(which="SM"), ValueError, "which"),
    (dict(which="SA", method="power"), ValueError, "which"),
    (dict(loss="hinge"), ValueError, "loss"),
    (dict(v0=np.zeros((3, 3))), ValueError, "v0"),
    (dict(v0=np.ones(P)), ValueError, "v0"),
    (dict(v0=np.zeros((2, P))), ValueError, "v0"),
    (dict(v0=np.r_[np.ones((1, P)), np.full((1, P), np.nan)]), ValueError, "v0"),
    (dict(v0=np.zeros((2, P)), method="power"), ValueError, "v0"),
])
def test_bad_sharpness_arguments(kwargs, error, match):
    net, X, Y = problem()
    with pytest.raises(error, match=match):
        net.sharpness(X, Y, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(k=P), dict(tol=5e-324, max_matvecs=50), dict(seed=2**64 - 1),
                                    dict(method="power", max_matvecs=1), dict(which="LM")])
def test_sharpness_argument_edges_that_are_valid_run(kwargs):
    net, X, Y = problem()
    result = net.sharpness(X, Y, **kwargs)
    assert result.values.shape == (2, kwargs.get("k", 1))
    assert (result.matvecs >= 1).all() and (result.matvecs <= kwargs.get("max_matvecs", 1000)).all()
    H = dense_hessian_from_hvp(net, X, Y)
    tol = kwargs.get("tol", 1e-6)
    for e in np.flatnonzero(result.converged):
        # what "converged" promises, plus rounding
        for theta, y in zip(result.values[e], result.vectors[e]):
            assert np.linalg.norm(H[e] @ y - theta * y) <= tol * abs(theta) + 1e-13


def test_max_matvecs_beyond_int64_is_refused_by_name():
    net, X, Y = problem()
    with pytest.raises(ValueError, match="^max_matvecs: expected an integer <= 9223372036854775807"):
        net.sharpness(X, Y, max_matvecs=2**63)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(track_sharpness_every=0), ValueError, "track_sharpness_every"),
    (dict(track_sharpness_every=1.0), TypeError, "track_sharpness_every"),
    (dict(track_sharpness_every=2, sharpness_tol=0), ValueError, "tol"),
    (dict(track_sharpness_every=2, sharpness_tol=np.nan), ValueError, "sharpness_tol"),
    (dict(track_sharpness_every=2, sharpness_max_matvecs=0), ValueError, "sharpness_max_matvecs"),
    (dict(track_sharpness_every=2, sharpness_method="arnoldi"), ValueError, "sharpness_method"),
])
def test_bad_tracking_arguments(kwargs, error, match):
    net, X, Y = problem()
    with pytest.raises(error, match=match):
        net.train(X, Y, 0.1, 10, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("E,n,d,m", [
    (4, 32, 14, 300),  # E * P = 19200 >= 2^14 values: the solver's members update on threads; members' HVPs too
    (1, 300, 3, 16),   # a lone member of more than 128 rows: the HVP sums row blocks computed on threads
    (1, 128, 16, 80),  # a lone member of n m (d + k) >= 2^17 multiply-adds: each HVP GEMM is split over threads
])
def test_sharpness_and_tracking_same_bits_whatever_thread_count(dtype, E, n, d, m):
    # sizes from the thresholds of csrc/spectrum/eigensolvers.hpp and csrc/twolayer/kernels.cpp
    net, X, Y = problem("tanh", E=E, n=n, d=d, m=m, dtype=dtype)
    start = (net.W.copy(), net.b.copy(), net.a.copy())
    tol = 1e-5 if dtype == np.float32 else 1e-9
    runs = []
    # 3 threads split the work unevenly, so a result that depended on which thread did what would show.
    for threads in (1, 3):
        with physai.num_threads(threads):
            lanczos = net.sharpness(X, Y, k=2, tol=tol)
            power = net.sharpness(X, Y, method="power", tol=tol, max_matvecs=3000)
            tracked = net.train(X, Y, 0.1, 9, track_sharpness_every=3)
        net.W, net.b, net.a = (x.copy() for x in start)
        runs.append((lanczos, power, tracked))
    assert runs[0][0].converged.all() and runs[0][1].converged.all()
    for one, three in zip(*runs):
        for field, value in vars(one).items():
            np.testing.assert_array_equal(value, getattr(three, field), err_msg=field)


def test_torch_tools_dispatch_to_the_fused_hvp_for_the_two_layer_module():
    torch = pytest.importorskip("torch")
    from physai.spectrum import hessian_eigs
    from physai.twolayer.torch import TwoLayerModule

    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 12, dtype=torch.float64), torch.nn.Linear(12, 1, bias=False, dtype=torch.float64)
    X, Y = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
    mlp = torch.nn.Sequential(first, torch.nn.Tanh(), second)
    generic = hessian_eigs(mlp, lambda out, y: 0.5 * ((out - y) ** 2).mean(), (X, Y), k=2, tol=1e-10)
    fused = hessian_eigs(TwoLayerModule.from_linear(first, second, "tanh"), "mse", (X, Y), k=2, tol=1e-10)
    np.testing.assert_allclose(fused.values, generic.values, rtol=1e-8)
    # with a torch loss the module goes through torch.func like any other layer (its Functions compose)
    half_mse = lambda out, y: 0.5 * ((out - y) ** 2).mean()  # noqa: E731
    composed = hessian_eigs(TwoLayerModule.from_linear(first, second, "tanh"), half_mse, (X, Y), k=2, tol=1e-10)
    np.testing.assert_allclose(composed.values, generic.values, rtol=1e-10)
    with pytest.raises(ValueError, match="params: a fused Hessian"):
        hessian_eigs(TwoLayerModule.from_linear(first, second, "tanh"), "mse", (X, Y), params=["W"])
    frozen = TwoLayerModule.from_linear(first, second, "tanh")
    frozen.b.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        hessian_eigs(frozen, "mse", (X, Y))


@pytest.mark.parametrize("k", [1, 2])
def test_a_diverged_member_gets_nan_and_the_others_their_spectrum(k):
    net, X, Y = problem(E=3)
    healthy = TwoLayer.from_arrays(*(np.ascontiguousarray(p[[0, 2]]) for p in (net.W, net.b, net.a)), "tanh")
    net.W[1, 0, 0] = np.nan
    result = net.sharpness(X, Y, k=k, tol=1e-10)
    np.testing.assert_array_equal(result.diverged, [False, True, False])
    np.testing.assert_array_equal(result.converged, [True, False, True])
    assert np.isnan(result.values[1]).all() and np.isnan(result.vectors[1]).all() and result.matvecs[1] == 0
    H = dense_hessian_from_hvp(healthy, X, Y)
    np.testing.assert_allclose(result.values[[0, 2]], top_eigs(H, k)[0], rtol=1e-10)
    everyone = net.sharpness(X, Y, k=k, tol=1e-10)  # the model itself is left as it was
    np.testing.assert_array_equal(everyone.values, result.values)


def test_which_smallest_and_both_ends_match_dense_eigh():
    net, X, Y = problem(E=2)
    Y = 4 * Y  # far from the targets: an indefinite Hessian
    H = dense_hessian_from_hvp(net, X, Y)
    exact = np.linalg.eigvalsh(H)
    assert (exact[:, 0] < 0).all()
    sa = net.sharpness(X, Y, k=2, which="SA", tol=1e-10)
    np.testing.assert_allclose(sa.values, exact[:, :2], rtol=1e-10)
    be = net.sharpness(X, Y, k=3, which="BE", tol=1e-10)
    np.testing.assert_allclose(be.values, np.c_[exact[:, ::-1][:, :2], exact[:, :1]], rtol=1e-10)


def test_a_member_whose_loss_becomes_finite_again_is_tracked_from_a_random_start():
    # float32 targets of 5e19: the squared error overflows to inf at first, and the first steps bring it back.
    rng = np.random.default_rng(0)
    net = TwoLayer(3, 4, 1, "tanh", dtype=np.float32)
    X, Y = rng.standard_normal((8, 3)).astype(np.float32), np.full((8, 1), 5e19, np.float32)
    result = net.train(X, Y, 0.1, 7, track_sharpness_every=3)
    tracked = result.losses[result.sharpness_steps, 0]
    assert not np.isfinite(tracked[0]) and np.isfinite(tracked[1:]).all()
    assert np.isnan(result.sharpness[0, 0]) and np.isfinite(result.sharpness[1:, 0]).all()
    assert result.diverged[0] and result.matvecs[0, 0] == 0 and (result.matvecs[1:, 0] > 0).all()


def test_power_iteration_la_is_the_largest_eigenvalue_when_a_negative_one_dominates():
    net, X, Y = problem(E=2)
    Y = 30 * Y  # far from the targets: the most negative eigenvalue dominates in magnitude
    exact = np.linalg.eigvalsh(dense_hessian_from_hvp(net, X, Y))
    assert (-exact[:, 0] > exact[:, -1]).all() and (exact[:, -1] > 0).all()
    power = net.sharpness(X, Y, method="power", tol=1e-9, max_matvecs=20000)
    assert power.converged.all()
    np.testing.assert_allclose(power.values[:, 0], exact[:, -1], rtol=1e-8)
    dominant = net.sharpness(X, Y, method="power", which="LM", tol=1e-9, max_matvecs=20000)
    np.testing.assert_allclose(dominant.values[:, 0], exact[:, 0], rtol=1e-8)


def test_a_warm_start_with_nan_rows_for_diverged_members_is_taken():
    net, X, Y = problem(E=3)
    healthy = TwoLayer.from_arrays(*(np.ascontiguousarray(p[[0, 2]]) for p in (net.W, net.b, net.a)), "tanh")
    exact = top_eigs(dense_hessian_from_hvp(healthy, X, Y), 1)[0]
    net.W[1, 0, 0] = np.nan
    earlier = net.sharpness(X, Y, tol=1e-10)
    assert np.isnan(earlier.vectors[1]).all()
    warm = net.sharpness(X, Y, tol=1e-10, v0=earlier.vectors[:, 0])  # a warm-started sweep goes on
    np.testing.assert_array_equal(warm.diverged, [False, True, False])
    np.testing.assert_allclose(warm.values[[0, 2]], exact, rtol=1e-10)
    assert (warm.matvecs[[0, 2]] < earlier.matvecs[[0, 2]]).all()
    bad = earlier.vectors[:, 0].copy()
    bad[2] = np.nan  # a healthy member's row must still be a usable start, and the error names it
    with pytest.raises(ValueError, match="v0: row 2"):
        net.sharpness(X, Y, v0=bad)
