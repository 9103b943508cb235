"""Sparse training: global magnitude masks, held fixed or grown on a schedule.

``prune:`` in a run's config fine-tunes (or trains) with a share of the
weights forced to zero:

- The prunable weights are every weight matrix and kernel (Linear,
  convolutions, attention projections; biases and normalisation scales stay
  dense), as ``shoal compress`` prunes them. A mask keeps the
  weights of largest magnitude over all of them together (global magnitude
  pruning): a layer that matters less loses more.
- ``schedule: oneshot`` prunes to ``sparsity`` at ``begin_step``;
  ``gradual`` raises it from 0 to ``sparsity`` between ``begin_step`` and
  ``end_step`` every ``every`` steps along Zhu & Gupta's (2017) cubic
  ``s_t = s (1 - (1 - t / T)^3)``, pruning fast while the network can
  still adapt and slowly near the end.
- Between mask updates the masks are fixed: after every optimizer step the
  pruned weights are set back to zero, so momentum or weight decay cannot
  revive them.
- Rank 0 computes each mask and broadcasts it, so every worker holds the
  same one. Under ``sync`` only the surviving weights' gradients travel
  (:class:`shoal.comm.hooks.CodecHookState` ``masks``): a bucket is packed
  to its kept entries before the codec sees it.
- Every strategy takes masks (:meth:`shoal.strategies.base.Strategy.use_masks`).
  Under the parameter servers (``async_ps``, ``ssp``, ``sync:backup``) the
  servers hold the model, so they hold the masks: rank 0's worker ranks its
  replica (the servers' parameters as of its last push) and sends each shard
  its part (:meth:`Strategy.masks_changed`); a shard zeroes the pruned
  entries of every gradient it applies and of its parameters after every
  step, and the other workers hold no masks of their own (the parameters they
  pull already carry the zeros). Under ``pipeline`` a rank holds only its
  stages' weights while it trains: before ranking, every rank gets the whole
  model back (:meth:`Strategy.before_ranking`), and a weight whose storage
  is released is skipped when the masks are applied.

The masks are ``torch.nn.utils.prune`` masks in content (1 keeps, 0 prunes,
one per weight); they are applied by multiplication rather than by
re-parametrising the modules, so parameter names, DDP's buckets and
checkpoints stay those of the dense model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal.config import PruneConfig


def weight_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(qualified name, module, attribute)`` of every weight matrix or kernel:
    a module's own parameter whose name ends in ``weight`` and has two or more
    dimensions (Linear, ConvNd, attention projections). Biases and norm scales
    are left dense: they are few and pruning them buys nothing."""
    found = []
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if attr.endswith("weight") and param.dim() >= 2:
                found.append((f"{module_name}.{attr}" if module_name else attr, module, attr))
    return found


def prunable_weights(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of :func:`weight_slots`, in module order (trainable ones)."""
    weights = [getattr(module, attr) for _, module, attr in weight_slots(model)]
    return [w for w in weights if w.requires_grad]


def global_magnitude_masks(weights: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Boolean masks keeping the ``1 - sparsity`` share of all ``weights`` together
    with the largest magnitudes (exactly ``round(sparsity * n)`` pruned; among
    equal magnitudes at the threshold, which go is unspecified)."""
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    pruned = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if pruned:
        keep[torch.topk(flat, pruned, largest=False, sorted=False).indices] = False
    return [part.view_as(w) for part, w in zip(keep.split([w.numel() for w in weights]), weights)]


def cubic_sparsity(step: int, final: float, begin: int, end: int) -> float:
    """Zhu & Gupta's schedule: 0 before ``begin``, ``final`` from ``end``, cubic between."""
    if step <= begin:
        return 0.0
    if step >= end:
        return final
    return final * (1 - (1 - (step - begin) / (end - begin)) ** 3)


class SparsityController:
    """Holds a model's masks, updates them on the schedule, keeps pruned weights at zero."""

    def __init__(self, config: PruneConfig, model: nn.Module, total_steps: int, group=None, *,
                 strategy: Any = None):
        self.config = config
        self.weights = prunable_weights(model)
        if not self.weights:
            raise ValueError("prune: the model has no weight matrices or kernels to prune")
        self.end = config.end_step or max(config.begin_step + 1, (3 * total_steps) // 4)
        self.group = group
        self.masks: dict[int, torch.Tensor] = {}  # id(weight) -> bool mask
        self.version = 0  # bumped at every mask change (packed buckets are rebuilt)
        self.sparsity = 0.0
        # What the strategy asks (shoal.strategies.base.Strategy's sparse-training methods):
        # whether this worker holds the masks, what must happen before ranking, who else
        # must learn new masks.
        self.strategy = strategy
        self.follower = strategy is not None and not strategy.holds_masks()
        if strategy is not None:
            strategy.use_masks(self)

    def target(self, step: int) -> float:
        c = self.config
        if c.schedule == "oneshot":
            return c.sparsity if step >= c.begin_step else 0.0
        if step < c.begin_step or (step - c.begin_step) % c.every and step < self.end:
            return self.sparsity  # not a mask-update step: hold
        return cubic_sparsity(step, c.sparsity, c.begin_step, self.end)

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Before step ``step`` (0-based): move to the schedule's sparsity if it changed."""
        wanted = self.target(step)
        if self.follower or wanted <= self.sparsity:
            return False
        self._prune_to(wanted)
        return True

    def restore(self, sparsity: float) -> None:
        """A resumed run: the restored weights' zeros are the masks (ranking by
        magnitude again could pick other weights among equal zeros)."""
        if self.follower:
            return
        if self.strategy is not None:
            self.strategy.before_ranking()
        zeros = sum(int((w == 0).sum()) for w in self.weights)
        if zeros < round(sparsity * sum(w.numel() for w in self.weights)):
            # Fewer zeros than the masks in force had (parameter servers restored from an older
            # shard checkpoint): rank again; the zeros rank lowest, so they stay pruned.
            self._prune_to(sparsity, global_magnitude_masks(self.weights, sparsity))
        else:
            self._prune_to(sparsity, [w.detach() != 0 for w in self.weights])

    @torch.no_grad()
    def _prune_to(self, wanted: float, masks: list[torch.Tensor] | None = None) -> None:
        if masks is None:
            if self.strategy is not None:
                self.strategy.before_ranking()
            masks = global_magnitude_masks(self.weights, wanted)
        if dist.is_initialized():
            flat = torch.cat([m.reshape(-1) for m in masks]).to(torch.uint8)
            dist.broadcast(flat, src=0, group=self.group)  # one mask everywhere, ties included
            masks = [part.view_as(w).bool() for part, w in zip(flat.split([w.numel() for w in self.weights]),
                                                                  self.weights)]
        self.masks = {id(w): m for w, m in zip(self.weights, masks)}
        self.sparsity, self.version = wanted, self.version + 1
        self.apply()
        if self.strategy is not None:
            self.strategy.masks_changed(self)

    @torch.no_grad()
    def apply(self) -> None:
        """Set the pruned weights to zero (after every optimizer step); a weight
        whose storage a pipeline rank has released is left alone."""
        for w in self.weights:
            mask = self.masks.get(id(w))
            if mask is not None and w.numel() == mask.numel():
                w.mul_(mask)

    def mask_of(self, param: torch.Tensor) -> torch.Tensor | None:
        return self.masks.get(id(param))

    def flat_mask(self, params: list[torch.Tensor]) -> torch.Tensor:
        """One flat keep-mask over ``params`` in order (a parameter without a mask is kept whole)."""
        return torch.cat([self.masks[id(p)].reshape(-1) if id(p) in self.masks
                          else torch.ones(p.numel(), dtype=torch.bool, device=p.device) for p in params])

    def measured_sparsity(self) -> float:
        """The share of prunable weights that are exactly zero now."""
        zeros = sum(int((w == 0).sum()) for w in self.weights)
        return zeros / sum(w.numel() for w in self.weights)
