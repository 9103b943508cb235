import sys

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from shoal.data import ShardedBatches, build_dataset
from shoal.data.shard import shard_indices
from shoal.registry import DATASETS, load_builtins
from tests.conftest import ROOT

load_builtins()


def indexed(n: int) -> TensorDataset:
    """Inputs are their own indices, so a batch tells which items it holds."""
    return TensorDataset(torch.arange(n).float().unsqueeze(1), torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_workers_together_hold_the_single_process_global_batch(workers):
    data, b = indexed(1000), 8
    single = ShardedBatches(data, rank=0, world_size=1, batch_size=b * workers, seed=5).iterate()
    shards = [ShardedBatches(data, rank=r, world_size=workers, batch_size=b, seed=5).iterate() for r in range(workers)]
    for _ in range(300):  # several epochs
        together = sorted(int(v) for it in shards for v in next(it)[0].flatten())
        assert together == sorted(int(v) for v in next(single)[0].flatten())


def test_batches_are_deterministic_and_seeded():
    def first(seed):
        return next(ShardedBatches(indexed(100), rank=0, world_size=2, batch_size=10, seed=seed).iterate())[0]

    assert torch.equal(first(1), first(1))
    assert not torch.equal(first(1), first(2))


def test_iterate_from_a_step_equals_skipping_to_it():
    batches = ShardedBatches(indexed(97), rank=1, world_size=2, batch_size=7, seed=0)
    it = batches.iterate()
    skipped = [next(it) for _ in range(20)][-1]
    assert torch.equal(next(batches.iterate(19))[0], skipped[0])


def test_batch_larger_than_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="larger than the 10-sample training set"):
        ShardedBatches(indexed(10), rank=0, world_size=4, batch_size=4, seed=0)


def test_evaluation_shards_cover_every_item_once():
    parts = [shard_indices(103, r, 4) for r in range(4)]
    assert sorted(i for p in parts for i in p) == list(range(103))


@pytest.mark.parametrize(
    "spec, shape, classes, n_train",
    [
        ("mnist1d:samples=1000", (1, 40), 10, 800),
        ("digits", (1, 8, 8), 10, 1438),
        ("synthetic:samples=100,test_samples=20,shape=[3, 4, 4],classes=5", (3, 4, 4), 5, 100),
    ],
)
def test_builtin_datasets(spec, shape, classes, n_train):
    bundle = build_dataset(DATASETS.resolve(spec))
    assert bundle.input_shape == shape and bundle.num_classes == classes
    assert len(bundle.train) == n_train
    x, y = bundle.train[0]
    assert tuple(x.shape) == shape and 0 <= int(y) < classes


def test_mnist1d_is_reproducible_and_leaves_global_rng_alone():
    state = np.random.get_state()[1].copy()
    a = build_dataset(DATASETS.resolve("mnist1d:samples=500,data_seed=3"))
    b = build_dataset(DATASETS.resolve("mnist1d:samples=500,data_seed=3"))  # from the cache
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert np.array_equal(np.random.get_state()[1], state)


def test_entry_point_dataset_infers_shape_and_classes(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "custom"))
    bundle = build_dataset(DATASETS.resolve("waves:make_datasets:samples=400,length=32"))
    assert bundle.input_shape == (1, 32) and bundle.num_classes == 4
    assert len(bundle.train) == 400 and len(bundle.test) == 100
    sys.modules.pop("waves", None)


def test_entry_point_dataset_must_return_two_datasets():
    with pytest.raises(TypeError, match="must return \\(train, test\\)"):
        build_dataset(DATASETS.resolve("builtins:dict"))
