"""Sweeps over experiment configs: a grid of points, run on any ``concurrent.futures.Executor``, stored point by
point as an xarray Dataset in Zarr, resumable, plotted as a phase diagram.

    from physai import sweep
    from physai.experiments import eos

    space = sweep.grid(lr=np.geomspace(0.1, 1.0, 16), width=[32, 64, 128], seed=range(4))
    ds = sweep.run(eos.Config(steps=500), space, out="runs/eos.zarr")          # in-process
    ds = sweep.run(eos.Config(steps=500), space, out="runs/eos.zarr",
                   executor=dask.distributed.Client("tcp://host:8786").get_executor())
    sweep.plot(ds, z="sharpness_last_quarter", x="lr", y="width", path="phase.png")

or from the shell: ``physai sweep eos --lr 0.1:1.0:16log --width 32,64,128 --seed 0:4 --steps 500 --out runs/eos.zarr``
and ``physai plot runs/eos.zarr --x lr --y width --z sharpness_last_quarter``.

**Experiments.** Nothing here is specific to one experiment: a sweep works from the protocol of
:mod:`physai.experiments._base`. The config's module (``type(config).__module__``) must define a module-level
``run(config, progress=False)`` returning a result with ``summary()`` and ``trajectories()``; ``physai sweep NAME``
imports ``physai.experiments.NAME`` (or NAME itself when it is a dotted module path) and takes its module-level
names ``Config``, ``run`` and ``Result`` (``Config = EosConfig``, ``Result = EosResult`` in eos.py; see
:func:`protocol`).

**Axes.** An axis is a config field (``width``, ``seed``, ``steps``...) or an ensemble axis of the config
(``Config.ensemble_axes``: ``lr`` for EoS, folded into the tuple field ``learning_rates``). :func:`grid` gives
each axis its own dimension (outer product); :func:`zip_` makes axes vary together along one dimension, named
after its first axis. A dimension whose axes are all ensemble axes is *folded*: the points that differ only
along folded dimensions are the members of one ensemble, one ``run()`` call (one native call for EoS); every
other point is an independent task. Each member's config is then the base config with its one value in each
ensemble field; an ensemble field whose axis is not swept must hold exactly one value.

**Dataset.** One dimension per sweep dimension (coordinates: the axis values, in the fields' types; the other
axes of a zipped dimension are coordinates along it), then the run's own dimensions (``step``, ``tracked_step``
for EoS, with the coordinates its result's ``coordinates()`` gives; ``member`` when no ensemble axis is swept and
a run has several members; one named like a sweep axis is renamed ``run_<name>``: a run's own ``seed`` dim in a
sweep over ``seed``). Data variables: each key of ``summary()`` (dims: the sweep's, plus ``member`` where there
is one) except keys that are axis names (those are the coordinates), each array of ``trajectories()``, with the
``long_name``/``units`` of the result's ``attributes()``, and per point ``status`` (int8: 0 missing, 1 done, 2
failed; CF flag attributes), ``error`` (the exception, "" when none) and ``point_hash``. Floats are NaN at points
not done; integers and booleans keep their dtype and hold their fill value there (select with ``status == 1``).
Attributes: ``experiment`` (module), ``physai_version``, ``config`` (JSON: the base config's fields that no axis
sets) and ``axes`` (JSON: dimension -> axis -> values).

**Storage and resume.** The store (Zarr v3) is created at ``out`` and every finished task is written at once
(its data, then its ``status``, the commit mark): Zarr's local store replaces each chunk file atomically, and the
status of a task's points is one chunk, so a process killed at any moment (SIGKILL included) loses at most the
tasks in flight. Rerunning the same sweep on the same ``out`` skips every point whose status is done and whose
``point_hash`` (SHA-256 of the experiment, the point's own config and ``physai.__version__``) matches; failed
and missing points are run again. A store holding another sweep (experiment, axes, base config or physai
version) is refused before any work, as is one another process is writing (the writer holds an ``flock`` on the
store's directory): ``overwrite=True`` (``--overwrite``) starts it afresh.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib
import json
import logging
import math
import os
import pathlib
import pkgutil
import re
import signal
import sys
import threading
import time
import typing
from collections.abc import Iterable, Mapping

import numpy as np

from physai._argtypes import field_parser, field_type
from physai._progress import progress as _progress
from physai.experiments._base import ExperimentConfig

__all__ = ["Space", "StoreMismatch", "grid", "zip_", "run", "load", "plot", "experiment", "executor_from_spec",
           "parse_axis", "point_hash", "protocol", "space_and_config"]

_log = logging.getLogger("physai.sweep")

STATUS_MISSING, STATUS_DONE, STATUS_FAILED = 0, 1, 2
_RESERVED = ("status", "error", "point_hash")


# -- spaces -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Space:
    """The points of a sweep: ``dims`` is a tuple of dimensions, each ``(name, {axis: values})`` with every axis
    of a dimension holding the same number of values. Build it with :func:`grid` and :func:`zip_`."""

    dims: tuple[tuple[str, dict[str, tuple]], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(next(iter(axes.values()))) for _, axes in self.dims)

    @property
    def axes(self) -> list[str]:
        """Every axis name, in dimension order."""
        return [axis for _, axes in self.dims for axis in axes]

    def __len__(self) -> int:
        return math.prod(self.shape)

    def point(self, index: tuple[int, ...]) -> dict:
        """The axis values at ``index`` (one integer per dimension)."""
        return {axis: values[i] for (_, axes), i in zip(self.dims, index) for axis, values in axes.items()}


def _axis_values(name: str, values) -> tuple:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a sequence of values, got {type(values).__name__} {values!r}")
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"{name}: expected a 1-d array of values, got shape {values.shape}")
        values = values.tolist()
    # numpy scalars become Python numbers: the values go into configs, JSON and hashes
    values = tuple(v.item() if isinstance(v, np.generic) else v for v in values)
    if not values:
        raise ValueError(f"{name}: expected at least one value, got an empty axis")
    return values


def _check_unique(name: str, values: tuple) -> None:
    """A dimension's index holds each value once (1 and 1.0 are the same value)."""
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise ValueError(f"{name}: values repeat ({repeated}); each point of a dimension needs its own value")


def _merge(spaces: Iterable[Space]) -> Space:
    dims, seen = [], set()
    for space in spaces:
        if not isinstance(space, Space):
            raise TypeError(f"grid: positional arguments must be spaces from grid() or zip_(), got "
                            f"{type(space).__name__}")
        for dim in space.dims:
            for axis in dim[1]:
                if axis in seen:
                    raise ValueError(f"{axis}: axis given twice")
                seen.add(axis)
            dims.append(dim)
    return Space(tuple(dims))


def grid(*spaces: Space, **axes) -> Space:
    """The outer product of ``spaces`` (from :func:`zip_` or :func:`grid`) and of one dimension per keyword axis,
    in that order: ``grid(lr=np.geomspace(0.1, 1, 16), seed=range(4))`` has shape (16, 4).

    Raises ``TypeError`` (an axis that is not a sequence) or ``ValueError`` (an empty axis, repeated values, an
    axis given twice), naming the axis. Whether an axis is a field of the config is checked by :func:`run`, before
    any work."""
    own = []
    for name, values in axes.items():
        values = _axis_values(name, values)
        _check_unique(name, values)
        own.append(Space(((name, {name: values}),)))
    return _merge([*spaces, *own])


def zip_(**axes) -> Space:
    """One dimension along which all ``axes`` vary together (like ``zip``), named after the first axis:
    ``zip_(width=[32, 64], n=[100, 200])`` has the points (32, 100) and (64, 200). Raises ``ValueError`` naming
    the axes when their lengths differ, or an axis when it is empty or, for the first (the dimension's index),
    holds a value twice."""
    if not axes:
        raise ValueError("zip_: expected at least one axis")
    values = {name: _axis_values(name, v) for name, v in axes.items()}
    lengths = {name: len(v) for name, v in values.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zip_: axes of different lengths {lengths}")
    _check_unique(next(iter(values)), next(iter(values.values())))
    return Space(((next(iter(values)), values),))


# -- experiments --------------------------------------------------------------------------------------------------

def protocol(module) -> tuple[type, typing.Callable, type]:
    """(Config, run, Result) of an experiment module: its module-level ``Config``, ``run`` and ``Result`` (see
    ``physai.experiments._base``). Raises ``ValueError`` saying what the module lacks."""
    from physai.experiments._base import ExperimentResult

    found = []
    for alias, base in (("Config", ExperimentConfig), ("Result", ExperimentResult)):
        value = getattr(module, alias, None)
        if not (isinstance(value, type) and issubclass(value, base)):
            raise ValueError(f"experiment: module {module.__name__} has no {alias} = <its {base.__name__} subclass> "
                             f"(see physai.experiments._base)")
        found.append(value)
    if not callable(getattr(module, "run", None)):
        raise ValueError(f"experiment: module {module.__name__} has no run(config) function")
    _check_ensemble_axes(found[0])
    return found[0], module.run, found[1]


def _check_ensemble_axes(cls) -> None:
    """An ensemble axis must not be named like a field (``seed`` and ``{"seed": "seeds"}``): the axis would mean
    either; and it must name a tuple field."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for axis, target in cls.ensemble_axes.items():
        if axis in fields:
            raise ValueError(f"{cls.__module__}.{cls.__name__}: ensemble axis {axis!r} is also a config field, so "
                             f"a sweep over {axis!r} would be ambiguous; rename the axis or the field "
                             f"(physai.experiments._base)")
        if target not in fields:
            raise ValueError(f"{cls.__module__}.{cls.__name__}: ensemble axis {axis!r} folds into {target!r}, which "
                             f"is not a field")


def experiment(name: str):
    """The experiment module ``physai.experiments.<name>`` (or the module ``name`` when it is a dotted path; a
    hyphen reads as an underscore, so the subcommand's name ``width-transfer`` works), checked to follow the
    protocol (see :func:`protocol`). Raises ``ValueError`` naming the experiments there are
    when ``name`` is not one, or what the module lacks."""
    import physai.experiments

    available = sorted(m.name for m in pkgutil.iter_modules(physai.experiments.__path__) if not m.name.startswith("_"))
    if not isinstance(name, str) or not name or name.startswith("_"):
        raise ValueError(f"experiment: expected one of {available} or a dotted module path, got {name!r}")
    module_name = name if "." in name else f"physai.experiments.{name.replace('-', '_')}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ValueError(f"experiment: expected one of {available} or a dotted module path, got {name!r}") from None
    protocol(module)
    return module


def _check_config(config) -> None:
    if not (dataclasses.is_dataclass(config) and isinstance(config, ExperimentConfig)):
        raise TypeError(f"config: expected an experiment config (a dataclass deriving ExperimentConfig), got "
                        f"{type(config).__name__}")
    module = sys.modules[type(config).__module__]
    if not callable(getattr(module, "run", None)):
        raise TypeError(f"config: its module {module.__name__} has no run(config) function")
    _check_ensemble_axes(type(config))


def _execute(config):
    """Run one task (in a worker): the experiment's run() on ``config``, reduced to what the store keeps."""
    # The module is looked up at call time, so a wrapper installed on module.run is what runs.
    result = importlib.import_module(type(config).__module__).run(config)
    return result.summary(), result.trajectories(), result.coordinates(), result.attributes()


def point_hash(config) -> str:
    """SHA-256 (hex) of the experiment module, the point's config and ``physai.__version__``: the key under which
    a finished point is stored."""
    from physai import __version__

    text = json.dumps({"experiment": type(config).__module__, "config": config.to_dict(),
                       "physai_version": __version__}, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# -- plan: the tasks of a sweep, all checked before any work -------------------------------------------------------

@dataclasses.dataclass
class _Task:
    region: tuple            # index into the sweep dims: int for unfolded dims, slice(None) for folded ones
    config: ExperimentConfig
    hashes: np.ndarray       # [folded extents...] str
    label: str               # the point's coordinates, for log lines


@dataclasses.dataclass
class _Plan:
    config: ExperimentConfig
    stored_config: dict      # the base config's fields that no axis sets (those are in the ``axes`` attribute)
    space: Space
    folded: list[bool]       # per sweep dim
    members_folded: bool     # each point is one ensemble member (an ensemble axis is swept)
    tasks: list[_Task]

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(n if f else 1 for n, f in zip(self.space.shape, self.folded))


def _plan(config, space: Space) -> _Plan:
    _check_config(config)
    if not isinstance(space, Space):
        raise TypeError(f"space: expected a Space from grid() or zip_(), got {type(space).__name__}")
    config = config.validated()
    cls = type(config)
    fields = [f.name for f in dataclasses.fields(config)]
    ensemble = dict(cls.ensemble_axes)
    hints = typing.get_type_hints(cls)
    for axis in space.axes:
        if axis in ensemble.values():
            swept_by = next(a for a, f in ensemble.items() if f == axis)
            raise ValueError(f"{axis}: an ensemble field; sweep its axis {swept_by!r} instead")
        if axis not in fields and axis not in ensemble:
            raise ValueError(f"{axis}: not a field of {cls.__name__} nor one of its ensemble axes "
                             f"{sorted(ensemble)}; fields are {fields}")
        if axis in _RESERVED:
            raise ValueError(f"{axis}: the name of a variable every sweep stores; rename the field")
    space = Space(tuple((dim, {axis: _as_field_type(axis, values, hints[ensemble.get(axis, axis)])
                               for axis, values in axes.items()}) for dim, axes in space.dims))

    swept_ensemble = [axis for axis in space.axes if axis in ensemble]
    members_folded = bool(swept_ensemble)
    if members_folded:
        for axis, target in ensemble.items():
            if axis not in swept_ensemble and len(getattr(config, target)) != 1:
                raise ValueError(f"{target}: expected one value when {swept_ensemble} are swept (each point is one "
                                 f"ensemble member), got {len(getattr(config, target))}; sweep {axis!r} or give one")

    def assign(axis, value):
        if axis not in ensemble:
            return {axis: value}
        # one member: every other ensemble field holds its first value
        return {target: (value,) if other == axis else getattr(config, target)[:1]
                for other, target in ensemble.items()}

    for _, axes in space.dims:  # each value alone, so that the message names the axis refusing it
        for axis, values in axes.items():
            for value in values:
                try:
                    config.replace(**assign(axis, value))
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{axis}: value {value!r} refused by {cls.__name__}: {error}") from error

    swept_fields = {ensemble.get(axis, axis) for axis in space.axes}
    stored_config = {k: v for k, v in config.to_dict().items() if k not in swept_fields}
    folded = [all(axis in ensemble for axis in axes) for _, axes in space.dims]
    in_folded = {axis for (_, axes), f in zip(space.dims, folded) if f for axis in axes}
    outer = [1 if f else n for n, f in zip(space.shape, folded)]
    inner = [n for n, f in zip(space.shape, folded) if f]

    def member(task_config, m):
        return dataclasses.replace(task_config, **{t: (getattr(task_config, t)[m],) for t in ensemble.values()})

    tasks = []
    for outer_index in np.ndindex(*outer):
        members = []
        for inner_index in np.ndindex(*inner):
            it = iter(inner_index)
            members.append(space.point(tuple(next(it) if f else i for i, f in zip(outer_index, folded))))
        fixed = {axis: value for axis, value in members[0].items() if axis not in in_folded}
        label = ", ".join(f"{axis}={value!r}" for axis, value in fixed.items()) or "the base config"
        changes = {axis: value for axis, value in fixed.items() if axis not in ensemble}
        if members_folded:
            for axis, target in ensemble.items():
                changes[target] = (tuple(m[axis] for m in members) if axis in swept_ensemble
                                   else getattr(config, target) * len(members))
        try:
            task_config = config.replace(**changes)
        except (TypeError, ValueError) as error:
            raise ValueError(f"point {label}: refused by {cls.__name__}: {error}") from error
        hashes = [point_hash(member(task_config, m) if members_folded else task_config) for m in range(len(members))]
        region = tuple(slice(None) if f else i for i, f in zip(outer_index, folded))
        tasks.append(_Task(region, task_config, np.array(hashes, dtype=object).reshape(inner), label))
    return _Plan(config, stored_config, space, folded, members_folded, tasks)


def _as_field_type(axis: str, values: tuple, annotation) -> tuple:
    """``values`` as the field's type would hold them: an int given to a real field becomes a float, so that
    ``lr=[1, 0.5]`` is the same sweep (coordinates, hashes) as ``--lr 1,0.5``."""
    try:
        kind = field_type(annotation)[0]
    except TypeError:  # a field with no command-line form: its values are taken as given
        return values
    if kind is not float:
        return values
    converted = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values)
    _check_unique(axis, converted)
    return converted


# -- storage ------------------------------------------------------------------------------------------------------

def _coordinate(values: tuple) -> np.ndarray:
    if all(isinstance(v, (bool, int, float, str)) for v in values):
        array = np.asarray(values)
        return array.astype(object) if array.dtype.kind == "U" else array
    # None, tuples: their JSON text, which is also how they appear in the ``axes`` attribute
    return np.array([json.dumps(_json(v)) for v in values], dtype=object)


def _json(value):
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def _storage(values: np.ndarray) -> tuple[typing.Any, typing.Any]:
    """(zarr dtype, fill value) for an array of ``values``. Floats read back NaN at points not stored; integers
    and booleans keep their dtype and read back their fill value there (the type's minimum, False), so ``status``
    says which points hold values."""
    kind = values.dtype.kind
    if kind == "f":
        return values.dtype, np.nan
    if kind in "iu":
        return values.dtype, int(np.iinfo(values.dtype).min if kind == "i" else np.iinfo(values.dtype).max)
    if kind == "b":
        return values.dtype, False
    if kind in "UO":
        return str, ""
    raise TypeError(f"a result value of dtype {values.dtype} has no storage form (expected numbers, bools, strings)")


class StoreMismatch(RuntimeError):
    """The store cannot take a result (a variable's dims or a coordinate's values changed): the sweep stops, as
    every other point would hit it too. Start afresh with ``overwrite=True`` or use another path."""


class _Store:
    """The Zarr group of one sweep: coordinates, per-point ``status``/``error``/``point_hash``, and the
    experiment's variables, each created when its first value arrives. The only writer is the driving process,
    which holds an exclusive lock (``fcntl.flock``) on the store's directory while it runs."""

    def __init__(self, plan: _Plan, out, overwrite: bool):
        import zarr
        from physai import __version__

        self.plan = plan
        self.dims = tuple(name for name, _ in plan.space.dims)
        self.shape = plan.space.shape
        self.axis_names = set(plan.space.axes)
        self._lock = None
        experiment = type(plan.config).__module__
        attrs = {"experiment": experiment, "physai_version": __version__,
                 "config": json.dumps(plan.stored_config, allow_nan=False, sort_keys=True),
                 "axes": json.dumps({dim: {axis: [_json(v) for v in values] for axis, values in axes.items()}
                                     for dim, axes in plan.space.dims})}
        # a zipped axis that does not name its dimension is a coordinate too (CF's "coordinates" attribute)
        extra = [axis for dim, axes in plan.space.dims for axis in axes if axis != dim]
        if extra:
            attrs["coordinates"] = " ".join(extra)
        if out is None:
            store = zarr.storage.MemoryStore()
        elif isinstance(out, (str, pathlib.PurePath)):
            out = str(out)  # for messages
            if not out:
                raise ValueError("out: expected a path for the Zarr store (or None to keep it in memory), got ''")
            path = pathlib.Path(out)
            if path.suffix == ".nc":
                raise ValueError(f"out: sweeps are stored in Zarr, point by point; got {out!r}")
            if not overwrite and (path / ".zgroup").exists():
                raise ValueError(f"out: {out!r} is a Zarr v2 store; sweeps are Zarr v3 stores: choose another path "
                                 f"(or pass overwrite=True, CLI --overwrite, to replace it)")
            if path.exists() and not (path / "zarr.json").exists() and (path.is_file() or any(path.iterdir())):
                raise ValueError(f"out: {out!r} exists and is neither empty nor a Zarr store")
            path.mkdir(parents=True, exist_ok=True)
            self._lock = _lock(path)
            if not overwrite:
                # a write interrupted by a kill leaves its temporary file next to the chunk it did not replace
                for partial in path.rglob("*.partial"):
                    partial.unlink()
            store = zarr.storage.LocalStore(path)
        else:
            store = out
        self.store = store
        self._order: list[str] = []
        # the coordinates' stored values, read once: this process is the store's only writer, and each read is a
        # round trip through zarr's event loop (a sixth of a short task's write)
        self._coordinate_values: dict[str, np.ndarray] = {}
        try:
            self._open(store, attrs, out, overwrite)
        except BaseException:
            self.close()
            raise

    def _open(self, store, attrs: dict, out, overwrite: bool) -> None:
        import zarr

        self.group = zarr.open_group(store, mode="w" if overwrite else "a", zarr_format=3)
        previous = dict(self.group.attrs)
        if previous:
            self._check_same_sweep(previous, attrs, out)
            self.arrays = dict(self.group.arrays())  # handles kept: opening one reads its metadata
            self.extents = self._harmonize()
        else:
            if any(True for _ in self.group.keys()):
                raise ValueError(f"out: {out!r} is a Zarr group that a sweep did not write")
            self._create_coordinates()
            self.arrays = dict(self.group.arrays())
            self.extents = {}
            self.group.attrs.update(attrs)

    def _check_same_sweep(self, previous: dict, attrs: dict, out) -> None:
        """Refuse, before any work, a store that this sweep would leave mixed: another experiment, axes, base
        config or library version, or a layout this version does not write."""
        differs = [key for key in ("experiment", "axes", "config", "physai_version")
                   if previous.get(key) != attrs[key]]
        if differs:
            details = []
            for key in differs:
                if key == "config" and isinstance(previous.get(key), str):  # name the fields that changed
                    was, now = json.loads(previous[key]), json.loads(attrs[key])
                    details += [f"{name}: stored {was.get(name)!r}, now {now.get(name)!r}"
                                for name in sorted(set(was) | set(now)) if was.get(name) != now.get(name)]
                else:
                    details.append(f"{key}: stored {previous.get(key)!r}, now {attrs[key]!r}")
            detail = "; ".join(details)
            raise ValueError(f"out: {out!r} holds another sweep ({detail}); resuming would mix the two. Choose "
                             f"another path, or pass overwrite=True (CLI: --overwrite) to start afresh")
        missing = [name for name in _RESERVED if name not in self.group.array_keys()]
        if missing:
            raise ValueError(f"out: {out!r} lacks {missing}: not a layout this version of physai.sweep writes; "
                             f"pass overwrite=True (CLI: --overwrite) to start afresh")

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _create_coordinates(self) -> None:
        for dim, axes in self.plan.space.dims:
            for axis, values in axes.items():
                coordinate = _coordinate(values)
                dtype, fill = _storage(coordinate)
                self.group.create_array(axis, shape=coordinate.shape, dtype=dtype, fill_value=fill,
                                        dimension_names=[dim])[...] = coordinate
        chunks = self.plan.chunks
        self.group.create_array("status", shape=self.shape, chunks=chunks, dtype=np.int8, fill_value=STATUS_MISSING,
                                dimension_names=self.dims, compressors=None,
                                attributes={"long_name": "state of the point", "flag_values": [0, 1, 2],
                                            "flag_meanings": "missing done failed"})
        self.group.create_array("error", shape=self.shape, chunks=chunks, dtype=str, fill_value="",
                                dimension_names=self.dims, attributes={"long_name": "exception of a failed point"})
        self.group.create_array("point_hash", shape=self.shape, chunks=chunks, dtype=str, fill_value="",
                                dimension_names=self.dims,
                                attributes={"long_name": "SHA-256 of experiment, point config, physai version"})

    def _harmonize(self) -> dict[str, int]:
        """Extents of the experiment's own dimensions, after growing any array a kill left behind mid-resize."""
        extents: dict[str, int] = {}
        arrays = self.arrays.values()
        for array in arrays:
            for dim, n in zip(array.metadata.dimension_names, array.shape):
                if dim not in self.dims:
                    extents[dim] = max(n, extents.get(dim, 0))
        for array in arrays:
            wanted = tuple(extents.get(dim, n) for dim, n in zip(array.metadata.dimension_names, array.shape))
            if wanted != array.shape:
                array.resize(wanted)
        return extents

    def todo(self) -> list[_Task]:
        """The tasks with a point not stored as done under its current hash."""
        status = np.asarray(self.arrays["status"][...])
        hashes = np.asarray(self.arrays["point_hash"][...]).astype(object)
        return [task for task in self.plan.tasks
                if not (np.all(status[task.region] == STATUS_DONE) and np.all(hashes[task.region] == task.hashes))]

    def write(self, task: _Task, summary: list[dict], trajectories: Mapping, coordinates: Mapping,
              attributes: Mapping) -> None:
        """Store one task's result, then mark its points done. Raises ``ValueError``/``TypeError`` for a result
        that breaks the protocol (that task fails), :class:`StoreMismatch` for one the store cannot take."""
        variables = self._variables(task, summary, trajectories)
        coordinates = self._coordinates(coordinates, variables)
        for dim, values in coordinates.items():
            self._check_coordinate(dim, values)
        for dim, values in coordinates.items():
            self._write_coordinate(dim, values)
        for name, (dims, values) in variables.items():
            self._write(name, dims, task.region, values, attributes.get(name, {}))
            if name not in self._order:
                self._order.append(name)
        self.mark(task, STATUS_DONE, "")

    def mark(self, task: _Task, status: int, error: str) -> None:
        # status last: it is the commit mark of the task, one chunk, replaced atomically
        shape = task.hashes.shape
        self.arrays["point_hash"][task.region] = task.hashes.astype(str)
        self.arrays["error"][task.region] = np.full(shape, error, dtype=object).astype(str)
        self.arrays["status"][task.region] = np.full(shape, status, dtype=np.int8)

    def _variables(self, task: _Task, summary: list[dict], trajectories: Mapping) -> dict:
        fold_shape = task.hashes.shape
        members = len(summary)
        experiment = type(self.plan.config).__module__
        if self.plan.members_folded and members != task.hashes.size:
            ensemble = sorted(type(self.plan.config).ensemble_axes.values())
            raise ValueError(f"{experiment}: run() returned {members} summary rows for a config whose ensemble "
                             f"fields {ensemble} hold {task.hashes.size} values each; to fold an ensemble axis the "
                             f"sweep needs one member per value and nothing else multiplying the members "
                             f"(physai.experiments._base)")
        # one member and no ensemble axis swept: a member dimension of extent 1 says nothing
        lone = not self.plan.members_folded and members == 1
        out = {}
        for key in summary[0] if summary else ():
            if key in self.axis_names:  # the coordinate already holds it
                continue
            values = np.array([row[key] for row in summary])
            if self.plan.members_folded:
                out[key] = ((), values.reshape(fold_shape))
            else:
                out[key] = ((), values[0]) if lone else (("member",), values)
        for name, (dims, array) in trajectories.items():
            if name in out or name in self.axis_names or name in _RESERVED or name in self.dims:
                raise ValueError(f"trajectories(): {name!r} is also a summary key, an axis or a reserved name")
            array, dims = np.asarray(array), tuple(dims)
            if len(dims) != array.ndim:
                raise ValueError(f"trajectories(): {name!r} has dims {dims} but shape {array.shape}")
            if "member" in dims and array.shape[dims.index("member")] != members:
                raise ValueError(f"{experiment}: trajectory {name!r} has {array.shape[dims.index('member')]} "
                                 f"members but summary() {members} rows; they must agree "
                                 f"(physai.experiments._base)")
            # a dimension of the run named like a sweep axis (the seeds of one run while the sweep's seed varies)
            dims = tuple(f"run_{d}" if d in self.dims or d in self.axis_names else d for d in dims)
            if self.plan.members_folded or lone:
                if "member" in dims:
                    array = np.moveaxis(array, dims.index("member"), 0)
                    dims = tuple(d for d in dims if d != "member")
                else:  # the same for every member (e.g. the steps at which something was tracked)
                    array = np.broadcast_to(array, (members,) + array.shape)
                array = array.reshape(fold_shape + array.shape[1:]) if self.plan.members_folded else array[0]
            out[name] = (dims, array)
        for name in out:
            if name in _RESERVED or name in self.dims:
                raise ValueError(f"summary(): key {name!r} is a reserved name or a sweep dimension")
        return out

    def _coordinates(self, coordinates: Mapping, variables: dict) -> dict:
        """The result's coordinates, checked: 1-d, over a dimension its variables have, of that extent."""
        extents = {}
        for dims, values in variables.values():
            extents.update(zip(dims, values.shape[values.ndim - len(dims):]))
        out = {}
        for dim, values in coordinates.items():
            dim = f"run_{dim}" if dim in self.dims or dim in self.axis_names else dim
            values = np.asarray(values)
            if values.ndim != 1 or extents.get(dim) != len(values):
                raise ValueError(f"coordinates(): {dim!r} has shape {values.shape}; expected one value per step of "
                                 f"that dimension of the trajectories ({extents.get(dim)})")
            out[dim] = values
        return out

    def _check_coordinate(self, dim: str, values: np.ndarray) -> None:
        """A point's coordinate must agree with what earlier points stored (over their common extent)."""
        if dim not in self.arrays:
            return
        stored = self._known_coordinate(dim)
        common = min(len(stored), len(values))
        if not np.array_equal(stored[:common], values[:common]):
            raise ValueError(f"coordinates(): {dim!r} is {values.tolist()} at this point but "
                             f"{stored.tolist()} at the points stored; a sweep keeps one coordinate per dimension "
                             f"of the run, so its values cannot vary with the axes")

    def _known_coordinate(self, dim: str) -> np.ndarray:
        if dim not in self._coordinate_values:
            self._coordinate_values[dim] = self._known(self.arrays[dim])
        return self._coordinate_values[dim]

    @staticmethod
    def _known(array) -> np.ndarray:
        """The leading values of a coordinate that points wrote (the rest holds the fill value after a resize)."""
        stored = np.asarray(array[...])
        fill = array.fill_value
        unknown = np.isnan(stored) if stored.dtype.kind == "f" else stored == fill
        return stored[:int(np.argmax(unknown)) if unknown.any() else len(stored)]

    def _write_coordinate(self, dim: str, values: np.ndarray) -> None:
        self._fit(dim, len(values))
        if dim not in self.arrays:
            dtype, fill = _storage(values)
            self.arrays[dim] = self.group.create_array(dim, shape=(self.extents[dim],), dtype=dtype,
                                                       fill_value=fill, dimension_names=[dim])
        if len(values) > len(self._known_coordinate(dim)):
            self.arrays[dim][:len(values)] = values
            self._coordinate_values[dim] = self._known(self.arrays[dim])

    def _write(self, name: str, own_dims: tuple, region: tuple, values: np.ndarray, attributes: dict) -> None:
        own_shape = values.shape[values.ndim - len(own_dims):]
        for dim, n in zip(own_dims, own_shape):
            self._fit(dim, n)
        dims = self.dims + own_dims
        if name in self.arrays:
            array = self.arrays[name]
            if tuple(array.metadata.dimension_names) != dims:
                raise StoreMismatch(f"{name}: stored with dims {tuple(array.metadata.dimension_names)}, now {dims}; "
                                    f"start afresh with overwrite=True (CLI: --overwrite) or use another path")
        else:
            dtype, fill = _storage(values)
            extents = tuple(self.extents[d] for d in own_dims)
            # uncompressed: a chunk is one task's values, small, and the floats of training runs compress little;
            # skipping the codec takes a third off the time a task's write takes
            array = self.group.create_array(name, shape=self.shape + extents, chunks=self.plan.chunks + extents,
                                            dtype=dtype, fill_value=fill, dimension_names=dims,
                                            attributes=attributes, compressors=None)
            self.arrays[name] = array
        full = tuple(self.extents[d] for d in own_dims)
        if own_shape != full:  # shorter than what other points stored: the rest is "not there"
            padded = np.full(values.shape[:values.ndim - len(own_dims)] + full, array.fill_value, dtype=array.dtype)
            padded[(...,) + tuple(slice(0, n) for n in own_shape)] = values
            values = padded
        array[region + (slice(None),) * len(own_dims)] = values.astype(array.dtype, copy=False)

    def _fit(self, dim: str, n: int) -> None:
        current = self.extents.get(dim)
        if current is None or n > current:
            self.extents[dim] = n
            if current is not None:
                for array in self.arrays.values():
                    names = array.metadata.dimension_names
                    if dim in names:
                        array.resize(tuple(n if d == dim else s for d, s in zip(names, array.shape)))

    def dataset(self):
        import xarray as xr

        return _ordered(xr.open_zarr(self.store, consolidated=False, chunks=None).load(), self._order)


def _ordered(ds, first=()):
    """``ds`` with the experiment's variables first (``first`` leading, in that order), the bookkeeping last."""
    names = [n for n in first if n in ds.data_vars] + sorted(n for n in ds.data_vars if n not in first)
    return ds[[n for n in names if n not in _RESERVED] + [n for n in _RESERVED if n in ds.data_vars]]


def load(path):
    """The dataset of a sweep stored at ``path`` (a Zarr store written by :func:`run`), read lazily."""
    import xarray as xr

    return _ordered(xr.open_zarr(path, consolidated=False, chunks=None))


def _lock(path: pathlib.Path) -> int:
    """An exclusive lock on the store's directory, held until its descriptor is closed (or the process dies, so a
    killed sweep leaves no stale lock). Raises ``ValueError`` when another process holds it."""
    import fcntl

    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ValueError(f"out: {str(path)!r} is being written by another sweep (it holds the store's lock); wait "
                         f"for it or choose another path") from None
    return descriptor



# -- execution ----------------------------------------------------------------------------------------------------

class _InProcess(concurrent.futures.Executor):
    """The default executor: each task runs in the calling thread when submitted."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:
            future.set_exception(error)
        return future


def executor_from_spec(spec: str) -> tuple[concurrent.futures.Executor, typing.Callable[..., None]]:
    """(executor, close) for ``spec``: ``inprocess``; ``process`` or ``process:N`` (a local pool of N processes,
    started with spawn); ``dask://host:port`` or ``tcp://host:port`` (a Dask distributed scheduler, through
    ``Client(address).get_executor()``; this also covers dask-jobqueue's Slurm/PBS clusters). Raises
    ``ValueError`` naming the executor when the spec is none of these. ``close(wait=True)`` releases the executor;
    ``wait=False`` does not wait for the tasks running."""
    if not isinstance(spec, str):
        raise TypeError(f"executor: expected a spec string, got {type(spec).__name__}")
    kind, _, rest = spec.partition(":")
    if spec in ("", "inprocess"):
        return _InProcess(), lambda wait=True: None
    if kind == "process":
        import multiprocessing

        workers = None
        if rest:
            try:
                workers = int(rest)
            except ValueError:
                workers = 0
            if workers < 1:
                raise ValueError(f"executor: expected process:N with N >= 1, got {spec!r}")
        # spawn, not fork: a child forked from a process whose OpenMP runtime has started can deadlock in it
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        return pool, lambda wait=True: pool.shutdown(wait=wait, cancel_futures=True)
    if kind in ("dask", "tcp") and rest.startswith("//"):
        from dask.distributed import Client

        client = Client("tcp:" + rest)
        return client.get_executor(), lambda wait=True: client.close()
    raise ValueError(f"executor: expected 'inprocess', 'process[:N]' or 'dask://host:port', got {spec!r}")


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def _interrupts_recorded():
    """An Event set by every SIGINT while the sweep runs, for ``_drive`` to check: under Python's default handler
    (and in the main thread, the only one that receives it) the handler also records the signal before raising
    KeyboardInterrupt as usual, since that exception is lost when it lands in a destructor or a callback (CPython
    prints it as "Exception ignored" and goes on), and the sweep would then run to its end. Elsewhere the Event is
    never set."""
    received = threading.Event()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield received
        return

    def record(signum, frame):
        received.set()
        signal.default_int_handler(signum, frame)

    try:
        signal.signal(signal.SIGINT, record)
        yield received
    finally:
        if signal.getsignal(signal.SIGINT) is record:  # a handler a task installed meanwhile stays
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _drive(store: _Store, tasks: list[_Task], executor, window: int, pending: dict, received):
    """Submit the tasks (at most ``window`` in flight, tracked in ``pending``: future -> task), store each as it
    finishes; yield once per point. A task whose executor broke (a worker process died) is not run: its points
    stay missing and are run by the next sweep on the store. ``received`` (the Event of _interrupts_recorded)
    set raises KeyboardInterrupt at the next task finished."""
    queue = iter(tasks)
    while True:
        for task in queue:
            pending[executor.submit(_execute, task.config)] = task
            if len(pending) >= window:
                break
        if not pending:
            return
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            task = pending.pop(future)
            _settle(store, task, future)
            yield from range(task.hashes.size)
        if received.is_set():
            raise KeyboardInterrupt


def _settle(store: _Store, task: _Task, future) -> None:
    """Store a finished task's result, or its failure; leave it missing when it never ran to an answer."""
    if future.cancelled():
        return
    error = future.exception()
    if isinstance(error, concurrent.futures.BrokenExecutor):
        _log.warning("point %s not run: %s (it stays missing; rerun the sweep to run it)", task.label,
                     _error_text(error))
        return
    if error is None:
        try:
            store.write(task, *future.result())
        except (TypeError, ValueError) as problem:  # a result breaking the protocol: that point fails
            error = problem
    if error is not None:
        store.mark(task, STATUS_FAILED, _error_text(error))
        _log.warning("point %s failed: %s", task.label, _error_text(error))


def run(config: ExperimentConfig, space: Space, *, out=None, executor=None, progress: bool = True,
        overwrite: bool = False):
    """Run ``config``'s experiment at every point of ``space`` and return the sweep's ``xarray.Dataset``.

    ``config``: the base config (any experiment following :mod:`physai.experiments._base`); each point replaces
    the fields its axes name (an int given to a real field is taken as a float). ``space``: from :func:`grid` /
    :func:`zip_`. ``out``: a Zarr v3 store (a directory path, or any ``zarr`` store object) written point by point
    and resumed when it already holds this sweep; None keeps it in memory. ``executor``: any
    ``concurrent.futures.Executor`` (a ``ProcessPoolExecutor``, ``dask.distributed.Client(...).get_executor()``...),
    a spec for :func:`executor_from_spec`, or None to run in this process. ``progress``: a bar over points (tqdm).
    ``overwrite``: start ``out`` afresh.

    Returns the Dataset, loaded: dims the sweep's (one per :class:`Space` dimension, coordinates the axis values,
    in the fields' types), then the run's own (``step``, ``tracked_step`` for EoS, with the coordinates the result
    gives; ``member`` when no ensemble axis is swept and a run has several members). Variables: each summary key
    (sweep dims; ``member`` too where there is one), each trajectory (sweep dims + its own), ``status`` (int8: 0
    missing, 1 done, 2 failed), ``error`` and ``point_hash`` (str). Floats are NaN at points not done; integers
    and booleans keep their dtype and hold their fill value there (select with ``status == 1``). Attributes:
    ``experiment``, ``physai_version``, ``config`` (JSON: the base config's fields that no axis sets) and ``axes``
    (JSON: dimension -> axis -> values).

    Every axis and every point's config is checked before any work: an unknown field, an empty axis, repeated
    values or a value the config refuses raises ``ValueError`` naming the axis (a combination refused names the
    point); so does a store at ``out`` holding another sweep (experiment, axes, base config or physai version),
    a store from an older layout, a Zarr v2 store, or a store another sweep is writing (``ValueError``); a config
    that is not an experiment's raises ``TypeError``, and missing xarray/zarr ``ImportError``. A point whose run
    raises is stored with status failed and its error, logged on the ``physai.sweep`` logger, and the sweep goes
    on; a point whose worker died (a broken process pool) stays missing. A result the store cannot take (a
    variable's dims changed) raises :class:`StoreMismatch` and stops the sweep. On ``KeyboardInterrupt`` the
    tasks not started are cancelled, those finished are stored, and the interrupt propagates; run from the main
    thread under Python's default SIGINT handler, a Ctrl-C whose KeyboardInterrupt is lost (raised inside a
    destructor, where CPython only prints it) still stops the sweep once the next task finishes."""
    plan = _plan(config, space)
    try:
        import xarray  # noqa: F401
        import zarr  # noqa: F401
    except ImportError as error:
        raise ImportError(f"physai.sweep needs xarray and zarr: pip install 'physai[sweep]' ({error})") from error
    close = None
    if executor is None or isinstance(executor, str):
        executor, close = executor_from_spec(executor or "inprocess")
    elif not isinstance(executor, concurrent.futures.Executor):
        raise TypeError(f"executor: expected a concurrent.futures.Executor or a spec string, got "
                        f"{type(executor).__name__}")
    store = None
    pending: dict = {}
    interrupted = False
    try:
        store = _Store(plan, out, overwrite)
        todo = store.todo()
        points = sum(task.hashes.size for task in todo)
        _log.info("%d points: %d stored, %d to run in %d tasks", len(plan.space), len(plan.space) - points, points,
                  len(todo))
        desc = f"sweep {type(plan.config).__module__.rsplit('.', 1)[-1]}"
        if points < len(plan.space):
            desc += f" ({len(plan.space) - points} stored)"
        # the in-process executor runs a task on submit: one at a time, so each is stored before the next starts
        window = 1 if isinstance(executor, _InProcess) else max(len(todo), 1)
        try:
            with _interrupts_recorded() as received:
                driven = _drive(store, todo, executor, window, pending, received)
                for _ in _progress(driven, total=points, desc=desc, enabled=progress):
                    pass
        except KeyboardInterrupt:
            interrupted = True
            for future in pending:
                future.cancel()
            for future, task in pending.items():
                if future.done():
                    _settle(store, task, future)
            _log.warning("interrupted: %d tasks in flight or queued not stored", sum(not f.done() for f in pending))
            raise
        return store.dataset()
    finally:
        if store is not None:
            store.close()
        if close is not None:
            close(not interrupted)


# -- plots --------------------------------------------------------------------------------------------------------

def _geometric(values: np.ndarray) -> bool:
    """Whether positive ``values`` are spaced evenly in log scale (then a log axis shows them evenly)."""
    if values.dtype.kind not in "iuf" or len(values) < 3 or not np.all(values > 0):
        return False
    steps = np.diff(np.log(values.astype(float)))
    return bool(np.allclose(steps, steps[0], rtol=1e-6) and abs(steps[0]) > 0)


def _label(value) -> str:
    return f"{value:.3g}" if isinstance(value, (float, np.floating)) else str(value)


def plot(data, z: str, x: str, y: str | None = None, *, path=None, curves: bool = False,
         select: Mapping | None = None, logz: bool = False):
    """Draw ``z`` of a sweep (a Dataset from :func:`run` or :func:`load`, or a store path) against ``x`` and
    ``y``: a heatmap over (x, y) (a phase diagram), or with ``curves`` (or no ``y``) one line of z against x per
    value of y. x and y may be any coordinate of the sweep (a zipped axis too) or one of the run's dimensions
    (``z="loss", x="step", y="lr", curves=True, logz=True`` draws the loss curves).

    ``select`` fixes other dimensions first, by exact value (``{"seed": 0}``; a dimension without coordinate,
    such as ``member``, by index). The remaining dimensions are averaged over, which the title says, with the
    count of values left out: points not done (missing or failed, per ``status``) and NaN values of points done
    (diverged runs). The ``member`` dimension (several runs of one point, e.g. different learning rates) is never
    averaged: select a member or draw it on x or y. ``logz``: log colour scale (heatmap) or log z axis (curves).

    Returns the matplotlib ``Figure`` (no pyplot, so no backend is chosen), also written to ``path`` when given.
    Raises ``ValueError`` naming the argument at fault: z not a numeric variable, x/y not a coordinate or
    dimension or the same, a selected value or index the sweep lacks, an average over ``member``; ``ImportError``
    without matplotlib."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    ds = data if hasattr(data, "data_vars") else load(data)
    numeric = sorted(str(n) for n, v in ds.data_vars.items() if v.dtype.kind in "iufb" and n not in _RESERVED)
    if z not in numeric:
        raise ValueError(f"z: expected a numeric variable of the sweep {numeric}, got {z!r}")
    if x == y:
        raise ValueError(f"y: expected a coordinate other than x ({x!r})")
    var = ds[z]
    done = ds["status"] == STATUS_DONE
    for label, name in (("x", x), ("y", y)):
        if name is None:
            continue
        if name not in ds.coords and name not in ds.dims:
            raise ValueError(f"{label}: expected a coordinate or dimension of the sweep "
                             f"{sorted(map(str, set(ds.coords) | set(ds.dims)))}, got {name!r}")
        dim = ds[name].dims[0]
        if dim != name:  # a zipped axis: make it the dimension's index
            var, done = var.swap_dims({dim: name}), done.swap_dims({dim: name})
    chosen = []
    for name, value in (select or {}).items():
        if name not in var.dims:
            raise ValueError(f"select: {name!r} is not a dimension of {z} {var.dims}")
        if name in var.coords:
            matches = np.flatnonzero(var[name].values == value)
            if len(matches) != 1:
                raise ValueError(f"select: {name}={value!r} is not one of its values {var[name].values.tolist()}")
            index = int(matches[0])
        else:  # a dimension without coordinate (member): an index
            if not isinstance(value, (int, np.integer)) or not 0 <= value < var.sizes[name]:
                raise ValueError(f"select: {name} is indexed 0 .. {var.sizes[name] - 1}, got {value!r}")
            index = int(value)
        var = var.isel({name: index})
        if name in done.dims:
            done = done.isel({name: index})
        chosen.append(f"{name}={_label(value)}")
    for label, name in (("x", x), ("y", y)):
        if name is not None and name not in var.dims:
            raise ValueError(f"{label}: {name!r} was fixed by select; it cannot also be an axis of the figure")
    rest = [d for d in var.dims if d not in (x, y)]
    if "member" in rest and var.sizes["member"] > 1:
        raise ValueError(f"member: each point holds {var.sizes['member']} runs of different configs; select one "
                         f"(select={{'member': i}}, CLI --sel member=I) or draw member on x or y")
    notes = []
    if chosen:
        notes.append(", ".join(chosen))
    if rest:
        values = var.astype(float)
        done = done.broadcast_like(values)
        missing = int((~done).sum())
        diverged = int((done & values.isnull()).sum())
        note = "mean over " + ", ".join(f"{d} ({var.sizes[d]})" for d in rest)
        left_out = [f"{count} {what}" for count, what in ((missing, "not done"), (diverged, "NaN (diverged)"))
                    if count]
        if left_out:
            note += f" of {values.size} values; left out: " + ", ".join(left_out)
        notes.append(note)
        var = values.where(done).mean(rest)
    xs = var[x].values
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    if curves or y is None:
        lines = [(None, var)] if y is None else [(value, var.sel({y: value})) for value in var[y].values]
        for value, line in lines:
            ax.plot(xs, np.ma.masked_invalid(line.transpose(x).values.astype(float)),
                    marker="o" if len(xs) <= 32 else None, ms=3,
                    label=None if value is None else f"{y}={_label(value)}")
        ax.set(xlabel=x, ylabel=z)
        if _geometric(xs):
            ax.set_xscale("log")
        if logz:
            ax.set_yscale("log")
        if y is not None:
            ax.legend(fontsize="small")
    else:
        ys = var[y].values
        grid_values = np.ma.masked_invalid(var.transpose(y, x).values.astype(float))
        if logz:
            grid_values = np.ma.masked_less_equal(grid_values, 0)
        # cells on an index grid, labelled with the values: a sweep's axes are rarely evenly spaced
        mesh = ax.pcolormesh(np.arange(len(xs) + 1) - 0.5, np.arange(len(ys) + 1) - 0.5, grid_values,
                             shading="flat", norm=LogNorm() if logz else None)
        for axis, values, setter in ((ax.xaxis, xs, ax.set_xticks), (ax.yaxis, ys, ax.set_yticks)):
            step = max(1, len(values) // 8)
            setter(np.arange(len(values))[::step], [_label(v) for v in values[::step]])
        ax.set(xlabel=x, ylabel=y)
        fig.colorbar(mesh, ax=ax, label=z)
    ax.set_title("\n".join([z, *notes]), fontsize="medium")
    fig.tight_layout()
    if path is not None:
        if not str(path):
            raise ValueError("path: expected a file name for the figure (.png, .pdf, .svg) or None, got ''")
        fig.savefig(path, dpi=120)
    return fig


# -- command line -------------------------------------------------------------------------------------------------

def parse_axis(text: str, kind, name: str) -> list:
    """The values of an axis written on the command line, for a field annotated ``kind`` (int, float, str, bool,
    maybe ``X | None``, where ``none`` in a list spells None):

    - ``a,b,c``: these values;
    - ``start:stop`` or ``start:stop:step`` (integers): ``range(start, stop, step)``, stop excluded (``0:4`` is
      0, 1, 2, 3);
    - ``start:stop:N`` (reals): N values evenly spaced from start to stop, both included (``numpy.linspace``);
    - ``start:stop:Nlog``: N values evenly spaced in log scale, both included (``numpy.geomspace``); for
      integers, rounded and required to be distinct.

    A value starting with ``-`` (``--seed -3:0``) is taken as a value, not an option. Raises ``ValueError`` naming
    the axis when the text is none of these, gives no value or repeats one."""
    def fail(why):
        return ValueError(f"{name}: {why}, got {text!r}")

    parse = field_parser(kind)[0]
    kind = field_type(kind)[0]
    if ":" not in text or kind in (str, bool):
        try:
            values = [parse(part) for part in text.split(",")]
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise fail(f"expected {kind.__name__} values separated by commas ({error})") from None
        return values
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise fail("expected start:stop, start:stop:N or start:stop:Nlog")
    try:
        start, stop = (kind(p) for p in parts[:2])
    except ValueError:
        raise fail(f"expected {kind.__name__} bounds") from None
    spec = parts[2] if len(parts) == 3 else None
    if spec is not None and spec.endswith("log"):
        try:
            count = int(spec[:-3])
        except ValueError:
            raise fail("expected start:stop:Nlog with an integer N") from None
        if count < 1 or start <= 0 or stop <= 0:
            raise fail("expected N >= 1 and positive bounds for a log axis")
        values = np.geomspace(start, stop, count)
        if kind is int:
            values = np.rint(values).astype(int)
            if len(set(values.tolist())) != len(values):
                raise fail(f"the rounded values {values.tolist()} repeat; use fewer points")
        values = values.tolist()
    elif kind is int:
        try:
            step = int(spec) if spec is not None else 1
        except ValueError:
            raise fail("expected start:stop:step with an integer step") from None
        if step == 0:
            raise fail("expected a nonzero step")
        values = list(range(start, stop, step))
    else:
        if spec is None:
            raise fail("expected start:stop:N or start:stop:Nlog for a real axis")
        try:
            count = int(spec)
        except ValueError:
            raise fail("expected start:stop:N with an integer N") from None
        if count < 1:
            raise fail("expected N >= 1")
        values = np.linspace(start, stop, count).tolist()
    if not values:
        raise fail("expected at least one value")
    return values


class _Ordered(argparse.Action):
    """Keeps the settings in command-line order: the sweep's dimensions follow it."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.settings.append((self.dest, values))


def _experiment_parser(name: str, module):
    config_cls = protocol(module)[0]
    hints = typing.get_type_hints(config_cls)
    parser = argparse.ArgumentParser(
        prog=f"physai sweep {name}",
        description=f"Sweep {module.__name__}: a value is a setting of the base config; a list (a,b,c) or range "
                    f"(0:4 for integers, 0.1:1:16 linear, 0.1:1:16log) is an axis; axes are crossed in the "
                    f"order given.")
    parser.set_defaults(settings=[])
    for field in dataclasses.fields(config_cls):
        kind, many = field_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        about = field.metadata.get("help", "")
        if field.name in config_cls.ensemble_axes.values():
            axis = next(a for a, f in config_cls.ensemble_axes.items() if f == field.name)
            help_text = f"{about} the ensemble; sweep it as --{axis.replace('_', '-')} (default: {default})"
        else:
            help_text = f"{about} {kind.__name__}{' tuple, comma-separated' if many else ''} (default: {default})"
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, action=_Ordered,
                            help=help_text.strip())
    for axis, target in config_cls.ensemble_axes.items():
        parser.add_argument("--" + axis.replace("_", "-"), dest=axis, action=_Ordered,
                            help=f"ensemble axis, folded into {target}: members of one run")
    parser.add_argument("--zip", action="append", default=[], metavar="A,B",
                        help="axes that vary together along one dimension (repeatable)")
    parser.add_argument("--out", default=f"{name.rsplit('.', 1)[-1]}.zarr",
                        help="Zarr store, resumed if it holds this sweep (default: %(default)s)")
    parser.add_argument("--executor", default="inprocess",
                        help="inprocess (default), process[:N], or dask://host:port (a Dask scheduler)")
    parser.add_argument("--overwrite", action="store_true", help="start the store afresh instead of resuming")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def space_and_config(module, settings: list[tuple[str, str]], zips: list[str]):
    """The base config and the Space named by command-line ``settings`` ((name, text) pairs in order) and
    ``zips`` ("a,b" groups): see :func:`parse_axis`. Raises ``ValueError`` naming the setting at fault."""
    config_cls = protocol(module)[0]
    hints = typing.get_type_hints(config_cls)
    ensemble = config_cls.ensemble_axes
    given = {name for name, _ in settings}
    for axis, target in ensemble.items():
        if axis in given and target in given:
            raise ValueError(f"{target}: the ensemble field, given with its axis --{axis.replace('_', '-')}, which "
                             f"sets it at every point; give one of the two")
    base, axes = {}, {}
    for name, text in settings:
        if name in base or name in axes:
            raise ValueError(f"{name}: given twice")
        if name in ensemble:
            axes[name] = parse_axis(text, typing.get_args(hints[ensemble[name]])[0], name)
            continue
        parse, many = field_parser(hints[name])
        if many:  # a tuple field is a setting (its values are one config's), not an axis
            try:
                base[name] = tuple(parse(v) for v in text.split(","))
            except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
                raise ValueError(f"{name}: expected values separated by commas, got {text!r} ({error})") from None
            continue
        values = parse_axis(text, hints[name], name)
        if len(values) == 1 and "," not in text and ":" not in text:
            base[name] = values[0]
        else:
            axes[name] = values
    config = config_cls().replace(**base)
    groups = [[axis.strip() for axis in spec.split(",")] for spec in zips]
    zipped = {axis for group in groups for axis in group}
    for axis in zipped:
        if axis not in axes:
            raise ValueError(f"zip: {axis!r} is not an axis given on the command line (axes: {list(axes)})")
    spaces, placed = [], set()
    for axis, values in axes.items():
        if axis in placed:
            continue
        group = next((g for g in groups if axis in g), [axis])
        spaces.append(zip_(**{a: axes[a] for a in group}) if len(group) > 1 else grid(**{axis: values}))
        placed.update(group)
    return config, grid(*spaces)


def _values_as_values(parser, argv: list[str]) -> list[str]:
    """``--seed -3:0`` as ``--seed=-3:0``: argparse takes a value starting with ``-`` for an option unless it
    looks like a negative number, which a range or list (``-3:0``, ``-1,2``) does not."""
    takes_value = {option for action in parser._actions if action.nargs != 0 for option in action.option_strings}
    out = []
    for text in argv:
        if out and out[-1] in takes_value and re.match(r"-[0-9.]", text):
            out[-1] = f"{out[-1]}={text}"
        else:
            out.append(text)
    return out


def _sweep_main(args) -> int:
    module = experiment(args.experiment)
    parser = _experiment_parser(args.experiment, module)
    options = parser.parse_args(_values_as_values(parser, args.settings))
    config, space = space_and_config(module, options.settings, options.zip)
    shape = " x ".join(f"{len(next(iter(axes.values())))} {dim}" for dim, axes in space.dims) or "1"
    print(f"{module.__name__}: {shape} = {len(space)} points -> {options.out}")
    # the counts and the failed points, as lines on stderr while the command runs
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("physai sweep: %(message)s"))
    level = _log.level
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    start = time.perf_counter()
    try:
        ds = run(config, space, out=options.out, executor=options.executor, progress=not options.quiet,
                 overwrite=options.overwrite)
    except KeyboardInterrupt:
        print(f"physai sweep: interrupted; the points finished are stored in {options.out}, rerun the same "
              f"command to resume", file=sys.stderr)
        return 130
    finally:
        _log.removeHandler(handler)
        _log.setLevel(level)
    status = ds["status"].values
    print(f"{int((status == STATUS_DONE).sum())} done, {int((status == STATUS_FAILED).sum())} failed, "
          f"{int((status == STATUS_MISSING).sum())} missing; {time.perf_counter() - start:.2f} s")
    return 0 if not (status == STATUS_FAILED).any() else 1


def _plot_main(args) -> int:
    select = {}
    for item in args.sel:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"sel: expected dim=value, got {item!r}")
        try:
            select[key] = json.loads(value)
        except json.JSONDecodeError:
            select[key] = value
    if not args.out:
        raise ValueError("out: expected a file name for the figure (.png, .pdf, .svg), got ''")
    plot(args.store, args.z, args.x, args.y, path=args.out, curves=args.curves, select=select, logz=args.logz)
    print(f"figure: {args.out}")
    return 0


def add_parser(commands) -> None:
    """Register ``physai sweep`` and ``physai plot`` on the CLI's subparsers."""
    sweep = commands.add_parser(
        "sweep", help="sweep an experiment over a grid of configs (Zarr, resumable, any executor)",
        description="physai sweep EXPERIMENT [--field VALUES ...]; `physai sweep EXPERIMENT --help` lists the "
                    "experiment's fields. Example: physai sweep eos --lr 0.1:1.0:16log --width 32,64,128 "
                    "--seed 0:4 --out runs/eos.zarr")
    sweep.add_argument("experiment", help="a module of physai.experiments (eos, ...) or a dotted module path")
    sweep.add_argument("settings", nargs=argparse.REMAINDER, help="fields and axes of the experiment")
    sweep.set_defaults(run=_sweep_main)

    figure = commands.add_parser("plot", help="phase diagram (heatmap) or curves from a sweep store",
                                 description="Heatmap of Z over (X, Y), or with --curves Z against X per Y; other "
                                             "dimensions are averaged over.")
    figure.add_argument("store", help="a sweep's Zarr store")
    figure.add_argument("--x", required=True, help="coordinate or dimension on the horizontal axis (lr, step...)")
    figure.add_argument("--y", help="coordinate on the vertical axis (heatmap) or one curve per value (--curves)")
    figure.add_argument("--z", required=True, help="variable drawn: a summary value or trajectory")
    figure.add_argument("--curves", action="store_true", help="lines of z against x, one per y value")
    figure.add_argument("--logz", action="store_true", help="log scale for z (colour scale of a heatmap)")
    figure.add_argument("--sel", action="append", default=[], metavar="DIM=VALUE",
                        help="fix a dimension first, by exact value (member by index); repeatable")
    figure.add_argument("--out", default="sweep.png", help="figure file (default: %(default)s)")
    figure.set_defaults(run=_plot_main)
