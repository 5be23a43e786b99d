"""The faults of issue 12, each as a kind of input, against dense torch.autograd.functional.hessian + eigh:
structured and uneven batches, BatchNorm in train mode, repeated eigenvalues of Kronecker-structured Hessians,
sum-reduced losses, both ends of the spectrum and parameter subsets."""
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from physai.spectrum import TorchHessian, hessian_eigs  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
