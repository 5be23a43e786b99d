"""Hessian tools for torch models vs dense Hessians from torch.autograd.functional.hessian."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from physai.spectrum import TorchHessian, hessian_density, hessian_eigs, hessian_trace  # noqa: E402


def small_mlp(dtype=torch.float64, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(3, 5), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(5, 2))
    model = torch.nn.Sequential(*layers).to(dtype)
    X = torch.randn(40, 3, dtype=dtype)
    y = torch.randn(40, 2, dtype=dtype)
    return model, X, y


def dense_hessian(model, loss_fn, X, y):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    sizes = [p.numel() for p in params]

    def loss(flat):
        chunks = {n: c.view_as(p) for n, c, p in zip(names, flat.split(sizes), params)}
        return loss_fn(torch.func.functional_call(model, chunks, (X,)), y)

    return torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in params])).numpy()


mse = torch.nn.functional.mse_loss

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def squared_error(output, target):
    """The same loss as mse, written with ops that support forward-over-reverse."""
    return ((output - target) ** 2).mean()


@pytest.mark.parametrize("which", ["LA", "LM"])
def test_hessian_eigs_match_dense_eigh(which):
    model, X, y = small_mlp()
    H = dense_hessian(model, mse, X, y)
    values, vectors = np.linalg.eigh(H)
    keys = -values if which == "LA" else -np.abs(values)
    order = np.argsort(keys)[:3]
    result = hessian_eigs(model, mse, (X, y), k=3, which=which, tol=1e-10)
    # residuals <= 1e-10 |theta|, gaps >= 0.01: seen 1e-15 on values, 4e-11 on vectors
    np.testing.assert_allclose(result.values[0], values[order], rtol=1e-12)
    for got, expected in zip(result.vectors[0], vectors[:, order].T):
        np.testing.assert_allclose(got, np.sign(got @ expected) * expected, atol=5e-9)


@pytest.mark.parametrize("cache_graphs", [True, False])
@pytest.mark.parametrize("loss_fn", [mse, squared_error], ids=["mse_loss", "written-out"])
def test_hvp_matches_the_dense_hessian(loss_fn, cache_graphs):
    # torch's mse_loss has no forward-mode derivative of its backward: reverse-over-reverse serves every loss
    model, X, y = small_mlp(seed=7)
    op = TorchHessian(model, loss_fn, (X, y), cache_graphs=cache_graphs)
    V = np.random.default_rng(1).standard_normal((2, op.n))
    H = dense_hessian(model, mse, X, y)
    for v in V:  # the cached graph serves more than one product
        np.testing.assert_allclose(op.matvec(v[None])[0], H @ v, rtol=1e-12, atol=1e-13)


class UnusedAndLinear(torch.nn.Module):
    """tanh(x W^T + b) + c with a parameter the loss never reads (autograd leaves its gradient None); under a loss
    linear in the outputs, c's gradient is a constant, with no graph."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2, dtype=torch.float64)
        self.unused = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
        self.shift = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(self.layer(x)) + self.shift


@pytest.mark.parametrize("cache_graphs", [True, False])
@pytest.mark.parametrize("loss_fn", [mse, lambda output, target: (output * target).mean()],
                         ids=["mse_loss", "linear-in-outputs"])
def test_hvp_of_unused_and_graphless_gradients_matches_the_dense_hessian(loss_fn, cache_graphs):
    torch.manual_seed(3)
    model = UnusedAndLinear()
    X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    op = TorchHessian(model, loss_fn, (X, y), cache_graphs=cache_graphs)
    H = dense_hessian(model, loss_fn, X, y)
    assert np.all(H[:4] == 0) and np.all(H[:, :4] == 0)  # the unused parameter (first in named_parameters)
    V = np.random.default_rng(2).standard_normal((2, op.n))
    with torch.no_grad():  # a caller's no_grad does not reach the HVP's own graph
        np.testing.assert_allclose(op.matvec(V[:1])[0], H @ V[0], rtol=1e-12, atol=1e-13)
    with torch.inference_mode():  # nor does inference_mode
        np.testing.assert_allclose(op.matvec(V[1:])[0], H @ V[1], rtol=1e-12, atol=1e-13)
    # the Hessian over the unused parameter alone (a loss without a graph), and over c alone under the loss linear
    # in the outputs (a gradient without a graph): zeros
    assert not np.any(TorchHessian(model, loss_fn, (X, y), params=["unused"]).matvec(V[:1, :4]))
    op = TorchHessian(model, loss_fn, (X, y), params=["shift"])
    np.testing.assert_allclose(op.matvec(V[:1, 4:6])[0], H[4:6, 4:6] @ V[0, 4:6], rtol=1e-12, atol=1e-13)


def test_power_and_lanczos_agree_and_count_hvps():
    model, X, y = small_mlp(seed=1)
    lz = hessian_eigs(model, mse, (X, y), method="lanczos", which="LM", tol=1e-8)
    pw = hessian_eigs(model, mse, (X, y), method="power", tol=1e-8, max_matvecs=20000)
    np.testing.assert_allclose(lz.values[0, 0], pw.values[0, 0], rtol=1e-12)
    print(f"HVPs to tol 1e-8: lanczos {lz.matvecs[0]}, power {pw.matvecs[0]}")
    assert lz.matvecs[0] < pw.matvecs[0]


def test_dataloader_accumulates_the_full_dataset_hessian():
    model, X, y = small_mlp(seed=2)
    full = TorchHessian(model, mse, (X, y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)  # 16+16+8
    batched = TorchHessian(model, mse, loader)
    v = np.random.default_rng(0).standard_normal((1, full.n))
    np.testing.assert_allclose(batched.matvec(v), full.matvec(v), rtol=1e-12, atol=1e-13)
    H = dense_hessian(model, mse, X, y)
    np.testing.assert_allclose(full.matvec(v)[0], H @ v[0], rtol=1e-12, atol=1e-13)


def test_float32_model():
    model, X, y = small_mlp(dtype=torch.float32, seed=3)
    H = dense_hessian(model.double(), mse, X.double(), y.double())
    model.float()
    result = hessian_eigs(model, mse, (X, y), tol=1e-5)
    assert result.values.dtype == np.float32
    # float32 HVPs: the value is good to a few float32 ulps (seen: 8e-9)
    np.testing.assert_allclose(result.values[0, 0], np.linalg.eigvalsh(H)[-1], rtol=1e-5)


def test_model_mode_is_respected():
    model, X, y = small_mlp(seed=4, dropout=0.5)
    model.eval()
    H = dense_hessian(model, mse, X, y)
    result = hessian_eigs(model, mse, (X, y), tol=1e-10)
    assert not model.training
    np.testing.assert_allclose(result.values[0, 0], np.linalg.eigvalsh(H)[-1], rtol=1e-12)
    model.train()
    v = np.ones((1, sum(p.numel() for p in model.parameters())))
    # dropout active: the masks are drawn once per batch from a fixed seed, so cached or re-evaluated, the operator
    # is one fixed symmetric matrix (the solvers could not certify anything else); the model stays in train mode
    cached = TorchHessian(model, mse, (X, y))
    np.testing.assert_array_equal(cached.matvec(v), cached.matvec(v))
    fresh = TorchHessian(model, mse, (X, y), cache_graphs=False)
    np.testing.assert_array_equal(fresh.matvec(v), fresh.matvec(v))
    np.testing.assert_allclose(fresh.matvec(v), cached.matvec(v), rtol=1e-12)
    # another seed is another draw of masks, hence another operator
    assert not np.allclose(TorchHessian(model, mse, (X, y), seed=1).matvec(v), cached.matvec(v))
    assert model.training


def test_hessian_trace_within_error_bar():
    model, X, y = small_mlp(seed=5)
    exact = np.trace(dense_hessian(model, mse, X, y))
    estimate, error = hessian_trace(model, mse, (X, y), num_samples=200, seed=1)
    assert abs(estimate - exact) < 4 * error + 1e-12
    # an error bar that says something at these budgets (seen: 4% and 0.7%)
    assert error < 0.1 * abs(exact)
    pp, pp_error = hessian_trace(model, mse, (X, y), method="hutch++", num_samples=60, seed=1)
    assert abs(pp - exact) < 4 * pp_error + 1e-8 * abs(exact)
    assert pp_error < 0.02 * abs(exact)


def linear_regression(P, decay, seed):
    """A linear model whose squared-error Hessian has eigenvalues ~ 2 decay^(2i) in random directions."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((P, P)))[0]
    X = rng.standard_normal((4 * P, P)) * decay ** np.arange(P) @ Q.T
    model = torch.nn.Linear(P, 1, bias=False, dtype=torch.float64)
    return model, torch.tensor(X), torch.tensor(rng.standard_normal((4 * P, 1)))


def test_trace_error_bars_match_the_spread_and_hutchpp_wins_on_a_decaying_spectrum():
    model, X, y = linear_regression(24, decay=0.7, seed=0)
    exact = np.trace(dense_hessian(model, squared_error, X, y))
    hvps = 0

    def counted_loss(output, target):
        # one call per HVP when each product re-evaluates the loss (cache_graphs=False), plus the two calls of the
        # reduction check (the first batch's outputs, alone and repeated)
        nonlocal hvps
        hvps += 1
        return squared_error(output, target)

    budget, seeds = 30, range(8)
    runs = {}
    for method in ("hutchinson", "hutch++"):
        hvps = 0
        runs[method] = np.array([hessian_trace(model, counted_loss, (X, y), method=method, num_samples=budget,
                                               seed=seed, cache_graphs=False) for seed in seeds])
        assert hvps == (budget + 2) * len(seeds), method
        estimates, errors = runs[method].T
        spread = estimates.std(ddof=1)
        # Unbiased. (One estimate against its own error bar is no test at this budget: 30 quadratic forms are
        # heavy-tailed enough that some seeds land 4-6 reported errors off.)
        assert abs(estimates.mean() - exact) < 4 * spread / np.sqrt(len(seeds)), method
        # The reported standard error is the spread it claims: neither inflated nor deflated (seen: ratio 1.0, 1.2).
        assert errors.mean() / 3 < spread < 3 * errors.mean(), (method, spread, errors.mean())
    # Hutch++ spends two thirds of the budget finding the top of the spectrum and taking its trace exactly; on a
    # decaying spectrum that leaves a far smaller remainder to estimate (seen: 300 times closer).
    hutchinson_error = np.abs(runs["hutchinson"][:, 0] - exact).mean()
    hutchpp_error = np.abs(runs["hutch++"][:, 0] - exact).mean()
    assert hutchpp_error < 0.05 * hutchinson_error, (hutchpp_error, hutchinson_error)


def test_slq_density_integrates_to_one_and_matches_moments():
    model, X, y = small_mlp(seed=6)
    eig = np.linalg.eigvalsh(dense_hessian(model, squared_error, X, y))
    n = len(eig)
    grid, density = hessian_density(model, squared_error, (X, y), num_steps=n, num_probes=16, sigma=1e-3,
                                    grid_size=20000)
    dx = grid[1] - grid[0]
    assert abs(density.sum() * dx - 1) < 1e-3
    # With num_steps = P the quadrature is exact per probe: moments are v^T H^p v / |v|^2 averaged over
    # Gaussian probes, an unbiased estimate of tr(H^p) / P with relative error ~ sqrt(2 / (P * probes)).
    for p in (1, 2):
        moment = (density * grid**p).sum() * dx - (1e-3**2 if p == 2 else 0)
        exact = np.mean(eig**p)
        assert abs(moment - exact) < 5 * np.sqrt(2 / (n * 16)) * np.sqrt(np.mean(eig ** (2 * p))) + 1e-6


def test_bad_input():
    model, X, y = small_mlp()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="k: expected at most the number of parameters differentiated"):
        hessian_eigs(model, mse, (X, y), k=n + 1)
    with pytest.raises(ValueError, match="tol"):
        hessian_eigs(model, mse, (X, y), tol=0)
    with pytest.raises(ValueError, match="data"):
        hessian_eigs(model, mse, [])
    with pytest.raises(TypeError, match="loss_fn: expected a callable.*hessian_operator"):
        hessian_eigs(model, "mse", (X, y))
    with pytest.raises(TypeError, match="data: .* got one tensor"):
        hessian_eigs(model, mse, X)
    with pytest.raises(ValueError, match="data: each batch must be an .inputs, targets. pair"):
        hessian_eigs(model, mse, (X, y, y))
    with pytest.raises(ValueError, match="loss_form"):
        hessian_eigs(model, mse, (X, y), loss_form="batch")
    with pytest.raises(ValueError, match="reduction"):
        hessian_eigs(model, mse, (X, y), reduction="none")
    with pytest.raises(TypeError, match="batch_size"):
        hessian_eigs(model, mse, (X, y), batch_size=16)
    with pytest.raises(ValueError, match="params: expected parameters of model"):
        hessian_eigs(model, mse, (X, y), params=[torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="params: expected parameters of model"):
        hessian_eigs(model, mse, (X, y), params=["no.such"])
    with pytest.raises(ValueError, match="params: expected at least one"):
        hessian_eigs(model, mse, (X, y), params=[])
    with pytest.raises(TypeError, match="params"):
        hessian_eigs(model, mse, (X, y), params=3)
    with pytest.raises(ValueError, match="which"):
        hessian_eigs(model, mse, (X, y), which="SA", method="power")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        hessian_eigs(lambda x: x, mse, (X, y))
    with pytest.raises(ValueError, match="method"):
        hessian_eigs(model, mse, (X, y), method="arnoldi")
    with pytest.raises(ValueError, match="k"):
        hessian_eigs(model, mse, (X, y), k=2, method="power")
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="data"):
        hessian_eigs(model, mse, empty)
    # one below each method's smallest budget: 2 for Hutchinson, 6 for Hutch++
    with pytest.raises(ValueError, match="num_samples"):
        hessian_trace(model, mse, (X, y), num_samples=1)
    with pytest.raises(ValueError, match="num_samples"):
        hessian_trace(model, mse, (X, y), method="hutch++", num_samples=5)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, mse, (X, y), method="hutch")
    with pytest.raises(ValueError, match="seed"):
        hessian_trace(model, mse, (X, y), seed=-1)
