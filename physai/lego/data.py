"""torch datasets over LEGO tasks (imports torch; ``physai.lego`` itself does not).

- ``LegoStream``: an ``IterableDataset`` of whole batches from stream ``seed``. DataLoader workers take
  interleaved batch indices (worker w gets batches w, w+W, ...), so the stream is split without overlap and
  the union over workers is the same whatever their number. Use ``DataLoader(stream, batch_size=None)``.
- ``LegoDataset``: a fixed, map-style set of sentences (samples ``start .. start+size-1`` of stream ``seed``),
  generated once; ``train_test_split`` builds disjoint train and test sets from one stream.

Items are dicts of int64 tensors ``tokens``, ``labels``, ``positions``, ``depth`` that share memory with the
generated numpy arrays (``torch.from_numpy``: no copies).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from physai._checks import check_int, check_seed
from physai.lego.task import LegoBatch, LegoTask

FIELDS = ("tokens", "labels", "positions", "depth")


def as_tensors(batch: LegoBatch) -> dict[str, torch.Tensor]:
    """Zero-copy torch views of a batch's arrays: a dict with keys tokens [B, 5n+2], labels, positions and depth
    [B, n], all int64."""
    return {name: torch.from_numpy(getattr(batch, name)) for name in FIELDS}


class LegoStream(IterableDataset):
    """``num_batches`` batches of ``batch_size`` sentences; batch j holds samples ``start + j*batch_size ...``.

    ``num_batches=None`` streams forever. Each item is a whole batch, a dict of int64 tensors (see
    :func:`as_tensors`), so use ``DataLoader(stream, batch_size=None)``; with several workers, worker w makes
    batches w, w + workers, ..., so no sample repeats.
    """

    def __init__(self, task: LegoTask, batch_size: int, seed: int = 0, *, start: int = 0,
                 num_batches: int | None = None):
        if not isinstance(task, LegoTask):
            raise TypeError(f"task: expected a LegoTask, got {type(task).__name__}")
        self.task = task
        self.batch_size = check_int(batch_size, "batch_size", min=1)
        self.seed = check_seed(seed)
        self.start = check_int(start, "start", min=0)
        self.num_batches = None if num_batches is None else check_int(num_batches, "num_batches", min=0)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        j = worker
        while self.num_batches is None or j < self.num_batches:
            yield as_tensors(self.task.sample(self.batch_size, self.seed, self.start + j * self.batch_size))
            j += workers

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless LegoStream has no length")
        return self.num_batches


class LegoDataset(Dataset):
    """Samples ``start .. start+size-1`` of stream ``seed``, generated once; item i is a dict of int64 tensors
    tokens [5n+2], labels, positions and depth [n] (views of one batch, see :func:`as_tensors`)."""

    def __init__(self, task: LegoTask, size: int, seed: int = 0, *, start: int = 0):
        if not isinstance(task, LegoTask):
            raise TypeError(f"task: expected a LegoTask, got {type(task).__name__}")
        self.task = task
        self.batch = task.sample(check_int(size, "size", min=0), seed, start)
        self.tensors = as_tensors(self.batch)

    def __len__(self) -> int:
        return len(self.batch)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def train_test_split(task: LegoTask, n_train: int, n_test: int, seed: int = 0) -> tuple[LegoDataset, LegoDataset]:
    """Disjoint fixed sets from stream ``seed``: train = samples [0, n_train), test = [n_train, n_train+n_test).

    The original study used 120,000 training and 12,000 test sentences, generated once.
    """
    n_train = check_int(n_train, "n_train", min=0)
    return LegoDataset(task, n_train, seed), LegoDataset(task, n_test, seed, start=n_train)
