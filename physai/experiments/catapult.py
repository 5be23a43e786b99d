"""The catapult phase (Lewkowycz, Bahri, Dyer, Sohl-Dickstein, Gur-Ari 2020, "The large learning rate phase of deep
learning: the catapult mechanism", arXiv 2003.02218): full-batch GD on a wide network with MSE has three phases in
eta lambda0, lambda0 the top eigenvalue of the NTK at init (Theta / n for a loss averaged over n samples):

- lazy, eta lambda0 < 2: the loss falls monotonically and the curvature lambda hardly moves (by O(1/width));
- catapult, 2 < eta lambda0 < eta_max lambda0: the loss grows for about log(width) steps, the curvature falls below
  2 / eta, then the loss converges, in a flatter region;
- divergent beyond eta_max lambda0 (4 in the warm-up model; measured here, not assumed).

The warm-up model (the paper's section 2) is f = v . u / sqrt(n), u, v in R^n, one input x = 1, loss (f - y)^2 / 2,
curvature lambda = (|u|^2 + |v|^2) / n; one GD step of size eta is exactly (the paper's eq. (3))

    f' = f - eta lambda (f - y) + (eta^2 / n) (f - y)^2 f,
    lambda' = lambda + (eta / n) (f - y)^2 (eta lambda - 4 f / (f - y)).

The experiment trains two-layer nets in NTK parameterization (``physai.twolayer``, linear and ReLU, no bias) on
inputs N(0, I_d) with labels sign(w . x) of a random linear teacher, MSE, one native ensemble per activation with one
member per learning rate (all from the same initialisation), and tracks lambda_t from the analytic empirical NTK
(``physai.twolayer.ntk.empirical_ntk``).

    from physai.experiments.catapult import CatapultConfig, run
    result = run(CatapultConfig.small(), progress=True)
    result.boundaries(); result.plot("catapult.png")
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from physai._checks import check_choice, check_float, check_int
from physai._progress import progress as _progress
from physai.experiments._base import ExperimentConfig, ExperimentResult
from physai.experiments._cli import experiment_command
from physai.twolayer import ACTIVATIONS, TwoLayer
from physai.twolayer.ntk import empirical_ntk

PHASES = ("lazy", "catapult", "divergent")


# -- the warm-up model -------------------------------------------------------------------------------------------
def warmup_observables(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """f = v . u / sqrt(n) and lambda = (|u|^2 + |v|^2) / n of warm-up models u, v [..., n] (float64) -> [...]."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if u.shape != v.shape or u.ndim == 0:
        raise ValueError(f"u, v: expected arrays of one shape [..., n], got {u.shape} and {v.shape}")
    n = u.shape[-1]
    return (u * v).sum(-1) / math.sqrt(n), ((u * u).sum(-1) + (v * v).sum(-1)) / n


def warmup_step(u: np.ndarray, v: np.ndarray, y, eta) -> tuple[np.ndarray, np.ndarray]:
    """One GD step on (f - y)^2 / 2, f = v . u / sqrt(n): u' = u - eta (f - y) v / sqrt(n), v' likewise, for
    arrays u, v [..., n] and y, eta broadcasting against [...] (float64)."""
    f, _ = warmup_observables(u, v)
    n = np.shape(u)[-1]
    r = (f - np.asarray(y, np.float64)) * np.asarray(eta, np.float64) / math.sqrt(n)
    return u - r[..., None] * v, v - r[..., None] * u


def warmup_closed_form(f, lam, y, eta, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The warm-up model's one-step map in (f, lambda) (module docstring; Lewkowycz et al. 2020, eq. (3)); arrays
    broadcast (float64). Written with the residual r = f - y, so it holds at f = y too."""
    n = check_int(n, "n", min=1)
    f, lam, y, eta = (np.asarray(a, np.float64) for a in (f, lam, y, eta))
    r = f - y
    return f - eta * lam * r + eta**2 / n * r**2 * f, lam + eta / n * r * (eta * lam * r - 4 * f)


# -- the two-layer experiment ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CatapultConfig(ExperimentConfig):
    """Two-layer nets of width ``width`` in NTK parameterization, one per activation, trained by full-batch GD on
    MSE for ``steps`` steps at learning rates ``lr_factors / lambda0`` (a sweep axis ``lr_factor`` folds into
    ``lr_factors``); lambda_t is measured every ``track_every`` steps. The default is the documented full
    configuration (the paper's width 2048; a few minutes on two cores); ``small()`` is what CI runs."""

    ensemble_axes: ClassVar[dict[str, str]] = {"lr_factor": "lr_factors"}

    activations: tuple[str, ...] = field(default=("linear", "relu"), metadata={"help": "hidden activations"})
    lr_factors: tuple[float, ...] = field(
        default=(0.5, 1.0, 1.5, 1.8, 1.9, 1.95, 2.05, 2.1, 2.2, 2.5, 3.0, 3.5, 3.8, 4.0, 4.2, 4.4, 4.6, 5.0, 6.0,
                 8.0, 10.0, 12.0),
        metadata={"help": "eta * lambda0 of each ensemble member"})
    width: int = field(default=2048, metadata={"help": "hidden width m"})
    n: int = field(default=64, metadata={"help": "training samples"})
    d: int = field(default=16, metadata={"help": "input dimension"})
    steps: int = field(default=600, metadata={"help": "GD steps"})
    track_every: int = field(default=10, metadata={"help": "steps between NTK eigenvalue measurements"})
    seed: int = field(default=0, metadata={"help": "seed of the data and the initialisation"})

    @classmethod
    def small(cls) -> "CatapultConfig":
        """The configuration CI runs (seconds): width 256, n = 32, d = 8, 200 steps, 12 rates."""
        return cls(lr_factors=(0.5, 1.0, 1.9, 2.2, 2.6, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0), width=256, n=32, d=8,
                   steps=200, track_every=10)

    def validated(self) -> "CatapultConfig":
        """This config, after checking every field (ValueError/TypeError naming the field)."""
        if not self.activations:
            raise ValueError("activations: expected at least one activation")
        for a in self.activations:
            check_choice(a, "activations", ACTIVATIONS)
        if not self.lr_factors:
            raise ValueError("lr_factors: expected at least one learning rate")
        for c in self.lr_factors:
            check_float(c, "lr_factors", positive=True)
        if list(self.lr_factors) != sorted(set(self.lr_factors)):
            raise ValueError(f"lr_factors: expected strictly increasing values, got {self.lr_factors}")
        for name in ("width", "n", "d", "steps", "track_every"):
            check_int(getattr(self, name), name, min=1)
        check_int(self.seed, "seed", min=0)
        return self


def make_task(config: CatapultConfig) -> tuple[np.ndarray, np.ndarray]:
    """Inputs X [n, d] ~ N(0, I) and labels Y [n, 1] = sign(w . x), w ~ N(0, I) (float64)."""
    rng = np.random.default_rng([config.seed, 0])
    X = rng.standard_normal((config.n, config.d))
    Y = np.where(X @ rng.standard_normal(config.d) >= 0, 1.0, -1.0)[:, None]
    return X, Y


def ntk_top_eigenvalue(net: TwoLayer, X: np.ndarray) -> np.ndarray:
    """[E] top eigenvalue of each member's empirical NTK over the n rows of X, divided by n (the curvature of the
    loss (1/2n) sum (f - y)^2 in function space; ``numpy.linalg.eigvalsh`` of the analytic empirical NTK,
    ``physai.twolayer.ntk.empirical_ntk``); NaN for a member whose kernel is not finite. Raises ValueError for a
    net with more than one output or a mis-shaped X."""
    if net.k != 1:
        raise ValueError(f"net: expected one output (k = 1), got k = {net.k}")
    out = np.full(net.ensemble, np.nan)
    with np.errstate(over="ignore", invalid="ignore"):
        theta = empirical_ntk(net, X) / X.shape[0]
    finite = np.isfinite(theta).all(axis=(1, 2))
    if finite.any():
        out[finite] = np.linalg.eigvalsh(theta[finite])[:, -1]
    return out


@dataclass
class CatapultResult(ExperimentResult):
    """For A activations and L rates (float64): lam0 [A] (top NTK eigenvalue / n at init), losses [A, steps, L]
    (each step's loss before its update), final_loss [A, L] (after the last update), curvature [A, K, L] (the top
    NTK eigenvalue / n, NaN once a member diverged) at curvature_steps [K] (int64: the number of updates done)."""

    config: CatapultConfig
    lam0: np.ndarray
    losses: np.ndarray
    final_loss: np.ndarray
    curvature: np.ndarray
    curvature_steps: np.ndarray

    def learning_rates(self) -> np.ndarray:
        """[A, L] the learning rates, lr_factors / lam0."""
        return np.asarray(self.config.lr_factors)[None, :] / self.lam0[:, None]

    def _rises(self) -> np.ndarray:
        """[A, steps, L] bool: the loss exceeds its running minimum over the earlier steps by more than 1%."""
        losses = np.where(np.isnan(self.losses), np.inf, self.losses)
        running = np.minimum.accumulate(losses, axis=1)
        return np.concatenate([np.zeros_like(losses[:, :1], dtype=bool), losses[:, 1:] > 1.01 * running[:, :-1]],
                              axis=1)

    def phases(self) -> np.ndarray:
        """[A, L] int, an index into ``PHASES``: divergent when the final loss is not below the initial one (NaN
        and inf included); otherwise catapult when the loss ever rose more than 1% above its running minimum
        (in the lazy phase every mode of the residual shrinks at every step, so the loss never rises), else lazy."""
        with np.errstate(invalid="ignore"):
            converged = self.final_loss < self.losses[:, 0, :]
        return np.where(~converged, 2, np.where(self._rises().any(axis=1), 1, 0))

    def catapult_steps(self) -> np.ndarray:
        """[A, L] int: the number of steps at which the loss stood more than 1% above its running minimum (the
        length of the spike; 0 in the lazy phase)."""
        return self._rises().sum(axis=1)

    def boundaries(self) -> dict[str, dict[str, float]]:
        """Per activation, the measured phase boundaries in eta lambda0: ``lazy_catapult`` and ``max`` (eta_max
        lambda0), each the geometric mean of the two grid values that bracket it (NaN when the grid does not), and
        ``max_low``/``max_high``, that bracket."""
        factors = np.asarray(self.config.lr_factors)
        out = {}
        for i, name in enumerate(self.config.activations):
            phase = self.phases()[i]
            lazy, catapult, divergent = (factors[phase == k] for k in range(3))
            below = lazy.max() if lazy.size else math.nan
            above = min(catapult.min() if catapult.size else math.inf, divergent.min() if divergent.size else math.inf)
            converged = factors[phase < 2]
            low = converged.max() if converged.size else math.nan
            high = divergent[divergent > low].min() if (divergent > low).any() else math.nan
            out[name] = {"lazy_catapult": math.sqrt(below * above) if math.isfinite(above) else math.nan,
                         "max": math.sqrt(low * high), "max_low": float(low), "max_high": float(high)}
        return out

    def summary(self) -> list[dict]:
        """One dict per (activation, learning rate), rate fastest (one per ensemble member for one activation):
        activation, lr_factor (eta lambda0), lr, lam0, phase, max_loss, final_loss, lam_T (the last finite
        curvature), lr_times_lam_T, lam_T_over_lam0, catapult_steps."""
        phases, steps, lrs = self.phases(), self.catapult_steps(), self.learning_rates()
        rows = []
        for i, name in enumerate(self.config.activations):
            for l, factor in enumerate(self.config.lr_factors):
                finite = self.curvature[i, :, l][np.isfinite(self.curvature[i, :, l])]
                lam_T = float(finite[-1]) if phases[i, l] < 2 and finite.size else math.nan
                rows.append({"activation": name, "lr_factor": factor, "lr": float(lrs[i, l]),
                             "lam0": float(self.lam0[i]), "phase": PHASES[phases[i, l]],
                             "max_loss": float(np.max(self.losses[i, :, l])),
                             "final_loss": float(self.final_loss[i, l]),
                             "lam_T": lam_T, "lr_times_lam_T": float(lrs[i, l]) * lam_T,
                             "lam_T_over_lam0": lam_T / float(self.lam0[i]), "catapult_steps": int(steps[i, l])})
        return rows

    def report(self) -> str:
        """The summary table and the measured phase boundaries (what ``physai catapult`` prints)."""
        lines = [super().report()]
        for name, bound in self.boundaries().items():
            lines.append(f"{name}: lazy/catapult boundary at eta lambda0 ~ {bound['lazy_catapult']:.3g}, "
                         f"eta_max lambda0 ~ {bound['max']:.3g} (between {bound['max_low']:g} and "
                         f"{bound['max_high']:g})")
        return "\n".join(lines)

    def trajectories(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """``loss`` (activation, step, member), ``curvature`` (activation, tracked_step, member) and
        ``curvature_step`` (tracked_step,); ``member`` indexes the learning rates."""
        return {"loss": (("activation", "step", "member"), self.losses),
                "curvature": (("activation", "tracked_step", "member"), self.curvature),
                "curvature_step": (("tracked_step",), self.curvature_steps)}

    def plot(self, path) -> None:
        """Per activation (one column): max loss and eta lambda_T vs eta lambda0 with the phase boundaries (2 and the
        measured eta_max lambda0); the loss and lambda_t trajectories of one rate per phase (2/eta dashed). Needs
        matplotlib (``pip install physai[plot]``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        config = self.config
        A = len(config.activations)
        fig, axes = plt.subplots(3, A, figsize=(5.5 * A, 11), squeeze=False)
        factors = np.asarray(config.lr_factors)
        phases, lrs, bounds = self.phases(), self.learning_rates(), self.boundaries()
        for i, name in enumerate(config.activations):
            ax = axes[0, i]
            shown = phases[i] < 2
            ax.plot(factors[shown], np.max(self.losses[i][:, shown], axis=0), "o-", ms=4, label="max loss")
            ax.set(xlabel=r"$\eta\lambda_0$", ylabel="max training loss", yscale="log",
                   title=f"{name}, width {config.width}")
            twin = ax.twinx()
            rows = [r for r in self.summary() if r["activation"] == name]
            twin.plot(factors, [r["lr_times_lam_T"] for r in rows], "s--", ms=4, color="C1")
            twin.axhline(2, color="C1", lw=0.5)
            twin.set_ylabel(r"$\eta\lambda_T$", color="C1")
            ax.axvline(2, color="k", ls=":")
            ax.axvline(bounds[name]["max"], color="r", ls=":",
                       label=rf"$\eta_{{max}}\lambda_0$ = {bounds[name]['max']:.2f}")
            ax.legend(fontsize=8)
            for k, phase in enumerate(PHASES):
                members = np.flatnonzero(phases[i] == k)
                if not members.size:
                    continue
                l = members[len(members) // 2]
                axes[1, i].plot(self.losses[i, :, l], color=f"C{k}", label=f"{phase}, $\\eta\\lambda_0$={factors[l]:g}")
                axes[2, i].plot(self.curvature_steps, self.curvature[i, :, l], color=f"C{k}")
                axes[2, i].axhline(2 / lrs[i, l], color=f"C{k}", ls="--", lw=1)
            finite = self.losses[i][np.isfinite(self.losses[i]) & (self.losses[i] > 0)]
            axes[1, i].set(xlabel="step", ylabel="training loss", yscale="log", ylim=(0.5 * finite.min(), 1e4))
            axes[1, i].legend(fontsize=8)
            axes[2, i].set(xlabel="step", ylabel=r"$\lambda_t$ (top NTK eigenvalue / n); dashed: 2/$\eta$")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def run(config: CatapultConfig = CatapultConfig(), progress: bool = False) -> CatapultResult:
    """Train one ensemble per activation (one member per rate, one initialisation), measuring lambda_t natively
    trained in chunks of ``track_every`` steps. ``progress`` shows a bar over the chunks."""
    config = config.validated()
    X, Y = make_task(config)
    A, L = len(config.activations), len(config.lr_factors)
    chunks = [config.track_every] * (config.steps // config.track_every)
    if config.steps % config.track_every:
        chunks.append(config.steps % config.track_every)
    K = len(chunks) + 1
    lam0 = np.empty(A)
    losses = np.empty((A, config.steps, L))
    final = np.empty((A, L))
    curvature = np.empty((A, K, L))
    curvature_steps = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
    work = [(i, c) for i in range(A) for c in range(len(chunks))]
    nets = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for i, c in _progress(work, total=len(work), desc="catapult", enabled=progress):
            if c == 0:
                nets[i] = TwoLayer(config.d, config.width, 1, config.activations[i], "ntk", bias=False, ensemble=L,
                                   dtype=np.float64, seed=config.seed, same_init=True)
                curvature[i, 0] = ntk_top_eigenvalue(nets[i], X)
                lam0[i] = curvature[i, 0, 0]
            net = nets[i]
            start = curvature_steps[c]
            trajectory = net.train(X, Y, np.asarray(config.lr_factors) / lam0[i], chunks[c])
            losses[i, start:start + chunks[c]] = trajectory.losses
            curvature[i, c + 1] = ntk_top_eigenvalue(net, X)
            if c == len(chunks) - 1:
                final[i] = net.loss_and_grad(X, Y)[0]
    return CatapultResult(config, lam0, losses, final, curvature, curvature_steps)


add_parser = experiment_command(
    "catapult", __name__, help="the catapult phase of large learning rates (Lewkowycz et al.)",
    description="Full-batch GD on wide two-layer nets in NTK parameterization, MSE: lazy below eta lambda0 "
                "= 2, catapult up to eta_max lambda0, divergent above.")


Config = CatapultConfig
Result = CatapultResult
