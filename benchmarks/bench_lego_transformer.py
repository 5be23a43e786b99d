"""LEGO transformer training throughput: the same training loop (the small encoder of
``physai.experiments.lego_transformer`` on n=12 sentences, a fresh batch every update) fed by the native generator,
and fed by a Python generator written the way the LEGO study's ``lego_data.generate_data`` is: per sentence, names
and values drawn in Python, clauses joined into a string, the string through a tokenizer (here a word-level one, as
the study calls its BERT tokenizer: ``tokenizer(sent, return_tensors='pt')['input_ids']``), and a clause-order
permutation matrix per sentence, from which the loop takes each variable's left-hand-side position.

Two encoders: the ``tiny`` preset's (width 32, 2 layers), where an update costs less than generating its batch in
Python, and the ``small`` preset's (width 64, 3 layers), where on CPU the update dominates and the generator's share
is small. Each round is ``STEPS`` updates; ``extra_info`` records the sentences per second.
"""
import numpy as np
import pytest

from physai.lego import LegoTask

N_VARS, BATCH, STEPS = 12, 256, 3
LETTERS = "abcdefghijklmnopqrstuvwxyz"

RATIOS = [
    ("LEGO transformer training n=12 B=256, tiny encoder: native-fed vs study-style Python-fed loop",
     "test_training_python_fed[tiny]", "test_training_native_fed[tiny]", 1.15),
    ("LEGO transformer training n=12 B=256, small encoder: native-fed vs study-style Python-fed loop (the update "
     "dominates on CPU; goal: no slower beyond noise)", "test_training_python_fed[small]",
     "test_training_native_fed[small]", 0.9),
]
ENCODERS = ["tiny", "small"]


class WordTokenizer:
    """Whitespace word-level tokenizer with the study's call convention: adds [CLS] and [SEP], returns a dict with
    'input_ids' of shape [1, T]."""

    def __init__(self, torch):
        self.torch = torch
        self.ids = {w: i for i, w in enumerate(["[PAD]", "[CLS]", "[SEP]", "=", ",", "val", "not", "0", "1",
                                                *LETTERS])}

    def __call__(self, text, return_tensors="pt"):
        ids = [self.ids["[CLS]"]] + [self.ids[w] for w in text.split()] + [self.ids["[SEP]"]]
        return {"input_ids": self.torch.tensor([ids])}


def study_style_batch(torch, tokenizer, n_var, batch_size, rng):
    """The study's generate_data: tokens [B, 5n+2], labels [B, n] in chain order, order [B, n, n] with
    order[b, slot, var] = 1 where chain variable var sits in clause slot."""
    batch, labels, clause_order = [], [], []
    for _ in range(batch_size):
        values = rng.integers(0, 2, (n_var,))
        names = [LETTERS[i] for i in rng.permutation(len(LETTERS))]
        clauses = ["%s = val %d , " % (names[0], values[0])]
        for i in range(1, n_var):
            modifier = "val" if values[i] == values[i - 1] else "not"
            clauses.append(" %s = %s %s , " % (names[i], modifier, names[i - 1]))
        clause_idx = tuple(rng.permutation(n_var))
        sent = "".join(clauses[idx] for idx in clause_idx)
        order = torch.zeros(1, n_var, n_var)
        for i in range(n_var):
            order[0, i, clause_idx[i]] = 1
        batch.append(tokenizer(sent, return_tensors="pt")["input_ids"])
        labels.append(values)
        clause_order.append(order)
    return torch.cat(batch), torch.LongTensor(np.array(labels)), torch.cat(clause_order)


def make_trainer(torch, preset):
    from physai.experiments.lego_transformer import PRESETS, _optimizer
    from physai.lego.transformer import LegoEncoder

    config = PRESETS[preset]
    torch.manual_seed(0)
    # vocabulary large enough for both token sets (the native one has 34 ids, the word-level one 35)
    model = LegoEncoder(40, 5 * N_VARS + 2, 2, d_model=config.d_model, n_layers=config.n_layers,
                        n_heads=config.n_heads, d_ff=config.d_ff, norm=config.norm)
    optimizer, scheduler = _optimizer(model, config.lr, config.weight_decay, config.warmup_steps, 10**6)
    supervised = torch.arange(N_VARS) <= 5  # the study's chain positions 0..5

    def step(tokens, positions, labels):
        logits = model(tokens, positions)
        loss = torch.nn.functional.cross_entropy(logits[:, supervised].flatten(0, 1), labels[:, supervised].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return step


def record_throughput(benchmark):
    benchmark.extra_info["sentences_per_s"] = BATCH * STEPS / benchmark.stats.stats.median


@pytest.mark.parametrize("encoder", ENCODERS)
def test_training_native_fed(benchmark, torch, encoder):
    task, step = LegoTask(N_VARS), make_trainer(torch, encoder)
    counter = iter(range(10**9))

    def train():
        for _ in range(STEPS):
            batch = task.sample(BATCH, seed=0, start=next(counter) * BATCH)
            step(torch.from_numpy(batch.tokens), torch.from_numpy(batch.positions), torch.from_numpy(batch.labels))

    benchmark.pedantic(train, rounds=5, iterations=1, warmup_rounds=1)
    record_throughput(benchmark)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_training_python_fed(benchmark, torch, encoder):
    tokenizer, step, rng = WordTokenizer(torch), make_trainer(torch, encoder), np.random.default_rng(0)

    def train():
        for _ in range(STEPS):
            tokens, labels, order = study_style_batch(torch, tokenizer, N_VARS, BATCH, rng)
            positions = 1 + 5 * order.argmax(dim=1)  # the slot of each chain variable, as the study's bmm reads it
            step(tokens, positions, labels)

    benchmark.pedantic(train, rounds=5, iterations=1, warmup_rounds=1)
    record_throughput(benchmark)


def test_study_style_batch_is_a_lego_batch(torch):
    """The Python generator's sentences obey the LEGO rules, so the comparison is between equal workloads."""
    tokens, labels, order = study_style_batch(torch, WordTokenizer(torch), N_VARS, 8, np.random.default_rng(1))
    words = {i: w for w, i in WordTokenizer(torch).ids.items()}
    positions = 1 + 5 * order.argmax(dim=1)
    for b in range(8):
        text = [words[int(t)] for t in tokens[b]]
        assert len(text) == 5 * N_VARS + 2 and text[0] == "[CLS]" and text[-1] == "[SEP]"
        value = {}
        for j in range(N_VARS):
            lhs, eq, op, rhs, comma = text[positions[b, j]:positions[b, j] + 5]
            assert eq == "=" and comma == ","
            base = int(rhs) if j == 0 else value[rhs]
            value[lhs] = base if op == "val" else 1 - base
            assert value[lhs] == labels[b, j]
