"""The infinite-width NTK of physai's two-layer networks in the ``ntk`` parameterization.

``physai.twolayer.TwoLayer(d, m, 1, activation, "ntk")`` computes f(x) = (1/sqrt(m)) sum_i a_i sigma(h_i(x)) with
h_i(x) = w_i . x / sqrt(d) + b_i, W and a initialised N(0, 1), b initialised 0 and trained, every learning-rate
multiplier 1 (``physai.twolayer.params``). Its NTK, sum over parameters of df(x)/dtheta df(x')/dtheta, is

    (1/m) sum_i [ sigma(h_i) sigma(h'_i) + a_i^2 sigma'(h_i) sigma'(h'_i) (x.x'/d + 1) ]

(the a, and the W and b gradients), and by the law of large numbers at initialisation (Jacot, Gabriel, Hongler 2018,
Theorem 1, for this two-layer case), with (u, u') ~ N(0, [[x.x/d, x.x'/d], [x.x'/d, x'.x'/d]]) and E a^2 = 1,

    Theta(x, x') = <sigma(u) sigma(u')> + <sigma'(u) sigma'(u')> (x.x'/d + 1)      (without a bias: no "+ 1").

The empirical NTK of width m deviates from it by O(1/sqrt(m)) at initialisation.
"""
from __future__ import annotations

import numpy as np

from physai.theory.gaussian import get_activation, gauss_2d
from physai.theory.kernels import ORDER_2D, check_inputs, erf_pair, relu_pair


def two_layer_ntk(X1, X2=None, activation="relu", *, bias: bool = True, order: int = ORDER_2D) -> np.ndarray:
    """The infinite-width NTK Theta(X1, X2) [n1, n2] (float64) of ``TwoLayer(..., param="ntk")`` with one output.

    X1 [n1, d] and X2 [n2, d] (default X1) are inputs; ``activation`` a name of
    :data:`physai.theory.ACTIVATIONS` (those ``physai.twolayer`` also has: relu, tanh, gelu, erf, quadratic, linear,
    softplus) or a vectorised callable / ``(sigma, sigma')`` pair; ``bias`` whether the hidden layer has a
    (trained) bias. ReLU and erf use closed forms (arc-cosine and arcsine kernels); other activations the 2-D
    quadrature of :func:`physai.theory.gaussian.gauss_2d` (``order`` angular nodes per piece).

    Raises ValueError/TypeError naming a bad argument (mismatched input dimensions included)."""
    X1 = check_inputs(X1, "X1")
    X2 = X1 if X2 is None else check_inputs(X2, "X2")
    if X2.shape[1] != X1.shape[1]:
        raise ValueError(f"X2: expected inputs of dimension {X1.shape[1]} like X1, got shape {X2.shape}")
    if not isinstance(bias, (bool, np.bool_)):
        raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
    d = X1.shape[1]
    Kab = X1 @ X2.T / d
    Kaa = np.einsum("ij,ij->i", X1, X1)[:, None] / d
    Kbb = np.einsum("ij,ij->i", X2, X2)[None, :] / d
    act = get_activation(activation)
    if isinstance(activation, str) and activation in ("relu", "erf"):
        ss, dd = (relu_pair if act.name == "relu" else erf_pair)(Kaa, Kab, Kbb)
    else:
        ss = gauss_2d(lambda a, b: act.fn(a) * act.fn(b), Kaa, Kab, Kbb, order)
        dd = gauss_2d(lambda a, b: act.derivative(a) * act.derivative(b), Kaa, Kab, Kbb, order)
    return ss + dd * (Kab + (1.0 if bias else 0.0))
