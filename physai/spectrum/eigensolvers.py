"""Batched top-k eigensolvers (Lanczos, power iteration) for symmetric operators given by a matvec.

An operator is any object with ``shape`` ``(batch, n, n)`` (or ``(n, n)`` for batch 1), a ``dtype``
(float32 or float64) and ``matvec(V)`` mapping a [batch, n] array of that dtype to a [batch, n] array: row b
is member b's operator applied to V[b] (the protocol of ``scipy.sparse.linalg.aslinearoperator``, with a batch).
Each member gets its own spectrum. The Krylov solvers run natively (csrc/spectrum/) with the GIL released; it is
re-acquired only to call ``matvec``. :func:`lanczos` adds, in Python, the search of the complement that makes
top-k safe under repeated eigenvalues and a check of each pair's true residual (see :func:`certified_top_k`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from physai import _native
from physai._checks import MAX_INT64, check_choice, check_dtype, check_float, check_int, check_seed, check_v0
from physai.spectrum.reference import wanted_order

WHICH = ("LA", "SA", "LM", "BE")

@dataclass
class EigenResult:
    """Eigenpairs of each batch member, most wanted first.

    values: [batch, k] (operator dtype); vectors: [batch, k, n] unit-norm, sign fixed so the largest-magnitude
    entry is positive; matvecs: [batch] int64, matvecs spent on each member; converged: [batch] bool, every returned
    pair certified (its true residual ||A y - theta y||, recomputed from the returned vector, within tolerance and,
    for k > 1, no more-wanted eigenvalue left in the complement);
    diverged: [batch] bool, members whose operator could not be evaluated (a non-finite loss): their values are NaN.
    """

    values: np.ndarray
    vectors: np.ndarray
    matvecs: np.ndarray
    converged: np.ndarray
    diverged: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.diverged is None:
            self.diverged = np.zeros(len(self.matvecs), dtype=bool)


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


def _callback(matvec, batch: int, n: int, dtype: np.dtype):
    def checked(V):
        out = np.asarray(matvec(V))
        if out.dtype.kind not in "iuf":
            raise TypeError(f"op.matvec: expected real values, got dtype {out.dtype}")
        if out.shape != (batch, n):
            raise ValueError(f"op.matvec: expected a result of shape ({batch}, {n}), got {out.shape}")
        return np.ascontiguousarray(out, dtype=dtype)

    return checked


def _native_solver(name: str, dtype: np.dtype):
    """The binding of solver ``name`` ("lanczos" or "power_iteration") for ``dtype``."""
    return functools.partial(getattr(_native._core.spectrum, name), dtype=np.dtype(dtype))


def _krylov(matvec, batch, n, dtype, k, which, tol, max_matvecs, ncv, seed, v0):
    """One native thick-restart Lanczos run ("LA" or "LM"): (values, vectors, matvecs, converged)."""
    return _native_solver("lanczos", dtype)(_callback(matvec, batch, n, dtype), batch, n, k, which, tol, max_matvecs,
                                            ncv, seed, v0)


def verify_residuals(matvec, batch: int, n: int, dtype, values: np.ndarray, vectors: np.ndarray,
                     counts: np.ndarray, converged: np.ndarray, tol: float, max_matvecs: int) -> np.ndarray:
    """Recomputes each claimed pair's true residual: ``converged[b]`` stays True only if every pair i of member b
    has ||A y_i - theta_i y_i|| <= tol * max(|theta_i|, |theta_1|) with A y_i from one more matvec (k per member,
    added to ``counts``; arrays updated in place), and only if those k matvecs fit in ``max_matvecs``. Lanczos's
    own test uses its estimate beta |s| of that residual, which keeps falling below the rounding floor (~eps ||A||
    in the operator's dtype) that the true one stops at: a tol under that floor is then reported unconverged
    instead of certified. Returns the members [batch] bool whose claim was checked and failed."""
    k = values.shape[1]
    converged &= counts + k <= max_matvecs  # a claim that cannot be checked within the budget is not certified
    claimed = np.flatnonzero(converged)
    ok = np.ones(batch, bool)
    if not len(claimed):
        return ~ok
    for i in range(k):
        V = np.zeros((batch, n), dtype=dtype)
        V[claimed] = vectors[claimed, i]
        AV = np.asarray(matvec(V), dtype=np.float64)
        counts[claimed] += 1
        for b in claimed:
            theta, y = float(values[b, i]), vectors[b, i].astype(np.float64)
            ok[b] &= np.linalg.norm(AV[b] - theta * y) <= tol * max(abs(theta), abs(float(values[b, 0])))
    failed = converged & ~ok
    converged &= ok
    return failed


def _more_wanted(theta: float, than: float, which: str, tol: float) -> bool:
    """Whether ``theta`` is more wanted than ``than`` by more than the relative tolerance (ties are either copy)."""
    margin = tol * max(abs(theta), abs(than))
    return theta > than + margin if which == "LA" else abs(theta) > abs(than) + margin


def _unwanted_shift(values: np.ndarray, which: str) -> float:
    """An eigenvalue less wanted than every value found, given to the locked directions of a complement search."""
    if which == "LM":
        return 0.0
    return float(values.min() - 2 * max(np.abs(values).max(), 1e-300))


def certified_top_k(matvec, batch: int, n: int, dtype, *, k: int, which: str, tol: float, max_matvecs: int,
                    ncv: int = 0, seed: int = 0, v0=None, first: tuple | None = None, krylov=None) -> tuple:
    """Top-k ("LA" or "LM") of each member with repeated eigenvalues found and certified: locked restarts.

    ``matvec`` maps [batch, n] to [batch, n] in ``dtype``; ``krylov(matvec, batch, n, dtype, k, which, tol,
    max_matvecs, ncv, seed, v0)`` is a single-vector Krylov solver (default: the native Lanczos; its twin in
    ``physai.spectrum.reference`` fits too). ``first``: the (values, vectors, matvecs, converged) of a first run
    already done (e.g. natively on a fused operator), to certify instead of running it.

    A single starting vector sees one direction per distinct eigenvalue, so in floating point it can miss copies of
    a repeated eigenvalue and still converge. After the first run, each member's found vectors Y are locked and the
    top eigenpair of the complement, ``(I - Y Y^T) A (I - Y Y^T) + sigma Y Y^T`` with sigma less wanted than
    anything found, is sought from a fresh random start (``numpy.random.default_rng([seed, round])``, the same for
    every member, so a member's result depends neither on its index nor on the other members). A complement
    eigenvalue more wanted than the current k-th (beyond ``tol``) is a missed copy: it joins the locked set and the
    search repeats; otherwise the member's k pairs are certified. Rounds end after at most n - k extra locks, or
    when the budget ``max_matvecs`` (per member, all rounds and the final check together; a ``first`` run must
    have kept k of it) is spent: then converged is False. This is
    PyHessian's deflation (Yao et al. 2020, Sec. 3) used as a check, with Lanczos instead of power iteration.
    Last, the true residual of every claimed pair is recomputed (:func:`verify_residuals`, k more matvecs). Lanczos's
    residual estimate can pass where the true residual is a little above tol (float32 bases): such members are
    solved again, warm-started from their top vector, with the Krylov tolerance tol / 10 and then tol / 100, within
    what is left of the budget, and checked again at tol.
    Returns (values [batch, k], vectors [batch, k, n], matvecs [batch], converged [batch]).
    """
    krylov = _krylov if krylov is None else krylov
    values, vectors, counts, converged, failed = _attempt(matvec, batch, n, dtype, k, which, tol, tol, max_matvecs,
                                                          ncv, seed, v0, first, krylov)
    for tighter in (t for t in (tol / 10, tol / 100) if t > 0):  # a subnormal tol has no tighter one
        rows = np.flatnonzero(failed & (counts + 2 * k <= max_matvecs))
        if not len(rows):
            break

        def subset(V, rows=rows):
            full = np.zeros((batch, n), dtype=dtype)
            full[rows] = V
            return np.asarray(matvec(full))[rows]

        again = _attempt(subset, len(rows), n, dtype, k, which, tol, tighter, max_matvecs - int(counts[rows].max()),
                         ncv, seed, np.ascontiguousarray(vectors[rows, 0], dtype=dtype), None, krylov)
        values[rows], vectors[rows], converged[rows] = again[0], again[1], again[3]
        counts[rows] += again[2]
        failed = np.zeros(batch, bool)
        failed[rows] = again[4]
    return values, vectors, counts, converged


def _attempt(matvec, batch, n, dtype, k, which, tol, krylov_tol, max_matvecs, ncv, seed, v0, first, krylov):
    """One pass of :func:`certified_top_k`: Krylov run (unless ``first``) and complement searches to ``krylov_tol``,
    then the residual check at ``tol``. Returns (values, vectors, matvecs, converged, failed check) [batch, ...]."""
    # the k matvecs of the final residual check are kept out of the searches' budget when it leaves them room
    search_budget = max_matvecs - k if max_matvecs >= 2 * k else max_matvecs
    if first is None:
        first = krylov(matvec, batch, n, dtype, k, which, krylov_tol, search_budget, ncv, seed, v0)
    values, vectors, counts, converged = (np.array(x) for x in first)
    if k > 1 and k < n:  # one pair: copies do not matter; all n: nothing left to miss
        _search_complement(matvec, batch, n, dtype, k, which, krylov_tol, search_budget, ncv, seed, krylov, values,
                           vectors, counts, converged)
    failed = verify_residuals(matvec, batch, n, dtype, values, vectors, counts, converged, tol, max_matvecs)
    return values, vectors, counts, converged, failed


def _search_complement(matvec, batch, n, dtype, k, which, tol, max_matvecs, ncv, seed, krylov, values, vectors,
                       counts, converged) -> None:
    """The locked searches of :func:`certified_top_k`, updating its arrays in place."""
    locked = [vectors[b].astype(np.float64) for b in range(batch)]
    active = [b for b in range(batch) if converged[b]]
    round_ = 0
    while active:
        round_ += 1
        budget = max_matvecs - int(counts[active].max())
        if budget < 1:
            converged[active] = False
            break
        shifts = [_unwanted_shift(values[b], which) for b in active]

        def complement(V, active=active, shifts=shifts):
            full = np.zeros((batch, n), dtype=dtype)
            coefficients = []
            for row, b in enumerate(active):
                c = locked[b] @ V[row]
                full[b] = V[row] - c @ locked[b]
                coefficients.append(c)
            out = np.asarray(matvec(full), dtype=np.float64)
            result = np.empty((len(active), n))
            for row, b in enumerate(active):
                w = out[b] - (locked[b] @ out[b]) @ locked[b]
                result[row] = w + shifts[row] * (coefficients[row] @ locked[b])
            return result

        # one start per round for every member, whatever its index: a member computes the same alone as in a batch
        start = np.random.default_rng([seed, round_]).uniform(-1, 1, n)
        starts = np.ascontiguousarray(np.broadcast_to(start, (len(active), n)), dtype=dtype)
        theta, y, used, ok = krylov(complement, len(active), n, dtype, 1, which, tol, budget, ncv, seed, starts)
        still = []
        for row, b in enumerate(active):
            counts[b] += used[row]
            if not ok[row]:
                converged[b] = False
                continue
            if not _more_wanted(float(theta[row, 0]), float(values[b, -1]), which, tol):
                continue
            locked[b] = np.vstack([locked[b], y[row, 0]])
            candidates = np.r_[values[b], theta[row, 0]]
            order = wanted_order(candidates, which)[:k]
            vectors[b] = np.vstack([vectors[b], y[row]])[order]
            values[b] = candidates[order]
            if len(locked[b]) < n:
                still.append(b)
        active = still


class _Negated:
    """-A, so that the smallest algebraic eigenvalues of A are the largest of the negated operator."""

    def __init__(self, matvec):
        self._matvec = matvec

    def __call__(self, V):
        return -np.asarray(self._matvec(V))


def lanczos(op, k: int = 1, which: str = "LA", tol: float = 1e-6, max_matvecs: int = 1000, ncv: int | None = None,
            v0=None, seed: int = 0) -> EigenResult:
    """k eigenpairs of each member, certified under repeated eigenvalues: thick-restart Lanczos with full
    reorthogonalization, then locked searches of the complement (:func:`certified_top_k`).

    op: operator with shape (batch, n, n), dtype float32/float64 and a batched ``matvec`` (see module doc).
    k: eigenpairs per member, 1 <= k <= n. which: "LA" (largest algebraic), "SA" (smallest algebraic, the most
    negative first), "LM" (largest magnitude) or "BE" (both ends: the ceil(k/2) largest, most positive first, then
    the floor(k/2) smallest, most negative first). tol: a pair is converged when its true residual
    ||A y - theta y|| <= tol * max(|theta|, |theta_1|), theta_1 the most wanted value (relative to theta_1 too, so
    eigenvalues near zero below a larger one can converge; a most wanted value itself near zero, as for "SA" or the
    lower end of "BE" on a positive semidefinite operator with a null space, cannot: converged is then False); the eigenvalue is then within ~(tol theta_1)^2 / gap of the true one
    (Kato-Temple bound, Parlett, *The Symmetric Eigenvalue Problem*, Thm 10.6.1). A tol below the rounding floor of
    the operator's dtype (~1e-7 ||A|| / |theta_1| in float32, ~1e-15 in float64) cannot be met: converged is then
    False. max_matvecs: matvecs per member (per end for "BE"), >= k.
    ncv: Krylov dimension before a thick restart (default min(n, max(2k + 1, 20))), in (k, n] or equal n.
    v0: warm start [batch, n] (or [n]), e.g. the previous top eigenvector; default random from ``seed``.

    Cost: one Lanczos run, plus for k > 1 at least one search of the complement (about as many matvecs as a
    top-1 run) to certify that no copy of a repeated eigenvalue was missed, one more per missed copy.
    Raises TypeError / ValueError naming the bad argument.
    """
    batch, n, dtype = _operator_dims(op)
    k = check_int(k, "k", min=1)
    if k > n:
        raise ValueError(f"k: expected at most n={n} (the operator's size), got {k}")
    which = check_choice(which, "which", WHICH)
    tol = check_float(tol, "tol", positive=True)
    max_matvecs = check_int(max_matvecs, "max_matvecs", min=k, max=MAX_INT64)
    ncv = 0 if ncv is None else check_int(ncv, "ncv", min=1, max=n)
    if ncv and ncv <= k and ncv != n:
        raise ValueError(f"ncv: expected k < ncv <= n (or ncv == n), got ncv={ncv} with k={k}, n={n}")
    seed = check_seed(seed)
    v0 = check_v0(v0, batch, n, dtype)
    solve = lambda matvec, kk, wh, start: certified_top_k(  # noqa: E731
        _callback(matvec, batch, n, dtype), batch, n, dtype, k=kk, which=wh, tol=tol, max_matvecs=max_matvecs,
        ncv=ncv, seed=seed, v0=start)
    if which in ("LA", "LM"):
        return EigenResult(*solve(op.matvec, k, which, v0))
    if which == "SA":
        values, vectors, counts, converged = solve(_Negated(op.matvec), k, "LA", v0)
        return EigenResult(-values, vectors, counts, converged)
    top = solve(op.matvec, (k + 1) // 2, "LA", v0)
    if k == 1:
        return EigenResult(*top)
    bottom = solve(_Negated(op.matvec), k // 2, "LA", None)
    return EigenResult(np.concatenate([top[0], -bottom[0]], axis=1), np.concatenate([top[1], bottom[1]], axis=1),
                       top[2] + bottom[2], top[3] & bottom[3])


def largest_algebraic_by_power(matvec, batch: int, n: int, dtype, first: tuple, *, tol: float,
                               max_matvecs: int, seed: int = 0) -> tuple:
    """The largest algebraic eigenpair from power iteration's dominant one ``first`` (values [batch, 1], vectors
    [batch, 1, n], matvecs [batch], converged [batch]): a member whose dominant eigenvalue theta is negative is
    solved again on A - theta I, whose spectrum lies in [0, lambda_max - theta] so that its dominant eigenvalue is
    lambda_max - theta (residual then relative to lambda_max - theta, up to max_matvecs more matvecs, converged
    only if both runs were). ``matvec`` maps [batch, n] to [batch, n] in ``dtype``. Returns the same tuple."""
    values, vectors, counts, converged = (np.array(x) for x in first)
    negative = np.flatnonzero(values[:, 0] < 0)
    if not len(negative):
        return values, vectors, counts, converged
    shifts = values[negative, 0].astype(np.float64)

    def shifted(V):
        full = np.zeros((batch, n), dtype=dtype)
        full[negative] = V
        return np.asarray(matvec(full), dtype=np.float64)[negative] - shifts[:, None] * V

    solve = _native_solver("power_iteration", dtype)
    mu, y, used, ok = solve(_callback(shifted, len(negative), n, dtype), len(negative), n, tol, max_matvecs, seed,
                            None)
    values[negative, 0] = mu[:, 0] + shifts
    vectors[negative] = y
    counts[negative] += used
    converged[negative] &= ok
    return values, vectors, counts, converged


def power_iteration(op, tol: float = 1e-6, max_matvecs: int = 10000, v0=None, seed: int = 0,
                    which: str = "LM") -> EigenResult:
    """The dominant (``which="LM"``, largest-magnitude) or the largest algebraic (``"LA"``) eigenpair of each
    member by power iteration.

    Same operator and result conventions as :func:`lanczos` with k=1; converged when
    ||A v - theta v|| <= tol * |theta| (a true residual, from the returned vector, as Lanczos certifies, so matvec
    counts compare). Power iteration converges to the largest *magnitude*; for "LA" a member whose dominant
    eigenvalue is negative runs again on a shifted operator (:func:`largest_algebraic_by_power`; up to
    ``max_matvecs`` more). Power iteration needs ~log(tol) / log(|lambda_2 / lambda_1|) matvecs where Lanczos
    needs ~its square root (Saad, *Numerical Methods for Large Eigenvalue Problems*, Sec. 6.6): prefer
    :func:`lanczos`. Raises TypeError / ValueError naming the bad argument.
    """
    batch, n, dtype = _operator_dims(op)
    tol = check_float(tol, "tol", positive=True)
    max_matvecs = check_int(max_matvecs, "max_matvecs", min=1, max=MAX_INT64)
    seed = check_seed(seed)
    v0 = check_v0(v0, batch, n, dtype)
    which = check_choice(which, "which", ("LM", "LA"))
    matvec = _callback(op.matvec, batch, n, dtype)
    first = _native_solver("power_iteration", dtype)(matvec, batch, n, tol, max_matvecs, seed, v0)
    if which == "LA":
        first = largest_algebraic_by_power(matvec, batch, n, dtype, first, tol=tol, max_matvecs=max_matvecs,
                                           seed=seed)
    return EigenResult(*first)
