"""The torch wiring: identical gradients to a plain torch MLP, native double backward for HVPs."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from physai.twolayer.torch import TwoLayerModule, torch_loss, torch_reference, two_layer, two_layer_loss  # noqa: E402


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
    second = torch.nn.Linear(4, 1)
    with torch.no_grad():
        second.bias.fill_(1.0)
    with pytest.raises(ValueError, match="bias"):
        TwoLayerModule.from_linear(torch.nn.Linear(3, 4), second)


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
