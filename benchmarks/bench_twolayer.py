"""Two-layer kernels vs the GEMM bound (numpy matmuls of the same shapes), torch eager, torch.func.vmap,
torch double backward, and a torch training loop. fp32, physai's default threads (all cores)."""
import numpy as np
import pytest

from physai.twolayer import TwoLayer

RATIOS = [
    ("two-layer large (n=4096,d=m=1024,k=10) fwd+bwd: native vs numpy GEMM bound (goal: within 1.3x)",
     "test_large_numpy_gemms", "test_large_native", 1 / 1.3),
    ("two-layer large fwd+bwd: native vs torch eager", "test_large_torch", "test_large_native", 1.0),
    ("two-layer small (n=256,d=32,m=64,k=1) fwd+bwd: native vs torch eager", "test_small_torch", "test_small_native", 10),
    ("ensemble E=256 small nets fwd+bwd: native vs torch.func.vmap", "test_ensemble_vmap", "test_ensemble_native", 10),
    ("HVP (n=2048,d=64,m=256): one native gradient vs one native HVP at cached activations (goal: within 2.5x)",
     "test_hvp_grad_native", "test_hvp_native", 0.4),
    ("HVP (n=2048,d=64,m=256): one native gradient vs operator setup + one HVP (information)", "test_hvp_grad_native",
     "test_hvp_native_with_setup", 0.0),
    ("HVP (n=2048,d=64,m=256): native vs torch double backward on a retained graph", "test_hvp_torch",
     "test_hvp_native", 3),
    ("train: 1000 full-batch GD steps, E=64 nets (n=128,d=16,m=32): native vs torch loop", "test_train_torch",
     "test_train_native", 20),
]


def problem(n, d, m, k, E=1, seed=0, activation="tanh"):
    net = TwoLayer(d, m, k, activation, "standard", ensemble=E, dtype=np.float32, seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d), dtype=np.float32)
    Y = rng.standard_normal((n, k), dtype=np.float32)
    return net, X, Y


def torch_params(torch, net, requires_grad=True):
    single = net.ensemble == 1
    pick = (lambda x: x[0]) if single else (lambda x: x)
    return [torch.tensor(pick(p), requires_grad=requires_grad) for p in (net.W, net.b, net.a)]


def torch_loss_and_grad(torch, X, Y, params):
    W, b, a = params
    F = torch.tanh(X @ W.transpose(-1, -2) + b.unsqueeze(-2)) @ a.transpose(-1, -2)
    loss = 0.5 * ((F - Y) ** 2).mean()
    return torch.autograd.grad(loss, params)


# -- large ------------------------------------------------------------------------------------------------------
LARGE = dict(n=4096, d=1024, m=1024, k=10)


@pytest.fixture(scope="module")
def large():
    return problem(**LARGE)


def test_large_native(benchmark, large):
    net, X, Y = large
    benchmark(net.loss_and_grad, X, Y)


def test_large_numpy_gemms(benchmark, large):
    net, X, Y = large
    W, a = net.W[0], net.a[0]
    S = np.tanh(X @ W.T)
    G = np.ones((LARGE["n"], LARGE["k"]), np.float32)

    def matmuls():
        Z = X @ W.T          # pre-activations
        F = S @ a.T          # outputs
        da = G.T @ S         # output-layer gradient
        dS = G @ a           # backprop into the hidden layer
        dW = dS.T @ X        # input-layer gradient
        return Z, F, da, dW

    benchmark(matmuls)


def test_large_torch(benchmark, large, torch):
    net, X, Y = large
    params = torch_params(torch, net)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    benchmark(torch_loss_and_grad, torch, Xt, Yt, params)


# -- small ------------------------------------------------------------------------------------------------------
SMALL = dict(n=256, d=32, m=64, k=1)


def test_small_native(benchmark):
    net, X, Y = problem(**SMALL)
    benchmark(net.loss_and_grad, X, Y)


def test_small_torch(benchmark, torch):
    net, X, Y = problem(**SMALL)
    params = torch_params(torch, net)
    benchmark(torch_loss_and_grad, torch, torch.from_numpy(X), torch.from_numpy(Y), params)


# -- ensemble ---------------------------------------------------------------------------------------------------
def test_ensemble_native(benchmark):
    net, X, Y = problem(**SMALL, E=256)
    benchmark(net.loss_and_grad, X, Y)


def test_ensemble_vmap(benchmark, torch):
    from torch.func import grad, vmap

    net, X, Y = problem(**SMALL, E=256)
    W, b, a = torch_params(torch, net, requires_grad=False)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)

    def member_loss(W, b, a):
        F = torch.tanh(Xt @ W.T + b) @ a.T
        return 0.5 * ((F - Yt) ** 2).mean()

    batched = vmap(grad(member_loss, argnums=(0, 1, 2)))
    benchmark(batched, W, b, a)


# -- HVP --------------------------------------------------------------------------------------------------------
HVP = dict(n=2048, d=64, m=256, k=1)


@pytest.fixture(scope="module")
def hvp_problem():
    net, X, Y = problem(**HVP)
    rng = np.random.default_rng(1)
    v = tuple(rng.standard_normal(p.shape, dtype=np.float32) for p in (net.W, net.b, net.a))
    return net, X, Y, v


def test_hvp_grad_native(benchmark, hvp_problem):
    net, X, Y, _ = hvp_problem
    benchmark(net.loss_and_grad, X, Y)


def test_hvp_native(benchmark, hvp_problem):
    # HVPs come in runs at fixed parameters (Lanczos, power iteration): the operator caches sigma, sigma', sigma''
    # once and each product is timed, as the torch side below reuses its retained graph.
    net, X, Y, v = hvp_problem
    operator = net.hessian_operator(X, Y)
    V = net.flatten(v)
    benchmark(operator.native.matvec, V)


def test_hvp_native_with_setup(benchmark, hvp_problem):
    net, X, Y, v = hvp_problem
    benchmark(net.hvp, X, Y, v)


def test_hvp_torch(benchmark, hvp_problem, torch):
    # torch double backward as PyHessian does it: the gradient graph is built once, each HVP is one more backward
    net, X, Y, v = hvp_problem
    params = torch_params(torch, net)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    vt = [torch.from_numpy(x[0]) for x in v]
    W, b, a = params
    F = torch.tanh(Xt @ W.T + b) @ a.T
    loss = 0.5 * ((F - Yt) ** 2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    benchmark(torch.autograd.grad, grads, params, vt, retain_graph=True)


# -- training loop ----------------------------------------------------------------------------------------------
TRAIN = dict(n=128, d=16, m=32, k=1, E=64)
STEPS = 1000


def test_train_native(benchmark):
    def run():
        net, X, Y = problem(**TRAIN)
        return net.train(X, Y, np.linspace(0.01, 0.5, TRAIN["E"]), STEPS)

    benchmark.pedantic(run, rounds=3, iterations=1)


def test_train_torch(benchmark, torch):
    def run():
        net, X, Y = problem(**TRAIN)
        params = torch_params(torch, net)
        Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
        lr = torch.linspace(0.01, 0.5, TRAIN["E"])
        losses = []
        for _ in range(STEPS):
            W, b, a = params
            F = torch.tanh(Xt @ W.transpose(1, 2) + b.unsqueeze(1)) @ a.transpose(1, 2)
            loss = 0.5 * ((F - Yt) ** 2).mean((1, 2))
            grads = torch.autograd.grad(loss.sum(), params)
            with torch.no_grad():
                W -= lr[:, None, None] * grads[0]
                b -= lr[:, None] * grads[1]
                a -= lr[:, None, None] * grads[2]
            losses.append(loss.detach())
        return torch.stack(losses)

    benchmark.pedantic(run, rounds=3, iterations=1)
