"""Sweeps: folding of ensemble axes, same bits on every executor, resume after SIGKILL, failures recorded, bad axes
refused before any work, the CLI and the plots. Every sweep is a tiny EoS config (tens of steps, tens of samples) or
a toy experiment with a closed form, defined here by the protocol alone."""
import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import ClassVar

import numpy as np
import pytest

from physai import sweep
from physai._checks import check_int
from physai.experiments import eos
from physai.experiments._base import ExperimentConfig, ExperimentResult

pytest.importorskip("xarray")
zarr = pytest.importorskip("zarr")

BASE = eos.Config(learning_rates=(0.5,), n=30, steps=24, track_every=8)
LRS = [0.3, 0.5, 0.7]


def assert_same_bits(got, want):
    """Every variable and coordinate equal bit for bit (NaN where NaN), same dims, same attributes."""
    assert set(got.variables) == set(want.variables)
    for name in want.variables:
        a, b = got[name], want[name]
        assert a.dims == b.dims and a.dtype == b.dtype, name
        if a.dtype.kind == "f":
            assert a.values.tobytes() == b.values.tobytes(), name
        else:
            np.testing.assert_array_equal(a.values, b.values, err_msg=name)
    assert got.attrs == want.attrs


@pytest.fixture
def counted(monkeypatch):
    """Wraps eos.run: records the config of every call (the sweep looks the function up when a task runs)."""
    calls = []
    original = eos.run

    def run(config, progress=False):
        calls.append(config)
        return original(config, progress)

    monkeypatch.setattr(eos, "run", run)
    return calls


# -- spaces and plans ---------------------------------------------------------------------------------------------

def test_grid_and_zip_give_dims_in_order():
    space = sweep.grid(sweep.zip_(width=[8, 16], n=[30, 40]), lr=np.array([0.3, 0.5, 0.7]), seed=range(2))
    assert [dim for dim, _ in space.dims] == ["width", "lr", "seed"]
    assert space.shape == (2, 3, 2) and len(space) == 12
    assert space.point((1, 2, 0)) == {"width": 16, "n": 40, "lr": 0.7, "seed": 0}
    assert type(space.point((0, 0, 0))["lr"]) is float  # numpy scalars become Python numbers (hashable as JSON)


@pytest.mark.parametrize("make, error, axis", [
    (lambda: sweep.grid(width=[]), ValueError, "width"),
    (lambda: sweep.grid(width=8), TypeError, "width"),
    (lambda: sweep.grid(dtype="float32"), TypeError, "dtype"),
    (lambda: sweep.zip_(width=[8, 16], n=[30]), ValueError, "zip_"),
    (lambda: sweep.grid(sweep.grid(width=[8]), width=[16]), ValueError, "width"),
    (lambda: sweep.grid(width=[8, 16, 8]), ValueError, "width: values repeat"),
    (lambda: sweep.grid(lr=[1, 0.5, 1.0]), ValueError, "lr: values repeat"),   # 1 and 1.0: one value
    (lambda: sweep.zip_(width=[8, 8], n=[30, 40]), ValueError, "width: values repeat"),
])
def test_bad_space(make, error, axis):
    with pytest.raises(error, match=axis):
        make()


@pytest.mark.parametrize("axes, axis", [
    ({"widht": [8, 16]}, "widht"),                         # not a field
    ({"width": [8, 0]}, "width"),                          # a value the config refuses
    ({"lr": [0.5, -1.0]}, "lr"),                           # an ensemble axis value the config refuses
    ({"dtype": ["float64", "float16"]}, "dtype"),
    ({"learning_rates": [(0.5,), (0.6,)]}, "learning_rates"),  # the ensemble field itself: sweep lr
    ({"seed": [0, -1]}, "seed"),
])
def test_bad_axes_fail_before_any_work(tmp_path, counted, axes, axis):
    out = tmp_path / "bad.zarr"
    with pytest.raises(ValueError, match=axis):
        sweep.run(BASE, sweep.grid(lr=LRS, **axes) if "lr" not in axes else sweep.grid(**axes), out=out,
                  progress=False)
    assert counted == [] and not out.exists()


# A second experiment, defined here by the protocol alone, with two ensemble axes: gradient descent on
# f(x) = h x^2 / 2 from x0 = 1 + seed, whose iterates have the closed form x_t = (1 - lr h)^t x0.
@dataclasses.dataclass(frozen=True)
class DecayConfig(ExperimentConfig):
    ensemble_axes: ClassVar[dict[str, str]] = {"lr": "learning_rates", "seed": "seeds"}

    learning_rates: tuple[float, ...] = (0.1,)
    seeds: tuple[int, ...] = (0,)
    curvature: float = 1.0
    steps: int = 6
    offsets: tuple[float, ...] = ()  # added to every x0

    def validated(self):
        if len(self.seeds) != len(self.learning_rates):
            raise ValueError(f"seeds: expected one per learning rate, got {len(self.seeds)}")
        check_int(self.steps, "steps", min=1)
        return self


@dataclasses.dataclass
class DecayResult(ExperimentResult):
    config: DecayConfig
    x: np.ndarray

    def summary(self):
        return [{"lr": lr, "seed": seed, "x_end": float(self.x[-1, i])}
                for i, (lr, seed) in enumerate(zip(self.config.learning_rates, self.config.seeds))]

    def trajectories(self):
        return {"x": (("step", "member"), self.x)}


DECAY_RUNS = []


def run(config, progress=False):
    DECAY_RUNS.append(config)
    x = np.empty((config.steps + 1, len(config.learning_rates)))
    x[0] = 1.0 + np.array(config.seeds) + sum(config.offsets)
    for t in range(config.steps):
        x[t + 1] = x[t] - np.array(config.learning_rates) * config.curvature * x[t]
    return DecayResult(config, x)


Config, Result = DecayConfig, DecayResult


def test_two_ensemble_axes_fold_member_by_member_into_one_call():
    DECAY_RUNS.clear()
    lrs, seeds = [0.1, 0.2, 0.5], [0, 1]
    ds = sweep.run(DecayConfig(curvature=1.5), sweep.grid(lr=lrs, seed=seeds), progress=False)
    assert len(DECAY_RUNS) == 1
    assert list(zip(DECAY_RUNS[0].learning_rates, DECAY_RUNS[0].seeds)) == [(lr, s) for lr in lrs for s in seeds]
    steps = np.arange(7)
    closed = (1 + np.array(seeds))[None, :, None] * (1 - 1.5 * np.array(lrs))[:, None, None] ** steps
    # six multiplications by (1 - lr h), each rounded: a few ulps of relative error
    np.testing.assert_allclose(ds["x"].values, closed, rtol=8 * np.finfo(float).eps, atol=0)
    np.testing.assert_array_equal(ds["x_end"].values, ds["x"].values[..., -1])


def test_a_tuple_field_as_an_axis_has_its_json_as_coordinate():
    ds = sweep.run(DecayConfig(), sweep.grid(offsets=[(), (1.0, 2.5)], lr=[0.1, 0.2]), progress=False)
    assert ds["offsets"].values.tolist() == ["[]", "[1.0, 2.5]"]
    np.testing.assert_array_equal(ds["x"].values[..., 0], [[1.0, 1.0], [4.5, 4.5]])


def test_an_unswept_ensemble_field_must_hold_one_value():
    DECAY_RUNS.clear()
    with pytest.raises(ValueError, match="seeds"):
        sweep.run(DecayConfig(learning_rates=(0.1, 0.2), seeds=(0, 1)), sweep.grid(lr=[0.1, 0.3]), progress=False)
    assert DECAY_RUNS == []
    ds = sweep.run(DecayConfig(seeds=(4,)), sweep.grid(lr=[0.1, 0.3], curvature=[1.0, 2.0]), progress=False)
    assert [c.seeds for c in DECAY_RUNS] == [(4, 4), (4, 4)]  # the one seed, for every member of each call
    np.testing.assert_array_equal(ds["x"].values[..., 0], np.full((2, 2), 5.0))


def test_bad_config_and_executor():
    with pytest.raises(TypeError, match="config"):
        sweep.run({"width": 8}, sweep.grid(width=[8]))
    with pytest.raises(TypeError, match="executor"):
        sweep.run(BASE, sweep.grid(width=[8]), executor=4)
    with pytest.raises(ValueError, match="executor"):
        sweep.executor_from_spec("slurm://x")
    with pytest.raises(ValueError, match="executor"):
        sweep.executor_from_spec("process:0")
    with pytest.raises(ValueError, match="experiment"):
        sweep.experiment("no_such_experiment")
    assert sweep.experiment("eos") is eos
    from physai.experiments import width_transfer
    assert sweep.experiment("width-transfer") is width_transfer  # the subcommand's spelling
    import types
    with pytest.raises(ValueError, match="has no Config = "):
        sweep.protocol(types.ModuleType("no_aliases"))


# -- folding and placement ----------------------------------------------------------------------------------------

def test_an_ensemble_axis_named_like_a_field_is_refused():
    """{"seed": "seeds"} with a field ``seed``: grid(seed=...) would mean either, and the CLI would define --seed
    twice."""
    @dataclasses.dataclass(frozen=True)
    class Clash(DecayConfig):
        seed: int = 0

    with pytest.raises(ValueError, match="ensemble axis 'seed' is also a config field"):
        sweep.run(Clash(), sweep.grid(seed=[1, 2]), progress=False)
    module = type(sys)("clash")
    module.Config, module.Result, module.run = Clash, DecayResult, run
    with pytest.raises(ValueError, match="ensemble axis 'seed' is also a config field"):
        sweep.protocol(module)


def test_values_take_the_field_type_so_python_and_cli_agree(tmp_path):
    """grid(lr=[1, 0.5]) is the sweep --lr 1,0.5 names: float coordinates, the same hashes, one store."""
    out = tmp_path / "int.zarr"
    ds = sweep.run(BASE, sweep.grid(lr=[1, 0.5]), out=out, progress=False)
    assert ds["lr"].dtype == np.float64 and ds["lr"].values.tolist() == [1.0, 0.5]
    config, space = sweep.space_and_config(eos, [("lr", "1,0.5"), ("n", "30"), ("steps", "24"),
                                                 ("track_every", "8")], [])
    assert space.dims == (("lr", {"lr": (1.0, 0.5)}),)
    again = sweep.run(config, space, out=out, progress=False)  # the same sweep: resumed, nothing refused
    assert again["point_hash"].values.tolist() == ds["point_hash"].values.tolist()


def test_lr_axis_is_folded_into_one_native_call_per_point_of_the_other_axes(counted, monkeypatch):
    from physai.twolayer import TwoLayer

    trains = []
    original = TwoLayer.train

    def train(self, X, Y, learning_rates, *args, **kwargs):
        trains.append(np.array(learning_rates))
        return original(self, X, Y, learning_rates, *args, **kwargs)

    monkeypatch.setattr(TwoLayer, "train", train)
    sweep.run(BASE, sweep.grid(width=[8, 16], lr=LRS), progress=False)
    assert [(c.width, c.learning_rates) for c in counted] == [(8, tuple(LRS)), (16, tuple(LRS))]
    assert len(trains) == 2 and all(t.tolist() == LRS for t in trains)


def test_values_are_those_of_direct_runs(capsys):
    """The oracle: run() called directly with the ensemble of each (width, seed); the sweep must place every
    member's numbers at its own coordinates, bit for bit. The folded lr dim sits between unfolded ones."""
    ds = sweep.run(BASE, sweep.grid(width=[8, 16], lr=LRS, seed=[0, 3]))
    bar = capsys.readouterr().err  # the progress bar counts points, folded ones included
    assert "sweep eos:   0%" in bar and "0/12" in bar
    assert ds["loss"].dims == ("width", "lr", "seed", "step")
    assert ds["step"].values.tolist() == list(range(24)) and ds["tracked_step"].values.tolist() == [0, 8, 16]
    assert ds["matvecs"].dtype == np.int64 and ds["sharpness"].attrs["units"] == "1/lr"
    assert (ds["status"] == sweep.STATUS_DONE).all() and "lr" not in ds.data_vars
    # the base config without what the axes set (width, seed, and learning_rates through lr)
    assert json.loads(ds.attrs["config"]) == {"d": 10, "dtype": "float64", "n": 30, "steps": 24, "teacher_scale": 4.0,
                                              "teacher_width": 32, "track_every": 8}
    for width in (8, 16):
        for seed in (0, 3):
            direct = eos.run(BASE.replace(width=width, seed=seed, learning_rates=tuple(LRS)))
            point = ds.sel(width=width, seed=seed)
            for i, row in enumerate(direct.summary()):
                for key, value in row.items():
                    got = point["lr"].values[i] if key == "lr" else point[key].values[i]
                    assert got == value, key
            np.testing.assert_array_equal(point["loss"].transpose("step", "lr").values, direct.losses)
            np.testing.assert_array_equal(point["sharpness"].transpose("tracked_step", "lr").values, direct.sharpness)
            np.testing.assert_array_equal(point["matvecs"].transpose("tracked_step", "lr").values, direct.matvecs)


def test_each_folded_point_is_its_own_single_member_run():
    """A phase-diagram cell must not depend on the rest of the lr grid: every stored point equals run() of its own
    one-member config, bit for bit (n = 200 > 128 rows: the lone member's row-block path)."""
    base = BASE.replace(n=200, steps=40, track_every=5)
    lrs = [0.3, 0.5, 0.7, 1.2]
    ds = sweep.run(base, sweep.grid(lr=lrs, width=[8, 16]), progress=False)
    for lr in lrs:
        for width in (8, 16):
            alone = eos.run(base.replace(learning_rates=(lr,), width=width))
            point = ds.sel(lr=lr, width=width)
            assert point["loss"].values.tobytes() == alone.losses[:, 0].tobytes()
            assert point["sharpness"].values.tobytes() == alone.sharpness[:, 0].tobytes()
            assert point["matvecs"].values.tobytes() == alone.matvecs[:, 0].tobytes()


@pytest.mark.parametrize("same_init", [True, False])
def test_a_lone_member_is_bit_for_bit_member_i_of_any_ensemble(same_init):
    """The native rule under the sweep's folding: member i of an ensemble (its init stream i, or 0 under
    same_init) trained with sharpness tracking gives the bits of that member trained alone, at 1, 2 and 3 threads
    (the solver's random start is keyed by the member's init index, not its position)."""
    import physai
    from physai.twolayer import TwoLayer

    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((200, 6)), rng.standard_normal((200, 1))
    lrs = np.array([0.05, 0.2, 0.4])

    def alone(i):
        if same_init:  # what eos.run builds for one learning rate
            return TwoLayer(6, 24, 1, "tanh", dtype=np.float64, seed=3)
        full = TwoLayer(6, 24, 1, "tanh", ensemble=3, dtype=np.float64, seed=3)
        net = TwoLayer.from_arrays(full.W[i:i + 1].copy(), full.b[i:i + 1].copy(), full.a[i:i + 1].copy(), "tanh")
        net.init_index = np.array([i])  # member i, initialised from the stream [seed, i]
        return net

    for threads in (1, 2, 3):
        with physai.num_threads(threads):
            ensemble = TwoLayer(6, 24, 1, "tanh", ensemble=3, dtype=np.float64, seed=3, same_init=same_init)
            together = ensemble.train(X, Y, lrs, 30, track_sharpness_every=4)
            for i in range(3):
                single = alone(i).train(X, Y, lrs[i], 30, track_sharpness_every=4)
                for name in ("losses", "sharpness", "matvecs"):
                    assert getattr(single, name)[:, 0].tobytes() == getattr(together, name)[:, i].tobytes(), \
                        (threads, i, name)


def test_the_init_index_travels_with_the_model(tmp_path):
    """What keys a member's solver stream is part of the model: pickles and .npz files keep it; a file or pickle
    from before it existed gets each member's position, as the solver used then."""
    import pickle

    from physai.twolayer import TwoLayer

    net = TwoLayer(3, 4, ensemble=3, dtype=np.float64, same_init=True)
    assert net.init_index.tolist() == [0, 0, 0] and net.init_index.dtype == np.int64
    assert TwoLayer(3, 4, ensemble=3).init_index.tolist() == [0, 1, 2]
    net.save(tmp_path / "net.npz")
    for copy in (pickle.loads(pickle.dumps(net)), TwoLayer.load(tmp_path / "net.npz")):
        assert copy.init_index.tolist() == [0, 0, 0]
    np.savez(tmp_path / "old.npz", W=net.W, b=net.b, a=net.a, __header__='{"activation": "relu", "param": "standard"}')
    assert TwoLayer.load(tmp_path / "old.npz").init_index.tolist() == [0, 1, 2]
    state = net.__getstate__()
    del state["init_index"]
    old = TwoLayer.__new__(TwoLayer)
    old.__setstate__(state)
    assert old.init_index.tolist() == [0, 1, 2]


def test_without_an_ensemble_axis_each_point_keeps_its_members(counted):
    config = BASE.replace(learning_rates=(0.3, 0.6))
    ds = sweep.run(config, sweep.grid(width=[8, 16]), progress=False)
    assert len(counted) == 2 and ds["loss_end"].dims == ("width", "member")
    np.testing.assert_array_equal(ds["lr"].values, [[0.3, 0.6], [0.3, 0.6]])
    direct = eos.run(config.replace(width=16))
    np.testing.assert_array_equal(ds["loss"].sel(width=16).values, direct.losses)


def test_zipped_axes_and_cli_settings():
    settings_ = [("lr", "0.3,0.5"), ("width", "8,16"), ("n", "30,40"), ("steps", "24"), ("track_every", "8")]
    config, space = sweep.space_and_config(eos, settings_, ["width,n"])
    assert config == eos.Config(steps=24, track_every=8)
    assert [dim for dim, _ in space.dims] == ["lr", "width"] and space.shape == (2, 2)
    ds = sweep.run(config.replace(learning_rates=(0.5,)), space, progress=False)
    assert ds["n"].dims == ("width",) and ds["n"].values.tolist() == [30, 40] and "n" in ds.coords
    direct = eos.run(BASE.replace(width=16, n=40, learning_rates=(0.3, 0.5)))
    np.testing.assert_array_equal(ds["loss"].sel(width=16).transpose("step", "lr").values, direct.losses)


def test_trajectories_of_different_lengths_share_one_padded_dim():
    """Sweeping steps changes the length of the step dim: shorter points are NaN past their end, whichever
    point is stored first."""
    for steps in ([24, 16], [16, 24]):
        ds = sweep.run(BASE, sweep.grid(steps=steps), progress=False)
        assert ds.sizes["step"] == 24 and ds["tracked_step"].values.tolist() == [0, 8, 16]
        assert ds["loss"].dims == ("steps", "step")  # one member, no ensemble axis: no member dim
        short = ds["loss"].sel(steps=16).values
        np.testing.assert_array_equal(short[:16], eos.run(BASE.replace(steps=16)).losses[:, 0])
        assert np.isnan(short[16:]).all()
        assert np.isnan(ds["sharpness"].sel(steps=16, tracked_step=16))


def test_a_coordinate_that_varies_with_the_axes_fails_those_points():
    """track_every changes the tracked steps: one coordinate cannot hold both, so the second point fails,
    saying so (the first is stored)."""
    ds = sweep.run(BASE, sweep.grid(track_every=[8, 12]), progress=False)
    assert ds["status"].values.tolist() == [sweep.STATUS_DONE, sweep.STATUS_FAILED]
    assert "tracked_step" in str(ds["error"].values[1]) and ds["tracked_step"].values.tolist() == [0, 8, 16]


def test_a_result_with_more_members_than_the_ensemble_fields_fails_naming_the_rule(monkeypatch):
    """catapult's case: a run whose members are not one per ensemble-field value cannot be folded."""
    module = sys.modules[__name__]
    original = module.run

    def doubled(config, progress=False):
        result = original(config, progress)
        return DecayResult(dataclasses.replace(config, learning_rates=config.learning_rates * 2,
                                               seeds=config.seeds * 2), np.hstack([result.x, result.x]))

    monkeypatch.setattr(module, "run", doubled)
    ds = sweep.run(DecayConfig(), sweep.grid(lr=[0.1, 0.2]), progress=False)
    assert (ds["status"] == sweep.STATUS_FAILED).all()
    error = str(ds["error"].values[0])
    assert f"{__name__}: run() returned 4 summary rows" in error and "hold 2 values each" in error


def test_a_dim_of_the_run_named_like_a_sweep_axis_is_renamed(monkeypatch):
    """Experiments with several seeds per run name that dim "seed", as the config field a sweep may vary."""
    original = eos.EosResult.trajectories

    def with_seeds(self):
        both = np.stack([self.losses, -self.losses], -1)
        return {**original(self), "loss_by_seed": (("step", "member", "seed"), both)}

    monkeypatch.setattr(eos.EosResult, "trajectories", with_seeds)
    ds = sweep.run(BASE, sweep.grid(lr=[0.3, 0.5], seed=[0, 1]), progress=False)
    assert ds["loss_by_seed"].dims == ("lr", "seed", "step", "run_seed")
    np.testing.assert_array_equal(ds["loss_by_seed"].isel(run_seed=1).values, -ds["loss"].values)


# -- executors ----------------------------------------------------------------------------------------------------

def test_same_bits_in_process_on_a_process_pool_and_on_a_dask_cluster(tmp_path):
    """The executors as the CLI names them: a spawned pool of 2 processes, and a real Dask scheduler with 2 worker
    processes reached at its address (dask://host:port), as a remote cluster would be."""
    distributed = pytest.importorskip("distributed")
    space = sweep.grid(lr=LRS, width=[8, 16])
    local = sweep.run(BASE, space, progress=False)
    with concurrent.futures.ThreadPoolExecutor(2) as threads:  # any Executor object (native calls drop the GIL)
        threaded = sweep.run(BASE, space, executor=threads, progress=False)
    pooled = sweep.run(BASE, space, out=tmp_path / "pool.zarr", executor="process:2", progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) \
            as cluster:
        address = cluster.scheduler_address.replace("tcp://", "dask://")
        remote = sweep.run(BASE, space, out=tmp_path / "dask.zarr", executor=address, progress=False)
        assert len(cluster.workers) == 2
    assert (local["status"] == sweep.STATUS_DONE).all()
    assert_same_bits(threaded, local)
    assert_same_bits(pooled, local)
    assert_same_bits(remote, local)


# -- storage, failures, resume ------------------------------------------------------------------------------------

def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, caplog, counted):
    original = eos.run  # counting

    def flaky(config, progress=False):
        if config.width == 12:
            raise RuntimeError("diverged badly")
        return original(config, progress)

    monkeypatch.setattr(eos, "run", flaky)
    out = tmp_path / "flaky.zarr"
    with caplog.at_level("WARNING", logger="physai.sweep"):
        ds = sweep.run(BASE, sweep.grid(width=[8, 12, 16], lr=LRS), out=out, progress=False)
    assert ds["status"].sel(width=12).values.tolist() == [sweep.STATUS_FAILED] * 3
    assert set(ds["error"].sel(width=12).values.tolist()) == {"RuntimeError: diverged badly"}
    assert np.isnan(ds["loss_end"].sel(width=12)).all() and np.isnan(ds["loss"].sel(width=12)).all()
    assert (ds["status"].sel(width=[8, 16]) == sweep.STATUS_DONE).all()
    assert np.isfinite(ds["loss_end"].sel(width=[8, 16])).all()
    assert any("width=12" in r.getMessage() and "diverged badly" in r.getMessage() for r in caplog.records)

    counted.clear()
    monkeypatch.setattr(eos, "run", original)  # the counting wrapper
    again = sweep.run(BASE, sweep.grid(width=[8, 12, 16], lr=LRS), out=out, progress=False)
    assert [c.width for c in counted] == [12]  # only the failed point runs again
    assert (again["status"] == sweep.STATUS_DONE).all() and set(again["error"].values.ravel().tolist()) == {""}
    assert_same_bits(again, sweep.run(BASE, sweep.grid(width=[8, 12, 16], lr=LRS), progress=False))


def test_a_store_of_another_sweep_or_layout_is_refused_before_any_work(tmp_path, counted):
    out = tmp_path / "s.zarr"
    sweep.run(BASE, sweep.grid(width=[8]), out=out, progress=False)
    counted.clear()
    refusals = [
        (dict(config=BASE, space=sweep.grid(width=[8, 16]), out=out), "axes"),
        (dict(config=BASE, space=sweep.grid(width=[8]), out=""), "out: expected a path"),
        (dict(config=BASE, space=sweep.grid(width=[8]), out=tmp_path / "s.nc"), "Zarr"),
    ]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    refusals.append((dict(config=BASE, space=sweep.grid(width=[8]), out=tmp_path / "junk"),
                     "neither empty nor a Zarr store"))
    zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2).attrs["x"] = 1
    refusals.append((dict(config=BASE, space=sweep.grid(width=[8]), out=tmp_path / "v2.zarr"), "Zarr v2 store"))
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=message):
            sweep.run(progress=False, **kwargs)
    assert counted == [] and not (tmp_path / "s.nc").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk", "s.zarr", "v2.zarr"]
    fresh = sweep.run(BASE, sweep.grid(width=[8, 16]), out=out, overwrite=True, progress=False)
    assert fresh.sizes["width"] == 2


def test_an_older_layout_is_refused_before_any_work(tmp_path, counted):
    """A store without point_hash (an older layout): refused with the remedy, not a bare KeyError."""
    import shutil

    out = tmp_path / "old.zarr"
    sweep.run(BASE, sweep.grid(width=[8, 16]), out=out, progress=False)
    shutil.rmtree(out / "point_hash")
    counted.clear()
    with pytest.raises(ValueError, match=r"lacks \['point_hash'\].*overwrite"):
        sweep.run(BASE, sweep.grid(width=[8, 16]), out=out, progress=False)
    assert counted == []


def test_a_changed_config_or_version_is_refused_not_mixed(tmp_path, counted, monkeypatch):
    """Bug: rerunning with steps=16 and cutting it short left 24-step points under attributes saying 16. Now the
    store is refused before any work unless told to start afresh."""
    import physai

    out = tmp_path / "r.zarr"
    space = sweep.grid(width=[8, 16], lr=LRS)
    first = sweep.run(BASE, space, out=out, progress=False)
    assert len(counted) == 2
    sweep.run(BASE, space, out=out, progress=False)
    assert len(counted) == 2  # everything stored: nothing runs
    with pytest.raises(ValueError, match=r"another sweep \(steps: stored 24, now 16\).*--overwrite"):
        sweep.run(BASE.replace(steps=16), space, out=out, progress=False)
    version = physai.__version__
    monkeypatch.setattr(physai, "__version__", version + "+other")
    with pytest.raises(ValueError, match="physai_version"):
        sweep.run(BASE, space, out=out, progress=False)
    assert len(counted) == 2
    monkeypatch.setattr(physai, "__version__", version)
    assert_same_bits(sweep.load(out).load(), first)  # untouched
    counted.clear()
    changed = sweep.run(BASE.replace(steps=16), space, out=out, overwrite=True, progress=False)
    assert len(counted) == 2 and changed.sizes["step"] == 16


def test_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "locked.zarr"
    sweep.run(BASE, sweep.grid(width=[8]), out=out, progress=False)
    partial = out / "status" / "c" / "0.partial"
    partial.write_text("")  # as a write killed midway leaves it
    held = sweep._lock(out)  # another sweep's lock, as a second process would hold it
    try:
        with pytest.raises(ValueError, match="another sweep"):
            sweep.run(BASE, sweep.grid(width=[8]), out=out, progress=False)
        assert partial.exists()  # the writer's temporary files are left alone
    finally:
        os.close(held)
    sweep.run(BASE, sweep.grid(width=[8]), out=out, progress=False)
    assert not partial.exists()


# A sweep in a subprocess whose driver SIGKILLs itself on the 3rd task, after that task's data is written and before
# its status (the commit mark): the worst moment, made deterministic.
KILLED_SWEEP = """
import os, signal, sys
from physai import sweep
from physai.experiments import eos

marks = []
original = sweep._Store.mark

def mark(self, task, status, error):
    marks.append(task)
    if len(marks) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, task, status, error)

sweep._Store.mark = mark
BASE = eos.Config(learning_rates=(0.5,), n=30, steps=24, track_every=8)
sweep.run(BASE, sweep.grid(width=[4, 6, 8, 10, 12], lr=[0.3, 0.5, 0.7]), out=sys.argv[1], executor=sys.argv[2],
          progress=False)
"""


def _kill_group(process):
    """End whatever is left of ``process``'s process group (started with ``start_new_session=True``)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("executor", ["inprocess", "process:2"])
def test_resume_after_sigkill_mid_write_loses_and_recomputes_nothing(tmp_path, counted, executor):
    out = tmp_path / "killed.zarr"
    widths = [4, 6, 8, 10, 12]
    space = sweep.grid(width=widths, lr=[0.3, 0.5, 0.7])
    # In its own process group, so that the pool workers the killed driver orphans are ended with it.
    process = subprocess.Popen([sys.executable, "-c", KILLED_SWEEP, str(out), executor], start_new_session=True)
    try:
        assert process.wait(timeout=300) == -signal.SIGKILL
    finally:
        _kill_group(process)
    stored = zarr.open_array(out / "status", mode="r")[...] == sweep.STATUS_DONE
    assert stored.all(axis=1).sum() == 2  # two tasks committed; the third's data is there, its status not
    assert (stored.all(axis=1) == stored.any(axis=1)).all()  # a task's points are stored together or not at all
    if executor == "inprocess":
        assert stored.all(axis=1).tolist() == [True, True, False, False, False]

    resumed = sweep.run(BASE, space, out=out, progress=False)
    assert [c.width for c in counted] == [w for w, s in zip(widths, stored.all(axis=1)) if not s]
    uninterrupted = sweep.run(BASE, space, progress=False)
    assert_same_bits(resumed, uninterrupted)


# A toy experiment in a module of its own, importable by the spawned workers of a process pool (and the CLI).
TOY = """
import dataclasses, os, signal, time
import numpy as np
from physai.experiments._base import ExperimentConfig, ExperimentResult

@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    x: int = 0
    crash_at: int = -1      # os._exit in the worker at this x: a worker that dies
    sleep: float = 0.0
    interrupt_at: int = -1  # a SIGINT whose KeyboardInterrupt lands in a destructor, at this x

@dataclasses.dataclass
class Result(ExperimentResult):
    config: Config
    y: np.ndarray

    def summary(self):
        return [{"square": self.config.x ** 2}]

    def trajectories(self):
        return {"y": (("step",), self.y)}

class Swallowed:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # CPython prints an exception raised in a destructor and goes on

def run(config, progress=False):
    if config.x == config.crash_at:
        os._exit(3)
    if config.x == config.interrupt_at:
        Swallowed()
    time.sleep(config.sleep)
    return Result(config, np.arange(3.0) * config.x)
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The module sweeptoys.toy (a dotted path, as ``physai sweep`` takes a module outside physai.experiments)."""
    import importlib

    (tmp_path / "sweeptoys").mkdir()
    (tmp_path / "sweeptoys" / "__init__.py").write_text("")
    (tmp_path / "sweeptoys" / "toy.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    yield importlib.import_module("sweeptoys.toy")
    for name in ("sweeptoys.toy", "sweeptoys"):
        sys.modules.pop(name, None)


def test_a_worker_that_dies_leaves_its_points_missing_not_failed(tmp_path, toy, caplog):
    out = tmp_path / "crash.zarr"
    with caplog.at_level("WARNING", logger="physai.sweep"):
        ds = sweep.run(toy.Config(crash_at=2), sweep.grid(x=[0, 1, 2, 3]), out=out, executor="process:2",
                       progress=False)
    status = ds["status"].values
    assert status[2] == sweep.STATUS_MISSING and sweep.STATUS_FAILED not in status.tolist()
    assert any("not run" in r.getMessage() for r in caplog.records)
    # the integer summary keeps its dtype; the fill value where not done
    assert ds["square"].dtype == np.int64
    done = status == sweep.STATUS_DONE
    assert ds["square"].values[done].tolist() == [x * x for x, d in zip([0, 1, 2, 3], done) if d]
    # the crash fixed (another base config needs a fresh store), every point is computed
    fixed = sweep.run(toy.Config(), sweep.grid(x=[0, 1, 2, 3]), out=tmp_path / "fixed.zarr", progress=False)
    assert fixed["square"].values.tolist() == [0, 1, 4, 9] and fixed["y"].dims == ("x", "step")


@pytest.fixture
def python_sigint():
    """SIGINT raising KeyboardInterrupt in this process and in the processes it starts, as in an interactive shell:
    a shell starts a background job (``pytest &``) with SIGINT ignored, and an ignored SIGINT stays ignored in
    the Python processes started from it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # for preexec_fn: Python installs its own handler
    signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost interrupt
@pytest.mark.usefixtures("python_sigint")
def test_an_interrupt_lost_in_a_destructor_still_stops_the_sweep(tmp_path, toy):
    # in process, so the SIGINT comes to this (main) thread while the point at x = 1 runs, and its KeyboardInterrupt
    # is lost in a destructor: the sweep stops after storing that point, as it would had the exception come through
    out = tmp_path / "lost.zarr"
    with pytest.raises(KeyboardInterrupt):
        sweep.run(toy.Config(interrupt_at=1), sweep.grid(x=[0, 1, 2, 3]), out=out, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    status = zarr.open_array(out / "status", mode="r")[...].tolist()
    assert status == [sweep.STATUS_DONE] * 2 + [sweep.STATUS_MISSING] * 2


def test_ctrl_c_stores_what_finished_and_exits_with_one_line(tmp_path, toy, request, python_sigint):
    """16 points of 2 s each on 2 workers: when the signal comes after the second point, at least 12 s of sleeping
    remain (0.5 s points let a loaded machine finish the sweep first). Stopping must take less than that: the
    running points' last 2 s plus the pool's shutdown, well under 10 s."""
    out = tmp_path / "interrupted.zarr"
    command = [sys.executable, "-m", "physai", "sweep", "sweeptoys.toy", "--x", "0:16", "--sleep", "2", "--out",
               str(out), "--executor", "process:2", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=python_sigint)
    request.addfinalizer(lambda: _kill_group(process))
    deadline = time.monotonic() + 120
    while not ((out / "status" / "zarr.json").exists()
               and (zarr.open_array(out / "status", mode="r")[...] == sweep.STATUS_DONE).sum() >= 2):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and time.monotonic() - sent < 10
    assert "Traceback" not in stderr and "interrupted; the points finished are stored" in stderr
    status = zarr.open_array(out / "status", mode="r")[...]
    assert 2 <= (status == sweep.STATUS_DONE).sum() < 16 and sweep.STATUS_FAILED not in status.tolist()
    resumed = subprocess.run(command, capture_output=True, text=True, check=True)
    assert f"{(status == sweep.STATUS_DONE).sum()} stored" in resumed.stderr and "16 done" in resumed.stdout


# -- command line and plots ---------------------------------------------------------------------------------------

def test_parse_axis_examples():
    """Expected values written out by hand (log: 0.1 * 10 ** (i / 2); linear: 0.2 apart)."""
    np.testing.assert_allclose(sweep.parse_axis("0.1:1.0:3log", float, "lr"), [0.1, 0.31622776601683794, 1.0],
                               rtol=1e-15)
    np.testing.assert_allclose(sweep.parse_axis("0.2:0.8:4", float, "lr"), [0.2, 0.4, 0.6, 0.8], rtol=1e-15)
    assert sweep.parse_axis("32,64,128", int, "width") == [32, 64, 128]
    assert sweep.parse_axis("0:4", int, "seed") == [0, 1, 2, 3]
    assert sweep.parse_axis("0:10:4", int, "seed") == [0, 4, 8]
    assert sweep.parse_axis("-3:0", int, "seed") == [-3, -2, -1]
    assert sweep.parse_axis("5:0:-2", int, "seed") == [5, 3, 1]
    assert sweep.parse_axis("16:128:4log", int, "width") == [16, 32, 64, 128]
    assert sweep.parse_axis("float32,float64", str, "dtype") == ["float32", "float64"]
    for text, kind in [("0.1:1", float), ("1:4:0", int), ("a,b", int), ("1:2:3:4", int), ("0:1:3log", float),
                       ("1:3:5log", int), ("1:2:xlog", float), ("3:3", int), ("0:3:-1", int)]:
        with pytest.raises(ValueError, match="^axis"):
            sweep.parse_axis(text, kind, "axis")


@pytest.mark.parametrize("settings_, message", [
    ([("width", "16,16")], "width: values repeat"),
    ([("lr", "0.5:0.5:3")], "lr: values repeat"),
    ([("lr", "0.3,0.5"), ("learning_rates", "0.3")], "learning_rates: the ensemble field, given with its axis"),
])
def test_cli_settings_refused(settings_, message):
    with pytest.raises(ValueError, match=message):
        sweep.space_and_config(eos, settings_, [])


def test_cli_sweep_resume_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from physai.cli import main

    out = tmp_path / "eos.zarr"
    args = ["sweep", "eos", "--lr", "0.3,0.5", "--width", "8,16", "--n", "30", "--steps", "24", "--track-every", "8",
            "--out", str(out), "--quiet"]
    first = subprocess.run([sys.executable, "-m", "physai", *args], capture_output=True, text=True, check=True)
    assert "2 lr x 2 width = 4 points" in first.stdout and "4 done, 0 failed" in first.stdout
    assert "0 stored, 4 to run in 2 tasks" in first.stderr
    api = sweep.run(BASE, sweep.grid(lr=[0.3, 0.5], width=[8, 16]), progress=False)
    assert_same_bits(sweep.load(out).load(), api)
    capsys.readouterr()
    assert main(args) == 0
    again = capsys.readouterr()
    assert "4 stored, 0 to run" in again.err and "4 done, 0 failed" in again.out
    figure = tmp_path / "curves.png"
    assert main(["plot", str(out), "--out", str(figure), "--x", "step", "--y", "lr", "--z", "loss", "--curves",
                 "--logz", "--sel", "width=16"]) == 0
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert main([*args[:2], "--lr", "0.3,-1"]) == 2
    assert "lr" in capsys.readouterr().err
    assert main(["plot", str(out), "--out", "", "--x", "lr", "--z", "loss_end"]) == 2
    assert "out" in capsys.readouterr().err


def test_cli_negative_values_and_help(capsys):
    from physai.cli import main

    parser = sweep._experiment_parser("eos", eos)
    options = parser.parse_args(sweep._values_as_values(parser, ["--seed", "-3:0", "--width", "8"]))
    assert options.settings == [("seed", "-3:0"), ("width", "8")]
    with pytest.raises(SystemExit):
        main(["sweep", "eos", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "GD steps int (default: 3000)" in text and "(default: eos.zarr)" in text
    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    assert "variable drawn" in capsys.readouterr().out


def test_cli_plot_of_a_zipped_axis(tmp_path, capsys):
    """--x n where n is zipped with width: the coordinate along width becomes the axis."""
    pytest.importorskip("matplotlib")
    from physai.cli import main

    out = tmp_path / "zip.zarr"
    assert main(["sweep", "eos", "--width", "8,16", "--n", "20,30", "--zip", "width,n", "--steps", "8",
                 "--track-every", "4", "--learning-rates", "0.5", "--out", str(out), "--quiet"]) == 0
    figure = sweep.plot(out, "loss_end", "n")
    ax = figure.axes[0]
    assert ax.get_xlabel() == "n" and ax.lines[0].get_xdata().tolist() == [20, 30]


def plot_dataset():
    """A hand-made sweep: z over (lr 2, width 2, seed 3); at (lr=0.1, width=8) seed 2 is missing, at
    (lr=0.2, width=16) seed 1 diverged (NaN, status done)."""
    import xarray as xr

    z = np.array([[[1.0, 2.0, 99.0], [4.0, 5.0, 6.0]],
                  [[7.0, 8.0, 9.0], [10.0, np.nan, 12.0]]])
    status = np.ones(z.shape, np.int8)
    status[0, 0, 2] = sweep.STATUS_MISSING
    return xr.Dataset({"z": (("lr", "width", "seed"), z), "status": (("lr", "width", "seed"), status),
                       "error": (("lr", "width", "seed"), np.full(z.shape, "", object))},
                      coords={"lr": [0.1, 0.2], "width": [8, 16], "seed": [0, 1, 2]})


def test_plot_averages_over_done_values_and_counts_what_it_left_out():
    pytest.importorskip("matplotlib")
    figure = sweep.plot(plot_dataset(), "z", "lr", "width")
    ax = figure.axes[0]
    assert ax.get_title() == "z\nmean over seed (3) of 12 values; left out: 1 not done, 1 NaN (diverged)"
    mesh = ax.collections[0]
    # [width, lr]: (1 + 2) / 2, (7 + 8 + 9) / 3; (4 + 5 + 6) / 3, (10 + 12) / 2 -- the missing 99 is not averaged
    np.testing.assert_array_equal(np.ma.filled(mesh.get_array(), np.nan).reshape(2, 2), [[1.5, 8.0], [5.0, 11.0]])
    assert ax.get_xlabel() == "lr" and ax.get_ylabel() == "width"
    assert len(figure.axes) == 2 and figure.axes[1].get_ylabel() == "z"  # the colour bar


def test_plot_log_colour_scale_and_exact_selection(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.colors import LogNorm

    ds = plot_dataset()
    figure = sweep.plot(ds, "z", "lr", "width", logz=True, select={"seed": 0}, path=tmp_path / "log.png")
    ax = figure.axes[0]
    assert isinstance(ax.collections[0].norm, LogNorm) and ax.get_title() == "z\nseed=0"
    np.testing.assert_array_equal(np.ma.filled(ax.collections[0].get_array(), np.nan).reshape(2, 2),
                                  [[1.0, 7.0], [4.0, 10.0]])
    assert (tmp_path / "log.png").read_bytes()[:4] == b"\x89PNG"
    curves = sweep.plot(ds, "z", "lr", "width", curves=True, logz=True, select={"seed": 1})
    assert curves.axes[0].get_yscale() == "log" and curves.axes[0].get_xlabel() == "lr"
    for kwargs, message in [(dict(select={"seed": 7}), r"seed=7 is not one of its values \[0, 1, 2\]"),
                            (dict(z="error"), "^z: expected a numeric variable"),
                            (dict(z="nope"), "^z"),
                            (dict(y="lr"), "^y: expected a coordinate other than x"),
                            (dict(y="depth"), "^y")]:
        with pytest.raises(ValueError, match=message):
            sweep.plot(ds, **{"z": "z", "x": "lr", "y": "width", **kwargs})


def test_plot_never_averages_the_members_of_a_point():
    pytest.importorskip("matplotlib")
    ds = sweep.run(BASE.replace(learning_rates=(0.3, 0.6)), sweep.grid(width=[8, 16]), progress=False)
    with pytest.raises(ValueError, match="member: each point holds 2 runs"):
        sweep.plot(ds, "loss_end", "width")
    with pytest.raises(ValueError, match=r"member is indexed 0 \.\. 1, got 5"):
        sweep.plot(ds, "loss_end", "width", select={"member": 5})
    line = sweep.plot(ds, "loss_end", "width", select={"member": 1}).axes[0].lines[0]
    np.testing.assert_array_equal(line.get_ydata(), ds["loss_end"].isel(member=1).values)


def test_core_import_needs_no_sweep_dependencies():
    code = textwrap.dedent("""
        import sys
        import physai, physai.sweep, physai.cli
        physai.cli.build_parser()
        heavy = [m for m in ("xarray", "zarr", "dask", "distributed", "matplotlib") if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
