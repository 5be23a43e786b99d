"""The shared-bias network (physai.twolayer.shared_bias): the numpy twin against torch autograd, the native kernel
(sorted samples, O(n) a step) against the twin's direct sums, determinism, boundaries and bad input."""
import numpy as np
import pytest
from conftest import assert_as_accurate_as_reference, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

import physai
from physai.twolayer import reference, shared_bias


def _problem(D=2, n=9, d=6, E=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((D, n, d))
    y = rng.choice([-1.0, 1.0], (D, n))
    a_plus, a_minus, b = rng.normal(0, 0.3, E), rng.normal(0, 0.3, E), rng.normal(0, 0.8, E)
    dataset = rng.integers(0, D, E)
    return X, y, a_plus, a_minus, b, dataset


def test_twin_matches_torch_autograd():
    """Loss, gradient and Hessian of the twin's direct sums against torch autograd of
    f = a+ sum_i relu(x_i + b) + a- sum_i relu(-x_i + b) (no sample sits on a kink: X is continuous)."""
    torch = pytest.importorskip("torch")
    X, y, a_plus, a_minus, b, dataset = _problem()
    loss, gradient, hessian = reference.shared_bias_evaluate(X[dataset], y[dataset], a_plus, a_minus, b)
    for e in range(len(b)):
        Xt, yt = torch.from_numpy(X[dataset[e]]), torch.from_numpy(y[dataset[e]])

        def objective(theta):
            f = theta[0] * torch.relu(Xt + theta[2]).sum(1) + theta[1] * torch.relu(theta[2] - Xt).sum(1)
            return torch.nn.functional.softplus(-yt * f).mean()

        theta = torch.tensor([a_plus[e], a_minus[e], b[e]], requires_grad=True)
        value = objective(theta)
        (grad,) = torch.autograd.grad(value, theta)
        dense = torch.autograd.functional.hessian(objective, theta.detach())
        assert_close((loss[e], gradient[e], hessian[e]), (value.detach().numpy(), grad.numpy(), dense.numpy()),
                     what=f"member {e}")


def test_output_is_the_papers_eq_2():
    X, _, a_plus, a_minus, b, _ = _problem(D=1, n=4, d=3, E=2)
    f = shared_bias.output(X[0], a_plus, a_minus, b)
    for e in range(2):
        for k in range(4):
            expected = sum(a_plus[e] * max(X[0, k, i] + b[e], 0) + a_minus[e] * max(-X[0, k, i] + b[e], 0)
                           for i in range(3))
            assert f[e, k] == pytest.approx(expected, rel=1e-14)


def _truth_evaluate(X, y, a_plus, a_minus, b, dataset):
    cast = [np.asarray(v, np.longdouble) for v in (X[dataset], y[dataset], a_plus, a_minus, b)]
    return reference.shared_bias_evaluate(*cast)


def test_native_evaluate_is_as_accurate_as_the_twin():
    X, y, a_plus, a_minus, b, dataset = _problem(n=40, d=30, E=7)
    native = shared_bias.loss_grad_hessian(X, y, a_plus, a_minus, b, dataset)
    twin = reference.shared_bias_evaluate(X[dataset], y[dataset], a_plus, a_minus, b)
    assert_as_accurate_as_reference(native, twin, _truth_evaluate(X, y, a_plus, a_minus, b, dataset), np.float64,
                                    "evaluate")


def test_native_training_is_the_twins_loop():
    """Unsorted and repeated record steps, a member with no steps, large rates whose bias crosses many coordinates
    per step (the cursors walk both ways): records and final parameters as the twin's loop, within the tolerance
    rule against the twin run in long double."""
    X, y, a_plus, a_minus, b, dataset = _problem(n=30, d=20, E=5)
    lr = np.array([0.01, 0.05, 0.2, 1.0, 3.0])
    steps = np.array([12, 0, 7, 20, 15])
    records = np.stack([steps, np.zeros(5, np.int64), steps // 2, steps // 2, np.minimum(steps, 3)])
    run = shared_bias.train(X, y, a_plus, a_minus, b, lr, steps, records, dataset)
    args = (X[dataset], y[dataset], a_plus, a_minus, b, lr, steps, records)
    twin = reference.shared_bias_train(*args)
    truth = reference.shared_bias_train(*[np.asarray(v, np.longdouble) if v.dtype.kind == "f" else v for v in args])
    assert_as_accurate_as_reference(((run.a_plus, run.a_minus, run.b), (run.loss, run.params, run.hessian)), twin,
                                    truth, np.float64, "train")
    np.testing.assert_array_equal(run.record_steps, records)
    moves = np.diff(np.append(run.params[records[:, 3].argsort(), 3, 2], run.b[3]))
    assert moves.max() > 0.1 and moves.min() < -0.1  # the bias went both ways across coordinates


def test_same_bits_whatever_the_threads_and_the_ensemble():
    X, y, a_plus, a_minus, b, dataset = _problem(n=50, d=40, E=6)
    lr, steps = np.full(6, 0.3), np.arange(20, 26)
    previous = physai.get_num_threads()
    try:
        physai.set_num_threads(1)
        one = shared_bias.train(X, y, a_plus, a_minus, b, lr, steps, dataset=dataset)
        physai.set_num_threads(2)
        two = shared_bias.train(X, y, a_plus, a_minus, b, lr, steps, dataset=dataset)
    finally:
        physai.set_num_threads(previous)
    alone = shared_bias.train(X, y, a_plus[3:4], a_minus[3:4], b[3:4], lr[3:4], steps[3:4], dataset=dataset[3:4])
    for name in ("a_plus", "a_minus", "b", "loss", "params", "hessian"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
        member = getattr(one, name)[3:4] if name in ("a_plus", "a_minus", "b") else getattr(one, name)[:, 3:4]
        np.testing.assert_array_equal(member, getattr(alone, name))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 5), bias=st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]),
       seed=st.integers(0, 2**16))
def test_ties_and_tiny_shapes_count_as_the_twin(n, d, bias, seed):
    """Integer inputs put coordinates exactly on the kinks x_i = -b and x_i = b (ReLU(0) = 0, not counted active):
    the native counts and sums equal the twin's, down to n = d = 1."""
    rng = np.random.default_rng(seed)
    X = rng.integers(-2, 3, (1, n, d)).astype(float)
    y = rng.choice([-1.0, 1.0], (1, n))
    a_plus, a_minus = rng.normal(size=1), rng.normal(size=1)
    native = shared_bias.loss_grad_hessian(X, y, a_plus, a_minus, [bias])
    twin = reference.shared_bias_evaluate(X, y, a_plus, a_minus, np.array([bias]))
    assert_as_accurate_as_reference(native, twin, _truth_evaluate(X, y, a_plus, a_minus, np.array([bias]),
                                                                  np.zeros(1, int)), np.float64, "ties")


def test_curvature_keeps_its_relative_accuracy_at_large_negative_margins():
    """d2l/df2 = sigma(m) sigma(-m) at margins m = -10.7 and -40 (one unit, so H[0, 0] is that curvature times
    S+^2 = 1): within a few ulps of the long-double twin, where sigma(-m) (1 - sigma(-m)) is 5e4 ulps off at -10.7
    and exactly 0 at -40."""
    for margin in (-10.7, -40.0):
        X, y = np.array([[[1.0]]]), np.array([[1.0]])
        a_plus, a_minus = np.array([margin]), np.array([0.5])
        native = shared_bias.loss_grad_hessian(X, y, a_plus, a_minus, [0.0])[2][0, 0, 0]
        cast = [np.asarray(v, np.longdouble) for v in (X, y, a_plus, a_minus, np.zeros(1))]
        truth = reference.shared_bias_evaluate(*cast)[2][0, 0, 0]
        assert truth > 0 and abs(native - truth) <= 8 * np.finfo(float).eps * truth, (margin, native, truth)


def test_a_rate_far_past_the_edge_kills_every_unit_and_returns():
    """The logistic loss's gradient is bounded, so a huge rate does not overflow: it throws the bias far below every
    coordinate, where all units are dead (f = 0, loss log 2, zero Hessian); the cursors walk to the end and stay."""
    X, y, a_plus, a_minus, b, dataset = _problem(E=2)
    run = shared_bias.train(X, y, [50.0, 0.1], [-50.0, 0.1], [0.0, 0.0], [1e6, 1e-3], [200, 5], dataset=[0, 1])
    assert run.b[0] < -1e6 and run.loss[-1, 0] == pytest.approx(np.log(2), rel=1e-15)
    np.testing.assert_array_equal(run.hessian[-1, 0], 0)
    assert np.isfinite(run.sharpness).all()


def test_an_infinite_bias_kills_every_unit_as_in_the_twin():
    """b = -inf (reachable through the native call, or a rate near the float64 maximum): every unit dead, f = 0,
    loss log 2, as the twin's direct sums give; b = +inf: every unit active, the loss infinite or NaN as the twin's."""
    from physai import _core

    X, y, a_plus, a_minus, _, dataset = _problem(E=2)
    b = np.array([-np.inf, -np.inf])
    native = _core.twolayer.shared_bias_evaluate(X, y, a_plus, a_minus, b, dataset)
    twin = reference.shared_bias_evaluate(X[dataset], y[dataset], a_plus, a_minus, b)
    np.testing.assert_array_equal(native[0], np.log(2))
    np.testing.assert_array_equal(native[0], twin[0])
    np.testing.assert_array_equal(native[1][:, :2], 0)


def test_inputs_are_not_modified_and_runs_save_and_load(tmp_path):
    X, y, a_plus, a_minus, b, dataset = _problem()
    kept = [v.copy() for v in (X, y, a_plus, a_minus, b)]
    run = shared_bias.train(X, y, a_plus, a_minus, b, np.full(5, 0.1), np.full(5, 3), dataset=dataset)
    for before, after in zip(kept, (X, y, a_plus, a_minus, b)):
        np.testing.assert_array_equal(before, after)
    run.save(tmp_path / "run.npz")
    loaded = shared_bias.SharedBiasRun.load(tmp_path / "run.npz")
    for name in ("a_plus", "b", "record_steps", "loss", "params", "hessian"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(run, name))
        assert getattr(loaded, name).dtype == getattr(run, name).dtype


@pytest.mark.parametrize("change, error, name", [
    (dict(y=np.zeros((2, 9))), ValueError, "y"),
    (dict(X=np.full((2, 9, 6), np.nan)), ValueError, "X"),
    (dict(X=np.zeros((2, 0, 6))), ValueError, "X"),
    (dict(X=np.zeros((2, 9, 6), complex)), TypeError, "X"),
    (dict(a_minus=np.zeros(4)), ValueError, "a_minus"),
    (dict(b=np.full(5, np.inf)), ValueError, "b"),
    (dict(dataset=np.full(5, 2)), ValueError, "dataset"),
    (dict(dataset=None), ValueError, "dataset"),
    (dict(dataset=np.full(5, 0.7)), TypeError, "dataset"),
    (dict(dataset=np.zeros(5, bool)), TypeError, "dataset"),
    (dict(lr=np.zeros(5)), ValueError, "lr"),
    (dict(steps=np.full(5, -1)), ValueError, "steps"),
    (dict(steps=np.full(5, 1.5)), TypeError, "steps"),
    (dict(record_steps=np.full((1, 5), 4)), ValueError, "record_steps"),
    (dict(record_steps=np.zeros((1, 4), np.int64)), ValueError, "record_steps"),
])
def test_bad_input_names_the_argument(change, error, name):
    X, y, a_plus, a_minus, b, dataset = _problem()
    args = dict(X=X, y=y, a_plus=a_plus, a_minus=a_minus, b=b, lr=np.full(5, 0.1), steps=np.full(5, 3),
                record_steps=None, dataset=dataset)
    args.update(change)
    with pytest.raises(error, match=name):
        shared_bias.train(**args)
