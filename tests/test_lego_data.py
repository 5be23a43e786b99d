"""torch datasets over LEGO: zero copy, worker split without overlap, fixed splits."""
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from physai.lego import LegoTask  # noqa: E402
from physai.lego.data import FIELDS, LegoDataset, LegoStream, train_test_split  # noqa: E402


def assert_batch_is_samples(batch, task, seed, start):
    expected = task.sample(len(batch["tokens"]), seed=seed, start=start)
    for name in FIELDS:
        np.testing.assert_array_equal(batch[name].numpy(), getattr(expected, name), err_msg=name)


# More workers than cores is deliberate here: only the split is under test.
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("workers", [2, 3])
def test_stream_split_between_workers_without_overlap(workers):
    # 7 batches: 3 workers get unequal shares. Each batch must be whole, and every batch index come exactly once,
    # whatever order the workers deliver in.
    task = LegoTask(6)
    stream = LegoStream(task, batch_size=8, seed=3, start=5, num_batches=7)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    starts = range(5, 5 + 8 * 7, 8)
    expected = {start: task.sample(8, seed=3, start=start).tokens for start in starts}
    seen = []
    for batch in loader:
        (start,) = [s for s, tokens in expected.items() if np.array_equal(batch["tokens"].numpy(), tokens)]
        assert_batch_is_samples(batch, task, 3, start)
        seen.append(start)
    assert sorted(seen) == list(starts)


def test_stream_in_process_is_in_order():
    task = LegoTask(6)
    batches = list(LegoStream(task, batch_size=5, seed=1, start=2, num_batches=3))
    assert len(batches) == 3
    for j, batch in enumerate(batches):
        assert_batch_is_samples(batch, task, 1, 2 + 5 * j)
    endless = LegoStream(task, batch_size=5, seed=1)
    assert_batch_is_samples(next(itertools.islice(iter(endless), 40, None)), task, 1, 200)
    with pytest.raises(TypeError, match="length"):
        len(endless)


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
