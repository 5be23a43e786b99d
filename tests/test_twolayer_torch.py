"""torch as the independent oracle of the numpy reference and of the native training loop, and the torch wiring:
identical gradients to a plain torch MLP, native double backward for HVPs."""
import gc

import numpy as np
import pytest
from conftest import TRUTH_DTYPE, GRID, assert_as_accurate_as_reference, assert_close, copy_params, make_problem

import physai
from physai import _core
from physai.twolayer import ACTIVATIONS
from physai.twolayer import reference as R

torch = pytest.importorskip("torch")

from physai.twolayer.torch import TwoLayerModule, torch_loss, torch_reference, two_layer, two_layer_loss  # noqa: E402


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
        assert_close(R.forward(p, X)[0], np.broadcast_to(F, (2, *F.shape[-2:])), what=what)
        ref_value, ref_grads = R.loss_and_grad(p, X, Y, loss)
        assert_close(ref_value, value, what=what)
        assert_close(ref_grads, grads, what=what)
        assert_close(R.hvp(p, X, Y, v, loss), hv, what=what)


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
    assert_close(net.hvp(X, Y, v, "cross_entropy"), [e.numpy() for e in expected])


@pytest.mark.parametrize("problem,lr,steps,batch_size", [
    (dict(activation="tanh", loss="mse", param="mean-field", E=3, n=20, d=4, m=16, k=1), [0.05, 0.1, 0.2], 100, None),
    # blocks of 10, 10 and 5 rows; muP's per-layer rates differ (m, m, 1/m)
    (dict(activation="relu", loss="logistic", param="mup", E=2, n=25, d=3, m=8, k=2, per_member_x=True,
          per_member_y=True), [0.05, 0.02], 50, 10),
])
def test_native_train_matches_a_torch_sgd_loop(problem, lr, steps, batch_size):
    net, X, Y, _ = make_problem(**problem)
    loss, s = problem["loss"], net.scaling
    start = copy_params(net.reference_params())
    # The native loop runs whole in native code: its parameters after each step are those of a run that stops there.
    # The last run's losses cover every step.
    trajectory = []
    for done in range(1, steps + 1):
        net.W, net.b, net.a = start.W.copy(), start.b.copy(), start.a.copy()
        losses = net.train(X, Y, lr, steps=done, loss=loss, batch_size=batch_size).losses
        trajectory.append((net.W, net.b, net.a))
    W, b, a = (torch.tensor(p, requires_grad=True) for p in (start.W, start.b, start.a))
    rates = torch.tensor(lr, dtype=torch.float64)
    n = X.shape[-2]
    batch = batch_size or n
    blocks = -(-n // batch)
    for step in range(steps):
        rows = slice(step % blocks * batch, (step % blocks + 1) * batch)
        F = torch_reference(torch.tensor(X[..., rows, :]), W, b, a, activation=net.activation,
                            input_scale=s.input_scale, output_scale=s.output_scale)
        value = torch_loss(F, torch.tensor(Y[..., rows, :]), loss)
        assert_close(losses[step], value.detach().numpy(), what=f"loss at step {step}")
        gW, gb, ga = torch.autograd.grad(value.sum(), [W, b, a])
        with torch.no_grad():
            W -= rates[:, None, None] * s.lr_W * gW
            b -= rates[:, None] * s.lr_b * gb
            a -= rates[:, None, None] * s.lr_a * ga
        assert_close(trajectory[step], tuple(t.detach().numpy() for t in (W, b, a)), what=f"after step {step}")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "softplus"])
@pytest.mark.parametrize("n", [40, 300])  # 300 rows: the native forward and backward run parallel row blocks
def test_drop_in_for_a_torch_mlp(activation, dtype, tol, n):
    torch.manual_seed(0)
    act = {"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(), "gelu": torch.nn.GELU(approximate="tanh"),
           "softplus": torch.nn.Softplus()}[activation]
    first, second = torch.nn.Linear(6, 32, dtype=dtype), torch.nn.Linear(32, 3, bias=False, dtype=dtype)
    mlp = torch.nn.Sequential(first, act, second)
    fused = TwoLayerModule.from_linear(first, second, activation)
    X = torch.randn(n, 6, dtype=dtype, requires_grad=True)
    target = torch.randn(n, 3, dtype=dtype)
    outputs = []
    for model in (mlp, fused):
        X.grad = None
        out = model(X)
        torch.nn.functional.mse_loss(out, target).backward()
        params = [p.grad.clone() for p in model.parameters()]
        outputs.append((out.detach(), X.grad.clone(), params))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = outputs
    torch.testing.assert_close(out_b, out_a, rtol=tol, atol=tol)
    torch.testing.assert_close(gx_b, gx_a, rtol=tol, atol=tol)
    for g_b, g_a in zip(gp_b, gp_a):
        torch.testing.assert_close(g_b, g_a, rtol=tol, atol=tol)


def test_double_backward_is_the_hessian_vector_product():
    torch.manual_seed(1)
    module = TwoLayerModule(5, 16, 2, "tanh", param="ntk", ensemble=3, dtype=torch.float64)
    X, Y = torch.randn(30, 5, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    params = list(module.parameters())
    v = [torch.randn_like(p) for p in params]
    loss = module.loss(X, Y).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hv = torch.autograd.grad(grads, params, v)
    kwargs = dict(activation="tanh", input_scale=module.scaling.input_scale, output_scale=module.scaling.output_scale)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref_loss = torch_loss(torch_reference(X, *ref_params, **kwargs), Y).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_params, create_graph=True)
    ref_hv = torch.autograd.grad(ref_grads, ref_params, v)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for x, y in zip(hv, ref_hv):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_functional_forms_and_errors():
    W, a = torch.randn(4, 3), torch.randn(1, 4)
    X = torch.randn(7, 3)
    assert two_layer(X, W, None, a).shape == (7, 1)
    assert two_layer_loss(X, torch.randn(7, 1), W, None, a).dim() == 0
    with pytest.raises(TypeError, match="X: expected float32 or float64"):
        two_layer(X.to(torch.int64), W, None, a)
    with pytest.raises(ValueError, match="W: expected"):
        two_layer(X, W[None, None], None, a)
    with pytest.raises(ValueError, match="activation"):
        two_layer(X, W, None, a, activation="swish")
    with pytest.raises(TypeError, match="dtype"):
        TwoLayerModule(3, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="ensemble"):
        TwoLayerModule(3, 4, ensemble=0)
    with pytest.raises(TypeError, match="ensemble"):
        TwoLayerModule(3, 4, ensemble=False)
    second = torch.nn.Linear(4, 1)
    with torch.no_grad():
        second.bias.fill_(1.0)
    with pytest.raises(ValueError, match="bias"):
        TwoLayerModule.from_linear(torch.nn.Linear(3, 4), second)
    with pytest.raises(TypeError, match="W: expected a torch.Tensor"):
        two_layer(X, W.tolist(), None, a)
    for grad in (False, True):  # with and without a gradient wanted
        with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="W: expected at least one input feature"):
            two_layer(torch.zeros(2, 0), torch.zeros(4, 0, requires_grad=True), None, a)
    with pytest.raises(TypeError, match="input_scale"):
        two_layer(X, W, None, a, input_scale="2")
    with pytest.raises(ValueError, match="second: expected 4 input features"):
        TwoLayerModule.from_linear(torch.nn.Linear(3, 4), torch.nn.Linear(5, 1, bias=False))
    with pytest.raises(TypeError, match="first: expected a torch.nn.Linear"):
        TwoLayerModule.from_linear(torch.nn.ReLU(), second)


def test_training_loop_with_the_module_learns():
    torch.manual_seed(2)
    module = TwoLayerModule(2, 64, 1, "relu")
    X = torch.randn(128, 2)
    Y = (X[:, :1] * X[:, 1:]).sign()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    first = None
    for _ in range(200):
        optimizer.zero_grad()
        loss = module.loss(X, Y, "logistic")
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first
    assert np.isfinite(loss.item())


def composed_model(dtype=torch.float64, activation="tanh", bias=True, seed=0):
    """Sequential(TwoLayerModule, Tanh, Linear) and the same network in plain torch layers."""
    torch.manual_seed(seed)
    fused = TwoLayerModule(3, 5, 2, activation, bias=bias, dtype=dtype)
    model = torch.nn.Sequential(fused, torch.nn.Tanh(), torch.nn.Linear(2, 1, dtype=dtype))
    first, second = torch.nn.Linear(3, 5, bias=bias, dtype=dtype), torch.nn.Linear(5, 2, bias=False, dtype=dtype)
    plain = torch.nn.Sequential(first, torch.nn.Tanh() if activation == "tanh" else torch.nn.ReLU(), second,
                                torch.nn.Tanh(), torch.nn.Linear(2, 1, dtype=dtype))
    with torch.no_grad():
        first.weight.copy_(fused.W)
        if bias:
            first.bias.copy_(fused.b)
        second.weight.copy_(fused.a)
        plain[4].weight.copy_(model[2].weight)
        plain[4].bias.copy_(model[2].bias)
    return model, plain


@pytest.mark.parametrize("bias", [True, False])
def test_fused_module_inside_a_larger_model_has_the_dense_hessian(bias):
    from physai.spectrum import hessian_eigs

    model, plain = composed_model(bias=bias)
    X, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
    mse = torch.nn.functional.mse_loss
    params = [p.detach() for p in plain.parameters()]
    sizes = [p.numel() for p in params]

    def loss(flat):
        chunks = dict(zip([n for n, _ in plain.named_parameters()], (c.view_as(p) for c, p in zip(flat.split(sizes),
                                                                                                   params))))
        return mse(torch.func.functional_call(plain, chunks, (X,)), y)

    exact = np.linalg.eigvalsh(torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in params])))
    result = hessian_eigs(model, mse, (X, y), k=3, which="BE", tol=1e-10)
    np.testing.assert_allclose(result.values[0], np.r_[exact[::-1][:2], exact[:1]], rtol=1e-9)


def test_fused_function_gradcheck_gradgradcheck_and_forward_mode():
    torch.manual_seed(1)
    W, b, a = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((4, 3), (4,), (2, 4)))
    X = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    f = lambda X, W, b, a: two_layer(X, W, b, a, activation="gelu", input_scale=0.7, output_scale=1.3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (X, W, b, a))
    assert torch.autograd.gradgradcheck(f, (X, W, b, a))
    assert torch.autograd.gradcheck(f, (X, W, b, a), check_forward_ad=True, check_backward_ad=False,
                                    check_batched_grad=False)


def test_fused_function_under_torch_func_transforms():
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    torch.manual_seed(2)
    module = TwoLayerModule(3, 6, 2, "tanh", dtype=torch.float64)
    params = {name: p.detach() for name, p in module.named_parameters()}
    reference = lambda p, x: torch_reference(x, p["W"], p["b"], p["a"], activation="tanh")  # noqa: E731
    fused = lambda p, x: functional_call(module, p, (x,))  # noqa: E731
    X = torch.randn(2, 4, 3, dtype=torch.float64)  # leading dimensions, as nn.Linear takes them
    torch.testing.assert_close(fused(params, X), reference(params, X), rtol=1e-12, atol=1e-12)
    # vmap over inputs, over parameters (a native ensemble), and over both
    torch.testing.assert_close(vmap(fused, (None, 0))(params, X), reference(params, X))
    stacked = {name: torch.stack([p, 2 * p]) for name, p in params.items()}
    expected = torch.stack([reference({n: s[i] for n, s in stacked.items()}, X[i]) for i in range(2)])
    torch.testing.assert_close(vmap(fused)(stacked, X), expected)
    shared_input = torch.stack([reference({n: s[i] for n, s in stacked.items()}, X[0]) for i in range(2)])
    torch.testing.assert_close(vmap(fused, (0, None))(stacked, X[0]), shared_input)
    # grad, forward-over-reverse and Jacobians agree with the torch-op network
    scalar = lambda f: lambda p: (f(p, X) ** 2).sum()  # noqa: E731
    tangent = {name: torch.randn_like(p) for name, p in params.items()}
    for got, want in ((grad(scalar(fused))(params), grad(scalar(reference))(params)),
                      (jvp(grad(scalar(fused)), (params,), (tangent,))[1],
                       jvp(grad(scalar(reference)), (params,), (tangent,))[1]),
                      (jacrev(fused)(params, X), jacrev(reference)(params, X))):
        for name in params:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)


def test_fused_loss_forward_over_reverse_is_the_native_hvp():
    from torch.func import grad, jvp

    torch.manual_seed(3)
    X, Y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    W, b, a = (torch.randn(*shape, dtype=torch.float64) for shape in ((5, 3), (5,), (2, 5)))
    tangents = tuple(torch.randn_like(t) for t in (W, b, a))
    fused = lambda W, b, a: two_layer_loss(X, Y, W, b, a, activation="tanh")  # noqa: E731
    plain = lambda W, b, a: torch_loss(torch_reference(X, W, b, a, activation="tanh"), Y)  # noqa: E731
    got = jvp(grad(fused, argnums=(0, 1, 2)), (W, b, a), tangents)[1]
    want = jvp(grad(plain, argnums=(0, 1, 2)), (W, b, a), tangents)[1]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


# --- the forward that saves the hidden layer, and the backward from it (the drop-in's training path) ---------------

def saved_problem(activation, dtype, E, n, m, shared_x=True, bias=True, k=3, d=5, seed=0):
    """Parameters (as TwoLayer's reference Params), X, and output gradients G [E, n, k] of the given shapes."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((E, m, d)) / np.sqrt(d)).astype(dtype)
    b = (0.3 * rng.standard_normal((E, m))).astype(dtype) if bias else None
    a = (rng.standard_normal((E, k, m)) / np.sqrt(m)).astype(dtype)
    X = rng.standard_normal((n, d) if shared_x else (E, n, d)).astype(dtype)
    G = rng.standard_normal((E, n, k)).astype(dtype)
    return R.Params(W, b, a, 0.7, 1.3, activation), X, G


def native_saving(p, X):
    """forward_saving into freshly allocated outputs: (F, S, D1)."""
    E, m, k, n = p.W.shape[0], p.W.shape[1], p.a.shape[1], X.shape[-2]
    config = _core.twolayer.Config(p.input_scale, p.output_scale, getattr(_core.twolayer.Activation, p.activation))
    F, S = np.empty((E, n, k), p.W.dtype), np.empty((E, n, m), p.W.dtype)
    D1 = None if p.activation in R.SLOPE_FROM_VALUE else np.empty((E, n, m), p.W.dtype)
    _core.twolayer.forward_saving(X, p.W, p.b, p.a, config, F, S, D1)
    return F, S, D1


def native_saved_backward(p, X, G, S, D1, want_dX):
    """backward_saved into freshly allocated outputs: (dW, db, da, dX), None where not asked for."""
    E, n, d = p.W.shape[0], X.shape[-2], p.W.shape[2]
    config = _core.twolayer.Config(p.input_scale, p.output_scale, getattr(_core.twolayer.Activation, p.activation))
    dW, da = np.empty_like(p.W), np.empty_like(p.a)
    db = None if p.b is None else np.empty_like(p.b)
    dX = np.empty((E, n, d), p.W.dtype) if want_dX else None
    _core.twolayer.backward_saved(X, G, p.W, p.b, p.a, S, D1, config, dW, db, da, dX)
    return dW, db, da, dX


# (E, n, m, shared X): one tile and one column block; several row tiles with a short last one, several column blocks
# with a narrow last one; an ensemble of per-member inputs; an empty batch
SAVED_SHAPES = [(1, 40, 24, True), (1, 700, 200, True), (3, 300, 70, False), (2, 0, 9, True)]


@pytest.mark.parametrize("want_dX", [False, True], ids=["no-dX", "dX"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SAVED_SHAPES, ids=lambda s: "E{}-n{}-m{}-{}".format(*s[:3], "shared" if s[3] else "own"))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saved_forward_and_backward_match_the_twin(activation, dtype, shape, bias, want_dX):
    E, n, m, shared = shape
    p, X, G = saved_problem(activation, dtype, E, n, m, shared, bias)
    pt = p._replace(W=p.W.astype(TRUTH_DTYPE), b=None if p.b is None else p.b.astype(TRUTH_DTYPE),
                    a=p.a.astype(TRUTH_DTYPE))
    Xt, Gt = X.astype(TRUTH_DTYPE), G.astype(TRUTH_DTYPE)
    F, S, D1 = native_saving(p, X)
    twin, truth = R.forward_saving(p, X), R.forward_saving(pt, Xt)
    assert (D1 is None) == (activation in R.SLOPE_FROM_VALUE) == (twin[2] is None)
    assert_as_accurate_as_reference((F, S, D1), twin, truth, dtype, f"{activation} forward_saving")
    grads = native_saved_backward(p, X, G, S, D1, want_dX)
    twin_grads = R.backward_saved(p, X, G, *twin[1:])
    true_grads = R.backward_saved(pt, Xt, Gt, *truth[1:])
    if not want_dX:
        twin_grads, true_grads = twin_grads[:3] + (None,), true_grads[:3] + (None,)
    assert_as_accurate_as_reference(grads, twin_grads, true_grads, dtype, f"{activation} backward_saved")


# The row kernels take blocks of rows and outputs by shape (output layer: 8 rows for one output, 3 rows x 4 outputs
# for m >= 128 and k >= 4, else 4 rows x 2 outputs; backward: one row at a time up to two outputs, else 4 rows):
# output counts and widths on either side of those cuts, with rows and widths that leave remainders (37 rows; 70
# and 130 units: not multiples of 3, 4 or 8, nor of a vector).
@pytest.mark.parametrize("m", [70, 130])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_saved_kernels_match_the_twin_for_any_output_count(activation, dtype, k, m):
    p, X, G = saved_problem(activation, dtype, 1, 37, m, k=k)
    pt = p._replace(W=p.W.astype(TRUTH_DTYPE), b=p.b.astype(TRUTH_DTYPE), a=p.a.astype(TRUTH_DTYPE))
    Xt, Gt = X.astype(TRUTH_DTYPE), G.astype(TRUTH_DTYPE)
    F, S, D1 = native_saving(p, X)
    twin, truth = R.forward_saving(p, X), R.forward_saving(pt, Xt)
    assert_as_accurate_as_reference((F, S, D1), twin, truth, dtype, f"k={k} forward_saving")
    grads = native_saved_backward(p, X, G, S, D1, True)
    assert_as_accurate_as_reference(grads, R.backward_saved(p, X, G, *twin[1:]),
                                    R.backward_saved(pt, Xt, Gt, *truth[1:]), dtype, f"k={k} backward_saved")


@pytest.mark.parametrize("m", [70, 130])
@pytest.mark.parametrize("k", [1, 5, 10])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_saved_forward_sums_a_row_alike_in_any_block(dtype, k, m):
    # The last of 37 rows falls outside every block of rows; the same row repeated 37 times sits in the first block.
    p, X, _ = saved_problem("relu", dtype, 1, 37, m, k=k)
    F, S, _ = native_saving(p, X)
    F_repeated, S_repeated, _ = native_saving(p, np.ascontiguousarray(X[[36] * 37]))
    if not np.array_equal(S_repeated[0, 0], S[0, 36]):  # the premise, from BLAS: the same hidden row
        pytest.skip("this BLAS sums a row of the hidden layer differently by its position")
    np.testing.assert_array_equal(F_repeated[0, 0], F[0, 36])
    np.testing.assert_array_equal(F_repeated[0], np.broadcast_to(F[0, 36], F_repeated[0].shape))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saved_backward_twin_matches_torch_autograd(activation):
    p, X, G = saved_problem(activation, np.float64, 2, 30, 11, shared_x=False)
    F, S, D1 = R.forward_saving(p, X)
    dW, db, da, dX = R.backward_saved(p, X, G, S, D1)
    params = [torch.tensor(x, requires_grad=True) for x in (X, p.W, p.b, p.a)]
    out = torch_reference(*params, activation=activation, input_scale=p.input_scale, output_scale=p.output_scale)
    expected = torch.autograd.grad(out, params, torch.tensor(G))
    assert_close(F, out.detach().numpy(), what=f"{activation} F")
    assert_close((dX, dW, db, da), tuple(g.numpy() for g in expected), what=f"{activation} gradients")


@pytest.mark.parametrize("want_dX", [False, True], ids=["no-dX", "dX"])
@pytest.mark.parametrize("shape", [(1, 700, 200, True), (3, 300, 70, False)], ids=["lone", "ensemble"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_saved_kernels_do_not_depend_on_thread_count(activation, shape, want_dX):
    p, X, G = saved_problem(activation, np.float32, *shape)
    results = []
    for threads in (1, 2, 3):
        with physai.num_threads(threads):
            F, S, D1 = native_saving(p, X)
            results.append([x for x in (F, S, D1, *native_saved_backward(p, X, G, S, D1, want_dX)) if x is not None])
    for threads, other in zip((2, 3), results[1:]):
        for i, (x, y) in enumerate(zip(results[0], other)):
            np.testing.assert_array_equal(x, y, err_msg=f"result {i}, 1 vs {threads} threads")


# Inputs of the wide layer: at 256 its dW and dX products (N K = 2^18) run on the micro-kernels where
# micro_values allows (float on the CPUs of micro_large_float_limits), at 264 on BLAS everywhere.
WIDE_INPUTS = [256, 264]


def wide_saved_problem(activation, dtype, d, bias=True, several_steps=True):
    """A wide layer (m d >= gemm_wide_operand), whose backward cuts the rows into blocks (at most wide_saved_blocks,
    of wide_saved_min_rows rows at least), each with its own gradients summed in block order and run in steps of at
    most wide_saved_rows rows: four blocks of two steps each (a full one and a short one), or two one-step blocks."""
    schedule = _core.twolayer.schedule
    blocks = schedule["wide_saved_blocks"]
    n = blocks * schedule["wide_saved_rows"] + 100 if several_steps else 2 * schedule["wide_saved_min_rows"] + 3
    m = 1024
    assert d * m >= schedule["gemm_wide_operand"]
    return saved_problem(activation, dtype, 1, n, m, True, bias, d=d)


@pytest.mark.parametrize("d", WIDE_INPUTS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("several_steps", [True, False], ids=["4-blocks-2-steps", "2-blocks"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ["tanh", "gelu"])  # sigma' read off S, and kept
def test_wide_saved_backward_matches_the_twin(activation, bias, several_steps, d):
    # float32 against a float64 truth (a long-double one at this size takes minutes)
    p, X, G = wide_saved_problem(activation, np.float32, d, bias, several_steps)
    pt = p._replace(W=p.W.astype(np.float64), b=None if p.b is None else p.b.astype(np.float64),
                    a=p.a.astype(np.float64))
    Xt, Gt = X.astype(np.float64), G.astype(np.float64)
    F, S, D1 = native_saving(p, X)
    twin, truth = R.forward_saving(p, X), R.forward_saving(pt, Xt)
    assert_as_accurate_as_reference((F, S, D1), twin, truth, np.float32, f"{activation} wide forward_saving")
    grads = native_saved_backward(p, X, G, S, D1, True)
    assert_as_accurate_as_reference(grads, R.backward_saved(p, X, G, *twin[1:]),
                                    R.backward_saved(pt, Xt, Gt, *truth[1:]), np.float32,
                                    f"{activation} wide backward_saved")


@pytest.mark.parametrize("d", WIDE_INPUTS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("several_steps", [True, False], ids=["4-blocks-2-steps", "2-blocks"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_wide_saved_kernels_do_not_depend_on_thread_count(dtype, several_steps, d):
    p, X, G = wide_saved_problem("gelu", dtype, d, several_steps=several_steps)
    results = []
    for threads in (1, 2, 3):
        with physai.num_threads(threads):
            F, S, D1 = native_saving(p, X)
            results.append([F, S, D1, *native_saved_backward(p, X, G, S, D1, True)])
    for threads, other in zip((2, 3), results[1:]):
        for i, (x, y) in enumerate(zip(results[0], other)):
            np.testing.assert_array_equal(x, y, err_msg=f"result {i}, 1 vs {threads} threads")


def test_saved_kernels_refuse_bad_arguments():
    p, X, G = saved_problem("relu", np.float32, 1, 10, 6)
    F, S, _ = native_saving(p, X)
    config = _core.twolayer.Config(1.0, 1.0, _core.twolayer.Activation.relu)
    with pytest.raises(ValueError, match="D1: expected None"):
        _core.twolayer.forward_saving(X, p.W, p.b, p.a, config, F, S, np.empty_like(S))
    gelu = _core.twolayer.Config(1.0, 1.0, _core.twolayer.Activation.gelu)
    with pytest.raises(ValueError, match="D1: expected an array"):
        _core.twolayer.forward_saving(X, p.W, p.b, p.a, gelu, F, S, None)
    with pytest.raises(ValueError, match="S: expected extent 6"):
        _core.twolayer.forward_saving(X, p.W, p.b, p.a, config, F, S[:, :, :5].copy(), None)
    with pytest.raises(TypeError, match="F: expected dtype float32"):
        _core.twolayer.forward_saving(X, p.W, p.b, p.a, config, F.astype(np.float64), S, None)
    read_only = F.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="F: expected a writeable array"):
        _core.twolayer.forward_saving(X, p.W, p.b, p.a, config, read_only, S, None)
    dW, db, da, _ = native_saved_backward(p, X, G, S, None, False)
    with pytest.raises(ValueError, match="db: expected an array exactly when b is given"):
        _core.twolayer.backward_saved(X, G, p.W, p.b, p.a, S, None, config, dW, None, da, None)
    with pytest.raises(ValueError, match="G: expected extent 10"):
        _core.twolayer.backward_saved(X, G[:, :4], p.W, p.b, p.a, S, None, config, dW, db, da, None)
    with pytest.raises(ValueError, match="dX: expected extent"):
        _core.twolayer.backward_saved(X, G, p.W, p.b, p.a, S, None, config, dW, db, da, np.empty((1, 10, 4), np.float32))


def saving_grad_fn(out) -> bool:
    return type(out.grad_fn).__name__ == "_SavingTwoLayerFunctionBackward"


def test_a_training_step_takes_the_saving_path_and_nothing_else_does():
    module = TwoLayerModule(4, 8, 2, "tanh")
    X = torch.randn(6, 4)
    assert saving_grad_fn(module(X))
    with torch.no_grad():
        assert module(X).grad_fn is None
    frozen = TwoLayerModule(4, 8, 2, "tanh").requires_grad_(False)
    assert frozen(X).grad_fn is None
    assert saving_grad_fn(frozen(X.requires_grad_()))  # the input's gradient alone is a training step too
    assert not saving_grad_fn(torch.func.vmap(module)(torch.randn(3, 6, 4)))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(X.detach(), torch.randn(6, 4))
        assert not saving_grad_fn(module(dual))


@pytest.mark.parametrize(("ensemble", "x_shape"), [(None, (40, 5)), (None, (2, 3, 5)), (None, (5,)), (3, (40, 5)),
                                                  (3, (3, 40, 5))],
                         ids=["rows", "leading-dims", "one-sample", "ensemble-shared-X", "ensemble-own-X"])
def test_evaluation_without_gradients_equals_torch_ops(ensemble, x_shape):
    # Under torch.no_grad the module calls the native forward with no Function around it: same shapes and values
    torch.manual_seed(5)
    module = TwoLayerModule(5, 12, 3, "softplus", ensemble=ensemble, dtype=torch.float64)
    X = torch.randn(*x_shape, dtype=torch.float64)
    with torch.no_grad():
        out = module(X)
        reference = torch_reference(X, module.W, module.b, module.a, activation="softplus")
    assert out.grad_fn is None and out.dtype == torch.float64
    torch.testing.assert_close(out, reference.reshape(out.shape), rtol=1e-12, atol=1e-13)
    assert out.shape == ((*x_shape[:-1], 3) if ensemble is None else (ensemble, x_shape[-2], 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("x_shape", [(40, 5), (2, 3, 5), (5,)], ids=["rows", "leading-dims", "one-sample"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_saving_path_gradients_equal_torch_autograd(activation, bias, x_shape, dtype):
    torch.manual_seed(4)
    module = TwoLayerModule(5, 12, 3, activation, bias=bias, dtype=dtype)
    X = torch.randn(*x_shape, dtype=dtype).requires_grad_()
    out = module(X)
    assert saving_grad_fn(out) and out.shape == (*x_shape[:-1], 3)
    weights = torch.randn(out.shape, dtype=dtype)
    (out * weights).sum().backward()
    params = [p.detach().clone().requires_grad_() for p in (module.W, module.b, module.a) if p is not None]
    X2 = X.detach().clone().requires_grad_()
    W, a = params[0], params[-1]
    # (torch_reference broadcasts the bias of a one-sample input to one row: compare in the module's shape)
    reference = torch_reference(X2, W, params[1] if bias else None, a, activation=activation).reshape(out.shape)
    (reference * weights).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(out.detach(), reference.detach(), **tol)
    torch.testing.assert_close(X.grad, X2.grad, **tol)
    for got, want in zip([p for p in (module.W, module.b, module.a) if p is not None], params):
        torch.testing.assert_close(got.grad, want.grad, **tol)


@pytest.mark.parametrize("per_member_x", [False, True], ids=["shared-X", "per-member-X"])
def test_saving_path_for_an_ensemble_module(per_member_x):
    torch.manual_seed(5)
    module = TwoLayerModule(4, 9, 2, "gelu", param="ntk", ensemble=3, dtype=torch.float64)
    X = torch.randn(*((3,) if per_member_x else ()), 20, 4, dtype=torch.float64, requires_grad=True)
    out = module(X)
    assert saving_grad_fn(out) and out.shape == (3, 20, 2)
    out.square().sum().backward()
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    X2 = X.detach().clone().requires_grad_()
    s = module.scaling
    torch_reference(X2, *params, activation="gelu", input_scale=s.input_scale,
                    output_scale=s.output_scale).square().sum().backward()
    for got, want in zip([X, *module.parameters()], [X2, *params]):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-13)


def test_saving_path_keeps_autograd_contracts():
    torch.manual_seed(6)
    module = TwoLayerModule(3, 7, 2, "relu", dtype=torch.float64)
    X = torch.randn(10, 3, dtype=torch.float64)
    # retain_graph: a second backward through the same saved tensors gives the same gradients
    loss = module(X).square().sum()
    loss.backward(retain_graph=True)
    first = module.W.grad.clone()
    module.W.grad = None
    loss.backward()
    torch.testing.assert_close(module.W.grad, first, rtol=0, atol=0)
    # a parameter changed in place between forward and backward is refused, as torch's own layers do
    out = module(X)
    with torch.no_grad():
        module.W.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # create_graph: the backward is differentiable (double backward equals the torch-op network's)
    params = list(module.parameters())
    grads = torch.autograd.grad(module(X).square().sum(), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * g).sum() for g in grads), params)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref_grads = torch.autograd.grad(torch_reference(X, *ref_params).square().sum(), ref_params, create_graph=True)
    ref_hv = torch.autograd.grad(sum((g * g).sum() for g in ref_grads), ref_params)
    for x, y in zip(hv, ref_hv):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    # a non-contiguous input
    wide = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(module(wide.t()), torch_reference(wide.t(), *params).detach(), rtol=1e-12, atol=1e-12)


def test_saving_path_holds_its_hidden_layer_only_through_the_saved_tensors():
    """Checkpointing (a saved-tensor hook that drops what the forward saves and recomputes it) frees the hidden layer
    between forward and backward: the Function keeps nothing of it outside its saved tensors."""
    import tracemalloc

    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    n, m = 2048, 512
    module, X = TwoLayerModule(8, m, 1, "tanh"), torch.randn(n, 8)
    hidden_bytes = n * m * 4  # S, float32
    held = {}
    calls = {"plain": lambda: module(X), "checkpoint": lambda: checkpoint(module, X, use_reentrant=False)}
    for name, call in calls.items():
        call().sum().backward()  # first calls load code: not what is measured
        gc.collect()
        tracemalloc.start()
        out = call()
        gc.collect()
        held[name] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        out.sum().backward()
    assert held["plain"] >= hidden_bytes  # the measurement sees S where it is saved
    assert held["checkpoint"] < hidden_bytes / 4, held


def test_saving_path_takes_its_inputs_from_the_saved_tensors():
    """A saved-tensor hook that copies (offloading, checkpointing) hands the backward the values of the forward even
    after an in-place change of the parameters: the gradient is that of those values, as torch's own layers give."""
    torch.manual_seed(0)
    module = TwoLayerModule(3, 5, 2, "tanh").double()
    original = {name: p.detach().clone() for name, p in module.named_parameters()}
    X = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        F = module(X)
    with torch.no_grad():
        module.W.mul_(2)
        module.a.mul_(-1)
    F.pow(2).sum().backward()
    X_ref = X.detach().clone().requires_grad_()
    params = {name: p.clone().requires_grad_() for name, p in original.items()}
    torch.func.functional_call(module, params, (X_ref,)).pow(2).sum().backward()
    torch.testing.assert_close(X.grad, X_ref.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(module.W.grad, params["W"].grad, rtol=1e-12, atol=1e-14)
