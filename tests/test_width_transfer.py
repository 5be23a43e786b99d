"""Width transfer under muP: flat coordinate check, a best learning rate that stays put, wider is better; the
standard parameterization as the contrast."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_saves_and_loads

from physai.experiments.width_transfer import (LAYERS, WidthTransferConfig, WidthTransferResult, coordinate_check,
                                               layer_coordinates, make_task, run)
from physai.twolayer import TwoLayer
from physai.twolayer.reference import activation

TINY = WidthTransferConfig(parameterizations=("mup", "standard"), widths=(16, 32), learning_rates=(0.5, 1e4),
                           seeds=2, steps=40, n=24, coord_n=8)


@pytest.fixture(scope="module")
def small():
    return run(WidthTransferConfig.small())


def _index(result, name):
    return result.config.parameterizations.index(name)


def test_coordinate_check_flat_under_mup_and_growing_under_standard(small):
    widths = small.config.widths
    mup, sp = _index(small, "mup"), _index(small, "standard")
    ratios = small.coordinate_ratios()
    # mup's own test: for every layer and step the ratio between the two widths lies in [1/1.2, 1.2], except the
    # zero-initialised readout at t = 1, which is exactly 0 at both widths.
    assert (small.coord_check[:, -2:, 0, LAYERS.index("output")] == 0).all()
    for t in range(3):
        for layer, name in enumerate(LAYERS):
            if t == 0 and name == "output":
                continue
            assert 1 / 1.2 <= ratios[mup, t, layer] <= 1.2, (t, name, ratios[mup, t, layer])
    # Standard parameterization, one step from a zero readout: f = lr * sum_i sigma_i(x) <sigma_i r>, a sum over the
    # m units of identically distributed terms, so the output grows in proportion to the width.
    expected = widths[-1] / widths[-2]
    assert abs(math.log(ratios[sp, 1, LAYERS.index("output")] / expected)) < math.log(1.2)


def test_best_learning_rate_transfers_under_mup_only(small):
    best = small.best_lr_index()
    mup, sp = _index(small, "mup"), _index(small, "standard")
    assert best[mup].max() - best[mup].min() <= 1
    # Under the standard parameterization the output layer's curvature grows like m, so the largest stable rate, and
    # the best one, falls like 1/m: log2(1024 / 64) = 4 steps of the factor-2 grid; at least 2 asked for.
    widths = small.config.widths
    assert best[sp, 0] - best[sp, -1] >= 0.5 * math.log2(widths[-1] / widths[0])


def test_wider_is_better_under_mup(small):
    mup = _index(small, "mup")
    mean = small.mean_final_loss()[mup]
    best = small.best_lr_index()[mup]
    for w in range(len(small.config.widths) - 1):
        narrow = small.final_loss[mup, w, best[w]]
        wide = small.final_loss[mup, w + 1, best[w + 1]]
        standard_error = math.hypot(narrow.std(ddof=1), wide.std(ddof=1)) / math.sqrt(len(narrow))
        assert mean[w, best[w]] - mean[w + 1, best[w + 1]] > 2 * standard_error


@pytest.mark.parametrize("param", ["standard", "ntk", "mean-field", "mup"])
def test_coordinate_check_matches_one_step_closed_form(param):
    """From a zero readout, one GD step of MSE (0.5 mean over n) moves only a: a1 = -lr lr_a output_scale
    <sigma(h) (0 - y)>, and then f(x) = output_scale a1 . sigma(h(x)); the hidden layer has not moved yet."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((12, 3))
    Y = rng.standard_normal((12, 1))
    widths, lr, seeds = (8, 16), 0.3, 2
    check = coordinate_check(param, widths, X, Y, lr, steps=2, seeds=seeds, seed=7)
    assert check.shape == (2, 2, 3, seeds)
    for w, m in enumerate(widths):
        for s in range(seeds):
            net = TwoLayer(3, m, 1, "tanh", param, dtype=np.float64, seed=7, ensemble=seeds)
            sc = net.scaling
            h = sc.input_scale * X @ net.W[s].T
            act = activation("tanh", h)[0]
            a1 = lr * sc.lr_a * sc.output_scale * (act * Y).mean(axis=0)
            f = sc.output_scale * act @ a1
            expected = [np.abs(h).mean(), np.abs(act).mean(), np.abs(f).mean()]
            np.testing.assert_allclose(check[w, 0, :2, s], expected[:2], rtol=1e-12)
            assert check[w, 0, 2, s] == 0
            np.testing.assert_allclose(check[w, 1, :, s], expected, rtol=1e-10)


def test_layer_coordinates_output_matches_native_forward():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((10, 4))
    net = TwoLayer(4, 6, 1, "relu", "mup", ensemble=3, dtype=np.float64, seed=2)
    net.b = rng.standard_normal((3, 6))
    coords = layer_coordinates(net, X)
    np.testing.assert_allclose(coords[:, 2], np.abs(net.forward(X)).mean(axis=(1, 2)), rtol=1e-12)
    unbiased = TwoLayer(4, 6, 1, "tanh", "standard", bias=False, ensemble=2, dtype=np.float64, seed=2)
    coords = layer_coordinates(unbiased, X)
    np.testing.assert_allclose(coords[:, 2], np.abs(unbiased.forward(X)).mean(axis=(1, 2)), rtol=1e-12)


def test_same_seed_same_bits_and_shapes():
    first, second = run(TINY), run(TINY)
    for name in ("losses", "final_loss", "coord_check"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert first.losses.shape == (2, 2, 40, 2, 2)
    assert first.final_loss.shape == (2, 2, 2, 2) and first.coord_check.shape == (2, 2, 3, 3, 2)
    rows = first.summary()
    assert len(rows) == 2 * 2 * 2 and {"parameterization", "width", "lr", "loss_mean", "best"} <= set(rows[0])
    assert first.trajectories()["loss"][0] == ("parameterization", "width", "step", "member", "seed")
    X, Y = make_task(TINY)
    assert X.shape == (24, 16) and Y.shape == (24, 1) and abs(Y.std() - 1) < 1e-12


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip_bit_for_bit(tmp_path, suffix):
    result = run(TINY)
    assert not np.isfinite(result.final_loss).all()  # rate 1e4 diverges: inf/NaN must survive
    assert_saves_and_loads(result, tmp_path / ("wt" + suffix))



@pytest.mark.parametrize("change, name", [
    (dict(parameterizations=()), "parameterizations"), (dict(parameterizations=("sgd",)), "parameterizations"),
    (dict(parameterizations=("mup", "mup")), "parameterizations"), (dict(widths=()), "widths"),
    (dict(widths=(64, 32)), "widths"), (dict(widths=(0, 32)), "widths"), (dict(learning_rates=()), "learning_rates"),
    (dict(learning_rates=(0.1, -1.0)), "learning_rates"), (dict(learning_rates=(1.0, 0.5)), "learning_rates"),
    (dict(seeds=0), "seeds"), (dict(steps=0), "steps"), (dict(coord_n=1000), "coord_n"),
    (dict(coord_lr=math.inf), "coord_lr"), (dict(activation="sigmoid"), "activation"), (dict(dtype="int8"), "dtype"),
])
def test_bad_config_names_the_field(change, name):
    with pytest.raises(ValueError, match=name):
        TINY.replace(**change)


def test_bad_coordinate_check_arguments():
    X, Y = np.zeros((4, 2)), np.zeros((4, 1))
    with pytest.raises(ValueError, match="param"):
        coordinate_check("sp", (4,), X, Y, 0.1)
    with pytest.raises(ValueError, match="lr"):
        coordinate_check("mup", (4,), X, Y, 0.0)
    with pytest.raises(ValueError, match="widths"):
        coordinate_check("mup", (), X, Y, 0.1)
    with pytest.raises(ValueError, match="X"):
        coordinate_check("mup", (4,), X[0], Y, 0.1)


def test_plugs_into_the_sweep_folding_learning_rates(tmp_path):
    pytest.importorskip("zarr")
    from physai import sweep

    base = TINY.replace(parameterizations=("mup",), widths=(16,), learning_rates=(0.5,))
    ds = sweep.run(base, sweep.grid(lr=[0.5, 2.0]), out=str(tmp_path / "wt.zarr"))
    assert (ds["status"].values == 1).all()
    direct = run(base.replace(learning_rates=(0.5, 2.0)))
    np.testing.assert_array_equal(ds["loss_mean"].values, direct.mean_final_loss()[0, 0])


def test_cli_writes_json_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    out = subprocess.run([sys.executable, "-m", "physai", "width-transfer", "--parameterizations", "mup", "standard",
                          "--widths", "16", "32", "--learning-rates", "0.5", "2", "--seeds", "2", "--steps", "5",
                          "--n", "24", "--coord-n", "8", "--json", str(tmp_path / "wt.json"),
                          "--plot", str(tmp_path / "wt.png")], capture_output=True, text=True, check=True).stdout
    assert "best learning rate" in out
    data = json.loads((tmp_path / "wt.json").read_text())
    assert data["final_loss"]["shape"] == [2, 2, 2, 2]
    assert (tmp_path / "wt.png").read_bytes()[:4] == b"\x89PNG"
