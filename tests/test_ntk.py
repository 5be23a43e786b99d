"""Empirical NTK: torch.func Gram and operator for any model, and the analytic two-layer NTK, against
torch.func.jacrev Jacobians and (for MSE) the Gauss-Newton part of the dense Hessian."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from physai.spectrum import lanczos  # noqa: E402
from physai.spectrum import TorchNTK, ntk_eigs, ntk_gram  # noqa: E402

F64 = torch.float64


def jacobian(model, X):
    params = {name: p.detach() for name, p in model.named_parameters()}
    J = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (X,)).reshape(-1))(params)
    return torch.cat([J[name].reshape(J[name].shape[0], -1) for name in params], dim=1)


def mlp(seed=0, outputs=2):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, outputs)).to(F64)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("max_jacobian_bytes", [0, 2**30], ids=["recomputed", "kept"])
@pytest.mark.parametrize("block_size", [1, 3, 64])
def test_gram_matches_jacrev_at_any_block_size(block_size, max_jacobian_bytes, per_sample):
    model = mlp()
    X = torch.randn(10, 3, dtype=F64)
    J = jacobian(model, X)
    theta = ntk_gram(model, X, per_sample=per_sample, block_size=block_size, max_jacobian_bytes=max_jacobian_bytes)
    torch.testing.assert_close(theta, J @ J.T, rtol=1e-12, atol=1e-12)


def test_gram_of_a_model_with_structured_inputs_and_a_parameter_subset():
    torch.manual_seed(3)

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 4, dtype=F64), torch.nn.Linear(2, 4, dtype=F64)

        def forward(self, x1, x2):
            return torch.tanh(self.a(x1) * self.b(x2))

    model = TwoInputs()
    x1, x2 = torch.randn(7, 3, dtype=F64), torch.randn(7, 2, dtype=F64)
    params = {"a.weight": model.a.weight.detach()}
    J = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x1, x2)).reshape(-1))(params)["a.weight"]
    J = J.reshape(J.shape[0], -1)
    for inputs in ((x1, x2), {"x1": x1, "x2": x2}):
        for per_sample in (False, True):
            theta = ntk_gram(model, inputs, params=["a.weight"], per_sample=per_sample, block_size=3)
            torch.testing.assert_close(theta, J @ J.T)


def test_operator_and_top_eigenvalues_without_forming_the_gram():
    model = mlp(1)
    X = torch.randn(12, 3, dtype=F64)
    J = jacobian(model, X)
    op = TorchNTK(model, X, block_size=5)
    v = np.random.default_rng(0).standard_normal((1, op.shape[-1]))
    np.testing.assert_allclose(op.matvec(v)[0], (J @ J.T).numpy() @ v[0], rtol=1e-11, atol=1e-12)
    result = ntk_eigs(model, X, k=3, tol=1e-10, block_size=5)
    np.testing.assert_allclose(result.values[0], np.linalg.eigvalsh((J @ J.T).numpy())[::-1][:3], rtol=1e-9)


def test_mse_gauss_newton_part_of_the_dense_hessian_has_the_ntk_spectrum():
    # At zero residual (targets = outputs) the MSE Hessian is its Gauss-Newton part J^T J / (n k).
    model = mlp(2, outputs=2)
    X = torch.randn(6, 3, dtype=F64)
    Y = model(X).detach()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def loss(flat):
        chunks = {n: c.view_as(p) for n, c, p in zip(names, flat.split(sizes), params)}
        return 0.5 * ((torch.func.functional_call(model, chunks, (X,)) - Y) ** 2).mean()

    H = torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in params])).numpy()
    theta = ntk_gram(model, X).numpy()
    nk = theta.shape[0]
    np.testing.assert_allclose(np.linalg.eigvalsh(H)[::-1][:nk], np.linalg.eigvalsh(theta)[::-1] / nk, rtol=1e-9,
                               atol=1e-12)


def test_bad_inputs_are_named():
    model = mlp()
    with pytest.raises(TypeError, match="model"):
        ntk_gram(lambda x: x, torch.zeros(2, 3))
    with pytest.raises(TypeError, match="inputs"):
        ntk_gram(model, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="block_size"):
        ntk_gram(model, torch.zeros(2, 3, dtype=F64), block_size=0)
    with pytest.raises(TypeError, match="per_sample"):
        ntk_gram(model, torch.zeros(2, 3, dtype=F64), per_sample=1)
    with pytest.raises(ValueError, match="max_jacobian_bytes"):
        ntk_gram(model, torch.zeros(2, 3, dtype=F64), max_jacobian_bytes=-1)
    with pytest.raises(ValueError, match="inputs: expected at least one sample"):
        ntk_gram(model, torch.zeros(0, 3, dtype=F64))


# -- the analytic two-layer NTK ---------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "erf", "softplus"])
@pytest.mark.parametrize("bias", [True, False])
def test_two_layer_analytic_ntk_matches_jacrev_per_member(activation, bias):
    from physai.twolayer import TwoLayer
    from physai.twolayer.ntk import NTKOperator
    from physai.twolayer.ntk import empirical_ntk
    from physai.twolayer.torch import torch_reference

    net = TwoLayer(3, 7, 2, activation, "ntk", bias=bias, ensemble=2, dtype=np.float64, seed=1)
    if bias:
        net.b[:] = 0.3
    rng = np.random.default_rng(0)
    X, X2 = rng.standard_normal((5, 3)), rng.standard_normal((4, 3))
    theta = empirical_ntk(net, X, X2)
    s = net.scaling
    for e in range(2):
        parts = [torch.tensor(p[e]) for p in (net.W, net.b, net.a) if p is not None]

        def outputs(x):
            def f(*ps):
                W, a = ps[0], ps[-1]
                return torch_reference(torch.tensor(x), W, ps[1] if bias else None, a, activation=activation,
                                       input_scale=s.input_scale, output_scale=s.output_scale).reshape(-1)
            J = torch.func.jacrev(f, argnums=tuple(range(len(parts))))(*parts)
            return torch.cat([j.reshape(j.shape[0], -1) for j in J], 1).numpy()

        np.testing.assert_allclose(theta[e], outputs(X) @ outputs(X2).T, rtol=1e-12, atol=1e-12)
    op = NTKOperator(net, X)
    V = rng.standard_normal((2, 10))
    np.testing.assert_allclose(op.matvec(V), np.einsum("eij,ej->ei", empirical_ntk(net, X), V), rtol=1e-12,
                               atol=1e-12)
    top = lanczos(op, k=2, tol=1e-10)
    np.testing.assert_allclose(top.values, np.linalg.eigvalsh(empirical_ntk(net, X))[:, ::-1][:, :2], rtol=1e-9)


def test_two_layer_module_ntk_equals_the_generic_ntk():
    from physai.twolayer.torch import TwoLayerModule

    torch.manual_seed(4)
    module = TwoLayerModule(3, 9, 2, "tanh", dtype=F64)
    X = torch.randn(8, 3, dtype=F64)
    for per_sample in (False, True):  # the fused Function under jacrev, and under vmap of jacrev
        torch.testing.assert_close(module.ntk(X), ntk_gram(module, X, per_sample=per_sample), rtol=1e-12, atol=1e-12)
    result = lanczos(module.ntk_operator(X), k=1, tol=1e-10)
    np.testing.assert_allclose(result.values[0, 0], torch.linalg.eigvalsh(module.ntk(X))[-1].item(), rtol=1e-9)


@pytest.mark.parametrize("activation", ["relu", "erf", "tanh"])
def test_empirical_two_layer_ntk_converges_to_the_infinite_width_kernel(activation):
    # Theta_m - Theta_inf is an average of m independent terms at initialisation (Jacot et al. 2018): its relative
    # size falls like 1/sqrt(m). Averaged over 16 members the error estimate at each width has ~20% noise, so the
    # fitted exponent lies within +-0.15 of -1/2 (a 4-fold width step spans a factor 2 in the error).
    from physai.theory.two_layer import two_layer_ntk
    from physai.twolayer import TwoLayer
    from physai.twolayer.ntk import empirical_ntk

    X = np.random.default_rng(0).standard_normal((6, 4))
    exact = two_layer_ntk(X, activation=activation)
    widths = np.array([64, 256, 1024, 4096])
    errors = []
    for m in widths:
        net = TwoLayer(4, int(m), 1, activation, "ntk", ensemble=16, dtype=np.float64, seed=int(m))
        theta = empirical_ntk(net, X)
        errors.append(np.mean(np.linalg.norm(theta - exact, axis=(1, 2)) / np.linalg.norm(exact)))
    slope = np.polyfit(np.log(widths), np.log(errors), 1)[0]
    assert -0.65 < slope < -0.35, (slope, errors)


def test_two_layer_ntk_is_the_gauss_newton_part_of_the_fused_hessian():
    # At zero residual (Y = F) the fused MSE Hessian, 0.5 mean over n k entries, is exactly J^T J / (n k): its
    # nonzero eigenvalues are the NTK's divided by n k, member by member.
    from physai.twolayer import TwoLayer
    from physai.twolayer.ntk import empirical_ntk

    net = TwoLayer(3, 5, 2, "softplus", "standard", ensemble=2, dtype=np.float64, seed=3)
    X = np.random.default_rng(1).standard_normal((4, 3))
    op = net.hessian_operator(X, net.forward(X))  # per-member targets [E, n, k]: each member's own outputs
    P = net.num_params
    H = np.stack([op.matvec(np.repeat(np.eye(P)[i][None], 2, axis=0)) for i in range(P)], axis=2)  # [E, P, P]
    theta = empirical_ntk(net, X)
    nk = theta.shape[-1]
    np.testing.assert_allclose(np.linalg.eigvalsh(H)[:, ::-1][:, :nk], np.linalg.eigvalsh(theta)[:, ::-1] / nk,
                               rtol=1e-10, atol=1e-13)


def test_two_layer_ntk_bad_inputs_are_named():
    from physai.twolayer import TwoLayer
    from physai.twolayer.ntk import NTKOperator
    from physai.twolayer.ntk import empirical_ntk

    net = TwoLayer(3, 5, 1, "tanh", ensemble=2, dtype=np.float64)
    with pytest.raises(ValueError, match="X: expected shape"):
        empirical_ntk(net, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="X2: expected shape"):
        empirical_ntk(net, np.zeros((4, 3)), np.zeros((3, 4, 3)))
    with pytest.raises(TypeError, match="X: expected real numbers"):
        empirical_ntk(net, np.zeros((4, 3), np.complex128))
    X = np.random.default_rng(0).standard_normal((4, 3))
    np.testing.assert_array_equal(empirical_ntk(net, X.astype(np.float32)), empirical_ntk(net, X.astype(np.float32)
                                                                                          .astype(np.float64)))
    np.testing.assert_array_equal(empirical_ntk(net, X.tolist()), empirical_ntk(net, X))
    with pytest.raises(ValueError, match="V: expected shape"):
        NTKOperator(net, np.zeros((4, 3))).matvec(np.zeros((2, 3)))


# -- review of issue 12: random layers, train-mode BatchNorm, tuple outputs, devices ------------------------------

def blockwise_jacobian(model, X, block_size, seed, output=lambda o: o):
    """J by jacrev on each block, its random draws seeded as physai seeds block i, buffers copied (untouched)."""
    from physai.spectrum.torch_model import _batch_seed

    params = {name: p.detach() for name, p in model.named_parameters()}
    rows = []
    for i, start in enumerate(range(0, len(X), block_size)):
        def f(p, x=X[start:start + block_size]):
            state = {**p, **{name: b.clone() for name, b in model.named_buffers()}}
            return output(torch.func.functional_call(model, state, (x,))).reshape(-1)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_batch_seed(seed, i))
            J = torch.func.jacrev(f)(params)
        rows.append(torch.cat([J[name].reshape(J[name].shape[0], -1) for name in params], dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("block_size", [4, 64])
def test_dropout_in_train_mode_gives_one_fixed_kernel_and_operator(block_size):
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 2)).to(F64).train()
    X = torch.randn(12, 3, dtype=F64)
    J = blockwise_jacobian(model, X, block_size, seed=3)
    gram = (J @ J.T).numpy()
    torch.testing.assert_close(ntk_gram(model, X, block_size=block_size, seed=3), J @ J.T, rtol=1e-12, atol=1e-12)
    op = TorchNTK(model, X, block_size=block_size, seed=3)
    rng = np.random.default_rng(0)
    U = rng.standard_normal((2, 1, op.n))
    np.testing.assert_allclose(op.matvec(U[0])[0], gram @ U[0, 0], rtol=1e-10, atol=1e-12)
    assert abs(U[0, 0] @ op.matvec(U[1])[0] - op.matvec(U[0])[0] @ U[1, 0]) < 1e-10  # symmetric
    result = ntk_eigs(model, X, k=2, block_size=block_size, seed=3, tol=1e-8)
    assert result.converged[0] and result.matvecs[0] < 100
    np.testing.assert_allclose(result.values[0], np.linalg.eigvalsh(gram)[::-1][:2], rtol=1e-8)


def test_batchnorm_in_train_mode_runs_on_whole_blocks_and_leaves_buffers():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2)).to(F64).train()
    X = torch.randn(16, 3, dtype=F64)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    J = blockwise_jacobian(model, X, 1024, seed=0)
    result = ntk_eigs(model, X, k=3, tol=1e-8)  # one block: batch statistics over all 16 samples
    assert result.converged[0]
    np.testing.assert_allclose(result.values[0], np.linalg.eigvalsh((J @ J.T).numpy())[::-1][:3], rtol=1e-8)
    torch.testing.assert_close(ntk_gram(model, X, block_size=8), blockwise_jacobian(model, X, 8, 0) @
                               blockwise_jacobian(model, X, 8, 0).T, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())


def test_a_model_returning_a_tuple_is_read_through_output_fn():
    torch.manual_seed(7)

    class WithAux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(7)

        def forward(self, x):
            out = self.net(x)
            return out, {"norm": out.norm()}

    model = WithAux()
    X = torch.randn(9, 3, dtype=F64)
    J = blockwise_jacobian(model, X, 64, 0, output=lambda o: o[0])
    torch.testing.assert_close(ntk_gram(model, X, output_fn=lambda o: o[0]), J @ J.T, rtol=1e-12, atol=1e-12)
    result = ntk_eigs(model, X, output_fn=lambda o: o[0], tol=1e-8)
    np.testing.assert_allclose(result.values[0, 0], np.linalg.eigvalsh((J @ J.T).numpy())[-1], rtol=1e-8)
    with pytest.raises(TypeError, match="output_fn"):
        ntk_gram(model, X)
    with pytest.raises(TypeError, match="output_fn"):
        ntk_eigs(model, X, output_fn="first")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ntk_operator_on_a_cuda_model_matches_the_cpu():
    model, X = mlp(8), torch.randn(20, 3, dtype=F64)
    cpu = ntk_eigs(model, X, k=2, tol=1e-8)
    gpu = ntk_eigs(model.cuda(), X.cuda(), k=2, tol=1e-8)
    np.testing.assert_allclose(gpu.values, cpu.values, rtol=1e-8)
    J = jacobian(model, X.cuda())
    torch.testing.assert_close(ntk_gram(model, X.cuda()), J @ J.T)
