"""numpy twin of csrc/twolayer/: forward, loss and gradient, Hessian-vector product, gradient-descent loop.

Written for clarity (whole batch at once, float64 arithmetic available), not speed. Shapes as in
``physai.twolayer.TwoLayer``: W [E,m,d], b [E,m] or None, a [E,k,m], X [n,d] or [E,n,d], Y [n,k] or [E,n,k].
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import math

_erf = np.vectorize(math.erf, otypes=[float])


def erf(z):
    return _erf(z).astype(z.dtype)


def expit(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def log_softmax(F, axis):
    shifted = F - F.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(F, axis):
    return np.exp(log_softmax(F, axis))

_C = np.sqrt(2 / np.pi)


def activation(name: str, z: np.ndarray):
    """sigma(z), sigma'(z), sigma''(z)."""
    if name == "relu":
        return np.maximum(z, 0), (z > 0).astype(z.dtype), np.zeros_like(z)
    if name == "tanh":
        t = np.tanh(z)
        return t, 1 - t**2, -2 * t * (1 - t**2)
    if name == "gelu":
        u = _C * (z + 0.044715 * z**3)
        du, ddu = _C * (1 + 3 * 0.044715 * z**2), _C * 6 * 0.044715 * z
        t = np.tanh(u)
        dt = (1 - t**2) * du
        ddt = -2 * t * dt * du + (1 - t**2) * ddu
        return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * dt, dt + 0.5 * z * ddt
    if name == "erf":
        g = 2 / np.sqrt(np.pi) * np.exp(-z**2)
        return erf(z), g, -2 * z * g
    if name == "quadratic":
        return z**2, 2 * z, np.full_like(z, 2)
    if name == "linear":
        return z, np.ones_like(z), np.zeros_like(z)
    if name == "softplus":
        return np.logaddexp(0, z), expit(z), expit(z) * expit(-z)
    raise ValueError(f"activation: unknown {name!r}")


class Params(NamedTuple):
    """One ensemble's parameters and kernel configuration (``TwoLayer.reference_params()`` builds it)."""

    W: np.ndarray
    b: np.ndarray | None
    a: np.ndarray
    input_scale: float
    output_scale: float
    activation: str


def _broadcast(X, E):
    return np.broadcast_to(X, (E, *X.shape)) if X.ndim == 2 else X


def forward(p: Params, X):
    """F [E, n, k]; also returns Z [E, n, m] (pre-activations)."""
    W, b, a, input_scale, output_scale, act = p
    X = _broadcast(X, W.shape[0])
    Z = input_scale * X @ W.transpose(0, 2, 1)
    if b is not None:
        Z = Z + b[:, None, :]
    S = activation(act, Z)[0]
    return output_scale * S @ a.transpose(0, 2, 1), Z


def loss_terms(loss: str, F, Y):
    """Per-member loss [E], dL/dF [E,n,k], and a function applying the per-sample output Hessian to R [E,n,k]."""
    n, k = F.shape[-2], F.shape[-1]
    Y = _broadcast(Y, F.shape[0])
    if n == 0:  # the mean over no samples is taken as 0, with zero derivatives, as the kernels do
        zero = np.zeros(F.shape[0], dtype=F.dtype)
        return zero, np.zeros_like(F), lambda R: np.zeros_like(R)
    if loss == "mse":
        scale = 1 / (n * k)
        return 0.5 * ((F - Y) ** 2).sum((1, 2)) * scale, (F - Y) * scale, lambda R: R * scale
    if loss == "logistic":
        scale = 1 / (n * k)
        margin = Y * F
        slope = expit(margin) * expit(-margin)
        return (np.logaddexp(0, -margin).sum((1, 2)) * scale, -Y * expit(-margin) * scale,
                lambda R: slope * Y**2 * R * scale)
    if loss == "cross_entropy":
        scale = 1 / n
        mass = Y.sum(-1, keepdims=True)
        P = softmax(F, axis=-1)
        value = -(Y * log_softmax(F, axis=-1)).sum((1, 2)) * scale
        return value, (mass * P - Y) * scale, lambda R: mass * P * (R - (P * R).sum(-1, keepdims=True)) * scale
    raise ValueError(f"loss: unknown {loss!r}")


def backward(p: Params, X, G):
    """Gradients of sum(F * G): dW, db (None without bias), da, dX [E, n, d]."""
    W, b, a, input_scale, output_scale, act = p
    Xb = _broadcast(X, W.shape[0])
    _, Z = forward(p, X)
    S, D1, _ = activation(act, Z)
    da = output_scale * G.transpose(0, 2, 1) @ S
    dZ = output_scale * (G @ a) * D1
    dW = input_scale * dZ.transpose(0, 2, 1) @ Xb
    db = dZ.sum(1) if b is not None else None
    dX = input_scale * dZ @ W
    return dW, db, da, dX


SLOPE_FROM_VALUE = ("relu", "tanh", "linear")  # sigma' is a function of sigma: forward_saving keeps no D1


def forward_saving(p: Params, X):
    """F [E, n, k] and what backward_saved needs: S = sigma(Z) and D1 = sigma'(Z) [E, n, m] (D1 None for the
    activations of SLOPE_FROM_VALUE)."""
    F, Z = forward(p, X)
    S, D1, _ = activation(p.activation, Z)
    return F, S, None if p.activation in SLOPE_FROM_VALUE else D1


def slope_of_value(name: str, S):
    """sigma' from sigma's value, for the activations of SLOPE_FROM_VALUE."""
    if name == "relu":
        return (S > 0).astype(S.dtype)
    if name == "tanh":
        return 1 - S**2
    return np.ones_like(S)


def backward_saved(p: Params, X, G, S, D1):
    """The gradients of ``backward`` (dW, db, da, dX) from forward_saving's S and D1, without recomputing Z."""
    W, b, a, input_scale, output_scale, act = p
    D1 = slope_of_value(act, S) if D1 is None else D1
    da = output_scale * G.transpose(0, 2, 1) @ S
    dZ = output_scale * (G @ a) * D1
    dW = input_scale * dZ.transpose(0, 2, 1) @ _broadcast(X, W.shape[0])
    return dW, dZ.sum(1) if b is not None else None, da, input_scale * dZ @ W


def loss_and_grad(p: Params, X, Y, loss):
    """Per-member loss [E] and gradients (dW, db, da)."""
    F, _ = forward(p, X)
    value, G, _ = loss_terms(loss, F, Y)
    dW, db, da, _ = backward(p, X, G)
    return value, (dW, db, da)


def hvp(p: Params, X, Y, direction, loss):
    """Hessian of each member's loss applied to ``direction = (vW, vb, va)``, by forward-mode differentiation of the
    gradient (Pearlmutter's R-operator). Returns (HvW, Hvb, Hva)."""
    W, b, a, input_scale, output_scale, act = p
    vW, vb, va = direction
    Xb = _broadcast(X, W.shape[0])
    F, Z = forward(p, X)
    S, D1, D2 = activation(act, Z)
    _, G, output_hessian = loss_terms(loss, F, Y)
    RZ = input_scale * Xb @ vW.transpose(0, 2, 1)
    if vb is not None:
        RZ = RZ + vb[:, None, :]
    RS = D1 * RZ
    RF = output_scale * (RS @ a.transpose(0, 2, 1) + S @ va.transpose(0, 2, 1))
    RG = output_hessian(RF)
    Rda = output_scale * (RG.transpose(0, 2, 1) @ S + G.transpose(0, 2, 1) @ RS)
    dS = output_scale * G @ a
    RdZ = output_scale * (RG @ a + G @ va) * D1 + dS * D2 * RZ
    RdW = input_scale * RdZ.transpose(0, 2, 1) @ Xb
    Rdb = RdZ.sum(1) if b is not None else None
    return RdW, Rdb, Rda


def train(p: Params, X, Y, loss, lr, lr_multipliers, steps, batch_size=0):
    """Gradient descent as the native loop runs it; returns (losses [steps, E], final Params), inputs untouched.
    ``lr`` [E] per member, ``lr_multipliers`` = (lr_W, lr_b, lr_a). Mini-batches are the cyclic contiguous row
    blocks [j*B, (j+1)*B) (the last one may be short); batch_size 0 is full batch."""
    W, b, a = p.W.copy(), None if p.b is None else p.b.copy(), p.a.copy()
    lr_W, lr_b, lr_a = lr_multipliers
    n = X.shape[-2]
    batch = min(batch_size, n) if batch_size > 0 else n
    blocks = -(-n // batch) if batch else 1
    lr = np.asarray(lr)
    losses = []
    for step in range(steps):
        rows = slice((step % blocks) * batch, min((step % blocks) * batch + batch, n))
        value, (dW, db, da) = loss_and_grad(p._replace(W=W, b=b, a=a), X[..., rows, :], Y[..., rows, :], loss)
        losses.append(value)
        W -= (lr * lr_W)[:, None, None] * dW
        if b is not None:
            b -= (lr * lr_b)[:, None] * db
        a -= (lr * lr_a)[:, None, None] * da
    return np.array(losses).reshape(steps, W.shape[0]), p._replace(W=W, b=b, a=a)


# ---- the shared-bias network of Ahn et al. (physai.twolayer.shared_bias; csrc/twolayer/shared_bias) -------------

def shared_bias_output(X, a_plus, a_minus, b):
    """f(x) = a+ sum_i ReLU(x_i + b) + a- sum_i ReLU(-x_i + b) by direct sums: X [E, n, d], parameters [E] -> [E, n]."""
    b = b[:, None, None]
    return (a_plus[:, None] * np.maximum(X + b, 0).sum(-1) + a_minus[:, None] * np.maximum(b - X, 0).sum(-1))


def shared_bias_evaluate(X, y, a_plus, a_minus, b):
    """Mean logistic loss [E], gradient [E, 3] and Hessian [E, 3, 3] in (a+, a-, b), by direct sums over the 2d
    units: X [E, n, d], y [E, n] in {-1, +1}, parameters [E] (float64). d2f/db2 = 0 (ReLU'' = 0 off the kinks)."""
    n = X.shape[1]
    bb = b[:, None, None]
    S_plus, S_minus = np.maximum(X + bb, 0).sum(-1), np.maximum(bb - X, 0).sum(-1)
    N_plus, N_minus = (X + bb > 0).sum(-1).astype(float), (bb - X > 0).sum(-1).astype(float)
    margin = y * (a_plus[:, None] * S_plus + a_minus[:, None] * S_minus)
    loss = np.logaddexp(0, -margin).mean(1)
    slope = -y * expit(-margin)  # dl/df
    curvature = expit(margin) * expit(-margin)
    J = np.stack([S_plus, S_minus, a_plus[:, None] * N_plus + a_minus[:, None] * N_minus], -1)  # [E, n, 3]
    gradient = (slope[..., None] * J).mean(1)
    hessian = np.einsum("en,eni,enj->eij", curvature, J, J) / n
    cross = np.stack([(slope * N_plus).mean(1), (slope * N_minus).mean(1)], -1)  # d2f / da+- db = N+-
    hessian[:, :2, 2] += cross
    hessian[:, 2, :2] += cross
    return loss, gradient, hessian


def shared_bias_train(X, y, a_plus, a_minus, b, lr, steps, record_steps):
    """Gradient descent as the native loop runs it, on X [E, n, d], y [E, n] (each member's own data): member e
    takes steps[e] steps of size lr[e]; returns the final (a+, a-, b) [E] each and the records (loss [K, E],
    params [K, E, 3], hessian [K, E, 3, 3]) taken before step record_steps[r, e] (steps[e]: after the last)."""
    a_plus, a_minus, b = a_plus.copy(), a_minus.copy(), b.copy()
    K, E = record_steps.shape
    loss, params, hessian = np.full((K, E), np.nan), np.full((K, E, 3), np.nan), np.full((K, E, 3, 3), np.nan)
    for t in range(int(steps.max(initial=0)) + 1):
        value, gradient, H = shared_bias_evaluate(X, y, a_plus, a_minus, b)
        due = record_steps == t
        r, e = np.nonzero(due)
        loss[r, e], hessian[r, e] = value[e], H[e]
        params[r, e] = np.stack([a_plus, a_minus, b], -1)[e]
        live = t < steps
        a_plus -= np.where(live, lr * gradient[:, 0], 0)
        a_minus -= np.where(live, lr * gradient[:, 1], 0)
        b -= np.where(live, lr * gradient[:, 2], 0)
    return (a_plus, a_minus, b), (loss, params, hessian)
