"""physai.theory, deterministic parts: quadrature against closed forms and independent integrators, kernel and NTK
recursions against closed-form iterations, criticality against the classes' closed forms, finite-width
coefficients against the exact linear and ReLU results, and argument checks."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from physai import theory as T

EPS = np.finfo(float).eps


def kernel_2x2(Kaa, rho, Kbb):
    Kab = rho * math.sqrt(Kaa * Kbb)
    return np.array([[Kaa, Kab], [Kab, Kbb]])


# -- quadrature -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [-0.95, -0.3, 0.0, 0.4, 0.999])
@pytest.mark.parametrize("scale", [0.1, 1.0, 7.0])
def test_relu_quadrature_is_exact(rho, scale):
    """The polar rule is exact for ReLU: it matches the arc-cosine kernels to rounding."""
    K = kernel_2x2(1.3 * scale, rho, 0.6 * scale)
    ss, dd = T.relu_expectations(K)
    act = T.get_activation("relu")
    assert np.allclose(T.pair_expectation(K, act.fn), ss, rtol=1e-12, atol=1e-14 * scale)
    assert np.allclose(T.pair_expectation(K, act.derivative), dd, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("rho", [-0.9, 0.0, 0.5, 0.99])
@pytest.mark.parametrize("scale", [0.05, 1.0, 5.0])
def test_erf_quadrature_matches_arcsine_kernel(rho, scale):
    K = kernel_2x2(1.1 * scale, rho, 0.7 * scale)
    ss, dd = T.erf_expectations(K)
    act = T.get_activation("erf")
    # The graded rules reach rounding level at these scales (measured <= 1e-14 relative; erf's large-K accuracy is
    # 1e-9 at K = 100, outside this range).
    assert np.allclose(T.pair_expectation(K, act.fn), ss, rtol=1e-12, atol=1e-15)
    assert np.allclose(T.pair_expectation(K, act.derivative), dd, rtol=1e-12, atol=1e-15)


def test_relu_closed_form_at_zero_variance():
    """An input of zero variance has z = 0: both arc-cosine kernels are 0 there (sigma'(0) = 0, the convention of
    the quadrature, physai.twolayer and torch), whichever of the two inputs it is."""
    K = np.array([[0.0, 0.0], [0.0, 1.3]])
    act = T.get_activation("relu")
    ss, dd = T.relu_expectations(K)
    assert np.array_equal(dd, np.array([[0.0, 0.0], [0.0, 0.5]])) and np.array_equal(ss[0], [0.0, 0.0])
    assert np.allclose(T.pair_expectation(K, act.derivative), dd, rtol=1e-12, atol=0)
    assert np.allclose(T.pair_expectation(K, act.fn), ss, rtol=1e-12, atol=0)


def test_gaussian_moments_are_isserlis():
    """E z_a^p z_b^q from Wick's theorem: polynomials are integrated exactly."""
    Kaa, Kab, Kbb = 1.7, -0.6, 0.9
    got = T.gauss_2d(lambda a, b: a**2 * b**2, Kaa, Kab, Kbb)
    assert got == pytest.approx(Kaa * Kbb + 2 * Kab**2, rel=1e-12)
    assert T.gauss_2d(lambda a, b: a**3 * b, Kaa, Kab, Kbb) == pytest.approx(3 * Kaa * Kab, rel=1e-12)
    assert T.gauss_1d(lambda z: z**6, 2.0) == pytest.approx(15 * 8, rel=1e-12)


def test_tanh_quadrature_against_scipy_dblquad():
    """An independent adaptive integrator for a smooth activation without closed form."""
    from scipy.integrate import dblquad

    K = kernel_2x2(1.4, 0.6, 0.8)
    L = np.linalg.cholesky(K)

    def integrand(v, u):
        za = L[0, 0] * u
        zb = L[1, 0] * u + L[1, 1] * v
        return np.tanh(za) * np.tanh(zb) * math.exp(-(u * u + v * v) / 2) / (2 * math.pi)

    ref, err = dblquad(integrand, -12, 12, -12, 12, epsabs=1e-12, epsrel=1e-12)
    got = T.pair_expectation(K, np.tanh)[0, 1]
    assert got == pytest.approx(ref, abs=max(10 * err, 1e-10))


def test_singular_covariance_and_broadcasting():
    """|rho| = 1 (the same input twice) reduces to the 1-D integral; arrays of covariances broadcast."""
    Kaa = np.array([0.5, 1.0, 2.0])
    same = T.gauss_2d(lambda a, b: np.tanh(a) * np.tanh(b), Kaa, Kaa, Kaa)
    assert np.allclose(same, T.gauss_1d(lambda z: np.tanh(z) ** 2, Kaa), rtol=1e-9)
    opposite = T.gauss_2d(lambda a, b: np.tanh(a) * np.tanh(b), Kaa, -Kaa, Kaa)
    assert np.allclose(opposite, -same, rtol=1e-9)


# -- kernel and NTK recursions ----------------------------------------------------------------------------------
def inputs():
    return np.array([[1.0, 0.5, -0.3, 0.2], [0.4, -1.2, 0.8, 0.1], [0.9, 0.4, -0.2, 0.3]])


@pytest.mark.parametrize("C_b,C_W", [(0.0, 2.0), (0.1, 1.7)])
def test_relu_kernel_and_ntk_match_closed_form_iteration(C_b, C_W):
    X = inputs()
    depth = 8
    K, H = T.ntk_recursion(X, "relu", depth, C_b, C_W, lambda_b=0.3, lambda_W=np.linspace(0.5, 1.5, depth))
    lW = np.linspace(0.5, 1.5, depth)
    K_ref = C_b + C_W * X @ X.T / X.shape[1]
    H_ref = 0.3 + lW[0] * X @ X.T / X.shape[1]
    for layer in range(1, depth):
        ss, dd = T.relu_expectations(K_ref)
        K_ref, H_ref = C_b + C_W * ss, 0.3 + lW[layer] * ss + C_W * dd * H_ref
    assert np.allclose(K[-1], K_ref, rtol=1e-11)
    assert np.allclose(H[-1], H_ref, rtol=1e-11)


def test_erf_kernel_matches_closed_form_iteration():
    X = inputs()
    K = T.kernel_recursion(X, "erf", 6, 0.05, 1.3)
    K_ref = 0.05 + 1.3 * X @ X.T / X.shape[1]
    for _ in range(5):
        K_ref = 0.05 + 1.3 * T.erf_expectations(K_ref)[0]
    assert np.allclose(K[-1], K_ref, rtol=1e-9)


def test_linear_kernel_is_affine():
    X = inputs()
    K = T.kernel_recursion(X, "linear", 5, 0.2, 0.9)
    K1 = 0.2 + 0.9 * X @ X.T / X.shape[1]
    expected = 0.9**4 * K1 + 0.2 * sum(0.9**k for k in range(4))
    assert np.allclose(K[-1], expected, rtol=1e-12)


def test_kernel_from_K1_and_callable_activation():
    """A callable with a finite-difference derivative reproduces the named activation."""
    K1 = kernel_2x2(1.0, 0.3, 2.0)
    named = T.kernel_recursion(None, "tanh", 4, 0.0, 1.5, K1=K1)
    custom = T.kernel_recursion(None, lambda z: np.tanh(z), 4, 0.0, 1.5, K1=K1)
    assert np.allclose(named, custom, rtol=1e-14)
    X = inputs()[:2]
    _, H_named = T.ntk_recursion(X, "tanh", 4, 0.0, 1.5)
    _, H_custom = T.ntk_recursion(X, lambda z: np.tanh(z), 4, 0.0, 1.5)
    # Central differences with h ~ 6e-6: truncation h^2 * sigma''' / 6 ~ 1e-11, rounding eps / h ~ 4e-11.
    assert np.allclose(H_named, H_custom, rtol=1e-9)


# -- criticality ------------------------------------------------------------------------------------------------
CLOSED_FORMS = {
    "relu": (0.0, 2.0, "scale-invariant"),
    "linear": (0.0, 1.0, "scale-invariant"),
    "tanh": (0.0, 1.0, "K*=0"),
    "erf": (0.0, math.pi / 4, "K*=0"),
    "sin": (0.0, 1.0, "K*=0"),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_critical_point_matches_closed_form(name):
    C_b, C_W, cls = CLOSED_FORMS[name]
    point = T.critical_point(name)
    assert point.universality_class == cls
    assert point.C_b == pytest.approx(C_b, abs=1e-6)
    assert point.C_W == pytest.approx(C_W, abs=1e-6)


@pytest.mark.parametrize("slope", [0.0, 0.1, 0.5])
def test_leaky_relu_critical_point(slope):
    """Scale-invariant class, C_W = 1 / A_2 with A_2 = (1 + slope^2) / 2, found from a plain callable."""
    point = T.critical_point(lambda z: np.where(z > 0, z, slope * z))
    assert point.universality_class == "scale-invariant"
    assert point.C_W == pytest.approx(2 / (1 + slope**2), abs=1e-6)


def test_k0_class_coefficients_and_power_law():
    """tanh: a_1 = -2 and p_perp = 1 (Taylor coefficients 1, 0, -2); K^(l) l -> 1/2."""
    point = T.critical_point("tanh")
    assert point.a1 == pytest.approx(-2, abs=1e-8)  # Richardson-extrapolated differences: ~1e-10
    assert point.p_perp == pytest.approx(1, abs=1e-8)
    K = T.kernel_recursion(np.ones((1, 4)), "tanh", 2000, point.C_b, point.C_W)[:, 0, 0]
    layers = np.arange(1, 2001)
    # K l = 1/2 + O(log l / l): the relative deviation at l = 2000 is below 1%, and shrinks with depth.
    ratio = K * layers / (1 / 2)
    assert abs(ratio[-1] - 1) < 0.01 and abs(ratio[-1] - 1) < abs(ratio[199] - 1) < abs(ratio[19] - 1)
    assert np.allclose(point.kernel_asymptote([1, 2]), [0.5, 0.25], rtol=1e-5)


def _exact_gelu():
    from scipy.special import erf

    def cdf(z):
        return 0.5 * (1 + erf(z / math.sqrt(2)))

    return (lambda z: z * cdf(z), lambda z: cdf(z) + z * np.exp(-z**2 / 2) / math.sqrt(2 * math.pi))


def _swish():
    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    return (lambda z: z * sigmoid(z), lambda z: sigmoid(z) * (1 + z * (1 - sigmoid(z))))


@pytest.mark.parametrize("name,activation,K_star,C_b,C_W", [
    ("gelu", _exact_gelu(), None, 0.172922, 1.983058),
    ("swish", _swish(), 14.320174, 0.555143, 1.988005),
])
def test_half_stable_critical_points_match_the_book(name, activation, K_star, C_b, C_W):
    """The K*>0 class against independent values: the book's (ch. 5) critical initialisations of the exact GELU
    z Phi(z) and of SWISH z sigmoid(z), given to 6 decimals (so |error| <= 5e-7 from rounding; 1e-6 allows the
    root finder's ~1e-9 on top)."""
    point = T.critical_point(activation, K_max=50.0)
    assert point.universality_class == "K*>0"
    assert point.C_b == pytest.approx(C_b, abs=1e-6) and point.C_W == pytest.approx(C_W, abs=1e-6)
    if K_star is not None:
        assert point.K_star == pytest.approx(K_star, abs=1e-6)


def test_critical_point_susceptibilities_are_one():
    """At every critical point found, chi_parallel = chi_perp = 1 (K*>0: GELU; K*=0: as K -> 0; ReLU: any K)."""
    gelu = T.critical_point("gelu")
    assert gelu.universality_class == "K*>0" and gelu.C_b > 0
    K_star = gelu.K_star
    # physai's tanh-approximate GELU sits close to, not on, the exact one's critical point.
    assert K_star == pytest.approx(3.5568, abs=1e-4) and gelu.C_W == pytest.approx(1.98289, abs=1e-5)
    par, perp = T.susceptibilities(K_star, "gelu", gelu.C_W)
    assert par == pytest.approx(1, abs=1e-9) and perp == pytest.approx(1, abs=1e-12)
    next_K = T.kernel_recursion(None, "gelu", 2, gelu.C_b, gelu.C_W, K1=K_star)[1, 0, 0]
    assert next_K == pytest.approx(K_star, rel=1e-12)
    par, perp = T.susceptibilities(np.array([0.3, 3.0]), "relu", 2.0)
    assert np.allclose(par, 1, atol=1e-13) and np.allclose(perp, 1, atol=1e-13)


def test_softplus_has_no_critical_point():
    with pytest.raises(ValueError, match="activation: softplus"):
        T.critical_point("softplus")


def test_fixed_points_and_stability():
    # ReLU off criticality: K* = C_b / (1 - C_W/2), chi_parallel = chi_perp = C_W / 2.
    (point,) = T.fixed_points("relu", 0.1, 1.5)
    assert point.K == pytest.approx(0.1 / (1 - 0.75), rel=1e-12)
    assert point.chi_parallel == pytest.approx(0.75, rel=1e-12) and point.stable and point.stability == "stable"
    # tanh with C_W > 1: K = 0 is unstable (chi = C_W) and a stable nonzero fixed point appears; its defining
    # equation holds and the recursion started nearby converges to it.
    zero, nonzero = T.fixed_points("tanh", 0.0, 1.5)
    assert zero.K == 0 and zero.chi_parallel == pytest.approx(1.5) and not zero.stable
    assert nonzero.stable and nonzero.chi_perp > 1  # the chaotic phase
    assert 1.5 * T.gauss_1d(lambda z: np.tanh(z) ** 2, nonzero.K) == pytest.approx(nonzero.K, rel=1e-12)
    K = T.kernel_recursion(None, "tanh", 200, 0.0, 1.5, K1=1.0)[-1, 0, 0]
    assert K == pytest.approx(nonzero.K, rel=1e-9)
    with pytest.raises(ValueError, match="every K"):
        T.fixed_points("relu", 0.0, 2.0)


@pytest.mark.parametrize("slope,C_W", [(0.0, 3.0), (0.0, 1.5), (0.3, 3.0), (0.3, 1.2)])
def test_zero_fixed_point_of_scale_invariant_activations(slope, C_W):
    """C_b = 0, C_W != 1/A_2: K = 0 is the only fixed point and chi_parallel = chi_perp = C_W A_2 there (the
    limit K -> 0+, here the value at every K), A_2 = (1 + slope^2)/2: not C_W sigma'(0)^2, which is 0 for ReLU."""
    activation = "relu" if slope == 0 else (lambda z: np.where(z > 0, z, slope * z))
    (point,) = T.fixed_points(activation, 0.0, C_W)
    chi = C_W * (1 + slope**2) / 2
    assert point.K == 0
    assert point.chi_parallel == pytest.approx(chi, rel=1e-9) and point.chi_perp == pytest.approx(chi, rel=1e-9)
    assert point.stability == ("unstable" if chi > 1 else "stable")
    assert T.susceptibilities(0.37, activation, C_W)[0] == pytest.approx(chi, rel=1e-9)


def test_marginal_fixed_point():
    """tanh and sin at criticality: K = 0 has chi_parallel = 1 (the linear order decides nothing; the kernel
    still flows in, as 1/((-a_1) l))."""
    for name in ("tanh", "sin"):
        (zero,) = T.fixed_points(name, 0.0, 1.0)
        assert zero.K == 0 and zero.chi_parallel == pytest.approx(1, abs=1e-9)
        assert zero.stability == "marginal" and not zero.stable


def test_ntk_depth_scaling_at_criticality():
    """ReLU: H^(l) = l (lambda_b + lambda_W K1 / C_W) exactly. tanh: the slope tends to lambda_b / (1 + p_perp)."""
    X = np.array([[1.0, -2.0, 0.5]])
    relu = T.critical_point("relu")
    K, H = T.ntk_recursion(X, "relu", 30, relu.C_b, relu.C_W, lambda_b=0.4, lambda_W=1.3)
    slope = relu.ntk_slope(0.4, 1.3, K[0, 0, 0])
    assert np.allclose(H[:, 0, 0], slope * np.arange(1, 31), rtol=1e-12)
    tanh = T.critical_point("tanh")
    _, H = T.ntk_recursion(X, "tanh", 2000, tanh.C_b, tanh.C_W, lambda_b=0.4, lambda_W=1.3)
    measured = (H[1999, 0, 0] - H[999, 0, 0]) / 1000
    # The approach is O(1/l) in H / l, so O(1/l^2) in the slope measured between l = 1000 and 2000.
    assert measured == pytest.approx(tanh.ntk_slope(0.4, 1.3), rel=1e-3)


# -- finite width -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,coefficient", [("linear", 2), ("relu", 5)])
def test_four_point_vertex_of_scale_invariant_networks(name, coefficient):
    """V^(l) / K^2 = (l - 1)(3 A_4 / A_2^2 - 1): 2 (l - 1) for linear, 5 (l - 1) for ReLU; no mean shift."""
    C_W = T.critical_point(name).C_W
    fw = T.finite_width(0.7, name, 12, 0.0, C_W)
    layers = np.arange(1, 13)
    assert np.allclose(fw.V / fw.K**2, coefficient * (layers - 1), rtol=1e-12, atol=1e-12)
    assert np.allclose(fw.G1, 0, atol=1e-12)
    # The leading order is the first term of the exact finite-width forms' expansion in 1/n.
    for n in (1e4, 1e5):
        exact = T.exact_normalized_variance(name, 12, int(n))
        assert np.allclose(fw.normalized_variance(n), exact, rtol=50 * 12 / n)
    assert np.allclose(fw.metric_variance(1e5), T.exact_metric_variance(name, 12, 100_000), rtol=5e-3, atol=1e-15)


def test_book_linear_network_variance():
    """The book's (3.33): Var[O^(l)] = (2 l / n) G2^2 to leading order for deep linear networks."""
    fw = T.finite_width(np.array([0.5, 2.0]), "linear", 7, 0.0, 1.0)
    assert np.allclose(fw.normalized_variance(64), (2 * np.arange(1, 8) / 64)[:, None], rtol=1e-12)


def test_tanh_four_point_vertex_grows_linearly_at_criticality():
    """K*=0 class at criticality: V / K^2 grows as (2/3) l, the book's slope for tanh (ch. 5: the normalised
    four-point vertex 2 l / (3 n)). The per-layer increment approaches 2/3 as 2/3 + c / l (c = -0.28 measured);
    Richardson extrapolation from l = 1000 and 2000 removes the c / l term, leaving O(1/l^2) ~ 1e-6."""
    fw = T.finite_width(1.0, "tanh", 2001, 0.0, 1.0)
    increment = np.diff(fw.V / fw.K**2)  # increment[l - 1] = ratio at l + 1 minus ratio at l
    assert 2 * increment[1999] - increment[999] == pytest.approx(2 / 3, abs=1e-5)
    assert abs(increment[1999] - 2 / 3) < abs(increment[999] - 2 / 3)


def test_numpy_paths_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np, physai.theory as T; T.sample_mlp(np.ones((1, 3)), 'tanh', 2, 4, 10); "
            "T.critical_point('tanh'); T.two_layer_ntk(np.ones((2, 3))); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- argument checks --------------------------------------------------------------------------------------------
def test_bad_arguments_name_themselves():
    X = inputs()
    with pytest.raises(ValueError, match="activation"):
        T.kernel_recursion(X, "swish")
    with pytest.raises(TypeError, match="activation"):
        T.kernel_recursion(X, 3)
    with pytest.raises(ValueError, match="depth"):
        T.kernel_recursion(X, "relu", 0)
    with pytest.raises(ValueError, match="C_W"):
        T.kernel_recursion(X, "relu", 3, 0.0, 0.0)
    with pytest.raises(ValueError, match="C_b"):
        T.kernel_recursion(X, "relu", 3, -1.0, 1.0)
    with pytest.raises(ValueError, match="K1"):
        T.kernel_recursion(None, "relu", 3, K1=np.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="X"):
        T.kernel_recursion(np.array([["a"]]), "relu")
    with pytest.raises(ValueError, match="X"):
        T.kernel_recursion(np.array([[np.nan, 1.0]]), "relu")
    with pytest.raises(ValueError, match="lambda_W"):
        T.ntk_recursion(X, "relu", 3, lambda_W=[1.0, 2.0])
    with pytest.raises(ValueError, match="order"):
        T.gauss_1d(np.tanh, 1.0, order=0)
    with pytest.raises(ValueError, match="K"):
        T.susceptibilities(0.0, "tanh")
    with pytest.raises(ValueError, match="K1"):
        T.finite_width(-1.0, "tanh", 3)
    with pytest.raises(ValueError, match="activation"):
        T.exact_normalized_variance("tanh", 3, 10)
    with pytest.raises(ValueError, match="width"):
        T.finite_width(1.0, "tanh", 3).normalized_variance(0)


@given(st.one_of(st.sampled_from([-1.0, 1.0, 0.0]), st.floats(-1.0, 1.0)), st.floats(1e-4, 1e4),
       st.floats(1e-4, 1e4))
def test_relu_quadrature_exact_over_the_whole_range(rho, Kaa, Kbb):
    """The 2-D rule against the arc-cosine kernels at the boundaries (rho = +-1, a singular covariance) and over
    eight decades of scale."""
    K = kernel_2x2(Kaa, rho, Kbb)
    act = T.get_activation("relu")
    ss, dd = T.relu_expectations(K)
    # At |rho| = 1 the angle t = arccos(rho) has infinite slope: a rounding error eps in K moves the degree-0
    # kernel (pi - t)/(2 pi) by ~sqrt(2 eps)/(2 pi) ~ 3e-9 (and the degree-1 one by eps^(3/2)), whichever way is
    # computed.
    assert np.allclose(T.pair_expectation(K, act.fn), ss, rtol=1e-12, atol=1e-12 * math.sqrt(Kaa * Kbb))
    assert np.allclose(T.pair_expectation(K, act.derivative), dd, rtol=1e-12, atol=1e-8)
