"""The baseline of ``shoal bench privacy``: a plain Opacus DP-SGD loop on a shoal run's own work.

``python -m shoal.bench.opacus_loop CONFIG --epsilon E --out DIR`` trains the model of the shoal
config CONFIG (same builder, same seed, so the same initial weights), on the same training set,
with the same optimiser, schedule, clip and number of steps, and with the global batch shoal's
workers draw together (``data.batch_size`` x ``workers``) as Opacus's expected Poisson batch, in one
process with ``workers`` threads. Opacus calibrates its own noise multiplier for ``E`` with its
default accountant (PRV); the summary also gives the PLD epsilon shoal's accountant finds for that
noise, so the two rows are compared at an epsilon both agree on.

Opacus is an optional bench extra (``pip install opacus``), never a dependency of shoal.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def train_opacus(cfg: Any, target_epsilon: float, *, clip: float, delta: float) -> dict[str, Any]:
    """One Opacus run of ``cfg``'s work at ``target_epsilon``; its summary figures."""
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    from shoal.data import build_dataset
    from shoal.engine.evaluate import evaluate_task
    from shoal.engine.optim import build_optimizer, build_scheduler
    from shoal.models import build_model
    from shoal.privacy.accountant import epsilon
    from shoal.tasks.base import build_task

    torch.set_num_threads(cfg.workers)
    data = build_dataset(cfg.data.dataset)
    task = build_task(cfg.task)
    torch.manual_seed(cfg.seed)  # the initial weights shoal's workers start from
    model = build_model(cfg.model, data)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    steps, batch = cfg.train.steps, cfg.data.batch_size * cfg.workers
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    sample_rate = 1 / len(loader)  # what Opacus's Poisson loader draws at
    sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                 steps=steps, accountant="prv")
    engine = PrivacyEngine(accountant="prv")
    with warnings.catch_warnings():  # Opacus warns that secure_mode is off (shoal's default noise is OS entropy)
        warnings.simplefilter("ignore")
        model, private_optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
            poisson_sampling=True)
    scheduler = build_scheduler(cfg.schedule, optimizer, steps)
    model.train()
    # Opacus's hooks warn on every backward that the input needs no gradient (it never does here).
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    done, samples, started = 0, 0, time.perf_counter()
    while done < steps:
        for x, y in loader:
            private_optimizer.zero_grad(set_to_none=True)
            task.loss(model(x), y).backward()
            private_optimizer.step()
            scheduler.step()
            done, samples = done + 1, samples + len(y)
            if done == steps:
                break
    train_s = time.perf_counter() - started
    metrics = evaluate_task(model, data.test, task, batch_size=cfg.data.eval_batch_size,
                            device=torch.device("cpu"), rank=0, world_size=1)
    return {
        "final_accuracy": metrics.get("accuracy"), "final_loss": metrics["loss"], "steps": steps,
        "train_time_s": train_s, "samples_per_s": samples / train_s, "noise_multiplier": sigma,
        "sampling_rate": sample_rate, "expected_batch": sample_rate * len(data.train),
        "epsilon_opacus": engine.get_epsilon(delta), "accountant_opacus": "prv",
        "epsilon": epsilon(sigma, sample_rate, steps, delta), "delta": delta, "clip": clip,
        "threads": cfg.workers,
    }


def main(argv: list[str] | None = None) -> None:
    from shoal.config import load_config
    from shoal.metrics.summary import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the shoal run config whose work to repeat")
    parser.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0, help="per-example L2 clip norm")
    parser.add_argument("--out", type=Path, required=True, help="writes summary.json there")
    args = parser.parse_args(argv)
    summary = train_opacus(load_config(args.config), args.epsilon, clip=args.clip, delta=args.delta)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "summary.json", summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
