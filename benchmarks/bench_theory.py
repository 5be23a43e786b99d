"""Monte Carlo of deep MLPs at initialisation (width 64, depth 10, two inputs, 256 networks per call): physai's
batched numpy samplers against a plain torch loop that samples the same networks one at a time and computes the
same per-layer statistics (kernel O = z z^T / n and stochastic metric G; with the NTK, the gradients of neuron 0 of
every layer by autograd). Networks per second = 256 / median time."""
import math

import numpy as np

from physai import theory as T

NETWORKS, WIDTH, DEPTH = 256, 64, 10
X = np.random.default_rng(0).standard_normal((2, 16))

RATIOS = [
    ("MC kernel statistics (n=64, L=10, 256 nets): physai metric sampler vs plain torch loop", "test_torch_loop",
     "test_physai_metric", 10),
    ("MC kernel statistics: physai whole-network sampler (float32) vs plain torch loop", "test_torch_loop",
     "test_physai_weights", 1),
    ("MC kernel + NTK of every layer: physai whole networks (float32) vs torch loop with autograd",
     "test_torch_loop_ntk", "test_physai_weights_ntk", 5),
]


def test_physai_metric(benchmark):
    benchmark(T.sample_mlp, X, "relu", DEPTH, WIDTH, NETWORKS, C_W=2.0, method="metric", ntk=False, batch=NETWORKS)


def test_physai_weights(benchmark):
    benchmark(T.sample_mlp, X, "relu", DEPTH, WIDTH, NETWORKS, C_W=2.0, method="weights", ntk=False,
              batch=NETWORKS, dtype="float32")


def test_physai_weights_ntk(benchmark):
    benchmark(T.sample_mlp, X, "relu", DEPTH, WIDTH, NETWORKS, C_W=2.0, method="weights", ntk=True,
              batch=NETWORKS, dtype="float32")


def torch_loop(torch, ntk):
    """What a torch user writes: one network at a time, statistics accumulated in Python."""
    Xt = torch.tensor(X, dtype=torch.float32)
    kernel = torch.zeros(DEPTH, 2, 2)
    metric = torch.zeros(DEPTH, 2, 2)
    ntks = torch.zeros(DEPTH, 2, 2)
    for _ in range(NETWORKS):
        a, fan_in = Xt, X.shape[1]
        params, zs = [], []
        for layer in range(DEPTH):
            W = (torch.randn(WIDTH, fan_in) * math.sqrt(2.0 / fan_in)).requires_grad_(ntk)
            b = torch.zeros(WIDTH, requires_grad=ntk)
            metric[layer] += (2.0 * a @ a.T / fan_in).detach()
            z = a @ W.T + b
            kernel[layer] += (z @ z.T / WIDTH).detach()
            params += [W, b]
            zs.append(z)
            a, fan_in = torch.relu(z), WIDTH
        if ntk:  # learning rates lambda_b = 1 for biases, lambda_W / fan_in = 1 / fan_in for weights
            scales = [1 / math.sqrt(p.shape[1]) if p.ndim == 2 else 1.0 for p in params]
            for layer in range(DEPTH):
                rows = [torch.cat([g.reshape(-1) * scale for g, scale in zip(torch.autograd.grad(
                    zs[layer][alpha, 0], params[:2 * layer + 2], retain_graph=True), scales)]) for alpha in range(2)]
                J = torch.stack(rows)
                ntks[layer] += J @ J.T
    return kernel / NETWORKS, metric / NETWORKS, ntks / NETWORKS


def test_torch_loop(benchmark, torch):
    benchmark(torch_loop, torch, False)


def test_torch_loop_ntk(benchmark, torch):
    benchmark.pedantic(torch_loop, args=(torch, True), rounds=3, iterations=1)


def test_torch_loop_agrees_with_physai(torch):
    """The baseline computes the same statistics: its means agree with physai's within the Bonferroni bound for
    the 54 comparisons (3 distinct kernel and NTK entries at layers 2..10; layer 1's NTK is deterministic and its
    kernel has the same spread), the difference of two independent means of equal spread having sqrt(2) x physai's
    standard error."""
    torch.manual_seed(0)
    kernel, metric, ntk = torch_loop(torch, True)
    mc = T.sample_mlp(X, "relu", DEPTH, WIDTH, NETWORKS, C_W=2.0, seed=1)
    upper = np.triu_indices(2)
    z = [((stat.double().numpy() - moments.mean) / (moments.sem * math.sqrt(2)))[1:, upper[0], upper[1]]
         for stat, moments in ((kernel, mc.kernel), (ntk, mc.ntk))]
    assert np.abs(np.concatenate(z)).max() < T.bonferroni_bound(54)
