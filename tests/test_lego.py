"""LEGO generation: native == pure-Python reference bit for bit, and both checked by parsing the text."""
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import physai
from physai._native import _core
from physai.lego import LegoTask, validate_cayley_table
from physai.lego.groups import Group
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


@pytest.mark.parametrize("threads", [2, 3])
def test_sample_is_independent_of_batch_split_and_threads(threads):
    # 8 chunks (the native generator's parallel tasks), the last one short, that 2 and 3 threads share out
    # differently; explicit counts, because the default may be a single thread. Three threads on two cores still run
    # as three. The splits cut chunks at odd places.
    chunk = _core.lego.chunk
    size = 8 * chunk - chunk // 5
    task = LegoTask(12, "s3", "tree")
    with physai.num_threads(1):
        whole = task.sample(size, seed=9)
    with physai.num_threads(threads):
        assert physai.get_num_threads() == threads
        assert_batches_equal(whole, task.sample(size, seed=9))
        cuts = [0, 1, chunk // 2, chunk // 2 + 4 * chunk - 7, size]
        pieces = [task.sample(end - start, seed=9, start=start) for start, end in zip(cuts, cuts[1:])]
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(whole, name), np.concatenate([getattr(p, name) for p in pieces]))
    assert not np.array_equal(whole.tokens, task.sample(size, seed=10).tokens)


def test_rejected_draw_continues_past_the_prefetched_words(monkeypatch):
    # The native generator prefetches the draws a sample makes when no uniform_int rejects (26 names + 26 elements
    # here: exactly 13 Philox blocks) and reads any further draw from the scalar stream. Rejection has probability
    # below n / 2^32, so it takes a large group: 641 divides 2^32 + 1, which makes the rejected band 640 wide, the
    # widest there is for an order this small. Sample 1080673 of seed 0, found by scanning, rejects one element draw.
    draws = []

    class CountingStream(reference.CounterStream):
        def __init__(self, *args):
            super().__init__(*args)
            draws.append(0)

        def next_u32(self):
            draws[-1] += 1
            return super().next_u32()

    monkeypatch.setattr(reference, "CounterStream", CountingStream)
    task = LegoTask(26, "z641", "chain", shuffle=False)
    start = 1080673 - 70
    native = task.sample(128, seed=0, start=start)
    assert_batches_equal(native, reference.sample(task, 128, seed=0, start=start))
    assert np.flatnonzero(np.array(draws) > 52).tolist() == [70]
    check_against_text(task, native)


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


def first_failed_axiom(table):
    """Brute-force oracle: the first axiom ``table`` breaks, in the validator's order of checks; None for a group."""
    elements = range(len(table))
    if any(not 0 <= v < len(table) for row in table for v in row):
        return "closure"
    identities = [e for e in elements if all(table[e][x] == x == table[x][e] for x in elements)]
    if not identities:
        return "identity"
    e = identities[0]
    if not all(any(table[x][y] == e == table[y][x] for y in elements) for x in elements):
        return "inverses"
    if not all(table[table[a][b]][c] == table[a][table[b][c]] for a, b, c in itertools.product(elements, repeat=3)):
        return "associativity"
    return None


def cyclic_table(k):
    return [[(a + b) % k for b in range(k)] for a in range(k)]


def compose(g, v):
    """``g ∘ v`` of permutations written as tuples of images: apply v first, then g."""
    return tuple(g[i] for i in v)


S3_PERMUTATIONS = list(itertools.permutations(range(3)))
# identity first in each
SMALL_GROUPS = [cyclic_table(k) for k in (1, 2, 3, 4)] + [
    [[a ^ b for b in range(4)] for a in range(4)],
    [[S3_PERMUTATIONS.index(compose(g, v)) for v in S3_PERMUTATIONS] for g in S3_PERMUTATIONS],
]


@pytest.mark.parametrize("group", ["z2", "z5", "s3"])
def test_builtin_groups_are_groups(group):
    table = LegoTask(3, group).group.table.tolist()
    assert first_failed_axiom(table) is None
    validate_cayley_table(table)


@pytest.mark.parametrize("k", [3, 5, 12])
def test_cyclic_group_is_addition_mod_k(k):
    group = LegoTask(3, f"z{k}").group
    np.testing.assert_array_equal(group.table, cyclic_table(k))
    assert group.identity == 0 and group.names == tuple(f"+{i}" for i in range(k))


def test_z2_is_sign_flips():
    # "+" keeps a value and "-" negates it: XOR of the element indices, "+" the identity
    group = LegoTask(3, "z2").group
    np.testing.assert_array_equal(group.table, [[a ^ b for b in range(2)] for a in range(2)])
    assert group.identity == 0 and group.names == ("+", "-")


def test_s3_composes_permutations_as_named():
    # Each name is read as cycle notation on {1, 2, 3}; table[g, v] must be the name of g ∘ v (v first), the
    # convention physai.lego.groups documents. A relabelled Z6 would fail here.
    group = LegoTask(3, "s3").group
    assert group.order == 6 and group.identity == 0 and group.names[0] == "()"

    def permutation(name):
        images = [0, 1, 2]
        cycle = [int(c) - 1 for c in name.strip("()")]
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            images[a] = b
        return tuple(images)

    perms = [permutation(name) for name in group.names]
    assert len(set(perms)) == 6
    for g, v in itertools.product(range(6), repeat=2):
        assert perms[group.table[g, v]] == compose(perms[g], perms[v]), (group.names[g], group.names[v])
    assert not np.array_equal(group.table, group.table.T)


# A non-associative loop (order 5 is the smallest there is): Latin square, identity 0, every element its own
# inverse; a group of order 5 is cyclic, where only the identity is its own inverse.
LOOP_OF_ORDER_5 = [[0, 1, 2, 3, 4], [1, 0, 3, 4, 2], [2, 4, 0, 1, 3], [3, 2, 4, 0, 1], [4, 3, 1, 2, 0]]


@pytest.mark.parametrize("table,axiom", [
    ([[0, 1], [1, 2]], "closure"),
    # Z3 with one product out of range: identity and inverses intact
    ([[0, 1, 2], [1, 3, 0], [2, 0, 1]], "closure"),
    ([[0, 1, 2], [1, 2, 0], [2, 0, -1]], "closure"),
    ([[1, 0], [0, 0]], "identity"),
    # both elements are left identities, neither is a right one
    ([[0, 1], [0, 1]], "identity"),
    # an associative monoid (1 absorbs) that fails only inverses
    ([[0, 1, 2], [1, 1, 1], [2, 1, 0]], "inverses"),
    (LOOP_OF_ORDER_5, "associativity"),
])
def test_bad_cayley_tables_name_the_axiom(table, axiom):
    assert first_failed_axiom(table) == axiom
    with pytest.raises(ValueError, match=axiom):
        LegoTask(3, table)


@st.composite
def relabelled_group(draw, min_order=1):
    """A small group's table with its elements relabelled by a random permutation, and the identity's label."""
    table = draw(st.sampled_from([t for t in SMALL_GROUPS if len(t) >= min_order]))
    label = draw(st.permutations(range(len(table))))
    relabelled = [[0] * len(table) for _ in table]
    for a, b in itertools.product(range(len(table)), repeat=2):
        relabelled[label[a]][label[b]] = label[table[a][b]]
    return relabelled, label[0]


@st.composite
def cayley_table(draw, axiom):
    """A table whose first failing axiom is ``axiom`` by construction (None: a relabelled group).

    The others change one entry of a group, which leaves no Latin square and so no group; where the change lands
    decides the axiom, and the four cases cover every single-entry change.
    """
    if axiom is None:
        return draw(relabelled_group())[0]
    table, e = draw(relabelled_group(min_order=3 if axiom == "associativity" else 2))
    order = len(table)
    elements = range(order)
    others = [x for x in elements if x != e]
    if axiom == "closure":
        a, b = draw(st.sampled_from(elements)), draw(st.sampled_from(elements))
        table[a][b] = draw(st.integers(-order, -1) | st.integers(order, 2 * order))
    elif axiom == "identity":
        # e·x or x·e moved off x; no other element can become the identity by one change
        x = draw(st.sampled_from(others))
        a, b = draw(st.sampled_from([(e, x), (x, e)]))
        table[a][b] = draw(st.sampled_from([y for y in elements if y != x]))
    elif axiom == "inverses":
        # x·y = e for one y only in a group; moving that product off e leaves x without an inverse
        x = draw(st.sampled_from(others))
        table[x][table[x].index(e)] = draw(st.sampled_from(others))
    else:
        # a product of non-identities other than e: identity row and column, and every x·y = e, survive
        a, b = draw(st.sampled_from([(a, b) for a in others for b in others if table[a][b] != e]))
        table[a][b] = draw(st.sampled_from([y for y in elements if y != table[a][b]]))
    return table


@pytest.mark.parametrize("axiom", [None, "closure", "identity", "inverses", "associativity"])
@given(data=st.data())
def test_cayley_validation_agrees_with_brute_force(axiom, data):
    table = data.draw(cayley_table(axiom))
    assert first_failed_axiom(table) == axiom
    if axiom is None:
        np.testing.assert_array_equal(validate_cayley_table(table), table)
    else:
        with pytest.raises(ValueError, match=axiom):
            validate_cayley_table(table)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(n_vars=0), ValueError, "n_vars"),
    (dict(n_vars=27), ValueError, "n_vars"),
    (dict(n_vars=2.0), TypeError, "n_vars"),
    (dict(group="z1"), ValueError, "group"),
    (dict(group="q8"), ValueError, "group"),
    (dict(group=3), TypeError, "group"),
    (dict(group=[[0.0, 1.0], [1.0, 0.0]]), TypeError, "group"),
    (dict(group=[[0, 1]]), ValueError, "square"),
    (dict(group=[[0, 1], [1]]), ValueError, "group: a Cayley table must be a square"),
    (dict(group="z1025"), ValueError, "group"),
    (dict(group=np.zeros((1025, 1025), dtype=np.int32)), ValueError, "maximum order"),
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


def test_group_objects_and_native_tables_are_checked():
    # A Group built by hand bypasses the name and table parsers; the native generator indexes its table by values.
    with pytest.raises(ValueError, match="closure"):
        LegoTask(3, Group("bad", np.array([[0, 5], [5, 0]], dtype=np.int32), ("a", "b")))
    with pytest.raises(ValueError, match="names"):
        LegoTask(3, Group("short", np.array([[0, 1], [1, 0]], dtype=np.int32), ("a",)))
    klein = Group("klein", np.array([[a ^ b for b in range(4)] for a in range(4)], dtype=np.int64), tuple("IXYZ"))
    assert LegoTask(3, klein).group.table.dtype == np.int32  # validated and converted, not just checked
    task = LegoTask(3)
    with pytest.raises(ValueError, match="table"):
        _core.lego.generate(3, np.array([[0, 2], [2, 0]], dtype=np.int32), 0, 1, True, task.vocab.native_ids(), 0, 0, 4)


def test_indices_and_names_out_of_range_are_refused():
    task = LegoTask(4, "z3")
    with pytest.raises(ValueError, match="token_id"):
        task.vocab[-1]
    with pytest.raises(ValueError, match="token_id"):
        task.vocab[len(task.vocab)]
    with pytest.raises(ValueError, match="label"):
        task.value_name(3)
    with pytest.raises(ValueError, match="batch_size"):
        task.sample(2**60)  # its token array would exceed 2**63 bytes
    with pytest.raises(TypeError, match="element_names"):
        LegoTask(3, [[0, 1], [1, 0]], element_names=["a", 3])
    assert task.decode([]) == ""
    assert repr(task.vocab).startswith(f"Vocab({len(task.vocab)} tokens: [PAD] [CLS]")


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
