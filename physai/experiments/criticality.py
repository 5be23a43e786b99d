"""Criticality of deep MLPs at initialisation (Roberts, Yaida, Hanin, *The Principles of Deep Learning Theory*,
arXiv 2106.10165, ch. 5 and 3–4): the kernel recursion and its susceptibilities below, at and above the critical
weight variance, and the finite-width variance whose expansion parameter is depth / width; theory from
:mod:`physai.theory`, checked against Monte Carlo ensembles of networks.

For each activation, its critical point (C_b, C_W*) is found numerically; the networks use C_W = scale x C_W* for
each ``scale`` (below 1: the ordered phase, signals and their differences shrink with depth; above: they grow or
decorrelate). Two inputs of squared norm ``input_norm`` n_0 and overlap ``input_overlap`` go through ``depth``
layers of width ``width``; the kernel, its overlap and the per-network susceptibility estimates are averaged over
``networks`` networks. At criticality, the normalised variance of the stochastic metric, Var[G^(l)] / E[G^(l)]^2
(the normalised four-point vertex: V^(l) / (n K^2) at leading order, ch. 4–5), is measured for several widths
against (l - 1) / n, the number of random layers below layer l over the width. For scale-invariant activations it
is 5 (l - 1) / n (ReLU) or 2 (l - 1) / n (linear) at leading order and (1 + c/n)^(l - 1) - 1 = exp(c (l - 1) / n)
- 1 + O(l / n^2) exactly (c = 5, 2), and for tanh close to (2/3) (l - 1) / n (the slope of V / K^2 rises from 0.63
to 2/3 with depth): a function of (l - 1) / n alone, so the curves for different widths collapse.
(The normalised variance of O = (1/n) sum z^2 would not: it adds 2 / n, which does not scale with l / n.)

    from physai.experiments.criticality import CriticalityConfig, run
    result = run(CriticalityConfig.small())
    result.summary(); result.plot("criticality.png")

``Config`` and ``Result`` are the module-level aliases the sweep protocol looks for (:mod:`physai.experiments._base`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from physai._checks import check_float, check_int
from physai._progress import progress as _progress
from physai.experiments._base import ExperimentConfig, ExperimentResult
from physai.experiments._cli import experiment_command
from physai.theory import (critical_point, exact_metric_variance, finite_width, finite_width_kernel,
                           kernel_recursion, sample_mlp, susceptibilities)
from physai.theory.gaussian import ACTIVATIONS

#: Groups of networks for the variance study's jackknife errors: estimate / error is then roughly Student-t with
#: 19 degrees of freedom.
VARIANCE_GROUPS = 20


@dataclass(frozen=True)
class CriticalityConfig(ExperimentConfig):
    """Activations, weight-variance scales around criticality, the network and input sizes, and the widths of the
    variance study. Each field's ``help`` gives its unit."""

    activations: tuple[str, ...] = field(default=("relu", "tanh"), metadata={"help": "activations (with a critical "
                                                                                     "point: not softplus)"})
    scales: tuple[float, ...] = field(default=(0.8, 1.0, 1.25), metadata={"help": "C_W / C_W* of each run"})
    depth: int = field(default=20, metadata={"help": "layers L"})
    width: int = field(default=128, metadata={"help": "hidden width n of the kernel runs"})
    networks: int = field(default=2000, metadata={"help": "networks per (activation, scale)"})
    input_dim: int = field(default=16, metadata={"help": "input dimension n_0 (>= 2)"})
    input_norm: float = field(default=1.0, metadata={"help": "|x|^2 / n_0 of both inputs"})
    input_overlap: float = field(default=0.5, metadata={"help": "cosine of the angle between the inputs"})
    variance_widths: tuple[int, ...] = field(default=(16, 32, 64, 128), metadata={"help": "widths of the variance "
                                                                                          "study"})
    variance_depth: int = field(default=16, metadata={"help": "layers of the variance study"})
    variance_networks: int = field(default=10_000, metadata={"help": "networks per width of the variance study "
                                                                      "(>= 40)"})
    seed: int = field(default=0, metadata={"help": "random seed"})

    @classmethod
    def small(cls) -> "CriticalityConfig":
        """A configuration that runs in 2–3 s on two cores (what CI runs)."""
        return cls(depth=6, width=32, networks=500, variance_widths=(16, 32), variance_depth=4, variance_networks=2000)

    def validated(self) -> "CriticalityConfig":
        """This config, after checking every field (ValueError/TypeError naming the field)."""
        if not self.activations:
            raise ValueError("activations: expected at least one activation")
        for name in self.activations:
            if name not in ACTIVATIONS:
                raise ValueError(f"activations: expected names from {ACTIVATIONS}, got {name!r}")
        if not self.scales:
            raise ValueError("scales: expected at least one scale")
        for scale in self.scales:
            check_float(scale, "scales", positive=True)
        for name in ("depth", "width", "variance_depth"):
            check_int(getattr(self, name), name, min=1)
        check_int(self.input_dim, "input_dim", min=2)
        check_int(self.networks, "networks", min=2)
        # At least two networks in each of the jackknife's groups.
        check_int(self.variance_networks, "variance_networks", min=2 * VARIANCE_GROUPS)
        if not self.variance_widths:
            raise ValueError("variance_widths: expected at least one width")
        for width in self.variance_widths:
            check_int(width, "variance_widths", min=1)
        check_float(self.input_norm, "input_norm", positive=True)
        overlap = check_float(self.input_overlap, "input_overlap")
        if not -1 < overlap < 1:
            raise ValueError(f"input_overlap: expected a cosine in (-1, 1), got {overlap}")
        check_int(self.seed, "seed", min=0)
        return self


def make_inputs(config: CriticalityConfig) -> np.ndarray:
    """The two inputs [2, n_0]: |x|^2 / n_0 = ``input_norm``, cosine ``input_overlap``."""
    n0 = config.input_dim
    X = np.zeros((2, n0))
    scale = math.sqrt(config.input_norm * n0)
    X[0, 0] = scale
    X[1, 0] = scale * config.input_overlap
    X[1, 1] = scale * math.sqrt(1 - config.input_overlap**2)
    return X


@dataclass
class CriticalityResult(ExperimentResult):
    """Arrays, float64, for A activations, S scales, L layers, V variance widths, Lv variance layers:

    - ``C_b``, ``C_W_critical`` [A]: each activation's critical point;
    - ``kernel_theory``, ``kernel_shift``, ``kernel_mc``, ``kernel_sem`` [A, S, L, 2, 2]: infinite-width kernel, its
      1/n shift G1/n at ``width``, the Monte Carlo mean of the stochastic metric and its standard error;
    - ``chi_theory``, ``chi_mc``, ``chi_sem`` [A, S, L, 2]: (chi_parallel, chi_perp) of the first input at each
      layer's infinite-width kernel, and the Monte Carlo means of their per-network estimates (which differ from
      chi_theory at O(1/n));
    - ``variance_mc``, ``variance_sem``, ``variance_leading``, ``variance_exact`` [A, V, Lv]: normalised variance
      Var[G^(l)] / E[G^(l)]^2 of the first input's stochastic metric at criticality (0 at layer 1, whose metric is
      fixed): Monte Carlo, its delete-a-group jackknife standard error (:data:`VARIANCE_GROUPS` groups, see
      :meth:`physai.theory.RunningMoments.jackknife`), the leading order V / (n K^2), and the exact finite-width
      form for linear and ReLU (NaN otherwise)."""

    config: CriticalityConfig
    C_b: np.ndarray
    C_W_critical: np.ndarray
    kernel_theory: np.ndarray
    kernel_shift: np.ndarray
    kernel_mc: np.ndarray
    kernel_sem: np.ndarray
    chi_theory: np.ndarray
    chi_mc: np.ndarray
    chi_sem: np.ndarray
    variance_mc: np.ndarray
    variance_sem: np.ndarray
    variance_leading: np.ndarray
    variance_exact: np.ndarray

    def summary(self) -> list[dict]:
        """One dict per (activation, scale): C_b, C_W, the last layer's kernel K_aa and overlap K_ab (theory, Monte
        Carlo, standard error), chi_parallel and chi_perp at the last layer (theory), and the largest
        |Monte Carlo - (K + G1/n)| / standard error of the kernel over layers 2..L."""
        rows = []
        for a, name in enumerate(self.config.activations):
            for s, scale in enumerate(self.config.scales):
                K, M, E = self.kernel_theory[a, s], self.kernel_mc[a, s], self.kernel_sem[a, s]
                shifted = K + self.kernel_shift[a, s]
                z = np.abs(M[1:] - shifted[1:]) / np.where(E[1:] > 0, E[1:], np.nan)
                rows.append({"activation": name, "scale": scale, "C_b": float(self.C_b[a]),
                             "C_W": float(scale * self.C_W_critical[a]),
                             "K_aa_theory": float(K[-1, 0, 0]), "K_aa_mc": float(M[-1, 0, 0]),
                             "K_aa_sem": float(E[-1, 0, 0]), "K_ab_theory": float(K[-1, 0, 1]),
                             "K_ab_mc": float(M[-1, 0, 1]), "K_ab_sem": float(E[-1, 0, 1]),
                             "chi_parallel": float(self.chi_theory[a, s, -1, 0]),
                             "chi_perp": float(self.chi_theory[a, s, -1, 1]),
                             "kernel_max_abs_z": float(np.nanmax(z)) if np.isfinite(z).any() else math.nan})
        return rows

    def trajectories(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """Every array field with its dimensions (activation, scale, layer, input, input / chi / width)."""
        kernel = ("activation", "scale", "layer", "input_a", "input_b")
        chi = ("activation", "scale", "layer", "susceptibility")
        variance = ("activation", "width", "variance_layer")
        return {"kernel_theory": (kernel, self.kernel_theory), "kernel_shift": (kernel, self.kernel_shift),
                "kernel_mc": (kernel, self.kernel_mc),
                "kernel_sem": (kernel, self.kernel_sem), "chi_theory": (chi, self.chi_theory),
                "chi_mc": (chi, self.chi_mc), "chi_sem": (chi, self.chi_sem),
                "variance_mc": (variance, self.variance_mc), "variance_sem": (variance, self.variance_sem),
                "variance_leading": (variance, self.variance_leading),
                "variance_exact": (variance, self.variance_exact)}

    def figure(self):
        """The figure of :meth:`plot` as a matplotlib ``Figure`` (needs matplotlib: ``pip install physai[plot]``).

        Five rows, one column per activation: K_aa (log scale), K_ab, chi_parallel and chi_perp against depth for
        each scale (lines: theory, the kernel with its 1/n shift K + G1/n at ``width``, the susceptibilities at
        infinite width; points with error bars: Monte Carlo means and standard errors), then Var[G^(l)] / E[G^(l)]^2
        at criticality against (l - 1) / n for every width, layers 2.. (points: Monte Carlo with jackknife errors,
        which understate the spread beyond (l - 1) / n ~ 0.2; dashed: leading order; solid: exact finite-width form
        where one exists)."""
        import matplotlib.pyplot as plt

        config = self.config
        A = len(config.activations)
        fig, axes = plt.subplots(5, A, figsize=(4.5 * A, 16), squeeze=False)
        layers = np.arange(1, config.depth + 1)
        kernel = self.kernel_theory + self.kernel_shift
        for a, name in enumerate(config.activations):
            for s, scale in enumerate(config.scales):
                color = f"C{s}"
                label = f"C_W = {scale:g} C_W*" + (" (critical)" if scale == 1 else "")
                rows = [(array[a, s, :, 0, 0] for array in (kernel, self.kernel_mc, self.kernel_sem)),
                        (array[a, s, :, 0, 1] for array in (kernel, self.kernel_mc, self.kernel_sem)),
                        (array[a, s, :, 0] for array in (self.chi_theory, self.chi_mc, self.chi_sem)),
                        (array[a, s, :, 1] for array in (self.chi_theory, self.chi_mc, self.chi_sem))]
                for row, (theory, mc, sem) in enumerate(rows):
                    ax = axes[row, a]
                    ax.plot(layers, theory, color=color, lw=1, label=label)
                    ax.errorbar(layers, mc, yerr=sem, fmt="o", ms=3, color=color, capsize=2)
            titles = [f"kernel K_aa (lines: K + G1/n, n = {config.width})",
                      f"overlap K_ab (lines: K + G1/n, n = {config.width})", "chi_parallel (lines: n = inf)",
                      "chi_perp (lines: n = inf)"]
            for row, title in enumerate(titles):
                axes[row, a].set(xlabel="layer l", ylabel=title.split(" (")[0], title=f"{name}: {title}")
                axes[row, a].title.set_fontsize(9)
            axes[0, a].set_yscale("log")
            axes[0, a].legend(fontsize=7)
            ax = axes[4, a]
            # Layer 1's metric is fixed (zero variance): nothing to draw on a log scale.
            vlayers = np.arange(2, config.variance_depth + 1)
            for w, n in enumerate(config.variance_widths):
                color = f"C{w}"
                r = (vlayers - 1) / n
                ax.errorbar(r, self.variance_mc[a, w, 1:], yerr=self.variance_sem[a, w, 1:], fmt="o", ms=3,
                            color=color, capsize=2, label=f"n = {n}")
                ax.plot(r, self.variance_leading[a, w, 1:], color=color, ls="--", lw=1)
                if np.isfinite(self.variance_exact[a, w]).all():
                    ax.plot(r, self.variance_exact[a, w, 1:], color=color, lw=1)
            ax.set(xlabel="(l - 1) / n", ylabel="Var[G] / E[G]^2", yscale="log",
                   title=f"{name} at criticality: dashed leading order" +
                         (", solid exact" if np.isfinite(self.variance_exact[a]).all() else ""))
            ax.title.set_fontsize(9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def plot(self, path) -> None:
        """Write :meth:`figure` to ``path`` (PNG, 110 dpi; needs matplotlib: ``pip install physai[plot]``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = self.figure()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def run(config: CriticalityConfig = CriticalityConfig(), progress: bool = False) -> CriticalityResult:
    """Theory and Monte Carlo for every (activation, scale), then the variance study at criticality."""
    config = config.validated()
    X = make_inputs(config)
    A, S, L = len(config.activations), len(config.scales), config.depth
    Vw, Lv = len(config.variance_widths), config.variance_depth
    points = [critical_point(name) for name in config.activations]
    C_b = np.array([point.C_b for point in points])
    C_Wc = np.array([point.C_W for point in points])
    kernel_theory, kernel_shift, kernel_mc, kernel_sem = (np.empty((A, S, L, 2, 2)) for _ in range(4))
    chi_theory, chi_mc, chi_sem = (np.empty((A, S, L, 2)) for _ in range(3))
    variance = [np.full((A, Vw, Lv), np.nan) for _ in range(4)]
    jobs = [(a, s) for a in range(A) for s in range(S)]
    for a, s in _progress(jobs, total=len(jobs), desc="activation x scale", enabled=progress):
        name, scale, point = config.activations[a], config.scales[s], points[a]
        C_W = scale * point.C_W
        K = kernel_recursion(X, name, L, point.C_b, C_W)
        kernel_theory[a, s] = K
        kernel_shift[a, s] = finite_width_kernel(K[0], name, L, point.C_b, C_W).G1 / config.width
        chi_theory[a, s] = np.stack(susceptibilities(K[:, 0, 0], name, C_W), axis=-1)
        mc = sample_mlp(X, name, L, config.width, config.networks, C_b=point.C_b, C_W=C_W, method="metric",
                        seed=config.seed + a * S + s)
        kernel_mc[a, s], kernel_sem[a, s] = mc.metric.mean, mc.metric.sem
        chi_mc[a, s], chi_sem[a, s] = mc.susceptibilities.mean[..., 0], mc.susceptibilities.sem[..., 0]
    widths = list(enumerate(config.variance_widths))
    for a, (name, point) in enumerate(zip(config.activations, points)):
        fw = finite_width(point.C_b + point.C_W * config.input_norm, name, Lv, point.C_b, point.C_W)
        for w, n in _progress(widths, total=Vw, desc=f"{name} variance", enabled=progress):
            mc = sample_mlp(X[:1], name, Lv, n, config.variance_networks, C_b=point.C_b, C_W=point.C_W,
                            method="metric", groups=VARIANCE_GROUPS, seed=config.seed + 1000 + a * Vw + w)
            # Jackknife errors need no sample fourth moments. Beyond (l - 1) / n ~ 0.2 the heavy tails of narrow
            # deep networks make them, like the delta method's, too small in most samples (up to 1.75x measured
            # with 2 10^4 networks: tests/test_theory_montecarlo.py).
            estimate, sem = mc.metric.jackknife(lambda m: m.normalized_variance)
            variance[0][a, w], variance[1][a, w] = estimate[:, 0, 0], sem[:, 0, 0]
            variance[2][a, w] = fw.metric_variance(n)
            if name in ("linear", "relu") and point.C_b == 0:
                variance[3][a, w] = exact_metric_variance(name, Lv, n)
    return CriticalityResult(config, C_b, C_Wc, kernel_theory, kernel_shift, kernel_mc, kernel_sem, chi_theory, chi_mc,
                             chi_sem, *variance)


add_parser = experiment_command(
    "criticality", __name__, help="kernel recursions and criticality vs Monte Carlo",
    description="Kernel and susceptibilities vs depth below, at and above criticality, and the finite-width "
                "variance vs depth/width, theory against Monte Carlo ensembles of deep MLPs.")


Config = CriticalityConfig
Result = CriticalityResult
