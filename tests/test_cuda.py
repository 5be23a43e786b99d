"""Tests of the CUDA backend's torch layer: it refuses bad tensors, and its host emulation matches torch autograd.
With a GPU (marked ``gpu``): kernels vs an inline numpy reference, torch autograd, and dense eigh.
The build report and the device math header are tested in test_cuda_math.py, without torch.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_cuda_math import ACTS, LOSSES, _labels

from physai import _native

torch = pytest.importorskip("torch")
_cuda = _native._cuda
needs_module = pytest.mark.skipif(_cuda is None, reason="physai built without CUDA")
has_gpu = _cuda is not None and _cuda.device_count() > 0 and torch.cuda.is_available()


# --- the torch layer --------------------------------------------------------------------------------

def _cpu_net(E=2, m=5, d=3, k=2, n=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, m, d, generator=g, dtype=dtype), torch.randn(E, m, generator=g, dtype=dtype),
            torch.randn(E, k, m, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype),
            torch.randn(n, k, generator=g, dtype=dtype))


@needs_module
def test_cpu_tensors_are_refused():
    import physai.cuda as pc

    W, b, a, X, Y = _cpu_net()
    with pytest.raises(ValueError, match="W must be a CUDA tensor"):
        pc.forward(W, b, a, X)
    with pytest.raises(ValueError, match="W must be a CUDA tensor"):
        pc.loss_and_grad(W, b, a, X, Y)
    with pytest.raises(ValueError, match="W must be a CUDA tensor"):
        pc.hvp(W, b, a, X, Y, W, b, a)
    with pytest.raises(ValueError, match="W must be a CUDA tensor"):
        pc.sharpness(W, b, a, X, Y)
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        pc.forward(W.numpy(), b, a, X)


@needs_module
def test_scalar_arguments_are_checked_first():
    import physai.cuda as pc

    W, b, a, X, Y = _cpu_net()
    with pytest.raises(ValueError, match="activation"):
        pc.forward(W, b, a, X, activation="sigmoidal")
    with pytest.raises(ValueError, match="loss"):
        pc.loss_and_grad(W, b, a, X, Y, loss="hinge")
    with pytest.raises(TypeError, match="iters"):
        pc.sharpness(W, b, a, X, Y, iters=1.5)
    with pytest.raises(ValueError, match="seed"):
        pc.sharpness(W, b, a, X, Y, seed=-1)


@needs_module
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not math.isfinite(v)),
                 st.booleans(), st.text(max_size=3)))
def test_scales_must_be_finite_reals(value):
    import physai.cuda as pc

    W, b, a, X, _ = _cpu_net()
    with pytest.raises((TypeError, ValueError), match="input_scale"):
        pc.forward(W, b, a, X, input_scale=value)


# --- GPU ------------------------------------------------------------------------------------------

def _reference(W, b, a, X, Y, act, loss, isc, osc):
    """Inline numpy forward and loss (float64)."""
    X = np.broadcast_to(X, (W.shape[0],) + X.shape[-2:])
    h = isc * np.einsum("emd,end->enm", W, X) + (0 if b is None else b[:, None, :])
    f = osc * np.einsum("ekm,enm->enk", a, _closed_form(act, h))
    if Y is None:
        return f, None
    Y = np.broadcast_to(Y, f.shape)
    n, k = f.shape[1:]
    per = np.stack([_loss_closed_form(loss, f[e], Y[e]) for e in range(f.shape[0])])
    return f, per.sum(1) / (n if loss == "cross_entropy" else n * k)


def _gpu_net(act, loss, dtype, bias=True, E=3, m=16, d=5, k=3, n=100, per_member=False):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(E, m, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(E, m, generator=g, dtype=torch.float64) * 0.1 if bias else None
    a = torch.randn(E, k, m, generator=g, dtype=torch.float64) / math.sqrt(m)
    X = torch.randn(*((E,) if per_member else ()), n, d, generator=g, dtype=torch.float64)
    Y = torch.from_numpy(_labels(loss, np.random.default_rng(2), E * n, k).reshape(E, n, k))
    Y = Y if per_member else Y[0]
    return [None if t is None else t.to(dtype) for t in (W, b, a, X, Y)]


def _loss_torch(params, X, Y, act, loss, isc, osc, bias):
    W, b, a = params
    fn = {"relu": torch.relu, "tanh": torch.tanh, "erf": torch.erf, "linear": lambda x: x,
          "quadratic": lambda x: x * x, "softplus": torch.nn.functional.softplus,
          "gelu": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}[act]
    h = isc * (X @ W.T) + (b if bias else 0)
    f = osc * fn(h) @ a.T
    if loss == "mse":
        return 0.5 * ((f - Y) ** 2).mean()
    if loss == "logistic":
        return torch.nn.functional.softplus(-Y * f).mean()
    return -(Y * torch.log_softmax(f, -1)).sum(-1).mean()


def _autograd_member(W, b, a, X, Y, V, e, act, loss, isc, osc):
    """torch autograd (CPU float64) loss, gradient and HVP of member e: the independent oracle."""
    bias = b is not None
    zeros = torch.zeros(W.shape[1], dtype=torch.float64)
    Xe, Ye = (X[e] if X.dim() == 3 else X), (Y[e] if Y.dim() == 3 else Y)
    params = (W[e], b[e] if bias else zeros, a[e])
    Ve = (V[0][e], V[1][e] if bias else zeros, V[2][e])
    fn = lambda *p: _loss_torch(p, Xe, Ye, act, loss, isc, osc, bias)  # noqa: E731
    value = fn(*params).item()
    grads = torch.autograd.functional.jacobian(fn, params)
    _, hv = torch.autograd.functional.hvp(fn, params, Ve)
    return value, grads, hv


@needs_module
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("per_member,bias", [(False, True), (True, False)])
def test_host_emulated_kernels_match_autograd(act, loss, per_member, bias):
    # The GPU kernels' phases run on the host with several tiles per block (TS=3, n=10), several blocks per
    # member and a thread count that does not divide the work, so their index arithmetic is checked here.
    isc, osc = 0.7, 1.3
    W, b, a, X, Y = _gpu_net(act, loss, torch.float64, bias=bias, E=2, m=5, d=4, k=3, n=10, per_member=per_member)
    g = torch.Generator().manual_seed(3)
    V = [None if t is None else torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (W, b, a)]
    npy = [None if t is None else t.numpy() for t in (W, b, a, X, Y)]
    vnp = tuple(None if t is None else t.numpy() for t in V)
    lossv, *grads = _cuda._host_fused("grad", *npy, None, act, loss, isc, osc, TS=3, chunks=2, nthreads=7)
    hv = _cuda._host_fused("hvp", *npy, vnp, act, loss, isc, osc, TS=3, chunks=2, nthreads=7)
    for e in range(2):
        value, ref_g, ref_h = _autograd_member(W, b, a, X, Y, V, e, act, loss, isc, osc)
        assert lossv[e] == pytest.approx(value, rel=1e-12)
        for got_g, got_h, rg, rh in zip(grads, hv, ref_g, ref_h):
            if got_g is None:
                continue
            np.testing.assert_allclose(got_g[e], rg.numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(got_h[e], rh.numpy(), rtol=1e-10, atol=1e-12)


@needs_module
def test_host_emulation_does_not_depend_on_threads_or_chunks_much():
    # Different thread counts give the same bits (each thread owns fixed outputs); different chunkings only
    # reorder a sum.
    W, b, a, X, Y = [t.numpy() for t in _gpu_net("gelu", "cross_entropy", torch.float64, E=2, n=30)]
    r1 = _cuda._host_fused("grad", W, b, a, X, Y, None, "gelu", "cross_entropy", 1.0, 1.0, TS=4, chunks=3, nthreads=1)
    r2 = _cuda._host_fused("grad", W, b, a, X, Y, None, "gelu", "cross_entropy", 1.0, 1.0, TS=4, chunks=3, nthreads=64)
    r3 = _cuda._host_fused("grad", W, b, a, X, Y, None, "gelu", "cross_entropy", 1.0, 1.0, TS=8, chunks=1, nthreads=5)
    for x, y, z in zip(r1, r2, r3):
        assert np.array_equal(x, y)
        np.testing.assert_allclose(x, z, rtol=1e-12, atol=1e-15)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_kernels_match_reference(dtype, act, loss, per_member, bias):
    if not has_gpu:
        pytest.skip("no CUDA device")
    import physai.cuda as pc

    isc, osc = 0.7, 1.3
    W, b, a, X, Y = _gpu_net(act, loss, torch.float64, bias=bias, per_member=per_member)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    dev = [None if t is None else t.to(dtype).cuda() for t in (W, b, a, X, Y)]
    kw = dict(activation=act, input_scale=isc, output_scale=osc)
    f_ref, l_ref = _reference(*[None if t is None else t.numpy() for t in (W, b, a, X, Y)], act, loss, isc, osc)
    np.testing.assert_allclose(pc.forward(*dev[:4], **kw).double().cpu().numpy(), f_ref, rtol=rtol, atol=rtol)
    lossv, grads = pc.loss_and_grad(*dev, loss=loss, **kw)
    np.testing.assert_allclose(lossv.double().cpu().numpy(), l_ref, rtol=rtol, atol=rtol)
    # torch autograd per member as the oracle for gradients and HVPs
    g = torch.Generator().manual_seed(3)
    V = [None if t is None else torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (W, b, a)]
    hv = pc.hvp(*dev, *[None if t is None else t.to(dtype).cuda() for t in V], loss=loss, **kw)
    for e in range(W.shape[0]):
        _, ref_g, ref_h = _autograd_member(W, b, a, X, Y, V, e, act, loss, isc, osc)
        for got_g, got_h, rg, rh in zip(grads, hv, ref_g, ref_h):
            if got_g is None:
                continue
            np.testing.assert_allclose(got_g[e].double().cpu().numpy(), rg.numpy(), rtol=rtol, atol=rtol)
            np.testing.assert_allclose(got_h[e].double().cpu().numpy(), rh.numpy(), rtol=rtol, atol=rtol)

@pytest.mark.gpu
def test_gpu_is_deterministic():
    if not has_gpu:
        pytest.skip("no CUDA device")
    import physai.cuda as pc

    dev = [t.cuda() for t in _gpu_net("tanh", "mse", torch.float32, n=5000)]
    l1, g1 = pc.loss_and_grad(*dev, activation="tanh")
    l2, g2 = pc.loss_and_grad(*dev, activation="tanh")
    assert torch.equal(l1, l2) and all(torch.equal(x, y) for x, y in zip(g1, g2))


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_sharpness_matches_dense_eigh(bias):
    if not has_gpu:
        pytest.skip("no CUDA device")
    import physai.cuda as pc

    W, b, a, X, Y = _gpu_net("tanh", "mse", torch.float64, bias=bias, E=2, m=6, d=3, k=2, n=40)
    eig = pc.sharpness(*[None if t is None else t.cuda() for t in (W, b, a, X, Y)], activation="tanh",
                       iters=2000, tol=1e-12).cpu().numpy()
    for e in range(2):
        params = [W[e], b[e], a[e]] if bias else [W[e], a[e]]
        sizes = [p.numel() for p in params]

        def flat_loss(theta):
            parts = list(torch.split(theta, sizes))
            Wp, ap = parts[0].reshape(W.shape[1:]), parts[-1].reshape(a.shape[1:])
            bp = parts[1] if bias else torch.zeros(W.shape[1], dtype=theta.dtype)
            return _loss_torch((Wp, bp, ap), X, Y, "tanh", "mse", 1.0, 1.0, True)

        H = torch.autograd.functional.hessian(flat_loss, torch.cat([p.ravel() for p in params])).numpy()
        w = np.linalg.eigvalsh(H)
        top = w[np.argmax(np.abs(w))]
        np.testing.assert_allclose(eig[e], top, rtol=1e-6)


@pytest.mark.gpu
def test_gpu_ensemble_loss_autograd_function():
    if not has_gpu:
        pytest.skip("no CUDA device")
    import physai.cuda as pc

    W, b, a, X, Y = [t.cuda() for t in _gpu_net("softplus", "logistic", torch.float64)]
    params = [t.clone().requires_grad_() for t in (W, b, a)]
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device="cuda")
    (pc.ensemble_loss(*params, X, Y, activation="softplus", loss="logistic") * weights).sum().backward()
    _, grads = pc.loss_and_grad(W, b, a, X, Y, activation="softplus", loss="logistic")
    for p, g in zip(params, grads):
        shape = (-1,) + (1,) * (g.dim() - 1)
        torch.testing.assert_close(p.grad, g * weights.view(shape))
