"""A simulated federation against centralised training it must reduce to.

1. One client holding all the data, one round of E epochs, is plain SGD on
   the union for E epochs (same initial weights, same shuffling).
2. FedAvg over every client, each taking one full-batch plain-SGD step a
   round, is full-batch gradient descent on the union: the sample-weighted
   mean of the clients' steps is the step on the mean loss, whatever the
   clients' sizes and labels (an unweighted mean fails this).
"""

import pytest
import torch
import torch.nn.functional as F

from shoal.data import build_dataset
from shoal.data.shard import fetch
from shoal.fl.config import load_fl_config
from shoal.fl.local import client_seed
from shoal.fl.simulate import simulate
from shoal.models.build import build_model
from shoal.engine.evaluate import evaluate


def _cfg(out, **fl):
    return load_fl_config({
        "seed": 3, "data": {"dataset": "digits", "batch_size": 16}, "model": "mlp:hidden=[32]",
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "fl": {"clients": 1, "clients_per_round": 1, "rounds": 1, **fl}, "out": str(out),
    })


def _centralised(cfg, steps):
    """Initial model as the federation builds it, trained by ``steps(model, x, y)``; test (loss, accuracy)."""
    data = build_dataset(cfg.data.dataset)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    x, y = fetch(data.train, list(range(len(data.train))))
    steps(model, x, y)
    return evaluate(model, data.test, batch_size=1000, device=torch.device("cpu"), rank=0, world_size=1)


def test_one_client_with_all_the_data_is_centralised_sgd(tmp_path):
    cfg = _cfg(tmp_path, local_epochs=3)
    summary = simulate(cfg, progress=False)

    def sgd(model, x, y):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        shuffle = torch.Generator().manual_seed(client_seed(cfg.seed, 1, 0))
        for _ in range(3):
            order = torch.randperm(len(y), generator=shuffle)
            for start in range(0, len(y), 16):
                batch = order[start : start + 16]
                opt.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()

    loss, acc = _centralised(cfg, sgd)
    assert summary["final_loss"] == pytest.approx(loss, rel=1e-4)
    assert summary["final_accuracy"] == pytest.approx(acc, abs=1e-9)


def test_fedavg_of_full_batch_steps_is_full_batch_gradient_descent_on_the_union(tmp_path):
    cfg = load_fl_config(_cfg(tmp_path, clients=5, clients_per_round=5, rounds=5, partition="dirichlet:alpha=0.3"),
                         ["data.batch_size=2000", "optimizer.momentum=0", "optimizer.lr=0.5"])
    summary = simulate(cfg, progress=False)

    def gd(model, x, y):
        for _ in range(5):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(p.grad, alpha=0.5)

    loss, acc = _centralised(cfg, gd)
    assert summary["final_loss"] == pytest.approx(loss, rel=1e-5)
