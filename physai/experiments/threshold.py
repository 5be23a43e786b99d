"""Threshold neurons on sparse coding (Ahn, Bubeck, Chewi, Lee, Suarez, Zhang, "Learning threshold neurons via the edge
of stability", arXiv 2212.07469, NeurIPS 2023): only a learning rate above a critical one makes gradient descent learn
a negative shared bias, i.e. ReLU units that fire only above a threshold, and the edge of stability is how.

Task (the paper's eq. (1)): x = lam y e_j + xi, with y uniform on {-1, +1}, j uniform in [d], xi ~ N(0, I_d); the label
is y. Network (the paper's eq. (2)): first-layer directions fixed to +-e_i, one shared bias b,

    f(x) = sum_i [ a+_i ReLU(x_i + b) + a-_i ReLU(-x_i + b) ].

Figure 1 of the paper (read: its caption, d = 200, n = 300, lam = 3, GD on the logistic loss; the rest from physai's
notes on the paper): a+-_i ~ N(0, 1/(2d)), b = 0, ceil(10 / eta) iterations (the same total time at every rate), the
logistic loss summed over the n samples (``loss="sum"``; ``"mean"`` averages it), predicted transition
eta* = 8 pi / d^2. ``ThresholdConfig.figure1()`` is that setting; in this exact implementation it does not show the
transition (the network interpolates its 300 samples with 400 weights and the bias drifts positive at every rate;
measured, see ``ThresholdConfig``), so the default, documented full configuration keeps the paper's network, data,
lam and protocol and takes n = 20 d samples, the averaged loss and a small initialisation, where it does.

Mean model (the paper's two-parameter reduction, derived here: section 2 of the paper could not be read; the form
below is the one whose linear stability threshold is exactly the paper's 8 pi / d^2): tie the weights, a+_i = a+,
a-_i = a-, take the population loss and neglect the signal; then sum_i ReLU(+-xi_i + b) ~= d h(b), h(b) = E ReLU(xi + b)
= b Phi(b) + phi(b), f ~= (a+ + a-) d h(b) = a d g(b) with a = (a+ + a-) / 2, g = 2 h, and the loss is
l_sym(a d g(b)), l_sym(s) = (l(s) + l(-s)) / 2. GD on (a+, a-, b) moves a = (a+ + a-)/2 and b by the map

    a' = a - eta d g(b) / 2 * l_sym'(a d g(b)),      b' = b - eta a d g'(b) l_sym'(a d g(b)),      g'(b) = 2 Phi(b),

with l_sym'(s) = tanh(s / 2) / 2 (``mean_model_step``). Near a = 0: a' = (1 - eta d^2 g(b)^2 / 8) a, and at b = 0
(g(0)^2 = 2 / pi) the fixed point is unstable iff eta > eta* = 8 pi / d^2. Below eta*, a decays and b barely moves;
above it, a oscillates (the edge of stability), every oscillation pushes b down (l_sym'(s) s > 0, g' > 0), until
d^2 g(b)^2 / 8 < 2 / eta, i.e. g(b) is small enough for the oscillation to stop.

The network itself (untied weights) has the same unstable mode, the even mode a+-_i = const, with per-sample
curvature at init ``even_mode_curvature`` = E[S^2] / (8 d), S = sum_i |x_i| (~ d / (4 pi)). Its predicted critical
rate ``critical_lr`` is 2 over that times n for the summed loss (~= 8 pi / (n d) = (d / n) eta*: 2/3 eta* in Figure 1)
and 2 over it for the averaged loss (~= 8 pi / d); the learning rates of a config are multiples of it. With the loss
averaged the Figure 1 transition would sit at 8 pi / d = 0.126, far right of the paper's axis (eta <= 0.012), so the
summed loss is the one consistent with the figure. Restricted to a+-_i = a (on the population loss, where that
set is invariant), the untied network is ``mean_model_step``
with the a-rate eta s / d and the b-rate eta s (s = n summed, 1 averaged); ``run`` iterates that exact reduction
alongside the network.

The two-layer kernels of ``physai.twolayer`` have one bias per unit and free first-layer weights, so they cannot
express the shared bias: the network is trained here as an exact vectorised numpy ensemble (all learning rates and
seeds at once, batched matmuls; members whose ceil(time / eta) iterations are done drop out of the batch).

    from physai.experiments.threshold import ThresholdConfig, run
    result = run(ThresholdConfig.small(), progress=True)
    result.summary(); result.plot("threshold.png")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from scipy.special import expit, ndtr

from physai._checks import check_array, check_choice, check_float, check_int
from physai._progress import progress as _progress
from physai.experiments._base import ExperimentConfig, ExperimentResult
from physai.experiments._cli import experiment_command


LOSSES = ("sum", "mean")


def eta_star(d: int) -> float:
    """The paper's predicted critical learning rate 8 pi / d^2: the mean model's fixed point a = 0, b = 0 is
    unstable above it (module docstring). Raises ValueError/TypeError for a bad ``d``."""
    return 8 * math.pi / check_int(d, "d", min=1) ** 2


def even_mode_curvature(d: int, lam: float) -> float:
    """The per-sample loss curvature at init (f ~ 0, b = 0) along the even mode a+-_i = const: l''(0) E[S^2] / (2d)
    with S = sum_i (ReLU(x_i) + ReLU(-x_i)) = sum_i |x_i|, l''(0) = 1/4, and S's mean and variance taken with the
    signal coordinate: E|lam + xi| = lam (2 Phi(lam) - 1) + 2 phi(lam), E(lam + xi)^2 = lam^2 + 1. It is
    d / (4 pi) + O(1 + lam) and, this mode dominating the Hessian, the sharpness at init per sample (times n for the
    summed loss) up to the sampling error of the n samples (derived here)."""
    d = check_int(d, "d", min=1)
    lam = check_float(lam, "lam", nonnegative=True)
    noise_mean, noise_var = math.sqrt(2 / math.pi), 1 - 2 / math.pi
    signal_mean = lam * math.erf(lam / math.sqrt(2)) + 2 * math.exp(-lam**2 / 2) / math.sqrt(2 * math.pi)
    signal_var = lam**2 + 1 - signal_mean**2
    mean = (d - 1) * noise_mean + signal_mean
    var = (d - 1) * noise_var + signal_var
    return (var + mean**2) / (8 * d)


def critical_lr(d: int, n: int, lam: float, loss: str = "sum") -> float:
    """The network's own predicted transition: 2 over the even mode's curvature at init, ``even_mode_curvature``
    times n for the summed loss (~= 8 pi / (n d) = (d / n) eta*), times 1 for the averaged one (~= 8 pi / d)."""
    n = check_int(n, "n", min=1)
    scale = n if check_choice(loss, "loss", LOSSES) == "sum" else 1
    return 2 / (scale * even_mode_curvature(d, lam))


def zero_bias_accuracy(lam: float, d: int) -> float:
    """Accuracy of the b = 0 network with a+ = -a- = const, f = const * sum_i x_i = const (lam y + N(0, d)):
    Phi(lam / sqrt(d)) (0.584 at the paper's lam = 3, d = 200, the 58 % tick of its Figure 1)."""
    return 0.5 * (1 + math.erf(lam / math.sqrt(2 * d)))


def sparse_coding_data(n: int, d: int, lam: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n samples of the paper's eq. (1): X [n, d] = lam y e_j + xi and labels y [n] in {-1, +1} (float64)."""
    y = rng.choice(np.array([-1.0, 1.0]), size=n)
    j = rng.integers(0, d, size=n)
    X = rng.standard_normal((n, d))
    X[np.arange(n), j] += lam * y
    return X, y


def _check_params(a_plus, a_minus, b):
    a_plus = check_array(np.asarray(a_plus, np.float64), "a_plus", ndim=2, contiguous=False)
    a_minus = check_array(np.asarray(a_minus, np.float64), "a_minus", shape=a_plus.shape, contiguous=False)
    b = check_array(np.asarray(b, np.float64), "b", shape=(a_plus.shape[0],), contiguous=False)
    return a_plus, a_minus, b


def _features(X, b):
    """ReLU(x_i + b), ReLU(-x_i + b) and their activity indicators, [E, n, d] each."""
    Zp = X[None] + b[:, None, None]
    Zm = b[:, None, None] - X[None]
    Ip, Im = (Zp > 0).astype(np.float64), (Zm > 0).astype(np.float64)
    return np.maximum(Zp, 0, out=Zp), np.maximum(Zm, 0, out=Zm), Ip, Im


def network_output(a_plus: np.ndarray, a_minus: np.ndarray, b: np.ndarray, X: np.ndarray) -> np.ndarray:
    """f(x) of the paper's eq. (2) for each of E members: a_plus, a_minus [E, d], b [E], X [n, d] -> [E, n]
    (float64). Raises ValueError naming a mis-shaped argument."""
    a_plus, a_minus, b = _check_params(a_plus, a_minus, b)
    X = check_array(np.asarray(X, np.float64), "X", shape=(None, a_plus.shape[1]), contiguous=False)
    Rp, Rm, _, _ = _features(X, b)
    return np.einsum("end,ed->en", Rp, a_plus) + np.einsum("end,ed->en", Rm, a_minus)


def _scale(loss: str, n: int) -> float:
    return 1.0 if check_choice(loss, "loss", LOSSES) == "sum" else 1.0 / n


def loss_and_grad(a_plus, a_minus, b, X, y, loss: str = "sum"):
    """Logistic loss sum_k log(1 + exp(-y_k f(x_k))) (``loss="sum"``, the paper's) or its mean over the n samples
    (``"mean"``) of each member [E] and its gradient (d a_plus [E, d], d a_minus [E, d], d b [E]), float64. The bias
    derivative uses ReLU'(0) = 0."""
    a_plus, a_minus, b = _check_params(a_plus, a_minus, b)
    scale = _scale(loss, X.shape[0])
    Rp, Rm, Ip, Im = _features(X, b)
    f = np.einsum("end,ed->en", Rp, a_plus) + np.einsum("end,ed->en", Rm, a_minus)
    margin = y[None] * f
    value = scale * np.logaddexp(0.0, -margin).sum(axis=1)
    g = -scale * expit(-margin) * y[None]  # dL/df per sample
    grad_b = np.einsum("en,end,ed->e", g, Ip, a_plus) + np.einsum("en,end,ed->e", g, Im, a_minus)
    return value, (np.einsum("en,end->ed", g, Rp), np.einsum("en,end->ed", g, Rm), grad_b)


def hessian(a_plus, a_minus, b, X, y, loss: str = "sum") -> np.ndarray:
    """Each member's loss Hessian in (a_plus, a_minus, b), [E, 2d + 1, 2d + 1] (float64): the Gauss-Newton part
    c sum_k l''(y f) J_k J_k^T plus c sum_k l'(y f) y d^2 f (c = 1 for ``loss="sum"``, 1/n for ``"mean"``), whose only
    nonzero second derivatives of f are d^2 f / da+-_i db = 1(+-x_i + b > 0) (f is linear in a and piecewise linear
    in b, so d^2 f / db^2 = 0 a.e.)."""
    a_plus, a_minus, b = _check_params(a_plus, a_minus, b)
    scale = _scale(loss, X.shape[0])
    Rp, Rm, Ip, Im = _features(X, b)
    f = np.einsum("end,ed->en", Rp, a_plus) + np.einsum("end,ed->en", Rm, a_minus)
    margin = y[None] * f
    n, d = X.shape
    p = expit(-margin)
    curvature = scale * p * (1 - p)                              # c l''(y f), with y^2 = 1
    first = -scale * p * y[None]                                 # c l'(y f) y
    df_db = np.einsum("end,ed->en", Ip, a_plus) + np.einsum("end,ed->en", Im, a_minus)
    J = np.concatenate([Rp, Rm, df_db[:, :, None]], axis=2)     # [E, n, 2d + 1]
    H = np.ascontiguousarray((J * curvature[:, :, None]).transpose(0, 2, 1)) @ J  # contiguous: a BLAS GEMM
    cross = np.concatenate([np.einsum("en,end->ed", first, Ip), np.einsum("en,end->ed", first, Im)], axis=1)
    H[:, :2 * d, 2 * d] += cross
    H[:, 2 * d, :2 * d] += cross
    return H


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


def mean_model_step(a, b, eta, d: int, g=_g, eta_b=None):
    """One GD step of the two-parameter mean model (module docstring): arrays a, b, eta of one shape (float64) ->
    (a', b'), with a = (a+ + a-) / 2 the tied weights' mean. ``g(b) -> (g, g')`` defaults to the Gaussian-noise
    g(b) = 2 (b Phi(b) + phi(b)), g' = 2 Phi(b); pass an empirical one for a finite data set. ``eta_b`` (default
    ``eta``) is the bias's rate: the untied network restricted to a+-_i = a, trained at rate eta with the loss
    scaled by s (n summed, 1 averaged), is this map with eta -> eta s / d and eta_b = eta s exactly."""
    a, b, eta = (np.asarray(v, np.float64) for v in (a, b, eta))
    eta_b = eta if eta_b is None else np.asarray(eta_b, np.float64)
    gb, dgb = g(b)
    slope = 0.5 * np.tanh(0.5 * a * d * gb)  # l_sym'(s) = (sigmoid(s) - sigmoid(-s)) / 2 = tanh(s / 2) / 2
    return a - eta * 0.5 * d * gb * slope, b - eta_b * a * d * dgb * slope


@dataclass(frozen=True)
class ThresholdConfig(ExperimentConfig):
    """The task, network, initialisation law, loss and time horizon, with the learning rates given as multiples of
    the config's predicted critical rate ``critical_lr`` (the even mode's instability at init; a sweep axis
    ``lr_multiplier`` folds into ``lr_multipliers``) and ``seeds`` initialisations and data sets per rate.

    The default, the documented full configuration (about a minute on two cores), is the paper's network, data,
    lam and ceil(10 / eta) protocol in the regime where the transition shows: d = 100, n = 2000 = 20 d samples (the
    network sees nearly the population loss the mean model describes), the loss averaged over them, and a small
    initialisation (0.01, so that the bias is not moved by the decay of a random initial function); the critical
    rate is then ~= 8 pi / d. ``figure1()`` is the paper's Figure 1 setting as read (d = 200, n = 300,
    a+- ~ N(0, 1/(2d)), summed loss, rates 0.3 eta* .. 3 eta*). There, in this exact implementation, the EoS kick
    appears in the first ~10 steps (minimum bias -0.02, -0.28, -1.3, -3.4 at 0.5, 1, 2, 4 eta*; critical rate
    0.65 eta*), but GD then interpolates the 300 samples with 400 weights within time ~0.5 (train accuracy 1,
    sharpness 4600 -> ~110, far below 2 / eta) and the fit drives the bias positive: +0.48, +0.42, +0.40, +0.33 at
    time 10, test accuracy 0.49-0.50, below the zero-bias 0.584 (measured, one seed each). ``summary()`` reports
    the trajectory's minimum bias too."""

    ensemble_axes: ClassVar[dict[str, str]] = {"lr_multiplier": "lr_multipliers"}

    lr_multipliers: tuple[float, ...] = field(default=tuple(float(v) for v in np.geomspace(0.3, 3.0, 9)),
                                              metadata={"help": "learning rates in units of the predicted critical "
                                                                "rate (critical_lr)"})
    d: int = field(default=100, metadata={"help": "input dimension"})
    n: int = field(default=2000, metadata={"help": "training samples"})
    n_test: int = field(default=4000, metadata={"help": "test samples"})
    lam: float = field(default=3.0, metadata={"help": "signal strength lambda"})
    init_std: float | None = field(default=0.01, metadata={"help": "std of a+-_i at init (none: the paper's "
                                                                    "1/sqrt(2d))"})
    loss: str = field(default="mean", metadata={"help": "logistic loss over the samples: sum (the paper's Figure 1) "
                                                        "or mean"})
    time: float = field(default=10.0, metadata={"help": "iterations = ceil(time / eta)"})
    seeds: int = field(default=3, metadata={"help": "initialisations (and data sets) per learning rate"})
    sharpness_points: int = field(default=10, metadata={"help": "sharpness evaluations per member"})
    seed: int = field(default=0, metadata={"help": "seed"})

    @classmethod
    def small(cls) -> "ThresholdConfig":
        """The configuration CI runs (seconds): d = 50, n = 30 d = 1500, 7 rates 0.3 .. 3 times the critical rate,
        4 seeds, 6 sharpness points."""
        return cls(lr_multipliers=tuple(float(v) for v in np.geomspace(0.3, 3.0, 7)), d=50, n=1500, seeds=4,
                   sharpness_points=6)

    @classmethod
    def figure1(cls) -> "ThresholdConfig":
        """The paper's Figure 1 setting: d = 200, n = 300, lam = 3, a+- ~ N(0, 1/(2d)), b = 0, logistic loss summed
        over the samples, ceil(10 / eta) iterations, 9 rates from 0.3 eta* to 3 eta* (eta* = 8 pi / d^2)."""
        config = cls(d=200, n=300, init_std=None, loss="sum")
        unit = eta_star(200) / config.critical_lr
        return config.replace(lr_multipliers=tuple(float(v) * unit for v in np.geomspace(0.3, 3.0, 9)))

    @property
    def learning_rates(self) -> np.ndarray:
        """[L] the learning rates, ``lr_multipliers`` times ``critical_lr``."""
        return np.asarray(self.lr_multipliers) * self.critical_lr

    @property
    def critical_lr(self) -> float:
        """The network's predicted transition for this config, ``critical_lr(d, n, lam, loss)``."""
        return critical_lr(self.d, self.n, self.lam, self.loss)

    def validated(self) -> "ThresholdConfig":
        """This config, after checking every field (ValueError/TypeError naming the field)."""
        if not self.lr_multipliers:
            raise ValueError("lr_multipliers: expected at least one learning rate")
        for v in self.lr_multipliers:
            check_float(v, "lr_multipliers", positive=True)
        for name in ("d", "n", "n_test", "seeds", "sharpness_points"):
            check_int(getattr(self, name), name, min=1)
        check_int(self.seed, "seed", min=0)
        check_float(self.lam, "lam", nonnegative=True)
        check_float(self.time, "time", positive=True)
        check_choice(self.loss, "loss", LOSSES)
        if self.init_std is not None:
            check_float(self.init_std, "init_std", nonnegative=True)
        return self


def _iterations(config: ThresholdConfig) -> np.ndarray:
    return np.ceil(config.time / config.learning_rates - 1e-9).astype(np.int64)


@dataclass
class ThresholdResult(ExperimentResult):
    """Per learning rate l and seed s (float64 unless said): final_bias, final_mean_model_bias, train_accuracy,
    test_accuracy, final_loss [L, S]; bias, loss [T + 1, L, S] after each iteration t = 0..T (T the longest run; NaN
    past a member's own ceil(time / eta) iterations); mean_model_bias [T + 1, L, S] (the mean model from the same
    initial mean weight, as the network's exact reduction to a+-_i = a); sharpness [K, L, S] (top loss-Hessian
    eigenvalue) at iterations sharpness_steps [K, L, S] (int64)."""

    config: ThresholdConfig
    final_bias: np.ndarray
    final_mean_model_bias: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray
    final_loss: np.ndarray
    bias: np.ndarray
    loss: np.ndarray
    mean_model_bias: np.ndarray
    sharpness: np.ndarray
    sharpness_steps: np.ndarray

    def summary(self) -> list[dict]:
        """One dict per learning rate (the ensemble member), seeds averaged: lr, lr_over_critical (the config's
        multiplier), lr_over_eta_star, iterations, final_bias (mean) and final_bias_std, mean_model_final_bias,
        min_bias (the trajectory's minimum), train_accuracy, test_accuracy, zero_bias_accuracy, eta_star
        (8 pi / d^2), predicted_critical_lr (the network's, ``critical_lr``), final_loss, two_over_lr,
        sharpness_start and sharpness_end (seed means)."""
        config = self.config
        iterations = _iterations(config)
        rows = []
        for l, lr in enumerate(config.learning_rates):
            rows.append({"lr": float(lr), "lr_over_critical": config.lr_multipliers[l],
                         "lr_over_eta_star": float(lr / eta_star(config.d)),
                         "iterations": int(iterations[l]), "final_bias": float(self.final_bias[l].mean()),
                         "final_bias_std": float(self.final_bias[l].std()),
                         "min_bias": float(np.nanmin(self.bias[:, l], axis=0).mean()),
                         "mean_model_final_bias": float(self.final_mean_model_bias[l].mean()),
                         "train_accuracy": float(self.train_accuracy[l].mean()),
                         "test_accuracy": float(self.test_accuracy[l].mean()),
                         "zero_bias_accuracy": zero_bias_accuracy(config.lam, config.d),
                         "eta_star": eta_star(config.d), "predicted_critical_lr": config.critical_lr,
                         "final_loss": float(self.final_loss[l].mean()), "two_over_lr": float(2 / lr),
                         "sharpness_start": float(self.sharpness[0, l].mean()),
                         "sharpness_end": float(self.sharpness[-1, l].mean())})
        return rows

    def report(self) -> str:
        """The thresholds of the config and, per learning rate, the seed-mean final bias (network and mean model),
        accuracies and final sharpness beside 2/eta (what ``physai threshold`` prints)."""
        config = self.config
        lines = [f"eta* = 8 pi / d^2 = {eta_star(config.d):.4g}, network's critical rate {config.critical_lr:.4g} "
                 f"({config.critical_lr / eta_star(config.d):.3f} eta*), zero-bias accuracy "
                 f"{zero_bias_accuracy(config.lam, config.d):.3f}",
                 f"{'eta/crit':>9} {'eta/eta*':>9} {'bias':>8} {'mean model':>11} {'train acc':>9} {'test acc':>9} "
                 f"{'sharp(end)':>11} {'2/eta':>8}"]
        for l, multiplier in enumerate(config.lr_multipliers):
            lines.append(f"{multiplier:>9.3g} {config.learning_rates[l] / eta_star(config.d):>9.3g} "
                         f"{self.final_bias[l].mean():>8.3f} {self.final_mean_model_bias[l].mean():>11.3f} "
                         f"{self.train_accuracy[l].mean():>9.3f} {self.test_accuracy[l].mean():>9.3f} "
                         f"{self.sharpness[-1, l].mean():>11.4g} {2 / config.learning_rates[l]:>8.4g}")
        return "\n".join(lines)

    def trajectories(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """``bias``, ``loss``, ``mean_model_bias`` (iteration, member, seed); ``sharpness``, ``sharpness_step``
        (tracked, member, seed); ``member`` indexes the learning rates."""
        return {"bias": (("iteration", "member", "seed"), self.bias),
                "loss": (("iteration", "member", "seed"), self.loss),
                "mean_model_bias": (("iteration", "member", "seed"), self.mean_model_bias),
                "sharpness": (("tracked", "member", "seed"), self.sharpness),
                "sharpness_step": (("tracked", "member", "seed"), self.sharpness_steps)}

    def plot(self, path) -> None:
        """Final bias (network and mean model) and test accuracy vs eta with eta* marked; bias and sharpness (with
        2/eta dashed) against time eta t at a few rates. Needs matplotlib (``pip install physai[plot]``)."""
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
        ax.axvline(star, color="k", ls=":", label=r"$\eta^* = 8\pi/d^2$ (tied-weight mean model)")
        ax.axvline(config.critical_lr, color="r", ls=":", label=r"$\eta_c$: network, 2 / even-mode curvature at init")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set(xscale="log", xlabel=r"learning rate $\eta$", ylabel="final bias b",
               title=f"bias after time {config.time:g}")
        ax.legend()
        ax = axes[0, 1]
        ax.errorbar(lrs, 100 * self.test_accuracy.mean(1), yerr=100 * self.test_accuracy.std(1), fmt="o-", ms=4)
        ax.axhline(100 * zero_bias_accuracy(config.lam, config.d), color="gray", ls="--",
                   label=r"$b=0$: $\Phi(\lambda/\sqrt{d})$")
        ax.axvline(star, color="k", ls=":")
        ax.set(xscale="log", xlabel=r"learning rate $\eta$", ylabel="test accuracy (%)", title="test accuracy")
        ax.legend()
        shown = sorted({0, len(lrs) // 2, len(lrs) - 1})
        for i, l in enumerate(shown):
            color = f"C{i}"
            time = lrs[l] * np.arange(self.bias.shape[0])
            axes[1, 0].plot(time, self.bias[:, l, 0], color=color,
                            label=rf"$\eta = {config.lr_multipliers[l]:.2g}\eta_c$")
            axes[1, 0].plot(time, self.mean_model_bias[:, l, 0], color=color, ls="--", lw=1)
            axes[1, 1].plot(lrs[l] * self.sharpness_steps[:, l, 0], self.sharpness[:, l, 0], "o-", ms=3, color=color)
            axes[1, 1].axhline(2 / lrs[l], color=color, ls="--", lw=1)
        axes[1, 0].set(xlabel=r"time $\eta t$", ylabel="bias b", title="bias (dashed: mean model)")
        axes[1, 0].legend()
        axes[1, 1].set(xlabel=r"time $\eta t$", ylabel="sharpness", yscale="log", title="sharpness; dashed: 2/eta")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def run(config: ThresholdConfig = ThresholdConfig(), progress: bool = False) -> ThresholdResult:
    """Train every (learning rate, seed) member at once, each for ceil(time / eta) iterations, with the mean model
    run alongside from the same initial mean weight (a+- averaged over units and signs) at the rates at which it is
    the network's exact reduction to a+-_i = a (``mean_model_step``'s eta_b). Seed s draws its training set, test set
    and initialisation from ``numpy.random.default_rng([seed, s])``, shared by all rates. ``progress`` shows a bar
    over iterations."""
    config = config.validated()
    d, L, S = config.d, len(config.lr_multipliers), config.seeds
    lrs = config.learning_rates
    iterations = _iterations(config)
    T = int(iterations.max())
    loss_scale = config.n if config.loss == "sum" else 1.0
    std = 1 / math.sqrt(2 * d) if config.init_std is None else config.init_std
    data = []
    a_plus, a_minus = np.empty((L, S, d)), np.empty((L, S, d))
    for s in range(S):
        rng = np.random.default_rng([config.seed, s])
        X, y = sparse_coding_data(config.n, d, config.lam, rng)
        X_test, y_test = sparse_coding_data(config.n_test, d, config.lam, rng)
        a_plus[:, s], a_minus[:, s] = std * rng.standard_normal(d), std * rng.standard_normal(d)
        data.append((X, y, X_test, y_test))
    a_plus, a_minus, b = a_plus.reshape(L * S, d), a_minus.reshape(L * S, d), np.zeros(L * S)
    rate = np.repeat(lrs, S)
    horizon = np.repeat(iterations, S)
    mean_a = 0.5 * (a_plus.mean(1) + a_minus.mean(1))
    mean_b = np.zeros(L * S)
    bias = np.full((T + 1, L * S), np.nan)
    loss = np.full((T + 1, L * S), np.nan)
    mean_bias = np.full((T + 1, L * S), np.nan)
    K = config.sharpness_points
    sharp_steps = np.rint(np.linspace(0, horizon, K)).astype(np.int64)  # [K, E], the last at the final state
    sharpness = np.full((K, L * S), np.nan)
    members = [np.arange(s, L * S, S) for s in range(S)]  # member l * S + s trains on seed s's data
    for t in _progress(range(T + 1), total=T + 1, desc="threshold neurons", enabled=progress):
        active = t <= horizon
        bias[t] = np.where(active, b, np.nan)
        mean_bias[t] = np.where(active, mean_b, np.nan)
        for s, members_s in enumerate(members):
            idx = members_s[active[members_s]]  # members still training (the slowest rates run longest)
            if not idx.size:
                continue
            X, y = data[s][0], data[s][1]
            value, (gp, gm, gb) = loss_and_grad(a_plus[idx], a_minus[idx], b[idx], X, y, config.loss)
            loss[t, idx] = value
            tracked = idx[(sharp_steps[:, idx] == t).any(axis=0)]
            if tracked.size:
                top = np.linalg.eigvalsh(hessian(a_plus[tracked], a_minus[tracked], b[tracked], X, y,
                                                 config.loss))[:, -1]
                for i, value in zip(tracked, top):
                    sharpness[sharp_steps[:, i] == t, i] = value
            step = np.where(t < horizon[idx], rate[idx], 0.0)
            a_plus[idx] -= step[:, None] * gp
            a_minus[idx] -= step[:, None] * gm
            b[idx] -= step * gb
        live = np.where(t < horizon, rate * loss_scale, 0.0)
        mean_a, mean_b = mean_model_step(mean_a, mean_b, live / d, d, eta_b=live)
    train_acc, test_acc = np.empty(L * S), np.empty(L * S)
    for s, idx in enumerate(members):
        X, y, X_test, y_test = data[s]
        train_acc[idx] = (np.sign(network_output(a_plus[idx], a_minus[idx], b[idx], X)) == y).mean(axis=1)
        test_acc[idx] = (np.sign(network_output(a_plus[idx], a_minus[idx], b[idx], X_test)) == y_test).mean(axis=1)
    final_loss = loss[horizon, np.arange(L * S)]
    shape = (L, S)
    return ThresholdResult(config, b.reshape(shape), mean_b.reshape(shape), train_acc.reshape(shape),
                           test_acc.reshape(shape), final_loss.reshape(shape), bias.reshape(T + 1, L, S),
                           loss.reshape(T + 1, L, S), mean_bias.reshape(T + 1, L, S), sharpness.reshape(K, L, S),
                           sharp_steps.reshape(K, L, S))


add_parser = experiment_command(
    "threshold", __name__, help="threshold neurons via the edge of stability (Ahn et al. 2022)",
    description="GD on a ReLU network with one shared bias on sparse coding: only rates above the critical "
                "one learn a negative bias (threshold neurons).")


Config = ThresholdConfig
Result = ThresholdResult
