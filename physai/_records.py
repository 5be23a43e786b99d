"""Dataclasses of arrays that save to and load from ``.npz`` bit for bit (``Trajectory``, ``SharedBiasRun``)."""
from __future__ import annotations

from dataclasses import fields

import numpy as np


class ArrayRecord:
    """Mixin for a dataclass whose fields are all numpy arrays: ``save(path)`` writes them to a ``.npz``,
    ``load(path)`` reads them back with their dtypes and bits."""

    def save(self, path) -> None:
        """Write the arrays to ``path``, a ``.npz`` (bit for bit)."""
        np.savez(path, **{field.name: getattr(self, field.name) for field in fields(self)})

    @classmethod
    def load(cls, path):
        """The record ``save`` wrote to ``path``."""
        with np.load(path, allow_pickle=False) as data:
            return cls(**{field.name: data[field.name] for field in fields(cls)})
