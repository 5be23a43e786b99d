"""LEGO generation: native == pure-Python reference bit for bit, and both checked by parsing the text."""
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import physai
from physai.lego import LegoTask, validate_cayley_table
from physai.lego import reference

FIELDS = ("tokens", "labels", "positions", "depth")


def assert_batches_equal(a, b):
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def parse_and_resolve(task, text):
    """Independent oracle: read the sentence as text and resolve every variable by following its clauses.

    Returns {variable: (value, depth, lhs token index)}, using only the group's element names and table.
    """
    words = text.split()
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    clauses = words[1:-1]
    assert len(clauses) == 5 * task.n_vars
    element_index = {name: g for g, name in enumerate(task.group.names)}
    rules = {}
    for c in range(task.n_vars):
        lhs, eq, op, rhs, comma = clauses[5 * c:5 * c + 5]
        assert eq == "=" and comma == "," and lhs not in rules
        rules[lhs] = (element_index[op], rhs, 1 + 5 * c)

    def resolve(var, seen=()):
        assert var not in seen, "cycle"
        g, rhs, at = rules[var]
        if rhs == "1":
            return g, 0, at
        value, depth, _ = resolve(rhs, seen + (var,))
        return int(task.group.table[g, value]), depth + 1, at

    return {var: resolve(var) for var in rules}


def check_against_text(task, batch):
    for b in range(len(batch)):
        resolved = parse_and_resolve(task, task.decode(batch.tokens[b]))
        order = [task.vocab[int(batch.tokens[b, at])] for at in batch.positions[b]]
        parents = [task.vocab[int(batch.tokens[b, at + 3])] for at in batch.positions[b]]
        for i, var in enumerate(order):
            assert resolved[var] == (batch.labels[b, i], batch.depth[b, i], batch.positions[b, i])
        # graph order: one root per component, every parent listed before its children
        assert parents.count("1") == task.components
        assert all(parent == "1" or order.index(parent) < i for i, parent in enumerate(parents))
        if task.graph == "chain":
            assert max(parents.count(var) for var in order) <= 1
        if not task.shuffle:
            np.testing.assert_array_equal(batch.positions[b], 1 + 5 * np.arange(task.n_vars))


TASKS = [
    dict(n_vars=12),
    dict(n_vars=1),
    dict(n_vars=26, group="z7", graph="tree"),
    dict(n_vars=26, group="z16", graph="tree", components=5),
    dict(n_vars=9, group="s3", graph="chain", components=3),
    dict(n_vars=10, group="s3", graph="tree", components=2, shuffle=False),
    dict(n_vars=7, group="z2", shuffle=False),
]


@pytest.mark.parametrize("kwargs", TASKS, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_native_matches_reference_and_text(kwargs):
    task = LegoTask(**kwargs)
    native = task.sample(23, seed=5, start=17)
    assert_batches_equal(native, reference.sample(task, 23, seed=5, start=17))
    check_against_text(task, native)


@pytest.mark.parametrize("group", ["s3", "z7"])
def test_longest_draws_over_several_chunks(group):
    # A shuffled tree over a group whose order is not a power of two makes the most random draws per sample; 300
    # samples fill two whole chunks of the native generator's draw buffer and part of a third.
    task = LegoTask(26, group, "tree")
    native = task.sample(300, seed=3, start=2**40)
    assert_batches_equal(native, reference.sample(task, 300, seed=3, start=2**40))
    check_against_text(task, native)


@given(seed=st.integers(0, 2**64 - 1), start=st.integers(0, 2**62), size=st.integers(0, 9),
       n_vars=st.integers(1, 26), group=st.sampled_from(["z2", "z3", "z4", "z8", "s3"]), graph=st.sampled_from(["chain", "tree"]),
       shuffle=st.booleans(), data=st.data())
def test_native_matches_reference_hypothesis(seed, start, size, n_vars, group, graph, shuffle, data):
    components = data.draw(st.integers(1, n_vars))
    task = LegoTask(n_vars, group, graph, components=components, shuffle=shuffle)
    native = task.sample(size, seed=seed, start=start)
    assert_batches_equal(native, reference.sample(task, size, seed=seed, start=start))
    check_against_text(task, native)


def test_cayley_table_group_matches_reference():
    # Z2 x Z2 (Klein four-group) as an explicit table
    table = [[a ^ b for b in range(4)] for a in range(4)]
    task = LegoTask(8, table, "tree", element_names=["I", "X", "Y", "XY"])
    native = task.sample(11, seed=2)
    assert_batches_equal(native, reference.sample(task, 11, seed=2))
    check_against_text(task, native)


def test_sample_is_independent_of_batch_split_and_threads():
    task = LegoTask(12, "s3", "tree")
    whole = task.sample(1000, seed=9)
    pieces = [task.sample(size, seed=9, start=start) for start, size in [(0, 1), (1, 63), (64, 500), (564, 436)]]
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(whole, name), np.concatenate([getattr(p, name) for p in pieces]))
    with physai.num_threads(1):
        assert_batches_equal(whole, task.sample(1000, seed=9))
    assert not np.array_equal(whole.tokens, task.sample(1000, seed=10).tokens)


def test_statistics_of_the_paper_task():
    # chain over Z2: names are distinct letters, values fair coins, clause order uniform
    task = LegoTask(12)
    batch = task.sample(20000, seed=0)
    lhs = np.take_along_axis(batch.tokens, batch.positions, axis=1)
    assert all(len(set(row)) == 12 for row in lhs[:500])
    assert abs(batch.labels.mean() - 0.5) < 0.01
    np.testing.assert_array_equal(batch.depth, np.broadcast_to(np.arange(12), batch.depth.shape))
    slot_of_root = (batch.positions[:, 0] - 1) // 5
    counts = np.bincount(slot_of_root, minlength=12)
    assert counts.min() > 20000 / 12 * 0.9 and counts.max() < 20000 / 12 * 1.1


def test_vocab_round_trip_and_decode():
    task = LegoTask(5, "z3")
    for i, token in enumerate(task.vocab.tokens):
        assert task.vocab.id(token) == i and task.vocab[i] == token
    batch = task.sample(3, seed=1)
    texts = task.decode(batch.tokens)
    assert [task.vocab.id(w) for w in texts[0].split()] == batch.tokens[0].tolist()
    with pytest.raises(ValueError, match="token"):
        task.vocab.id("nope")


def is_group_brute_force(table):
    order = len(table)
    ids = [e for e in range(order) if all(table[e][x] == x == table[x][e] for x in range(order))]
    return bool(ids) and all(any(table[x][y] == ids[0] == table[y][x] for y in range(order)) for x in range(order)) \
        and all(table[table[a][b]][c] == table[a][table[b][c]] for a, b, c in itertools.product(range(order), repeat=3))


@pytest.mark.parametrize("group", ["z2", "z5", "s3"])
def test_builtin_groups_are_groups(group):
    table = LegoTask(3, group).group.table.tolist()
    assert is_group_brute_force(table)
    validate_cayley_table(table)


@pytest.mark.parametrize("table,axiom", [
    ([[0, 1], [1, 2]], "closure"),
    ([[1, 0], [0, 0]], "identity"),
    ([[0, 1, 2], [1, 1, 1], [2, 1, 0]], "inverses"),
    ([[0, 1, 2], [1, 2, 0], [2, 1, 0]], "associativity|inverses"),
    ([[0, 1]], "square"),
])
def test_bad_cayley_tables_name_the_axiom(table, axiom):
    with pytest.raises(ValueError, match=axiom):
        LegoTask(3, table)


@given(st.lists(st.lists(st.integers(0, 3), min_size=4, max_size=4), min_size=4, max_size=4))
def test_cayley_validation_agrees_with_brute_force(table):
    try:
        validate_cayley_table(table)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == is_group_brute_force(table)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(n_vars=0), ValueError, "n_vars"),
    (dict(n_vars=27), ValueError, "n_vars"),
    (dict(n_vars=2.0), TypeError, "n_vars"),
    (dict(group="z1"), ValueError, "group"),
    (dict(group="q8"), ValueError, "group"),
    (dict(group=3), TypeError, "group"),
    (dict(group=[[0.0, 1.0], [1.0, 0.0]]), TypeError, "group"),
    (dict(graph="ring"), ValueError, "graph"),
    (dict(n_vars=3, components=4), ValueError, "components"),
    (dict(shuffle="yes"), TypeError, "shuffle"),
])
def test_bad_task_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LegoTask(**kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(batch_size=-1), ValueError, "batch_size"),
    (dict(batch_size=2.5), TypeError, "batch_size"),
    (dict(batch_size=1, seed=-1), ValueError, "seed"),
    (dict(batch_size=1, seed=2**64), ValueError, "seed"),
    (dict(batch_size=1, seed="0"), TypeError, "seed"),
    (dict(batch_size=1, start=-5), ValueError, "start"),
    (dict(batch_size=3, start=2**64 - 2), ValueError, "start"),
])
def test_bad_sample_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LegoTask(4).sample(**kwargs)


def test_empty_batch():
    batch = LegoTask(4).sample(0)
    assert batch.tokens.shape == (0, 22) and batch.labels.shape == (0, 4)


def test_decode_rejects_bad_tokens():
    task = LegoTask(3)
    with pytest.raises(TypeError, match="tokens"):
        task.decode(np.zeros(17, dtype=np.float32))
    with pytest.raises(ValueError, match="tokens"):
        task.decode(np.full(17, 999))


def test_cli_demo_prints_resolvable_sentences():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "physai", "lego", "--demo", "-n", "3", "--seed", "4"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    task = LegoTask(12)
    sentences = [line for line in out if line.startswith("[CLS]")]
    assert len(sentences) == 3
    for sentence, answers in zip(sentences, out[2::2]):
        resolved = parse_and_resolve(task, sentence)
        for item in answers.split():
            if "=" in item:
                var, value = item.split("=")
                assert task.value_name(resolved[var][0]) == value.split("(")[0]
