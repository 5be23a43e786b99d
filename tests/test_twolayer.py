"""Two-layer kernels: native and numpy twin, each against a long-double truth (the twin against torch autograd is in
test_twolayer_torch.py); thread-count determinism; numpy habits at the boundary; copies and files."""
import copy
import math
import pickle

import numpy as np
import pytest
from conftest import (
    TRUTH_DTYPE,
    ULPS,
    assert_as_accurate_as_reference,
    copy_params,
    in_dtype,
    make_problem,
    ulps,
)
from hypothesis import given
from hypothesis import strategies as st

import physai
from physai import _core
from physai.twolayer import ACTIVATIONS, LOSSES, PARAMETERIZATIONS, TwoLayer, scaling
from physai.twolayer import reference as R
from physai.twolayer.params import activation_code, loss_code

DTYPES = [np.float32, np.float64]
SCHEDULE = _core.twolayer.schedule  # the shape thresholds that pick each parallel path (csrc/twolayer/schedule.hpp)
VECTOR_BYTES = 32  # the row loops' vector (csrc/common/simd.hpp: one AVX2 register)


def check_against_reference(net, X, Y, v, loss, what=""):
    """Native forward, loss, gradient and HVP, and the twin in the model's dtype, against the twin in long double."""
    dtype, p = net.dtype, net.reference_params()
    pt, Xt, Yt, vt = in_dtype(p, TRUTH_DTYPE, X, Y, v)
    assert_as_accurate_as_reference(net.forward(X), R.forward(p, X)[0], R.forward(pt, Xt)[0], dtype, f"{what} F")
    assert_as_accurate_as_reference(net.loss_and_grad(X, Y, loss), R.loss_and_grad(p, X, Y, loss),
                                    R.loss_and_grad(pt, Xt, Yt, loss), dtype, f"{what} loss, gradient")
    assert_as_accurate_as_reference(net.hvp(X, Y, v, loss), R.hvp(p, X, Y, v, loss), R.hvp(pt, Xt, Yt, vt, loss),
                                    dtype, f"{what} HVP")


def check_training_against_reference(net, X, Y, lr, steps, loss, batch_size=None):
    """Native training against the twin's loop, each in the model's dtype, against the twin in long double: the
    losses of every step and the final parameters."""
    start = copy_params(net.reference_params())
    s = net.scaling
    multipliers = (s.lr_W, s.lr_b, s.lr_a)
    rates = np.broadcast_to(np.asarray(lr, float), (net.ensemble,))
    losses = net.train(X, Y, lr, steps=steps, loss=loss, batch_size=batch_size).losses
    ref_losses, final = R.train(start, X, Y, loss, rates.astype(net.dtype), multipliers, steps, batch_size or 0)
    pt, Xt, Yt = in_dtype(start, TRUTH_DTYPE, X, Y)
    true_losses, true_final = R.train(pt, Xt, Yt, loss, rates.astype(TRUTH_DTYPE), multipliers, steps,
                                      batch_size or 0)
    assert_as_accurate_as_reference(losses, ref_losses, true_losses, net.dtype, "losses")
    assert_as_accurate_as_reference((net.W, net.b, net.a), (final.W, final.b, final.a),
                                    (true_final.W, true_final.b, true_final.a), net.dtype, "parameters")


# --- native against the twin --------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_member", [False, True], ids=["shared-X", "per-member-X"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_native_matches_reference(activation, loss, param, dtype, per_member):
    net, X, Y, v = make_problem(activation, loss, param, dtype, per_member_x=per_member, per_member_y=per_member)
    check_against_reference(net, X, Y, v, loss)


def vector_widths(dtype):
    """Widths that run the row loops' every combination of whole vectors (blocks of 4, 2 and 1) and single columns:
    1 vector; 2 + 1; 4 + 5 columns; 4 + 4 + 6 columns."""
    lanes = VECTOR_BYTES // np.dtype(dtype).itemsize
    return [lanes, 3 * lanes, 4 * lanes + 5, 8 * lanes + 6]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("members", ["lone-row-blocks", "ensemble"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("width", range(4))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_vector_widths_match_reference(dtype, width, k, members, loss):
    # A lone member with more than block_rows rows takes the parallel row-block path; an ensemble the
    # member-parallel one.
    E, n = (1, SCHEDULE["block_rows"] + 72) if members == "lone-row-blocks" else (2, 45)
    net, X, Y, v = make_problem("softplus", loss, "standard", dtype, E=E, n=n, d=11, m=vector_widths(dtype)[width], k=k)
    check_against_reference(net, X, Y, v, loss)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("width", range(4))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_tanh_single_output_matches_reference(dtype, width, loss, bias):
    # tanh with one output: the HVP's row pass recomputes sigma' and sigma'' from S instead of reading their caches.
    net, X, Y, v = make_problem("tanh", loss, "standard", dtype, E=2, n=45, d=11, m=vector_widths(dtype)[width], k=1,
                                bias=bias)
    check_against_reference(net, X, Y, v, loss)


@pytest.mark.parametrize("n", [45, 72, 136])
@pytest.mark.parametrize("k", [1, 3, 12])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_forward_and_saving_forward_give_the_same_outputs(dtype, k, n):
    # The outputs are summed alike on every path (csrc/twolayer/rows.hpp: output_layer_rows), whatever the block of
    # rows an output falls in (45 rows are 5 blocks of 8, then 4 + 1 rows), and so is the hidden layer of these
    # widths (micro-kernels, csrc/common/microkernel.hpp), whose bits do not depend on the height of the block a row
    # falls in: the forward splits 72 and 136 rows into blocks of gemm_block rows and a last one of small_dim rows,
    # which the saving forward computes in one block.
    assert (n - SCHEDULE["gemm_block"]) % SCHEDULE["gemm_block"] == SCHEDULE["small_dim"] or n == 45
    assert_forward_equals_saving_forward(dtype, n, 11, 37, k)


# (n, d, m): a short batch of a layer with a narrow last block of columns (the forward cuts columns when n < m, the
# saving forward does not), and a narrow input to a wide layer (m d = 8800: beyond the smaller A B^T limit,
# micro_transposed_values = 2^13 for double and for float off micro_large_float_limits, were the sum not short)
@pytest.mark.parametrize(("n", "d", "m"), [(40, 2, 70), (40, 11, 70), (5, 8, 1100), (45, 8, 1100)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_forward_and_saving_forward_agree_at_any_cut(dtype, n, d, m):
    assert_forward_equals_saving_forward(dtype, n, d, m, 1)


def assert_forward_equals_saving_forward(dtype, n, d, m, k):
    net, X, _, _ = make_problem("tanh", "mse", "standard", dtype, E=2, n=n, d=d, m=m, k=k)
    p = net.reference_params()
    config = _core.twolayer.Config(p.input_scale, p.output_scale, _core.twolayer.Activation.tanh)
    F, S = np.empty((2, n, k), dtype), np.empty((2, n, m), dtype)
    _core.twolayer.forward_saving(X, p.W, p.b, p.a, config, F, S, None)
    np.testing.assert_array_equal(net.forward(X), F)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_native_tanh_is_accurate(dtype):
    # One unit with W = a = 1: the outputs are tanh of the inputs themselves, over a wide grid, against long-double
    # tanh; csrc/common/fastmath.hpp promises a few ulp.
    net = TwoLayer(1, 1, 1, "tanh", bias=False, dtype=dtype)
    net.W[:] = 1.0
    net.a[:] = 1.0
    x = np.concatenate([np.linspace(-20, 20, 200_000), np.geomspace(1e-12, 20, 10_001)]).astype(dtype)
    expected = np.tanh(x.astype(TRUTH_DTYPE))
    relative = np.abs(net.forward(x[:, None])[0, :, 0] - expected) / np.abs(expected)
    assert relative.max() <= ulps(dtype, ULPS)


def test_reused_scratch_memory_leaves_no_trace():
    # Kernels keep per-thread scratch buffers between calls; a call after calls of other shapes must give the same
    # bits as the first call of its shape.
    def run(m, n):
        net, X, Y, v = make_problem("tanh", "mse", "standard", np.float64, E=1, n=n, d=9, m=m, k=2)
        value, grads = net.loss_and_grad(X, Y)
        return [value, *grads, *net.hvp(X, Y, v), net.forward(X)]

    first = run(20, 300)
    for m, n in ((200, 1000), (3, 5), (50, 129)):
        run(m, n)
    for x, y in zip(first, run(20, 300)):
        np.testing.assert_array_equal(x, y)


def test_scratch_memory_larger_than_the_kept_size_is_freed():
    # A buffer that grows with the batch (the drop-in backward's dZ of all n rows, for dX: n m floats) is freed after
    # the call, not kept for the thread's lifetime like the tile buffers (csrc/common/scratch.hpp). One thread: the
    # kernels' scratch is then the calling thread's, which _core reports.
    n, d, m, k = 1 << 16, 2, 320, 1  # n m floats = 80 MiB, over the 64 MiB kept
    rng = np.random.default_rng(0)
    X, G = rng.standard_normal((n, d), dtype=np.float32), rng.standard_normal((1, n, k), dtype=np.float32)
    W, a = rng.standard_normal((1, m, d), dtype=np.float32), rng.standard_normal((1, k, m), dtype=np.float32)
    config = _core.twolayer.Config(1.0, 1.0, activation_code("relu"))
    F, S = np.empty((1, n, k), np.float32), np.empty((1, n, m), np.float32)
    dW, da, dX = np.empty_like(W), np.empty_like(a), np.empty((1, n, d), np.float32)
    with physai.num_threads(1):
        _core.twolayer.forward_saving(X, W, None, a, config, F, S, None)
        _core.twolayer.backward_saved(X, G, W, None, a, S, None, config, dW, None, da, dX)
        retained = _core.scratch_retained_bytes()
    assert retained < n * m * 4
    # and the kernel used it: dX agrees with the twin's, computed from the same S
    expected = R.backward_saved(R.Params(W, None, a, 1.0, 1.0, "relu"), X, G, S, None)[3]
    np.testing.assert_allclose(dX, expected, rtol=1e-4, atol=1e-4)


def test_hvp_of_zero_rows_is_zero_and_leaves_other_members_alone():
    # Eigensolvers feed zero rows for members that have converged; the operator skips them.
    net, X, Y, _ = make_problem("gelu", "logistic", "mup", np.float64, E=3, n=40, d=4, m=12, k=2)
    operator = net.hessian_operator(X, Y, "logistic")
    V = np.random.default_rng(3).standard_normal((3, net.num_params))
    full = operator.matvec(V)
    V[1] = 0.0
    partial = operator.matvec(V)
    np.testing.assert_array_equal(partial[1], 0.0)
    np.testing.assert_array_equal(partial[[0, 2]], full[[0, 2]])


def lone_member_rows():
    """Rows of a lone member that take the row-block path, the last block short."""
    return 2 * SCHEDULE["block_rows"] + 44


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ["tanh", "relu", "linear", "gelu"])
def test_lone_member_row_blocks_match_reference(activation, loss):
    # A lone small member runs fixed row blocks in parallel and sums their gradients (and HVPs) in block order.
    net, X, Y, v = make_problem(activation, loss, "mup", E=1, n=lone_member_rows(), d=6, m=9, k=3)
    check_against_reference(net, X, Y, v, loss)


@pytest.mark.parametrize("batch", ["full", "half"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ["tanh", "relu", "linear", "gelu"])
def test_lone_member_training_matches_reference(activation, loss, batch):
    # Training a lone member takes the row-block path too, with full batches and with mini-batches of half the rows.
    n = lone_member_rows()
    net, X, Y, _ = make_problem(activation, loss, "mup", E=1, n=n, d=6, m=9, k=3)
    check_training_against_reference(net, X, Y, 0.1, 5, loss, batch_size=None if batch == "full" else n // 2)


# --- the same bits on any number of threads -------------------------------------------------------------------------

def assert_same_bits_for_any_thread_count(compute):
    """compute() -> list of arrays gives the same bits on 1, 2 and 3 threads (3: an odd count, so neither members
    nor blocks split evenly over the threads)."""
    results = []
    for threads in (1, 2, 3):
        with physai.num_threads(threads):
            results.append(compute())
    for threads, other in zip((2, 3), results[1:]):
        assert len(other) == len(results[0])
        for i, (x, y) in enumerate(zip(results[0], other)):
            np.testing.assert_array_equal(x, y, err_msg=f"result {i}, 1 vs {threads} threads")


def kernel_paths():
    """(E, n, d, m) of a lone small member (parallel row blocks), a lone large one (each GEMM split into fixed blocks,
    row-parallel loops: work n m (d + k) just above blocked_work at d = 33, k = 2; and at m = 100, d + k = 65 or 66,
    whose ~10k rows make several tiles, so that the backward's sums over tiles add to what earlier tiles wrote), a
    lone wide one (GEMMs whose shared operand d m, n d has gemm_wide_operand elements or more, split into blocks of
    gemm_wide_block rows: two full blocks and a short one of the n rows) and an ensemble (member-parallel)."""
    m_large, d_wide, m_wide = 480, 256, 1024
    n_wide = 2 * SCHEDULE["gemm_wide_block"] + 44
    assert d_wide * m_wide >= SCHEDULE["gemm_wide_operand"] and SCHEDULE["tile_values"] // m_wide >= n_wide
    return {"lone-row-blocks": (1, 700, 33, 300),
            "lone-split-gemms": (1, SCHEDULE["blocked_work"] // (m_large * 35) + 1, 33, m_large),
            "lone-wide-gemms": (1, n_wide, d_wide, m_wide),
            "lone-split-gemms-tiles": (1, SCHEDULE["blocked_work"] // (100 * 65) + 1, 64, 100),
            "ensemble": (5, 300, 33, 40)}


# k = 1 with tanh: on one thread a member's backward takes the single pass that reads sigma' off S; split over threads,
# the three passes with D1.
@pytest.mark.parametrize("activation,k", [("gelu", 2), ("tanh", 1)])
@pytest.mark.parametrize("path", kernel_paths())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_kernels_do_not_depend_on_thread_count(dtype, path, activation, k):
    E, n, d, m = kernel_paths()[path]
    net, X, Y, v = make_problem(activation, "mse", "ntk", dtype, E=E, n=n, d=d, m=m, k=k)

    def compute():
        value, grads = net.loss_and_grad(X, Y)
        return [net.forward(X), value, *grads, *net.hvp(X, Y, v)]

    assert_same_bits_for_any_thread_count(compute)


def training_problem(E, dtype):
    """n m (d + k) above parallel_work, from which a lone member splits its work; m = 2 gemm_block + 2, so a split
    GEMM has two full blocks and a short one; n = 2 block_rows + 44."""
    m, n = 2 * SCHEDULE["gemm_block"] + 2, lone_member_rows()
    assert n * m * (16 + 2) >= SCHEDULE["parallel_work"]
    return make_problem("tanh", "cross_entropy", "ntk", dtype, E=E, n=n, d=16, m=m, k=2, per_member_x=E > 1,
                        per_member_y=E > 1)


# With E=1, full batches and batches of block_rows + 72 run parallel row blocks; batches of block_rows (and the
# short last batch of the other schedule) and the tracked steps' Hessian caches and gradients split each GEMM. With
# E=3 each member runs its whole schedule on one thread.
TRAINING_SCHEDULES = {
    "full": lambda rows: dict(),
    "row-block-batches": lambda rows: dict(batch_size=rows + 72),
    "split-gemm-batches": lambda rows: dict(batch_size=rows),
    "tracked": lambda rows: dict(track_sharpness_every=1),
    "tracked-batches": lambda rows: dict(batch_size=rows, track_sharpness_every=2),
}


@pytest.mark.parametrize("schedule", TRAINING_SCHEDULES)
@pytest.mark.parametrize("E", [3, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_training_does_not_depend_on_thread_count(dtype, E, schedule):
    def compute():
        net, X, Y, _ = training_problem(E, dtype)
        t = net.train(X, Y, 0.5, steps=6, loss="cross_entropy", **TRAINING_SCHEDULES[schedule](SCHEDULE["block_rows"]))
        return [t.losses, t.sharpness, t.matvecs, net.W, net.b, net.a]

    assert_same_bits_for_any_thread_count(compute)


@pytest.mark.parametrize("activation", ["tanh", "relu", "linear", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_single_output_backward_pass_gives_the_bits_of_its_three_passes(dtype, bias, activation):
    # An ensemble member's backward with one output runs dZ, G^T S and the bias sums in one pass
    # (backprop_single_output_sums), taking sigma' from S (tanh, relu, linear) or from D1 in place (gelu); a tracked
    # step takes its gradient from the Hessian operator's caches through the three separate passes (backprop, small
    # GEMM, column sums), with sigma' from S (tanh) or from the activation pass's D1 (the others). Both must give the
    # same bits, so for members whose rows make one tile (n <= 128 here; longer batches cut the untracked step's
    # rows into blocks) tracking the sharpness leaves the trajectory as it is. Widths 3 to 70 run every column block
    # and tail of the one pass (m = 70 over 127 or 128 rows: S and dZ overflow 32 KiB, where AVX-512 CPUs take
    # blocks of four vectors); n odd and even, the last row of the even/odd sums.
    for m, n in ((3, 7), (13, 64), (37, 33), (70, 128), (70, 127)):
        runs = []
        for track in (None, 1):
            net = TwoLayer(4, m, 1, activation, "mean-field", bias=bias, ensemble=2, dtype=dtype, seed=m)
            X = np.random.default_rng(5).standard_normal((n, 4)).astype(dtype) * 3
            Y = np.sign(np.random.default_rng(6).standard_normal((n, 1))).astype(dtype)
            t = net.train(X, Y, [0.3, 2.0], 4, "logistic", track_sharpness_every=track)
            runs.append([t.losses, net.W, net.a] + ([net.b] if bias else []))
        for x, y in zip(*runs):
            np.testing.assert_array_equal(x, y, err_msg=f"m={m}, n={n}")


@pytest.mark.parametrize("method,k", [("lanczos", 1), ("lanczos", 3), ("power", 1)])
@pytest.mark.parametrize("E", [3, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_sharpness_does_not_depend_on_thread_count(dtype, E, method, k):
    # With E=3 each member's native solve runs on one thread; a lone member splits each product.
    net, X, Y, _ = training_problem(E, dtype)

    def compute():
        eig = net.sharpness(X, Y, k=k, method=method, loss="cross_entropy", tol=1e-5, max_matvecs=300)
        return [eig.values, eig.vectors, eig.matvecs, eig.converged]

    assert_same_bits_for_any_thread_count(compute)


# --- training against the twin --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_native_train_matches_reference(dtype):
    net, X, Y, _ = make_problem("tanh", "mse", "mean-field", dtype, E=3, n=20, d=4, m=16, k=1)
    check_training_against_reference(net, X, Y, np.array([0.05, 0.1, 0.2]), 100, "mse")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_minibatch_train_matches_reference(dtype):
    net, X, Y, _ = make_problem("relu", "logistic", "standard", dtype, E=2, n=25, d=3, m=8, k=1, per_member_x=True,
                                per_member_y=True)
    check_training_against_reference(net, X, Y, 0.5, 12, "logistic", batch_size=10)


def test_ensemble_members_are_independent():
    net, X, Y, v = make_problem("softplus", "mse", "standard", E=4)
    value, grads = net.loss_and_grad(X, Y)
    single = TwoLayer(5, 7, 3, "softplus", "standard", ensemble=1, dtype=np.float64)
    for e in range(4):
        single.W, single.b, single.a = net.W[e:e + 1].copy(), net.b[e:e + 1].copy(), net.a[e:e + 1].copy()
        value_e, grads_e = single.loss_and_grad(X, Y)
        np.testing.assert_array_equal(value_e, value[e:e + 1])
        for g, g_e in zip(grads, grads_e):
            np.testing.assert_array_equal(g[e:e + 1], g_e)


def test_ensemble_training_and_sharpness_are_those_of_each_member_alone():
    # An ensemble trains (and solves) each member as one task; a member alone, with no more than block_rows rows,
    # runs the same computation, so the bits agree. The solver's start is given, since a member's random start
    # stream is keyed by its index in the ensemble.
    net, X, Y, _ = make_problem("tanh", "logistic", "standard", E=3, n=SCHEDULE["block_rows"], d=6, m=20, k=1)
    members = [TwoLayer.from_arrays(*(p[e:e + 1].copy() for p in (net.W, net.b, net.a)), "tanh") for e in range(3)]
    v0 = np.random.default_rng(1).standard_normal((3, net.num_params))
    together = net.sharpness(X, Y, loss="logistic", v0=v0)
    rates = np.array([0.1, 0.5, 2.0])
    trajectory = net.train(X, Y, rates, 20, loss="logistic", batch_size=50)
    for e, member in enumerate(members):
        alone = member.sharpness(X, Y, loss="logistic", v0=v0[e:e + 1])
        np.testing.assert_array_equal(alone.values[0], together.values[e])
        np.testing.assert_array_equal(alone.vectors[0], together.vectors[e])
        losses = member.train(X, Y, rates[e], 20, loss="logistic", batch_size=50).losses
        np.testing.assert_array_equal(losses[:, 0], trajectory.losses[:, e])
        np.testing.assert_array_equal(member.W[0], net.W[e])


def test_member_init_does_not_depend_on_ensemble_size():
    small, big = TwoLayer(3, 4, ensemble=2, seed=5), TwoLayer(3, 4, ensemble=6, seed=5)
    np.testing.assert_array_equal(small.W, big.W[:2])
    assert not np.array_equal(big.W[0], big.W[1])


# --- parameterizations ----------------------------------------------------------------------------------------------

def yang_hu_mup(d, m):
    """Tensor Programs V, Table 3, SGD column, for input layer (fan_in d, fan_out m) and output layer (fan_in m):
    input weights and biases variance 1/fan_in and rate lr * fan_out; output weights variance 1/fan_in**2 and rate
    lr / fan_in; no multipliers."""
    return dict(std_W=math.sqrt(1 / d), std_a=math.sqrt(1 / m**2), input_scale=1, output_scale=1, lr_W=m, lr_b=m,
                lr_a=1 / m)


EXPECTED_SCALING = {
    # LeCun init: variance 1/fan_in, no multipliers
    "standard": lambda d, m: dict(std_W=d**-0.5, std_a=m**-0.5, input_scale=1, output_scale=1, lr_W=1, lr_b=1,
                                  lr_a=1),
    # Jacot et al.: unit-variance weights, the 1/sqrt(fan_in) moved into the forward pass
    "ntk": lambda d, m: dict(std_W=1, std_a=1, input_scale=d**-0.5, output_scale=m**-0.5, lr_W=1, lr_b=1, lr_a=1),
    # f = (1/m) sum_i a_i sigma(w_i . x / sqrt(d)), trained at rate lr * m
    "mean-field": lambda d, m: dict(std_W=1, std_a=1, input_scale=d**-0.5, output_scale=1 / m, lr_W=m, lr_b=m,
                                    lr_a=m),
    "mup": yang_hu_mup,
}


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
@pytest.mark.parametrize("d,m", [(3, 64), (784, 1000)])  # d != m: a swapped argument shows
def test_scaling_table(param, d, m):
    got = scaling(param, d, m)
    for name, value in EXPECTED_SCALING[param](d, m).items():
        assert getattr(got, name) == pytest.approx(value, rel=ulps(np.float64, ULPS)), name
    assert TwoLayer(d, m, param=param).scaling == got


@pytest.mark.parametrize("param", PARAMETERIZATIONS)
def test_parameterization_init_statistics(param):
    # The output at init has the variance the table promises: O(1) for standard/ntk, O(1/m) for mean-field/mup.
    # Over 8 members x 64 inputs of a linear net the sample variance, a mean of 8 (member) chi-square-like terms,
    # has a relative standard deviation near 1/2 (members share X, so inputs do not average out); the band is
    # about +-1.2 of those deviations.
    d, m = 16, 2048
    net = TwoLayer(d, m, activation="linear", param=param, ensemble=8, dtype=np.float64, seed=1)
    X = np.random.default_rng(0).standard_normal((64, d))
    F = net.forward(X)
    expected = 1.0 if param in ("standard", "ntk") else 1.0 / m
    ratio = F.var() / (expected * (X**2).sum(1).mean() / d)
    assert 0.6 < ratio < 1.6


@given(E=st.integers(1, 3), n=st.integers(0, 9), d=st.integers(1, 6), m=st.integers(1, 9), k=st.integers(1, 3),
       bias=st.booleans(), per_member=st.booleans())
def test_shapes_hypothesis(E, n, d, m, k, bias, per_member):
    net = TwoLayer(d, m, k, "tanh", ensemble=E, bias=bias, dtype=np.float64)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((E, n, d) if per_member else (n, d))
    Y = rng.standard_normal((n, k))
    v = tuple(None if q is None else rng.standard_normal(q.shape) for q in (net.W, net.b, net.a))
    assert net.forward(X).shape == (E, n, k)
    value, grads = net.loss_and_grad(X, Y)
    hv = net.hvp(X, Y, v)
    assert value.shape == (E,)
    for g, h, q in zip(grads, hv, (net.W, net.b, net.a)):
        assert (g is None) == (h is None) == (q is None)
        assert q is None or g.shape == h.shape == q.shape
    if n == 0:  # the mean over no rows is taken as 0, with zero derivatives
        for x in (value, *grads, *hv):
            assert x is None or not x.any()
    check_against_reference(net, X, Y, v, "mse")


# --- arguments ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,error,match", [
    (lambda: TwoLayer(0, 4), ValueError, "d:"),
    (lambda: TwoLayer(3, 0), ValueError, "m:"),
    (lambda: TwoLayer(3, 4, activation="sigmoid"), ValueError, "activation"),
    (lambda: TwoLayer(3, 4, param="xavier"), ValueError, "param"),
    (lambda: TwoLayer(3, 4, dtype=np.int32), TypeError, "dtype"),
    (lambda: TwoLayer(3, 4, ensemble=0), ValueError, "ensemble"),
    (lambda: TwoLayer(3, 4, bias=1), TypeError, "bias"),
])
def test_bad_construction(call, error, match):
    with pytest.raises(error, match=match):
        call()


def conversion_cases():
    """Inputs numpy would convert, each with what it should mean: (X, Y) -> (X', Y') of float32 [5, 3] and [5, 1]."""
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((5, 3)), rng.standard_normal((5, 1))
    read_only = X.astype(np.float32)
    read_only.setflags(write=False)
    return {
        "float64-for-float32": (X, Y),
        "1-D-target": (X, Y[:, 0]),
        "strided": (np.asfortranarray(X), Y[::1]),
        "read-only": (read_only, Y),
        "big-endian": (X.astype(">f4"), Y.astype(">f8")),
        "integers": (np.round(3 * X).astype(np.int16), (Y > 0).astype(np.int64)),
        "nested-lists": (X.tolist(), Y.tolist()),
        "pickled": (pickle.loads(pickle.dumps(X.astype(np.float32))), pickle.loads(pickle.dumps(Y.astype(np.float32)))),
    }


@pytest.mark.parametrize("case", conversion_cases())
def test_inputs_are_converted_as_numpy_converts_them(case):
    net = TwoLayer(3, 4, 1, "tanh", ensemble=2, dtype=np.float32)
    X, Y = conversion_cases()[case]
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    Y32 = np.ascontiguousarray(Y, dtype=np.float32).reshape(5, 1)
    np.testing.assert_array_equal(net.forward(X), net.forward(X32))
    for got, expected in zip(net.loss_and_grad(X, Y)[1], net.loss_and_grad(X32, Y32)[1]):
        np.testing.assert_array_equal(got, expected)
    twin = copy.deepcopy(net)
    np.testing.assert_array_equal(net.train(X, Y, 0.1, 2).losses, twin.train(X32, Y32, 0.1, 2).losses)
    np.testing.assert_array_equal(net.W, twin.W)


def test_native_layer_accepts_pickled_arrays():
    # The binding compares dtypes by equivalence: an unpickled float32 array carries an equal, not identical, dtype.
    net, X, Y, _ = make_problem(dtype=np.float32)
    thawed = [pickle.loads(pickle.dumps(x)) for x in (X, Y, net.W, net.b, net.a)]
    got = _core.twolayer.loss_and_grad(*thawed, net.config, loss_code("mse"))
    expected = _core.twolayer.loss_and_grad(X, Y, net.W, net.b, net.a, net.config, loss_code("mse"))
    for x, y in zip(got, expected):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("call,error,match", [
    (lambda net, X, Y: net.forward(X.astype(np.complex64)), TypeError, "X: expected real numbers, got dtype complex64"),
    (lambda net, X, Y: net.loss_and_grad(X, Y.astype(object)), TypeError, "Y: expected real numbers, got dtype object"),
    (lambda net, X, Y: net.forward(X[None, None]), ValueError, r"X: expected shape \(\*, 3\)"),
    (lambda net, X, Y: net.forward(np.zeros((5, 4))), ValueError, r"X: expected shape \(\*, 3\)"),
    (lambda net, X, Y: net.forward(np.zeros((2, 5, 3))), ValueError, r"X: expected shape \(1, \*, 3\)"),
    (lambda net, X, Y: net.loss_and_grad(X, np.zeros((4, 2))), ValueError, r"Y: expected shape \(5, 2\)"),
    (lambda net, X, Y: net.loss_and_grad(X, np.zeros(5)), ValueError, r"Y: expected shape \(5, 2\)"),
    (lambda net, X, Y: net.forward([[0.0, 1.0], [2.0]]), TypeError, "X: expected an array of real numbers"),
    (lambda net, X, Y: net.loss_and_grad(X, Y, loss="hinge"), ValueError, "loss"),
    (lambda net, X, Y: net.loss_and_grad(X, Y, loss="logistic"), ValueError, "Y: the logistic loss takes labels -1"),
    (lambda net, X, Y: net.train(X, np.ones((5, 2)) * 0.5, 0.1, 3, loss="logistic"), ValueError, "Y: the logistic"),
    (lambda net, X, Y: net.train(X, Y, float("nan"), steps=3), ValueError, "lr"),
    (lambda net, X, Y: net.train(X, Y, [0.1, 0.2], steps=3), ValueError, "lr"),
    (lambda net, X, Y: net.train(X, Y, 0.1, steps=-1), ValueError, "steps"),
    (lambda net, X, Y: net.train(X, Y, "0.1", steps=3), TypeError, "lr: expected real"),
    (lambda net, X, Y: net.train(X, Y, True, steps=3), TypeError, "lr: expected real"),
    # finite in float64, not in the model's float32
    (lambda net, X, Y: net.train(X, Y, 1e300, steps=3), ValueError, "lr: expected finite .* in float32"),
])
def test_inputs_that_cannot_be_converted_raise_naming_the_argument(call, error, match):
    net = TwoLayer(3, 4, k=2)
    X, Y = np.zeros((5, 3)), np.zeros((5, 2))
    with pytest.raises(error, match=match):
        call(net, X, Y)


@pytest.mark.parametrize("assign,error,match", [
    (lambda net: setattr(net, "W", np.zeros((1, 4, 3), np.float64)), TypeError, "W: expected dtype float32"),
    (lambda net: setattr(net, "a", np.zeros((1, 3, 4), np.float32)), ValueError, "a: expected shape"),
    (lambda net: setattr(net, "b", None), ValueError, "b: the model was built with bias=True"),
])
def test_parameters_are_checked_when_assigned(assign, error, match):
    net = TwoLayer(3, 4, k=2)
    with pytest.raises(error, match=match):
        assign(net)
    assert net.W.dtype == np.float32 and net.a.shape == (1, 2, 4) and net.b is not None  # left as it was


def test_native_layer_rechecks_shapes_and_dispatches_on_dtype():
    config = _core.twolayer.Config(1.0, 1.0, activation_code("relu"))
    W, a = np.zeros((1, 4, 3)), np.zeros((1, 2, 4))
    with pytest.raises(ValueError, match="X"):
        _core.twolayer.forward(np.zeros((5, 2)), W, None, a, config)
    with pytest.raises(TypeError, match="a: expected dtype float32"):
        _core.twolayer.forward(np.zeros((5, 3), np.float32), W.astype(np.float32), None, a, config)
    with pytest.raises(TypeError, match="W: expected dtype float32 or float64, got int64"):
        _core.twolayer.forward(np.zeros((5, 3)), W.astype(np.int64), None, a, config)
    for dtype in DTYPES:
        F = _core.twolayer.forward(*(np.ones(shape, dtype) for shape in ((5, 3), (1, 4, 3))), None, a.astype(dtype),
                                   config)
        assert F.dtype == dtype and F.shape == (1, 5, 2)


def test_kernel_enums_are_the_names():
    assert ACTIVATIONS == tuple(_core.twolayer.Activation.__members__)
    assert LOSSES == tuple(_core.twolayer.Loss.__members__)
    assert activation_code("gelu") == _core.twolayer.Activation.gelu
    with pytest.raises(ValueError, match="activation: expected one of"):
        activation_code("sigmoid")
    with pytest.raises(TypeError, match="loss: expected one of"):
        loss_code(0)


def test_from_arrays_shares_and_checks_the_arrays():
    W, a = np.zeros((2, 4, 3)), np.zeros((2, 1, 4))
    net = TwoLayer.from_arrays(W, None, a, "tanh", "ntk")
    assert net.W is W and net.b is None and net.num_params == 4 * 3 + 4
    assert net.scaling.output_scale == pytest.approx(0.5)
    with pytest.raises(TypeError, match="a: expected dtype float64"):
        TwoLayer.from_arrays(W, None, a.astype(np.float32))
    with pytest.raises(ValueError, match="b: expected shape"):
        TwoLayer.from_arrays(W, np.zeros((2, 5)), a)


@pytest.mark.parametrize("direction,error,match", [
    (lambda W, b, a: (W.transpose(0, 2, 1), b, a), ValueError, "W part"),
    (lambda W, b, a: (W[:1], b[:1], a[:1]), ValueError, "W part"),
    (lambda W, b, a: (W, None, a), ValueError, "b part is missing"),
    (lambda W, b, a: (None, b, a), ValueError, "W part is missing"),
    (lambda W, b, a: (W, b), TypeError, "three parts"),
])
def test_direction_parts_must_match_the_parameters(direction, error, match):
    net, X, Y, v = make_problem(E=3)
    with pytest.raises(error, match=match):
        net.hvp(X, Y, direction(*v))


def test_direction_of_a_model_without_bias_has_no_bias_part():
    net, X, Y, (W, _, a) = make_problem(E=3, bias=False)
    with pytest.raises(ValueError, match="no bias"):
        net.hvp(X, Y, (W, np.zeros((3, W.shape[1])), a))


def test_read_only_inputs_are_read_and_parameters_updated_in_place_must_be_writeable():
    net, X, Y, _ = make_problem()
    expected = net.loss_and_grad(X, Y)
    X.setflags(write=False)
    Y.setflags(write=False)
    value, grads = net.loss_and_grad(X, Y)
    np.testing.assert_array_equal(value, expected[0])
    net.train(X, Y, 0.1, 2)
    W = net.W.copy()
    W.setflags(write=False)
    net.W = W
    with pytest.raises(ValueError, match="W: expected a writeable array"):
        net.train(X, Y, 0.1, 2)


def test_nan_inputs_propagate_through_relu_like_the_reference():
    net, X, Y, _ = make_problem("relu", E=2, n=6)
    X[2, 1] = np.nan
    native, ref = net.forward(X), R.forward(net.reference_params(), X)[0]
    np.testing.assert_array_equal(np.isnan(native), np.isnan(ref))
    assert np.isnan(native[:, 2]).all() and not np.isnan(np.delete(native, 2, axis=1)).any()


def test_cross_entropy_with_huge_logits_matches_the_reference():
    # Logits 1e17 - 16, 1e17 and 1e17 + 16 (16 is one ulp there), exact through a 1-unit linear net: the loss and
    # softmax see differences of 16, which the log-sum-exp must not lose against the logits' magnitude.
    net = TwoLayer(1, 1, 3, activation="linear", bias=False, dtype=np.float64)
    net.W[:] = 1.0
    net.a[:] = (1e17 + np.array([-16.0, 0.0, 16.0]))[None, :, None]
    X, Y = np.ones((3, 1)), np.eye(3)
    value, (_, _, da) = net.loss_and_grad(X, Y, "cross_entropy")
    p = net.reference_params()
    pt, Xt, Yt = in_dtype(p, TRUTH_DTYPE, X, Y)
    ref_value, (_, _, ref_da) = R.loss_and_grad(p, X, Y, "cross_entropy")
    true_value, (_, _, true_da) = R.loss_and_grad(pt, Xt, Yt, "cross_entropy")
    # dW sums G a over logits of 1e17 whose weights nearly cancel: ill-conditioned in any summation order
    assert_as_accurate_as_reference((value, da), (ref_value, ref_da), (true_value, true_da), np.float64)
    closed_form = (32 + 16 + 0 + 3 * np.log1p(np.exp(-16) + np.exp(-32))) / 3
    assert abs(value[0] - closed_form) <= ulps(np.float64, ULPS) * closed_form


def test_same_init_starts_every_member_from_member_zero():
    shared = TwoLayer(4, 6, 2, "tanh", ensemble=3, same_init=True, seed=5)
    single = TwoLayer(4, 6, 2, "tanh", seed=5)
    for name in ("W", "b", "a"):
        np.testing.assert_array_equal(getattr(shared, name),
                                      np.broadcast_to(getattr(single, name), getattr(shared, name).shape))
    with pytest.raises(TypeError, match="same_init"):
        TwoLayer(4, 6, same_init=1)


# --- copies and files -----------------------------------------------------------------------------------------------

def copied(obj, how, folder):
    """A copy of a TwoLayer or Trajectory through pickle, deepcopy, or its save and load."""
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    if how == "deepcopy":
        return copy.deepcopy(obj)
    obj.save(folder / "copy.npz")
    return type(obj).load(folder / "copy.npz")


def assert_same_model(a, b):
    assert repr(a) == repr(b) and a.scaling == b.scaling
    for x, y in zip((a.W, a.b, a.a), (b.W, b.b, b.a)):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("copy_of", ["pickle", "deepcopy", "save-load"])
@pytest.mark.parametrize("bias", [True, False])
def test_model_copies_compute_what_the_model_computes(copy_of, bias, tmp_path):
    net, X, Y, v = make_problem("gelu", "logistic", "mup", np.float32, bias=bias, E=2)
    other = copied(net, copy_of, tmp_path)
    assert_same_model(net, other)
    assert other.W is not net.W
    np.testing.assert_array_equal(other.hvp(X, Y, v, "logistic")[0], net.hvp(X, Y, v, "logistic")[0])


@pytest.mark.parametrize("copy_of", ["pickle", "deepcopy", "save-load"])
def test_trajectory_copies_hold_the_same_arrays(copy_of, tmp_path):
    net, X, Y, _ = make_problem(E=2)
    trajectory = net.train(X, Y, [0.1, 1e200], 4, track_sharpness_every=2)  # the second member overflows
    other = copied(trajectory, copy_of, tmp_path)
    for name in ("losses", "sharpness", "sharpness_steps", "matvecs"):
        np.testing.assert_array_equal(getattr(other, name), getattr(trajectory, name))
        assert getattr(other, name).dtype == getattr(trajectory, name).dtype
    np.testing.assert_array_equal(other.diverged, [False, True])
