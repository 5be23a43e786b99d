"""Infinite-width kernel and NTK recursions of a deep MLP, over a set of inputs (the full P x P matrices).

The network (Roberts, Yaida, Hanin, *The Principles of Deep Learning Theory*, arXiv 2106.10165, ch. 2: the MLP and its
initialisation): inputs x_alpha of dimension n_0, hidden widths n, depth L,

    z^(1)_i = b^(1)_i + sum_j W^(1)_ij x_j,       z^(l+1)_i = b^(l+1)_i + sum_j W^(l+1)_ij sigma(z^(l)_j),
    E[b b] = C_b,   E[W^(l) W^(l)] = C_W / n_(l-1).

At infinite width z^(l) is a centred Gaussian process whose kernel obeys (ch. 4, the leading-order recursion)

    K^(1) = C_b + C_W x.x'/n_0,        K^(l+1)_ab = C_b + C_W <sigma(z_a) sigma(z_b)>_{K^(l)},

and the frozen neural tangent kernel with learning-rate tensors lambda_b^(l) (biases) and lambda_W^(l) / n_(l-1)
(weights) obeys (ch. 8, the infinite-width NTK recursion)

    H^(1) = lambda_b + lambda_W x.x'/n_0,   H^(l+1)_ab = lambda_b + lambda_W <sigma_a sigma_b>_{K^(l)}
                                                          + C_W <sigma'_a sigma'_b>_{K^(l)} H^(l)_ab.

Gaussian expectations come from :mod:`physai.theory.gaussian` (a graded 1-D rule on the diagonal, a 2-D polar rule
for pairs); closed forms for ReLU (the arc-cosine kernel, Cho & Saul 2009) and erf (Williams 1997, the arcsine
kernel) check it.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from physai._checks import check_float, check_int
from physai.theory.gaussian import get_activation, gauss_1d, gauss_2d

ORDER_1D = 12
ORDER_2D = 24


def check_kernel(K, name: str = "K") -> np.ndarray:
    """A kernel matrix: real, square [P, P] (a scalar is one input), symmetric, finite, with a nonnegative
    diagonal; returned as float64."""
    K = np.asarray(K)
    if K.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected real numbers, got dtype {K.dtype}")
    K = np.array(K, dtype=float, ndmin=2) if K.ndim == 0 else K.astype(float)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"{name}: expected a square matrix [P, P], got shape {K.shape}")
    if not np.isfinite(K).all():
        raise ValueError(f"{name}: expected finite values")
    if not np.allclose(K, K.T, rtol=1e-12, atol=0):
        raise ValueError(f"{name}: expected a symmetric matrix")
    if (np.diag(K) < 0).any():
        raise ValueError(f"{name}: expected a nonnegative diagonal, got {np.diag(K)}")
    return K


def check_inputs(X, name: str = "X") -> np.ndarray:
    """Inputs [P, n_0] (a 1-D array is one input), real and finite, as float64."""
    X = np.asarray(X)
    if X.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected real numbers, got dtype {X.dtype}")
    X = np.atleast_2d(X).astype(float)
    if X.ndim != 2 or 0 in X.shape:
        raise ValueError(f"{name}: expected inputs [P, n_0] with P, n_0 >= 1, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name}: expected finite values")
    return X


def layer_values(value, depth: int, name: str) -> np.ndarray:
    """A per-layer hyperparameter >= 0: a scalar (the same in every layer) or a sequence of ``depth`` values, as
    [depth] float64."""
    if np.ndim(value) == 0:
        return np.full(depth, check_float(value, name, nonnegative=True))
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a scalar or {depth} real values, got {value!r}") from error
    if array.shape != (depth,):
        raise ValueError(f"{name}: expected a scalar or {depth} values (one per layer), got shape {array.shape}")
    for v in array:
        check_float(float(v), name, nonnegative=True)
    return array


def pair_expectation(K, f: Callable, g: Callable | None = None, order_1d: int = ORDER_1D,
                     order_2d: int = ORDER_2D) -> np.ndarray:
    """The matrix E[f(z_a) g(z_b)] for z ~ N(0, K), K [P, P] (``g`` defaults to ``f``): the diagonal by
    :func:`physai.theory.gaussian.gauss_1d`, each pair a < b by :func:`physai.theory.gaussian.gauss_2d`.
    Returns [P, P] float64."""
    g = f if g is None else g
    K = check_kernel(K)
    P = K.shape[0]
    out = np.empty((P, P))
    out[np.diag_indices(P)] = gauss_1d(lambda z: f(z) * g(z), np.diag(K), order_1d)
    if P > 1:
        i, j = np.triu_indices(P, 1)
        upper = gauss_2d(lambda za, zb: f(za) * g(zb), K[i, i], K[i, j], K[j, j], order_2d)
        out[i, j] = upper
        out[j, i] = upper if g is f else gauss_2d(lambda za, zb: g(za) * f(zb), K[i, i], K[i, j], K[j, j], order_2d)
    return out


def first_layer_kernel(X, C_b: float = 0.0, C_W: float = 1.0) -> np.ndarray:
    """K^(1) = C_b + C_W x_a.x_b / n_0 for inputs X [P, n_0] (book ch. 4: the first layer is exactly Gaussian at
    any width). Returns [P, P] float64."""
    X = check_inputs(X)
    return check_float(C_b, "C_b", nonnegative=True) + check_float(C_W, "C_W", positive=True) * (X @ X.T) / X.shape[1]


def kernel_map(K, activation="relu", C_b: float = 0.0, C_W: float = 1.0, order_1d: int = ORDER_1D,
               order_2d: int = ORDER_2D) -> np.ndarray:
    """One step of the kernel recursion: C_b + C_W <sigma(z_a) sigma(z_b)>_K for K [P, P]; returns [P, P]."""
    act = get_activation(activation)
    return C_b + C_W * pair_expectation(K, act.fn, order_1d=order_1d, order_2d=order_2d)


def kernel_recursion(X, activation="relu", depth: int = 10, C_b: float = 0.0, C_W: float = 1.0, *,
                     K1=None, order_1d: int = ORDER_1D, order_2d: int = ORDER_2D) -> np.ndarray:
    """The infinite-width kernel K^(l) of layers l = 1..depth for inputs X [P, n_0].

    Parameters
    ----------
    X : inputs [P, n_0] (ignored when ``K1`` is given; pass None).
    activation : a name of :data:`physai.theory.ACTIVATIONS`, a vectorised callable, or ``(sigma, sigma')``.
    depth : number of layers L >= 1.
    C_b, C_W : bias and weight variances (C_W > 0, C_b >= 0), the same in every layer.
    K1 : the first-layer kernel [P, P] instead of X.

    Returns K [depth, P, P] float64 (K[l - 1] is layer l). Raises ValueError/TypeError naming a bad argument.
    """
    depth = check_int(depth, "depth", min=1)
    C_b = check_float(C_b, "C_b", nonnegative=True)
    C_W = check_float(C_W, "C_W", positive=True)
    act = get_activation(activation)
    K = check_kernel(K1, "K1") if K1 is not None else first_layer_kernel(X, C_b, C_W)
    out = np.empty((depth, *K.shape))
    out[0] = K
    for layer in range(1, depth):
        out[layer] = kernel_map(out[layer - 1], act, C_b, C_W, order_1d, order_2d)
    return out


def ntk_recursion(X, activation="relu", depth: int = 10, C_b: float = 0.0, C_W: float = 1.0, lambda_b=1.0,
                  lambda_W=1.0, *, order_1d: int = ORDER_1D, order_2d: int = ORDER_2D) -> tuple[np.ndarray, np.ndarray]:
    """Kernel and frozen NTK of layers 1..depth (the recursions in this module's docstring, book ch. 8): the
    infinite-width NTK, which is also the mean at any width for linear networks and, on the diagonal, for ReLU
    (the NTK is even in each neuron's incoming weights, whose sign decides sigma'); otherwise the finite-width mean
    differs at O(L/n) (book ch. 8 and 11), which this module does not compute.

    ``lambda_b`` and ``lambda_W`` are the learning-rate tensors: a scalar (every layer) or ``depth`` values, layer 1
    first; the weights of layer l train at lambda_W^(l) / n_(l-1). The book's choice at criticality for
    scale-invariant activations (ch. 9) rescales both, lambda_b^(l) = lambda_b / L and lambda_W^(l) = lambda_W / L,
    so that H stays O(1) as L grows: every layer adds lambda_b + lambda_W <sigma^2> to H while chi_perp = 1 carries
    the sum forward, so H grows linearly in l (:meth:`physai.theory.CriticalPoint.ntk_slope`).

    Returns (K, H), each [depth, P, P] float64, for inputs X [P, n_0].
    """
    X = check_inputs(X)
    depth = check_int(depth, "depth", min=1)
    lb = layer_values(lambda_b, depth, "lambda_b")
    lW = layer_values(lambda_W, depth, "lambda_W")
    act = get_activation(activation)
    K = kernel_recursion(X, act, depth, C_b, C_W, order_1d=order_1d, order_2d=order_2d)
    H = np.empty_like(K)
    H[0] = lb[0] + lW[0] * (X @ X.T) / X.shape[1]
    for layer in range(1, depth):
        ss = pair_expectation(K[layer - 1], act.fn, order_1d=order_1d, order_2d=order_2d)
        dd = pair_expectation(K[layer - 1], act.derivative, order_1d=order_1d, order_2d=order_2d)
        H[layer] = lb[layer] + lW[layer] * ss + C_W * dd * H[layer - 1]
    return K, H


def relu_pair(Kaa, Kab, Kbb) -> tuple[np.ndarray, np.ndarray]:
    """Closed forms for ReLU from broadcastable arrays of the variances and covariance of (z_a, z_b):
    (<sigma_a sigma_b>, <sigma'_a sigma'_b>) = (sqrt(K_aa K_bb) (sin t + (pi - t) cos t) / (2 pi), (pi - t) / (2 pi)),
    cos t = K_ab / sqrt(K_aa K_bb) (the arc-cosine kernels of degree 1 and 0, Cho & Saul 2009). An input of zero
    variance has z = 0 exactly, so both are 0 there, with sigma'(0) = 0 as in the quadrature of
    :func:`pair_expectation`, ``physai.twolayer`` and torch (two_layer_ntk at x = 0 with a bias depends on it).
    Returns two float64 arrays of the broadcast shape."""
    Kaa, Kab, Kbb = np.broadcast_arrays(*(np.asarray(k, dtype=float) for k in (Kaa, Kab, Kbb)))
    norms = np.sqrt(Kaa * Kbb)
    t = np.arccos(np.clip(np.divide(Kab, norms, out=np.ones_like(norms), where=norms > 0), -1.0, 1.0))
    return (norms * (np.sin(t) + (np.pi - t) * np.cos(t)) / (2 * np.pi),
            np.where(norms > 0, (np.pi - t) / (2 * np.pi), 0.0))


def erf_pair(Kaa, Kab, Kbb) -> tuple[np.ndarray, np.ndarray]:
    """Closed forms for sigma = erf from broadcastable arrays of the variances and covariance of (z_a, z_b):
    <sigma_a sigma_b> = (2/pi) arcsin(2 K_ab / sqrt((1 + 2 K_aa)(1 + 2 K_bb))) (Williams 1997, the arcsine kernel)
    and its derivative in K_ab, <sigma'_a sigma'_b> = (4/pi) / sqrt((1 + 2 K_aa)(1 + 2 K_bb) - 4 K_ab^2) (Price's
    theorem: d<f g>/dK_ab = <f' g'>)."""
    Kaa, Kab, Kbb = np.broadcast_arrays(*(np.asarray(k, dtype=float) for k in (Kaa, Kab, Kbb)))
    q = (1 + 2 * Kaa) * (1 + 2 * Kbb)
    return (2 / math.pi) * np.arcsin(np.clip(2 * Kab / np.sqrt(q), -1, 1)), (4 / math.pi) / np.sqrt(q - 4 * Kab**2)


def relu_expectations(K) -> tuple[np.ndarray, np.ndarray]:
    """:func:`relu_pair` over a kernel matrix K [P, P]: (<sigma_a sigma_b>, <sigma'_a sigma'_b>), each [P, P]."""
    K = check_kernel(K)
    d = np.diag(K)
    return relu_pair(d[:, None], K, d[None, :])


def erf_expectations(K) -> tuple[np.ndarray, np.ndarray]:
    """:func:`erf_pair` over a kernel matrix K [P, P]: (<sigma_a sigma_b>, <sigma'_a sigma'_b>), each [P, P]."""
    K = check_kernel(K)
    d = np.diag(K)
    return erf_pair(d[:, None], K, d[None, :])
