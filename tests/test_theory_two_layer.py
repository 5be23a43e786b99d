"""physai.theory.two_layer_ntk against the empirical NTK of physai ``TwoLayer`` networks (``param="ntk"``), whose
Jacobian is taken by ``torch.func.jacrev`` on a few-line torch twin of the network (not physai code).

The empirical NTK at initialisation is a mean over the m hidden neurons of i.i.d. terms whose expectation is the
infinite-width NTK, so (i) its mean over initialisations equals the limit at every width, and (ii) its mean squared
deviation from the limit is exactly c/m: the root-mean-square relative error falls as m^(-1/2)."""
import math

import numpy as np
import pytest

from physai import theory as T

torch = pytest.importorskip("torch")
from physai.twolayer import TwoLayer  # noqa: E402  (after the torch skip: the twin needs torch)

TORCH_ACT = {"relu": torch.relu, "tanh": torch.tanh, "erf": torch.erf, "softplus": torch.nn.functional.softplus,
             "gelu": lambda z: torch.nn.functional.gelu(z, approximate="tanh")}


def inputs(n=8, d=5, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


def empirical_ntk(net, X, activation):
    """Sum over parameters of df(x)/dtheta df(x')/dtheta for member 0 of ``net``, by torch.func.jacrev."""
    W = torch.tensor(net.W[0])
    b = torch.tensor(net.b[0]) if net.b is not None else None
    a = torch.tensor(net.a[0, 0])
    Xt = torch.tensor(X)
    d, m = W.shape[1], W.shape[0]
    act = TORCH_ACT[activation]

    def f(W, b, a):
        h = Xt @ W.T / math.sqrt(d) + (b if b is not None else 0)
        return act(h) @ a / math.sqrt(m)

    params = (W, b, a) if b is not None else (W, a)
    argnums = tuple(range(len(params)))
    wrapped = f if b is not None else (lambda W, a: f(W, None, a))
    # The twin computes what physai computes (checked on the forward pass), so its Jacobian is physai's network's.
    assert np.allclose(wrapped(*params).numpy(), net.forward(X)[0, :, 0], rtol=1e-10, atol=1e-12)
    jac = torch.func.jacrev(wrapped, argnums=argnums)(*params)
    flat = torch.cat([j.reshape(X.shape[0], -1) for j in jac], dim=1)
    return (flat @ flat.T).numpy()


@pytest.mark.parametrize("activation,bias", [("relu", True), ("relu", False), ("erf", True), ("tanh", True),
                                             ("gelu", True)])
def test_empirical_ntk_converges_to_two_layer_ntk(activation, bias):
    X = inputs()
    limit = T.two_layer_ntk(X, activation=activation, bias=bias)
    widths, seeds = np.array([64, 256, 1024, 4096]), range(8)
    errors = np.empty((len(widths), len(seeds)))
    deviations = []
    for i, m in enumerate(widths):
        for s in seeds:
            net = TwoLayer(X.shape[1], int(m), 1, activation, "ntk", bias=bias, dtype=np.float64, seed=s)
            theta = empirical_ntk(net, X, activation)
            errors[i, s] = np.sum((theta - limit) ** 2) / np.sum(limit**2)
            deviations.append((theta - limit) * math.sqrt(m))  # i.i.d. across (width, seed) after scaling
    # (i) The mean over initialisations is the limit: every entry within the bound below (scaled deviations).
    deviations = np.array(deviations)
    z = deviations.mean(0) / (deviations.std(0, ddof=1) / math.sqrt(len(deviations)))
    # 36 distinct entries, each a t-statistic of 32 scaled deviations (31 degrees of freedom).
    assert np.abs(z[np.triu_indices(len(X))]).max() < T.bonferroni_bound(36, dof=len(deviations) - 1)
    # (ii) The mean squared relative error falls as 1/m: slope -1 of log MSE against log m, fitted with weights
    # from each width's spread over seeds (delta method: sem(log MSE) = sem(MSE) / MSE).
    mse = errors.mean(1)
    log_sem = errors.std(1, ddof=1) / math.sqrt(errors.shape[1]) / mse
    design = np.stack([np.ones(len(widths)), np.log(widths)], axis=1) / log_sem[:, None]
    cov = np.linalg.inv(design.T @ design)
    intercept, slope = cov @ design.T @ (np.log(mse) / log_sem)
    assert abs(slope + 1) < 3 * math.sqrt(cov[1, 1])


def test_closed_forms_match_quadrature():
    """ReLU and erf use closed forms; a callable of the same function goes through the 2-D quadrature."""
    X1, X2 = inputs(5), inputs(4, seed=1)
    X1[2] = 0  # an input at the origin: h = b = 0 there, where sigma'(0) = 0 (relu_pair's zero-variance case)
    for name, fn, dfn in [("relu", lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0),
                          ("erf", T.get_activation("erf").fn, T.get_activation("erf").derivative)]:
        closed = T.two_layer_ntk(X1, X2, activation=name)
        quadrature = T.two_layer_ntk(X1, X2, activation=(fn, dfn))
        assert np.allclose(closed, quadrature, rtol=1e-12)
    # quadratic: <u^2 u'^2> = K_aa K_bb + 2 K_ab^2 (Isserlis) and <2u 2u'> = 4 K_ab.
    d = X1.shape[1]
    Kab = X1 @ X2.T / d
    Kaa, Kbb = (np.sum(X1**2, 1) / d)[:, None], (np.sum(X2**2, 1) / d)[None, :]
    expected = Kaa * Kbb + 2 * Kab**2 + 4 * Kab * (Kab + 1)
    assert np.allclose(T.two_layer_ntk(X1, X2, activation="quadratic"), expected, rtol=1e-12)
    assert T.two_layer_ntk(X1, X2).shape == (5, 4)
    assert np.allclose(T.two_layer_ntk(X1), T.two_layer_ntk(X1, X1))


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="X2"):
        T.two_layer_ntk(inputs(3, 4), inputs(3, 5))
    with pytest.raises(TypeError, match="bias"):
        T.two_layer_ntk(inputs(3, 4), bias=1)
    with pytest.raises(ValueError, match="activation"):
        T.two_layer_ntk(inputs(3, 4), activation="swish")
