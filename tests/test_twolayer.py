"""Two-layer kernels: native == numpy reference, and reference == torch autograd (the independent oracle)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import physai
from physai.twolayer import ACTIVATIONS, LOSSES, PARAMETERIZATIONS, TwoLayer
from physai.twolayer import reference as R

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-4, atol=2e-5)}


def make_problem(activation="tanh", loss="mse", param="standard", dtype=np.float64, E=2, n=13, d=5, m=7, k=3,
                 bias=True, per_member_x=False, per_member_y=False, seed=0):
    net = TwoLayer(d, m, k, activation, param, bias=bias, ensemble=E, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    if bias:
        net.b[:] = 0.3 * rng.standard_normal(net.b.shape)
    X = rng.standard_normal((E, n, d) if per_member_x else (n, d)).astype(dtype)
    yshape = (E, n, k) if per_member_y else (n, k)
    if loss == "logistic":
        Y = np.sign(rng.standard_normal(yshape)).astype(dtype)
    elif loss == "cross_entropy":
        Y = np.eye(k, dtype=dtype)[rng.integers(0, k, yshape[:-1])]
    else:
        Y = rng.standard_normal(yshape).astype(dtype)
    direction = tuple(None if p is None else rng.standard_normal(p.shape).astype(dtype) for p in (net.W, net.b, net.a))
    return net, X, Y, direction


def assert_close(actual, expected, dtype, what=""):
    for x, y in zip(actual, expected):
        if x is None or y is None:
            assert x is None and y is None, what
            continue
        np.testing.assert_allclose(x, y, **TOL[dtype], err_msg=what)


def assert_matches_reference(net, X, Y, v, loss, dtype, what):
    """Native forward, loss, gradient and HVP against the numpy reference."""
    p = net.reference_params()
    np.testing.assert_allclose(net.forward(X), R.forward(p, X)[0], **TOL[dtype], err_msg=what)
    value, grads = net.loss_and_grad(X, Y, loss)
    ref_value, ref_grads = R.loss_and_grad(p, X, Y, loss)
    np.testing.assert_allclose(value, ref_value, **TOL[dtype], err_msg=what)
    assert_close(grads, ref_grads, dtype, what)
    assert_close(net.hvp(X, Y, v, loss), R.hvp(p, X, Y, v, loss), dtype, what)


GRID = [(act, loss, param) for act in ACTIVATIONS for loss in LOSSES for param in PARAMETERIZATIONS]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("activation,loss,param", GRID)
def test_native_matches_reference(activation, loss, param, dtype):
    for per_member in (False, True):
        net, X, Y, v = make_problem(activation, loss, param, dtype, per_member_x=per_member, per_member_y=per_member)
        assert_matches_reference(net, X, Y, v, loss, dtype,
                                 f"{activation}/{loss}/{param}/{np.dtype(dtype).name}/per_member={per_member}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("m", [8, 24, 37, 70])
@pytest.mark.parametrize("k", [1, 3])
def test_vector_widths_match_reference(m, k, dtype):
    # The row loops (dot products, column combinations, sums over rows) run whole vectors of 8 floats or 4 doubles,
    # in blocks of 4, 2 and 1 vectors, then single columns: these widths exercise every combination. E=1 with
    # n=200 takes the parallel row-block path, E=2 the member-parallel one.
    for E, n in ((1, 200), (2, 45)):
        for loss in LOSSES:
            net, X, Y, v = make_problem("softplus", loss, "standard", dtype, E=E, n=n, d=11, m=m, k=k)
            assert_matches_reference(net, X, Y, v, loss, dtype, f"m={m} k={k} E={E} {loss} {np.dtype(dtype).name}")


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-6), (np.float64, 1e-14)])
def test_native_tanh_is_accurate(dtype, rtol):
    # One unit with W = a = 1: the outputs are tanh of the inputs themselves, over a wide grid, against double tanh.
    net = TwoLayer(1, 1, 1, "tanh", bias=False, dtype=dtype)
    net.W[:] = 1.0
    net.a[:] = 1.0
    x = np.concatenate([np.linspace(-20, 20, 200_001), np.geomspace(1e-12, 20, 10_001)]).astype(dtype)
    expected = np.tanh(x.astype(np.float64))
    np.testing.assert_allclose(net.forward(x[:, None])[0, :, 0], expected, rtol=rtol, atol=0)


def test_reused_scratch_memory_leaves_no_trace():
    # Kernels keep per-thread scratch buffers between calls; a call after calls of other shapes must give the same
    # bits as the first call of its shape.
    def run(m, n):
        net, X, Y, v = make_problem("tanh", "mse", "standard", np.float64, E=1, n=n, d=9, m=m, k=2)
        value, grads = net.loss_and_grad(X, Y)
        return [value, *grads, *net.hvp(X, Y, v), net.forward(X)]

    first = run(20, 300)
    for m, n in ((200, 1000), (3, 5), (50, 129)):
        run(m, n)
    for x, y in zip(first, run(20, 300)):
        np.testing.assert_array_equal(x, y)


def test_hvp_of_zero_rows_is_zero_and_leaves_other_members_alone():
    # Eigensolvers feed zero rows for members that have converged; the operator skips them.
    net, X, Y, _ = make_problem("gelu", "logistic", "mup", np.float64, E=3, n=40, d=4, m=12, k=2)
    operator = net.hessian_operator(X, Y, "logistic")
    V = np.random.default_rng(3).standard_normal((3, net.num_params))
    full = operator.matvec(V)
    V[1] = 0.0
    partial = operator.matvec(V)
    np.testing.assert_array_equal(partial[1], 0.0)
    np.testing.assert_array_equal(partial[[0, 2]], full[[0, 2]])


torch = pytest.importorskip("torch")
from physai.twolayer.torch import torch_loss, torch_reference  # noqa: E402


def torch_oracle(net, X, Y, v, loss):
    """Loss, gradient and HVP of the same network written in plain torch ops, by autograd (double backward)."""
    params = [torch.tensor(p, requires_grad=True) for p in (net.W, net.b, net.a) if p is not None]
    W, a = params[0], params[-1]
    b = params[1] if net.b is not None else None
    F = torch_reference(torch.tensor(X), W, b, a, activation=net.activation, input_scale=net.scaling.input_scale,
                        output_scale=net.scaling.output_scale)
    value = torch_loss(F, torch.tensor(Y), loss)
    grads = torch.autograd.grad(value.sum(), params, create_graph=True)
    hv = torch.autograd.grad(grads, params, [torch.tensor(x) for x in v if x is not None])
    expand = lambda ts: (ts[0], ts[1] if net.b is not None else None, ts[-1])
    return (F.detach().numpy(), value.detach().numpy(), expand([g.detach().numpy() for g in grads]),
            expand([h.numpy() for h in hv]))


@pytest.mark.parametrize("activation,loss,param", GRID)
def test_reference_matches_torch_autograd(activation, loss, param):
    for per_member, bias in ((False, True), (True, False)):
        net, X, Y, v = make_problem(activation, loss, param, E=2, per_member_x=per_member, per_member_y=per_member,
                                    bias=bias)
        p = net.reference_params()
        F, value, grads, hv = torch_oracle(net, X, Y, v, loss)
        what = f"{activation}/{loss}/{param}/bias={bias}"
        np.testing.assert_allclose(R.forward(p, X)[0], np.broadcast_to(F, (2, *F.shape[-2:])), rtol=1e-10, err_msg=what)
        ref_value, ref_grads = R.loss_and_grad(p, X, Y, loss)
        np.testing.assert_allclose(ref_value, value, rtol=1e-10, err_msg=what)
        assert_close(ref_grads, grads, np.float64, what)
        assert_close(R.hvp(p, X, Y, v, loss), hv, np.float64, what)


def test_hvp_matches_torch_func_forward_over_reverse():
    from torch.func import grad, jvp

    net, X, Y, v = make_problem("gelu", "cross_entropy", "mup", E=1)
    Xt, Yt = torch.tensor(X), torch.tensor(Y)

    def loss_of(W, b, a):
        F = torch_reference(Xt, W, b, a, activation="gelu", input_scale=net.scaling.input_scale,
                            output_scale=net.scaling.output_scale)
        return torch_loss(F, Yt, "cross_entropy").sum()

    primals = tuple(torch.tensor(p) for p in (net.W, net.b, net.a))
    _, expected = jvp(grad(loss_of, argnums=(0, 1, 2)), primals, tuple(torch.tensor(x) for x in v))
    assert_close(net.hvp(X, Y, v, "cross_entropy"), [e.numpy() for e in expected], np.float64)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_lone_member_row_blocks_match_reference(activation, loss):
    # A lone small member runs fixed row blocks in parallel and sums their gradients (and HVPs) in block order; the
    # last block here is short. Training a lone member takes the same path, with full and mini-batches.
    net, X, Y, v = make_problem(activation, loss, "mup", E=1, n=300, d=6, m=9, k=3)
    p = net.reference_params()
    value, grads = net.loss_and_grad(X, Y, loss)
    ref_value, ref_grads = R.loss_and_grad(p, X, Y, loss)
    np.testing.assert_allclose(value, ref_value, **TOL[np.float64])
    assert_close(grads, ref_grads, np.float64)
    assert_close(net.hvp(X, Y, v, loss), R.hvp(p, X, Y, v, loss), np.float64)
    start = p._replace(W=p.W.copy(), b=p.b.copy(), a=p.a.copy())
    s = net.scaling
    for batch_size in (None, 150):
        losses = net.train(X, Y, 0.1, steps=5, loss=loss, batch_size=batch_size).losses
        ref_losses, final = R.train(start, X, Y, loss, np.array([0.1]), (s.lr_W, s.lr_b, s.lr_a), 5,
                                    batch_size=batch_size or 0)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
        assert_close((net.W, net.b, net.a), (final.W, final.b, final.a), np.float64)
        start = final


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_do_not_depend_on_thread_count(dtype):
    # a lone small member (parallel row blocks), a lone larger one (each GEMM split into fixed blocks, row-parallel
    # loops) and an ensemble (member-parallel)
    for E, n, m in ((1, 700, 300), (1, 4000, 480), (5, 300, 40)):
        net, X, Y, v = make_problem("gelu", "mse", "ntk", dtype, E=E, n=n, d=33, m=m, k=2)
        results = []
        for threads in (1, 2):
            with physai.num_threads(threads):
                value, grads = net.loss_and_grad(X, Y)
                results.append([net.forward(X), value, *grads, *net.hvp(X, Y, v)])
        for x, y in zip(*results):
            np.testing.assert_array_equal(x, y)


def test_native_train_matches_reference_and_torch_loop():
    net, X, Y, _ = make_problem("tanh", "mse", "mean-field", E=3, n=20, d=4, m=16, k=1)
    lr = np.array([0.05, 0.1, 0.2])
    start = net.reference_params()
    start = start._replace(W=start.W.copy(), b=start.b.copy(), a=start.a.copy())
    losses = net.train(X, Y, lr, steps=100).losses
    s = net.scaling
    ref_losses, final = R.train(start, X, Y, "mse", lr, (s.lr_W, s.lr_b, s.lr_a), 100)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
    assert_close((net.W, net.b, net.a), (final.W, final.b, final.a), np.float64)
    # a plain torch SGD loop, step by step
    W, b, a = (torch.tensor(p, requires_grad=True) for p in (start.W, start.b, start.a))
    rates = torch.tensor(lr)
    for step in range(100):
        F = torch_reference(torch.tensor(X), W, b, a, activation="tanh", input_scale=s.input_scale,
                            output_scale=s.output_scale)
        value = torch_loss(F, torch.tensor(Y), "mse")
        np.testing.assert_allclose(losses[step], value.detach().numpy(), rtol=1e-10)
        gW, gb, ga = torch.autograd.grad(value.sum(), [W, b, a])
        with torch.no_grad():
            W -= rates[:, None, None] * s.lr_W * gW
            b -= rates[:, None] * s.lr_b * gb
            a -= rates[:, None, None] * s.lr_a * ga
    np.testing.assert_allclose(net.W, W.detach().numpy(), rtol=1e-9, atol=1e-12)


def test_minibatch_train_matches_reference():
    net, X, Y, _ = make_problem("relu", "logistic", "standard", E=2, n=25, d=3, m=8, k=1, per_member_x=True,
                                per_member_y=True)
    start = net.reference_params()
    start = start._replace(W=start.W.copy(), b=start.b.copy(), a=start.a.copy())
    losses = net.train(X, Y, 0.5, steps=12, loss="logistic", batch_size=10).losses
    ref_losses, final = R.train(start, X, Y, "logistic", np.array([0.5, 0.5]), (1, 1, 1), 12, batch_size=10)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
    np.testing.assert_allclose(net.W, final.W, rtol=1e-10)


def test_ensemble_members_are_independent():
    net, X, Y, v = make_problem("softplus", "mse", "standard", E=4)
    value, grads = net.loss_and_grad(X, Y)
    single = TwoLayer(5, 7, 3, "softplus", "standard", ensemble=1, dtype=np.float64)
    for e in range(4):
        single.W, single.b, single.a = net.W[e:e + 1].copy(), net.b[e:e + 1].copy(), net.a[e:e + 1].copy()
        value_e, grads_e = single.loss_and_grad(X, Y)
        np.testing.assert_array_equal(value_e, value[e:e + 1])
        for g, g_e in zip(grads, grads_e):
            np.testing.assert_array_equal(g[e:e + 1], g_e)


def test_member_init_does_not_depend_on_ensemble_size():
    small, big = TwoLayer(3, 4, ensemble=2, seed=5), TwoLayer(3, 4, ensemble=6, seed=5)
    np.testing.assert_array_equal(small.W, big.W[:2])
    assert not np.array_equal(big.W[0], big.W[1])


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_parameterization_init_statistics(param):
    # the output at init has the variance the table promises: O(1) for standard/ntk, O(1/m) for mean-field/mup
    d, m = 16, 2048
    net = TwoLayer(d, m, activation="linear", param=param, ensemble=8, dtype=np.float64, seed=1)
    X = np.random.default_rng(0).standard_normal((64, d)) / 1.0
    F = net.forward(X)
    expected = 1.0 if param in ("standard", "ntk") else 1.0 / m
    ratio = F.var() / (expected * (X**2).sum(1).mean() / d)
    assert 0.6 < ratio < 1.6


@given(E=st.integers(1, 3), n=st.integers(0, 9), d=st.integers(1, 6), m=st.integers(1, 9), k=st.integers(1, 3),
       bias=st.booleans(), per_member=st.booleans())
def test_shapes_hypothesis(E, n, d, m, k, bias, per_member):
    net = TwoLayer(d, m, k, "tanh", ensemble=E, bias=bias, dtype=np.float64)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((E, n, d) if per_member else (n, d))
    Y = rng.standard_normal((n, k))
    assert net.forward(X).shape == (E, n, k)
    value, (dW, db, da) = net.loss_and_grad(X, Y)
    assert value.shape == (E,) and dW.shape == net.W.shape and da.shape == net.a.shape
    assert (db is None) == (not bias)
    p = net.reference_params()
    if n > 0:
        ref_value, ref_grads = R.loss_and_grad(p, X, Y, "mse")
        np.testing.assert_allclose(value, ref_value, rtol=1e-10)
    v = tuple(None if q is None else np.ones_like(q) for q in (net.W, net.b, net.a))
    hv = net.hvp(X, Y, v)
    assert hv[0].shape == net.W.shape


@pytest.mark.parametrize("call,error,match", [
    (lambda: TwoLayer(0, 4), ValueError, "d:"),
    (lambda: TwoLayer(3, 0), ValueError, "m:"),
    (lambda: TwoLayer(3, 4, activation="sigmoid"), ValueError, "activation"),
    (lambda: TwoLayer(3, 4, param="xavier"), ValueError, "param"),
    (lambda: TwoLayer(3, 4, dtype=np.int32), TypeError, "dtype"),
    (lambda: TwoLayer(3, 4, ensemble=0), ValueError, "ensemble"),
    (lambda: TwoLayer(3, 4, bias=1), TypeError, "bias"),
])
def test_bad_construction(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_call_arguments():
    net = TwoLayer(3, 4, k=2)
    X, Y = np.zeros((5, 3), np.float32), np.zeros((5, 2), np.float32)
    with pytest.raises(TypeError, match="X: expected dtype float32"):
        net.forward(X.astype(np.float64))
    with pytest.raises(ValueError, match="X: expected shape"):
        net.forward(np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        net.forward(np.zeros((3, 5), np.float32).T)
    with pytest.raises(ValueError, match="Y: expected shape"):
        net.loss_and_grad(X, np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="loss"):
        net.loss_and_grad(X, Y, loss="hinge")
    with pytest.raises(ValueError, match="lr"):
        net.train(X, Y, float("nan"), steps=3)
    with pytest.raises(ValueError, match="lr"):
        net.train(X, Y, [0.1, 0.2], steps=3)
    with pytest.raises(ValueError, match="steps"):
        net.train(X, Y, 0.1, steps=-1)
    with pytest.raises(TypeError, match="X: expected a numpy array"):
        net.forward([[0.0, 0.0, 0.0]])
    with pytest.raises(TypeError, match="W: expected dtype float32"):
        net.W = np.zeros((1, 4, 3), np.float64)
    with pytest.raises(ValueError, match="a: expected shape"):
        net.a = np.zeros((1, 3, 4), np.float32)
    with pytest.raises(ValueError, match="b: the model was built with bias=True"):
        net.b = None
    with pytest.raises(ValueError, match="X: expected shape"):
        net.forward(np.zeros((2, 5, 3), np.float32))
    assert net.W.dtype == np.float32  # a refused assignment leaves the parameter as it was


def test_native_layer_rechecks_shapes():
    from physai import _core

    config = _core.twolayer.Config(1.0, 1.0, 0)
    W, a = np.zeros((1, 4, 3)), np.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="X"):
        _core.twolayer.forward_f64(np.zeros((5, 2)), W, None, a, config)
    with pytest.raises(TypeError, match="W: expected dtype"):
        _core.twolayer.forward_f64(np.zeros((5, 3)), W.astype(np.float32), None, a, config)
    with pytest.raises(ValueError, match="activation"):
        _core.twolayer.forward_f64(np.zeros((5, 3)), W, None, a, _core.twolayer.Config(1.0, 1.0, 99))


def test_from_arrays_shares_and_checks_the_arrays():
    W, a = np.zeros((2, 4, 3)), np.zeros((2, 1, 4))
    net = TwoLayer.from_arrays(W, None, a, "tanh", "ntk")
    assert net.W is W and net.b is None and net.num_params == 4 * 3 + 4
    assert net.scaling.output_scale == pytest.approx(0.5)
    with pytest.raises(TypeError, match="a: expected dtype float64"):
        TwoLayer.from_arrays(W, None, a.astype(np.float32))
    with pytest.raises(ValueError, match="b: expected shape"):
        TwoLayer.from_arrays(W, np.zeros((2, 5)), a)
