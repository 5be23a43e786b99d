"""The CUDA backend's build report, and its device math header (compiled into the host hook of physai._cuda)
against closed forms and finite differences. Needs neither a GPU nor torch."""
import math

import numpy as np
import pytest
from conftest import assert_close, labels
from hypothesis import given
from hypothesis import strategies as st

from physai import _native
from physai.twolayer.params import ACTIVATIONS, LOSSES, activation_code, loss_code

_cuda = _native._cuda
needs_module = pytest.mark.skipif(_cuda is None, reason="physai built without CUDA")


def host_activation(name, x):
    return _cuda._host_activation(activation_code(name), x)


def host_loss(name, f, y, u):
    return _cuda._host_loss(loss_code(name), f, y, u)


def test_native_info_reports_cuda():
    info = _native.native_info()
    assert info["cuda_compiled"] == (_cuda is not None)
    if _cuda is None:
        assert info["cuda_devices"] == 0
    else:
        count = _cuda.device_count()
        assert isinstance(count, int) and count >= 0
        assert info["cuda_devices"] == count


@needs_module
def test_build_info():
    info = _cuda.build_info()
    assert info["cuda_runtime"] >= 12000
    assert "90" in info["architectures"]


# --- device math on the host -------------------------------------------------------------------------

def _closed_form(name, x):
    erf = np.vectorize(math.erf)
    c = math.sqrt(2 / math.pi)
    return {
        "relu": np.maximum(x, 0),
        "tanh": np.tanh(x),
        "gelu": 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x**3))),
        "erf": erf(x),
        "quadratic": x**2,
        "linear": x,
        "softplus": np.logaddexp(0, x),
    }[name]


@needs_module
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_host_activation_matches_closed_form_and_differences(name):
    x = np.linspace(-4, 4, 801) + 0.0031  # off the relu kink
    s, d1, d2 = host_activation(name, x)
    assert_close(s, _closed_form(name, x))
    eps = 1e-5
    sp, d1p, _ = host_activation(name, x + eps)
    sm, d1m, _ = host_activation(name, x - eps)
    np.testing.assert_allclose(d1, (sp - sm) / (2 * eps), rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(d2, (d1p - d1m) / (2 * eps), rtol=1e-6, atol=1e-7)


@np.errstate(over="ignore")  # exp overflowing to inf gives the exact 1 / inf = 0 of the tails
def _closed_form_derivatives(name, x):
    """sigma' and sigma'' written out; numpy's tanh, exp and logaddexp saturate cleanly, so these are exact far out."""
    if name == "softplus":
        p, q = 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(x))
        return p, p * q
    if name == "tanh":
        t = np.tanh(x)
        return 1 - t * t, -2 * t * (1 - t * t)
    if name == "erf":
        d1 = 2 / math.sqrt(math.pi) * np.exp(-x * x)
        return d1, -2 * x * d1
    c, q = math.sqrt(2 / math.pi), 0.044715  # gelu, tanh form: 0.5 x (1 + tanh(u)), u = c (x + q x^3)
    t = np.tanh(c * (x + q * x**3))
    sech2, du = 1 - t * t, c * (1 + 3 * q * x * x)
    d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * du
    return d1, sech2 * du + 0.5 * x * sech2 * (6 * c * q * x - 2 * t * du * du)


@needs_module
@pytest.mark.parametrize("name", ["softplus", "tanh", "erf", "gelu"])
def test_host_activation_at_extremes_matches_closed_form(name):
    x = np.array([-1e4, -800.0, -30.0, -3.0, 0.5, 3.0, 30.0, 800.0, 1e4])
    s, d1, d2 = host_activation(name, x)
    e1, e2 = _closed_form_derivatives(name, x)
    # near |x| = 3 the values and derivatives are differences of terms up to 10x their size (1 - tanh^2, and
    # gelu's 1 + tanh), in both formulas
    assert_close((s, d1, d2), (_closed_form(name, x), e1, e2), relative=True, condition=10)


@needs_module
@given(st.floats(-30, 30))
def test_host_softplus_derivatives_are_sigmoid(x):
    s, d1, d2 = host_activation("softplus", np.array([x]))
    p, q = 1 / (1 + math.exp(-x)), 1 / (1 + math.exp(x))  # sigmoid(x), sigmoid(-x)
    assert_close((d1, d2), (np.array([p]), np.array([p * q])), relative=True)


def _loss_closed_form(name, f, y):
    if name == "mse":
        return 0.5 * ((f - y) ** 2).sum(1)
    if name == "logistic":
        return np.logaddexp(0, -y * f).sum(1)
    lse = np.log(np.exp(f - f.max(1, keepdims=True)).sum(1)) + f.max(1)
    return -(y * (f - lse[:, None])).sum(1)


@needs_module
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("k", [1, 4])
def test_host_loss_value_grad_hvp(name, k):
    rng = np.random.default_rng(7)
    n = 6
    f, u = rng.normal(size=(n, k)) * 2, rng.normal(size=(n, k))
    y = labels(name, rng, n, k)
    value, grad, hu = host_loss(name, f, y, u)
    assert_close(value, _loss_closed_form(name, f, y))
    eps = 1e-6
    fd = np.zeros_like(f)
    for j in range(k):
        e = np.zeros(k)
        e[j] = eps
        fd[:, j] = (_loss_closed_form(name, f + e, y) - _loss_closed_form(name, f - e, y)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
    gp = host_loss(name, f + eps * u, y, u)[1]
    gm = host_loss(name, f - eps * u, y, u)[1]
    np.testing.assert_allclose(hu, (gp - gm) / (2 * eps), rtol=1e-6, atol=1e-8)


@np.errstate(over="ignore")
def _closed_form_loss_derivatives(name, f, y, u):
    """Gradient and Hessian-times-u of the row losses in _loss_closed_form, stable for large logits."""
    if name == "mse":
        return f - y, u
    if name == "logistic":
        p, q = 1 / (1 + np.exp(y * f)), 1 / (1 + np.exp(-y * f))  # sigmoid(-y f), sigmoid(y f)
        return -y * p, p * q * y * y * u
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    total = y.sum(1, keepdims=True)
    return total * p - y, total * (p * u - p * (p * u).sum(1, keepdims=True))


@needs_module
@pytest.mark.parametrize("name", LOSSES)
def test_host_loss_is_stable_for_large_logits(name):
    f = np.array([[1000.0, -1000.0, 0.0], [-800.0, 40.0, 800.0]])
    y = np.array([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]) if name != "cross_entropy" else np.array([[0.0, 1.0, 0.0],
                                                                                                   [2.0, 0.0, 0.0]])
    u = np.array([[1.0, -0.5, 2.0], [0.3, 1.0, -1.0]])
    value, grad, hu = host_loss(name, f, y, u)
    grad_expected, hu_expected = _closed_form_loss_derivatives(name, f, y, u)
    assert_close((value, grad, hu), (_loss_closed_form(name, f, y), grad_expected, hu_expected), relative=True)


@needs_module
def test_host_hooks_reject_bad_input():
    with pytest.raises(TypeError):  # the hooks take the kernels' enums, not names
        _cuda._host_activation("sigmoidal", np.zeros(3))
    with pytest.raises(ValueError, match="f: expected shape"):
        host_loss("mse", np.zeros(2), np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="y: expected f's shape"):
        host_loss("mse", np.zeros((2, 2)), np.zeros((3, 2)), np.zeros((2, 2)))
