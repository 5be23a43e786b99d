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

from physai._checks import check_array
from physai.twolayer.reference import activation


def _features(net, X):
    """sigma(Z), sigma'(Z) [E, n, m] and X broadcast [E, n, d] of each member, in float64."""
    p = net.reference_params()
    X = np.broadcast_to(np.asarray(X, np.float64), (net.ensemble, *X.shape[-2:]))
    Z = p.input_scale * X @ p.W.astype(np.float64).transpose(0, 2, 1)
    if p.b is not None:
        Z = Z + p.b.astype(np.float64)[:, None, :]
    S, D, _ = activation(p.activation, Z)
    return S, D, X


def _check_inputs(net, X, name):
    X = check_array(X, name, dtype=net.dtype, contiguous=False)
    if X.ndim not in (2, 3) or X.shape[-1] != net.d or X.ndim == 3 and X.shape[0] != net.ensemble:
        raise ValueError(f"{name}: expected shape (n, {net.d}) or ({net.ensemble}, n, {net.d}), got {X.shape}")
    return X


def empirical_ntk(net, X: np.ndarray, X2: np.ndarray | None = None) -> np.ndarray:
    """Theta = J(X) J(X2)^T of each member of ``net`` (a ``physai.twolayer.TwoLayer``): [E, n k, n2 k] in the
    model's dtype (computed in float64). X [n, d] (shared) or [E, n, d] of the model's dtype; X2 likewise
    (default X). Raises TypeError/ValueError naming a bad argument."""
    X = _check_inputs(net, X, "X")
    X2 = X if X2 is None else _check_inputs(net, X2, "X2")
    s = net.scaling
    S, D, Xb = _features(net, X)
    S2, D2, Xb2 = _features(net, X2)
    a = net.a.astype(np.float64)
    G = s.input_scale**2 * Xb @ Xb2.transpose(0, 2, 1) + (1.0 if net.b is not None else 0.0)  # [E, n, n2]
    E, n, n2, k, m = net.ensemble, S.shape[1], S2.shape[1], net.k, net.m
    A = (D[:, :, None, :] * a[:, None, :, :]).reshape(E, n * k, m)     # rows (i, c): a_cr sigma'(z_ir)
    A2 = (D2[:, :, None, :] * a[:, None, :, :]).reshape(E, n2 * k, m)
    theta = (A @ A2.transpose(0, 2, 1)).reshape(E, n, k, n2, k) * G[:, :, None, :, None]  # one GEMM per member
    readout = S @ S2.transpose(0, 2, 1)
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
        n = self.X.shape[1]
        self.shape = (net.ensemble, n * net.k, n * net.k)
        self.dtype = net.dtype

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """V [E, n k] -> Theta V, [E, n k] in the model's dtype."""
        s, net = self.net.scaling, self.net
        V = check_array(np.asarray(V), "V", shape=self.shape[:2], contiguous=False)
        V = V.astype(np.float64).reshape(net.ensemble, -1, net.k)
        da = s.output_scale * V.transpose(0, 2, 1) @ self.S                   # [E, k, m]
        dZ = s.output_scale * (V @ self.a) * self.D                            # [E, n, m]
        dW = s.input_scale * dZ.transpose(0, 2, 1) @ self.X                    # [E, m, d]
        dH = s.input_scale * self.X @ dW.transpose(0, 2, 1)                    # [E, n, m]
        if net.b is not None:
            dH = dH + dZ.sum(1)[:, None, :]
        out = s.output_scale * ((self.D * dH) @ self.a.transpose(0, 2, 1) + self.S @ da.transpose(0, 2, 1))
        return out.reshape(net.ensemble, -1).astype(self.dtype)
