"""Leading finite-width corrections: the four-point vertex, the 1/n shift of the mean kernel, and the
normalised variances they give; exact finite-width forms for deep linear and ReLU networks.

Conditional on layer l, the preactivations of layer l + 1 are n independent Gaussian vectors whose covariance is
the stochastic metric G^(l+1) = C_b + C_W (1/n) sum_j sigma(z^(l)_j)^2 (the "stochastic metric" of Roberts, Yaida,
Hanin, arXiv 2106.10165, ch. 4). Writing E[G^(l)] = K^(l) + G1^(l)/n and Var[G^(l)] = V^(l)/n + O(1/n^2), with equal
hidden widths n and F(K) = C_b + C_W <sigma^2>_K, a second-order expansion of E F(G) and a first-order one of
G^(l+1) - E G^(l+1) give (the single-input case of the book's four-point vertex recursion, ch. 4; derived here)

    V^(l+1)  = C_W^2 [<sigma^4>_K - <sigma^2>_K^2] + chi_parallel(K)^2 V^(l),         V^(1) = 0,
    G1^(l+1) = chi_parallel(K) G1^(l) + (C_W / 2) f''(K) V^(l),                       G1^(1) = 0,

with K = K^(l), f(K) = <sigma^2>_K and f''(K) = <sigma^2 He_4(z / sqrt K)>_K / (4 K^2) (Gaussian integration by
parts twice; He_4(x) = x^4 - 6 x^2 + 3). For O^(l) = (1/n) sum_i z_i^(l) z_i^(l), whose entries are conditionally
Gaussian given G^(l),

    E[O^(l)] = E[G^(l)],        Var[O^(l)] = Var[G^(l)] + 2 E[(G^(l))^2] / n = (V^(l) + 2 K^2) / n + O(1/n^2).

Deep linear networks (C_W = 1, C_b = 0) give V^(l) = 2 (l - 1) K^2, hence Var[O^(l)]/K^2 = 2 l / n, the book's
(3.33). Scale-invariant activations at criticality give V^(l) / K^2 = (l - 1)(3 A_4 / A_2^2 - 1) (ReLU: 5 (l - 1)).

Exact at any width (C_b = 0): for a linear network O^(l) = K^(1) C_W^(l-1) prod_k chi2_n / n, so
Var[G^(l)] / E[G^(l)]^2 = (1 + 2/n)^(l-1) - 1 (the book's (3.28)) and Var[O^(l)] / E[O^(l)]^2 = (1 + 2/n)^l - 1;
for ReLU the squared norm of a layer is G chi2_B with B ~ Binomial(n, 1/2), so E[G^2]/E[G]^2 = (1 + 5/n)^(l-1) and
Var[O^(l)] / E[O^(l)]^2 = (1 + 5/n)^(l-1) (1 + 2/n) - 1. These differ from the leading-order forms at O((l/n)^2).

:func:`finite_width` runs the single-input recursions (each input alone); :func:`finite_width_kernel` the same for
the whole kernel matrix of two inputs, overlaps included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from physai._checks import check_choice, check_float, check_int
from physai.theory.criticality import susceptibilities
from physai.theory.gaussian import get_activation, gauss_1d, gauss_2d
from physai.theory.kernels import ORDER_1D, ORDER_2D, check_kernel, pair_expectation


@dataclass(frozen=True)
class FiniteWidth:
    """Width-independent coefficients of the 1/n expansion for single inputs, at layers 1..depth: K, V and G1, each
    [depth] (one input) or [depth, P] (P inputs, each on its own). See the module docstring for their meaning."""

    K: np.ndarray
    V: np.ndarray
    G1: np.ndarray

    def _width(self, width):
        return check_float(width, "width", positive=True)

    def mean(self, width) -> np.ndarray:
        """E[O^(l)] = E[G^(l)] = K + G1 / n to order 1/n."""
        return self.K + self.G1 / self._width(width)

    def metric_variance(self, width) -> np.ndarray:
        """Var[G^(l)] / K^2 = V / (n K^2), the normalised four-point vertex, to order 1/n."""
        return self.V / (self._width(width) * self.K**2)

    def normalized_variance(self, width) -> np.ndarray:
        """Var[O^(l)] / E[O^(l)]^2 = (V / K^2 + 2) / n to order 1/n."""
        return (self.V / self.K**2 + 2) / self._width(width)


def finite_width(K1, activation="relu", depth: int = 10, C_b: float = 0.0, C_W: float = 1.0,
                 order: int = ORDER_1D) -> FiniteWidth:
    """The recursions of this module's docstring from the first-layer variance(s) ``K1`` (> 0; a scalar or [P]
    inputs, each treated alone) through ``depth`` layers of equal width. Returns a :class:`FiniteWidth` whose
    arrays are [depth] or [depth, P] float64. ValueError/TypeError name a bad argument."""
    K1 = np.asarray(K1)
    if K1.dtype.kind not in "iuf":
        raise TypeError(f"K1: expected real numbers, got dtype {K1.dtype}")
    if K1.ndim > 1 or not (np.isfinite(K1).all() and (K1 > 0).all()):
        raise ValueError(f"K1: expected variances > 0 (a scalar or one per input), got {K1}")
    depth = check_int(depth, "depth", min=1)
    C_b = check_float(C_b, "C_b", nonnegative=True)
    C_W = check_float(C_W, "C_W", positive=True)
    act = get_activation(activation)
    K = np.empty((depth, *K1.shape))
    V = np.zeros_like(K)
    G1 = np.zeros_like(K)
    K[0] = K1
    for layer in range(1, depth):
        k = K[layer - 1]
        s2 = gauss_1d(lambda z: act.fn(z) ** 2, k, order)
        s4 = gauss_1d(lambda z: act.fn(z) ** 4, k, order)
        f2 = gauss_1d(lambda z: act.fn(z) ** 2 * ((z**2 / k[..., None]) ** 2 - 6 * z**2 / k[..., None] + 3), k,
                      order) / (4 * k**2)
        chi = susceptibilities(k, act, C_W, order)[0]
        K[layer] = C_b + C_W * s2
        V[layer] = C_W**2 * (s4 - s2**2) + chi**2 * V[layer - 1]
        G1[layer] = chi * G1[layer - 1] + 0.5 * C_W * f2 * V[layer - 1]
    return FiniteWidth(K, V, G1)


@dataclass(frozen=True)
class FiniteWidthKernel:
    """The 1/n coefficients for a kernel matrix of P <= 2 inputs at layers 1..depth: K [depth, P, P] (infinite
    width), G1 [depth, P, P] (E[G^(l)] = K + G1/n), and the four-point vertex V [depth, Q, Q] over the Q = P(P+1)/2
    distinct entries ``pairs`` (row-major upper triangle: (0,0), (0,1), (1,1)), n Cov(G_p, G_q) -> V_pq."""

    K: np.ndarray
    G1: np.ndarray
    V: np.ndarray
    pairs: tuple[tuple[int, int], ...]

    def mean(self, width) -> np.ndarray:
        """E[O^(l)] = E[G^(l)] = K + G1 / n to order 1/n, [depth, P, P]."""
        return self.K + self.G1 / check_float(width, "width", positive=True)

    def variance(self, width) -> np.ndarray:
        """Var[O^(l)_ab] = (V_(ab)(ab) + K_aa K_bb + K_ab^2) / n to order 1/n, [depth, P, P] (Isserlis for the
        conditionally Gaussian z given G)."""
        n = check_float(width, "width", positive=True)
        out = np.empty_like(self.K)
        for p, (a, b) in enumerate(self.pairs):
            value = (self.V[:, p, p] + self.K[:, a, a] * self.K[:, b, b] + self.K[:, a, b] ** 2) / n
            out[:, a, b] = out[:, b, a] = value
        return out


def finite_width_kernel(K1, activation="relu", depth: int = 10, C_b: float = 0.0, C_W: float = 1.0,
                        order: int = ORDER_1D, order_2d: int = ORDER_2D, step: float = 1e-4) -> FiniteWidthKernel:
    """The module docstring's recursions for the whole kernel matrix of P <= 2 inputs (the book's general
    four-point vertex, ch. 4, restricted to what 2-D Gaussian integrals give: with two inputs every four-point
    expectation involves at most two distinct preactivations). With k the Q distinct entries of K and
    F(k) = C_b + C_W <sigma_a sigma_b>_k:

        V^(l+1) = C_W^2 Cov_k(sigma_a sigma_b, sigma_c sigma_d) + J V^(l) J^T,
        G1^(l+1) = J G1^(l) + (1/2) sum_pq (d^2 F / dk_p dk_q) V^(l)_pq,

    with J = dF/dk; the first and second derivatives by central differences of the quadrature with steps
    ``step`` x sqrt(K_aa K_bb) (error ~ step^2 + 1e-16 / step^2 relative). The first-layer kernel ``K1`` [P, P] must
    be positive definite with room for the steps (|correlation| < 1 - 10 step).

    Returns a :class:`FiniteWidthKernel`; ValueError/TypeError name a bad argument."""
    K1 = check_kernel(K1, "K1")
    P = K1.shape[0]
    if P > 2:
        raise ValueError(f"K1: expected 1 or 2 inputs (4-point terms of 3+ inputs need 3-D integrals), got {P}")
    depth = check_int(depth, "depth", min=1)
    C_b = check_float(C_b, "C_b", nonnegative=True)
    C_W = check_float(C_W, "C_W", positive=True)
    step = check_float(step, "step", positive=True)
    if P == 2 and abs(K1[0, 1]) >= (1 - 10 * step) * math.sqrt(K1[0, 0] * K1[1, 1]):
        raise ValueError(f"K1: expected |correlation| < {1 - 10 * step} (room for the difference steps), got "
                         f"{K1[0, 1] / math.sqrt(K1[0, 0] * K1[1, 1])}")
    act = get_activation(activation)
    pairs = tuple((a, b) for a in range(P) for b in range(a, P))
    Q = len(pairs)

    def matrix(k):
        K = np.empty((P, P))
        for value, (a, b) in zip(k, pairs):
            K[a, b] = K[b, a] = value
        return K

    def F(k):
        E = pair_expectation(matrix(k), act.fn, order_1d=order, order_2d=order_2d)
        return np.array([C_b + C_W * E[a, b] for a, b in pairs])

    def covariance(K):
        """C_W^2 Cov(sigma_a sigma_b, sigma_c sigma_d) over the pairs, from E[sigma_0^i sigma_1^(4-i)]."""
        if P == 1:
            s2, s4 = (gauss_1d(lambda z: act.fn(z) ** p, K[0, 0], order) for p in (2, 4))
            return C_W**2 * np.array([[s4 - s2**2]])
        moments = [gauss_2d(lambda za, zb, i=i: act.fn(za) ** i * act.fn(zb) ** (4 - i), K[0, 0], K[0, 1], K[1, 1],
                            order_2d) for i in range(5)]
        two = pair_expectation(K, act.fn, order_1d=order, order_2d=order_2d)
        powers = [(2, 0), (1, 1), (0, 2)]  # (power of sigma_0, power of sigma_1) of each pair's product
        out = np.empty((Q, Q))
        for p, (i0, i1) in enumerate(powers):
            for q, (j0, j1) in enumerate(powers):
                out[p, q] = moments[i0 + j0] - two[pairs[p]] * two[pairs[q]]
        return C_W**2 * out

    K = np.empty((depth, P, P))
    G1 = np.zeros((depth, P, P))
    V = np.zeros((depth, Q, Q))
    K[0] = K1
    k, g1 = np.array([K1[a, b] for a, b in pairs]), np.zeros(Q)
    for layer in range(1, depth):
        scale = np.array([math.sqrt(K[layer - 1, a, a] * K[layer - 1, b, b]) for a, b in pairs])
        h = step * scale
        f0 = F(k)
        plus = [F(k + h[i] * np.eye(Q)[i]) for i in range(Q)]
        minus = [F(k - h[i] * np.eye(Q)[i]) for i in range(Q)]
        J = np.stack([(plus[i] - minus[i]) / (2 * h[i]) for i in range(Q)], axis=1)
        H = np.empty((Q, Q, Q))
        for i in range(Q):
            H[:, i, i] = (plus[i] - 2 * f0 + minus[i]) / h[i] ** 2
            for j in range(i + 1, Q):
                ei, ej = h[i] * np.eye(Q)[i], h[j] * np.eye(Q)[j]
                H[:, i, j] = H[:, j, i] = (F(k + ei + ej) - F(k + ei - ej) - F(k - ei + ej) + F(k - ei - ej)) / (
                    4 * h[i] * h[j])
        V[layer] = covariance(K[layer - 1]) + J @ V[layer - 1] @ J.T
        g1 = J @ g1 + 0.5 * np.einsum("rpq,pq->r", H, V[layer - 1])
        k = f0
        K[layer] = matrix(k)
        G1[layer] = matrix(g1)
    return FiniteWidthKernel(K, G1, V, pairs)


def exact_normalized_variance(activation: str, depth: int, width: int) -> np.ndarray:
    """Var[O^(l)] / E[O^(l)]^2 at layers 1..depth, exactly at finite ``width``, for ``linear`` or ``relu``
    networks without biases (any C_W, any input): (1 + 2/n)^l - 1 and (1 + 5/n)^(l-1) (1 + 2/n) - 1 (module
    docstring). Returns [depth] float64."""
    check_choice(activation, "activation", ("linear", "relu"))
    depth = check_int(depth, "depth", min=1)
    n = check_int(width, "width", min=1)
    layers = np.arange(1, depth + 1)
    if activation == "linear":
        return (1 + 2 / n) ** layers - 1
    return (1 + 5 / n) ** (layers - 1) * (1 + 2 / n) - 1


def exact_metric_variance(activation: str, depth: int, width: int) -> np.ndarray:
    """Var[G^(l)] / E[G^(l)]^2 exactly at finite ``width`` for ``linear`` ((1 + 2/n)^(l-1) - 1) or ``relu``
    ((1 + 5/n)^(l-1) - 1) networks without biases; [depth] float64 (0 at layer 1, whose metric is fixed)."""
    check_choice(activation, "activation", ("linear", "relu"))
    depth = check_int(depth, "depth", min=1)
    n = check_int(width, "width", min=1)
    return (1 + (2 if activation == "linear" else 5) / n) ** np.arange(depth) - 1
