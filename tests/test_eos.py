"""The edge-of-stability experiment: sharpness settles at 2/lr while the loss keeps falling."""
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_saves_and_loads

from physai.experiments.eos import EosConfig, EosResult, run

SMALL = EosConfig(learning_rates=(0.5, 0.6), steps=3000, track_every=10)


def check_edge_of_stability(result):
    at_edge = 0
    quarter = len(result.sharpness_steps) * 3 // 4
    for i, lr in enumerate(result.config.learning_rates):
        last = result.sharpness[quarter:, i]
        losses = result.losses[:, i]
        within = np.all(np.abs(last - 2 / lr) <= 0.15 * (2 / lr))
        falling = losses[-len(losses) // 4:].mean() < losses[:len(losses) // 4].mean() and losses[-1] < losses[0]
        at_edge += bool(within and falling)
    return at_edge


def test_sharpness_settles_at_two_over_lr_small_config():
    result = run(SMALL)
    # progressive sharpening: the sharpness starts below 2/lr and rises to it
    assert (result.sharpness[0] < 0.95 * 2 / np.array(SMALL.learning_rates)).all()
    assert check_edge_of_stability(result) >= 2


@pytest.mark.slow
def test_sharpness_settles_at_two_over_lr_full_config():
    result = run(EosConfig(learning_rates=(0.4, 0.5, 0.6), steps=6000, track_every=5))
    assert check_edge_of_stability(result) >= 3


def test_cli_writes_json_and_figure(tmp_path):
    pytest.importorskip("matplotlib")
    out = subprocess.run([sys.executable, "-m", "physai", "eos", "--lr", "0.5", "--steps", "400", "--track-every", "20",
                          "--json", str(tmp_path / "eos.json"), "--plot", str(tmp_path / "eos.png")],
                         capture_output=True, text=True, check=True).stdout
    assert "2/lr" in out
    data = json.loads((tmp_path / "eos.json").read_text())
    assert data["losses"]["shape"] == [400, 1] and data["sharpness_steps"]["shape"] == [20]
    assert (tmp_path / "eos.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_config():
    with pytest.raises(ValueError, match="learning_rates"):
        run(EosConfig(learning_rates=()))
    with pytest.raises(ValueError, match="learning_rates"):
        run(EosConfig(learning_rates=(-0.1,)))
    with pytest.raises(ValueError, match="steps"):
        run(EosConfig(steps=0))
    with pytest.raises(ValueError, match="seed: expected an integer >= 0, got -1"):
        EosConfig(seed=-1).validated()
    with pytest.raises(TypeError, match="seed"):
        EosConfig(seed=1.5).validated()


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip_bit_for_bit(tmp_path, suffix):
    result = run(EosConfig(learning_rates=(0.5, 40.0), steps=60, track_every=20, n=50))
    assert not np.isfinite(result.losses[:, 1]).all()  # a diverged member: NaN and inf must survive the trip
    assert_saves_and_loads(result, tmp_path / ("eos" + suffix))


def test_result_pickles_and_deep_copies():
    import copy
    import pickle

    result = run(EosConfig(learning_rates=(0.5,), steps=30, track_every=10, n=40))
    for clone in (pickle.loads(pickle.dumps(result)), copy.deepcopy(result)):
        assert clone.config == result.config
        np.testing.assert_array_equal(clone.losses, result.losses)


def test_protocol_names_summary_and_trajectory_dims():
    """What physai.sweep relies on: the module-level names, one flat row of scalars per member, and trajectories
    whose named dims match their arrays (the member dim as long as the ensemble)."""
    import physai.experiments.eos as module

    assert (module.Config, module.Result, module.run) == (EosConfig, EosResult, run)
    assert EosConfig.ensemble_axes == {"lr": "learning_rates"}
    config = EosConfig(learning_rates=(0.5, 0.6, 0.7), steps=30, track_every=10, n=40)
    result = run(config)
    rows = result.summary()
    assert [row["lr"] for row in rows] == [0.5, 0.6, 0.7]
    assert all(isinstance(value, float) for row in rows for value in row.values())
    sizes = {"step": 30, "tracked_step": 3, "member": 3}
    for name, (dims, array) in result.trajectories().items():
        assert array.shape == tuple(sizes[d] for d in dims), name
    # the labels of the run's own dims, and the metadata a sweep stores with each variable
    coordinates = result.coordinates()
    assert coordinates["step"].tolist() == list(range(30)) and coordinates["tracked_step"].tolist() == [0, 10, 20]
    assert all(c.dtype == np.int64 for c in coordinates.values())
    attributes = result.attributes()
    assert set(attributes) == (set(rows[0]) - {"lr"}) | set(result.trajectories())
    assert attributes["sharpness"]["units"] == "1/lr" and all("long_name" in a for a in attributes.values())


def test_every_field_has_help():
    import dataclasses

    for field in dataclasses.fields(EosConfig):
        assert field.metadata.get("help"), field.name
