"""The faults of issue 12, each as a kind of input, against dense torch.autograd.functional.hessian + eigh:
structured and uneven batches, BatchNorm in train mode, repeated eigenvalues of Kronecker-structured Hessians,
sum-reduced losses, both ends of the spectrum and parameter subsets."""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from physai.spectrum import TorchHessian, hessian_eigs  # noqa: E402

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def flat_loss(model, loss_of_outputs, names=None):
    """loss(flat parameter vector) over the named parameters (all by default), the others and buffers fixed;
    buffers are cloned on every call, so train-mode BatchNorm sees batch statistics and leaves them alone."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]

    def loss(flat):
        state = {n: p.detach() for n, p in named.items()}
        state.update({n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)})
        state.update({n: b.clone() for n, b in model.named_buffers()})
        return loss_of_outputs(lambda *a, **k: torch.func.functional_call(model, state, a, k))

    return loss, torch.cat([named[n].detach().reshape(-1) for n in names])


def dense_eigvalsh(model, loss_of_outputs, names=None):
    loss, flat = flat_loss(model, loss_of_outputs, names)
    return np.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat).numpy())


def mse(output, target):
    return ((output - target) ** 2).mean()


class TwoInputs(torch.nn.Module):
    """forward(x1, x2), or forward(**{"x1": ..., "x2": ...})."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(3, 6, dtype=F64), torch.nn.Linear(2, 6, dtype=F64)
        self.out = torch.nn.Linear(6, 2, dtype=F64)

    def forward(self, x1, x2):
        return self.out(torch.tanh(self.first(x1) + self.second(x2)))


def two_input_data(n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1, x2, y = (torch.randn(n, d, generator=g, dtype=F64) for d in (3, 2, 2))
    x2[-4:] *= 4  # the short last batch is unlike the others: an unweighted mean of batches is visibly wrong
    return x1, x2, y


def full_data_top(model, x1, x2, y, k):
    return dense_eigvalsh(model, lambda f: mse(f(x1, x2), y))[::-1][:k]


@pytest.mark.parametrize("structure", ["tuple", "list", "dict"])
@pytest.mark.parametrize("sizes", [(32, 32, 32, 4), (50, 50), (1, 99)])
def test_structured_uneven_batches_are_weighted_by_sample_count(structure, sizes):
    torch.manual_seed(1)
    model = TwoInputs()
    x1, x2, y = two_input_data()
    edges = np.cumsum((0,) + sizes)
    pack = {"tuple": lambda a, b: (a, b), "list": lambda a, b: [a, b], "dict": lambda a, b: {"x1": a, "x2": b}}
    batches = [(pack[structure](x1[i:j], x2[i:j]), y[i:j]) for i, j in zip(edges[:-1], edges[1:])]
    result = hessian_eigs(model, mse, batches, k=2, tol=1e-10)
    # residual 1e-10: values within ~1e-20 / gap of the truth; the rest is the summation order (seen 1e-15)
    np.testing.assert_allclose(result.values[0], full_data_top(model, x1, x2, y, 2), rtol=1e-10)


def test_one_structured_pair_is_one_batch():
    torch.manual_seed(2)
    model = TwoInputs()
    x1, x2, y = two_input_data(40)
    result = hessian_eigs(model, mse, ((x1, x2), y), k=1, tol=1e-10)
    np.testing.assert_allclose(result.values[0], full_data_top(model, x1, x2, y, 1), rtol=1e-10)


def test_loss_of_model_and_batch_takes_any_batch_and_a_batch_size_function():
    torch.manual_seed(3)
    model = TwoInputs()
    x1, x2, y = two_input_data()
    batches = [{"inputs": {"x1": x1[i:i + 30], "x2": x2[i:i + 30]}, "labels": y[i:i + 30]} for i in range(0, 100, 30)]

    def loss_fn(net, batch):
        return mse(net(**batch["inputs"]), batch["labels"])

    expected = full_data_top(model, x1, x2, y, 2)
    by_leading_extent = hessian_eigs(model, loss_fn, batches, k=2, tol=1e-10, loss_form="model")
    np.testing.assert_allclose(by_leading_extent.values[0], expected, rtol=1e-10)
    counted = hessian_eigs(model, loss_fn, batches, k=2, tol=1e-10, loss_form="model",
                           batch_size=lambda batch: len(batch["labels"]))
    np.testing.assert_allclose(counted.values[0], expected, rtol=1e-10)
    # a batch whose tensors disagree on the leading extent needs batch_size
    ragged = [{"x": x1[:10], "y": y[:7]}]
    with pytest.raises(ValueError, match="batch_size"):
        op = TorchHessian(model, lambda net, b: mse(net(b["x"], b["x"][:, :2]), b["y"][:1]), ragged, loss_form="model")
        op.matvec(np.ones((1, op.n)))


def batchnorm_mlp(seed, width=6, affine=True):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.BatchNorm1d(width, affine=affine), torch.nn.Tanh(),
                               torch.nn.Linear(width, 1)).to(F64).train()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_in_train_mode_uses_batch_statistics_and_leaves_buffers(seed, affine):
    model = batchnorm_mlp(seed, affine=affine)
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(64, 3, generator=g, dtype=F64), torch.randn(64, 1, generator=g, dtype=F64)
    before = {name: b.clone() for name, b in model.named_buffers()}
    result = hessian_eigs(model, torch.nn.functional.mse_loss, (X, y), k=3, tol=1e-10)
    expected = dense_eigvalsh(model, lambda f: torch.nn.functional.mse_loss(f(X), y))[::-1][:3]
    np.testing.assert_allclose(result.values[0], expected, rtol=1e-10)
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    assert model.training
    # the batch statistics matter: eval mode (running statistics) is another Hessian
    model.eval()
    evaluated = dense_eigvalsh(model, lambda f: torch.nn.functional.mse_loss(f(X), y))[::-1][:3]
    assert not np.allclose(evaluated, expected, rtol=1e-3)


def test_batchnorm_over_batches_is_the_weighted_mean_of_per_batch_hessians():
    model = batchnorm_mlp(2)
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(50, 3, generator=g, dtype=F64), torch.randn(50, 1, generator=g, dtype=F64)
    op = TorchHessian(model, mse, [(X[:30], y[:30]), (X[30:], y[30:])])
    v = np.random.default_rng(0).standard_normal(op.n)
    parts = []
    for rows in (slice(0, 30), slice(30, 50)):
        loss, flat = flat_loss(model, lambda f, r=rows: mse(f(X[r]), y[r]))
        parts.append(torch.autograd.functional.hessian(loss, flat).numpy() @ v)
    np.testing.assert_allclose(op.matvec(v[None])[0], (30 * parts[0] + 20 * parts[1]) / 50, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("outputs,inputs", [(3, 10), (2, 7), (4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_last_layer_kronecker_hessian_every_copy(outputs, inputs, dtype):
    # Linear(d, k, bias=False) under the mean squared error: H = I_k (x) (2 / (k n)) X^T X, each value k times
    torch.manual_seed(outputs)
    layer = torch.nn.Linear(inputs, outputs, bias=False).to(dtype)
    X, T = torch.randn(400, inputs, dtype=dtype), torch.randn(400, outputs, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    k = outputs + 1
    result = hessian_eigs(layer, mse, (X, T), k=k, tol=tol)
    gram = np.linalg.eigvalsh(2 / (outputs * 400) * (X.double().T @ X.double()).numpy())[::-1]
    expected = np.repeat(gram, outputs)[:k]
    assert result.converged.all()
    np.testing.assert_allclose(result.values[0], expected, rtol=3 * tol)


def test_multi_output_mlp_with_a_repeated_eigenvalue_matches_dense():
    # a network whose two outputs are two identical heads of one hidden layer: every head eigenvalue is doubled
    torch.manual_seed(5)
    body, head = torch.nn.Linear(4, 5, dtype=F64), torch.nn.Linear(5, 1, bias=False, dtype=F64)

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.heads = torch.nn.Linear(5, 2, bias=False, dtype=F64)
            with torch.no_grad():
                self.heads.weight.copy_(head.weight.repeat(2, 1))

        def forward(self, x):
            return self.heads(torch.tanh(self.body(x)))

    model = Heads()
    X = torch.randn(60, 4, dtype=F64)
    Y = model(X).detach().repeat(1, 1) + 0.1 * torch.randn(60, 2, dtype=F64)
    names = ["heads.weight"]
    result = hessian_eigs(model, mse, (X, Y), k=4, tol=1e-10, params=names)
    expected = dense_eigvalsh(model, lambda f: mse(f(X), Y), names)[::-1][:4]
    np.testing.assert_allclose(result.values[0], expected, rtol=1e-10)
    np.testing.assert_allclose(expected[0], expected[1], rtol=1e-12)  # the input really is degenerate


@pytest.mark.parametrize("make", [lambda: torch.nn.MSELoss(reduction="sum"),
                                  lambda: functools.partial(torch.nn.functional.mse_loss, reduction="sum")],
                         ids=["module", "partial"])
def test_sum_reduction_is_refused_unless_declared_then_exact(make):
    torch.manual_seed(6)
    model = TwoInputs()
    x1, x2, y = two_input_data(60)
    batches = [((x1[i:i + 25], x2[i:i + 25]), y[i:i + 25]) for i in range(0, 60, 25)]
    with pytest.raises(ValueError, match="reduction: loss_fn reduces by 'sum'"):
        hessian_eigs(model, make(), batches)
    result = hessian_eigs(model, make(), batches, reduction="sum", k=2, tol=1e-10)
    summed = dense_eigvalsh(model, lambda f: torch.nn.functional.mse_loss(f(x1, x2), y, reduction="sum"))[::-1][:2]
    np.testing.assert_allclose(result.values[0], summed, rtol=1e-10)
    with pytest.raises(ValueError, match="reduction: loss_fn reduces by 'mean'"):
        hessian_eigs(model, torch.nn.MSELoss(), batches, reduction="sum")


@pytest.mark.parametrize("which", ["SA", "BE", "LM"])
def test_both_ends_of_an_indefinite_hessian(which):
    torch.manual_seed(7)
    model = TwoInputs()
    x1, x2, y = two_input_data(30)
    y = 5 * y  # far from the targets: the residual term makes the Hessian indefinite
    exact = dense_eigvalsh(model, lambda f: mse(f(x1, x2), y))
    assert exact[0] < 0
    result = hessian_eigs(model, mse, ((x1, x2), y), k=4, which=which, tol=1e-10)
    expected = {"SA": exact[:4], "BE": np.r_[exact[::-1][:2], exact[:2]],
                "LM": exact[np.argsort(-np.abs(exact), kind="stable")][:4]}[which]
    np.testing.assert_allclose(result.values[0], expected, rtol=1e-9, atol=1e-12 * np.abs(exact).max())


@pytest.mark.parametrize("select", ["module", "parameters", "names"])
def test_spectrum_of_a_parameter_subset(select):
    torch.manual_seed(8)
    model = TwoInputs()
    x1, x2, y = two_input_data(50)
    names = ["first.weight", "first.bias"]
    params = {"module": model.first, "parameters": [model.first.weight, model.first.bias], "names": names}[select]
    result = hessian_eigs(model, mse, ((x1, x2), y), k=3, tol=1e-10, params=params)
    assert result.vectors.shape == (1, 3, 3 * 6 + 6)
    expected = dense_eigvalsh(model, lambda f: mse(f(x1, x2), y), names)[::-1][:3]
    np.testing.assert_allclose(result.values[0], expected, rtol=1e-10)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen


def test_default_tolerance_accuracy_per_hvp():
    # The documented default: residual 1e-3 gives the top eigenvalue to (1e-3 lambda)^2 / gap, in a few dozen HVPs
    model = batchnorm_mlp(9, width=16).eval()
    g = torch.Generator().manual_seed(9)
    X, y = torch.randn(200, 3, generator=g, dtype=F64), torch.randn(200, 1, generator=g, dtype=F64)
    exact = dense_eigvalsh(model, lambda f: mse(f(X), y))[::-1]
    result = hessian_eigs(model, mse, (X, y))
    bound = (1e-3 * exact[0]) ** 2 / (exact[0] - exact[1])
    assert abs(result.values[0, 0] - exact[0]) <= bound + 1e-14
    assert result.matvecs[0] <= 40
    power = hessian_eigs(model, mse, (X, y), method="power", max_matvecs=5000)
    assert power.matvecs[0] > result.matvecs[0]


def test_progress_bar_off_when_not_a_terminal_and_on_when_asked(capsys):
    torch.manual_seed(10)
    model = TwoInputs()
    x1, x2, y = two_input_data(20)
    hessian_eigs(model, mse, ((x1, x2), y))  # under pytest stderr is not a terminal: no bar by default
    assert capsys.readouterr().err == ""
    hessian_eigs(model, mse, ((x1, x2), y), progress_bar=True)
    assert "HVP" in capsys.readouterr().err


# --- review of issue 12 ------------------------------------------------------------------------------------------

def test_power_iteration_la_on_an_indefinite_hessian_is_the_largest_eigenvalue():
    # a loss whose most negative eigenvalue dominates: power iteration alone finds that one
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(F64)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 4, generator=g, dtype=F64), torch.randn(30, 2, generator=g, dtype=F64)

    def loss_fn(o, t):
        return -(o ** 2).mean() + 0.01 * ((o - t) ** 2).mean()

    exact = dense_eigvalsh(model, lambda f: loss_fn(f(X), y))
    assert -exact[0] > exact[-1] > 0
    result = hessian_eigs(model, loss_fn, (X, y), method="power", tol=1e-8, max_matvecs=20000)
    assert result.converged[0]
    np.testing.assert_allclose(result.values[0, 0], exact[-1], rtol=1e-7)
    dominant = hessian_eigs(model, loss_fn, (X, y), method="power", which="LM", tol=1e-8, max_matvecs=20000)
    np.testing.assert_allclose(dominant.values[0, 0], exact[0], rtol=1e-7)
    with pytest.raises(ValueError, match="which"):
        hessian_eigs(model, loss_fn, (X, y), method="power", which="SA")


def test_float32_model_below_its_rounding_floor_is_not_converged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(200, 3, generator=g), torch.randn(200, 2, generator=g)
    H = torch.autograd.functional.hessian(*flat_loss(model.to(F64), lambda f: mse(f(X.to(F64)), y.to(F64)))).numpy()
    model.float()
    for tol, expect in ((1e-9, False), (1e-4, True)):
        result = hessian_eigs(model, mse, (X, y), k=2, tol=tol, max_matvecs=300)
        assert result.converged[0] == expect
        top = abs(float(result.values[0, 0]))
        for theta, v in zip(result.values[0].astype(np.float64), result.vectors[0].astype(np.float64)):
            residual = np.linalg.norm(H @ v - theta * v)
            assert residual >= 1e-9 * top or not expect  # nothing in float32 gets below its rounding
            if expect:
                assert residual <= 2 * tol * top


def dropout_mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(8, 2)).to(F64).train()


def seeded(seed, f):
    """f() with torch's generator seeded as physai seeds batch 0 (the mask the operator fixes)."""
    from physai.spectrum.torch_model import _batch_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_batch_seed(seed, 0))
        return f()


@pytest.mark.parametrize("cache_graphs", [True, False])
def test_dropout_in_train_mode_is_one_fixed_symmetric_operator(cache_graphs):
    model = dropout_mlp(1)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(40, 3, generator=g, dtype=F64), torch.randn(40, 2, generator=g, dtype=F64)
    loss, flat = flat_loss(model, lambda f: mse(f(X), y))
    H = seeded(5, lambda: torch.autograd.functional.hessian(loss, flat)).numpy()
    op = TorchHessian(model, mse, (X, y), cache_graphs=cache_graphs, seed=5)
    rng = np.random.default_rng(0)
    U = rng.standard_normal((2, 1, op.n))
    state = torch.random.get_rng_state()
    np.testing.assert_allclose(op.matvec(U[0])[0], H @ U[0, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(op.matvec(U[0]), op.matvec(U[0]))
    assert abs(U[0, 0] @ op.matvec(U[1])[0] - op.matvec(U[0])[0] @ U[1, 0]) < 1e-10
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is untouched
    result = hessian_eigs(model, mse, (X, y), k=2, tol=1e-8, seed=5, cache_graphs=cache_graphs)
    assert result.converged[0] and result.matvecs[0] < 200
    np.testing.assert_allclose(result.values[0], np.linalg.eigvalsh(H)[::-1][:2], rtol=1e-8)
    assert model.training


def test_shuffling_dataloader_is_refused_unless_cached_and_a_generator_is_read_once():
    model = batchnorm_mlp(3)
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(64, 3, generator=g, dtype=F64), torch.randn(64, 1, generator=g, dtype=F64)
    dataset = torch.utils.data.TensorDataset(X, y)
    with pytest.raises(ValueError, match="shuffle"):
        hessian_eigs(model, mse, torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True))
    batches = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    loss, flat = flat_loss(model, lambda f: sum(mse(f(a), b) for a, b in batches) / 4)
    expected = np.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat).numpy())[::-1][:2]
    fixed = hessian_eigs(model, mse, torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True), k=2,
                         tol=1e-10, cache_graphs=True)
    assert fixed.converged[0]  # one pass, fixed: a symmetric operator (BatchNorm statistics of its batches)
    in_order = hessian_eigs(model, mse, torch.utils.data.DataLoader(dataset, batch_size=16), k=2, tol=1e-10)
    np.testing.assert_allclose(in_order.values[0], expected, rtol=1e-10)
    generated = hessian_eigs(model, mse, (b for b in batches), k=2, tol=1e-10)
    np.testing.assert_allclose(generated.values[0], expected, rtol=1e-10)


def test_sum_reductions_are_detected_and_misused_losses_explained():
    torch.manual_seed(4)
    model = TwoInputs()
    x1, x2, y = two_input_data(40)
    batches = [((x1[i:i + 16], x2[i:i + 16]), y[i:i + 16]) for i in range(0, 40, 16)]
    summed = lambda o, t: torch.nn.functional.mse_loss(o, t, reduction="sum")  # noqa: E731
    with pytest.raises(ValueError, match="reduction: loss_fn sums over the batch"):
        hessian_eigs(model, summed, batches)
    result = hessian_eigs(model, summed, batches, reduction="sum", k=2, tol=1e-10)
    exact = dense_eigvalsh(model, lambda f: summed(f(x1, x2), y))[::-1][:2]
    np.testing.assert_allclose(result.values[0], exact, rtol=1e-10)
    with pytest.raises(ValueError, match="reduction: loss_fn averages over the batch"):
        hessian_eigs(model, mse, batches, reduction="sum")
    with pytest.raises(ValueError, match="loss_fn: reduces by 'none'.*scalar"):
        hessian_eigs(model, torch.nn.MSELoss(reduction="none"), batches)
    with pytest.raises(ValueError, match="loss_fn: expected a scalar loss"):
        hessian_eigs(model, lambda o, t: (o - t) ** 2, batches)
    with pytest.raises(TypeError, match="loss_form='model'"):
        hessian_eigs(model, lambda net, batch: mse(net(*batch[0]), batch[1]), batches)
    # the trap of a lone (X, Y) read as two batches under loss_form="model"
    X, Y = torch.randn(20, 3, dtype=F64), torch.randn(20, 3, dtype=F64)
    linear = torch.nn.Linear(3, 3).to(F64)
    model_loss = lambda net, b: mse(net(b[0]), b[1])  # noqa: E731
    with pytest.raises(ValueError, match=r"ambiguous.*\[\(X, Y\)\]"):
        hessian_eigs(linear, model_loss, (X, Y), loss_form="model")
    lone = hessian_eigs(linear, model_loss, [(X, Y)], loss_form="model", tol=1e-10)
    np.testing.assert_allclose(lone.values[0, 0], dense_eigvalsh(linear, lambda f: mse(f(X), Y))[-1], rtol=1e-10)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, dtype=F64)
        self.norm = torch.nn.BatchNorm2d(2, dtype=F64)
        self.out = torch.nn.Linear(2 * 16, 2, dtype=F64)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.conv(x))).flatten(1))


class TiedEmbedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(7, 4, dtype=F64)
        self.mix = torch.nn.Linear(4, 4, dtype=F64)
        self.head = torch.nn.Linear(4, 7, dtype=F64)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def kinds():
    g = torch.Generator().manual_seed(11)
    ce = torch.nn.functional.cross_entropy
    layernorm = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(),
                                    torch.nn.Linear(5, 2)).to(F64)
    return {
        "cnn-batchnorm-train": (SmallCNN().train(), mse, torch.randn(24, 1, 6, 6, generator=g, dtype=F64),
                                torch.randn(24, 2, generator=g, dtype=F64), 8),
        "layernorm": (layernorm, mse, torch.randn(30, 3, generator=g, dtype=F64),
                      torch.randn(30, 2, generator=g, dtype=F64), 7),
        "tied-embedding": (TiedEmbedding(), ce, torch.randint(0, 7, (40,), generator=g),
                           torch.randint(0, 7, (40,), generator=g), 16),
    }


@pytest.mark.parametrize("kind", ["cnn-batchnorm-train", "layernorm", "tied-embedding"])
def test_models_of_each_kind_match_dense(kind):
    torch.manual_seed(12)
    model, loss_fn, X, y, batch = kinds()[kind]
    batches = [(X[i:i + batch], y[i:i + batch]) for i in range(0, len(X), batch)]
    weights = [len(b[1]) / len(y) for b in batches]
    exact = dense_eigvalsh(model, lambda f: sum(w * loss_fn(f(a), b) for w, (a, b) in zip(weights, batches)))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    result = hessian_eigs(model, loss_fn, batches, k=3, which="BE", tol=1e-9)
    assert result.converged[0]
    np.testing.assert_allclose(result.values[0], np.r_[exact[::-1][:2], exact[:1]], rtol=1e-8,
                               atol=1e-10 * np.abs(exact).max())
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())


def test_lego_dict_batches_with_a_model_loss():
    from physai.lego.data import as_tensors
    from physai.lego.task import LegoTask

    task = LegoTask(n_vars=3)
    batches = [as_tensors(task.sample(size, 0, start)) for size, start in ((8, 0), (5, 8))]
    length, groups = batches[0]["tokens"].shape[1], 2
    vocab = int(max(b["tokens"].max() for b in batches)) + 1
    torch.manual_seed(13)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 2), torch.nn.Flatten(),
                                torch.nn.Linear(2 * length, 3 * groups)).to(F64)

    def loss_fn(net, batch):
        logits = net(batch["tokens"]).reshape(-1, groups)
        return torch.nn.functional.cross_entropy(logits, batch["labels"].reshape(-1))

    result = hessian_eigs(model, loss_fn, batches, k=3, tol=1e-9, loss_form="model")
    exact = dense_eigvalsh(model, lambda f: sum(len(b["tokens"]) / 13 * torch.nn.functional.cross_entropy(
        f(b["tokens"]).reshape(-1, groups), b["labels"].reshape(-1)) for b in batches))[::-1][:3]
    assert result.converged[0]
    np.testing.assert_allclose(result.values[0], exact, rtol=1e-8)


def test_float32_mlp_with_kronecker_last_layer_finds_every_copy():
    torch.manual_seed(14)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3, bias=False))
    g = torch.Generator().manual_seed(14)
    X, y = torch.randn(300, 5, generator=g), torch.randn(300, 3, generator=g)
    names = ["2.weight"]  # I_3 (x) (2 / 3n) h^T h: every eigenvalue three times
    exact = dense_eigvalsh(model.to(F64), lambda f: mse(f(X.to(F64)), y.to(F64)), names)[::-1]
    model.float()
    result = hessian_eigs(model, mse, (X, y), k=6, tol=1e-4, params=names)
    assert result.converged[0]
    np.testing.assert_allclose(result.values[0], exact[:6], rtol=1e-5)
    np.testing.assert_allclose(exact[:6], np.repeat(exact[[0, 3]], 3), rtol=1e-10)


def test_options_the_fused_hessian_cannot_honour_are_refused():
    pytest.importorskip("physai.twolayer.torch")
    from physai.spectrum import hessian_density, hessian_trace
    from physai.twolayer.torch import TwoLayerModule

    module = TwoLayerModule(3, 4)
    X, y = torch.randn(10, 3), torch.randn(10, 1)
    for option in ({"reduction": "sum"}, {"loss_form": "model"}, {"batch_size": len}, {"cache_graphs": False}):
        with pytest.raises(ValueError, match=f"{next(iter(option))}: the fused Hessian"):
            hessian_eigs(module, "mse", (X, y), **option)
    for tool in (hessian_trace, hessian_density):
        with pytest.raises(TypeError, match="callable loss.*only hessian_eigs"):
            tool(module, "mse", (X, y))


def test_progress_bar_counts_the_fused_hvps(monkeypatch):
    pytest.importorskip("physai.twolayer.torch")
    import tqdm.auto

    from physai.twolayer.torch import TwoLayerModule

    bars = []

    class Recorded(tqdm.auto.tqdm):  # tqdm redraws at most every 0.1 s: read its count, not its drawing
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    torch.manual_seed(15)
    result = hessian_eigs(TwoLayerModule(3, 4), "mse", (torch.randn(10, 3), torch.randn(10, 1)), progress_bar=True)
    assert len(bars) == 1 and bars[0].n == result.matvecs[0] > 0  # it stayed at 0 on the fused path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hessian_and_dropout_masks_on_a_cuda_model():
    model = dropout_mlp(16)
    g = torch.Generator().manual_seed(16)
    X, y = torch.randn(40, 3, generator=g, dtype=F64), torch.randn(40, 2, generator=g, dtype=F64)
    model.eval()
    exact = dense_eigvalsh(model, lambda f: mse(f(X), y))[::-1][:2]
    model.cuda().train()
    fixed = [hessian_eigs(model, mse, (X.cuda(), y.cuda()), k=2, tol=1e-8, cache_graphs=False).values
             for _ in range(2)]
    np.testing.assert_array_equal(fixed[0], fixed[1])  # the CUDA generator is seeded per batch too
    model.eval()
    result = hessian_eigs(model, mse, (X.cuda(), y.cuda()), k=2, tol=1e-8)
    assert result.converged[0]
    np.testing.assert_allclose(result.values[0], exact, rtol=1e-8)
