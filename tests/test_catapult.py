"""The catapult phase: the warm-up model's map against its closed form, lambda0 against the native Hessian, the
three phases of wide two-layer nets and the 1/width change of the curvature in the lazy phase."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_saves_and_loads
from hypothesis import given, settings
from hypothesis import strategies as st

from physai.experiments.catapult import (PHASES, CatapultConfig, CatapultResult, make_task,
                                         ntk_top_eigenvalue, run, warmup_closed_form, warmup_observables, warmup_step)
from physai.twolayer import TwoLayer

TINY = CatapultConfig(activations=("relu",), lr_factors=(1.0, 3.0, 20.0), width=32, n=8, d=3, steps=30,
                      track_every=7)


@pytest.fixture(scope="module")
def small():
    return run(CatapultConfig.small())


@pytest.mark.parametrize("n", [1, 3, 50])
def test_warmup_map_equals_closed_form(n):
    rng = np.random.default_rng(n)
    u, v = rng.standard_normal((6, n)), rng.standard_normal((6, n))
    y = np.array([0.0, 1.0, -2.0, 0.5, 3.0, 0.0])
    eta = np.array([0.1, 0.5, 1.0, 2.0, 0.05, 3.0])
    f, lam = warmup_observables(u, v)
    for _ in range(3):
        u, v = warmup_step(u, v, y, eta)
        f, lam = warmup_closed_form(f, lam, y, eta, n)
        f_direct, lam_direct = warmup_observables(u, v)
        np.testing.assert_allclose(f, f_direct, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(lam, lam_direct, rtol=1e-10, atol=1e-12)


@settings(max_examples=60)
@given(n=st.integers(1, 64), eta=st.floats(1e-3, 3.0), y=st.floats(-3.0, 3.0), seed=st.integers(0, 2**32 - 1))
def test_warmup_map_equals_closed_form_property(n, eta, y, seed):
    rng = np.random.default_rng(seed)
    u, v = rng.standard_normal(n), rng.standard_normal(n)
    f, lam = warmup_closed_form(*warmup_observables(u, v), y, eta, n)
    f_direct, lam_direct = warmup_observables(*warmup_step(u, v, y, eta))
    scale = 1 + abs(f) + lam + eta**2 * lam**2
    assert abs(f - f_direct) <= 1e-12 * scale * (1 + abs(y)) ** 3
    assert abs(lam - lam_direct) <= 1e-12 * scale * (1 + abs(y)) ** 2


def test_warmup_model_phases():
    """In the warm-up model eta_max lambda0 = 4 (Lewkowycz et al. 2020, section 2): from f0 ~ 0 with y = 1 at large
    n, GD converges with lambda nearly unchanged below 2, converges with lambda_T < 2 / eta between 2 and 4, and
    diverges above 4."""
    n = 10_000
    rng = np.random.default_rng(0)
    u0, v0 = rng.standard_normal(n), rng.standard_normal(n)
    _, lam0 = warmup_observables(u0, v0)
    for factor, phase in [(1.0, "lazy"), (3.0, "catapult"), (4.5, "divergent")]:
        u, v = u0.copy(), v0.copy()
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(400):
                u, v = warmup_step(u, v, 1.0, factor / lam0)
            f, lam = warmup_observables(u, v)
        if phase == "divergent":
            assert not abs(f - 1) < 1e-3
            continue
        assert abs(f - 1) < 1e-6
        if phase == "lazy":
            # each step moves lambda by (eta / n) r (eta lambda r - 4 f), r shrinking geometrically from O(1): O(1/n)
            assert abs(lam / lam0 - 1) < 10 / n
        else:
            assert lam < 2 / (factor / lam0) and lam < lam0


def test_lam0_is_the_top_hessian_eigenvalue_at_zero_residual():
    """With targets equal to the outputs the MSE Hessian is its Gauss-Newton part J^T J / n, whose nonzero spectrum is
    that of Theta / n: the native Lanczos sharpness is an independent check of the analytic NTK's top eigenvalue."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((12, 4))
    for activation in ("linear", "relu", "tanh"):
        net = TwoLayer(4, 40, 1, activation, "ntk", bias=False, ensemble=2, dtype=np.float64, seed=5)
        Y = net.forward(X)
        lam = ntk_top_eigenvalue(net, X)
        sharp = net.sharpness(X, Y, tol=1e-10).values[:, 0]
        np.testing.assert_allclose(lam, sharp, rtol=1e-8)


def test_one_rate_per_phase_is_classified(small):
    factors = list(small.config.lr_factors)
    phases = small.phases()
    for i in range(len(small.config.activations)):
        assert PHASES[phases[i, factors.index(1.0)]] == "lazy"
        assert PHASES[phases[i, factors.index(3.0)]] == "catapult"
        assert PHASES[phases[i, factors.index(8.0)]] == "divergent"


def test_catapult_lands_flatter_than_two_over_eta(small):
    lrs = small.learning_rates()
    rows = small.summary()
    catapults = [r for r in rows if r["phase"] == "catapult"]
    assert catapults
    for r in catapults:
        assert r["lam_T"] < 2 / r["lr"] and r["lam_T"] < r["lam0"]
        if r["lr_factor"] >= 2.6:  # just above 2 the unstable mode starts small and may peak below the initial loss
            assert r["max_loss"] > small.losses[small.config.activations.index(r["activation"]), 0].max()
    # the loss spike of a catapult is measured in steps; the lazy phase has none
    steps = small.catapult_steps()
    assert (steps[small.phases() == 0] == 0).all() and (steps[small.phases() == 1] > 0).all()
    assert lrs.shape == (2, len(small.config.lr_factors))


def test_measured_phase_boundaries(small):
    """The lazy/catapult boundary is at eta lambda0 = 2 to within the grid (1.9 lazy, 2.2 catapult); eta_max lambda0
    is measured between the last converging and the first diverging grid value, above 2 and below the paper's
    deep-ReLU value of 12."""
    for bound in small.boundaries().values():
        assert 1.9 <= bound["lazy_catapult"] <= 2.2
        assert 2 < bound["max_low"] < bound["max_high"] <= 12


def test_lazy_curvature_change_shrinks_as_one_over_width():
    """Below eta lambda0 = 2 the relative change of lambda is a few percent and O(1/width): the warm-up map changes
    lambda by (eta / n)(f - y)^2 (...) per step, a convergent sum of O(1/width) terms (Lewkowycz et al. 2020,
    section 2; Dyer & Gur-Ari 2019). Widths 256 and 1024: ratio 4 for 1/m, 2 for 1/sqrt(m); factor 1.5 allowed."""
    changes = {}
    for width in (256, 1024):
        rel = []
        for seed in range(6):
            result = run(CatapultConfig(activations=("relu",), lr_factors=(1.0,), width=width, n=32, d=8, steps=150,
                                        track_every=150, seed=seed))
            rel.append(abs(result.curvature[0, -1, 0] / result.lam0[0] - 1))
        changes[width] = np.mean(rel)
    assert changes[256] < 0.1
    ratio = changes[256] / changes[1024]
    assert 4 / 1.5 <= ratio <= 4 * 1.5


def test_same_seed_same_bits_and_protocol():
    first, second = run(TINY), run(TINY)
    for name in ("lam0", "losses", "final_loss", "curvature"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    np.testing.assert_array_equal(first.curvature_steps, [0, 7, 14, 21, 28, 30])
    assert first.losses.shape == (1, 30, 3) and first.curvature.shape == (1, 6, 3)
    rows = first.summary()
    assert len(rows) == 3 and rows[2]["phase"] == "divergent" and math.isnan(rows[2]["lam_T"])
    X, Y = make_task(TINY)
    assert X.shape == (8, 3) and set(np.unique(Y)) <= {-1.0, 1.0}


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip_bit_for_bit(tmp_path, suffix):
    result = run(TINY)
    assert not np.isfinite(result.losses).all()
    assert_saves_and_loads(result, tmp_path / ("catapult" + suffix))



@pytest.mark.parametrize("change, name", [
    (dict(activations=()), "activations"), (dict(activations=("sigmoid",)), "activations"),
    (dict(lr_factors=()), "lr_factors"), (dict(lr_factors=(0.0,)), "lr_factors"),
    (dict(lr_factors=(2.0, 1.0)), "lr_factors"), (dict(width=0), "width"), (dict(steps=0), "steps"),
    (dict(track_every=0), "track_every"), (dict(n=0), "n"),
])
def test_bad_config_names_the_field(change, name):
    with pytest.raises(ValueError, match=name):
        TINY.replace(**change)


def test_bad_warmup_arguments():
    with pytest.raises(ValueError, match="u, v"):
        warmup_observables(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="n"):
        warmup_closed_form(0.0, 1.0, 1.0, 0.1, 0)
    net = TwoLayer(3, 4, 2, "relu", "ntk", dtype=np.float64)
    with pytest.raises(ValueError, match="k = 2"):
        ntk_top_eigenvalue(net, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="X"):
        ntk_top_eigenvalue(TwoLayer(3, 4, 1, "relu", "ntk", dtype=np.float64), np.zeros((5, 2)))


def test_plugs_into_the_sweep_folding_learning_rates(tmp_path):
    pytest.importorskip("zarr")
    from physai import sweep

    ds = sweep.run(TINY.replace(lr_factors=(1.0,)), sweep.grid(lr_factor=[1.0, 3.0, 20.0]),
                   out=str(tmp_path / "c.zarr"))
    assert (ds["status"].values == 1).all()
    assert list(ds["phase"].values) == [row["phase"] for row in run(TINY).summary()]


def test_cli_writes_json_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    out = subprocess.run([sys.executable, "-m", "physai", "catapult", "--activations", "relu", "--lr-factors", "1",
                          "3", "20", "--width", "32", "--n", "8", "--d", "3", "--steps", "30", "--track-every", "7",
                          "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")],
                         capture_output=True, text=True, check=True).stdout
    assert "eta_max lambda0" in out
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["losses"]["shape"] == [1, 30, 3]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
