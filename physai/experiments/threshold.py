"""Threshold neurons on sparse coding (Ahn, Bubeck, Chewi, Lee, Suarez, Zhang, "Learning threshold neurons via the
edge of stability", arXiv 2212.07469, NeurIPS 2023): only a learning rate above a critical one makes gradient descent
learn a negative shared bias, i.e. ReLU units that fire only above a threshold, and the edge of stability is how.

Task (the paper's eq. (1)): x = lam y e_j + xi, with y uniform on {-1, +1}, j uniform in [d], xi ~ N(0, I_d); the label
is y. Network (eq. (2)): ReLU units on +-x_i with one output weight per sign and one shared bias,
``physai.twolayer.shared_bias``,

    f(x) = a+ sum_i ReLU(x_i + b) + a- sum_i ReLU(-x_i + b),

full-batch GD on the mean logistic loss. Figure 1 of the paper (read: its caption and axes): d = 200, n = 300,
lam = 3, a+-  ~ N(0, 1/(2d)), b = 0, ceil(10 / eta) iterations at each rate (the same total time), rates up to 0.012,
and the predicted transition eta* = 8 pi / d^2 (6.28e-4). The paper's section 2 could not be read here (only its
first page is reachable through physai's tools); what fixes the network's form is the threshold itself: eta* is
exactly the linear-stability threshold of this weight-shared network on the averaged, signal-free population loss
(below; with the signal and 300 samples the measured sharpness at init puts it at 0.985 eta*), while a network
with one output weight per unit would have its even mode unstable at 8 pi / d (averaged loss) or 8 pi / (n d)
(summed), and interpolates the 300 samples with 400 weights (measured in an earlier version of this module: its
final bias drifts positive at every rate, test accuracy below the zero-bias 0.584).

Mean model (the paper's two-parameter reduction; derived here): take the population loss and neglect the signal;
then sum_i ReLU(+-xi_i + b) ~= d h(b), h(b) = E ReLU(xi + b) = b Phi(b) + phi(b), so f ~= (a+ + a-) d h(b) =
a d g(b) with a = (a+ + a-) / 2, g = 2 h, and the loss is l_sym(a d g(b)), l_sym(s) = (l(s) + l(-s)) / 2. GD at rate
eta on (a+, a-, b) moves a and b by

    a' = a - eta d g(b) / 2 * l_sym'(a d g(b)),      b' = b - eta a d g'(b) l_sym'(a d g(b)),      g'(b) = 2 Phi(b),

with l_sym'(s) = tanh(s / 2) / 2 (``mean_model_step``). Near a = 0: a' = (1 - eta d^2 g(b)^2 / 8) a, and at b = 0
(g(0)^2 = 2 / pi) the fixed point is unstable iff eta > eta* = 8 pi / d^2. Below eta*, a decays and b stays; above,
a oscillates (the edge of stability) and every oscillation pushes b down (l_sym'(s) s > 0, g' > 0) until
d^2 g(b)^2 / 8 < 2 / eta: g(b) = g(0) sqrt(eta* / eta) bounds the final bias from above (``mean_model_bias_bound``).

Measured with the default (Figure 1) config, 8 seeds: the final bias is the same at every rate below eta* (-0.22,
the bias gradient flow learns from the signal in time 10) and falls from 1.15 eta* on (-0.27, -0.47 and -0.77 at
1.15, 1.7 and 3 eta*), the sharpness reaches 2 / eta only above eta*, and test accuracy rises from the zero-bias
0.584 to 0.62 at 3 eta*. The network's drop below its below-eta* bias exceeds the mean model's (-0.35 against
-0.27 at 2 eta*, -0.55 against -0.40 at 3 eta*): the mean model neglects the signal, which keeps moving the bias
after the oscillation stops (the trajectories of ``plot``); that share is measured, not derived.

    from physai.experiments.threshold import ThresholdConfig, run
    result = run(ThresholdConfig.small(), progress=True)
    result.summary(); result.plot("threshold.png")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from scipy.optimize import brentq
from scipy.special import ndtr

from physai._checks import check_float, check_int
from physai._progress import progress as _progress
from physai.experiments._base import ExperimentConfig, ExperimentResult
from physai.experiments._cli import experiment_command
from physai.twolayer import shared_bias


def eta_star(d: int) -> float:
    """The paper's predicted critical learning rate 8 pi / d^2: the mean model's fixed point a = 0, b = 0 is
    unstable above it (module docstring). Raises ValueError/TypeError for a bad ``d``."""
    return 8 * math.pi / check_int(d, "d", min=1) ** 2


def zero_bias_accuracy(lam: float, d: int) -> float:
    """Accuracy of the b = 0 network with a+ = -a-, f = a+ sum_i x_i = a+ (lam y + N(0, d)): Phi(lam / sqrt(d))
    (0.584 at the paper's lam = 3, d = 200, the 58 % tick of its Figure 1)."""
    return 0.5 * (1 + math.erf(check_float(lam, "lam", nonnegative=True) / math.sqrt(2 * check_int(d, "d", min=1))))


def sparse_coding_data(n: int, d: int, lam: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n samples of the paper's eq. (1): X [n, d] = lam y e_j + xi and labels y [n] in {-1, +1} (float64)."""
    y = rng.choice(np.array([-1.0, 1.0]), size=n)
    j = rng.integers(0, d, size=n)
    X = rng.standard_normal((n, d))
    X[np.arange(n), j] += lam * y
    return X, y


def _g(b):
    """g(b) = 2 E ReLU(xi + b) = E[ReLU(xi + b) + ReLU(-xi + b)], xi ~ N(0, 1), and g'(b) = 2 Phi(b)."""
    b = np.asarray(b, np.float64)
    Phi = ndtr(b)
    phi = np.exp(-b**2 / 2) / math.sqrt(2 * math.pi)
    return 2 * (b * Phi + phi), 2 * Phi


def mean_model_loss(a, b, d: int, g=_g):
    """The mean model's loss l_sym(a d g(b)) = (softplus(-s) + softplus(s)) / 2, s = a d g(b) (module docstring)."""
    s = np.asarray(a, np.float64) * d * g(b)[0]
    return 0.5 * (np.logaddexp(0.0, -s) + np.logaddexp(0.0, s))


def mean_model_step(a, b, eta, d: int, g=_g):
    """One GD step of the two-parameter mean model (module docstring): arrays a, b, eta of one shape (float64) ->
    (a', b'), with a = (a+ + a-) / 2. ``g(b) -> (g, g')`` defaults to the Gaussian-noise g(b) = 2 (b Phi(b) + phi(b)),
    g' = 2 Phi(b); pass an empirical one (sums over a data set / d) to get the network on that data set exactly, at
    a+ = a- = a."""
    a, b, eta = (np.asarray(v, np.float64) for v in (a, b, eta))
    gb, dgb = g(b)
    slope = 0.5 * np.tanh(0.5 * a * d * gb)  # l_sym'(s) = (sigmoid(s) - sigmoid(-s)) / 2 = tanh(s / 2) / 2
    return a - eta * 0.5 * d * gb * slope, b - eta * a * d * dgb * slope


def mean_model_bias_bound(eta: float, d: int) -> float:
    """The largest bias at which the mean model's a = 0 is stable at rate eta: the root of
    g(b) = g(0) sqrt(eta* / eta) for eta > eta* (0 at or below eta*). Above eta* the oscillation stops only once b is
    below it, so the final bias of the mean model is at most this (module docstring)."""
    ratio = eta_star(d) / check_float(eta, "eta", positive=True)
    if ratio >= 1:
        return 0.0
    target = _g(0.0)[0] * math.sqrt(ratio)
    return brentq(lambda b: float(_g(b)[0]) - target, -40.0, 0.0)


MAX_ITERATIONS = 10**7  # per member: about 100 s at n = 300 on one core


@dataclass(frozen=True)
class ThresholdConfig(ExperimentConfig):
    """The task, network, initialisation, time horizon and learning rates (in units of eta* = 8 pi / d^2; a sweep
    axis ``lr_multiplier`` folds into ``lr_multipliers``), with ``seeds`` data sets and initialisations per rate.

    The default is the paper's Figure 1 setting (d = 200, n = 300, lam = 3, a+- ~ N(0, 1/(2d)), b = 0,
    ceil(10 / eta) iterations) over the issue's grid, 13 rates from 0.3 to 3 eta* with 8 seeds: about 15 s on two
    cores. ``figure1()`` widens the grid to the paper's axis (up to 0.012 = 19 eta*)."""

    ensemble_axes: ClassVar[dict[str, str]] = {"lr_multiplier": "lr_multipliers"}

    lr_multipliers: tuple[float, ...] = field(default=tuple(float(v) for v in np.geomspace(0.3, 3.0, 13)),
                                              metadata={"help": "learning rates in units of eta* = 8 pi / d^2"})
    d: int = field(default=200, metadata={"help": "input dimension"})
    n: int = field(default=300, metadata={"help": "training samples"})
    n_test: int = field(default=4000, metadata={"help": "test samples"})
    lam: float = field(default=3.0, metadata={"help": "signal strength lambda"})
    init_std: float | None = field(default=None, metadata={"help": "std of a+- at init (none: the paper's "
                                                                   "1/sqrt(2d))"})
    time: float = field(default=10.0, metadata={"help": "iterations = ceil(time / eta)"})
    seeds: int = field(default=8, metadata={"help": "data sets and initialisations per learning rate"})
    records: int = field(default=200, metadata={"help": "states recorded per member (denser early: step "
                                                        "round(T (r / (records - 1))^2))"})
    seed: int = field(default=0, metadata={"help": "seed"})

    @classmethod
    def small(cls) -> "ThresholdConfig":
        """The configuration CI runs (a few seconds): the paper's setting at 0.5, 0.8, 1.25, 2 and 3 eta*, 4 seeds,
        100 records."""
        return cls(lr_multipliers=(0.5, 0.8, 1.25, 2.0, 3.0), seeds=4, records=100)

    @classmethod
    def figure1(cls) -> "ThresholdConfig":
        """The paper's Figure 1 axis: 16 rates from 0.3 eta* to 0.012 (19.1 eta*), 8 seeds."""
        return cls(lr_multipliers=tuple(float(v) for v in np.geomspace(0.3, 0.012 / eta_star(200), 16)))

    @property
    def learning_rates(self) -> np.ndarray:
        """[L] the learning rates, ``lr_multipliers`` times eta*."""
        return np.asarray(self.lr_multipliers) * eta_star(self.d)

    def validated(self) -> "ThresholdConfig":
        """This config, after checking every field (ValueError/TypeError naming the field)."""
        if not self.lr_multipliers:
            raise ValueError("lr_multipliers: expected at least one learning rate")
        for v in self.lr_multipliers:
            check_float(v, "lr_multipliers", positive=True)
        for name in ("d", "n", "n_test", "seeds"):
            check_int(getattr(self, name), name, min=1)
        check_int(self.records, "records", min=2)
        check_int(self.seed, "seed", min=0)
        check_float(self.lam, "lam", nonnegative=True)
        check_float(self.time, "time", positive=True)
        if self.init_std is not None:
            check_float(self.init_std, "init_std", nonnegative=True)
        longest = self.time / (min(self.lr_multipliers) * eta_star(self.d))
        if longest > MAX_ITERATIONS:
            raise ValueError(f"lr_multipliers: the smallest rate needs time / eta = {longest:.3g} iterations, more than "
                             f"{MAX_ITERATIONS:.0e} (one native call, which cannot be interrupted); raise the rate or "
                             f"lower time")
        return self


def _iterations(config: ThresholdConfig) -> np.ndarray:
    # the 1e-9 keeps an exact ratio (time 10 at eta = 0.001) from rounding up to one step more
    return np.maximum(np.ceil(config.time / config.learning_rates - 1e-9), 1).astype(np.int64)


@dataclass
class ThresholdResult(ExperimentResult):
    """Per learning rate l and seed s (float64 unless said): final_bias, final_mean_model_bias, train_accuracy,
    test_accuracy, final_loss [L, S]; at each member's own recorded iterations record_steps [R, L, S] (int64, from 0
    to its ceil(time / eta)): bias, loss, sharpness (top eigenvalue of the 3 x 3 loss Hessian), mean_model_bias (the
    mean model from the member's initial a = (a+ + a-) / 2 and b = 0) [R, L, S]."""

    config: ThresholdConfig
    final_bias: np.ndarray
    final_mean_model_bias: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray
    final_loss: np.ndarray
    record_steps: np.ndarray
    bias: np.ndarray
    loss: np.ndarray
    sharpness: np.ndarray
    mean_model_bias: np.ndarray

    def summary(self) -> list[dict]:
        """One dict per learning rate (the ensemble member), seeds averaged: lr, lr_over_eta_star, iterations,
        final_bias (mean) and final_bias_std, mean_model_final_bias, mean_model_bias_bound, min_bias (the recorded
        trajectory's minimum), train_accuracy, test_accuracy, zero_bias_accuracy, eta_star, final_loss,
        two_over_lr, max_sharpness (over the records) and final_sharpness."""
        config = self.config
        iterations = _iterations(config)
        rows = []
        for l, lr in enumerate(config.learning_rates):
            rows.append({"lr": float(lr), "lr_over_eta_star": config.lr_multipliers[l],
                         "iterations": int(iterations[l]), "final_bias": float(self.final_bias[l].mean()),
                         "final_bias_std": float(self.final_bias[l].std()),
                         "mean_model_final_bias": float(self.final_mean_model_bias[l].mean()),
                         "mean_model_bias_bound": mean_model_bias_bound(float(lr), config.d),
                         "min_bias": float(self.bias[:, l].min(axis=0).mean()),
                         "train_accuracy": float(self.train_accuracy[l].mean()),
                         "test_accuracy": float(self.test_accuracy[l].mean()),
                         "zero_bias_accuracy": zero_bias_accuracy(config.lam, config.d),
                         "eta_star": eta_star(config.d), "final_loss": float(self.final_loss[l].mean()),
                         "two_over_lr": float(2 / lr), "max_sharpness": float(self.sharpness[:, l].max(axis=0).mean()),
                         "final_sharpness": float(self.sharpness[-1, l].mean())})
        return rows

    def report(self) -> str:
        """eta* and the zero-bias accuracy, then per learning rate the seed-mean final bias (network, mean model and
        the mean model's bound), accuracies and the largest sharpness beside 2/eta (what ``physai threshold``
        prints)."""
        config = self.config
        lines = [f"eta* = 8 pi / d^2 = {eta_star(config.d):.4g}, zero-bias accuracy "
                 f"{zero_bias_accuracy(config.lam, config.d):.3f}",
                 f"{'eta/eta*':>9} {'bias':>8} {'mean model':>11} {'bound':>7} {'train acc':>9} {'test acc':>9} "
                 f"{'max sharp':>10} {'2/eta':>8}"]
        for row in self.summary():
            lines.append(f"{row['lr_over_eta_star']:>9.3g} {row['final_bias']:>8.3f} "
                         f"{row['mean_model_final_bias']:>11.3f} {row['mean_model_bias_bound']:>7.3f} "
                         f"{row['train_accuracy']:>9.3f} {row['test_accuracy']:>9.3f} {row['max_sharpness']:>10.4g} "
                         f"{row['two_over_lr']:>8.4g}")
        return "\n".join(lines)

    def trajectories(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """``record_step``, ``bias``, ``loss``, ``sharpness``, ``mean_model_bias`` (record, member, seed); ``member``
        indexes the learning rates."""
        axes = ("record", "member", "seed")
        return {"record_step": (axes, self.record_steps), "bias": (axes, self.bias), "loss": (axes, self.loss),
                "sharpness": (axes, self.sharpness), "mean_model_bias": (axes, self.mean_model_bias)}

    def plot(self, path) -> None:
        """Final bias (network, mean model, the mean model's bound) and test accuracy vs eta with eta* marked; bias
        and sharpness (with 2/eta dashed) against time eta t at a few rates. Needs matplotlib
        (``pip install physai[plot]``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        config = self.config
        lrs = config.learning_rates
        star = eta_star(config.d)
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        ax = axes[0, 0]
        ax.errorbar(lrs, self.final_bias.mean(1), yerr=self.final_bias.std(1), fmt="o-", ms=4, label="network")
        ax.plot(lrs, self.final_mean_model_bias.mean(1), "s--", ms=4, label="mean model")
        ax.plot(lrs, [mean_model_bias_bound(float(lr), config.d) for lr in lrs], "k:", lw=1,
                label=r"mean model's bound: $g(b) = g(0)\sqrt{\eta^*/\eta}$")
        ax.axvline(star, color="r", ls=":", label=r"$\eta^* = 8\pi/d^2$")
        ax.set(xscale="log", xlabel=r"learning rate $\eta$", ylabel="final bias b",
               title=f"bias after time {config.time:g}")
        ax.legend(fontsize=8)
        ax = axes[0, 1]
        ax.errorbar(lrs, 100 * self.test_accuracy.mean(1), yerr=100 * self.test_accuracy.std(1), fmt="o-", ms=4)
        ax.axhline(100 * zero_bias_accuracy(config.lam, config.d), color="gray", ls="--",
                   label=r"$b=0$: $\Phi(\lambda/\sqrt{d})$")
        ax.axvline(star, color="r", ls=":")
        ax.set(xscale="log", xlabel=r"learning rate $\eta$", ylabel="test accuracy (%)", title="test accuracy")
        ax.legend(fontsize=8)
        shown = sorted({0, int(np.searchsorted(lrs, star)), len(lrs) - 1})
        for i, l in enumerate(shown):
            color = f"C{i}"
            time = lrs[l] * self.record_steps[:, l, 0]
            axes[1, 0].plot(time, self.bias[:, l, 0], color=color, label=rf"$\eta = {config.lr_multipliers[l]:.2g}\eta^*$")
            axes[1, 0].plot(time, self.mean_model_bias[:, l, 0], color=color, ls="--", lw=1)
            axes[1, 1].plot(time, self.sharpness[:, l, 0], color=color)
            axes[1, 1].axhline(2 / lrs[l], color=color, ls="--", lw=1)
        axes[1, 0].set(xlabel=r"time $\eta t$", ylabel="bias b", title="bias, seed 0 (dashed: mean model)")
        axes[1, 0].legend(fontsize=8)
        axes[1, 1].set(xlabel=r"time $\eta t$", ylabel="sharpness", yscale="log", title="sharpness; dashed: 2/eta")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _mean_model(a0, lr, iterations, record_steps, d: int):
    """The mean model from (a0, 0) at each member's rate for its own iterations: its bias at the records [R, E] and
    at the end [E]."""
    a, b = a0.copy(), np.zeros_like(a0)
    recorded = np.full(record_steps.shape, np.nan)
    for t in range(int(iterations.max(initial=0)) + 1):
        r, e = np.nonzero(record_steps == t)
        recorded[r, e] = b[e]
        live = t < iterations
        a[live], b[live] = mean_model_step(a[live], b[live], lr[live], d)
    return recorded, b


def run(config: ThresholdConfig = ThresholdConfig(), progress: bool = False) -> ThresholdResult:
    """Train every (learning rate, seed) member in one native ensemble call (``physai.twolayer.shared_bias.train``),
    each for ceil(time / eta) iterations, with the mean model run alongside from the same initial a. Seed s draws its
    training set, test set and initialisation from ``numpy.random.default_rng([seed, s])``, shared by all rates.
    ``progress`` shows a bar over the three stages (network, mean model, accuracy)."""
    config = config.validated()
    d, L, S, R = config.d, len(config.lr_multipliers), config.seeds, config.records
    std = 1 / math.sqrt(2 * d) if config.init_std is None else config.init_std
    X, y, X_test, y_test, init = [], [], [], [], []
    for s in range(S):
        rng = np.random.default_rng([config.seed, s])
        for (X_s, y_s), xs, ys in ((sparse_coding_data(config.n, d, config.lam, rng), X, y),
                                   (sparse_coding_data(config.n_test, d, config.lam, rng), X_test, y_test)):
            xs.append(X_s)
            ys.append(y_s)
        init.append(std * rng.standard_normal(2))
    dataset = np.tile(np.arange(S), L)                     # member l * S + s: rate l, seed s
    lr = np.repeat(config.learning_rates, S)
    iterations = np.repeat(_iterations(config), S)
    a_plus, a_minus = np.asarray(init)[dataset].T
    record_steps = np.rint(iterations * (np.arange(R)[:, None] / (R - 1)) ** 2).astype(np.int64)  # [R, E]
    stages = _progress(("network", "mean model", "accuracy"), total=3, desc="threshold neurons", enabled=progress)
    next(stages)
    trained = shared_bias.train(np.asarray(X), np.asarray(y), a_plus, a_minus, np.zeros(L * S), lr, iterations,
                                record_steps, dataset)
    next(stages)
    mean_bias, final_mean_bias = _mean_model(0.5 * (a_plus + a_minus), lr, iterations, record_steps, d)
    next(stages)
    train_acc, test_acc = np.empty(L * S), np.empty(L * S)
    for s in range(S):
        idx = np.arange(s, L * S, S)
        params = trained.a_plus[idx], trained.a_minus[idx], trained.b[idx]
        train_acc[idx] = (np.sign(shared_bias.output(X[s], *params)) == y[s]).mean(axis=1)
        test_acc[idx] = (np.sign(shared_bias.output(X_test[s], *params)) == y_test[s]).mean(axis=1)
    next(stages, None)
    final_loss = trained.loss[-1]
    by_seed = (L, S)
    return ThresholdResult(config, trained.b.reshape(by_seed), final_mean_bias.reshape(by_seed),
                           train_acc.reshape(by_seed), test_acc.reshape(by_seed), final_loss.reshape(by_seed),
                           record_steps.reshape(R, L, S), trained.params[..., 2].reshape(R, L, S),
                           trained.loss.reshape(R, L, S), trained.sharpness.reshape(R, L, S),
                           mean_bias.reshape(R, L, S))


add_parser = experiment_command(
    "threshold", __name__, help="threshold neurons via the edge of stability (Ahn et al. 2022)",
    description="GD on the paper's ReLU network with one shared bias on sparse coding: only rates above eta* = "
                "8 pi / d^2 learn a negative bias (threshold neurons).")


Config = ThresholdConfig
Result = ThresholdResult
