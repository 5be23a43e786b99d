"""Susceptibilities, fixed points of the single-input kernel recursion, and critical initialisation.

For one input the recursion K^(l+1) = F(K^(l)) = C_b + C_W <sigma^2>_K has two susceptibilities (Roberts, Yaida,
Hanin, arXiv 2106.10165, ch. 5): the parallel one, the slope of F,

    chi_parallel(K) = dF/dK = (C_W / (2 K^2)) <sigma(z)^2 (z^2 - K)>_K,

which governs perturbations of the diagonal kernel, and the perpendicular one,

    chi_perp(K) = C_W <sigma'(z)^2>_K,

which governs the distance between two nearby inputs (the off-diagonal kernel). Criticality is a fixed point K*
of F with chi_parallel(K*) = chi_perp(K*) = 1, so that neither the norm of a signal nor the angle between two signals
changes exponentially with depth. Three cases (ch. 5, universality classes):

- scale-invariant (sigma(z) = a_+ z for z >= 0, a_- z below; A_2 = (a_+^2 + a_-^2) / 2): C_b = 0, C_W = 1 / A_2
  (ReLU: 2), and every K is a fixed point;
- K* = 0 (sigma(0) = 0, sigma'(0) = sigma_1 != 0, a_1 < 0; tanh, erf, sin): C_b = 0, C_W = 1 / sigma_1^2; near the
  fixed point C_W <sigma^2>_K = K + a_1 K^2 + O(K^3) and chi_perp = 1 + b_1 K + O(K^2), with
  a_1 = sigma_3/sigma_1 + (3/4)(sigma_2/sigma_1)^2 and b_1 = sigma_3/sigma_1 + (sigma_2/sigma_1)^2 (sigma_k the
  k-th derivative at 0; from <z^4> = 3K^2 in the Taylor expansion), so K^(l) ~ 1/((-a_1) l) and
  chi_perp ~ 1 - p_perp / l with p_perp = b_1 / a_1 (tanh: a_1 = -2, p_perp = 1);
- K* > 0: a root of chi_parallel(K)/chi_perp(K) = 1 (a ratio free of C_W), with C_W = 1 / <sigma'^2>_{K*} and
  C_b = K* - C_W <sigma^2>_{K*} >= 0 (physai's tanh-approximate GELU: K* = 3.5568, C_b = 0.17290,
  C_W = 1.98289; the exact GELU z Phi(z): C_b = 0.172922, C_W = 1.983058 and SWISH: K* = 14.320174,
  C_b = 0.555143, C_W = 1.988005, the values the book gives in ch. 5). Found numerically.

Fixed points (book ch. 5): K* is stable when chi_parallel(K*) < 1 (nearby kernels flow into it exponentially),
unstable when > 1, and marginal at chi_parallel = 1, where the linearisation decides nothing and the next order
does (tanh at criticality: K* = 0 attracts as the power law 1/(2 l)).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from physai._checks import check_float
from physai.theory.gaussian import get_activation, gauss_1d
from physai.theory.kernels import ORDER_1D

UNIVERSALITY_CLASSES = ("scale-invariant", "K*=0", "K*>0")


def _variances(K, name="K") -> np.ndarray:
    K = np.asarray(K)
    if K.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected real numbers, got dtype {K.dtype}")
    K = K.astype(float)
    if not (np.isfinite(K).all() and (K > 0).all()):
        raise ValueError(f"{name}: expected finite variances > 0, got {K}")
    return K


def susceptibilities(K, activation="relu", C_W: float = 1.0, order: int = ORDER_1D) -> tuple[np.ndarray, np.ndarray]:
    """(chi_parallel, chi_perp) at single-input kernel values ``K`` (> 0, any shape; results have its shape), by
    quadrature (:func:`physai.theory.gaussian.gauss_1d`; the formulas in this module's docstring)."""
    K = _variances(K)
    C_W = check_float(C_W, "C_W", positive=True)
    act = get_activation(activation)
    chi_parallel = C_W * gauss_1d(lambda z: act.fn(z) ** 2 * (z**2 - K[..., None]), K, order) / (2 * K**2)
    chi_perp = C_W * gauss_1d(lambda z: act.derivative(z) ** 2, K, order)
    return chi_parallel, chi_perp


def taylor_coefficients(activation, step: float = 1e-3) -> tuple[float, float, float, float]:
    """(sigma(0), sigma_1, sigma_2, sigma_3): the activation and its first three derivatives at 0. sigma_1 is the
    derivative itself; sigma_2 and sigma_3 are central differences of it at ``step`` and ``step``/2, combined by
    Richardson extrapolation (error O(step^4) + rounding ~1e-16 / step^2: ~1e-10 at the default)."""
    act = get_activation(activation)
    h = check_float(step, "step", positive=True)

    def differences(h):
        d = np.asarray(act.derivative(np.array([-h, 0.0, h])), dtype=float)
        return (d[2] - d[0]) / (2 * h), (d[2] - 2 * d[1] + d[0]) / h**2

    coarse, fine = differences(h), differences(h / 2)
    s2, s3 = ((4 * f - c) / 3 for f, c in zip(fine, coarse))
    return float(act.fn(np.array([0.0]))[0]), float(act.derivative(np.array([0.0]))[0]), float(s2), float(s3)


@dataclass(frozen=True)
class CriticalPoint:
    """Critical initialisation of an activation: C_b, C_W and the universality class (one of
    :data:`UNIVERSALITY_CLASSES`). ``K_star`` is the fixed point (None for scale-invariant activations: any K);
    ``a1`` and ``p_perp`` the K* = 0 class's coefficients (K^(l) ~ 1/((-a1) l), chi_perp ~ 1 - p_perp/l), else
    None."""

    C_b: float
    C_W: float
    universality_class: str
    K_star: float | None = None
    a1: float | None = None
    p_perp: float | None = None

    def kernel_asymptote(self, depth):
        """The K* = 0 class's large-depth kernel 1 / ((-a1) l) at layers ``depth`` (array-like); ValueError for the
        other classes."""
        if self.universality_class != "K*=0":
            raise ValueError(f"kernel_asymptote: only the K*=0 class has a power-law kernel, not "
                             f"{self.universality_class}")
        return 1 / (-self.a1 * np.asarray(depth, dtype=float))

    def ntk_slope(self, lambda_b: float = 1.0, lambda_W: float = 1.0, K1: float = 1.0) -> float:
        """The growth rate dH^(l)/dl of the single-input NTK at criticality, with layer-independent learning rates
        (derived here from the NTK recursion of :mod:`physai.theory.kernels`):

        - scale-invariant: chi_perp = 1 and <sigma^2> = K1 / C_W at every layer, so H^(l) = l (lambda_b +
          lambda_W K1 / C_W) exactly (K1: the first-layer kernel);
        - K* = 0: chi_perp ~ 1 - p_perp / l and <sigma^2> = O(1/l), so dH/dl = lambda_b - p_perp H / l gives
          H^(l) ~ lambda_b l / (1 + p_perp) (tanh: lambda_b l / 2), approached as O(1)/l.

        Either way H grows linearly in depth, which is why the book scales lambda_b and lambda_W by 1/L at
        criticality (ch. 9). ValueError for the K* > 0 class."""
        lambda_b = check_float(lambda_b, "lambda_b", nonnegative=True)
        lambda_W = check_float(lambda_W, "lambda_W", nonnegative=True)
        if self.universality_class == "scale-invariant":
            return lambda_b + lambda_W * check_float(K1, "K1", positive=True) / self.C_W
        if self.universality_class == "K*=0":
            return lambda_b / (1 + self.p_perp)
        raise ValueError(f"ntk_slope: no closed form for the {self.universality_class} class")


def _mean_sq(act, K, order):
    return gauss_1d(lambda z: act.fn(z) ** 2, K, order)


def critical_point(activation="relu", *, K_min: float = 1e-2, K_max: float = 30.0, order: int = ORDER_1D,
                   tol: float = 1e-9) -> CriticalPoint:
    """The critical (C_b, C_W) of ``activation`` and its universality class, found numerically (this module's
    docstring gives the conditions).

    Scale invariance is recognised from sigma(c z) = c sigma(z) (c > 0) to ``tol`` (then C_W = K / <sigma^2>_K by
    quadrature, exact for this class); the K* = 0 class from the Taylor coefficients at 0; a K* > 0 critical point
    as a root of chi_parallel / chi_perp - 1 bracketed on a geometric grid of [K_min, K_max] and refined by Brent's
    method to machine precision (the first root whose C_b is >= 0).

    Raises ``ValueError`` naming ``activation`` when there is no critical point with C_b >= 0 (softplus)."""
    act = get_activation(activation)
    K_min = check_float(K_min, "K_min", positive=True)
    K_max = check_float(K_max, "K_max", positive=True)
    if K_max <= K_min:
        raise ValueError(f"K_max: expected a value > K_min = {K_min}, got {K_max}")

    # Positive homogeneity sigma(c z) = c sigma(z) (c > 0) makes sigma^2 = A_2-weighted z^2, so chi_parallel =
    # chi_perp = C_W <sigma^2>_K / K at every K: checked on sigma itself, as the derivative of a callable is only
    # a finite difference, inexact next to a kink.
    z = np.array([-2.5, -1.0, -0.3, 0.3, 1.0, 2.5])
    values = np.asarray(act.fn(z), dtype=float)
    if np.any(values != 0) and all(np.allclose(act.fn(c * z), c * values, rtol=tol, atol=0) for c in (0.1, 3.7)):
        return CriticalPoint(0.0, float(1 / _mean_sq(act, np.array([1.0]), order)[0]), "scale-invariant")

    s0, s1, s2, s3 = taylor_coefficients(act)
    if abs(s0) < tol and abs(s1) > tol:
        a1 = s3 / s1 + 0.75 * (s2 / s1) ** 2
        if a1 < 0:
            return CriticalPoint(0.0, 1 / s1**2, "K*=0", 0.0, a1, (s3 / s1 + (s2 / s1) ** 2) / a1)

    from scipy.optimize import brentq

    def ratio(K):
        par, perp = susceptibilities(np.array([K]), act, 1.0, order)
        return float(par[0] / perp[0] - 1)

    grid = np.geomspace(K_min, K_max, 49)
    values = [ratio(K) for K in grid]
    for lo, hi, f_lo, f_hi in zip(grid[:-1], grid[1:], values[:-1], values[1:]):
        if f_lo == 0 or f_lo * f_hi < 0:
            K_star = lo if f_lo == 0 else brentq(ratio, lo, hi, xtol=1e-15 * hi, rtol=4 * np.finfo(float).eps)
            C_W = 1 / float(susceptibilities(np.array([K_star]), act, 1.0, order)[1][0])
            C_b = K_star - C_W * float(_mean_sq(act, np.array([K_star]), order)[0])
            if C_b >= -tol * K_star:
                return CriticalPoint(max(C_b, 0.0), C_W, "K*>0", float(K_star))
    raise ValueError(f"activation: {act.name} has no critical initialisation with C_b >= 0 and K* in "
                     f"[0] or [{K_min}, {K_max}] (chi_parallel / chi_perp - 1 does not change sign there)")


#: |chi_parallel - 1| below which a fixed point is reported marginal: the susceptibilities' accuracy (quadrature to
#: ~1e-13; the K = 0 limit from Richardson-extrapolated difference quotients to ~1e-10) with room to spare.
MARGINAL_TOL = 1e-8


@dataclass(frozen=True)
class FixedPoint:
    """A fixed point K* = C_b + C_W <sigma^2>_{K*} (K* >= 0, a variance) with its susceptibilities (dimensionless).
    ``stability`` is "stable" (chi_parallel < 1 - :data:`MARGINAL_TOL`: nearby kernels flow into it), "unstable"
    (> 1 + tol) or "marginal" (the linear order decides nothing: this module's docstring); ``chi_perp`` > 1 means
    nearby inputs separate (chaotic phase), < 1 that they merge (ordered phase)."""

    K: float
    chi_parallel: float
    chi_perp: float

    @property
    def stability(self) -> str:
        """"stable", "marginal" or "unstable" (class docstring)."""
        if abs(self.chi_parallel - 1) <= MARGINAL_TOL:
            return "marginal"
        return "stable" if self.chi_parallel < 1 else "unstable"

    @property
    def stable(self) -> bool:
        """Whether ``stability`` is "stable"."""
        return self.stability == "stable"


def _slopes_at_zero(act, step: float = 1e-5) -> tuple[float, float]:
    """The one-sided slopes a_+ = lim sigma(h)/h and a_- = lim sigma(-h)/(-h) as h -> 0+ of an activation with
    sigma(0) ~ 0, from the difference quotients q(+-h) = (sigma(+-h) - sigma(0)) / (+-h) at ``step`` and ``step``/2
    combined by Richardson extrapolation: q(h) = a + sigma''(0+) h / 2 + O(h^2) gives error O(step^2) ~ 1e-10, and
    rounding stays ~1e-16 because sigma(0) is 0 to rounding. Taken on sigma itself rather than its derivative, which
    has no value at a kink (ReLU's is 0 there by convention, a callable's a finite difference across it)."""
    h = np.array([step, step / 2])
    zero = float(np.asarray(act.fn(np.array([0.0])), dtype=float)[0])
    plus = (np.asarray(act.fn(h), dtype=float) - zero) / h
    minus = (np.asarray(act.fn(-h), dtype=float) - zero) / -h
    return float(2 * plus[1] - plus[0]), float(2 * minus[1] - minus[0])


def fixed_points(activation="relu", C_b: float = 0.0, C_W: float = 1.0, *, K_min: float = 1e-4,
                 K_max: float = 30.0, order: int = ORDER_1D) -> list[FixedPoint]:
    """Fixed points of the single-input kernel recursion in [K_min, K_max], plus K* = 0 when C_b = 0 and
    sigma(0) = 0. At K* = 0 the susceptibilities are their limits as K -> 0+ (the recursion only visits K > 0):
    with one-sided slopes a_+- of sigma at 0, <sigma^2>_K = A_2 K + o(K) and <sigma'^2>_K -> A_2, A_2 =
    (a_+^2 + a_-^2) / 2 (half of the Gaussian mass on each side), so chi_parallel = chi_perp =
    C_W A_2 (C_W sigma'(0)^2 for a smooth sigma; C_W / 2 for ReLU, not C_W sigma'(0)^2 = 0). Roots of
    C_b + C_W <sigma^2>_K - K are bracketed on a geometric grid and refined by Brent's method.

    Returns the fixed points in increasing K. Raises ``ValueError`` when every K is a fixed point (scale-invariant
    activations at C_b = 0, C_W = 1/A_2), where the list would be a continuum."""
    from scipy.optimize import brentq

    act = get_activation(activation)
    C_b = check_float(C_b, "C_b", nonnegative=True)
    C_W = check_float(C_W, "C_W", positive=True)
    K_min = check_float(K_min, "K_min", positive=True)
    K_max = check_float(K_max, "K_max", positive=True)

    def excess(K):
        return C_b + C_W * float(_mean_sq(act, np.array([K]), order)[0]) - K

    grid = np.geomspace(K_min, K_max, 97)
    values = np.array([excess(K) for K in grid])
    if np.all(np.abs(values) < 1e-12 * grid):
        raise ValueError("activation: every K is a fixed point (a scale-invariant activation at criticality)")
    roots = []
    if C_b == 0 and abs(float(np.asarray(act.fn(np.array([0.0])))[0])) < 1e-12:
        a_plus, a_minus = _slopes_at_zero(act)
        chi = C_W * (a_plus**2 + a_minus**2) / 2
        roots.append(FixedPoint(0.0, chi, chi))
    for lo, hi, f_lo, f_hi in zip(grid[:-1], grid[1:], values[:-1], values[1:]):
        if f_lo * f_hi < 0:
            K = brentq(excess, lo, hi, xtol=1e-15 * hi)
            par, perp = susceptibilities(np.array([K]), act, C_W, order)
            roots.append(FixedPoint(float(K), float(par[0]), float(perp[0])))
    return roots
