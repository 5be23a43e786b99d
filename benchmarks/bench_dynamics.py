"""Training-dynamics sweeps: the width-transfer grid at one (parameterization, width) and the threshold-neuron
learning-rate sweep, each against the same sweep written as a plain torch loop over the learning rates (one model
per rate, the way these papers' code runs them) and as torch.func.vmap over the ensemble. float64, full-batch GD,
the same number of steps everywhere."""
import numpy as np
import pytest

from physai.experiments import threshold
from physai.twolayer import shared_bias
from physai.experiments.width_transfer import WidthTransferConfig, _initial_models, make_task

RATIOS = [
    ("width transfer, muP m=1024, 12 rates x 2 seeds, 50 GD steps: native ensemble vs torch loop over rates",
     "test_width_grid_torch_loop", "test_width_grid_native", 5),
    ("width transfer grid: native ensemble vs torch.func.vmap over the ensemble",
     "test_width_grid_vmap", "test_width_grid_native", 2),
    ("threshold sweep, d=200 n=300, 5 rates x 4 seeds, 200 GD steps: native ensemble vs torch loop over rates",
     "test_threshold_torch_loop", "test_threshold_native", 5),
    ("threshold sweep: native ensemble vs torch.func.vmap over the ensemble",
     "test_threshold_vmap", "test_threshold_native", 5),
]

STEPS = 50
WIDTH = WidthTransferConfig(parameterizations=("mup",), widths=(1024, 2048), learning_rates=tuple(2.0 ** k for k in
                            range(-6, 6)), seeds=2, n=256)


@pytest.fixture(scope="module")
def width_problem():
    X, Y = make_task(WIDTH)
    rates = np.repeat(np.asarray(WIDTH.learning_rates), WIDTH.seeds)
    return X, Y, rates


def _width_models(X):
    return _initial_models("mup", WIDTH.d, WIDTH.widths[0], WIDTH.activation, WIDTH.seeds, len(WIDTH.learning_rates),
                           WIDTH.seed, X.dtype)


def test_width_grid_native(benchmark, width_problem):
    X, Y, rates = width_problem

    def run():
        return _width_models(X).train(X, Y, rates, STEPS).losses

    benchmark.pedantic(run, rounds=3, iterations=1)


def _torch_width_setup(torch, X, Y):
    net = _width_models(X)
    s = net.scaling
    layer_rates = (s.lr_W, s.lr_b, s.lr_a)
    return ([torch.tensor(p.copy()) for p in (net.W, net.b, net.a)], torch.from_numpy(X), torch.from_numpy(Y), s,
            layer_rates)


def test_width_grid_torch_loop(benchmark, width_problem, torch):
    X, Y, rates = width_problem

    def run():
        params, Xt, Yt, s, layer_rates = _torch_width_setup(torch, X, Y)
        losses = []
        for e, lr in enumerate(rates):
            W, b, a = (p[e].clone().requires_grad_() for p in params)
            for _ in range(STEPS):
                F = s.output_scale * torch.tanh(s.input_scale * Xt @ W.T + b) @ a.T
                loss = 0.5 * ((F - Yt) ** 2).mean()
                grads = torch.autograd.grad(loss, (W, b, a))
                with torch.no_grad():
                    for p, g, rate in zip((W, b, a), grads, layer_rates):
                        p -= lr * rate * g
                losses.append(loss.detach())
        return losses

    benchmark.pedantic(run, rounds=1, iterations=1)


def test_width_grid_vmap(benchmark, width_problem, torch):
    from torch.func import grad_and_value, vmap

    X, Y, rates = width_problem

    def run():
        (W, b, a), Xt, Yt, s, (rW, rb, ra) = _torch_width_setup(torch, X, Y)
        lr = torch.from_numpy(rates)

        def member_loss(W, b, a):
            F = s.output_scale * torch.tanh(s.input_scale * Xt @ W.T + b) @ a.T
            return 0.5 * ((F - Yt) ** 2).mean()

        step = vmap(grad_and_value(member_loss, argnums=(0, 1, 2)))
        losses = []
        for _ in range(STEPS):
            (gW, gb, ga), loss = step(W, b, a)
            W = W - (lr * rW)[:, None, None] * gW
            b = b - (lr * rb)[:, None] * gb
            a = a - (lr * ra)[:, None, None] * ga
            losses.append(loss)
        return losses

    benchmark.pedantic(run, rounds=3, iterations=1)


# -- threshold neurons ------------------------------------------------------------------------------------------
THRESHOLD = threshold.ThresholdConfig.small()  # the paper's d = 200, n = 300; 5 rates x 4 seeds
THRESHOLD_STEPS = 200


@pytest.fixture(scope="module")
def threshold_problem():
    config = THRESHOLD
    data = [threshold.sparse_coding_data(config.n, config.d, config.lam, np.random.default_rng([0, s]))
            for s in range(config.seeds)]
    X, y = np.array([X for X, _ in data]), np.array([y for _, y in data])
    E = len(config.lr_multipliers) * config.seeds
    dataset = np.tile(np.arange(config.seeds), len(config.lr_multipliers))
    a_plus, a_minus = np.random.default_rng(1).normal(0, 1 / np.sqrt(2 * config.d), (2, E))
    rates = np.repeat(config.learning_rates, config.seeds)
    return X, y, dataset, a_plus, a_minus, rates


def test_threshold_native(benchmark, threshold_problem):
    X, y, dataset, a_plus, a_minus, rates = threshold_problem
    steps = np.full(len(rates), THRESHOLD_STEPS)

    def run():
        return shared_bias.train(X, y, a_plus, a_minus, np.zeros(len(rates)), rates, steps, dataset=dataset).b

    benchmark.pedantic(run, rounds=3, iterations=1)


def _torch_threshold_loss(torch, Xt, yt):
    def loss(a_plus, a_minus, b):
        f = a_plus * torch.relu(Xt + b).sum(-1) + a_minus * torch.relu(b - Xt).sum(-1)
        return torch.nn.functional.softplus(-yt * f).mean()
    return loss


def test_threshold_torch_loop(benchmark, threshold_problem, torch):
    X, y, dataset, a_plus, a_minus, rates = threshold_problem

    def run():
        biases = []
        for e, lr in enumerate(rates):
            loss = _torch_threshold_loss(torch, torch.from_numpy(X[dataset[e]]), torch.from_numpy(y[dataset[e]]))
            params = [torch.tensor(v, requires_grad=True) for v in (a_plus[e], a_minus[e], 0.0)]
            for _ in range(THRESHOLD_STEPS):
                grads = torch.autograd.grad(loss(*params), params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p -= lr * g
            biases.append(params[2].item())
        return biases

    benchmark.pedantic(run, rounds=1, iterations=1)


def test_threshold_vmap(benchmark, threshold_problem, torch):
    from torch.func import grad, vmap

    X, y, dataset, a_plus0, a_minus0, rates = threshold_problem

    def run():
        Xt, yt = torch.from_numpy(X[dataset]), torch.from_numpy(y[dataset])

        def member_grad(a_plus, a_minus, b, X, y):
            return grad(_torch_threshold_loss(torch, X, y), argnums=(0, 1, 2))(a_plus, a_minus, b)

        step = vmap(member_grad)
        a_plus, a_minus = torch.from_numpy(a_plus0), torch.from_numpy(a_minus0)
        b, lr = torch.zeros(len(rates), dtype=torch.float64), torch.from_numpy(rates)
        for _ in range(THRESHOLD_STEPS):
            gp, gm, gb = step(a_plus, a_minus, b, Xt, yt)
            a_plus, a_minus, b = a_plus - lr * gp, a_minus - lr * gm, b - lr * gb
        return b

    benchmark.pedantic(run, rounds=3, iterations=1)
