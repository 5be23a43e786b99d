"""Finite groups for LEGO sentences, given by Cayley tables.

A group of order G is an int32 table ``[G, G]`` with ``table[g, v] = g·v`` and element names used as tokens.
Built-ins: ``"z2"`` (elements ``+``/``-``, the paper's sign flips), ``"z<k>"`` (``+0``..``+<k-1>``, addition
mod k), ``"s3"`` (permutations of three objects). Any other finite group is accepted as a Cayley table and
validated: closure, identity, inverses, associativity.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Each element is a vocabulary token and the table holds order^2 entries; far beyond any LEGO experiment, and small
# enough that checking a user's table stays cheap.
MAX_ORDER = 1024


@dataclass(frozen=True)
class Group:
    """A finite group: ``table`` [G, G] int32 with ``table[g, v]`` the index of g·v; ``names[g]`` the token of
    element g."""

    name: str
    table: np.ndarray
    names: tuple[str, ...]

    @property
    def order(self) -> int:
        """Number of elements G."""
        return len(self.names)

    @property
    def identity(self) -> int:
        """Index of the identity element."""
        return int(np.flatnonzero((self.table == np.arange(self.order)).all(axis=1))[0])


def validate_cayley_table(table) -> np.ndarray:
    """Return ``table`` (a [G, G] array or nested lists of integers) as a C-contiguous int32 array after checking
    the group axioms.

    Raises ``TypeError`` for a non-integer table and ``ValueError`` naming the failed axiom (shape, closure,
    identity, inverses, associativity) with a witness.
    """
    try:
        array = np.asarray(table)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"group: a Cayley table must be a square [G, G] array of integers ({error})") from None
    if array.dtype.kind not in "iu":
        raise TypeError(f"group: a Cayley table must hold integers, got dtype {array.dtype}")
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] == 0:
        raise ValueError(f"group: a Cayley table must be a non-empty square [G, G] array, got shape {array.shape}")
    order = array.shape[0]
    if order > MAX_ORDER:
        raise ValueError(f"group: a Cayley table of order {order} exceeds the maximum order {MAX_ORDER}")
    if array.min() < 0 or array.max() >= order:
        bad = tuple(int(i) for i in np.argwhere((array < 0) | (array >= order))[0])
        raise ValueError(f"group: closure fails: table{bad} = {int(array[bad])} is not an element 0..{order - 1}")
    elements = np.arange(order)
    identities = np.flatnonzero((array == elements).all(axis=1) & (array.T == elements).all(axis=1))
    if identities.size == 0:
        raise ValueError("group: identity fails: no element e with e·x = x·e = x for every x")
    identity = identities[0]
    for x in range(order):
        if not np.any((array[x] == identity) & (array[:, x] == identity)):
            raise ValueError(f"group: inverses fail: element {x} has no y with x·y = y·x = identity")
    for a in range(order):  # one a at a time: [G, G] work arrays rather than [G, G, G]
        left, right = array[array[a]], array[a][array]  # (a·b)·c and a·(b·c) over all b, c
        if not np.array_equal(left, right):
            b, c = (int(i) for i in np.argwhere(left != right)[0])
            raise ValueError(f"group: associativity fails: ({a}·{b})·{c} != {a}·({b}·{c})")
    return np.ascontiguousarray(array, dtype=np.int32)


def _cyclic(k: int) -> Group:
    table = (np.arange(k)[:, None] + np.arange(k)[None, :]) % k
    names = ("+", "-") if k == 2 else tuple(f"+{i}" for i in range(k))
    return Group(f"z{k}", table.astype(np.int32), names)


def _s3() -> Group:
    perms = [(0, 1, 2), (1, 0, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0), (2, 0, 1)]
    names = ("()", "(12)", "(13)", "(23)", "(123)", "(132)")
    index = {p: i for i, p in enumerate(perms)}
    # (g·v)(x) = g(v(x)): apply v first, then g.
    table = np.array([[index[tuple(g[v[x]] for x in range(3))] for v in perms] for g in perms], dtype=np.int32)
    return Group("s3", table, names)


def _checked_names(names, order: int) -> tuple[str, ...]:
    names = tuple(names)
    if not all(isinstance(name, str) for name in names):
        raise TypeError(f"element_names: expected strings, got {names!r}")
    if len(names) != order or len(set(names)) != len(names):
        raise ValueError(f"element_names: expected {order} distinct names, got {names!r}")
    return names


def resolve_group(group, names=None) -> Group:
    """``group`` is ``"z2"``, ``"z<k>"`` (2 <= k <= MAX_ORDER), ``"s3"``, a Cayley table ([G, G] integers, see
    :func:`validate_cayley_table`), or a ``Group``; ``names`` name a table's elements."""
    if isinstance(group, Group):
        return Group(group.name, validate_cayley_table(group.table), _checked_names(group.names, len(group.table)))
    if isinstance(group, str):
        match = re.fullmatch(r"z(\d+)", group)
        if match and 2 <= int(match.group(1)) <= MAX_ORDER:
            return _cyclic(int(match.group(1)))
        if group == "s3":
            return _s3()
        raise ValueError(f"group: expected 'z2', 'z<k>' with 2 <= k <= {MAX_ORDER}, 's3' or a Cayley table, "
                         f"got {group!r}")
    if isinstance(group, (list, tuple, np.ndarray)):
        table = validate_cayley_table(group)
        if names is None:
            names = tuple(f"g{i}" for i in range(table.shape[0]))
        return Group("table", table, _checked_names(names, table.shape[0]))
    raise TypeError(f"group: expected a name or a Cayley table, got {type(group).__name__}")
