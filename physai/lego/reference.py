"""Pure-Python twin of csrc/lego/sample.hpp: the same draws in the same order from the same counter stream,
so its batches equal the native ones bit for bit. Slow by design; for tests and as executable documentation."""
from __future__ import annotations

import numpy as np

from physai._rng import CounterStream
from physai.lego.task import VARIABLE_NAMES, LegoBatch, LegoTask

LEGO_DOMAIN = 0x4C45474F  # "LEGO"


def sample_one(task: LegoTask, seed: int, index: int):
    """tokens [5n+2], labels, positions, depth [n] of sample ``index`` of stream ``seed`` (Python lists)."""
    stream = CounterStream(seed, index, LEGO_DOMAIN)
    n, vocab, table = task.n_vars, task.vocab, task.group.table

    names = list(range(len(VARIABLE_NAMES)))
    for i in range(n):
        j = i + stream.uniform_int(len(VARIABLE_NAMES) - i)
        names[i], names[j] = names[j], names[i]

    if task.graph == "tree":
        parent = [-1 if i < task.components else stream.uniform_int(i) for i in range(n)]
    else:
        lengths = [n // task.components + (c < n % task.components) for c in range(task.components)]
        roots = set(np.cumsum([0] + lengths[:-1]).tolist())
        parent = [-1 if i in roots else i - 1 for i in range(n)]

    order = task.group.order
    if order >= 2 and order & (order - 1) == 0:  # b-bit fields of whole draws, lowest bits first
        bits = order.bit_length() - 1
        per_draw = 32 // bits
        element = []
        for i in range(0, n, per_draw):
            word = stream.next_u32()
            for _ in range(min(per_draw, n - i)):
                element.append(word & (order - 1))
                word >>= bits
    else:
        element = [stream.uniform_int(order) for _ in range(n)]

    slot = list(range(n))
    if task.shuffle:
        for j in range(n - 1, 0, -1):
            r = stream.uniform_int(j + 1)
            slot[j], slot[r] = slot[r], slot[j]

    tokens = [vocab.pad] * task.sequence_length
    tokens[0], tokens[-1] = vocab.cls, vocab.sep
    labels, positions, depth = [0] * n, [0] * n, [0] * n
    for i in range(n):
        p = parent[i]
        labels[i] = element[i] if p < 0 else int(table[element[i], labels[p]])
        depth[i] = 0 if p < 0 else depth[p] + 1
        at = 1 + 5 * slot[i]
        positions[i] = at
        lhs = vocab.variable(names[i])
        rhs = vocab.base if p < 0 else vocab.variable(names[p])
        tokens[at:at + 5] = [lhs, vocab.eq, vocab.element(element[i]), rhs, vocab.comma]
    return tokens, labels, positions, depth


def sample(task: LegoTask, batch_size: int, seed: int = 0, start: int = 0) -> LegoBatch:
    """Reference of ``LegoTask.sample``."""
    rows = [sample_one(task, seed, start + b) for b in range(batch_size)]
    n = task.n_vars
    as_array = lambda k, width: np.array([r[k] for r in rows], dtype=np.int64).reshape(batch_size, width)
    return LegoBatch(as_array(0, task.sequence_length), as_array(1, n), as_array(2, n), as_array(3, n))
