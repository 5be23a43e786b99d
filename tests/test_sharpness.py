"""Sharpness of two-layer networks on the fused HVP: against dense eigh of the explicit Hessian (built both from
the native HVP and, independently, by torch autograd), power vs Lanczos, tracking inside training."""
import numpy as np
import pytest

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
    np.testing.assert_allclose(result.values, values, rtol=1e-6)
    for e in range(net.ensemble):
        for j in range(3):
            overlap = abs(result.vectors[e, j] @ vectors[e, :, j])
            assert overlap > 1 - 1e-6, (activation, e, j, overlap)


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
    np.testing.assert_allclose(H, expected, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(net.sharpness(X, Y, tol=1e-10).values[0, 0], np.linalg.eigvalsh(expected)[-1],
                               rtol=1e-6)


def test_power_and_lanczos_agree_and_lanczos_needs_fewer_hvps():
    net, X, Y = problem("tanh", E=3, n=60, d=5, m=20)
    lanczos = net.sharpness(X, Y, method="lanczos", tol=1e-8)
    power = net.sharpness(X, Y, method="power", tol=1e-8, max_iter=20000)
    assert lanczos.converged.all() and power.converged.all()
    np.testing.assert_allclose(lanczos.values[:, 0], power.values[:, 0], rtol=1e-6)
    print("HVPs per member, Lanczos:", lanczos.matvecs, "power:", power.matvecs)
    assert (lanczos.matvecs < power.matvecs).all()


def test_ensemble_members_have_their_own_spectrum():
    net, X, Y = problem("softplus", E=3)
    together = net.sharpness(X, Y, k=2, tol=1e-10).values
    for e in range(3):
        single = TwoLayer(net.d, net.m, net.k, "softplus", ensemble=1, dtype=np.float64)
        single.W, single.b, single.a = net.W[e:e + 1].copy(), net.b[e:e + 1].copy(), net.a[e:e + 1].copy()
        np.testing.assert_allclose(single.sharpness(X, Y, k=2, tol=1e-10).values[0], together[e], rtol=1e-8)


def test_hessian_operator_works_with_generic_spectrum_solvers():
    from physai.spectrum import lanczos

    net, X, Y = problem("erf")
    generic = lanczos(net.hessian_operator(X, Y), k=2, tol=1e-10)
    np.testing.assert_allclose(generic.values, net.sharpness(X, Y, k=2, tol=1e-10).values, rtol=1e-8)


def test_tracked_sharpness_equals_fresh_computation():
    net, X, Y = problem("tanh", E=2, n=40, d=4, m=10)
    start = (net.W.copy(), net.b.copy(), net.a.copy())
    lrs = np.array([0.2, 0.5])
    tracked = net.train(X, Y, lrs, 30, track_sharpness_every=10, sharpness_tol=1e-9)
    np.testing.assert_array_equal(tracked.sharpness_steps, [0, 10, 20])
    assert tracked.sharpness.shape == (3, 2) and tracked.matvecs.shape == (3, 2)
    replay = TwoLayer(4, 10, 1, "tanh", ensemble=2, dtype=np.float64)
    replay.W, replay.b, replay.a = (x.copy() for x in start)
    for row, step in enumerate(tracked.sharpness_steps):
        fresh = replay.sharpness(X, Y, tol=1e-9).values[:, 0]
        np.testing.assert_allclose(tracked.sharpness[row], fresh, rtol=1e-6)
        untracked = replay.train(X, Y, lrs, 10)
        np.testing.assert_allclose(untracked.losses, tracked.losses[step:step + 10], rtol=1e-12)
    # warm starts make later estimates cheap
    assert tracked.matvecs[1:].mean() < tracked.matvecs[0].mean()


def test_a_diverging_member_does_not_stop_the_sweep():
    net, X, Y = problem("tanh", E=2, n=40, d=4, m=10)
    result = net.train(X, Y, np.array([0.1, 1e4]), 50, track_sharpness_every=5)
    assert np.isfinite(result.sharpness[:, 0]).all()
    assert np.isnan(result.sharpness[-1, 1])
    assert not np.isfinite(result.losses[-1, 1])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(k=10**6), ValueError, "k:"),
    (dict(tol=0.0), ValueError, "tol"),
    (dict(tol=-1.0), ValueError, "tol"),
    (dict(method="arnoldi"), ValueError, "method"),
    (dict(method="power", k=2), ValueError, "k:"),
    (dict(which="SA"), ValueError, "which"),
    (dict(v0=np.zeros((3, 3))), ValueError, "v0"),
])
def test_bad_sharpness_arguments(kwargs, error, match):
    net, X, Y = problem()
    with pytest.raises(error, match=match):
        net.sharpness(X, Y, **kwargs)


def test_bad_tracking_arguments():
    net, X, Y = problem()
    with pytest.raises(ValueError, match="track_sharpness_every"):
        net.train(X, Y, 0.1, 10, track_sharpness_every=0)
    with pytest.raises(ValueError, match="tol"):
        net.train(X, Y, 0.1, 10, track_sharpness_every=2, sharpness_tol=0)


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
    with pytest.raises(TypeError, match="loss_fn"):
        hessian_eigs(TwoLayerModule.from_linear(first, second, "tanh"), torch.nn.functional.mse_loss, (X, Y))
