"""What shoal's sync strategy costs over plain PyTorch DDP.

shoal's ``sync`` strategy is DDP plus a Python communication hook that meters
wire bytes and runs the codec. This measures the step time of that path
against plain DDP (its built-in C++ all-reduce, no hook) and against DDP with
PyTorch's own Python ``allreduce_hook``, on the same model, data and workers,
alternating them, and reports medians and ratios.

    .venv/bin/python benchmarks/sync_overhead.py --workers 4 --steps 200 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal.config import load_config
from shoal.data import ShardedBatches, build_dataset
from shoal.launch import free_port
from shoal.models import build_model
from shoal.strategies.base import WorkerContext
from shoal.engine.optim import build_optimizer


def worker(kind: str, config: dict, steps: int, warmup: int) -> float:
    cfg = load_config(config)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = build_dataset(cfg.data.dataset)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    batches = ShardedBatches(data.train, rank=rank, world_size=world, batch_size=cfg.data.batch_size, seed=0).iterate()
    if kind in ("ddp", "ddp-python-hook"):
        ddp = DDP(model)
        if kind == "ddp-python-hook":
            # PyTorch's own allreduce hook, in Python: separates the cost of any
            # Python hook from the cost of shoal's metering and codec.
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)

        def step(x, y):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
    else:
        ctx = WorkerContext(rank, world, rank, torch.device("cpu"), "gloo")
        strategy = cfg.strategy.target(
            model, optimizer, options=cfg.strategy.options, codec=cfg.codec, context=ctx, loss_fn=F.cross_entropy
        )

        def step(x, y):
            strategy.step(x, y)

    times = []
    for i in range(warmup + steps):
        x, y = next(batches)
        dist.barrier()
        started = time.perf_counter()
        step(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    dist.destroy_process_group()
    return statistics.median(times)


def run(kind: str, config: dict, workers: int, steps: int, warmup: int) -> float:
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=uuid.uuid4().hex[:8],
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0, local_addr="127.0.0.1",
    )
    results = elastic_launch(launch, worker)(kind, config, steps, warmup)
    return max(results.values())  # the slowest worker sets the pace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", default="examples/mnist1d.yaml")
    args = parser.parse_args()
    config = load_config(args.config).model_dump(mode="json")
    samples: dict[str, list[float]] = {"ddp": [], "ddp-python-hook": [], "shoal-sync": []}
    for _ in range(args.repeats):
        for kind in samples:
            samples[kind].append(run(kind, config, args.workers, args.steps, args.warmup))
    medians = {k: statistics.median(v) for k, v in samples.items()}
    report = {
        "workers": args.workers,
        "model": config["model"],
        "median_step_s": medians,
        "all_step_s": samples,
        "shoal_over_ddp": medians["shoal-sync"] / medians["ddp"],
        "python_hook_over_ddp": medians["ddp-python-hook"] / medians["ddp"],
        "cpu": _cpu(),
        "cores": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
