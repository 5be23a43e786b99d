"""Pure numpy twins of the native eigensolvers in csrc/spectrum/eigensolvers.hpp (same algorithms, same
starting vectors, same convergence tests), used to check the native code and as a fallback."""
from __future__ import annotations

import numpy as np

from physai._rng import CounterStream

DOMAIN_START = 0x5EC0
DOMAIN_BREAKDOWN = 0x5EC1


def random_vector(stream: CounterStream, n: int) -> np.ndarray:
    """Uniform in [-1, 1) from a counter stream, float64 [n] (the native starting vector)."""
    return np.array([2.0 * stream.uniform_double() - 1.0 for _ in range(n)])


def start_vectors(seed: int, batch: int, n: int) -> np.ndarray:
    """The native solvers' random starting vectors, float64 [batch, n] (unnormalized)."""
    return np.stack([random_vector(CounterStream(seed, b, DOMAIN_START), n) for b in range(batch)])


def unit_start_vectors(seed: int, batch: int, n: int, v0=None) -> np.ndarray:
    """The solvers' unit starting vectors [batch, n]: v0's rows, or random ones, scaled by their largest entry and
    then by their norm (as natively: no overflow or underflow at any scale)."""
    x = start_vectors(seed, batch, n) if v0 is None else np.array(v0, dtype=np.float64)
    x /= np.abs(x).max(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fix_sign(v: np.ndarray) -> np.ndarray:
    """Sign convention of returned eigenvectors: the largest-magnitude entry (first on ties) is positive."""
    return -v if v[np.argmax(np.abs(v))] < 0 else v


def wanted_order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of ``theta`` from most to least wanted ("LA": largest algebraic, "LM": largest magnitude)."""
    if which == "LA":
        return np.array(sorted(range(len(theta)), key=lambda i: -theta[i]))
    return np.array(sorted(range(len(theta)), key=lambda i: (-abs(theta[i]), -theta[i])))


def power_iteration(matvec, batch: int, n: int, *, tol: float, max_matvecs: int, seed: int = 0, v0=None):
    """Power iteration for the dominant eigenpair of each member.

    ``matvec`` maps float64 [batch, n] to [batch, n]. Returns ``(values [batch, 1], vectors [batch, 1, n],
    matvecs [batch] int64, converged [batch] bool)``.
    """
    x = unit_start_vectors(seed, batch, n, v0)
    values, vectors = np.zeros((batch, 1)), np.zeros((batch, 1, n))
    counts, converged, done = np.zeros(batch, np.int64), np.zeros(batch, bool), np.zeros(batch, bool)
    while not done.all():
        y = matvec(np.where(done[:, None], 0.0, x))
        for b in np.flatnonzero(~done):
            counts[b] += 1
            theta = x[b] @ y[b]
            ok = np.linalg.norm(y[b] - theta * x[b]) <= tol * abs(theta) or not y[b].any()
            if ok or counts[b] >= max_matvecs:
                values[b, 0], vectors[b, 0], converged[b], done[b] = theta, fix_sign(x[b]), ok, True
            else:
                x[b] = y[b] / np.linalg.norm(y[b])
    return values, vectors, counts, converged


def _orthogonalize(w: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    coef = np.zeros(len(basis))
    for _ in range(2):
        c = basis @ w
        w = w - c @ basis
        coef += c
    return w, coef


def lanczos(matvec, batch: int, n: int, *, k: int, which: str, tol: float, max_matvecs: int, ncv: int = 0,
            seed: int = 0, v0=None):
    """Thick-restart Lanczos with full reorthogonalization, the twin of the native ``lanczos``.

    ``matvec`` maps float64 [batch, n] to [batch, n]. Returns ``(values [batch, k], vectors [batch, k, n],
    matvecs [batch] int64, converged [batch] bool)``, eigenpairs from most to least wanted.
    """
    m = ncv if ncv > 0 else min(n, max(2 * k + 1, 20))
    x = unit_start_vectors(seed, batch, n, v0)
    bases = [np.zeros((m + 1, n)) for _ in range(batch)]
    for b in range(batch):
        bases[b][0] = x[b]
    H = [np.zeros((m, m)) for _ in range(batch)]
    j = np.zeros(batch, int)
    breakdown = [CounterStream(seed, b, DOMAIN_BREAKDOWN) for b in range(batch)]
    exhausted = np.zeros(batch, bool)  # invariant before the basis filled: converge only on a full basis
    values, vectors = np.zeros((batch, k)), np.zeros((batch, k, n))
    counts, converged, done = np.zeros(batch, np.int64), np.zeros(batch, bool), np.zeros(batch, bool)
    while not done.all():
        X = np.stack([np.zeros(n) if done[b] else bases[b][j[b]] for b in range(batch)])
        Y = matvec(X)
        for b in np.flatnonzero(~done):
            counts[b] += 1
            V, jb = bases[b], j[b]
            w, coef = _orthogonalize(Y[b].astype(np.float64), V[: jb + 1])
            H[b][: jb + 1, jb] = H[b][jb, : jb + 1] = coef
            beta = np.linalg.norm(w)
            rows = jb + 1
            theta, S = np.linalg.eigh(H[b][:rows, :rows])
            order = wanted_order(theta, which)
            scale = np.abs(theta).max()
            invariant = beta <= 1e-12 * max(scale, 1e-300) or rows == n
            if invariant:
                beta = 0.0
                exhausted[b] |= rows < n
            top = abs(theta[order[0]])  # residuals relative to max(|theta_i|, |theta_1|), as natively
            ok = rows >= k and (not exhausted[b] or rows == m) and all(
                beta * abs(S[jb, i]) <= tol * max(abs(theta[i]), top) or beta * abs(S[jb, i]) == 0.0
                for i in order[:k])
            if ok or counts[b] >= max_matvecs:
                for i in range(k):
                    values[b, i] = theta[order[i]]
                    vectors[b, i] = fix_sign(S[:, order[i]] @ V[:rows])
                converged[b], done[b] = ok, True
                continue
            if invariant:
                nw = 0.0
                while not nw > 1e-3:
                    w, _ = _orthogonalize(random_vector(breakdown[b], n), V[:rows])
                    nw = np.linalg.norm(w)
                beta = nw
            V[jb + 1] = w / beta
            j[b] = jb + 1
            if j[b] < m:
                continue
            p = min(m - 1, max(k, k + (m - k) // 2))
            ritz = S[:, order[:p]].T @ V[:m]
            V[p] = V[m]
            V[:p] = ritz
            H[b][:] = 0.0
            H[b][np.arange(p), np.arange(p)] = theta[order[:p]]
            j[b] = p
            exhausted[b] = False
    return values, vectors, counts, converged
