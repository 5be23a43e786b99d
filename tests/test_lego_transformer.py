"""The LEGO transformer experiment: the encoder against torch's own layers, the mimicking targets and loss against
the study's construction and torch's KL, the diagnostics and per-depth accuracy against loops, learning above chance
and bit-exact resume on a tiny config."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_saves_and_loads
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from physai.experiments.lego_transformer import (PRESETS, LegoTransformerConfig, LegoTransformerResult,  # noqa: E402
                                                  batch_indices, build_model, depth_accuracy, depth_table, run)
from physai.lego import LegoTask  # noqa: E402
from physai.lego.transformer import (EncoderBlock, LegoEncoder, association_pattern, attention_mass,  # noqa: E402
                                     manipulation_pattern, mimicking_loss)

TINY = PRESETS["tiny"]
# dropout on, so that resuming must restore torch's RNG state; mimicking, so that its losses travel too
RESUMABLE = TINY.replace(init="mimic", dropout=0.1, epochs=2)


@pytest.fixture(scope="module")
def tiny_run():
    return run(TINY)


@pytest.fixture(scope="module")
def mimic_run():
    return run(RESUMABLE)


def copy_into_torch_layer(block: EncoderBlock, layer: torch.nn.TransformerEncoderLayer) -> None:
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(block.qkv.weight)
        layer.self_attn.in_proj_bias.copy_(block.qkv.bias)
        layer.self_attn.out_proj.weight.copy_(block.out.weight)
        layer.self_attn.out_proj.bias.copy_(block.out.bias)
        for mine, theirs in ((block.ff[0], layer.linear1), (block.ff[2], layer.linear2), (block.norm1, layer.norm1),
                             (block.norm2, layer.norm2)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)


def randomized_block(norm, d=16, heads=4, d_ff=24, seed=0):
    torch.manual_seed(seed)
    block = EncoderBlock(d, heads, d_ff, norm, 0.0).double()
    with torch.no_grad():  # away from the identity-like initialisation, so LayerNorm parameters matter too
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return block


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_block_matches_torch_transformer_encoder_layer(norm):
    block = randomized_block(norm)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, activation="gelu", layer_norm_eps=1e-12,
                                             batch_first=True, norm_first=norm == "pre").double().eval()
    copy_into_torch_layer(block, layer)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    ours, _ = block(x)
    torch.testing.assert_close(ours, layer(x), rtol=1e-12, atol=1e-12)


def test_attention_weights_match_torch_multihead_attention():
    block = randomized_block("pre")
    attention = torch.nn.MultiheadAttention(16, 4, batch_first=True).double()
    with torch.no_grad():
        attention.in_proj_weight.copy_(block.qkv.weight)
        attention.in_proj_bias.copy_(block.qkv.bias)
        attention.out_proj.weight.copy_(block.out.weight)
        attention.out_proj.bias.copy_(block.out.bias)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    ours, weights = block.attention(x)
    theirs, their_weights = attention(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, their_weights, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_tied_encoder_applies_one_block_n_layers_times(norm):
    torch.manual_seed(0)
    tied = LegoEncoder(20, 12, 3, d_model=16, n_layers=3, n_heads=2, norm=norm, tied=True).double()
    untied = LegoEncoder(20, 12, 3, d_model=16, n_layers=3, n_heads=2, norm=norm).double()
    per_block = sum(p.numel() for p in tied.blocks[0].parameters())
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 2 * per_block
    tokens = torch.randint(0, 20, (2, 12))
    x = tied.embedding_norm(tied.token(tokens) + tied.position(torch.arange(12)))
    maps = []
    for _ in range(3):
        x, weights = tied.blocks[0](x)
        maps.append(weights)
    logits, attention = tied(tokens, need_attention=True)
    torch.testing.assert_close(logits, tied.head(tied.final_norm(x)), rtol=0, atol=0)
    torch.testing.assert_close(attention, torch.stack(maps, 1), rtol=0, atol=0)


def test_head_is_read_at_the_left_hand_sides():
    task = LegoTask(5, "s3")
    batch = task.sample(4, seed=3)
    torch.manual_seed(0)
    model = LegoEncoder(len(task.vocab), task.sequence_length, task.group.order, d_model=16, n_layers=2, n_heads=2)
    tokens, positions = torch.from_numpy(batch.tokens), torch.from_numpy(batch.positions)
    read = model(tokens, positions)
    everywhere = model(tokens)
    assert read.shape == (4, 5, 6)
    for b in range(4):
        torch.testing.assert_close(read[b], everywhere[b, positions[b]], rtol=0, atol=0)
    _, attention = model(tokens, need_attention=True)
    torch.testing.assert_close(attention.sum(-1), torch.ones(4, 2, 2, task.sequence_length))


def study_manipulation_target(seq_len):
    """The study's construction: a canvas of rows [1, 2, 4, 2, 1] shifted along the diagonal, cropped by 2."""
    canvas = torch.zeros(seq_len + 4, seq_len + 4)
    for i in range(seq_len):
        canvas[i, i:i + 5] = torch.tensor([1.0, 2.0, 4.0, 2.0, 1.0])
    target = canvas[:seq_len, 2:seq_len + 2] + 1e-3
    return target / target.sum(-1, keepdim=True)


@pytest.mark.parametrize("seq_len", [1, 4, 22, 62])
def test_manipulation_pattern_is_the_studys(seq_len):
    torch.testing.assert_close(manipulation_pattern(seq_len), study_manipulation_target(seq_len))


def test_association_pattern_is_the_studys():
    tokens = torch.from_numpy(LegoTask(12).sample(3, seed=1).tokens)
    for b in range(3):
        t = tokens[b:b + 1]
        v = torch.ones_like(t)
        same = (v.T @ t**2 + (t**2).T @ v - 2 * t.T @ t == 0).float()  # (t_i - t_j)^2 == 0, as the study writes it
        same.fill_diagonal_(0)
        same += 1e-3
        torch.testing.assert_close(association_pattern(t)[0], same / same.sum(-1, keepdim=True))


def test_mimicking_loss_is_kl_from_the_smoothed_maps():
    tokens = torch.from_numpy(LegoTask(4).sample(5, seed=2).tokens)
    attention = torch.softmax(torch.randn(5, 3, 2, tokens.shape[1], tokens.shape[1], dtype=torch.float64), -1)
    manipulation, association = mimicking_loss(attention, tokens)
    smoothed = (attention + 1e-3) / (attention + 1e-3).sum(-1, keepdim=True)
    targets = (manipulation_pattern(tokens.shape[1]).double().expand(5, -1, -1), association_pattern(tokens).double())
    for head, loss in enumerate((manipulation, association)):
        expected = sum(torch.nn.functional.kl_div(targets[head].log(), smoothed[:, layer, head], reduction="none")
                       .sum(-1).mean() for layer in range(3))
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="attention"):
        mimicking_loss(attention[:, :, :1], tokens)


def test_attention_mass_against_a_loop():
    rng = np.random.default_rng(0)
    tokens = LegoTask(3).sample(2, seed=0).tokens
    T = tokens.shape[1]
    attention = rng.dirichlet(np.ones(T), size=(2, 2, 3, T))
    identical, local = attention_mass(torch.from_numpy(attention), torch.from_numpy(tokens), band=1)
    for layer in range(2):
        for head in range(3):
            same = near = 0.0
            for b in range(2):
                for i in range(T):
                    for j in range(T):
                        same += attention[b, layer, head, i, j] * (tokens[b, i] == tokens[b, j] and i != j)
                        near += attention[b, layer, head, i, j] * (abs(i - j) <= 1)
            assert identical[layer, head].item() == pytest.approx(same / (2 * T), rel=1e-12)
            assert local[layer, head].item() == pytest.approx(near / (2 * T), rel=1e-12)


def test_depth_accuracy_against_a_loop(rng):
    depth = rng.integers(0, 4, (50, 6))
    labels, predictions = rng.integers(0, 3, (2, 50, 6))
    accuracy = depth_accuracy(predictions, labels, depth, 6)
    for d in range(6):
        hits = [predictions[i, j] == labels[i, j] for i in range(50) for j in range(6) if depth[i, j] == d]
        if hits:
            assert accuracy[d] == pytest.approx(np.mean(hits), rel=1e-15)
        else:
            assert np.isnan(accuracy[d])
    with pytest.raises(ValueError, match="shapes"):
        depth_accuracy(predictions[:, :5], labels, depth, 6)
    with pytest.raises(ValueError, match="depth"):
        depth_accuracy(predictions, labels, depth, 3)


def test_batches_partition_each_epoch_and_are_fixed():
    config = TINY.replace(n_train=230, batch_size=50)  # a short last batch
    assert config.steps_per_epoch == 5
    for epoch in range(2):
        rows = [batch_indices(config, epoch * 5 + k) for k in range(5)]
        assert [len(r) for r in rows] == [50, 50, 50, 50, 30]
        assert sorted(np.concatenate(rows).tolist()) == list(range(230))
    np.testing.assert_array_equal(batch_indices(config, 7), batch_indices(config, 7))
    assert not np.array_equal(batch_indices(config, 0), batch_indices(config, 5))


def test_tiny_run_learns_well_above_chance(tiny_run):
    n = min(TINY.n_train, TINY.n_test)  # sentences in the training-accuracy probe, one depth-0 variable each
    # Hoeffding: a predictor no better than chance (1/2) exceeds 1/2 + t with probability <= exp(-2 n t^2) = 1e-9
    margin = math.sqrt(math.log(1e9) / (2 * n))
    assert tiny_run.train_accuracy[0, 0] < 0.5 + margin  # and it starts at chance
    assert tiny_run.train_accuracy[-1, 0] >= 0.5 + margin
    assert tiny_run.test_accuracy[-1, 0] >= 0.5 + math.sqrt(math.log(1e9) / (2 * TINY.n_test))
    assert tiny_run.train_loss[-20:].mean() < tiny_run.train_loss[:20].mean()
    assert tiny_run.completed and len(tiny_run.train_loss) == TINY.total_steps
    assert tiny_run.eval_steps.tolist() == list(range(0, TINY.total_steps, TINY.eval_every)) + [TINY.total_steps]


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(mimic_run, tmp_path):
    path = tmp_path / "run.pt"
    stop = 50  # neither an evaluation nor a checkpoint step
    partial = run(RESUMABLE, checkpoint=path, checkpoint_every=30, stop_after=stop)
    assert not partial.completed and len(partial.train_loss) == stop
    resumed = run(RESUMABLE, checkpoint=path)
    assert resumed.completed
    for f in ("eval_steps", "test_accuracy", "train_accuracy", "train_loss", "mimic_loss", "identical_mass_init",
              "local_mass_init", "identical_mass", "local_mass", "example_attention"):
        np.testing.assert_array_equal(getattr(resumed, f), getattr(mimic_run, f), err_msg=f)
    # a finished checkpoint gives the finished run again, without training or a second final evaluation
    again = run(RESUMABLE, checkpoint=path)
    np.testing.assert_array_equal(again.test_accuracy, mimic_run.test_accuracy)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    config = TINY.replace(epochs=1, n_train=100, n_test=50)
    run(config, checkpoint=path, stop_after=1)
    with pytest.raises(ValueError, match="checkpoint"):
        run(config.replace(lr=1e-3), checkpoint=path)


def test_mimicking_shapes_the_attention(mimic_run, tiny_run):
    losses = mimic_run.mimic_loss
    assert losses.shape == (RESUMABLE.mimic_steps, 2)
    assert (losses[-5:].mean(0) < losses[:5].mean(0)).all()
    # head 0 of every layer on the band, head 1 on identical tokens, beyond any head of the random init
    assert (mimic_run.local_mass_init[:, 0] > tiny_run.local_mass_init.max()).all()
    assert (mimic_run.identical_mass_init[:, 1] > tiny_run.identical_mass_init.max()).all()
    assert tiny_run.mimic_loss.shape == (0, 2)


@pytest.mark.parametrize("group", ["z3", "s3"])
def test_other_groups_get_a_group_order_head(group):
    config = TINY.replace(group=group, n_train=100, n_test=40, epochs=1, eval_every=1, batch_size=50)
    assert build_model(config).head.out_features == LegoTask(4, group).group.order
    result = run(config)
    assert result.test_accuracy.shape == (3, 4) and np.isfinite(result.test_accuracy).all()


def test_tree_graph_reports_absent_depths_as_nan():
    result = run(TINY.replace(graph="tree", n_train=100, n_test=40, epochs=1, batch_size=50, eval_every=10))
    seen = np.zeros(4, bool)
    seen[np.unique(LegoTask(4, graph="tree").sample(40, 0, 100).depth)] = True
    assert (np.isfinite(result.test_accuracy[-1]) == seen).all()


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip_bit_for_bit(tiny_run, tmp_path, suffix):
    loaded = assert_saves_and_loads(tiny_run, tmp_path / ("lego" + suffix))
    assert loaded.summary() == tiny_run.summary()



def test_summary_and_table(tiny_run):
    row, = tiny_run.summary()
    final = tiny_run.test_accuracy[-1]
    assert row["test_acc_supervised"] == pytest.approx(final[:2].mean())
    assert row["test_acc_unsupervised"] == pytest.approx(final[2:].mean())
    assert [row[f"test_acc_depth_{d}"] for d in range(4)] == final.tolist()
    table = depth_table({"a": tiny_run, "b": tiny_run}).splitlines()
    assert table[0] == "| run | d0* | d1* | d2 | d3 |" and len(table) == 4


def test_cli_preset_flags_json_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    out = subprocess.run([sys.executable, "-m", "physai", "lego-train", "--preset", "tiny", "--epochs", "1",
                          "--n-train", "100", "--n-test", "40", "--batch-size", "50", "--quiet",
                          "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
                          "--attention-plot", str(tmp_path / "a.png")], capture_output=True, text=True, check=True)
    assert "| run | d0* | d1* | d2 | d3 |" in out.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["config"]["n_vars"] == 4 and data["config"]["epochs"] == 1  # the preset's, and the flag's
    assert data["train_loss"]["shape"] == [2]
    for name in ("r.png", "a.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "physai", "lego-train", "--preset", "tiny", "--norm", "mid"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "norm" in bad.stderr


def test_importing_the_experiment_does_not_import_torch():
    code = ("import sys, physai.cli, physai.experiments.lego_transformer as m; m.LegoTransformerConfig().validated(); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("field, value, error", [
    ("n_vars", 0, ValueError), ("n_vars", 27, ValueError), ("n_vars", 2.0, TypeError), ("group", "z1", ValueError),
    ("graph", "ring", ValueError), ("norm", "mid", ValueError), ("init", "bert", ValueError),
    ("device", "tpu", ValueError), ("dropout", 1.0, ValueError), ("tied", 1, TypeError), ("lr", 0.0, ValueError),
    ("weight_decay", -0.1, ValueError), ("d_model", 31, ValueError), ("warmup_steps", -1, ValueError),
    ("seed", -1, ValueError), ("batch_size", 0, ValueError)])
def test_bad_config_names_the_field(field, value, error):
    with pytest.raises(error, match=field):
        TINY.replace(**{field: value})


@given(st.integers(1, 26), st.integers(-3, 30))
def test_train_depth_bounds(n_vars, train_depth):
    config = TINY.replace(n_vars=n_vars, train_depth=0)
    if 0 <= train_depth < n_vars:
        assert config.replace(train_depth=train_depth).train_depth == train_depth
    else:
        with pytest.raises(ValueError, match="train_depth"):
            config.replace(train_depth=train_depth)


def test_mimic_needs_two_heads():
    with pytest.raises(ValueError, match="n_heads"):
        TINY.replace(n_heads=1, d_model=32, init="mimic")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="device"):
        run(TINY.replace(device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_run_learns_above_chance():
    gpu = run(TINY.replace(device="cuda"))
    n = TINY.n_test
    # float32 kernels differ between devices, so the runs differ; both must be far above chance at depth 0
    assert gpu.test_accuracy[-1, 0] >= 0.5 + math.sqrt(math.log(1e9) / (2 * n))


def test_cosine_schedule_closed_form():
    model = torch.nn.Linear(2, 2)
    from physai.experiments.lego_transformer import _optimizer

    optimizer, scheduler = _optimizer(model, 0.1, 0.0, 10, 110)
    lrs = []
    for _ in range(110):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:10] == pytest.approx([0.01 * (s + 1) for s in range(10)])
    assert lrs[10:] == pytest.approx([0.05 * (1 + math.cos(math.pi * s / 100)) for s in range(100)])


@pytest.mark.slow
def test_small_config_reaches_95_percent_on_the_supervised_depths():
    result = run(LegoTransformerConfig())
    assert (result.test_accuracy[-1, :LegoTransformerConfig.train_depth + 1] >= 0.95).all()


def test_bad_encoder_arguments_are_named():
    with pytest.raises(ValueError, match="d_model"):
        LegoEncoder(10, 8, 2, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="norm"):
        LegoEncoder(10, 8, 2, norm="mid")
    with pytest.raises(TypeError, match="tied"):
        LegoEncoder(10, 8, 2, tied=1)
    with pytest.raises(ValueError, match="dropout"):
        LegoEncoder(10, 8, 2, dropout=1.5)
    model = LegoEncoder(10, 8, 2, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens"):
        association_pattern(torch.zeros(4, dtype=torch.int64))


def test_follows_the_sweep_protocol(tiny_run):
    from physai import sweep
    from physai.experiments import lego_transformer

    assert sweep.protocol(lego_transformer) == (LegoTransformerConfig, run, LegoTransformerResult)
    row, = tiny_run.summary()
    assert all(isinstance(v, (int, float)) for v in row.values())
    for name, (dims, values) in tiny_run.trajectories().items():
        assert len(dims) == values.ndim, name


@pytest.mark.parametrize("group, graph", [("z2", "chain"), ("s3", "chain"), ("z5", "tree")])
def test_root_shortcut_against_the_decoded_text(group, graph):
    from physai.experiments.lego_transformer import root_shortcut

    task = LegoTask(7, group, graph)
    batch = task.sample(20, seed=4)
    shortcut = root_shortcut(batch, task)
    table, names = task.group.table, list(task.group.names)
    for b, text in enumerate(task.decode(batch.tokens)):
        clauses = [clause.split() for clause in text.removeprefix("[CLS] ").removesuffix(" [SEP]").split(" ,")
                   if clause.strip()]
        element = {lhs: names.index(g) for lhs, _, g, _ in clauses}
        root = next(lhs for lhs, _, _, rhs in clauses if rhs == "1")
        for j, position in enumerate(batch.positions[b]):
            name = task.vocab[int(batch.tokens[b, position])]
            expected = element[root] if name == root else table[element[name], element[root]]
            assert shortcut[b, j] == expected
    # exact wherever the parent is the root
    assert (shortcut[batch.depth <= 1] == batch.labels[batch.depth <= 1]).all()
    with pytest.raises(ValueError, match="task"):
        root_shortcut(batch, LegoTask(7, components=2))
