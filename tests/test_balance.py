"""sync:balance=throughput — unequal shares of the same global batch, the same update."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import shoal
from shoal.data.shard import ShardedBatches
from shoal.strategies import balance
from shoal.strategies.balance import ThroughputBalancer, proportional_split
from shoal.engine.checkpoint import load_checkpoint
from tests.conftest import small_config


def test_proportional_split_keeps_the_total_and_the_minimum():
    assert proportional_split(128, [1, 1, 1, 1 / 3]) == [38, 38, 38, 14]  # 1 each + 124 as 3:3:3:1
    assert proportional_split(10, [1, 1]) == [5, 5]
    sizes = proportional_split(4, [1000, 1, 1, 1])
    assert sizes == [1, 1, 1, 1]  # the minimum wins over proportion
    assert sum(proportional_split(97, [0.3, 2.5, 1.1])) == 97
    with pytest.raises(ValueError):
        proportional_split(3, [1, 1, 1, 1])
    with pytest.raises(ValueError):
        proportional_split(8, [1, 0])


def test_a_split_takes_the_same_global_batch_as_equal_shards():
    data = TensorDataset(torch.arange(103).float().unsqueeze(1), torch.zeros(103, dtype=torch.long))
    world, b = 3, 4

    def batches(split):
        out = []
        for rank in range(world):
            shard = ShardedBatches(data, rank=rank, world_size=world, batch_size=b, seed=7)
            shard.split = split
            it = shard.iterate(5)  # from step 5: across an epoch boundary (8 steps an epoch)
            out.append([next(it)[0].squeeze(1).tolist() for _ in range(6)])
        return out

    equal, unequal = batches(None), batches(lambda: [7, 1, 4])
    for step in range(6):
        assert sorted(sum((equal[r][step] for r in range(world)), [])) == \
            sorted(sum((unequal[r][step] for r in range(world)), []))
        assert [len(unequal[r][step]) for r in range(world)] == [7, 1, 4]


def test_the_balancer_splits_by_the_median_speed_each_worker_measured(monkeypatch):
    def all_gather(everyone, mine, group=None):  # rank 1 measured 3x rank 0's seconds per sample
        everyone[0].copy_(mine)
        everyone[1].fill_(0.003 / 16)

    monkeypatch.setattr(balance.dist, "all_gather", all_gather)
    balancer = ThroughputBalancer(world_size=2, batch_size=16, every=5)
    for compute_s in [0.001, 0.001, 0.050, 0.001]:  # one step stretched by the scheduler
        balancer.record(compute_s, 16)
    assert balancer.sizes == [16, 16]  # not yet: every 5 steps
    balancer.record(0.001, 16)
    assert balancer.sizes == proportional_split(32, [16 / 0.001, 16 / 0.003]) == [24, 8]


@pytest.mark.processes
def test_balanced_training_makes_the_same_updates_as_plain_sync(tmp_path):
    # A 3x slower rank 1 (busy-waiting: the same on every machine) gets a smaller
    # share; the sample-weighted mean must keep every update what it was.
    cfg = dict(train__steps=40, train__eval_every=40, model="mlp:hidden=[64]")
    shoal.train(small_config(tmp_path / "sync", **cfg))
    shoal.train(small_config(tmp_path / "balanced", strategy="sync:balance=throughput,rebalance_every=5",
                             slowdown={"factors": {1: 3.0}, "method": "busy"}, **cfg))
    plain = load_checkpoint(tmp_path / "sync" / "checkpoint.pt")
    balanced = load_checkpoint(tmp_path / "balanced" / "checkpoint.pt")
    sizes = balanced["workers"][0]["strategy"]["balance"]["sizes"]
    # The split follows measured speed (exact shares are scheduling noise on a loaded machine).
    assert sum(sizes) == 32 and sizes[0] > sizes[1], f"the slow worker kept its share: {sizes}"
    for name, tensor in plain["model"].items():
        torch.testing.assert_close(balanced["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_local_sgd_refuses_balance(tmp_path):
    with pytest.raises(shoal.ConfigError, match="balance"):
        shoal.load_config(small_config(tmp_path / "x", strategy="localsgd:balance=throughput"))
