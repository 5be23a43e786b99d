"""TwoLayerModule as a drop-in inside a plain torch training loop, against what it replaces.

Each loop runs 50 full-batch steps of: ``opt.zero_grad()``, ``F.mse_loss(model(X), Y)``, ``loss.backward()``,
``opt.step()`` (torch.optim.SGD, lr 1e-3, relu), from the same initial weights, fp32, default threads. The subject
is ``TwoLayerModule.from_linear`` (the fused forward and backward behind a torch.autograd.Function); the baseline the
``nn.Sequential(Linear(d, m), ReLU(), Linear(m, k, bias=False))`` it replaces. The floor is the same loop around a
torch.autograd.Function of the same parameters whose forward and backward hand back new zero tensors: torch's own
per-step work (the Function call, F.mse_loss, the autograd engine, zero_grad, the SGD update), which no drop-in can
avoid; Sequential / floor is the most any drop-in could gain at that point. The three loops of a point are timed
round by round in one benchmark (``conftest.interleaved``), so a load that comes and goes on a shared machine slows
them alike; report.py judges them as ``test_torch_loop[<point>]::sequential``, ``::physai`` and ``::floor``. The
GEMM bound is numpy running the five matmuls of one step (Z = X W^T, F = S a^T, da = G^T S, dS = G a, dW = dS^T X)
50 times, at the two large points (information: how close to the machine's GEMM rate the fused loop runs); it runs
apart, as OpenBLAS's threads spin after it. The loops declare their FLOP count (the five GEMMs, 4 n d m + 6 n m k
per step) so report.py prints GFLOP/s and the fraction of the sgemm rate.
"""
import numpy as np
import pytest
from conftest import interleaved, two_layer_gemms

STEPS = 50
LR = 1e-3

# (id, n, d, m, k, goal of Sequential / TwoLayerModule). Goal 1.5 where torch is not GEMM-bound (d <= 128 or
# m <= 256); 1.0 (never slower) at n=4096, d=m=1024, where torch already runs near the GEMM bound.
# The two small sizes run with one output and with ten (the k of the large ones), so the output layer's small GEMMs
# are measured where they are a large part of the step; a two-dimensional input (the toy data of many dynamics
# studies) runs X W^T with a two-term sum and dZ^T X with two columns. Inputs of 128 and 200 give dZ^T X 128 or 200
# columns over a step of up to 2048 rows (the micro-kernels' limit on N K, micro_values, decides its path); at 200,
# X W^T sums more than 128 terms (micro_transposed_side decides its path).
POINTS = [
    ("n4096_d100_m1024_k10", 4096, 100, 1024, 10, 1.5),
    ("n256_d32_m64_k1", 256, 32, 64, 1, 1.5),
    ("n256_d32_m64_k10", 256, 32, 64, 10, 1.5),
    ("n1024_d64_m256_k1", 1024, 64, 256, 1, 1.5),
    ("n1024_d64_m256_k10", 1024, 64, 256, 10, 1.5),
    ("n1024_d2_m256_k1", 1024, 2, 256, 1, 1.5),
    ("n2048_d128_m256_k10", 2048, 128, 256, 10, 1.5),
    ("n1024_d200_m256_k10", 1024, 200, 256, 10, 1.5),
    ("n4096_d1024_m1024_k10", 4096, 1024, 1024, 10, 1.0),
]
IDS = [point[0] for point in POINTS]
LARGE_IDS = {"n4096_d1024_m1024_k10"}

# numpy of the same shapes is a GEMM bound only where the GEMMs are large; at small shapes its per-call cost (and
# OpenBLAS threading on a loaded machine) dominates, and the bound printed is the FLOP count at the measured sgemm
# rate (report.py's compute table: "sgemm bound ms" and "of sgemm").
NUMPY_BOUND_IDS = ["n4096_d100_m1024_k10", "n4096_d1024_m1024_k10"]

RATIOS = []
for _id, _n, _d, _m, _k, _goal in POINTS:
    _loops = f"test_torch_loop[{_id}]::"
    RATIOS.append((f"torch_loop {_id} (50 SGD steps, relu, F.mse_loss): nn.Sequential / TwoLayerModule",
                   _loops + "sequential", _loops + "physai", _goal))
    RATIOS.append((f"torch_loop {_id}: nn.Sequential / a drop-in whose kernels take no time (information: the most "
                   "any drop-in can gain over torch's own per-step work here)", _loops + "sequential",
                   _loops + "floor", 0.0))
    if _id in NUMPY_BOUND_IDS:
        RATIOS.append((f"torch_loop {_id}: GEMM bound (numpy, same 5 matmuls x 50) / TwoLayerModule (information)",
                       f"test_torch_loop_gemm_bound[{_id}]", _loops + "physai", 0.0))
        RATIOS.append((f"torch_loop {_id}: GEMM bound / nn.Sequential (information: is torch GEMM-bound here?)",
                       f"test_torch_loop_gemm_bound[{_id}]", _loops + "sequential", 0.0))


def flops(n, d, m, k):
    """The five GEMMs of one forward + backward step (elementwise work not counted), times STEPS."""
    return STEPS * (4 * n * d * m + 6 * n * m * k)


def _point(request):
    return next(p for p in POINTS if p[0] == request.param)


@pytest.fixture(scope="module", params=IDS)
def point(request, torch):
    _id, n, d, m, k, _ = _point(request)
    torch.manual_seed(0)
    first, second = torch.nn.Linear(d, m), torch.nn.Linear(m, k, bias=False)
    X, Y = torch.randn(n, d), torch.randn(n, k)
    state = {"first": {k_: v.clone() for k_, v in first.state_dict().items()},
             "second": {k_: v.clone() for k_, v in second.state_dict().items()}}
    return dict(id=_id, n=n, d=d, m=m, k=k, first=first, second=second, X=X, Y=Y, state=state)


def _loop(torch, model, X, Y):
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def run():
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(X), Y)
            loss.backward()
            opt.step()
        return loss.detach()

    return run


def _sequential(torch, p):
    first, second = torch.nn.Linear(p["d"], p["m"]), torch.nn.Linear(p["m"], p["k"], bias=False)
    first.load_state_dict(p["state"]["first"])
    second.load_state_dict(p["state"]["second"])
    return torch.nn.Sequential(first, torch.nn.ReLU(), second)


def _fused(torch, p):
    from physai.twolayer.torch import TwoLayerModule

    seq = _sequential(torch, p)
    return TwoLayerModule.from_linear(seq[0], seq[2], activation="relu")


def test_torch_loop(benchmark, torch, point):
    p = point
    physai_run = _loop(torch, _fused(torch, p), p["X"], p["Y"])
    sequential_run = _loop(torch, _sequential(torch, p), p["X"], p["Y"])
    floor_run = _loop(torch, _no_kernels(torch, p["n"], p["k"], p["first"].weight, p["first"].bias,
                                         p["second"].weight), p["X"], p["Y"])
    # from the same weights, the first 50 steps end at the same loss (a drop-in computes the same thing)
    reference, final = sequential_run(), physai_run()
    assert torch.allclose(final, reference, rtol=1e-3, atol=1e-5), (float(final), float(reference))
    work = flops(p["n"], p["d"], p["m"], p["k"])
    # 17 GFLOP a step at the largest point: two rounds of 50 steps each after interleaved's warm-up round
    interleaved(benchmark, {"sequential": sequential_run, "physai": physai_run, "floor": floor_run},
                info={"sequential": {"flops": work}, "physai": {"flops": work}},
                rounds=2 if p["id"] in LARGE_IDS else None)


def test_torch_loop_gemm_bound(benchmark, torch, point):
    p = point
    if p["id"] not in NUMPY_BOUND_IDS:
        pytest.skip("small shapes: the bound is the FLOP count at the sgemm rate (report.py)")
    n, d, m, k = p["n"], p["d"], p["m"], p["k"]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32)
    W = rng.standard_normal((m, d), dtype=np.float32)
    a = rng.standard_normal((k, m), dtype=np.float32)
    S = np.maximum(X @ W.T, 0)
    G = rng.standard_normal((n, k), dtype=np.float32)

    def run():
        for _ in range(STEPS):
            out = two_layer_gemms(X, W, a, S, G)
        return out

    benchmark.extra_info.update(flops=flops(n, d, m, k))
    if p["id"] in LARGE_IDS:  # 17 GFLOP a step: two rounds of 50 steps
        benchmark.pedantic(run, rounds=2, iterations=1)
    else:
        benchmark(run)


def _no_kernels(torch, n, k, W, b, a):
    """A module with parameters like (W, b, a) behind an autograd.Function whose forward and backward compute
    nothing: they hand back new zero tensors (autograd takes a new gradient over as .grad, as it does the drop-in's,
    where one it has seen before would be copied)."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, X, W, b, a):
            return torch.zeros(n, k)

        @staticmethod
        def backward(ctx, grad):
            return None, torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(a)

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.b, self.a = (torch.nn.Parameter(p.detach().clone()) for p in (W, b, a))

        def forward(self, X):
            return Function.apply(X, self.W, self.b, self.a)

    return Module()
