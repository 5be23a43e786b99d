"""Tests of the CUDA backend's torch layer: it refuses bad tensors, and its host emulation matches torch autograd.
With a GPU (marked ``gpu``): kernels vs an inline numpy reference, torch autograd, and dense eigh.
The build report and the device math header are tested in test_cuda_math.py, without torch.
"""
import math

import numpy as np
import pytest
from conftest import TRUTH_DTYPE, assert_as_accurate_as_reference, assert_close, in_dtype, labels
from hypothesis import given
from hypothesis import strategies as st

from physai import _native
from physai.twolayer import reference as R
from physai.twolayer.params import ACTIVATIONS, LOSSES, activation_code, loss_code

torch = pytest.importorskip("torch")
_cuda = _native._cuda
needs_module = pytest.mark.skipif(_cuda is None, reason="physai built without CUDA")
has_gpu = _cuda is not None and _cuda.device_count() > 0 and torch.cuda.is_available()


# --- the torch layer --------------------------------------------------------------------------------

def _cpu_net(E=2, m=5, d=3, k=2, n=7, dtype=torch.float64):
    """(X, Y, W, b, a) on the CPU, in the argument order of every two-layer function."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype),
            torch.randn(E, m, d, generator=g, dtype=dtype), torch.randn(E, m, generator=g, dtype=dtype),
            torch.randn(E, k, m, generator=g, dtype=dtype))


@needs_module
def test_cpu_tensors_are_refused():
    import physai.cuda as pc

    X, Y, W, b, a = _cpu_net()
    with pytest.raises(ValueError, match="W: expected a CUDA tensor"):
        pc.forward(X, W, b, a)
    with pytest.raises(ValueError, match="W: expected a CUDA tensor"):
        pc.loss_and_grad(X, Y, W, b, a)
    with pytest.raises(ValueError, match="W: expected a CUDA tensor"):
        pc.hvp(X, Y, W, b, a, W, b, a)
    with pytest.raises(ValueError, match="W: expected a CUDA tensor"):
        pc.sharpness(X, Y, W, b, a)
    with pytest.raises(TypeError, match="W: expected a torch.Tensor"):
        pc.forward(X, W.numpy(), b, a)


@needs_module
def test_scalar_arguments_are_checked_first():
    import physai.cuda as pc

    X, Y, W, b, a = _cpu_net()
    with pytest.raises(ValueError, match="activation"):
        pc.forward(X, W, b, a, activation="sigmoidal")
    with pytest.raises(ValueError, match="loss"):
        pc.loss_and_grad(X, Y, W, b, a, loss="hinge")
    with pytest.raises(TypeError, match="max_matvecs"):
        pc.sharpness(X, Y, W, b, a, max_matvecs=1.5)
    with pytest.raises(ValueError, match="tol: expected a number > 0"):
        pc.sharpness(X, Y, W, b, a, tol=0.0)
    with pytest.raises(ValueError, match="seed"):
        pc.sharpness(X, Y, W, b, a, seed=-1)


@needs_module
@pytest.mark.parametrize("call", ["loss_and_grad", "hvp", "sharpness", "ensemble_loss"])
def test_targets_are_required_where_a_loss_is_computed(call):
    # A missing Y would reach the device as a null pointer (an illegal address that poisons the CUDA context).
    import physai.cuda as pc

    X, _, W, b, a = _cpu_net()
    direction = (W, b, a) if call == "hvp" else ()
    with pytest.raises(TypeError, match="Y: expected a torch.Tensor of targets, got None"):
        getattr(pc, call)(X, None, W, b, a, *direction)


@needs_module
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not math.isfinite(v)),
                 st.booleans(), st.text(max_size=3)))
def test_scales_must_be_finite_reals(value):
    import physai.cuda as pc

    X, _, W, b, a = _cpu_net()
    with pytest.raises((TypeError, ValueError), match="input_scale"):
        pc.forward(X, W, b, a, input_scale=value)


# --- GPU ---------------------------------------------------------------------------------------------------------

def _gpu_net(act, loss, dtype, bias=True, E=3, m=16, d=5, k=3, n=100, per_member=False):
    """(X, Y, W, b, a) on the CPU in ``dtype``; Y suited to ``loss``."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(E, m, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(E, m, generator=g, dtype=torch.float64) * 0.1 if bias else None
    a = torch.randn(E, k, m, generator=g, dtype=torch.float64) / math.sqrt(m)
    X = torch.randn(*((E,) if per_member else ()), n, d, generator=g, dtype=torch.float64)
    Y = torch.from_numpy(labels(loss, np.random.default_rng(2), E * n, k).reshape(E, n, k))
    Y = Y if per_member else Y[0]
    return [None if t is None else t.to(dtype) for t in (X, Y, W, b, a)]


def _reference_params(W, b, a, act, isc, osc):
    numpy = lambda t: None if t is None else t.double().cpu().numpy()  # noqa: E731
    return R.Params(numpy(W), numpy(b), numpy(a), isc, osc, act)


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


def _autograd_member(X, Y, W, b, a, V, e, act, loss, isc, osc):
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
@pytest.mark.parametrize("per_member,bias", [(False, True), (True, False)], ids=["shared-X-bias", "per-member-X"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_host_emulated_kernels_match_autograd(act, loss, per_member, bias):
    # The GPU kernels' phases run on the host with several tiles per block (TS=3, n=10), several blocks per
    # member and a thread count that does not divide the work, so their index arithmetic is checked here.
    isc, osc = 0.7, 1.3
    X, Y, W, b, a = _gpu_net(act, loss, torch.float64, bias=bias, E=2, m=5, d=4, k=3, n=10, per_member=per_member)
    g = torch.Generator().manual_seed(3)
    V = [None if t is None else torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (W, b, a)]
    arrays = [None if t is None else t.numpy() for t in (X, Y, W, b, a)]
    direction = tuple(None if t is None else t.numpy() for t in V)
    codes = (activation_code(act), loss_code(loss), isc, osc)
    lossv, *grads = _cuda._host_fused("grad", *arrays, None, *codes, TS=3, chunks=2, nthreads=7)
    hv = _cuda._host_fused("hvp", *arrays, direction, *codes, TS=3, chunks=2, nthreads=7)
    for e in range(2):
        value, ref_g, ref_h = _autograd_member(X, Y, W, b, a, V, e, act, loss, isc, osc)
        assert_close(lossv[e], value)
        for got_g, got_h, rg, rh in zip(grads, hv, ref_g, ref_h):
            if got_g is not None:
                assert_close(got_g[e], rg.numpy(), what="gradient")
                assert_close(got_h[e], rh.numpy(), what="HVP")


@needs_module
def test_host_emulation_does_not_depend_on_threads_and_chunks_only_reorder_sums():
    # Different thread counts give the same bits (each thread owns fixed outputs); different chunkings only
    # reorder a sum.
    arrays = [t.numpy() for t in _gpu_net("gelu", "cross_entropy", torch.float64, E=2, n=30)]
    codes = (activation_code("gelu"), loss_code("cross_entropy"), 1.0, 1.0)
    r1 = _cuda._host_fused("grad", *arrays, None, *codes, TS=4, chunks=3, nthreads=1)
    r2 = _cuda._host_fused("grad", *arrays, None, *codes, TS=4, chunks=3, nthreads=64)
    r3 = _cuda._host_fused("grad", *arrays, None, *codes, TS=8, chunks=1, nthreads=5)
    for x, y, z in zip(r1, r2, r3):
        assert np.array_equal(x, y)
        assert_close(z, x)


def _gpu(tensors, dtype):
    return [None if t is None else t.to(dtype).cuda() for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_member", [False, True], ids=["shared-X", "per-member-X"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gpu_kernels_match_reference(dtype, act, loss, per_member, bias):
    # The GPU result and the numpy twin in the same dtype, each against the twin in long double (the twin against
    # torch autograd: test_twolayer_torch.py and the host emulation above).
    if not has_gpu:
        pytest.skip("no CUDA device")
    import physai.cuda as pc

    isc, osc = 0.7, 1.3
    numpy_dtype = np.float32 if dtype == torch.float32 else np.float64
    X, Y, W, b, a = _gpu_net(act, loss, dtype, bias=bias, per_member=per_member)
    g = torch.Generator().manual_seed(3)
    V = [None if t is None else torch.randn(t.shape, generator=g, dtype=dtype) for t in (W, b, a)]
    numpy = lambda ts: tuple(None if t is None else t.numpy() for t in ts)  # noqa: E731
    back = lambda ts: tuple(None if t is None else t.cpu().numpy() for t in ts)  # noqa: E731
    p, (Xn, Yn), v = _reference_params(W, b, a, act, isc, osc), numpy((X, Y)), numpy(V)
    p = p._replace(W=p.W.astype(numpy_dtype), b=None if p.b is None else p.b.astype(numpy_dtype),
                   a=p.a.astype(numpy_dtype))
    pt, Xt, Yt, vt = in_dtype(p, TRUTH_DTYPE, Xn, Yn, v)
    kw = dict(activation=act, input_scale=isc, output_scale=osc)
    F = pc.forward(*_gpu((X, W, b, a), dtype), **kw)
    assert_as_accurate_as_reference(F.cpu().numpy(), R.forward(p, Xn)[0], R.forward(pt, Xt)[0], numpy_dtype, "F")
    value, grads = pc.loss_and_grad(*_gpu((X, Y, W, b, a), dtype), loss=loss, **kw)
    assert_as_accurate_as_reference((value.cpu().numpy(), back(grads)), R.loss_and_grad(p, Xn, Yn, loss),
                                    R.loss_and_grad(pt, Xt, Yt, loss), numpy_dtype, "loss, gradient")
    hv = pc.hvp(*_gpu((X, Y, W, b, a), dtype), *_gpu(V, dtype), loss=loss, **kw)
    assert_as_accurate_as_reference(back(hv), R.hvp(p, Xn, Yn, v, loss), R.hvp(pt, Xt, Yt, vt, loss), numpy_dtype,
                                    "HVP")


@pytest.mark.gpu
@pytest.mark.parametrize("x_per_member,y_per_member", [(False, True), (True, False)])
def test_gpu_mixed_shared_and_per_member_inputs(x_per_member, y_per_member):
    if not has_gpu:
        pytest.skip("no CUDA device")
    import physai.cuda as pc

    X, Y, W, b, a = _gpu_net("tanh", "mse", torch.float64, E=3, per_member=True)
    X = X if x_per_member else X[0]
    Y = Y if y_per_member else Y[0]
    p = _reference_params(W, b, a, "tanh", 1.0, 1.0)
    lossv, grads = pc.loss_and_grad(*_gpu((X, Y, W, b, a), torch.float64), activation="tanh")
    ref_value, ref_grads = R.loss_and_grad(p, X.numpy(), Y.numpy(), "mse")
    assert_close(lossv.cpu().numpy(), ref_value)
    for got, expected in zip(grads, ref_grads):
        assert_close(got.cpu().numpy(), expected)


@pytest.mark.gpu
def test_gpu_is_deterministic():
    if not has_gpu:
        pytest.skip("no CUDA device")
    import physai.cuda as pc

    dev = _gpu(_gpu_net("tanh", "mse", torch.float32, n=5000), torch.float32)
    l1, g1 = pc.loss_and_grad(*dev, activation="tanh")
    l2, g2 = pc.loss_and_grad(*dev, activation="tanh")
    assert torch.equal(l1, l2) and all(torch.equal(x, y) for x, y in zip(g1, g2))


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_sharpness_matches_dense_eigh(bias):
    if not has_gpu:
        pytest.skip("no CUDA device")
    import physai.cuda as pc

    X, Y, W, b, a = _gpu_net("tanh", "mse", torch.float64, bias=bias, E=2, m=6, d=3, k=2, n=40)
    tol = 1e-10
    eig, v, matvecs, converged = pc.sharpness(*_gpu((X, Y, W, b, a), torch.float64), activation="tanh",
                                              max_matvecs=20000, tol=tol, return_vectors=True)
    assert converged.all() and (matvecs >= 1).all() and (matvecs <= 20000).all()
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
        # the residual test bounds the distance to the nearest eigenvalue by tol |theta| (Bauer-Fike, symmetric H)
        assert abs(eig[e].item() - top) <= tol * abs(top) * 1.01
        residual = H @ v[e].cpu().numpy() - eig[e].item() * v[e].cpu().numpy()
        assert np.linalg.norm(residual) <= tol * abs(eig[e].item()) * 1.01


@pytest.mark.gpu
def test_gpu_ensemble_loss_autograd_function():
    if not has_gpu:
        pytest.skip("no CUDA device")
    import physai.cuda as pc

    X, Y, W, b, a = _gpu(_gpu_net("softplus", "logistic", torch.float64), torch.float64)
    params = [t.clone().requires_grad_() for t in (W, b, a)]
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device="cuda")
    (pc.ensemble_loss(X, Y, *params, activation="softplus", loss="logistic") * weights).sum().backward()
    _, grads = pc.loss_and_grad(X, Y, W, b, a, activation="softplus", loss="logistic")
    for p, g in zip(params, grads):
        shape = (-1,) + (1,) * (g.dim() - 1)
        torch.testing.assert_close(p.grad, g * weights.view(shape))
