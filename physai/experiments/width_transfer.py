"""Width transfer of the learning rate under muP / mean-field (Yang & Hu, Tensor Programs IV/V, arXiv 2011.14522 and
2203.03466; Bordelon & Pehlevan, arXiv 2205.09653): train two-layer nets at several widths under the standard, NTK,
mean-field and muP parameterizations over one learning-rate grid, and compare the loss after ``steps`` steps.

Under muP (and its explicit-multiplier twin, mean-field) the features move by O(1) whatever the width, so the loss
curve against the learning rate converges as the width grows: the best rate stays put and wider is better. Under the
standard parameterization with one global rate the output layer's update grows with the width, so the largest
stable rate, and with it the best one, falls like 1/width.

Each (parameterization, width) pair is one native ensemble run: the members are every learning rate times every
seed, so a seed's initialisation is shared by all the rates (the comparison a learning-rate sweep wants).

The coordinate check (:func:`coordinate_check`) is the diagnostic of the ``mup`` package (``mup/coord_check.py``;
the coordinate check of Tensor Programs V): on one fixed batch, record the mean absolute value of every layer's output
at steps t = 1, 2, 3 (t = 1 before any update) against the width, over several seeds, with a learning rate larger
than usual. Under muP every curve is flat in the width; under the standard parameterization the output grows after
one step. As in mup's own test (``mup/test/__main__.py``: widths 1000 and 4000, ratio within [1/1.2, 1.2]), the
readout starts at zero, so the output at t = 1 is exactly 0 at every width.

    from physai.experiments.width_transfer import WidthTransferConfig, run
    result = run(WidthTransferConfig.small(), progress=True)
    result.best_learning_rates()      # [P, W]
    result.plot("width_transfer.png")

The default config is the full one (widths 64..4096, 18 rates, 3 seeds, 4 parameterizations, 100 steps; a few
minutes on two cores); ``WidthTransferConfig.small()`` is the one CI runs (seconds).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from physai._checks import check_choice, check_float, check_int
from physai._progress import progress as _progress
from physai.experiments._base import ExperimentConfig, ExperimentResult
from physai.experiments._cli import experiment_command
from physai.twolayer import ACTIVATIONS, PARAMETERIZATIONS, TwoLayer
from physai.twolayer.reference import activation as _activation

LAYERS = ("hidden", "activation", "output")
"""The coordinate check's layers: the pre-activation h = input_scale W x + b, sigma(h), and the output f."""


@dataclass(frozen=True)
class WidthTransferConfig(ExperimentConfig):
    """The task (inputs N(0, I_d), n of them, targets from a random tanh teacher of width ``teacher_width``,
    standardised), the students (two-layer, ``activation``, MSE, full-batch GD for ``steps`` steps, one output) and
    the grid: ``parameterizations`` x ``widths`` x ``learning_rates`` x ``seeds`` initialisations. A learning rate is
    the base rate of ``TwoLayer.train``; each parameterization multiplies it per layer (``physai.twolayer.params``).
    ``coord_lr`` is the (larger) base rate of the coordinate check, run at the same widths on the first ``coord_n``
    training inputs."""

    ensemble_axes: ClassVar[dict[str, str]] = {"lr": "learning_rates"}

    parameterizations: tuple[str, ...] = field(default=PARAMETERIZATIONS, metadata={"help": "parameterizations"})
    widths: tuple[int, ...] = field(default=(64, 128, 256, 512, 1024, 2048, 4096), metadata={"help": "hidden widths"})
    learning_rates: tuple[float, ...] = field(default=tuple(2.0 ** k for k in range(-12, 6)),
                                              metadata={"help": "base learning rates (one grid for every width)"})
    seeds: int = field(default=3, metadata={"help": "initialisations per (width, learning rate)"})
    steps: int = field(default=100, metadata={"help": "GD steps; the loss is compared after the last"})
    n: int = field(default=256, metadata={"help": "training inputs"})
    d: int = field(default=16, metadata={"help": "input dimension"})
    teacher_width: int = field(default=32, metadata={"help": "width of the tanh teacher"})
    activation: str = field(default="tanh", metadata={"help": "the students' activation"})
    coord_lr: float = field(default=4.0, metadata={"help": "base learning rate of the coordinate check"})
    coord_n: int = field(default=64, metadata={"help": "batch of the coordinate check (first rows of the inputs)"})
    seed: int = field(default=0, metadata={"help": "seed of the task and of the initialisations"})
    dtype: str = field(default="float64", metadata={"help": "float32 or float64"})

    @classmethod
    def small(cls) -> "WidthTransferConfig":
        """The configuration CI runs: muP and standard at widths 64, 256, 1024, a 13-rate grid, 3 seeds."""
        return cls(parameterizations=("standard", "mup"), widths=(64, 256, 1024),
                   learning_rates=tuple(2.0 ** k for k in range(-8, 5)), seeds=3, steps=100, n=128)

    def validated(self) -> "WidthTransferConfig":
        """This config, after checking every field (ValueError/TypeError naming the field)."""
        if not self.parameterizations:
            raise ValueError("parameterizations: expected at least one parameterization")
        for p in self.parameterizations:
            check_choice(p, "parameterizations", PARAMETERIZATIONS)
        if len(set(self.parameterizations)) != len(self.parameterizations):
            raise ValueError(f"parameterizations: expected distinct names, got {self.parameterizations}")
        if not self.widths:
            raise ValueError("widths: expected at least one width")
        for m in self.widths:
            check_int(m, "widths", min=1)
        if list(self.widths) != sorted(set(self.widths)):
            raise ValueError(f"widths: expected strictly increasing widths, got {self.widths}")
        if not self.learning_rates:
            raise ValueError("learning_rates: expected at least one learning rate")
        for lr in self.learning_rates:
            check_float(lr, "learning_rates", positive=True)
        if list(self.learning_rates) != sorted(set(self.learning_rates)):
            raise ValueError(f"learning_rates: expected a strictly increasing grid, got {self.learning_rates}")
        for name in ("seeds", "steps", "n", "d", "teacher_width", "coord_n"):
            check_int(getattr(self, name), name, min=1)
        check_int(self.seed, "seed", min=0)
        check_choice(self.activation, "activation", ACTIVATIONS)
        check_float(self.coord_lr, "coord_lr", positive=True)
        if self.coord_n > self.n:
            raise ValueError(f"coord_n: expected at most n = {self.n} inputs, got {self.coord_n}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', got {self.dtype!r}")
        return self


def make_task(config: WidthTransferConfig) -> tuple[np.ndarray, np.ndarray]:
    """Inputs X [n, d] ~ N(0, I) and standardised tanh-teacher targets Y [n, 1], in ``config.dtype``."""
    rng = np.random.default_rng([config.seed, 0])
    X = rng.standard_normal((config.n, config.d))
    teacher = TwoLayer(config.d, config.teacher_width, 1, "tanh", dtype=np.float64, seed=config.seed + 1)
    Y = teacher.forward(X)[0]
    Y = (Y - Y.mean()) / Y.std()
    return X.astype(config.dtype), Y.astype(config.dtype)


def _initial_models(param: str, d: int, m: int, activation: str, seeds: int, repeats: int, seed: int, dtype,
                    readout_zero_init: bool = False) -> TwoLayer:
    """An ensemble of ``repeats * seeds`` members: member r * seeds + s starts from initialisation s (from
    ``numpy.random.default_rng([seed, s])``, as ``TwoLayer`` does), so every repeat (learning rate) sees the same
    ``seeds`` initialisations."""
    base = TwoLayer(d, m, 1, activation, param, ensemble=seeds, dtype=dtype, seed=seed)
    net = TwoLayer(d, m, 1, activation, param, ensemble=repeats * seeds, dtype=dtype, seed=seed)
    net.W = np.ascontiguousarray(np.tile(base.W, (repeats, 1, 1)))
    net.b = np.ascontiguousarray(np.tile(base.b, (repeats, 1)))
    net.a = np.zeros_like(net.a) if readout_zero_init else np.ascontiguousarray(np.tile(base.a, (repeats, 1, 1)))
    return net


def layer_coordinates(net: TwoLayer, X: np.ndarray) -> np.ndarray:
    """[E, 3]: each member's mean |coordinate| over the batch X [n, d] of its pre-activations h, activations sigma(h)
    and outputs f (the ``l1`` statistic of mup's ``get_coord_data``), in float64."""
    s = net.scaling
    h = s.input_scale * np.einsum("nd,emd->enm", X, net.W, dtype=np.float64)
    if net.b is not None:
        h += net.b[:, None, :]
    act = _activation(net.activation, h)[0]
    f = s.output_scale * np.einsum("enm,ekm->enk", act, net.a, dtype=np.float64)
    return np.stack([np.abs(h).mean(axis=(1, 2)), np.abs(act).mean(axis=(1, 2)), np.abs(f).mean(axis=(1, 2))], axis=1)


def coordinate_check(param: str, widths, X: np.ndarray, Y: np.ndarray, lr: float, steps: int = 3, seeds: int = 5,
                     activation: str = "tanh", seed: int = 0, readout_zero_init: bool = True) -> np.ndarray:
    """mup's coordinate check for two-layer nets under ``param``: [W, steps, 3, seeds] (float64), the mean |x| of
    each layer's output (``LAYERS``: pre-activation, activation, output) at t = 1..steps, t = 1 before any update,
    each later t after one more full-batch GD step of base rate ``lr`` on the fixed batch X [n, d], Y [n, 1] (float32
    or float64; the nets take X's dtype). The readout starts at zero when ``readout_zero_init`` (mup's option of the
    same name, which its test uses), so the output is exactly 0 at t = 1.

    Source: ``mup/coord_check.py`` and ``mup/test/__main__.py`` (microsoft/mup); Tensor Programs V (arXiv
    2203.03466). Raises ValueError naming ``param``, ``widths``, ``lr``, ``steps`` or ``seeds``."""
    check_choice(param, "param", PARAMETERIZATIONS)
    widths = tuple(check_int(m, "widths", min=1) for m in widths)
    if not widths:
        raise ValueError("widths: expected at least one width")
    lr = check_float(lr, "lr", positive=True)
    steps = check_int(steps, "steps", min=1)
    seeds = check_int(seeds, "seeds", min=1)
    if not isinstance(X, np.ndarray) or X.ndim != 2:
        raise ValueError(f"X: expected a numpy array [n, d], got {getattr(X, 'shape', type(X).__name__)}")
    out = np.empty((len(widths), steps, len(LAYERS), seeds))
    with np.errstate(over="ignore", invalid="ignore"):  # the standard parameterization may overflow at large widths
        for w, m in enumerate(widths):
            net = _initial_models(param, X.shape[1], m, activation, seeds, 1, seed, X.dtype, readout_zero_init)
            for t in range(steps):
                out[w, t] = layer_coordinates(net, X).T
                if t + 1 < steps:
                    net.train(X, Y, lr, 1)
    return out


@dataclass
class WidthTransferResult(ExperimentResult):
    """losses [P, W, steps, L, S] (each step's training loss before its update), final_loss [P, W, L, S] (the loss
    after the last update; NaN or inf where a member diverged), coord_check [P, W, 3, 3, S] (the coordinate check:
    t = 1..3, layers ``LAYERS``), for the P parameterizations, W widths, L learning rates and S seeds of
    ``config`` (float64)."""

    config: WidthTransferConfig
    losses: np.ndarray
    final_loss: np.ndarray
    coord_check: np.ndarray

    def mean_final_loss(self) -> np.ndarray:
        """[P, W, L]: the final loss averaged over seeds, +inf where any seed diverged (a rate that breaks one
        initialisation is not a usable rate)."""
        loss = np.where(np.isfinite(self.final_loss), self.final_loss, np.inf)
        with np.errstate(invalid="ignore"):
            return loss.mean(axis=-1)

    def best_lr_index(self) -> np.ndarray:
        """[P, W] int: index into ``config.learning_rates`` of the rate with the lowest mean final loss."""
        return np.argmin(self.mean_final_loss(), axis=-1)

    def best_learning_rates(self) -> np.ndarray:
        """[P, W]: the learning rate with the lowest mean final loss, per parameterization and width."""
        return np.asarray(self.config.learning_rates)[self.best_lr_index()]

    def coordinate_ratios(self) -> np.ndarray:
        """[P, 3, 3]: seed-mean coordinate size at the largest width over that at the second largest, per
        parameterization, t and layer (NaN where both are 0: the zero-initialised output at t = 1, and everywhere
        with a single width)."""
        mean = self.coord_check.mean(axis=-1)
        if mean.shape[1] < 2:
            return np.full(mean.shape[:1] + mean.shape[2:], np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            return mean[:, -1] / mean[:, -2]

    def summary(self) -> list[dict]:
        """One dict per (parameterization, width, learning rate), learning rate fastest (so with one
        parameterization and one width, as ``physai.sweep`` folding ``lr`` needs, one per ensemble member):
        parameterization, width, lr, loss_mean and
        loss_std (over seeds, after the last step), diverged (fraction of seeds), best (the lowest mean loss of its
        width), and coord_output_t2 (seed-mean |output| after one step in the coordinate check)."""
        mean = self.mean_final_loss()
        best = self.best_lr_index()
        rows = []
        with np.errstate(over="ignore", invalid="ignore"):  # the spread of diverging members overflows
            stds = self.final_loss.std(axis=-1)
        for p, param in enumerate(self.config.parameterizations):
            for w, m in enumerate(self.config.widths):
                for i, lr in enumerate(self.config.learning_rates):
                    final = self.final_loss[p, w, i]
                    finite = np.isfinite(final)
                    rows.append({"parameterization": param, "width": m, "lr": lr, "loss_mean": float(mean[p, w, i]),
                                 "loss_std": float(stds[p, w, i]) if finite.all() else float("nan"),
                                 "diverged": float(1 - finite.mean()), "best": bool(best[p, w] == i),
                                 "coord_output_t2": float(self.coord_check[p, w, 1, 2].mean())})
        return rows

    def report(self) -> str:
        """The best learning rate per width and parameterization, and the largest |log| coordinate ratio between the
        two largest widths (what ``physai width-transfer`` prints)."""
        config, best, ratios = self.config, self.best_learning_rates(), self.coordinate_ratios()
        lines = [f"{'param':>11} " + " ".join(f"{'m=' + str(m):>9}" for m in config.widths) + "   coord ratio (t=2, 3)"]
        for p, param in enumerate(config.parameterizations):
            worst = np.nanmax(np.abs(np.log(ratios[p, 1:])))
            rates = " ".join(f"{lr:>9.3g}" for lr in best[p])
            lines.append(f"{param:>11} {rates}   max |log ratio| {worst:.3f}")
        lines.append("(best learning rate per width; coordinate ratio between the two largest widths)")
        return "\n".join(lines)

    def trajectories(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """``loss`` (parameterization, width, step, member, seed), ``final_loss`` (parameterization, width, member,
        seed), ``coord_check`` (parameterization, width, t, layer, seed); ``member`` indexes the learning rates."""
        return {"loss": (("parameterization", "width", "step", "member", "seed"), self.losses),
                "final_loss": (("parameterization", "width", "member", "seed"), self.final_loss),
                "coord_check": (("parameterization", "width", "t", "layer", "seed"), self.coord_check)}

    def plot(self, path) -> None:
        """Top row: seed-mean loss after the last step vs learning rate, one curve per width, one panel per
        parameterization (rates whose loss ends above 10 times the initial loss left out). Bottom row: the coordinate
        check, mean |x| vs width per layer (colour) and step t (line style). Needs matplotlib
        (``pip install physai[plot]``)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        config = self.config
        P = len(config.parameterizations)
        fig, axes = plt.subplots(2, P, figsize=(4 * P, 7.5), squeeze=False)
        mean = self.mean_final_loss()
        lrs = np.asarray(config.learning_rates)
        cmap = plt.get_cmap("viridis")
        coord = self.coord_check.mean(axis=-1)
        for p, param in enumerate(config.parameterizations):
            ax = axes[0, p]
            for w, m in enumerate(config.widths):
                finite = mean[p, w] < 10 * self.losses[p, w, 0].mean()
                ax.plot(lrs[finite], mean[p, w, finite], "o-", ms=3, lw=1,
                        color=cmap(w / max(len(config.widths) - 1, 1)), label=f"m={m}")
            ax.set(xscale="log", yscale="log", xlabel="learning rate", title=param,
                   ylabel=f"training loss after {config.steps} steps" if p == 0 else None)
            ax = axes[1, p]
            for layer, name in enumerate(LAYERS):
                for t, style in enumerate(("-", "--", ":")):
                    values = coord[p, :, t, layer]
                    shown = (values > 0) & np.isfinite(values)
                    ax.plot(np.asarray(config.widths)[shown], values[shown], style, marker="o", ms=3,
                            color=f"C{layer}", label=f"{name}, t={t + 1}")
            ax.set(xscale="log", yscale="log", xlabel="width", title=f"coordinate check, {param}",
                   ylabel="mean |x|" if p == 0 else None)
        axes[0, 0].legend(fontsize=7)
        axes[1, 0].legend(fontsize=6, ncol=1)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def run(config: WidthTransferConfig = WidthTransferConfig(), progress: bool = False) -> WidthTransferResult:
    """Train the grid: one native ensemble run (learning rates x seeds) per parameterization and width, then the
    coordinate check at the same widths. ``progress`` shows a bar over the (parameterization, width) pairs."""
    config = config.validated()
    X, Y = make_task(config)
    P, W, L, S = len(config.parameterizations), len(config.widths), len(config.learning_rates), config.seeds
    losses = np.empty((P, W, config.steps, L, S))
    final = np.empty((P, W, L, S))
    coord_check = np.empty((P, W, 3, len(LAYERS), S))
    rates = np.repeat(np.asarray(config.learning_rates), S)  # member l * S + s: rate l, initialisation s
    pairs = [(p, w) for p in range(P) for w in range(W)]
    with np.errstate(over="ignore", invalid="ignore"):
        for p, w in _progress(pairs, total=len(pairs), desc="width transfer", enabled=progress):
            param, m = config.parameterizations[p], config.widths[w]
            net = _initial_models(param, config.d, m, config.activation, S, L, config.seed, config.dtype)
            trajectory = net.train(X, Y, rates, config.steps)
            losses[p, w] = trajectory.losses.reshape(config.steps, L, S)
            final[p, w] = net.loss_and_grad(X, Y)[0].reshape(L, S)
    Xc, Yc = X[:config.coord_n], Y[:config.coord_n]
    for p, param in enumerate(config.parameterizations):
        check = coordinate_check(param, config.widths, Xc, Yc, config.coord_lr, 3, S, config.activation, config.seed)
        coord_check[p] = check
    return WidthTransferResult(config, losses, final, coord_check)


add_parser = experiment_command(
    "width-transfer", __name__, help="learning-rate transfer across widths (muP vs standard)",
    description="Loss after T steps vs learning rate at widths 64..4096 under the standard, NTK, mean-field "
                "and muP parameterizations, and mup's coordinate check.")


Config = WidthTransferConfig
Result = WidthTransferResult
