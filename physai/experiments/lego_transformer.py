"""The LEGO transformer experiment (Zhang, Backurs, Bubeck, Eldan, Gunasekar, Wagner 2022, arXiv 2206.04301): a
BERT-style encoder learns the value of every variable of shuffled LEGO sentences, supervised only on the variables
near the root (depths 0..train_depth), and is tested on all depths; optionally its attention is first pre-trained
to "mimic" the two patterns the study found in pretrained BERT (a local band and attention to identical tokens).

    from physai.experiments.lego_transformer import LegoTransformerConfig, run
    result = run(LegoTransformerConfig(), progress=True)          # the small config, minutes on 2 CPU cores
    result.test_accuracy[-1]                                        # final test accuracy per depth 0..n_vars-1
    result.save("lego.json"); result.plot("lego.png"); result.plot_attention("attention.png")

What the study's code does and this module reproduces (``PRESETS["full"]``, ``physai lego-train --preset full``):
12 variables, supervision on chain positions 0..5, 120,000 training and 12,000 test sentences generated once,
cross-entropy averaged over the supervised variables with the prediction read at each variable's left-hand-side
token, a BERT-base encoder (12 layers, 12 heads, width 768, feed-forward 3072, post-LN, dropout 0.1) from random
initialisation, Adam at lr 5e-5 with cosine decay over 200 epochs, batch 1000. Its mimicking runs pre-train
BERT-base for 10 x 100 steps of batch 200 (Adam 5e-5, cosine) on the KL loss of
:func:`physai.lego.transformer.mimicking_loss`. Differences, by choice: the cosine schedule is stepped per update
rather than per epoch, the warmup is configurable, and sentences come from the native generator (``a = + 1 ,`` /
``y = - x ,`` instead of ``val``/``not`` words through a word-piece tokenizer: the same token structure, 5 tokens
per clause between ``[CLS]`` and ``[SEP]``).

Reproducibility: the train set is samples ``0..n_train-1`` of stream ``seed``, the test set the next ``n_test``,
the mimicking sentences the ones after; the batch of update s is a slice of the permutation of epoch
``s // steps_per_epoch`` drawn from ``numpy.random.default_rng([seed, epoch])``; parameters are initialised from
``torch.manual_seed(seed)`` inside a forked torch RNG (the caller's RNG state is untouched). A run that stops and
resumes from its checkpoint (model, optimiser, scheduler and torch RNG state) gives the same bits on CPU as an
uninterrupted one.

A run trained on depths 0..1 can fit every supervised variable without following a chain (each supervised parent
is the root): ``result.shortcut_accuracy`` gives, per depth, the accuracy of that rule (:func:`root_shortcut`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from dataclasses import dataclass, field

import numpy as np

from physai._checks import check_choice, check_float, check_int, check_seed
from physai.experiments._base import ExperimentConfig, ExperimentResult

INITS = ("random", "mimic")
DEVICES = ("cpu", "cuda")
_EVAL_CHUNK = 500  # sentences per forward pass in evaluation
_DIAGNOSTIC_SENTENCES = 256  # test sentences the attention diagnostics average over


def _field(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class LegoTransformerConfig(ExperimentConfig):
    """One training run. The defaults are the small configuration (n_vars=6, depths 0..1 supervised, 3 pre-LN
    layers of width 64, 1,000 updates of 100 sentences: minutes on 2 CPU cores); :data:`PRESETS` holds ``tiny``
    (CI, seconds), ``small`` and ``full`` (the study's). Units: counts of sentences or updates; learning rates per
    update."""

    n_vars: int = _field(6, "variables (clauses) per sentence; test depths 0..n_vars-1")
    group: str = _field("z2", "group of the task: z2, z<k> or s3 (the head is |G|-way)")
    graph: str = _field("chain", "dependency graph: chain or tree")
    train_depth: int = _field(1, "supervise the variables at depths 0..train_depth")
    n_train: int = _field(10_000, "fixed training sentences (samples 0..n_train-1 of stream seed)")
    n_test: int = _field(2_000, "test sentences (the n_test samples after the training set)")
    d_model: int = _field(64, "width of the residual stream")
    n_layers: int = _field(3, "encoder layers")
    n_heads: int = _field(4, "attention heads per layer (d_model must be a multiple)")
    d_ff: int = _field(256, "width of the feed-forward layers")
    norm: str = _field("pre", "LayerNorm placement: post (BERT) or pre")
    tied: bool = _field(False, "share one block across all layers (ALBERT)")
    dropout: float = _field(0.0, "dropout rate (BERT: 0.1)")
    init_std: float = _field(0.02, "std of the normal initialisation of weights and embeddings")
    init: str = _field("random", "random, or mimic: pre-train the attention on the study's patterns first")
    mimic_steps: int = _field(300, "updates of the mimicking pre-training (init=mimic)")
    mimic_batch_size: int = _field(100, "sentences per mimicking update")
    mimic_lr: float = _field(1e-3, "peak learning rate of the mimicking pre-training (cosine decay, no warmup)")
    batch_size: int = _field(100, "sentences per update")
    epochs: int = _field(10, "passes over the training set")
    lr: float = _field(1e-3, "peak learning rate of AdamW")
    weight_decay: float = _field(0.01, "AdamW weight decay")
    warmup_steps: int = _field(100, "updates of linear warmup before the cosine decay")
    eval_every: int = _field(250, "updates between evaluations (also at the start and the end)")
    seed: int = _field(0, "seed of the data stream, the initialisation and the batch order")
    device: str = _field("cpu", "cpu or cuda")

    @property
    def steps_per_epoch(self) -> int:
        """Updates per pass over the training set, ceil(n_train / batch_size)."""
        return -(-self.n_train // self.batch_size)

    @property
    def total_steps(self) -> int:
        """Updates of the task training, epochs * steps_per_epoch."""
        return self.epochs * self.steps_per_epoch

    def task(self):
        """The :class:`physai.lego.LegoTask` of this config."""
        from physai.lego import LegoTask

        return LegoTask(self.n_vars, self.group, self.graph)

    def validated(self) -> "LegoTransformerConfig":
        """This config, after checking every field (ValueError/TypeError naming the field)."""
        for name in ("n_vars", "n_train", "n_test", "d_model", "n_layers", "n_heads", "d_ff", "mimic_steps",
                     "mimic_batch_size", "batch_size", "epochs", "eval_every"):
            check_int(getattr(self, name), name, min=1)
        check_int(self.warmup_steps, "warmup_steps", min=0)
        check_int(self.train_depth, "train_depth", min=0, max=self.n_vars - 1)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={self.n_heads}, got {self.d_model}")
        check_choice(self.norm, "norm", ("post", "pre"))
        check_choice(self.init, "init", INITS)
        check_choice(self.device, "device", DEVICES)
        if self.init == "mimic" and self.n_heads < 2:
            raise ValueError(f"n_heads: init='mimic' fits heads 0 and 1 of every layer, expected >= 2, got "
                             f"{self.n_heads}")
        if not isinstance(self.tied, bool):
            raise TypeError(f"tied: expected a bool, got {type(self.tied).__name__}")
        if not 0 <= check_float(self.dropout, "dropout") < 1:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {self.dropout}")
        for name in ("init_std", "mimic_lr", "lr"):
            check_float(getattr(self, name), name, positive=True)
        check_float(self.weight_decay, "weight_decay", nonnegative=True)
        check_seed(self.seed)
        self.task()  # the group and graph are checked where they are defined
        return self


PRESETS: dict[str, LegoTransformerConfig] = {
    # CI: depth 0 and 1 supervised, seconds on one core
    "tiny": LegoTransformerConfig(n_vars=4, train_depth=1, n_train=2000, n_test=1000, d_model=32, n_layers=2,
                                  n_heads=2, d_ff=64, epochs=6, batch_size=50, lr=3e-3, warmup_steps=20,
                                  eval_every=60, mimic_steps=40, mimic_batch_size=50, mimic_lr=3e-3),
    "small": LegoTransformerConfig(),
    # the study's: BERT-base shape, 120,000 / 12,000 sentences, Adam lr 5e-5 cosine over 200 epochs, batch 1000;
    # its mimicking runs: 1,000 updates of batch 200 at lr 5e-5
    "full": LegoTransformerConfig(n_vars=12, train_depth=5, n_train=120_000, n_test=12_000, d_model=768, n_layers=12,
                                  n_heads=12, d_ff=3072, norm="post", dropout=0.1, batch_size=1000, epochs=200,
                                  lr=5e-5, weight_decay=0.0, warmup_steps=0, eval_every=600, mimic_steps=1000,
                                  mimic_batch_size=200, mimic_lr=5e-5, device="cuda"),
}


def root_shortcut(batch, task) -> np.ndarray:
    """Labels [B, n] (int64) that the rule "my clause's element applied to the root's value" gives each variable
    of a :class:`physai.lego.LegoBatch` of ``task`` (a single-component :class:`physai.lego.LegoTask`, whose root is
    variable 0): g_i . value(root), where the truth is g_i . value(parent) (the root keeps its own label). It is
    right for every variable whose parent is the root, so a model trained on depths 0..1 can fit its training
    data with it and never follow a chain; the LEGO study discusses such shortcuts (Zhang et al. 2022)."""
    if task.components != 1:
        raise ValueError(f"task: expected a single component (one root), got components={task.components}")
    elements = np.take_along_axis(batch.tokens, batch.positions + 2, axis=1) - task.vocab.element0
    shortcut = task.group.table[elements, batch.labels[:, :1]].astype(np.int64)
    shortcut[:, 0] = batch.labels[:, 0]
    return shortcut


def depth_accuracy(predictions: np.ndarray, labels: np.ndarray, depth: np.ndarray, n_depths: int) -> np.ndarray:
    """Accuracy at each depth 0..n_depths-1, float64 [n_depths]: the fraction of variables at that depth whose
    predicted value (predictions [B, n], ints) equals the label (labels, depth [B, n], ints); NaN for a depth that
    no variable has."""
    predictions, labels, depth = (np.asarray(a) for a in (predictions, labels, depth))
    if not predictions.shape == labels.shape == depth.shape:
        raise ValueError(f"predictions, labels, depth: expected equal shapes, got {predictions.shape}, "
                         f"{labels.shape}, {depth.shape}")
    n_depths = check_int(n_depths, "n_depths", min=1)
    if depth.size and (depth.min() < 0 or depth.max() >= n_depths):
        raise ValueError(f"depth: expected values in 0..{n_depths - 1}")
    count = np.bincount(depth.ravel(), minlength=n_depths).astype(np.float64)
    correct = np.bincount(depth.ravel(), weights=(predictions == labels).ravel(), minlength=n_depths)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, correct / np.maximum(count, 1), np.nan)


@dataclass
class LegoTransformerResult(ExperimentResult):
    """One run. Evaluations at eval_steps [E] (int64, updates done); test_accuracy and train_accuracy [E, n_vars]
    (float64, per depth 0..n_vars-1, NaN where no variable has that depth; train accuracy on the first
    min(n_train, n_test) training sentences); train_loss [S] (float64, loss of each update, S = updates done);
    mimic_loss [M, 2] (float64: manipulation and association KL of each mimicking update, M = 0 for random
    init). identical_mass / local_mass [L, H] (float64): attention mass on identical tokens and on the +-2 band per
    layer and head at the end, ``*_init`` at the start of the task training (after mimicking, if any).
    example_tokens [T] (int64) and example_attention [L, H, T, T] (float32): the final attention maps of test
    sentence 0. shortcut_accuracy [n_vars] (float64): test accuracy per depth of :func:`root_shortcut`, the rule
    that needs no chain (exact at depths 0 and 1, chance beyond), to compare the model with."""

    config: LegoTransformerConfig
    eval_steps: np.ndarray
    test_accuracy: np.ndarray
    train_accuracy: np.ndarray
    train_loss: np.ndarray
    mimic_loss: np.ndarray
    identical_mass_init: np.ndarray
    local_mass_init: np.ndarray
    identical_mass: np.ndarray = field(repr=False)
    local_mass: np.ndarray = field(repr=False)
    example_tokens: np.ndarray = field(repr=False)
    example_attention: np.ndarray = field(repr=False)
    shortcut_accuracy: np.ndarray = field(repr=False)

    @property
    def completed(self) -> bool:
        """Whether the run trained to the end (False for one stopped by ``stop_after``)."""
        return len(self.train_loss) == self.config.total_steps

    def summary(self) -> list[dict]:
        """One dict of numbers (the config says which run it is): steps (updates done), test_acc_supervised and
        test_acc_unsupervised (final test accuracy averaged over the supervised / the other depths),
        test_acc_depth_<k> for every depth, train_loss_end (mean over the last 1% of updates), and the largest
        final attention mass of any head on identical tokens (identical_mass_max) and on the +-2 band
        (local_mass_max)."""
        final = self.test_accuracy[-1]
        k = self.config.train_depth
        row = {"steps": int(self.eval_steps[-1]),
               "test_acc_supervised": float(np.nanmean(final[:k + 1])),
               "test_acc_unsupervised": float(np.nanmean(final[k + 1:])) if k + 1 < len(final) else math.nan}
        row.update({f"test_acc_depth_{d}": float(a) for d, a in enumerate(final)})
        tail = max(1, len(self.train_loss) // 100)
        row["train_loss_end"] = float(self.train_loss[-tail:].mean()) if len(self.train_loss) else math.nan
        row["identical_mass_max"] = float(self.identical_mass.max())
        row["local_mass_max"] = float(self.local_mass.max())
        return [row]

    def trajectories(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """``test_accuracy``/``train_accuracy`` (eval, depth), ``eval_step`` (eval,), ``train_loss`` (step,),
        ``mimic_loss`` (mimic_step, pattern), and the attention masses (layer, head)."""
        return {"test_accuracy": (("eval", "depth"), self.test_accuracy),
                "train_accuracy": (("eval", "depth"), self.train_accuracy),
                "eval_step": (("eval",), self.eval_steps),
                "train_loss": (("step",), self.train_loss),
                "mimic_loss": (("mimic_step", "pattern"), self.mimic_loss),
                "identical_mass": (("layer", "head"), self.identical_mass),
                "local_mass": (("layer", "head"), self.local_mass)}

    def plot(self, path, n_curves: int = 5) -> None:
        """Left: test accuracy against depth at ``n_curves`` points of training (supervised depths shaded, chance
        dashed); right: test accuracy of each depth against updates. Needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_depths = self.test_accuracy.shape[1]
        chance = 1 / self.config.task().group.order
        fig, (ax_depth, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
        picks = np.unique(np.linspace(0, len(self.eval_steps) - 1, min(n_curves, len(self.eval_steps))).astype(int))
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(picks)))
        for color, e in zip(colors, picks):
            ax_depth.plot(range(n_depths), self.test_accuracy[e], "o-", color=color, lw=1,
                          label=f"update {self.eval_steps[e]}")
        ax_depth.plot(range(n_depths), self.shortcut_accuracy, "x:", color="0.4", label="root shortcut")
        ax_depth.axvspan(-0.5, self.config.train_depth + 0.5, color="0.9", label="supervised")
        for ax in (ax_depth, ax_time):
            ax.axhline(chance, color="0.5", ls="--", lw=1)
            ax.set_ylim(min(chance, np.nanmin(self.test_accuracy, initial=chance)) - 0.05, 1.02)
        ax_depth.set(xlabel="depth (distance from the root)", ylabel="test accuracy",
                     title=f"{self.config.init} init, {'tied' if self.config.tied else 'untied'}, "
                           f"{self.config.n_layers} layers")
        ax_depth.legend(fontsize=8)
        for d in range(n_depths):
            ax_time.plot(self.eval_steps, self.test_accuracy[:, d], color=plt.cm.plasma(d / max(1, n_depths - 1)),
                         lw=1.5 if d <= self.config.train_depth else 1, ls="-" if d <= self.config.train_depth else ":",
                         label=f"depth {d}")
        ax_time.set(xlabel="update", ylabel="test accuracy", title="solid: supervised depths")
        ax_time.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def plot_attention(self, path) -> None:
        """Attention maps of the trained model on test sentence 0, one panel per layer (rows) and head (columns),
        titled with the head's mass on identical tokens and on the +-2 band. Needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        L, H, T, _ = self.example_attention.shape
        fig, axes = plt.subplots(L, H, figsize=(2.6 * H, 2.6 * L), squeeze=False)
        vocab = self.config.task().vocab
        names = [vocab[int(t)] for t in self.example_tokens]
        for layer in range(L):
            for head in range(H):
                ax = axes[layer, head]
                ax.imshow(self.example_attention[layer, head], cmap="Blues", vmin=0, vmax=1)
                ax.set_title(f"L{layer} H{head}: same {self.identical_mass[layer, head]:.2f}, "
                             f"band {self.local_mass[layer, head]:.2f}", fontsize=7)
                if T <= 40:  # token names stay legible up to about 8 clauses
                    ax.set_xticks(range(T), names, fontsize=4, rotation=90)
                    ax.set_yticks(range(T), names, fontsize=4)
                else:
                    ax.set_xticks([])
                    ax.set_yticks([])
        fig.suptitle(f"test sentence 0, {self.config.init} init: query rows, key columns", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


Config, Result = LegoTransformerConfig, LegoTransformerResult  # the names physai.sweep looks for


def depth_table(results: dict[str, LegoTransformerResult]) -> str:
    """A markdown table of the final test accuracy per depth (columns) of labelled runs (rows), supervised depths
    marked with ``*``."""
    first = next(iter(results.values()))
    n_depths = first.test_accuracy.shape[1]
    header = [f"d{d}{'*' if d <= first.config.train_depth else ''}" for d in range(n_depths)]
    lines = ["| run | " + " | ".join(header) + " |", "|---|" + "---:|" * n_depths]
    for label, result in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{a:.3f}" for a in result.test_accuracy[-1]) + " |")
    return "\n".join(lines)


def build_model(config: LegoTransformerConfig):
    """The :class:`physai.lego.transformer.LegoEncoder` of ``config`` (on the CPU, initialised from torch's
    current RNG)."""
    from physai.lego.transformer import LegoEncoder

    task = config.task()
    return LegoEncoder(len(task.vocab), task.sequence_length, task.group.order, d_model=config.d_model,
                       n_layers=config.n_layers, n_heads=config.n_heads, d_ff=config.d_ff, norm=config.norm,
                       tied=config.tied, dropout=config.dropout, init_std=config.init_std)


def batch_indices(config: LegoTransformerConfig, step: int) -> np.ndarray:
    """Training-set indices [<= batch_size] (int64) of update ``step``: slice ``step % steps_per_epoch`` of the
    permutation ``numpy.random.default_rng([seed, epoch]).permutation(n_train)``, epoch = step // steps_per_epoch."""
    epoch, k = divmod(check_int(step, "step", min=0), config.steps_per_epoch)
    permutation = np.random.default_rng([config.seed, epoch]).permutation(config.n_train)
    return permutation[k * config.batch_size:(k + 1) * config.batch_size]


def _cosine(warmup: int, total: int):
    """Multiplier of the peak learning rate at update s: linear warmup over ``warmup`` updates, then cosine decay
    to 0 at ``total`` (Loshchilov & Hutter 2017, without restarts)."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(s - warmup, total - warmup) / max(1, total - warmup)))
    return factor


def _optimizer(model, lr: float, weight_decay: float, warmup: int, total: int):
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(warmup, total))


def _evaluate(model, tensors: dict, n_depths: int) -> list[float]:
    import torch

    model.eval()
    predictions = []
    with torch.no_grad():
        for i in range(0, len(tensors["tokens"]), _EVAL_CHUNK):
            chunk = slice(i, i + _EVAL_CHUNK)
            predictions.append(model(tensors["tokens"][chunk], tensors["positions"][chunk]).argmax(-1).cpu())
    model.train()
    return depth_accuracy(torch.cat(predictions).numpy(), tensors["labels"].cpu().numpy(),
                          tensors["depth"].cpu().numpy(), n_depths).tolist()


def attention_diagnostics(model, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(identical [L, H], local [L, H], maps of sentence 0 [L, H, T, T] float32) of ``model`` on tokens [B, T]; see
    :func:`physai.lego.transformer.attention_mass`."""
    import torch

    from physai.lego.transformer import attention_mass

    model.eval()
    identical = local = example = None
    chunk = 32  # bounds the [chunk, L, H, T, T] attention tensor (about 70 MB for BERT-base at T = 62)
    with torch.no_grad():
        for i in range(0, len(tokens), chunk):
            _, attention = model(tokens[i:i + chunk], need_attention=True)
            same, near = attention_mass(attention, tokens[i:i + chunk])
            weight = len(tokens[i:i + chunk]) / len(tokens)
            identical = same * weight if identical is None else identical + same * weight
            local = near * weight if local is None else local + near * weight
            if example is None:
                example = attention[0].float().cpu().numpy()
    model.train()
    return identical.cpu().numpy(), local.cpu().numpy(), example


def mimic(model, config: LegoTransformerConfig, progress: bool = False) -> np.ndarray:
    """The study's attention pre-training: ``mimic_steps`` AdamW updates (no weight decay, cosine from
    ``mimic_lr``) of the sum of the two KL losses of :func:`physai.lego.transformer.mimicking_loss`, on fresh
    unlabelled sentences (samples after the train and test sets of stream ``seed``). Updates ``model`` in place;
    returns the losses [mimic_steps, 2] (manipulation, association), float64."""
    import torch

    from physai._progress import progress as progress_bar
    from physai.lego.transformer import mimicking_loss

    task = config.task()
    device = next(model.parameters()).device
    optimizer, scheduler = _optimizer(model, config.mimic_lr, 0.0, 0, config.mimic_steps)
    first = config.n_train + config.n_test
    losses = np.empty((config.mimic_steps, 2))
    model.train()
    for step in progress_bar(range(config.mimic_steps), desc="mimicking", enabled=progress):
        batch = task.sample(config.mimic_batch_size, config.seed, first + step * config.mimic_batch_size)
        tokens = torch.from_numpy(batch.tokens).to(device)
        _, attention = model(tokens, need_attention=True)
        manipulation, association = mimicking_loss(attention, tokens)
        optimizer.zero_grad()
        (manipulation + association).backward()
        optimizer.step()
        scheduler.step()
        losses[step] = manipulation.item(), association.item()
    return losses


def _to_device(dataset, device) -> dict:
    return {name: tensor.to(device) for name, tensor in dataset.tensors.items()}


def run(config: LegoTransformerConfig = LegoTransformerConfig(), progress: bool = False, *,
        checkpoint=None, checkpoint_every: int | None = None, stop_after: int | None = None) -> LegoTransformerResult:
    """Train and evaluate one model (see the module docstring for the protocol).

    checkpoint : a file path; if it exists (written by a run of the same config) training resumes from it, and it
        is (re)written every ``checkpoint_every`` updates, at ``stop_after`` and at the end. Written atomically.
    checkpoint_every : updates between checkpoints (default: eval_every).
    stop_after : stop once this many updates are done (after writing the checkpoint) and return the partial
        result (``result.completed`` is False): for jobs under a time limit.

    Raises ValueError naming ``device`` when ``"cuda"`` is asked and torch sees no GPU, and naming ``checkpoint``
    when the file was written by another config.
    """
    import torch
    import torch.nn.functional as F

    from physai._progress import progress as progress_bar
    from physai.lego.data import train_test_split

    config = config.validated()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' asked for but torch sees no GPU")
    checkpoint_every = config.eval_every if checkpoint_every is None else check_int(checkpoint_every,
                                                                                   "checkpoint_every", min=1)
    if stop_after is not None:
        check_int(stop_after, "stop_after", min=1)
    device = torch.device(config.device)
    task = config.task()
    train_set, test_set = train_test_split(task, config.n_train, config.n_test, config.seed)
    train, test = _to_device(train_set, device), _to_device(test_set, device)
    train_probe = {name: tensor[:config.n_test] for name, tensor in train.items()}
    diagnostic_tokens = test["tokens"][:_DIAGNOSTIC_SENTENCES]
    n_depths, total = config.n_vars, config.total_steps

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        model = build_model(config).to(device)
        state = _load_checkpoint(checkpoint, config)
        if state is None:
            history = {"eval_steps": [], "test_accuracy": [], "train_accuracy": [], "train_loss": [],
                       "mimic_loss": (mimic(model, config, progress).tolist() if config.init == "mimic" else [])}
            identical, local, _ = attention_diagnostics(model, diagnostic_tokens)
            history["identical_mass_init"], history["local_mass_init"] = identical.tolist(), local.tolist()
        optimizer, scheduler = _optimizer(model, config.lr, config.weight_decay, config.warmup_steps, total)
        if state is not None:
            history = state["history"]
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], device)
        start = len(history["train_loss"])
        end = total if stop_after is None else min(total, stop_after)

        def evaluate(step):
            history["eval_steps"].append(step)
            history["test_accuracy"].append(_evaluate(model, test, n_depths))
            history["train_accuracy"].append(_evaluate(model, train_probe, n_depths))

        def save():
            if checkpoint is not None:
                _save_checkpoint(checkpoint, config, model, optimizer, scheduler, history, device)

        model.train()
        for step in progress_bar(range(start, end), total=end - start, desc="training", enabled=progress):
            if step % config.eval_every == 0:
                evaluate(step)
            rows = torch.from_numpy(batch_indices(config, step)).to(device)
            logits = model(train["tokens"][rows], train["positions"][rows])
            supervised = train["depth"][rows] <= config.train_depth
            loss = F.cross_entropy(logits[supervised], train["labels"][rows][supervised])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            history["train_loss"].append(loss.item())
            if (step + 1) % checkpoint_every == 0 and step + 1 < end:
                save()
        if end == total and history["eval_steps"][-1:] != [total]:
            evaluate(total)
        save()
        identical, local, example = attention_diagnostics(model, diagnostic_tokens)

    return LegoTransformerResult(
        config, np.array(history["eval_steps"], dtype=np.int64),
        np.array(history["test_accuracy"]).reshape(-1, n_depths),
        np.array(history["train_accuracy"]).reshape(-1, n_depths), np.array(history["train_loss"], dtype=np.float64),
        np.array(history["mimic_loss"], dtype=np.float64).reshape(-1, 2),
        np.array(history["identical_mass_init"]), np.array(history["local_mass_init"]), identical, local,
        test_set.batch.tokens[0].copy(), example,
        depth_accuracy(root_shortcut(test_set.batch, task), test_set.batch.labels, test_set.batch.depth, n_depths))


def _save_checkpoint(path, config, model, optimizer, scheduler, history, device) -> None:
    import torch

    path = pathlib.Path(path)
    state = {"config": config.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "history": history}
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)  # a run killed while writing leaves the previous checkpoint intact


def _load_checkpoint(path, config) -> dict | None:
    import torch

    if path is None or not pathlib.Path(path).exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config") != config.to_dict():
        raise ValueError(f"checkpoint: {path} was written by a run of another config; remove it or pass that config")
    return state


def add_parser(commands) -> None:
    """Register ``physai lego-train`` on the CLI's subparsers: one flag per config field, starting from
    ``--preset`` (tiny, small, full)."""
    import argparse
    import typing

    from physai._argtypes import count, field_parser

    parser = commands.add_parser(
        "lego-train", help="LEGO transformer: train on short chains, test on long ones",
        description="Train a BERT-style encoder on LEGO sentences supervised at depths 0..train_depth and test it at "
                    "every depth. Flags override the preset's values.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="starting config: tiny (seconds), small (minutes on 2 CPU cores), full (the study's, "
                             "BERT-base on a GPU)")
    hints = typing.get_type_hints(LegoTransformerConfig)
    for f in dataclasses.fields(LegoTransformerConfig):
        parse, _ = field_parser(hints[f.name])
        # an absent flag stays absent from the namespace, so that the preset's value holds
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=parse, default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} (small preset: {f.default})")
    parser.add_argument("--compare", action="store_true",
                        help="run random and mimicking initialisation and print their per-depth table")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file: resume from it if it exists")
    parser.add_argument("--checkpoint-every", type=count, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", default="lego_transformer.json", help="where to write the curves")
    parser.add_argument("--plot", default="lego_transformer.png", help="accuracy-vs-depth figure ('' to skip)")
    parser.add_argument("--attention-plot", default="lego_attention.png", help="attention-map figure ('' to skip)")
    parser.set_defaults(run=_main)


def _with_suffix(path: str, label: str) -> str:
    p = pathlib.Path(path)
    return str(p.with_name(f"{p.stem}_{label}{p.suffix}"))


def _main(args) -> int:
    import time

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(LegoTransformerConfig)
                 if hasattr(args, f.name)}
    config = PRESETS[args.preset].replace(**overrides)
    variants = {init: config.replace(init=init) for init in INITS} if args.compare else {config.init: config}
    results = {}
    for label, variant in variants.items():
        start = time.perf_counter()
        checkpoint = args.checkpoint and (_with_suffix(args.checkpoint, label) if args.compare else args.checkpoint)
        result = run(variant, progress=not args.quiet, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every)
        print(f"{label} init: {variant.total_steps} updates in {time.perf_counter() - start:.1f} s")
        results[f"{label} init"] = result
        paths = {name: (_with_suffix(path, label) if args.compare else path) if path else ""
                 for name, path in (("json", args.json), ("plot", args.plot), ("attention", args.attention_plot))}
        result.save(paths["json"])
        print(f"curves: {paths['json']}")
        for name, draw in (("plot", result.plot), ("attention", result.plot_attention)):
            if paths[name]:
                try:
                    draw(paths[name])
                    print(f"figure: {paths[name]}")
                except ImportError:
                    print("matplotlib is not installed (pip install physai[plot]); no figure written")
    print("final test accuracy per depth (* supervised):")
    print(depth_table(results))
    return 0
