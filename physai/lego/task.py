"""LEGO tasks (Learning Equality and Group Operations; Zhang et al. 2022): the API over the native generator.

A sentence over a group G with n variables is n clauses of 5 tokens: the root ``x = g 1 ,`` gives x the value
g (the group element g applied to the base value ``1``, the identity), and every other clause ``y = g x ,``
gives y the value g·x. Answering for a variable needs the chain of operations back to its root.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from physai import _core
from physai._checks import MAX_INT64, check_choice, check_int, check_seed
from physai.lego.groups import Group, resolve_group

VARIABLE_NAMES = tuple("abcdefghijklmnopqrstuvwxyz")
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "=", ",", "1")
GRAPHS = ("chain", "tree")


class Vocab:
    """Token ids <-> strings: specials, then the group's elements, then the variable names a..z.

    ``vocab[id] -> str``, ``vocab.id(str) -> int``, ``len(vocab)``; ``pad``, ``cls``, ``sep``, ``eq``,
    ``comma``, ``base`` are the special ids, ``element(g)`` and ``variable(i)`` the others.
    """

    def __init__(self, group: Group):
        self.tokens: tuple[str, ...] = SPECIAL_TOKENS + group.names + VARIABLE_NAMES
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"element_names: must differ from the special tokens and variable names, got {group.names}")
        self._ids = {token: i for i, token in enumerate(self.tokens)}
        self.pad, self.cls, self.sep, self.eq, self.comma, self.base = range(len(SPECIAL_TOKENS))
        self.element0 = len(SPECIAL_TOKENS)
        self.variable0 = self.element0 + group.order

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        shown = " ".join(self.tokens[:40]) + (" ..." if len(self.tokens) > 40 else "")
        return f"Vocab({len(self.tokens)} tokens: {shown})"

    def __getitem__(self, token_id: int) -> str:
        return self.tokens[check_int(token_id, "token_id", min=0, max=len(self.tokens) - 1)]

    def id(self, token: str) -> int:
        """Token id of a token string (ValueError names an unknown token)."""
        try:
            return self._ids[token]
        except KeyError:
            raise ValueError(f"token: {token!r} is not in the vocabulary") from None

    def element(self, g: int) -> int:
        """Token id of group element g."""
        return self.element0 + g

    def variable(self, i: int) -> int:
        """Token id of the i-th variable name."""
        return self.variable0 + i

    def native_ids(self) -> tuple[int, ...]:
        """The ids the native generator writes: cls, sep, =, ",", base value, first element, first variable."""
        return (self.cls, self.sep, self.eq, self.comma, self.base, self.element0, self.variable0)


@dataclass
class LegoBatch:
    """A batch of LEGO sentences (all int64 numpy arrays, C-contiguous).

    tokens    [B, 5n+2]  ``[CLS]`` + n clauses of 5 tokens + ``[SEP]``
    labels    [B, n]     value of each variable as a group element index, in graph order (root first).
                         For Z2: 0 is ``+1`` (the identity), 1 is ``-1``.
    positions [B, n]     token index of each variable's left-hand-side occurrence
    depth     [B, n]     distance of each variable from its root
    """

    tokens: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    depth: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]


class LegoTask:
    """A family of LEGO sentences, sampled reproducibly from counter-based random streams.

    Parameters
    ----------
    n_vars : number of variables (clauses), 1..26.
    group : ``"z2"`` (default), ``"z<k>"``, ``"s3"``, or a Cayley table ``[G, G]`` of ints (validated).
    graph : ``"chain"`` (each variable depends on the previous) or ``"tree"`` (random recursive tree: node i
        hangs under a uniform earlier node).
    components : number of disconnected chains / trees (default 1). Chains get lengths as equal as possible.
    shuffle : shuffle the clause order (default True); otherwise clauses appear in graph order.
    element_names : token names for the elements of a Cayley-table group (default ``g0``, ``g1``, ...).

    Variables are in graph order, which ``labels``, ``positions`` and ``depth`` use: for chains, component by
    component, each root first and then along its chain; for trees, the ``components`` roots first, then the other
    nodes in creation order (each after its parent, components interleaved).

    Example
    -------
    >>> task = LegoTask(n_vars=6)
    >>> batch = task.sample(batch_size=2, seed=0)
    >>> batch.tokens.shape
    (2, 32)
    """

    def __init__(self, n_vars: int = 12, group="z2", graph: str = "chain", *, components: int = 1,
                 shuffle: bool = True, element_names=None):
        self.n_vars = check_int(n_vars, "n_vars", min=1, max=len(VARIABLE_NAMES))
        self.group = resolve_group(group, element_names)
        self.graph = check_choice(graph, "graph", GRAPHS)
        self.components = check_int(components, "components", min=1, max=self.n_vars)
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle: expected a bool, got {type(shuffle).__name__}")
        self.shuffle = bool(shuffle)
        self.vocab = Vocab(self.group)

    @property
    def sequence_length(self) -> int:
        """Tokens per sentence, 5 n_vars + 2."""
        return 5 * self.n_vars + 2

    def __repr__(self) -> str:
        return (f"LegoTask(n_vars={self.n_vars}, group={self.group.name!r}, graph={self.graph!r}, "
                f"components={self.components}, shuffle={self.shuffle})")

    def sample(self, batch_size: int, seed: int = 0, start: int = 0) -> LegoBatch:
        """Samples ``start .. start+batch_size-1`` of stream ``seed``, generated natively on all threads.

        Sample i of a stream is the same whatever ``batch_size``, ``start``, the thread count or the
        implementation (``physai.lego.reference`` produces the same bits in pure Python).
        """
        # beyond this the int64 token array's size in bytes overflows (smaller sizes may still not fit in memory)
        batch_size = check_int(batch_size, "batch_size", min=0, max=MAX_INT64 // (8 * self.sequence_length))
        seed = check_seed(seed)
        start = check_int(start, "start", min=0, max=2**64 - 1 - batch_size)
        arrays = _core.lego.generate(self.n_vars, self.group.table, GRAPHS.index(self.graph), self.components,
                                     self.shuffle, self.vocab.native_ids(), seed, start, batch_size)
        return LegoBatch(*arrays)

    def decode(self, tokens) -> str:
        """Render one sentence ``[5n+2]`` (or a batch ``[B, 5n+2]``, giving a list) of integer token ids as text."""
        tokens = np.asarray(tokens)
        if tokens.size == 0:  # [] arrives as float64
            tokens = tokens.astype(np.int64)
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"tokens: expected integer token ids, got dtype {tokens.dtype}")
        if tokens.ndim == 2:
            return [self.decode(row) for row in tokens]
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected 1 or 2 dimensions, got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= len(self.vocab)):
            raise ValueError(f"tokens: ids must lie in 0..{len(self.vocab) - 1}")
        return " ".join(self.vocab[int(t)] for t in tokens if t != self.vocab.pad)

    def value_name(self, label: int) -> str:
        """Human-readable value of a label: ``+1``/``-1`` for Z2, the element name otherwise."""
        label = check_int(label, "label", min=0, max=self.group.order - 1)
        if self.group.name == "z2":
            return ("+1", "-1")[label]
        return self.group.names[label]
