"""The cost model of a whole model: each piece a pipeline can cut it into,
profiled and fitted (:class:`shoal.parallel.plan.LayerCost`).

Profiling (:mod:`shoal.parallel.profile`) times pieces, the split points
(:mod:`shoal.parallel.split_points`) cut a model that is not a layer sequence,
and the plan's model (:mod:`shoal.parallel.plan`) fits what they measured;
this module puts the three together, so none of them needs another's.
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.parallel.plan import LayerCost, fit_layer
from shoal.parallel.profile import profile_layers, sequential_layers
from shoal.parallel.split_points import profile_segments


def model_costs(model: nn.Module, inputs: torch.Tensor, max_stages: int, repeats: int = 5,
                update_s_per_param: float = 0.0) -> tuple[list, list[str]]:
    """The cost model (:class:`shoal.parallel.plan.LayerCost`) of each piece a
    pipeline can cut ``model`` into, and the pieces' names.

    An ``nn.Sequential`` is cut between its layers; any other model at the
    ``torch.export`` split points the pipeline strategy would take for
    ``max_stages`` stages (:func:`shoal.parallel.split_points.profile_segments`).
    Each piece is profiled at two batch sizes, ``inputs`` and its first
    eighth, and its time fitted as fixed + per sample; the optimizer's step
    costs ``update_s_per_param`` per parameter.
    """
    large = len(inputs)
    small = max(1, large // 8)
    if small == large:
        raise ValueError("profiling needs a batch of at least 2 samples")
    if isinstance(model, nn.Sequential):
        layers = sequential_layers(model)
        names = [f"{index}:{type(layer).__name__}" for index, layer in enumerate(layers)]
        big, little = profile_layers(layers, inputs, repeats), profile_layers(layers, inputs[:small], repeats)
    else:
        names, big = profile_segments(model, inputs, max_stages, repeats)
        small_names, little = profile_segments(model, inputs[:small], max_stages, repeats)
        if small_names != names:  # the cuts come from the graph, not the batch: a change is a bug
            raise RuntimeError(f"split points differ between batch {large} ({names}) and {small} ({small_names})")
    costs = []
    for p_big, p_small in zip(big, little):
        fixed, per_sample = fit_layer(p_small.time_s, small, p_big.time_s, large)
        costs.append(LayerCost(fixed_s=fixed, per_sample_s=per_sample, param_bytes=p_big.param_bytes,
                               activation_bytes_per_sample=p_big.activation_bytes / large,
                               matrices=p_big.matrices, update_s=update_s_per_param * p_big.param_bytes / 4))
    return costs, names
