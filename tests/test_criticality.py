"""The criticality experiment and the ``physai criticality`` command: the small configuration end to end (theory
against its own Monte Carlo, save/load, figure), and config validation."""
import json

import numpy as np
import pytest
from conftest import assert_saves_and_loads

from physai.cli import main
from physai.experiments import criticality
from physai.experiments.criticality import VARIANCE_GROUPS, CriticalityConfig, CriticalityResult, make_inputs, run
from physai.theory import bonferroni_bound


@pytest.fixture(scope="module")
def result():
    return run(CriticalityConfig.small())


def test_small_run_agrees_with_theory(result):
    config = result.config
    A, S, L = len(config.activations), len(config.scales), config.depth
    assert result.kernel_mc.shape == (A, S, L, 2, 2) and result.variance_mc.shape == (A, 2, config.variance_depth)
    rows = result.summary()
    assert len(rows) == A * S
    # 500 networks per member; each member's z-scores of the kernel (1/n shift included) cover 3 entries at layers
    # 2..L: 15 per member, 90 in all (Bonferroni bound 3.87 for a 1% family-wise false-alarm rate).
    assert max(row["kernel_max_abs_z"] for row in rows) < bonferroni_bound(A * S * 3 * (L - 1))
    critical = [row for row in rows if row["scale"] == 1]
    relu = next(row for row in critical if row["activation"] == "relu")
    assert relu["C_W"] == pytest.approx(2.0, abs=1e-6)
    assert relu["chi_parallel"] == pytest.approx(1, abs=1e-9) and relu["chi_perp"] == pytest.approx(1, abs=1e-9)
    # The exact ReLU metric variance at every width and layer 2..4 (layer 1's metric is fixed): 6 comparisons of
    # jackknife z-scores, Student-t with VARIANCE_GROUPS - 1 degrees of freedom.
    a = config.activations.index("relu")
    assert np.all(result.variance_mc[a, :, 0] == 0) and np.all(result.variance_exact[a, :, 0] == 0)
    z = (result.variance_mc[a, :, 1:] - result.variance_exact[a, :, 1:]) / result.variance_sem[a, :, 1:]
    assert np.abs(z).max() < bonferroni_bound(z.size, dof=VARIANCE_GROUPS - 1)
    assert np.isnan(result.variance_exact[config.activations.index("tanh")]).all()


def test_inputs_have_the_configured_geometry():
    X = make_inputs(CriticalityConfig(input_dim=8, input_norm=2.0, input_overlap=-0.3))
    gram = X @ X.T / X.shape[1]
    assert np.allclose(np.diag(gram), 2.0) and gram[0, 1] == pytest.approx(-0.6)


def test_save_load_and_plot(result, tmp_path):
    for name in ("r.json", "r.npz"):
        assert_saves_and_loads(result, tmp_path / name)
    dims, values = result.trajectories()["kernel_theory"]
    assert len(dims) == values.ndim
    pytest.importorskip("matplotlib")
    import matplotlib.image
    import matplotlib.pyplot as plt

    config = result.config
    A, S = len(config.activations), len(config.scales)
    fig = result.figure()
    axes = np.array(fig.axes).reshape(5, A)
    def lines(ax, marker):  # theory: plain solid lines; Monte Carlo: the error bars' "o" markers
        return [line for line in ax.get_lines() if line.get_marker() == marker and (
            marker != "None" or line.get_linestyle() == "-")]

    for a in range(A):
        # Theory lines are the kernel with its 1/n shift; points the Monte Carlo means.
        theory, points = lines(axes[0, a], "None"), lines(axes[0, a], "o")
        assert len(theory) == len(points) == S
        for s in range(S):
            shifted = result.kernel_theory[a, s, :, 0, 0] + result.kernel_shift[a, s, :, 0, 0]
            assert np.allclose(theory[s].get_ydata(), shifted)
            assert np.allclose(points[s].get_ydata(), result.kernel_mc[a, s, :, 0, 0])
        # The variance panel: every width on the (l - 1) / n axis from layer 2.
        points = lines(axes[4, a], "o")
        assert len(points) == len(config.variance_widths)
        for w, n in enumerate(config.variance_widths):
            assert np.allclose(points[w].get_xdata(), np.arange(1, config.variance_depth) / n)
            assert np.allclose(points[w].get_ydata(), result.variance_mc[a, w, 1:])
        assert axes[4, a].get_xlabel() == "(l - 1) / n" and axes[4, a].get_ylabel() == "Var[G] / E[G]^2"
    plt.close(fig)
    result.plot(tmp_path / "r.png")
    image = matplotlib.image.imread(tmp_path / "r.png")
    assert image.shape[:2] == (16 * 110, 4.5 * A * 110)  # figsize x dpi
    assert image[..., :3].std() > 0.05  # something is drawn


def test_cli(tmp_path, capsys):
    out, fig = tmp_path / "c.json", tmp_path / "c.png"
    status = main(["criticality", "--depth", "3", "--width", "8", "--networks", "50", "--activations", "relu",
                   "--scales", "1", "--variance-widths", "8", "--variance-depth", "2", "--variance-networks", "50",
                   "--json", str(out), "--plot", str(fig)])
    assert status == 0
    assert json.loads(out.read_text())["config"]["activations"] == ["relu"]
    assert "relu" in capsys.readouterr().out
    assert main(["criticality", "--activations", "softplus", "--depth", "2", "--json", str(out), "--plot", ""]) == 2


@pytest.mark.parametrize("change,match", [
    ({"activations": ()}, "activations"), ({"activations": ("swish",)}, "activations"), ({"scales": (0.0,)}, "scales"),
    ({"depth": 0}, "depth"), ({"networks": 1}, "networks"), ({"input_dim": 1}, "input_dim"),
    ({"input_overlap": 1.0}, "input_overlap"), ({"variance_widths": ()}, "variance_widths"),
    ({"variance_networks": 39}, "variance_networks")])
def test_bad_config_names_the_field(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CriticalityConfig().replace(**change)


def test_sweep_aliases():
    assert criticality.Config is CriticalityConfig and criticality.Result is CriticalityResult


@pytest.mark.slow
def test_default_run(tmp_path):
    """The full default configuration (about 20 s): every member's kernel within the Bonferroni bound of theory
    (3 entries at layers 2..20 per member, 6 members: 342 comparisons, bound 4.18)."""
    result = run(CriticalityConfig())
    config = result.config
    comparisons = len(config.activations) * len(config.scales) * 3 * (config.depth - 1)
    assert max(row["kernel_max_abs_z"] for row in result.summary()) < bonferroni_bound(comparisons)
