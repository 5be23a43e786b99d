"""Native eigensolvers vs the numpy reference vs dense numpy.linalg.eigh, on batched symmetric matrices."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import physai
from physai.spectrum import DenseOperator, lanczos, power_iteration
from physai.spectrum import reference as ref


def symmetric_batch(batch, n, seed, spectrum=None):
    """Random orthogonal eigenvectors with a given (or Gaussian) spectrum: A[b] = Q diag(s) Q^T."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        s = rng.standard_normal(n) if spectrum is None else np.asarray(spectrum, float)
        out.append((Q * s) @ Q.T)
    A = np.array(out)
    return (A + A.transpose(0, 2, 1)) / 2


def dense_top(A, k, which):
    values, vectors = np.linalg.eigh(A)
    keys = -values if which == "LA" else -np.abs(values) - 1e-9 * values
    order = np.argsort(keys, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(values, order, 1), np.stack(
        [vectors[b][:, order[b]].T for b in range(len(A))])


def assert_vectors_match(got, expected, atol):
    for g, e in zip(got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])):
        sign = np.sign(g @ e)
        np.testing.assert_allclose(g, sign * e, atol=atol)


@pytest.mark.parametrize("which", ["LA", "LM"])
@pytest.mark.parametrize("k", [1, 4])
def test_lanczos_matches_dense_eigh_and_reference(which, k):
    A = symmetric_batch(3, 60, seed=k)
    result = lanczos(DenseOperator(A), k=k, which=which, tol=1e-10, max_iter=2000, ncv=12, seed=5)
    assert result.converged.all()
    values, vectors = dense_top(A, k, which)
    np.testing.assert_allclose(result.values, values, rtol=1e-8)
    assert_vectors_match(result.vectors, vectors, atol=1e-6)
    matvec = DenseOperator(A).matvec
    r_values, r_vectors, r_counts, r_conv = ref.lanczos(matvec, 3, 60, k=k, which=which, tol=1e-10,
                                                        max_matvecs=2000, ncv=12, seed=5)
    np.testing.assert_allclose(result.values, r_values, rtol=1e-12)
    np.testing.assert_allclose(result.vectors, r_vectors, atol=1e-9)
    assert np.abs(result.matvecs - r_counts).max() <= 1
    assert r_conv.all()


def test_lanczos_negative_eigenvalues_largest_magnitude():
    spectrum = np.r_[-10.0, -9.0, np.linspace(-1, 5, 38)]
    A = symmetric_batch(2, 40, seed=1, spectrum=spectrum)
    lm = lanczos(DenseOperator(A), k=3, which="LM", tol=1e-10, max_iter=1000)
    np.testing.assert_allclose(lm.values, [[-10, -9, 5]] * 2, rtol=1e-9)
    la = lanczos(DenseOperator(A), k=2, which="LA", tol=1e-10, max_iter=1000)
    np.testing.assert_allclose(la.values[:, 0], 5, rtol=1e-9)


def test_lanczos_degenerate_and_clustered_spectrum():
    # A triple eigenvalue on top, then a tight cluster: Lanczos from one vector sees one copy per Krylov space,
    # the breakdown restart must find the others.
    spectrum = np.r_[3.0, 3.0, 3.0, 2.0 + 1e-4 * np.arange(5), np.linspace(-1, 1, 22)]
    A = symmetric_batch(2, 30, seed=2, spectrum=spectrum)
    result = lanczos(DenseOperator(A), k=5, tol=1e-10, max_iter=3000, ncv=11)
    assert result.converged.all()
    np.testing.assert_allclose(result.values, [[3, 3, 3, 2.0004, 2.0003]] * 2, rtol=1e-8)
    # the three returned top vectors span the eigenspace of 3
    for b in range(2):
        Y = result.vectors[b, :3]
        np.testing.assert_allclose(Y @ Y.T, np.eye(3), atol=1e-8)
        np.testing.assert_allclose(A[b] @ Y.T, 3 * Y.T, atol=1e-7)


def test_full_space_and_k_equal_n():
    A = symmetric_batch(1, 6, seed=3)
    result = lanczos(DenseOperator(A), k=6, tol=1e-12, max_iter=100)
    np.testing.assert_allclose(result.values[0], np.sort(np.linalg.eigvalsh(A[0]))[::-1], rtol=1e-10, atol=1e-12)


def test_power_iteration_matches_dense_and_reference():
    spectrum = np.r_[-6.0, 4.0, np.linspace(-3, 3, 28)]
    A = symmetric_batch(3, 30, seed=4, spectrum=spectrum)
    result = power_iteration(DenseOperator(A), tol=1e-8, max_iter=5000, seed=9)
    assert result.converged.all()
    np.testing.assert_allclose(result.values[:, 0], -6.0, rtol=1e-10)
    r = ref.power_iteration(DenseOperator(A).matvec, 3, 30, tol=1e-8, max_matvecs=5000, seed=9)
    np.testing.assert_allclose(result.values, r[0], rtol=1e-12)
    np.testing.assert_allclose(result.vectors, r[1], atol=1e-10)
    np.testing.assert_array_equal(result.matvecs, r[2])


def test_lanczos_needs_fewer_matvecs_than_power_iteration():
    spectrum = np.r_[10.0, 9.5, np.linspace(0, 9, 198)]
    A = symmetric_batch(1, 200, seed=6, spectrum=spectrum)
    lz = lanczos(DenseOperator(A), tol=1e-6, max_iter=5000)
    pw = power_iteration(DenseOperator(A), tol=1e-6, max_iter=5000)
    assert lz.converged.all() and pw.converged.all()
    np.testing.assert_allclose(lz.values, pw.values, rtol=1e-6)
    print(f"matvecs to tol 1e-6: lanczos {lz.matvecs[0]}, power {pw.matvecs[0]}")
    assert lz.matvecs[0] * 3 < pw.matvecs[0]


def test_warm_start_costs_few_matvecs():
    A = symmetric_batch(2, 100, seed=7)
    cold = lanczos(DenseOperator(A), tol=1e-8, max_iter=1000)
    B = A + 1e-4 * symmetric_batch(2, 100, seed=8)
    warm = lanczos(DenseOperator(B), tol=1e-8, max_iter=1000, v0=cold.vectors[:, 0])
    recold = lanczos(DenseOperator(B), tol=1e-8, max_iter=1000)
    np.testing.assert_allclose(warm.values, recold.values, rtol=1e-8)
    assert (warm.matvecs < recold.matvecs).all()


def test_members_converge_independently():
    easy = np.diag(np.r_[10.0, np.ones(49)])
    hard = symmetric_batch(1, 50, seed=10)[0]
    result = lanczos(DenseOperator(np.stack([easy, hard])), tol=1e-10, max_iter=1000)
    assert result.matvecs[0] < result.matvecs[1]
    single = lanczos(DenseOperator(hard), tol=1e-10, max_iter=1000)
    np.testing.assert_array_equal(single.matvecs[0], result.matvecs[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_bits_whatever_thread_count(dtype):
    A = symmetric_batch(4, 40, seed=11).astype(dtype)
    runs = []
    for threads in (1, 2):
        with physai.num_threads(threads):
            runs.append(lanczos(DenseOperator(A), k=2, tol=1e-5, max_iter=500, seed=3))
    np.testing.assert_array_equal(runs[0].values, runs[1].values)
    np.testing.assert_array_equal(runs[0].vectors, runs[1].vectors)
    np.testing.assert_array_equal(runs[0].matvecs, runs[1].matvecs)


def test_float32_close_to_float64():
    A = symmetric_batch(2, 50, seed=12)
    r64 = lanczos(DenseOperator(A), k=2, tol=1e-6, max_iter=1000)
    r32 = lanczos(DenseOperator(A.astype(np.float32)), k=2, tol=1e-5, max_iter=1000)
    assert r32.values.dtype == np.float32
    np.testing.assert_allclose(r32.values, r64.values, rtol=1e-4)


def test_reference_matches_dense_eigh():
    A = symmetric_batch(2, 25, seed=13)
    values, vectors, _, conv = ref.lanczos(DenseOperator(A).matvec, 2, 25, k=3, which="LM", tol=1e-11,
                                           max_matvecs=500, ncv=8)
    assert conv.all()
    d_values, d_vectors = dense_top(A, 3, "LM")
    np.testing.assert_allclose(values, d_values, rtol=1e-9)
    assert_vectors_match(vectors, d_vectors, atol=1e-6)


def test_native_start_vectors_match_reference_stream():
    A = np.diag(np.arange(1.0, 9.0))
    # one matvec: the Rayleigh quotient of the start vector
    result = power_iteration(DenseOperator(A), tol=1e-12, max_iter=1, seed=42)
    x = ref.start_vectors(42, 1, 8)[0]
    x /= np.linalg.norm(x)
    np.testing.assert_allclose(result.values[0, 0], x @ A @ x, rtol=1e-14)


class Weird:
    def __init__(self, shape=(1, 4, 4), dtype=np.float64, out=None):
        self.shape, self.dtype, self.out = shape, dtype, out

    def matvec(self, V):
        return V if self.out is None else self.out(V)


def test_bad_input_raises_clear_errors():
    op = DenseOperator(np.eye(4))
    with pytest.raises(ValueError, match="k: expected at most n=4"):
        lanczos(op, k=5)
    with pytest.raises(ValueError, match="tol"):
        lanczos(op, tol=0.0)
    with pytest.raises(ValueError, match="tol"):
        power_iteration(op, tol=-1.0)
    with pytest.raises(ValueError, match="which"):
        lanczos(op, which="SA")
    with pytest.raises(ValueError, match="max_iter"):
        lanczos(op, k=3, max_iter=2)
    with pytest.raises(ValueError, match="ncv"):
        lanczos(DenseOperator(np.eye(10)), k=3, ncv=3)
    with pytest.raises(ValueError, match="v0"):
        lanczos(op, v0=np.zeros(4))
    with pytest.raises(ValueError, match="v0"):
        lanczos(op, v0=np.ones(5))
    with pytest.raises(TypeError, match="op"):
        lanczos(np.eye(4))
    with pytest.raises(TypeError, match="dtype"):
        lanczos(Weird(dtype=np.int64))
    with pytest.raises(ValueError, match="op.matvec"):
        lanczos(Weird(out=lambda V: V[:, :2]))
    with pytest.raises(ValueError, match="non-finite"):
        lanczos(Weird(out=lambda V: V * np.nan))
    with pytest.raises(ZeroDivisionError):
        lanczos(Weird(out=lambda V: 1 / 0))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 12), batch=st.integers(1, 3), which=st.sampled_from(["LA", "LM"]),
       seed=st.integers(0, 2**64 - 1))
def test_lanczos_any_small_problem(n, k, batch, which, seed):
    A = symmetric_batch(batch, n, seed=seed % 1000)
    if k > n:
        with pytest.raises(ValueError, match="k"):
            lanczos(DenseOperator(A), k=k, which=which, seed=seed)
        return
    result = lanczos(DenseOperator(A), k=k, which=which, tol=1e-9, max_iter=2000, seed=seed)
    assert result.converged.all()
    np.testing.assert_allclose(result.values, dense_top(A, k, which)[0], rtol=1e-7, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(tol=st.floats(allow_nan=True, allow_infinity=True), max_iter=st.integers(-3, 3),
       seed=st.integers(-5, 2**64 + 5))
def test_power_iteration_argument_boundaries(tol, max_iter, seed):
    op = DenseOperator(np.diag([3.0, 1.0, 0.5]))
    valid = np.isfinite(tol) and tol > 0 and max_iter >= 1 and 0 <= seed < 2**64
    if not valid:
        with pytest.raises(ValueError):
            power_iteration(op, tol=tol, max_iter=max_iter, seed=seed)
        return
    result = power_iteration(op, tol=tol, max_iter=max_iter, seed=seed)
    assert result.matvecs[0] <= max_iter
    assert abs(result.values[0, 0]) <= 3.0 + 1e-12
