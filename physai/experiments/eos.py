"""Edge of Stability (Cohen et al. 2021): full-batch gradient descent drives the sharpness (top eigenvalue of the
training-loss Hessian) up until it reaches 2/lr, where it hovers while the loss keeps falling, non-monotonically.

The experiment trains one two-layer tanh network per learning rate (one ensemble, identical initialisations, one
native training run) on a synthetic regression task, and tracks the sharpness inside the native loop:

    result = physai.experiments.eos.run(EosConfig(learning_rates=(0.35, 0.5)))
    result.save("eos.json"); result.plot("eos.png")
    EosResult.load("eos.json").summary()
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from physai._checks import check_float, check_int, check_seed
from physai.experiments._base import ExperimentConfig, ExperimentResult
from physai.experiments._cli import experiment_command
from physai.twolayer import TwoLayer


@dataclass(frozen=True)
class EosConfig(ExperimentConfig):
    """The task (inputs N(0, I_d), targets from a random tanh teacher of width ``teacher_width`` whose input
    weights are scaled by ``teacher_scale``, standardised) and the student (two-layer tanh, standard
    parameterization, MSE, full-batch GD). The learning rates are one ensemble: a sweep axis ``lr`` folds into
    ``learning_rates``."""

    ensemble_axes: ClassVar[dict[str, str]] = {"lr": "learning_rates"}

    learning_rates: tuple[float, ...] = field(
        default=(0.35, 0.4, 0.5, 0.6), metadata={"help": "GD step sizes, one ensemble member each (1/loss units)"})
    n: int = field(default=500, metadata={"help": "training samples"})
    d: int = field(default=10, metadata={"help": "input dimension"})
    width: int = field(default=32, metadata={"help": "hidden units of the student"})
    teacher_width: int = field(default=32, metadata={"help": "hidden units of the teacher"})
    teacher_scale: float = field(default=4.0, metadata={"help": "factor on the teacher's input weights (unitless)"})
    steps: int = field(default=3000, metadata={"help": "GD steps"})
    track_every: int = field(default=10, metadata={"help": "steps between sharpness estimates"})
    seed: int = field(default=0, metadata={"help": "seed of data, teacher and student init, in [0, 2**64)"})
    dtype: str = field(default="float64", metadata={"help": "float32 or float64"})

    def validated(self) -> "EosConfig":
        """This config, after checking every field (ValueError/TypeError naming the field)."""
        if not self.learning_rates:
            raise ValueError("learning_rates: expected at least one learning rate")
        for lr in self.learning_rates:
            check_float(lr, "learning_rates", positive=True)
        for name in ("n", "d", "width", "teacher_width", "steps", "track_every"):
            check_int(getattr(self, name), name, min=1)
        check_float(self.teacher_scale, "teacher_scale", positive=True)
        check_seed(self.seed)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {self.dtype!r}")
        return self


def make_task(config: EosConfig) -> tuple[np.ndarray, np.ndarray]:
    """Inputs X [n, d] and standardised teacher targets Y [n, 1], in ``config.dtype``."""
    rng = np.random.default_rng(config.seed)
    X = rng.standard_normal((config.n, config.d))
    teacher = TwoLayer(config.d, config.teacher_width, 1, "tanh", dtype=np.float64, seed=config.seed + 1)
    teacher.W *= config.teacher_scale
    Y = teacher.forward(X)[0]
    Y = (Y - Y.mean()) / Y.std()
    return X.astype(config.dtype), Y.astype(config.dtype)


@dataclass
class EosResult(ExperimentResult):
    """Trajectories of one run: losses [steps, L] and sharpness [T, L] (``config.dtype``) at sharpness_steps [T]
    (int64), for the L learning rates of ``config``; matvecs [T, L] (int64) counts the HVPs of each estimate.
    Losses are 0.5 mean squared error of the standardised targets (unitless); sharpness is in 1/lr units."""

    config: EosConfig
    losses: np.ndarray
    sharpness: np.ndarray
    sharpness_steps: np.ndarray
    matvecs: np.ndarray = field(repr=False)

    def summary(self) -> list[dict]:
        """One dict per learning rate, with keys lr, two_over_lr, sharpness_start, sharpness_max,
        sharpness_last_quarter (mean over the last quarter of the tracked steps), loss_start, loss_end and
        hvps_per_estimate (mean Hessian-vector products per sharpness estimate). ``physai eos`` prints it as a
        table."""
        rows = []
        quarter = len(self.sharpness_steps) * 3 // 4
        for i, lr in enumerate(self.config.learning_rates):
            s = self.sharpness[:, i]
            rows.append({"lr": lr, "two_over_lr": 2 / lr, "sharpness_start": float(s[0]),
                         "sharpness_max": float(np.nanmax(s)), "sharpness_last_quarter": float(np.mean(s[quarter:])),
                         "loss_start": float(self.losses[0, i]), "loss_end": float(self.losses[-1, i]),
                         "hvps_per_estimate": float(self.matvecs[:, i].mean())})
        return rows

    def report(self) -> str:
        """The summary as ``physai eos`` prints it: per learning rate, 2/lr beside the sharpness at the start, its
        maximum and its mean over the last quarter, and the loss at the start and the end."""
        lines = [f"{'lr':>6} {'2/lr':>7} {'sharp@0':>8} {'max':>7} {'last 1/4':>9} {'loss@0':>8} {'loss@end':>9}"]
        for row in self.summary():
            lines.append(f"{row['lr']:>6g} {row['two_over_lr']:>7.3f} {row['sharpness_start']:>8.3f} "
                         f"{row['sharpness_max']:>7.3f} {row['sharpness_last_quarter']:>9.3f} "
                         f"{row['loss_start']:>8.4f} {row['loss_end']:>9.5f}")
        return "\n".join(lines)

    def trajectories(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """``loss`` (step, member), ``sharpness`` and ``matvecs`` (tracked_step, member); the steps of the
        sharpness estimates label tracked_step (:meth:`coordinates`)."""
        return {"loss": (("step", "member"), self.losses),
                "sharpness": (("tracked_step", "member"), self.sharpness),
                "matvecs": (("tracked_step", "member"), self.matvecs)}

    def coordinates(self) -> dict[str, np.ndarray]:
        """``step`` [steps] (0, 1, ...) and ``tracked_step`` [T] (the step of each sharpness estimate), int64."""
        return {"step": np.arange(self.losses.shape[0], dtype=np.int64),
                "tracked_step": np.asarray(self.sharpness_steps, dtype=np.int64)}

    def attributes(self) -> dict[str, dict[str, str]]:
        """long_name and units of every summary key and trajectory (loss: unitless MSE; sharpness: 1/lr)."""
        loss = "loss (0.5 mean squared error, standardised targets)"
        sharp = "sharpness (top eigenvalue of the training-loss Hessian)"
        return {"loss": {"long_name": loss, "units": "1"},
                "sharpness": {"long_name": sharp, "units": "1/lr"},
                "matvecs": {"long_name": "Hessian-vector products of the estimate", "units": "1"},
                "two_over_lr": {"long_name": "2/lr, the edge of stability", "units": "1/lr"},
                "sharpness_start": {"long_name": f"{sharp} at step 0", "units": "1/lr"},
                "sharpness_max": {"long_name": f"maximum {sharp}", "units": "1/lr"},
                "sharpness_last_quarter": {"long_name": f"mean {sharp} over the last quarter of the tracked steps",
                                           "units": "1/lr"},
                "loss_start": {"long_name": f"{loss} at step 0", "units": "1"},
                "loss_end": {"long_name": f"{loss} before the last update", "units": "1"},
                "hvps_per_estimate": {"long_name": "mean Hessian-vector products per sharpness estimate",
                                      "units": "1"}}

    def plot(self, path) -> None:
        """Loss (log scale) and sharpness against step, with 2/lr dashed, one colour per learning rate.
        Needs matplotlib (``pip install physai[plot]``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_sharp) = plt.subplots(1, 2, figsize=(11, 4))
        steps = np.arange(self.losses.shape[0])
        for i, lr in enumerate(self.config.learning_rates):
            color = f"C{i}"
            ax_loss.plot(steps, self.losses[:, i], color=color, lw=1, label=f"lr={lr:g}")
            ax_sharp.plot(self.sharpness_steps, self.sharpness[:, i], color=color, lw=1, label=f"lr={lr:g}")
            ax_sharp.axhline(2 / lr, color=color, ls="--", lw=1)
        ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="full-batch GD")
        ax_sharp.set(xlabel="step", ylabel="sharpness (top Hessian eigenvalue)", title="sharpness; dashed: 2/lr")
        ax_loss.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def run(config: EosConfig = EosConfig(), progress: bool = False) -> EosResult:
    """Train the ensemble (one member per learning rate, same initialisation) with sharpness tracked natively.
    ``progress`` is accepted for the experiments' common signature; the run is one native call (under a second
    at the default size), so there is nothing to show."""
    config = config.validated()
    X, Y = make_task(config)
    L = len(config.learning_rates)
    net = TwoLayer(config.d, config.width, 1, "tanh", "standard", ensemble=L, dtype=config.dtype, seed=config.seed,
                   same_init=True)
    trajectory = net.train(X, Y, np.array(config.learning_rates), config.steps,
                           track_sharpness_every=config.track_every)
    return EosResult(config, trajectory.losses, trajectory.sharpness, trajectory.sharpness_steps, trajectory.matvecs)


# The protocol's names (physai.experiments._base), by which ``physai sweep eos`` finds the experiment.
Config = EosConfig
Result = EosResult


add_parser = experiment_command(
    "eos", __name__, help="edge-of-stability experiment",
    description="Full-batch GD on a two-layer tanh net: the sharpness rises to 2/lr.")
