"""Analytic empirical NTK of two-layer networks, per ensemble member, in numpy (BLAS GEMMs; no Jacobian formed).

For f_c(x) = s_out sum_r a_cr sigma(z_r(x)), z = s_in W x + b, the parameter derivatives are
d f_c / d a_c'r = s_out delta_cc' sigma(z_r), d f_c / d W_r = s_out a_cr sigma'(z_r) s_in x and
d f_c / d b_r = s_out a_cr sigma'(z_r), so the empirical NTK (Jacot et al. 2018) is

    Theta[(i, c), (j, c')] = s_out^2 [ delta_cc' sum_r sigma(z_ir) sigma(z_jr)
                                       + (s_in^2 x_i . x_j + [bias]) sum_r a_cr a_c'r sigma'(z_ir) sigma'(z_jr) ],

rows ordered sample-major (i k + c), as ``physai.spectrum.ntk`` orders them for any torch model. Its matvec
Theta v = J (J^T v) is one backward and one forward-mode pass, O(n m (d + k)) per member.
The infinite-width limits of this kernel are in ``physai.theory``.
"""
from __future__ import annotations

import numpy as np

from physai._checks import as_array, check_array
from physai.twolayer.reference import activation


def _features(net, X):
    """sigma(Z), sigma'(Z) [E, m, n] of each member in float64 (feature-major: every product below is then a
    plain or transposed-left GEMM, which numpy hands to BLAS; the sample-major transposes took its slow loop),
    and X in float64 ([n, d] shared or [E, n, d])."""
    p = net.reference_params()
    X = np.ascontiguousarray(X, np.float64)
    Z = p.input_scale * (p.W.astype(np.float64) @ np.swapaxes(X, -1, -2))      # [E, m, n]
    if p.b is not None:
        Z += p.b.astype(np.float64)[:, :, None]
    S, D, _ = activation(p.activation, Z)
    return S, D, X


def _weighted_derivatives(D, a):
    """[E, m, n k]: column (i, c) holds a_cr sigma'(z_ir), the hidden part of d f_c(x_i) / d z_r."""
    E, m, n = D.shape
    return (D[:, :, :, None] * np.swapaxes(a, 1, 2)[:, :, None, :]).reshape(E, m, n * a.shape[1])


def _check_inputs(net, X, name):
    X = as_array(X, name, np.float64)  # the kernel is computed in float64 whatever the inputs' real dtype
    if X.ndim not in (2, 3) or X.shape[-1] != net.d or X.ndim == 3 and X.shape[0] != net.ensemble:
        raise ValueError(f"{name}: expected shape (n, {net.d}) or ({net.ensemble}, n, {net.d}), got {X.shape}")
    return X


def empirical_ntk(net, X: np.ndarray, X2: np.ndarray | None = None) -> np.ndarray:
    """Theta = J(X) J(X2)^T of each member of ``net`` (a ``physai.twolayer.TwoLayer``): [E, n k, n2 k] in the
    model's dtype (computed in float64). X [n, d] (shared) or [E, n, d] of any real dtype (converted to float64,
    a copy); X2 likewise (default X). Raises TypeError (complex or non-numeric) / ValueError (shape) naming the
    argument."""
    s = net.scaling
    a = net.a.astype(np.float64)
    S, D, Xb = _features(net, _check_inputs(net, X, "X"))
    A = _weighted_derivatives(D, a)
    if X2 is None:
        S2, Xb2, A2 = S, Xb, A
    else:
        S2, D2, Xb2 = _features(net, _check_inputs(net, X2, "X2"))
        A2 = _weighted_derivatives(D2, a)
    G = s.input_scale**2 * Xb @ np.swapaxes(Xb2, -1, -2) + (1.0 if net.b is not None else 0.0)  # [(E,) n, n2]
    E, n, n2, k = net.ensemble, S.shape[2], S2.shape[2], net.k
    theta = (np.swapaxes(A, 1, 2) @ A2).reshape(E, n, k, n2, k)          # one GEMM per member
    theta *= np.broadcast_to(G, (E, n, n2))[:, :, None, :, None]
    readout = np.swapaxes(S, 1, 2) @ S2                                  # [E, n, n2]
    for c in range(k):
        theta[:, :, c, :, c] += readout
    return (s.output_scale**2 * theta).reshape(E, n * k, n2 * k).astype(net.dtype)


class NTKOperator:
    """Each member's empirical NTK on X as an operator, never formed: ``shape`` (E, n k, n k), ``dtype`` the
    model's, ``matvec(V [E, n k]) -> [E, n k]`` = J (J^T v) (a backward then a forward-mode pass, see the module
    docstring). Holds the features of X at the current parameters (changing them afterwards is not seen)."""

    def __init__(self, net, X: np.ndarray):
        X = _check_inputs(net, X, "X")
        self.net = net
        self.S, self.D, self.X = _features(net, X)
        self.a = net.a.astype(np.float64)
        n = self.S.shape[2]
        self.shape = (net.ensemble, n * net.k, n * net.k)
        self.dtype = net.dtype

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """V [E, n k] -> Theta V, [E, n k] in the model's dtype."""
        s, net = self.net.scaling, self.net
        V = check_array(np.asarray(V), "V", shape=self.shape[:2], contiguous=False)
        V = V.astype(np.float64).reshape(net.ensemble, -1, net.k)            # [E, n, k]
        da = s.output_scale * self.S @ V                                       # [E, m, k]: J_a^T v
        dZ = s.output_scale * (self.a.transpose(0, 2, 1) @ V.transpose(0, 2, 1)) * self.D  # [E, m, n]
        dW = s.input_scale * dZ @ self.X                                       # [E, m, d]
        dH = s.input_scale * dW @ np.swapaxes(self.X, -1, -2)                  # [E, m, n]: J_W (J_W^T v)
        if net.b is not None:
            dH += dZ.sum(2)[:, :, None]
        out = s.output_scale * (np.swapaxes(self.D * dH, 1, 2) @ self.a.transpose(0, 2, 1)
                                + np.swapaxes(self.S, 1, 2) @ da)            # [E, n, k]
        return out.reshape(net.ensemble, -1).astype(self.dtype)
