"""Two-layer kernels: native == numpy reference (the reference against torch autograd is in test_twolayer_torch.py)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import physai
from physai.twolayer import ACTIVATIONS, LOSSES, PARAMETERIZATIONS, TwoLayer, scaling
from physai.twolayer import reference as R

# (rtol, atol as a fraction of the largest magnitude in the expected array). Native and reference round differently;
# over GRID and the vector widths their gap stays below 1e-6 (fp32) and 2e-15 (fp64) of that magnitude.
TOL = {np.float64: (1e-12, 1e-13), np.float32: (1e-5, 1e-6)}


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


def assert_close(actual, expected, dtype=np.float64, what=""):
    """An array, or a tuple of arrays with None for an absent bias, within TOL[dtype]."""
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), what
        for x, y in zip(actual, expected):
            assert_close(x, y, dtype, what)
        return
    if actual is None or expected is None:
        assert actual is None and expected is None, what
        return
    rtol, atol = TOL[dtype]
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * np.abs(expected).max(initial=0), err_msg=what)


def assert_matches_reference(net, X, Y, v, loss, dtype, what):
    """Native forward, loss, gradient and HVP against the numpy reference."""
    p = net.reference_params()
    assert_close(net.forward(X), R.forward(p, X)[0], dtype, what)
    value, grads = net.loss_and_grad(X, Y, loss)
    ref_value, ref_grads = R.loss_and_grad(p, X, Y, loss)
    assert_close(value, ref_value, dtype, what)
    assert_close(grads, ref_grads, dtype, what)
    assert_close(net.hvp(X, Y, v, loss), R.hvp(p, X, Y, v, loss), dtype, what)


def copy_params(p):
    """The starting point of a run, kept apart from the model's arrays, which training updates in place."""
    return p._replace(W=p.W.copy(), b=None if p.b is None else p.b.copy(), a=p.a.copy())


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


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_lone_member_row_blocks_match_reference(activation, loss):
    # A lone small member runs fixed row blocks in parallel and sums their gradients (and HVPs) in block order; the
    # last block here is short. Training a lone member takes the same path, with full and mini-batches.
    net, X, Y, v = make_problem(activation, loss, "mup", E=1, n=300, d=6, m=9, k=3)
    p = net.reference_params()
    value, grads = net.loss_and_grad(X, Y, loss)
    ref_value, ref_grads = R.loss_and_grad(p, X, Y, loss)
    assert_close(value, ref_value)
    assert_close(grads, ref_grads)
    assert_close(net.hvp(X, Y, v, loss), R.hvp(p, X, Y, v, loss))
    start = copy_params(p)
    s = net.scaling
    for batch_size in (None, 150):
        losses = net.train(X, Y, 0.1, steps=5, loss=loss, batch_size=batch_size).losses
        ref_losses, final = R.train(start, X, Y, loss, np.array([0.1]), (s.lr_W, s.lr_b, s.lr_a), 5,
                                    batch_size=batch_size or 0)
        assert_close(losses, ref_losses)
        assert_close((net.W, net.b, net.a), (final.W, final.b, final.a))
        start = final


def assert_same_bits_for_any_thread_count(compute):
    """compute() -> list of arrays gives the same bits on 1, 2 and 3 threads (3: an odd count, so neither members
    nor blocks split evenly over the threads)."""
    results = []
    for threads in (1, 2, 3):
        with physai.num_threads(threads):
            results.append(compute())
    for threads, other in zip((2, 3), results[1:]):
        assert len(other) == len(results[0])
        for i, (x, y) in enumerate(zip(results[0], other)):
            np.testing.assert_array_equal(x, y, err_msg=f"result {i}, 1 vs {threads} threads")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_do_not_depend_on_thread_count(dtype):
    # a lone small member (parallel row blocks), a lone larger one (each GEMM split into fixed blocks, row-parallel
    # loops) and an ensemble (member-parallel)
    for E, n, m in ((1, 700, 300), (1, 4000, 480), (5, 300, 40)):
        net, X, Y, v = make_problem("gelu", "mse", "ntk", dtype, E=E, n=n, d=33, m=m, k=2)

        def compute():
            value, grads = net.loss_and_grad(X, Y)
            return [net.forward(X), value, *grads, *net.hvp(X, Y, v)]

        assert_same_bits_for_any_thread_count(compute)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("E", [3, 1])
def test_training_and_sharpness_do_not_depend_on_thread_count(E, dtype):
    # n m (d + k) is above the 2**17 from which a lone member splits its work. With E=1, full batches and 200-row
    # batches run parallel 128-row blocks; 128-row batches (and the last 100 rows of the 200-row schedule) and the
    # tracked steps' Hessian caches and gradients split each GEMM (m=130: blocks of 64, 64 and 2). With E=3 the
    # members run in parallel, and an eigensolver's last unconverged member splits its products alone.
    schedules = (dict(), dict(batch_size=200), dict(batch_size=128), dict(track_sharpness_every=1),
                 dict(batch_size=128, track_sharpness_every=2))

    def problem():
        return make_problem("tanh", "cross_entropy", "ntk", dtype, E=E, n=300, d=16, m=130, k=2, per_member_x=E > 1,
                            per_member_y=E > 1)

    def compute():
        results = []
        for schedule in schedules:
            net, X, Y, _ = problem()
            t = net.train(X, Y, 0.5, steps=6, loss="cross_entropy", **schedule)
            results += [t.losses, t.sharpness, t.matvecs, net.W, net.b, net.a]
        net, X, Y, _ = problem()
        for method, k in (("lanczos", 3), ("power", 1)):
            eig = net.sharpness(X, Y, k=k, method=method, loss="cross_entropy", tol=1e-5, max_iter=300)
            results += [eig.values, eig.vectors, eig.matvecs, eig.converged]
        return results

    assert_same_bits_for_any_thread_count(compute)


def test_native_train_matches_reference():
    net, X, Y, _ = make_problem("tanh", "mse", "mean-field", E=3, n=20, d=4, m=16, k=1)
    lr = np.array([0.05, 0.1, 0.2])
    start = copy_params(net.reference_params())
    losses = net.train(X, Y, lr, steps=100).losses
    s = net.scaling
    ref_losses, final = R.train(start, X, Y, "mse", lr, (s.lr_W, s.lr_b, s.lr_a), 100)
    assert_close(losses, ref_losses)
    assert_close((net.W, net.b, net.a), (final.W, final.b, final.a))


def test_minibatch_train_matches_reference():
    net, X, Y, _ = make_problem("relu", "logistic", "standard", E=2, n=25, d=3, m=8, k=1, per_member_x=True,
                                per_member_y=True)
    start = copy_params(net.reference_params())
    losses = net.train(X, Y, 0.5, steps=12, loss="logistic", batch_size=10).losses
    ref_losses, final = R.train(start, X, Y, "logistic", np.array([0.5, 0.5]), (1, 1, 1), 12, batch_size=10)
    assert_close(losses, ref_losses)
    assert_close((net.W, net.b, net.a), (final.W, final.b, final.a))


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


def yang_hu_mup(d, m):
    """Tensor Programs V, Table 3, SGD column, for input layer (fan_in d, fan_out m) and output layer (fan_in m):
    input weights and biases variance 1/fan_in and rate lr * fan_out; output weights variance 1/fan_in**2 and rate
    lr / fan_in; no multipliers."""
    return dict(std_W=math.sqrt(1 / d), std_a=math.sqrt(1 / m**2), input_scale=1, output_scale=1, lr_W=m, lr_b=m,
                lr_a=1 / m)


EXPECTED_SCALING = {
    # LeCun init: variance 1/fan_in, no multipliers
    "standard": lambda d, m: dict(std_W=d**-0.5, std_a=m**-0.5, input_scale=1, output_scale=1, lr_W=1, lr_b=1,
                                  lr_a=1),
    # Jacot et al.: unit-variance weights, the 1/sqrt(fan_in) moved into the forward pass
    "ntk": lambda d, m: dict(std_W=1, std_a=1, input_scale=d**-0.5, output_scale=m**-0.5, lr_W=1, lr_b=1, lr_a=1),
    # f = (1/m) sum_i a_i sigma(w_i . x / sqrt(d)), trained at rate lr * m
    "mean-field": lambda d, m: dict(std_W=1, std_a=1, input_scale=d**-0.5, output_scale=1 / m, lr_W=m, lr_b=m,
                                    lr_a=m),
    "mup": yang_hu_mup,
}


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("d,m", [(3, 64), (784, 1000)])  # d != m: a swapped argument shows
def test_scaling_table(param, d, m):
    got = scaling(param, d, m)
    for name, value in EXPECTED_SCALING[param](d, m).items():
        assert getattr(got, name) == pytest.approx(value, rel=1e-15), name
    assert TwoLayer(d, m, param=param).scaling == got


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_parameterization_init_statistics(param):
    # the output at init has the variance the table promises: O(1) for standard/ntk, O(1/m) for mean-field/mup
    d, m = 16, 2048
    net = TwoLayer(d, m, activation="linear", param=param, ensemble=8, dtype=np.float64, seed=1)
    X = np.random.default_rng(0).standard_normal((64, d))
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
    v = tuple(None if q is None else rng.standard_normal(q.shape) for q in (net.W, net.b, net.a))
    assert net.forward(X).shape == (E, n, k)
    value, grads = net.loss_and_grad(X, Y)
    hv = net.hvp(X, Y, v)
    assert value.shape == (E,)
    for g, h, q in zip(grads, hv, (net.W, net.b, net.a)):
        assert (g is None) == (h is None) == (q is None)
        assert q is None or g.shape == h.shape == q.shape
    if n == 0:  # the mean over no rows is taken as 0, with zero derivatives
        for x in (value, *grads, *hv):
            assert x is None or not x.any()
    p = net.reference_params()
    ref_value, ref_grads = R.loss_and_grad(p, X, Y, "mse")
    assert_close(value, ref_value)
    assert_close(grads, ref_grads)
    assert_close(hv, R.hvp(p, X, Y, v, "mse"))


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
    with pytest.raises(TypeError, match="lr: expected real"):
        net.train(X, Y, "0.1", steps=3)
    with pytest.raises(TypeError, match="lr: expected real"):
        net.train(X, Y, True, steps=3)
    with pytest.raises(ValueError, match="lr: expected finite .* in float32"):
        net.train(X, Y, 1e300, steps=3)  # finite in float64, not in the model's float32
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


def test_direction_parts_must_match_the_parameters():
    net, X, Y, v = make_problem(E=3)
    W, b, a = v
    for direction, match in [((W.transpose(0, 2, 1), b, a), "W part"), ((W[:1], b[:1], a[:1]), "W part"),
                             ((W, None, a), "b part is missing"), ((None, b, a), "W part is missing")]:
        with pytest.raises(ValueError, match=match):
            net.hvp(X, Y, direction)
    with pytest.raises(TypeError, match="three parts"):
        net.hvp(X, Y, (W, b))
    no_bias, X, Y, (W, _, a) = make_problem(E=3, bias=False)
    with pytest.raises(ValueError, match="no bias"):
        no_bias.hvp(X, Y, (W, np.zeros((3, W.shape[1])), a))


def test_read_only_inputs_are_read_and_parameters_updated_in_place_must_be_writeable():
    net, X, Y, _ = make_problem()
    expected = net.loss_and_grad(X, Y)
    X.setflags(write=False)
    Y.setflags(write=False)
    assert_close(net.loss_and_grad(X, Y), expected)
    net.train(X, Y, 0.1, 2)
    W = net.W.copy()
    W.setflags(write=False)
    net.W = W
    with pytest.raises(ValueError, match="W: expected a writeable array"):
        net.train(X, Y, 0.1, 2)


def test_nan_inputs_propagate_through_relu_like_the_reference():
    net, X, Y, _ = make_problem("relu", E=2, n=6)
    X[2, 1] = np.nan
    native, ref = net.forward(X), R.forward(net.reference_params(), X)[0]
    np.testing.assert_array_equal(np.isnan(native), np.isnan(ref))
    assert np.isnan(native[:, 2]).all() and not np.isnan(np.delete(native, 2, axis=1)).any()


def test_cross_entropy_with_huge_logits_matches_the_reference():
    # Logits 1e17 - 16, 1e17 and 1e17 + 16 (16 is one ulp there), exact through a 1-unit linear net: the loss and softmax see
    # differences of 16, which the log-sum-exp must not lose against the logits' magnitude.
    net = TwoLayer(1, 1, 3, activation="linear", bias=False, dtype=np.float64)
    net.W[:] = 1.0
    net.a[:] = (1e17 + np.array([-16.0, 0.0, 16.0]))[None, :, None]
    X, Y = np.ones((3, 1)), np.eye(3)
    value, (_, _, da) = net.loss_and_grad(X, Y, "cross_entropy")
    ref_value, (_, _, ref_da) = R.loss_and_grad(net.reference_params(), X, Y, "cross_entropy")
    # dW sums G a over logits of 1e17 whose weights nearly cancel: ill-conditioned in any summation order
    assert_close((value, da), (ref_value, ref_da))
    np.testing.assert_allclose(value, (32 + 16 + 0 + 3 * np.log1p(np.exp(-16) + np.exp(-32))) / 3, rtol=1e-12)


def test_same_init_starts_every_member_from_member_zero():
    shared = TwoLayer(4, 6, 2, "tanh", ensemble=3, same_init=True, seed=5)
    single = TwoLayer(4, 6, 2, "tanh", seed=5)
    for name in ("W", "b", "a"):
        np.testing.assert_array_equal(getattr(shared, name), np.broadcast_to(getattr(single, name), getattr(shared, name).shape))
    with pytest.raises(TypeError, match="same_init"):
        TwoLayer(4, 6, same_init=1)
