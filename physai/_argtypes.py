"""argparse types and the mapping from an experiment's config dataclass to command-line flags.

A leaf module: it imports nothing from physai, so every subcommand module (``physai.lego.cli``, each experiment)
can use it without importing ``physai.cli``, which imports them.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing


def count(text: str) -> int:
    """argparse type of a non-negative integer option (the message names the option)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive(text: str) -> float:
    """argparse type of a positive finite real option."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_form(annotation) -> tuple[type, bool, bool]:
    """(scalar type, is a tuple, may be None) of a config field's type annotation: int, float, str, bool, their
    ``X | None`` forms and ``tuple[X, ...]``; any other raises ``TypeError``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        return _field_form(args[0])[0], True, False
    if args and type(None) in args:
        return _field_form(next(a for a in args if a is not type(None)))[0], False, True
    if annotation in (bool, int, float, str):
        return annotation, False, False
    raise TypeError(f"config fields of type {annotation!r} have no command-line form")


def field_parser(annotation) -> tuple[typing.Callable[[str], typing.Any], bool]:
    """(parse one value, is a tuple) for a config field's type annotation (the forms of :func:`field_type`);
    'none' spells None for an ``X | None`` field."""
    kind, many, optional = _field_form(annotation)
    parse = _boolean if kind is bool else kind
    if optional:
        return (lambda text: None if text.lower() == "none" else parse(text)), False
    return parse, many


def field_type(annotation) -> tuple[type, bool]:
    """(scalar type, is a tuple) of a config field's type annotation: int, float, str, bool, their ``X | None``
    forms and ``tuple[X, ...]`` (``tuple[float, ...]`` -> (float, True), ``int | None`` -> (int, False)); any other
    raises ``TypeError``."""
    return _field_form(annotation)[:2]


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per field of the dataclass ``config_cls`` (``learning_rates`` -> ``--learning-rates``), typed and
    defaulted from the field; tuple fields take several values. The field's ``metadata["help"]`` is its help. A
    field that an ensemble axis of the config folds into also answers to the axis name (``--lr`` for
    ``learning_rates`` when ``ensemble_axes = {"lr": "learning_rates"}``)."""
    hints = typing.get_type_hints(config_cls)
    aliases = {field: axis for axis, field in getattr(config_cls, "ensemble_axes", {}).items()}
    for field in dataclasses.fields(config_cls):
        parse, many = field_parser(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flags = ["--" + field.name.replace("_", "-")]
        if field.name in aliases:
            flags.append("--" + aliases[field.name].replace("_", "-"))
        parser.add_argument(*flags, dest=field.name, type=parse,
                            nargs="+" if many else None, default=default,
                            help=f"{field.metadata.get('help', '')} (default: {default})".strip())


def config_from_args(config_cls, args: argparse.Namespace):
    """The config named by the flags :func:`add_config_arguments` added (tuple fields as tuples)."""
    values = {}
    for field in dataclasses.fields(config_cls):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**values)
