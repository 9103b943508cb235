"""Fine-tuning a pruned model through ``shoal train``, masks held fixed.

Pruning costs accuracy that a few hundred steps of training win back (Han et
al. 2015 prune, retrain, repeat). ``shoal compress --finetune STEPS``:

1. stores the pruned model as an fp32 artefact (``pruned.shoal``): channel
   pruning's smaller layers and magnitude pruning's zeros;
2. runs ``shoal train`` on the run's own config (its strategy, workers,
   optimizer and schedule) with ``model: artefact:path=pruned.shoal`` and,
   where weights were zeroed, ``prune:`` at the share of zeros, one-shot
   at step 0, so the same weights stay zero (they are the smallest) and
   only the kept ones' gradients travel; ``magnitude:...,schedule=gradual``
   instead starts dense and reaches its sparsity along Zhu & Gupta's cubic
   schedule over the first 3/4 of the steps;
3. loads the fine-tuned weights back for the rest of ``shoal compress``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.config import RunConfig
from shoal.engine.checkpoint import load_weights
from shoal.engine.sparsity import prunable_weights
from shoal.models.artefact_file import ArtefactOptions, save_artefact

PRUNED = "pruned.shoal"
RUN_DIR = "finetune"


def zero_share(model: nn.Module) -> float:
    """The share of the prunable weights that are exactly zero."""
    weights = prunable_weights(model)
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))


def finetune(cfg: RunConfig, model: nn.Module, *, steps: int, out: Path, input_shape: tuple[int, ...],
             num_classes: int, gradual: float | None = None, log=None) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` (pruned) ``steps`` more steps under ``cfg``; returns it
    fine-tuned and what the run reported. ``gradual``: the sparsity to reach
    along the cubic schedule (the model comes in dense)."""
    import shoal

    say = log or (lambda line: None)
    artefact = (out / PRUNED).resolve()
    save_artefact(artefact, model, model_spec=cfg.model.to_config(), input_shape=input_shape,
                  num_classes=num_classes, options=ArtefactOptions(values="fp32", codec="zlib"))
    sparsity = gradual if gradual is not None else zero_share(model)
    prune = None
    if gradual is not None:
        prune = {"sparsity": gradual, "schedule": "gradual", "every": max(1, steps // 40)}
    elif sparsity > 0:
        prune = {"sparsity": sparsity, "schedule": "oneshot"}
    run = cfg.model_dump(mode="json")
    run.update(model={"name": "artefact", "path": str(artefact), "model": cfg.model.to_config()}, prune=prune,
               out=str(out / RUN_DIR))
    # A fixed number of steps: no target, early stopping or best.pt from the original run's config.
    run["train"].update(steps=steps, epochs=None, eval_every=steps, target=None, target_accuracy=None,
                        stop_at_target=False, keep_best=False, early_stopping=None, checkpoint_every=0, init_from=None)
    say(f"fine-tuning {steps} steps on {run['workers']} worker(s), strategy {cfg.strategy.spec()}"
        + (f", {prune['schedule']} pruning to {prune['sparsity']:.3f}" if prune else ""))
    summary = shoal.train(run)
    tuned = model
    with torch.no_grad():
        load_weights(tuned, out / RUN_DIR)
    report = {
        "steps": steps, "workers": summary.workers, "strategy": summary.strategy, "run": str(out / RUN_DIR),
        "schedule": prune["schedule"] if prune else None, "sparsity": getattr(summary, "sparsity", None),
        "accuracy": summary.final_accuracy, "wire_bytes_per_worker": summary.wire_bytes_per_worker,
        "dense_bytes_per_worker": summary.dense_bytes_per_worker,
    }
    return tuned, report
