"""torch datasets over LEGO: zero copy, worker split without overlap, fixed splits."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from physai.lego import LegoTask  # noqa: E402
from physai.lego.data import LegoDataset, LegoStream, train_test_split  # noqa: E402


def test_stream_split_between_workers_without_overlap():
    task = LegoTask(6)
    stream = LegoStream(task, batch_size=8, seed=3, num_batches=6)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = torch.cat([b["tokens"] for b in loader]).numpy()
    expected = task.sample(48, seed=3).tokens
    assert got.shape == expected.shape
    # every sample exactly once, whatever the interleaving of the workers
    assert sorted(map(bytes, got)) == sorted(map(bytes, expected))


def test_stream_in_process_is_in_order():
    task = LegoTask(6)
    batches = list(LegoStream(task, batch_size=5, seed=1, num_batches=3))
    np.testing.assert_array_equal(torch.cat([b["labels"] for b in batches]).numpy(), task.sample(15, seed=1).labels)


def test_dataset_items_are_zero_copy_views():
    task = LegoTask(5)
    dataset = LegoDataset(task, 10, seed=2)
    item = dataset[3]
    assert item["tokens"].dtype == torch.int64
    assert item["tokens"].data_ptr() == dataset.batch.tokens[3].ctypes.data
    np.testing.assert_array_equal(item["labels"].numpy(), task.sample(1, seed=2, start=3).labels[0])


def test_train_test_split_is_disjoint_and_fixed():
    task = LegoTask(8)
    train, test = train_test_split(task, 30, 10, seed=7)
    assert len(train) == 30 and len(test) == 10
    both = np.concatenate([train.batch.tokens, test.batch.tokens])
    np.testing.assert_array_equal(both, task.sample(40, seed=7).tokens)
    again, _ = train_test_split(task, 30, 10, seed=7)
    np.testing.assert_array_equal(again.batch.tokens, train.batch.tokens)


def test_bad_dataset_arguments():
    with pytest.raises(TypeError, match="task"):
        LegoStream("lego", batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        LegoStream(LegoTask(3), batch_size=0)
    with pytest.raises(ValueError, match="size"):
        LegoDataset(LegoTask(3), -1)
