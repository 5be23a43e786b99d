"""The shape every experiment has, so that ``physai.sweep`` and the CLI need no per-experiment code.

An experiment module ``physai.experiments.<name>`` exposes:

- ``Config``: a frozen dataclass deriving from :class:`ExperimentConfig`; every field typed (int, float, str, bool,
  ``X | None`` or ``tuple[X, ...]``) and documented with its unit; ``validated()`` checks every field and raises
  ``ValueError``/``TypeError`` naming it. ``ensemble_axes`` maps a sweep axis to the tuple field that the native
  ensemble batches in one call (EoS: ``{"lr": "learning_rates"}``).
- ``run(config, progress=False) -> Result``.
- ``Result``: a dataclass deriving from :class:`ExperimentResult` with a ``config`` field and array fields;
  ``summary()`` returns one flat dict of scalars per ensemble member, ``trajectories()`` the named arrays with
  their dimension names (the member dimension is called ``"member"``), ``plot(path)`` draws the figure;
  optionally ``coordinates()`` (the values labelling the run's own dimensions, ``{"step": [0, 1, ...]}``) and
  ``attributes()`` (``long_name`` and ``units`` of each summary key and trajectory), which a sweep stores.
  ``save``/``load`` (standard JSON or ``.npz``), pickling and deep copies come from the base class.

What ``physai.sweep`` relies on when it folds an ensemble axis: a run whose ensemble fields hold M values each
(member i takes the i-th value of every one of them) has M members, so ``summary()`` returns M rows in that order
and every trajectory with a ``"member"`` dimension has extent M there; no other setting may multiply the members
(a sweep refuses a result that breaks this, naming the experiment and this rule), and no config field may be named
like an ensemble axis (the sweep axis would be ambiguous). The module-level names ``Config`` and
``Result`` (aliases: ``Config = EosConfig``) are how the CLI and the sweep find the classes. A trajectory dimension named like a config field (``"seed"`` for the seeds of one run) is
stored as ``run_<name>`` in a sweep over that field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import typing
from typing import ClassVar

import numpy as np

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class ExperimentConfig:
    """Base of the experiments' frozen config dataclasses."""

    ensemble_axes: ClassVar[dict[str, str]] = {}

    def validated(self):
        """This config after checking every field; subclasses check theirs."""
        return self

    def replace(self, **changes):
        """A copy with ``changes`` applied, validated (an unknown field raises ``TypeError`` naming it)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown field(s) {unknown}; fields are {sorted(names)}")
        return dataclasses.replace(self, **changes).validated()

    def to_dict(self) -> dict:
        """The fields as standard-JSON values (tuples as lists)."""
        return {f.name: _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict):
        """Inverse of :meth:`to_dict`."""
        hints = typing.get_type_hints(cls)
        decoded = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                value = _decode(values[f.name])
                decoded[f.name] = tuple(value) if typing.get_origin(hints[f.name]) is tuple else value
        return cls(**decoded)


class ExperimentResult:
    """Base of the experiments' result dataclasses: a ``config`` field (an :class:`ExperimentConfig`) and fields
    holding numpy arrays or plain values."""

    def summary(self) -> list[dict]:
        """One flat dict of scalars per ensemble member."""
        raise NotImplementedError

    def trajectories(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        """Named arrays with their dimension names, e.g. ``{"loss": (("step", "member"), losses)}``."""
        raise NotImplementedError

    def report(self) -> str:
        """What ``physai <name>`` prints after a run: the summary as a fixed-width table (numbers to 4 significant
        digits); experiments add their own findings (a phase boundary, the best rate per width)."""
        rows = self.summary()
        if not rows:
            return "(no rows)"
        columns = list(rows[0])
        cells = [[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
        widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
        lines = [" ".join(c.rjust(w) for c, w in zip(columns, widths))]
        lines += [" ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells]
        return "\n".join(lines)

    def coordinates(self) -> dict[str, np.ndarray]:
        """The 1-d values labelling the run's own dimensions (``{"step": arange(steps)}``), by dimension name;
        none by default. The same for every member and for every config that gives the dimension that extent."""
        return {}

    def attributes(self) -> dict[str, dict[str, str]]:
        """Metadata of each summary key and trajectory (``{"loss": {"long_name": ..., "units": ...}}``); none by
        default."""
        return {}

    def to_dict(self) -> dict:
        """Standard JSON (no NaN/Infinity tokens: non-finite numbers are the strings "NaN", "Infinity",
        "-Infinity"): the config, every field (arrays as {"dtype", "shape", "data"}) and the summary."""
        out = {"config": self.config.to_dict()}
        for f in dataclasses.fields(self):
            if f.name != "config":
                out[f.name] = _encode(getattr(self, f.name))
        out["summary"] = _encode(self.summary())
        return out

    @classmethod
    def from_dict(cls, values: dict):
        config_cls = typing.get_type_hints(cls)["config"]
        fields = {"config": config_cls.from_dict(values["config"])}
        for f in dataclasses.fields(cls):
            if f.name != "config" and f.name in values:
                fields[f.name] = _decode(values[f.name])
        return cls(**fields)

    def save(self, path) -> None:
        """Write to ``path``: ``.npz`` (arrays bit for bit, config as JSON) or anything else as JSON (lossless too:
        floats are written with enough digits to read back the same value)."""
        path = pathlib.Path(path)
        if path.suffix == ".npz":
            arrays, plain = {}, {}
            for f in dataclasses.fields(self):
                value = getattr(self, f.name)
                if isinstance(value, np.ndarray):
                    arrays[f.name] = value
                elif f.name != "config":
                    plain[f.name] = _encode(value)
            header = json.dumps({"config": self.config.to_dict(), "fields": plain}, allow_nan=False)
            np.savez(path, __header__=np.array(header), **arrays)
        else:
            path.write_text(json.dumps(self.to_dict(), allow_nan=False))

    @classmethod
    def load(cls, path):
        """Read what :meth:`save` wrote."""
        path = pathlib.Path(path)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["__header__"]))
                values = {"config": header["config"], **header["fields"]}
                values.update({name: data[name] for name in data.files if name != "__header__"})
            return cls.from_dict(values)
        return cls.from_dict(json.loads(path.read_text()))


def _encode(value):
    if isinstance(value, np.ndarray):
        data = value.tolist()
        if value.dtype.kind in "fc":
            data = _encode(data)
        return {"dtype": value.dtype.str, "shape": list(value.shape), "data": data}
    if isinstance(value, ExperimentConfig):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _decode(value):
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):
        if set(value) == {"dtype", "shape", "data"}:
            dtype = np.dtype(value["dtype"])
            data = _decode(value["data"]) if dtype.kind in "fc" else value["data"]
            return np.array(data, dtype=dtype).reshape(value["shape"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    return value
