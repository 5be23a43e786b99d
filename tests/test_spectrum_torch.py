"""Hessian tools for torch models vs dense Hessians from torch.autograd.functional.hessian."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from physai.spectrum import HessianOperator, hessian_density, hessian_eigs, hessian_trace  # noqa: E402


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


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """These models are tiny: torch's intra-op threads only add barrier overhead (severe on a loaded machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    np.testing.assert_allclose(result.values[0], values[order], rtol=1e-6)
    for got, expected in zip(result.vectors[0], vectors[:, order].T):
        np.testing.assert_allclose(got, np.sign(got @ expected) * expected, atol=1e-5)


def test_forward_over_reverse_and_fallback_agree():
    model, X, y = small_mlp(seed=7)
    forward = HessianOperator(model, squared_error, (X, y))
    fallback = HessianOperator(model, mse, (X, y))
    v = np.random.default_rng(1).standard_normal((1, forward.n))
    np.testing.assert_allclose(forward.matvec(v), fallback.matvec(v), rtol=1e-10, atol=1e-12)
    assert forward.forward_over_reverse


def test_power_and_lanczos_agree_and_count_hvps():
    model, X, y = small_mlp(seed=1)
    lz = hessian_eigs(model, mse, (X, y), method="lanczos", which="LM", tol=1e-8)
    pw = hessian_eigs(model, mse, (X, y), method="power", tol=1e-8, max_iter=20000)
    np.testing.assert_allclose(lz.values[0, 0], pw.values[0, 0], rtol=1e-7)
    print(f"HVPs to tol 1e-8: lanczos {lz.matvecs[0]}, power {pw.matvecs[0]}")
    assert lz.matvecs[0] < pw.matvecs[0]


def test_dataloader_accumulates_the_full_dataset_hessian():
    model, X, y = small_mlp(seed=2)
    full = HessianOperator(model, mse, (X, y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)  # 16+16+8
    batched = HessianOperator(model, mse, loader)
    v = np.random.default_rng(0).standard_normal((1, full.n))
    np.testing.assert_allclose(batched.matvec(v), full.matvec(v), rtol=1e-10, atol=1e-12)
    H = dense_hessian(model, mse, X, y)
    np.testing.assert_allclose(full.matvec(v)[0], H @ v[0], rtol=1e-10, atol=1e-12)


def test_float32_model():
    model, X, y = small_mlp(dtype=torch.float32, seed=3)
    H = dense_hessian(model.double(), mse, X.double(), y.double())
    model.float()
    result = hessian_eigs(model, mse, (X, y), tol=1e-5)
    assert result.values.dtype == np.float32
    np.testing.assert_allclose(result.values[0, 0], np.linalg.eigvalsh(H)[-1], rtol=1e-4)


def test_model_mode_is_respected():
    model, X, y = small_mlp(seed=4, dropout=0.5)
    model.eval()
    H = dense_hessian(model, mse, X, y)
    result = hessian_eigs(model, mse, (X, y), tol=1e-10)
    assert not model.training
    np.testing.assert_allclose(result.values[0, 0], np.linalg.eigvalsh(H)[-1], rtol=1e-6)
    model.train()
    op = HessianOperator(model, mse, (X, y))
    v = np.ones((1, op.n))
    # dropout active: two HVPs see different masks, and the model stays in train mode
    assert not np.allclose(op.matvec(v), op.matvec(v))
    assert model.training


def test_hessian_trace_within_error_bar():
    model, X, y = small_mlp(seed=5)
    exact = np.trace(dense_hessian(model, mse, X, y))
    estimate, error = hessian_trace(model, mse, (X, y), num_samples=200, seed=1)
    assert abs(estimate - exact) < 4 * error + 1e-12
    pp, pp_error = hessian_trace(model, mse, (X, y), method="hutch++", num_samples=60, seed=1)
    assert abs(pp - exact) < 4 * pp_error + 1e-8 * abs(exact)


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
    with pytest.raises(ValueError, match="k: expected at most the number of trainable parameters"):
        hessian_eigs(model, mse, (X, y), k=n + 1)
    with pytest.raises(ValueError, match="tol"):
        hessian_eigs(model, mse, (X, y), tol=0)
    with pytest.raises(ValueError, match="data"):
        hessian_eigs(model, mse, [])
    with pytest.raises(ValueError, match="method"):
        hessian_eigs(model, mse, (X, y), method="arnoldi")
    with pytest.raises(ValueError, match="k"):
        hessian_eigs(model, mse, (X, y), k=2, method="power")
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="data"):
        hessian_eigs(model, mse, empty)
