import os
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import physai
from physai.twolayer import ACTIVATIONS, LOSSES, PARAMETERIZATIONS, TwoLayer

# A `pytest` script from another environment imports whichever physai that environment has installed (in a venv
# made with --system-site-packages, an editable install of another checkout): these tests would then judge that
# code, not this tree's. Stop at once instead.
_HERE = pathlib.Path(__file__).resolve().parents[1]
if pathlib.Path(physai.__file__).resolve().parents[1] != _HERE:
    pytest.exit(f"physai is imported from {pathlib.Path(physai.__file__).parent}, not from this checkout ({_HERE}): "
                f"install it here with pip install -e \".[test]\" and run this environment's pytest", returncode=4)

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def assert_saves_and_loads(result, path):
    """``result`` (an experiment result) written to ``path`` (.json or .npz) reads back equal: the same config, every
    array field bit for bit with its dtype (NaN and infinities included), every other field equal; JSON files hold
    standard JSON only (no NaN/Infinity tokens)."""
    import dataclasses
    import json

    result.save(path)
    if path.suffix == ".json":
        json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))
    loaded = type(result).load(path)
    assert loaded.config == result.config
    for field in dataclasses.fields(result):
        mine, theirs = getattr(result, field.name), getattr(loaded, field.name)
        if isinstance(mine, np.ndarray):
            np.testing.assert_array_equal(theirs, mine)
            assert theirs.dtype == mine.dtype, field.name
        elif field.name != "config":
            assert theirs == mine, field.name
    return loaded


@pytest.fixture(scope="module")
def single_torch_thread():
    """For modules of tiny torch models: torch's intra-op threads only add barrier overhead there (severe on a loaded
    machine). Use with ``pytestmark = pytest.mark.usefixtures("single_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- tolerances -------------------------------------------------------------------------------------------------
# One rule for every float comparison, after flash-attention's tests: a fast result and its reference twin (run in
# the same dtype) are each compared with a truth computed in higher precision (the twin in long double), and the
# fast result's error may be at most FACTOR times the twin's own error, plus ULPS units of the dtype's epsilon times
# the truth's magnitude (for results the twin happens to get exactly). So a tolerance follows the dtype and the
# conditioning of each case instead of being tuned by hand. Measured over the two-layer tests (forward, gradients
# and HVPs, every activation, loss, parameterization and vector width): native and twin each stay within 6 ulps of
# the magnitude, and the native error never exceeds twice the twin's plus 4 ulps; where a result is a sum that
# cancels (small random shapes found by hypothesis) the twin can be exact by luck while the native result is 13 ulps
# off. ULPS leaves a margin over that.
TRUTH_DTYPE = np.longdouble
FACTOR = 2
ULPS = 24


def _pairs(actual, expected):
    """Flatten matching (nested) tuples of arrays, with None for an absent bias."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            yield from _pairs(a, e)
    else:
        assert (actual is None) == (expected is None)
        if expected is not None:
            yield np.asarray(actual), np.asarray(expected)


def assert_as_accurate_as_reference(native, reference, truth, dtype, what=""):
    """``native`` and ``reference`` (arrays, or tuples of arrays and None) computed in ``dtype``, ``truth`` in
    higher precision: max |native - truth| <= FACTOR max |reference - truth| + ULPS eps(dtype) max |truth|."""
    eps = np.finfo(dtype).eps
    for i, ((n, t), (r, _)) in enumerate(zip(_pairs(native, truth), _pairs(reference, truth))):
        t = t.astype(TRUTH_DTYPE)
        native_error = float(np.abs(n.astype(TRUTH_DTYPE) - t).max(initial=0))
        reference_error = float(np.abs(r.astype(TRUTH_DTYPE) - t).max(initial=0))
        bound = FACTOR * reference_error + ULPS * eps * float(np.abs(t).max(initial=0))
        assert native_error <= bound, (f"{what} [{i}]: native error {native_error:.3g} > {bound:.3g} (reference error "
                                       f"{reference_error:.3g}, {np.dtype(dtype).name})")


def assert_close(actual, expected, dtype=np.float64, what="", relative=False, condition=1.0):
    """Where no twin's error is at hand (two independent computations in ``dtype``, e.g. the numpy twin against
    torch autograd, each within ULPS of the magnitude): within 4 ULPS eps(dtype) of the expected array's magnitude,
    entry by entry, as scipy's tests bound by multiples of machine epsilon; with ``relative``, of each entry's own
    magnitude (tails of functions that are accurate to the last bits however small). ``condition`` widens the bound
    for results both computations reach by cancellation (the ratio of the terms' magnitude to the result's)."""
    scale = 4 * ULPS * np.finfo(dtype).eps * condition
    for i, (a, e) in enumerate(_pairs(actual, expected)):
        atol = 0.0 if relative else scale * np.abs(e).max(initial=0)
        np.testing.assert_allclose(a, e, rtol=scale, atol=atol, err_msg=f"{what} [{i}]")


def ulps(dtype, count: int) -> float:
    """``count`` units of ``dtype``'s machine epsilon."""
    return count * float(np.finfo(dtype).eps)


# --- two-layer problems -----------------------------------------------------------------------------------------
GRID = [(act, loss, param) for act in ACTIVATIONS for loss in LOSSES for param in PARAMETERIZATIONS]


def make_problem(activation="tanh", loss="mse", param="standard", dtype=np.float64, E=2, n=13, d=5, m=7, k=3,
                 bias=True, per_member_x=False, per_member_y=False, seed=0):
    """A two-layer ensemble with random biases, inputs X, targets Y suited to ``loss`` (labels +-1 for logistic,
    one-hot rows for cross-entropy) and a random direction (vW, vb, va)."""
    net = TwoLayer(d, m, k, activation, param, bias=bias, ensemble=E, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    if bias:
        net.b[:] = 0.3 * rng.standard_normal(net.b.shape)
    X = rng.standard_normal((E, n, d) if per_member_x else (n, d)).astype(dtype)
    yshape = (E, n, k) if per_member_y else (n, k)
    if loss == "logistic":
        Y = np.sign(rng.standard_normal(yshape)).astype(dtype)
    elif loss == "cross_entropy":
        Y = np.eye(k, dtype=dtype)[rng.integers(0, k, yshape[:-1])]
    else:
        Y = rng.standard_normal(yshape).astype(dtype)
    direction = tuple(None if p is None else rng.standard_normal(p.shape).astype(dtype) for p in (net.W, net.b, net.a))
    return net, X, Y, direction


def labels(loss, rng, n, k):
    """Targets [n, k] suited to ``loss``: labels +-1 (logistic), one-hot rows with weights in [0.5, 1.5)
    (cross-entropy, unnormalized on purpose), standard normal (mse)."""
    if loss == "logistic":
        return rng.choice([-1.0, 1.0], size=(n, k))
    if loss == "cross_entropy":
        return np.eye(k)[rng.integers(0, k, n)] * rng.uniform(0.5, 1.5, (n, 1))
    return rng.normal(size=(n, k))


def copy_params(p):
    """The starting point of a run, kept apart from the model's arrays, which training updates in place."""
    return p._replace(W=p.W.copy(), b=None if p.b is None else p.b.copy(), a=p.a.copy())


def in_dtype(p, dtype, *arrays):
    """Reference parameters and arrays (None kept) cast to ``dtype``: the twin run in another precision."""
    cast = lambda x: None if x is None else (tuple(map(cast, x)) if isinstance(x, tuple) else x.astype(dtype))  # noqa: E731
    return (p._replace(W=cast(p.W), b=cast(p.b), a=cast(p.a)), *map(cast, arrays))
