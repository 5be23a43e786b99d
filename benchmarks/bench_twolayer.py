"""Two-layer kernels vs the GEMM bound (numpy matmuls of the same shapes), torch eager, torch.func.vmap,
torch double backward, and a torch training loop. fp32, physai's default threads (all cores)."""
import functools

import numpy as np
import pytest
from conftest import OPENBLAS_SPIN_SECONDS, interleaved, two_layer_gemms

from physai.twolayer import TwoLayer

RATIOS = [
    ("two-layer large (n=4096,d=m=1024,k=10) fwd+bwd: native vs numpy GEMM bound (goal: 0.9 of the bound)",
     "test_large::numpy_gemms", "test_large::native", 0.9),
    ("two-layer large fwd+bwd: native vs torch eager", "test_large::torch", "test_large::native", 1.0),
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
    ("ensemble E=256 small nets HVP (cached operator): native vs torch.func.vmap(hvp) (information)",
     "test_ensemble_hvp_vmap", "test_ensemble_hvp_native", 0.0),
    ("HVP large (n=4096,d=m=1024,k=10): native vs torch double backward on a retained graph",
     "test_large_hvp_torch", "test_large_hvp_native", 1.0),
]

# Peak resident memory (MiB above the resident set before the call) of one call: (label, baseline, subject, goal),
# judged as baseline / subject like RATIOS (goal 1: the fused kernel needs no more memory than torch).
MEMORY = [
    ("peak memory, loss+grad large (n=4096,d=m=1024,k=10): torch autograd / native fused", "test_large::torch",
     "test_large::native", 1.0),
    ("peak memory, HVP large: torch (grad graph + double backward) / native (operator setup + one product)",
     "test_large_hvp_torch", "test_large_hvp_native", 1.0),
]

# FLOP counts: only the GEMMs (elementwise work not counted), per member.
def flops_grad(n, d, m, k, E=1):
    """Forward + backward: Z = X W^T, F = S a^T, da = G^T S, dS = G a, dW = dS^T X."""
    return E * (4 * n * d * m + 6 * n * m * k)


def flops_hvp(n, d, m, k, E=1):
    """One R-operator product: R{Z} = X vW^T and R{dW} = R{dZ}^T X, plus R{F}, R{da}, R{dS} (two products each)."""
    return E * (4 * n * d * m + 12 * n * m * k)


_PEAK_CHILD = r"""
import gc, importlib.util, os, re, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # the benchmarks' conftest helpers
spec = importlib.util.spec_from_file_location("bench_twolayer", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
call = bench._peak_cases()[sys.argv[2]]()  # builds the inputs; returns the call to measure
def status(key):
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) / 1024
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark VmHWM to the current resident set
before = status("VmRSS")
result = call()
print(status("VmHWM") - before)
"""


def _peak_cases():
    """name -> a function that builds the inputs (large size) and returns the call whose peak memory is measured."""
    def native_grad():
        net, X, Y = problem(**LARGE)
        return lambda: net.loss_and_grad(X, Y)

    def native_hvp():
        net, X, Y = problem(**LARGE)
        v = _large_direction(net)
        return lambda: net.hvp(X, Y, v)

    def torch_grad():
        import torch

        net, X, Y = problem(**LARGE)
        params, Xt, Yt = torch_params(torch, net), torch.from_numpy(X), torch.from_numpy(Y)
        return lambda: torch_loss_and_grad(torch, Xt, Yt, params)

    def torch_hvp():
        import torch

        net, X, Y = problem(**LARGE)
        params, Xt, Yt = torch_params(torch, net), torch.from_numpy(X), torch.from_numpy(Y)
        vt = [torch.from_numpy(x[0]) for x in _large_direction(net)]

        def graph_and_hvp():
            grads = torch.autograd.grad(eager_loss(Xt, Yt, *params), params, create_graph=True)
            return torch.autograd.grad(grads, params, vt)

        return graph_and_hvp

    return dict(native_grad=native_grad, native_hvp=native_hvp, torch_grad=torch_grad, torch_hvp=torch_hvp)


def peak_memory_mib(case):
    """Peak resident memory (MiB) of one call of ``_peak_cases()[case]`` above the resident set before it, measured
    in a fresh process so that no memory freed by earlier calls is reused: the kernel's scratch, its outputs and
    (torch) the autograd graph. glibc is told to map every allocation over 64 KiB on its own and unmap it when freed
    (MALLOC_MMAP_THRESHOLD_), so the resident set follows live memory; the high-water mark (VmHWM, reset through
    /proc/self/clear_refs) is the peak. Linux only: NaN elsewhere or on failure."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    try:
        out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, __file__, case], env=env, capture_output=True,
                             text=True, timeout=600, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return float("nan")


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


@functools.cache
def _eager_twin():
    from physai.twolayer.torch import torch_loss, torch_reference

    return torch_loss, torch_reference


def eager_loss(X, Y, W, b, a):
    """The benchmarks' network (tanh, standard parameterization) and mean squared error in plain torch ops,
    physai.twolayer.torch's eager twin: a scalar, or [E] for an ensemble."""
    torch_loss, torch_reference = _eager_twin()
    return torch_loss(torch_reference(X, W, b, a, activation="tanh"), Y)


def torch_loss_and_grad(torch, X, Y, params):
    return torch.autograd.grad(eager_loss(X, Y, *params), params)


# -- large ------------------------------------------------------------------------------------------------------
LARGE = dict(n=4096, d=1024, m=1024, k=10)


@pytest.fixture(scope="module")
def large():
    return problem(**LARGE)


def test_large(benchmark, large, torch):
    """The fused loss + gradient, numpy's five GEMMs of the same shapes (the bound) and torch eager autograd, timed
    round by round (conftest.interleaved), with a pause after each for numpy's OpenBLAS threads to stop spinning."""
    net, X, Y = large
    W, a = net.W[0], net.a[0]
    S = np.tanh(X @ W.T)
    G = np.ones((LARGE["n"], LARGE["k"]), np.float32)
    params = torch_params(torch, net)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    work = {"flops": flops_grad(**LARGE)}
    interleaved(benchmark,
                {"native": lambda: net.loss_and_grad(X, Y), "numpy_gemms": lambda: two_layer_gemms(X, W, a, S, G),
                 "torch": lambda: torch_loss_and_grad(torch, Xt, Yt, params)},
                info={"native": {**work, "peak_mib": peak_memory_mib("native_grad")}, "numpy_gemms": work,
                      "torch": {**work, "peak_mib": peak_memory_mib("torch_grad")}},
                seconds=15, pause=OPENBLAS_SPIN_SECONDS)  # about 10 rounds: the goal's margin is a few percent


def _large_direction(net):
    rng = np.random.default_rng(1)
    return tuple(rng.standard_normal(p.shape, dtype=np.float32) for p in (net.W, net.b, net.a))


def test_large_hvp_native(benchmark, large):
    net, X, Y = large
    v = _large_direction(net)
    benchmark.extra_info.update(peak_mib=peak_memory_mib("native_hvp"), flops=flops_hvp(**LARGE))
    operator = net.hessian_operator(X, Y)
    V = net.flatten(v)
    benchmark(operator.native.matvec, V)


def test_large_hvp_torch(benchmark, large, torch):
    net, X, Y = large
    params = torch_params(torch, net)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    vt = [torch.from_numpy(x[0]) for x in _large_direction(net)]

    benchmark.extra_info.update(peak_mib=peak_memory_mib("torch_hvp"), flops=flops_hvp(**LARGE))
    grads = torch.autograd.grad(eager_loss(Xt, Yt, *params), params, create_graph=True)
    benchmark.pedantic(torch.autograd.grad, (grads, params, vt), dict(retain_graph=True), rounds=5, iterations=1,
                       warmup_rounds=1)


# -- small ------------------------------------------------------------------------------------------------------
SMALL = dict(n=256, d=32, m=64, k=1)


def test_small_native(benchmark):
    net, X, Y = problem(**SMALL)
    benchmark.extra_info.update(flops=flops_grad(**SMALL))
    benchmark(net.loss_and_grad, X, Y)


def test_small_torch(benchmark, torch):
    net, X, Y = problem(**SMALL)
    params = torch_params(torch, net)
    benchmark.extra_info.update(flops=flops_grad(**SMALL))
    benchmark(torch_loss_and_grad, torch, torch.from_numpy(X), torch.from_numpy(Y), params)


# -- ensemble ---------------------------------------------------------------------------------------------------
def test_ensemble_native(benchmark):
    net, X, Y = problem(**SMALL, E=256)
    benchmark.extra_info.update(flops=flops_grad(**SMALL, E=256), sgemm_goal=0.6)
    benchmark(net.loss_and_grad, X, Y)


def test_ensemble_vmap(benchmark, torch):
    from torch.func import grad, vmap

    net, X, Y = problem(**SMALL, E=256)
    W, b, a = torch_params(torch, net, requires_grad=False)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)

    batched = vmap(grad(lambda W, b, a: eager_loss(Xt, Yt, W, b, a), argnums=(0, 1, 2)))
    benchmark.extra_info.update(flops=flops_grad(**SMALL, E=256))
    benchmark(batched, W, b, a)


def test_ensemble_hvp_native(benchmark):
    net, X, Y = problem(**SMALL, E=256)
    rng = np.random.default_rng(1)
    V = rng.standard_normal((256, net.flatten((net.W, net.b, net.a)).shape[-1]), dtype=np.float32)
    operator = net.hessian_operator(X, Y)
    benchmark.extra_info.update(flops=flops_hvp(**SMALL, E=256), sgemm_goal=0.6)
    benchmark(operator.native.matvec, V)


def test_ensemble_hvp_vmap(benchmark, torch):
    from torch.func import grad, jvp, vmap

    net, X, Y = problem(**SMALL, E=256)
    W, b, a = torch_params(torch, net, requires_grad=False)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
    rng = np.random.default_rng(1)
    v = tuple(torch.from_numpy(rng.standard_normal(p.shape, dtype=np.float32)) for p in (W, b, a))
    gradient = grad(lambda W, b, a: eager_loss(Xt, Yt, W, b, a), argnums=(0, 1, 2))

    def hvp(W, b, a, vW, vb, va):  # forward-over-reverse, as the torch.func docs recommend
        return jvp(gradient, (W, b, a), (vW, vb, va))[1]

    benchmark.extra_info.update(flops=flops_hvp(**SMALL, E=256))
    benchmark(vmap(hvp), W, b, a, *v)


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
    benchmark.extra_info.update(flops=flops_grad(**HVP))
    benchmark(net.loss_and_grad, X, Y)


def test_hvp_native(benchmark, hvp_problem):
    # HVPs come in runs at fixed parameters (Lanczos, power iteration): the operator caches sigma, sigma', sigma''
    # once and each product is timed, as the torch side below reuses its retained graph.
    net, X, Y, v = hvp_problem
    operator = net.hessian_operator(X, Y)
    V = net.flatten(v)
    benchmark.extra_info.update(flops=flops_hvp(**HVP))
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
    grads = torch.autograd.grad(eager_loss(Xt, Yt, *params), params, create_graph=True)
    benchmark.extra_info.update(flops=flops_hvp(**HVP))
    benchmark(torch.autograd.grad, grads, params, vt, retain_graph=True)


# -- training loop ----------------------------------------------------------------------------------------------
TRAIN = dict(n=128, d=16, m=32, k=1, E=64)
STEPS = 1000


def test_train_native(benchmark):
    def run():
        net, X, Y = problem(**TRAIN)
        return net.train(X, Y, np.linspace(0.01, 0.5, TRAIN["E"]), STEPS)

    benchmark.extra_info.update(flops=STEPS * flops_grad(**TRAIN), sgemm_goal=0.4)
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
            loss = eager_loss(Xt, Yt, W, b, a)
            grads = torch.autograd.grad(loss.sum(), params)
            with torch.no_grad():
                W -= lr[:, None, None] * grads[0]
                b -= lr[:, None] * grads[1]
                a -= lr[:, None, None] * grads[2]
            losses.append(loss.detach())
        return torch.stack(losses)

    benchmark.extra_info.update(flops=STEPS * flops_grad(**TRAIN))
    benchmark.pedantic(run, rounds=3, iterations=1)
