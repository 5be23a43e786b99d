"""torch as the independent oracle of the numpy reference and of the native training loop, and the torch wiring:
identical gradients to a plain torch MLP, native double backward for HVPs."""
import numpy as np
import pytest
from conftest import GRID, assert_close, copy_params, make_problem

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
