"""Threshold neurons on sparse coding: the mean model's map against its closed form and its threshold
eta* = 8 pi / d^2, the shared-bias network against the mean model where they coincide exactly, and the paper's phase
transition at eta* in the paper's Figure 1 setting (d = 200, n = 300, lam = 3)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_saves_and_loads

from physai.experiments.threshold import (ThresholdConfig, ThresholdResult, eta_star, mean_model_bias_bound,
                                          mean_model_loss, mean_model_step, run, sparse_coding_data,
                                          zero_bias_accuracy, _g)
from physai.twolayer import shared_bias

TINY = ThresholdConfig(lr_multipliers=(0.5, 2.0), d=8, n=40, n_test=50, seeds=2, records=5, time=0.2)


@pytest.fixture(scope="module")
def small():
    return run(ThresholdConfig.small())


def test_sparse_coding_data_is_the_papers_eq_1():
    """Each row is lam y e_j + N(0, I): exactly one coordinate carries the signal, so x - lam y e_j is Gaussian;
    recovering j as the coordinate most aligned with y, the residual's mean and variance match N(0, 1) within
    5 standard errors."""
    rng = np.random.default_rng(3)
    X, y = sparse_coding_data(4000, 20, 6.0, rng)
    assert set(np.unique(y)) == {-1.0, 1.0}
    j = np.argmax(X * y[:, None], axis=1)  # at lam = 6 the signal coordinate is the largest (error < 1e-4)
    noise = X.copy()
    noise[np.arange(4000), j] -= 6.0 * y
    size = noise.size
    assert abs(noise.mean()) < 5 / math.sqrt(size) and abs(noise.var() - 1) < 5 * math.sqrt(2 / size)


def test_mean_model_map_is_gd_on_its_closed_form_loss():
    """One step of ``mean_model_step`` equals one GD step, by torch autograd, on the tied-weight population loss
    L(a+, a-, b) = l_sym((a+ + a-) d h(b)), h(b) = E ReLU(xi + b) = b Phi(b) + phi(b), from a+ = a- = a; and
    ``mean_model_loss`` is that loss."""
    torch = pytest.importorskip("torch")
    d = 50
    for a, b, eta in [(0.01, 0.0, 0.7 * eta_star(d)), (-0.03, -0.4, 2.5 * eta_star(d)), (0.2, 0.3, 1e-3)]:
        theta = torch.tensor([a, a, b], dtype=torch.float64, requires_grad=True)
        bt = theta[2]
        h = bt * torch.special.ndtr(bt) + torch.exp(-bt**2 / 2) / math.sqrt(2 * math.pi)
        s = (theta[0] + theta[1]) * d * h
        loss = 0.5 * (torch.nn.functional.softplus(-s) + torch.nn.functional.softplus(s))
        (grad,) = torch.autograd.grad(loss, theta)
        new = theta.detach().numpy() - eta * grad.numpy()
        a1, b1 = mean_model_step(a, b, eta, d)
        assert new[0] == pytest.approx(new[1], rel=1e-14)
        assert float(a1) == pytest.approx(new[0], rel=1e-12, abs=1e-16)
        assert float(b1) == pytest.approx(new[2], rel=1e-12, abs=1e-16)
        assert float(mean_model_loss(a, b, d)) == pytest.approx(loss.item(), rel=1e-13)


@pytest.mark.parametrize("multiplier", [0.8, 1.25])
def test_mean_model_linear_stability_threshold_is_8_pi_over_d_squared(multiplier):
    """Near a = 0, b = 0 the map is a' = (1 - eta d^2 g(0)^2 / 8) a with g(0) = sqrt(2 / pi): |ratio| < 1 exactly
    when eta < 8 pi / d^2, the paper's eta*."""
    d = 200
    eta = multiplier * eta_star(d)
    a, b = mean_model_step(1e-8, 0.0, eta, d)
    expected = 1 - eta * d**2 * (2 / math.pi) / 8
    assert a / 1e-8 == pytest.approx(expected, rel=1e-6)
    assert (abs(a / 1e-8) < 1) == (multiplier < 1)
    assert eta_star(200) == pytest.approx(8 * math.pi / 200**2) == pytest.approx(6.283e-4, rel=1e-3)


def test_tied_network_follows_the_mean_model_exactly():
    """The mean model is the shared-bias network on the population loss with the signal neglected. A signal-free data
    set in which every row is a signed cyclic shift of one vector v, each label seeing every shift of v and of -v,
    makes the network's mean loss exactly l_sym((a+ + a-) d h_v(b)) and keeps a+ = a-, so native GD on it is the mean
    model's map with g the empirical g_v, up to rounding, on both sides of the threshold."""
    d = 6
    v = np.array([-1.3, -0.4, 0.2, 0.7, 1.1, 2.0])
    rows = np.array([np.roll(s * v, r) for s in (1, -1) for r in range(d)])
    X = np.concatenate([rows, rows])
    y = np.concatenate([np.ones(2 * d), -np.ones(2 * d)])

    def g_empirical(b):
        b = np.asarray(b)[..., None]
        return (np.maximum(v + b, 0) + np.maximum(b - v, 0)).mean(-1), ((v + b > 0).astype(float) + (b - v > 0)).mean(-1)

    critical = 16 / (d**2 * g_empirical(0.0)[0] ** 2)  # |1 - eta d^2 g_v^2 / 8| < 1 at a = 0, b = 0
    eta = np.array([0.5, 2.0]) * critical
    steps = 30
    a0, b0 = np.array([0.02, 0.02]), np.array([-0.05, -0.05])
    records = np.repeat(np.arange(steps + 1)[:, None], 2, axis=1)
    trained = shared_bias.train(X, y, a0, a0, b0, eta, [steps, steps], records)
    a, b = a0.copy(), b0.copy()
    for t in range(steps + 1):
        np.testing.assert_allclose(trained.params[t, :, 0], a, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(trained.params[t, :, 1], a, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(trained.params[t, :, 2], b, rtol=1e-11, atol=1e-14)
        a, b = mean_model_step(a, b, eta, d, g=g_empirical)
    # below the threshold a decays and b moves by O(eta a0^2 d^2); above it the oscillating a pushes b down by O(1)
    final = trained.params[-1, :, 2]
    assert final[1] < b0[1] - 0.5 and abs(final[0] - b0[0]) < 0.01 * abs(final[1] - b0[1])


@pytest.mark.parametrize("multiplier", [1.25, 2.0, 4.0])
def test_mean_model_ends_below_its_stability_bound(multiplier):
    """Above eta* the mean model's oscillation stops only once d^2 g(b)^2 / 8 < 2 / eta: its final bias lies below
    ``mean_model_bias_bound`` (the root of g(b) = g(0) sqrt(eta* / eta)), and not far: it passes the bound by the
    last oscillating step's move, measured 0.0006-0.018 from 1.05 to 19 eta* (0.02 allowed)."""
    d = 200
    eta = multiplier * eta_star(d)
    bound = mean_model_bias_bound(eta, d)
    assert float(_g(bound)[0]) == pytest.approx(float(_g(0.0)[0]) * math.sqrt(1 / multiplier), rel=1e-10)
    a, b = np.array(0.01), np.array(0.0)
    for _ in range(int(math.ceil(10 / eta))):
        a, b = mean_model_step(a, b, eta, d)
    assert bound - 0.02 < b <= bound
    assert mean_model_bias_bound(0.9 * eta_star(d), d) == 0.0


def _seed_mean_and_error(values):
    """Mean over seeds (last axis) and its standard error."""
    return values.mean(-1), values.std(-1, ddof=1) / math.sqrt(values.shape[-1])


def test_bias_transition_at_eta_star(small):
    """The paper's Figure 1 setting at 0.5, 0.8, 1.25, 2, 3 eta*. The bias that gradient flow learns from the signal
    in time 10 (-0.18 here) is the same at every rate below the transition, so the transition is read per seed from
    the drop db = b(eta) - b(0.5 eta*). Below eta* (0.8) the mean model predicts no drop: |db| < 0.01 on every seed
    (measured 7e-4), an order of magnitude below the smallest drop above eta* on any seed (0.06 at 1.25 eta*).
    Above eta* the seed-mean drop is below zero by more than 3 standard errors over seeds (measured -0.10 +- 0.018
    at 1.25 eta*) and grows with eta. So the bias turns negative between 0.8 and 1.25 eta*, within a factor 1.5 of
    eta*."""
    m = np.array(small.config.lr_multipliers)
    drop = small.final_bias - small.final_bias[0]
    assert m[0] == 0.5 and 1 / 1.5 < m[1] < 1 < m[2] < 1.5
    assert np.abs(drop[1]).max() < 0.01
    mean_drop, error = _seed_mean_and_error(drop)
    assert (mean_drop[2:] + 3 * error[2:] < 0).all()
    assert (np.diff(mean_drop[1:]) < 0).all()
    # the mean model, from b = 0, shows the same transition without the signal's share: no drop below eta*, and
    # above it a final bias below its stability bound (within the 0.02 of one overshooting step; measured 0.003)
    mean_model = small.final_mean_model_bias.mean(axis=1)
    bounds = np.array([mean_model_bias_bound(lr, small.config.d) for lr in small.config.learning_rates])
    assert np.abs(mean_model[m < 1]).max() < 0.01
    assert ((mean_model <= bounds) & (mean_model > bounds - 0.02))[m > 1].all()


def test_test_accuracy_rises_above_zero_bias_baseline(small):
    """At the largest rate (3 eta*) the seed-mean test accuracy beats Phi(lam / sqrt(d)) = 0.584 by more than 3
    standard errors (the larger of the seed scatter and the binomial error of 4 x 4000 test samples; measured 0.615);
    below eta* it does not (measured 0.581)."""
    config = small.config
    baseline = zero_bias_accuracy(config.lam, config.d)
    binomial = math.sqrt(baseline * (1 - baseline) / (config.n_test * config.seeds))
    accuracy, error = _seed_mean_and_error(small.test_accuracy)
    error = np.maximum(error, binomial)
    m = np.array(config.lr_multipliers)
    assert accuracy[-1] - 3 * error[-1] > baseline
    assert (accuracy[m < 1] < baseline + 3 * error[m < 1]).all()


def test_sharpness_reaches_two_over_eta_only_above_eta_star(small):
    """The edge of stability: below eta* the largest recorded sharpness stays below 2 / eta (measured at most
    0.82 of it at 0.8 eta*); above, it reaches 2 / eta on every seed. The records sample an oscillation about
    2 / eta whose recorded maxima scatter by about 1% (measured 0.993-1.009 times it at 1.25 eta*, up to 2.2 where
    the rate exceeds 2 / sharpness at init): 0.95 allowed."""
    config = small.config
    lrs = config.learning_rates[:, None]
    peak = small.sharpness.max(axis=0) * lrs / 2
    m = np.array(config.lr_multipliers)
    assert (peak[m < 1] < 1).all() and (peak[m > 1] > 0.95).all()


def test_same_seed_same_bits_and_protocol():
    first, second = run(TINY), run(TINY)
    for name in ("final_bias", "bias", "loss", "sharpness", "test_accuracy", "mean_model_bias"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    iterations = np.ceil(0.2 / TINY.learning_rates - 1e-9).astype(int)
    assert first.bias.shape == (TINY.records, 2, 2)
    np.testing.assert_array_equal(first.record_steps[-1], np.repeat(iterations[:, None], 2, axis=1))
    np.testing.assert_array_equal(first.record_steps[0], 0)
    np.testing.assert_array_equal(first.bias[-1], first.final_bias)
    rows = first.summary()
    assert len(rows) == 2 and rows[0]["lr_over_eta_star"] == 0.5 and rows[0]["iterations"] == iterations[0]
    assert rows[0]["lr"] == pytest.approx(0.5 * eta_star(TINY.d))
    assert first.trajectories()["bias"][0] == ("record", "member", "seed")


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip_bit_for_bit(tmp_path, suffix):
    assert_saves_and_loads(run(TINY), tmp_path / ("threshold" + suffix))


def test_figure1_is_the_papers_axis():
    config = ThresholdConfig.figure1()
    assert (config.d, config.n, config.lam, config.init_std, config.time) == (200, 300, 3.0, None, 10.0)
    np.testing.assert_allclose(config.learning_rates[[0, -1]], [0.3 * eta_star(200), 0.012], rtol=1e-12)
    default = ThresholdConfig()
    np.testing.assert_allclose(default.learning_rates[[0, -1]], [0.3 * eta_star(200), 3 * eta_star(200)], rtol=1e-12)


@pytest.mark.parametrize("change, name", [
    (dict(lr_multipliers=()), "lr_multipliers"), (dict(lr_multipliers=(0.0,)), "lr_multipliers"),
    (dict(d=0), "d"), (dict(n=0), "n"), (dict(seeds=0), "seeds"), (dict(time=-1.0), "time"),
    (dict(lam=-1.0), "lam"), (dict(init_std=math.nan), "init_std"), (dict(records=1), "records"),
    (dict(lr_multipliers=(1e-300,)), "lr_multipliers"), (dict(lr_multipliers=(1.0,), time=1e8), "lr_multipliers"),
])
def test_bad_config_names_the_field(change, name):
    with pytest.raises(ValueError, match=name):
        TINY.replace(**change)


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="d"):
        eta_star(2.5)
    with pytest.raises(ValueError, match="eta"):
        mean_model_bias_bound(-1.0, 10)


def test_plugs_into_the_sweep_folding_learning_rates(tmp_path):
    pytest.importorskip("zarr")
    from physai import sweep

    ds = sweep.run(TINY.replace(lr_multipliers=(0.5,)), sweep.grid(lr_multiplier=[0.5, 2.0]),
                   out=str(tmp_path / "t.zarr"))
    assert (ds["status"].values == 1).all()
    np.testing.assert_array_equal(ds["final_bias"].values, run(TINY).final_bias.mean(axis=1))


def test_cli_writes_json_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    out = subprocess.run([sys.executable, "-m", "physai", "threshold", "--lr-multipliers", "0.5", "2", "--d", "8",
                          "--n", "40", "--n-test", "50", "--seeds", "2", "--records", "3", "--time", "0.2",
                          "--json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")],
                         capture_output=True, text=True, check=True).stdout
    assert "eta* = 8 pi / d^2" in out
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["final_bias"]["shape"] == [2, 2]
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
