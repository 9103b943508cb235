"""Where a 2-stage pipeline's idle time goes: waiting on a neighbour, or elsewhere.

Runs PyTorch's 1F1B (or GPipe) schedule on two local gloo processes over
loopback, on a plain MLP cut in two equal halves, and splits each stage's
step time into compute (``forward_one_chunk`` / ``backward_one_chunk``), time
blocked in the schedule's waits for sends and receives (``_wait_batch_p2p``,
timed by wrapping PyTorch's function in these two processes only), and the
rest (posting operations, the loss, Python). The theory's bubble is
(P-1)/(M+P-1) of the step.

    python benchmarks/pipeline_bubble.py [--schedule 1f1b|gpipe] [--batch 64] [--microbatches 8]
                                         [--width 1536] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.distributed.pipelining.schedules as schedules
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe


def _worker(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    w = args.width
    layers = [m for _ in range(args.layers) for m in (nn.Linear(w, w), nn.ReLU())]
    half = len(layers) // 2
    module = nn.Sequential(*(layers[:half] if rank == 0 else layers[half:] + [nn.Linear(w, 10)]))
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    clock = {"compute": 0.0, "wait": 0.0}

    def timed(fn, key):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                clock[key] += time.perf_counter() - t
        return run

    stage.forward_one_chunk = timed(stage.forward_one_chunk, "compute")
    stage.backward_one_chunk = timed(stage.backward_one_chunk, "compute")
    schedules._wait_batch_p2p = timed(schedules._wait_batch_p2p, "wait")
    kind = Schedule1F1B if args.schedule == "1f1b" else ScheduleGPipe
    schedule = kind(stage, n_microbatches=args.microbatches, loss_fn=nn.functional.cross_entropy)
    x, y = torch.randn(args.batch, w), torch.randint(0, 10, (args.batch,))
    rows = []
    for step in range(args.steps + 3):  # 3 warm-up steps
        dist.barrier()
        clock.update(compute=0.0, wait=0.0)
        started = time.perf_counter()
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=[])
        wall = time.perf_counter() - started
        if step >= 3:
            rows.append((wall, clock["compute"], clock["wait"]))
    results[rank] = [statistics.median(col) for col in zip(*rows)]
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(args, 29_000 + os.getpid() % 1000, results), nprocs=2)
    theory = 1 / (args.microbatches + 1)
    print(f"{args.schedule}, batch {args.batch}, M={args.microbatches}, width {args.width}; "
          f"theory bubble {theory:.3f}")
    for rank in (0, 1):
        wall, compute, wait = results[rank]
        print(f"stage {rank}: step {wall * 1e3:7.1f} ms  compute {compute / wall:.3f}  "
              f"waiting on p2p {wait / wall:.3f}  other {(wall - compute - wait) / wall:.3f}  "
              f"(idle {1 - compute / wall:.3f})")


if __name__ == "__main__":
    main()
