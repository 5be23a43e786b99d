"""CUDA two-layer kernels vs what a torch user would write: torch.func (vmap of grad / jvp-of-grad) on the same
GPU tensors. Skips without a CUDA device (all timings synchronize the device)."""
import pytest

from physai import _native

RATIOS = [
    ("cuda loss+grad vs torch.func vmap(grad), E=64 m=64 n=4096", "test_cuda_grad_torch_func", "test_cuda_grad_physai", 1.0),
    ("cuda hvp vs torch.func vmap(jvp(grad)), E=64 m=64 n=4096", "test_cuda_hvp_torch_func", "test_cuda_hvp_physai", 1.0),
]

E, M, D, K, N = 64, 64, 32, 1, 4096


@pytest.fixture(scope="module")
def net(torch):
    if not (_native.cuda_available() and torch.cuda.is_available()):
        pytest.skip("no CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(E, M, D, device="cuda", generator=g) / D**0.5
    a = torch.randn(E, K, M, device="cuda", generator=g) / M**0.5
    X = torch.randn(N, D, device="cuda", generator=g)
    Y = torch.randn(N, K, device="cuda", generator=g)
    return W, a, X, Y


def _loss(torch, W, a, X, Y):
    return 0.5 * ((torch.tanh(X @ W.T) @ a.T - Y) ** 2).mean()


def _synced(torch, fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def test_cuda_grad_physai(benchmark, torch, net):
    import physai.cuda as pc

    W, a, X, Y = net
    benchmark(_synced(torch, lambda: pc.loss_and_grad(X, Y, W, None, a, activation="tanh", loss="mse")))


def test_cuda_grad_torch_func(benchmark, torch, net):
    W, a, X, Y = net
    grad = torch.func.vmap(torch.func.grad(lambda W, a: _loss(torch, W, a, X, Y), argnums=(0, 1)))
    benchmark(_synced(torch, lambda: grad(W, a)))


def test_cuda_hvp_physai(benchmark, torch, net):
    import physai.cuda as pc

    W, a, X, Y = net
    vW, va = torch.randn_like(W), torch.randn_like(a)
    benchmark(_synced(torch, lambda: pc.hvp(X, Y, W, None, a, vW, None, va, activation="tanh", loss="mse")))


def test_cuda_hvp_torch_func(benchmark, torch, net):
    W, a, X, Y = net
    vW, va = torch.randn_like(W), torch.randn_like(a)

    def one(W, a, vW, va):
        g = torch.func.grad(lambda W, a: _loss(torch, W, a, X, Y), argnums=(0, 1))
        return torch.func.jvp(g, (W, a), (vW, va))[1]

    hvp = torch.func.vmap(one)
    benchmark(_synced(torch, lambda: hvp(W, a, vW, va)))
