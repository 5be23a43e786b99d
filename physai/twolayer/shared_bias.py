"""The ReLU network with one shared bias of Ahn, Bubeck, Chewi, Lee, Suarez, Zhang ("Learning threshold neurons via
the edge of stability", arXiv 2212.07469, NeurIPS 2023) for sparse coding: units ReLU(+x_i + b) and ReLU(-x_i + b) on
every input coordinate i, one output weight per sign shared by all coordinates, one shared bias b,

    f(x) = a+ sum_i ReLU(x_i + b) + a- sum_i ReLU(-x_i + b),

trained by full-batch gradient descent on the mean logistic loss L = (1/n) sum_k log(1 + exp(-y_k f(x_k))), labels
y in {-1, +1}. Parameters are ordered (a+, a-, b) in gradients and Hessians. Its two-layer form: d inputs, 2d hidden
units with first-layer weights fixed to +-e_i, biases tied to b, second-layer weights tied to a+ and a-; a general
two-layer kernel would spend 2d multiply-adds per unit on that fixed layer. The native kernel
(csrc/twolayer/shared_bias.cpp) instead sorts each sample once, after which a step costs O(n), not O(n d).

Every function works on an ensemble of E members, each with its own parameters and its own data set ``dataset[e]``
among D: X [D, n, d] ([n, d] for one), y [D, n] ([n]). float64 throughout. numpy twin:
``physai.twolayer.reference.shared_bias_*``.

    import numpy as np
    from physai.twolayer import shared_bias
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((300, 200)), rng.choice([-1.0, 1.0], 300)
    run = shared_bias.train(X, y, a_plus=[0.05], a_minus=[-0.05], b=[0.0], lr=[1e-3], steps=[1000])
    run.b, run.sharpness[-1]          # final bias [E]; top Hessian eigenvalue at the last record [E]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from physai import _core
from physai._checks import as_array, as_integer_array, check_array
from physai._records import ArrayRecord


def _data(X, y):
    X = as_array(X, "X", np.float64)
    if X.ndim == 2:
        X = X[None]
    if X.ndim != 3 or 0 in X.shape:
        raise ValueError(f"X: expected a non-empty [n, d] or [D, n, d] array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X: expected finite values")
    y = as_array(y, "y", np.float64)
    if y.ndim == 1:
        y = y[None]
    check_array(y, "y", shape=X.shape[:2])
    if not np.isin(y, (-1.0, 1.0)).all():
        raise ValueError("y: expected labels -1 or +1 (the logistic loss of y f); map 0/1 labels with 2 y - 1")
    return X, y


def _parameters(a_plus, a_minus, b, finite: bool = True):
    a_plus = as_array(a_plus, "a_plus", np.float64)
    check_array(a_plus, "a_plus", ndim=1)
    E = a_plus.shape[0]
    a_minus = check_array(as_array(a_minus, "a_minus", np.float64), "a_minus", shape=(E,))
    b = check_array(as_array(b, "b", np.float64), "b", shape=(E,))
    for name, value in (("a_plus", a_plus), ("a_minus", a_minus), ("b", b)):
        if finite and not np.isfinite(value).all():
            raise ValueError(f"{name}: expected finite values")
    return a_plus, a_minus, b


def _members(a_plus, a_minus, b, dataset, D: int):
    a_plus, a_minus, b = _parameters(a_plus, a_minus, b)
    E = a_plus.shape[0]
    if dataset is None:
        if D != 1:
            raise ValueError(f"dataset: required with D = {D} data sets (which one each member trains on)")
        dataset = np.zeros(E, np.int64)
    dataset = check_array(as_integer_array(dataset, "dataset"), "dataset", shape=(E,))
    if E and (dataset.min() < 0 or dataset.max() >= D):
        raise ValueError(f"dataset: expected indices in [0, {D}), got {dataset.min()}..{dataset.max()}")
    # copies: the kernel updates the parameters in place
    return a_plus.copy(), a_minus.copy(), b.copy(), dataset


def output(X, a_plus, a_minus, b) -> np.ndarray:
    """f(x) of every member on every sample: X [n, d], parameters a_plus, a_minus, b [E] -> [E, n] (float64), by
    direct sums (numpy; non-finite parameters give non-finite outputs). Raises ValueError/TypeError naming a
    mis-shaped or non-real argument."""
    X = as_array(X, "X", np.float64)
    check_array(X, "X", ndim=2)
    a_plus, a_minus, b = _parameters(a_plus, a_minus, b, finite=False)
    from physai.twolayer.reference import shared_bias_output

    return shared_bias_output(X[None], a_plus, a_minus, b)


def loss_grad_hessian(X, y, a_plus, a_minus, b, dataset=None):
    """The mean logistic loss [E], its gradient [E, 3] and its Hessian [E, 3, 3] in (a+, a-, b) of every member on
    its data set, float64: X [n, d] or [D, n, d], y [n] or [D, n] (labels -1/+1), a_plus, a_minus, b [E] (finite). The Hessian is that of the network almost everywhere: f is linear in (a+, a-) and
    piecewise linear in b (d2f/db2 = 0; d2f/da+-db = N+-, the active units of each sign). ``dataset`` [E] (int) picks
    each member's data set; it may be omitted when D = 1. Raises ValueError/TypeError naming a bad argument (labels
    other than -1/+1, non-finite X, mismatched shapes)."""
    X, y = _data(X, y)
    a_plus, a_minus, b, dataset = _members(a_plus, a_minus, b, dataset, X.shape[0])
    return _core.twolayer.shared_bias_evaluate(X, y, a_plus, a_minus, b, dataset)


@dataclass
class SharedBiasRun(ArrayRecord):
    """What ``train`` returns: the final a_plus, a_minus, b [E]; the records taken before step record_steps [K, E]
    (int64; a member's own steps count after its last update): loss [K, E], params [K, E, 3] (a+, a-, b),
    hessian [K, E, 3, 3]."""

    a_plus: np.ndarray
    a_minus: np.ndarray
    b: np.ndarray
    record_steps: np.ndarray
    loss: np.ndarray
    params: np.ndarray
    hessian: np.ndarray

    @property
    def sharpness(self) -> np.ndarray:
        """[K, E] the top Hessian eigenvalue at every record (NaN where the member diverged)."""
        finite = np.isfinite(self.hessian).all(axis=(-2, -1))
        top = np.full(self.loss.shape, np.nan)
        top[finite] = np.linalg.eigvalsh(self.hessian[finite])[..., -1]
        return top


def train(X, y, a_plus, a_minus, b, lr, steps, record_steps=None, dataset=None) -> SharedBiasRun:
    """Full-batch gradient descent, all members in one native call: member e takes ``steps[e]`` steps of size
    ``lr[e]`` (each member its own horizon, e.g. ceil(time / lr) for the same total time), from (a_plus[e],
    a_minus[e], b[e]) on data set ``dataset[e]``. X [n, d] or [D, n, d], y [n] or [D, n] (labels -1/+1); a_plus,
    a_minus, b, lr [E] (float), steps and dataset [E] (int). The inputs are not modified; the native call cannot be
    interrupted, so choose steps that finish (about 10 us a step at n = 300 on one core).

    ``record_steps`` [K, E] (int, default [[0]*E, steps]): the steps before which each member's loss, parameters and
    Hessian are recorded, each in [0, steps[e]] (steps[e] records the final state). Members run in parallel, one
    task each; a member's values do not depend on the thread count or on the rest of the ensemble. The logistic
    loss's gradient is bounded, so a rate far past the edge of stability does not overflow: it throws the bias below
    every coordinate, where all units are dead. Raises ValueError/TypeError naming a bad argument."""
    X, y = _data(X, y)
    a_plus, a_minus, b, dataset = _members(a_plus, a_minus, b, dataset, X.shape[0])
    E = a_plus.shape[0]
    lr = check_array(as_array(lr, "lr", np.float64), "lr", shape=(E,))
    if not (np.isfinite(lr).all() and (lr > 0).all()):
        raise ValueError("lr: expected finite positive learning rates")
    steps = check_array(as_integer_array(steps, "steps"), "steps", shape=(E,))
    if (steps < 0).any():
        raise ValueError("steps: expected counts >= 0")
    if record_steps is None:
        record_steps = np.stack([np.zeros(E, np.int64), steps])
    record_steps = check_array(as_integer_array(record_steps, "record_steps"), "record_steps", shape=(None, E))
    if ((record_steps < 0) | (record_steps > steps)).any():
        raise ValueError("record_steps: expected every step in [0, steps] of its member")
    loss, params, hessian = _core.twolayer.shared_bias_train(X, y, a_plus, a_minus, b, dataset, lr, steps,
                                                             record_steps)
    return SharedBiasRun(a_plus, a_minus, b, record_steps, loss, params, hessian)
