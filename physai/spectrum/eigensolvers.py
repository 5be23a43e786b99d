"""Batched top-k eigensolvers (Lanczos, power iteration) for symmetric operators given by a matvec.

An operator is any object with ``shape`` ``(batch, n, n)`` (or ``(n, n)`` for batch 1), a ``dtype``
(float32 or float64) and ``matvec(V)`` mapping a [batch, n] array of that dtype to a [batch, n] array: row b
is member b's operator applied to V[b]. Each member gets its own spectrum. The solvers run natively
(csrc/spectrum/) with the GIL released; it is re-acquired only to call ``matvec``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from physai import _native
from physai._checks import MAX_INT64, check_choice, check_dtype, check_float, check_int, check_seed, check_v0


@dataclass
class EigenResult:
    """Eigenpairs of each batch member, most wanted first.

    values: [batch, k] (operator dtype); vectors: [batch, k, n] unit-norm, sign fixed so the largest-magnitude
    entry is positive; matvecs: [batch] int64, matvecs spent on each member; converged: [batch] bool.
    """

    values: np.ndarray
    vectors: np.ndarray
    matvecs: np.ndarray
    converged: np.ndarray


class DenseOperator:
    """A stack of dense symmetric matrices ``A`` [batch, n, n] (or one [n, n]), float32 or float64, as an
    operator of that dtype."""

    def __init__(self, A):
        A = np.asarray(A)
        if A.ndim == 2:
            A = A[None]
        if A.ndim != 3 or A.shape[1] != A.shape[2]:
            raise ValueError(f"A: expected shape (n, n) or (batch, n, n), got {A.shape}")
        self.dtype = check_dtype(A.dtype, "A")
        if not np.isfinite(A).all():
            raise ValueError("A: expected finite values")
        # relative to each matrix's largest entry: tiny mirrored entries may differ by rounding
        asymmetry = np.abs(A - A.transpose(0, 2, 1)).max(axis=(1, 2))
        if np.any(asymmetry > (1e-5 if self.dtype == np.float32 else 1e-12) * np.abs(A).max(axis=(1, 2))):
            raise ValueError("A: expected symmetric matrices (the solvers assume a symmetric operator)")
        self.A = np.ascontiguousarray(A)
        self.shape = A.shape

    def matvec(self, V: np.ndarray) -> np.ndarray:
        """[batch, n] -> [batch, n]."""
        return np.einsum("bij,bj->bi", self.A, V)


def _operator_dims(op) -> tuple[int, int, np.dtype]:
    if isinstance(op, np.ndarray):
        raise TypeError("op: expected an operator (shape, dtype, matvec); wrap arrays in DenseOperator")
    for attribute in ("shape", "dtype", "matvec"):
        if not hasattr(op, attribute):
            raise TypeError(f"op: expected an object with shape, dtype and matvec, {type(op).__name__} has no "
                            f"{attribute!r}")
    try:
        shape = tuple(op.shape)
    except TypeError:
        raise TypeError(f"op.shape: expected a tuple (n, n) or (batch, n, n), got {op.shape!r}") from None
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"op.shape: expected (n, n) or (batch, n, n), got {tuple(op.shape)}")
    batch = check_int(shape[0], "op.shape[0]", min=1)
    n = check_int(shape[1], "op.shape[1]", min=1)
    return batch, n, check_dtype(op.dtype, "op.dtype")


def _callback(op, batch: int, n: int, dtype: np.dtype):
    def matvec(V):
        out = np.asarray(op.matvec(V))
        if out.dtype.kind not in "iuf":
            raise TypeError(f"op.matvec: expected real values, got dtype {out.dtype}")
        if out.shape != (batch, n):
            raise ValueError(f"op.matvec: expected a result of shape ({batch}, {n}), got {out.shape}")
        return np.ascontiguousarray(out, dtype=dtype)

    return matvec


def lanczos(op, k: int = 1, which: str = "LA", tol: float = 1e-6, max_iter: int = 1000, ncv: int | None = None,
            v0=None, seed: int = 0) -> EigenResult:
    """Top-k eigenpairs of each member by thick-restart Lanczos with full reorthogonalization.

    op: operator with shape (batch, n, n), dtype float32/float64 and a batched ``matvec`` (see module doc).
    k: eigenpairs per member, 1 <= k <= n. which: "LA" (largest algebraic) or "LM" (largest magnitude).
    tol: a pair is converged when ||A y - theta y|| <= tol * |theta|. max_iter: matvecs per member, >= k.
    ncv: Krylov dimension before a thick restart (default min(n, max(2k + 1, 20))), in (k, n] or equal n.
    v0: warm start [batch, n] (or [n]), e.g. the previous top eigenvector; default random from ``seed``.

    A Krylov space holds one direction per distinct eigenvalue. When it becomes exactly invariant before ``ncv``
    vectors (a repeated top eigenvalue, a v0 that is an eigenvector, a zero operator), the solver goes on in random
    directions until the basis is full, so such members cost up to ``ncv`` matvecs; a multiplicity that only
    rounding reveals can still be missed, as with any single-vector Krylov method.
    """
    batch, n, dtype = _operator_dims(op)
    k = check_int(k, "k", min=1)
    if k > n:
        raise ValueError(f"k: expected at most n={n} (the operator's size), got {k}")
    which = check_choice(which, "which", ("LA", "LM"))
    tol = check_float(tol, "tol", positive=True)
    max_iter = check_int(max_iter, "max_iter", min=k, max=MAX_INT64)
    ncv = 0 if ncv is None else check_int(ncv, "ncv", min=1, max=n)
    if ncv and ncv <= k and ncv != n:
        raise ValueError(f"ncv: expected k < ncv <= n (or ncv == n), got ncv={ncv} with k={k}, n={n}")
    seed = check_seed(seed)
    v0 = check_v0(v0, batch, n, dtype)
    core = _native._core.spectrum
    solve = core.lanczos_f32 if dtype == np.float32 else core.lanczos_f64
    return EigenResult(*solve(_callback(op, batch, n, dtype), batch, n, k, which, tol, max_iter, ncv, seed, v0))


def power_iteration(op, tol: float = 1e-6, max_iter: int = 10000, v0=None, seed: int = 0) -> EigenResult:
    """Dominant (largest-magnitude) eigenpair of each member by power iteration.

    Same operator and result conventions as :func:`lanczos` with k=1; converged when
    ||A v - theta v|| <= tol * |theta| (a residual test, the same as Lanczos, so matvec counts compare).
    """
    batch, n, dtype = _operator_dims(op)
    tol = check_float(tol, "tol", positive=True)
    max_iter = check_int(max_iter, "max_iter", min=1, max=MAX_INT64)
    seed = check_seed(seed)
    v0 = check_v0(v0, batch, n, dtype)
    core = _native._core.spectrum
    solve = core.power_iteration_f32 if dtype == np.float32 else core.power_iteration_f64
    return EigenResult(*solve(_callback(op, batch, n, dtype), batch, n, tol, max_iter, seed, v0))
