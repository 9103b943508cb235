"""Pipeline stages of a model that is not a layer sequence, cut through
``torch.export`` split points (``torch.distributed.pipelining.pipeline``).

1. Candidates: one forward on a sample records which submodules the model
   calls, in order. Starting from the model's direct children, the candidate
   with the most parameters is replaced by the submodules it calls while it
   holds more than 1/S of the model's parameters, or while there are fewer
   than S split points (S = stages). A split point is a candidate called
   exactly once that has parameters (so every stage holds some work and no
   two split points fall on the same place in the traced graph); for
   PyTorch's ``TransformerEncoder`` this gives its layers.
2. Segments: the model is traced once with a split before every split
   point; segment i runs from split point i to split point i+1 (segment 0
   from the inputs). Each segment's exported module is timed forward and
   backward on its real inputs, as :func:`shoal.parallel.profile.profile_layers`
   times layers, and its parameter and output bytes are recorded. A cut that
   that PyTorch's stages cannot run (a model input read after it, a value
   skipping a stage, a parameter's users on both sides) is not offered: its
   segments are merged.
3. Stages: the chosen cuts become ``split_spec={name: SplitPoint.BEGINNING}``
   of a second trace, whose stage modules hold the model's own Parameter and
   buffer objects, so the optimizer over ``model.parameters()`` trains them
   and the whole model stays current for evaluation (checked, not assumed).
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
from torch import fx, nn
from torch.distributed.pipelining import Pipe, SplitPoint, pipeline
from torch.utils._pytree import tree_leaves, tree_map

from shoal.metrics.probe import kept_state
from shoal.parallel.profile import LayerProfile, time_forward_backward, weight_matrices


def split_candidates(model: nn.Module, sample: torch.Tensor, stages: int) -> list[str]:
    """Names of the submodules a stage may begin at, in the order forward calls them."""
    calls: Counter[str] = Counter()
    hooks = [module.register_forward_pre_hook(lambda _m, _a, name=name: calls.update([name]))
             for name, module in model.named_modules() if name]
    try:
        with kept_state([model], sample), torch.no_grad():
            model(sample)
    finally:
        for hook in hooks:
            hook.remove()
    order = list(calls)  # first calls, in order (a Counter keeps insertion order)

    def caller(name: str) -> str:
        """The nearest called ancestor ("" for the model itself)."""
        atoms = name.split(".")
        for cut in range(len(atoms) - 1, 0, -1):
            if ".".join(atoms[:cut]) in calls:
                return ".".join(atoms[:cut])
        return ""

    parent = {name: caller(name) for name in order}

    def children(name: str) -> list[str]:
        return [child for child in order if parent[child] == name]

    def weight(name: str) -> int:
        return sum(p.numel() for p in model.get_submodule(name).parameters())

    def points() -> list[str]:
        return [name for name in frontier if calls[name] == 1 and weight(name) > 0]

    total = sum(p.numel() for p in model.parameters())
    frontier = children("")
    while True:
        expandable = [name for name in frontier if calls[name] == 1 and children(name)]
        heaviest = max(expandable, key=weight, default=None)
        if heaviest is None or (len(points()) >= stages and weight(heaviest) * stages <= total):
            break
        at = frontier.index(heaviest)
        frontier[at : at + 1] = children(heaviest)
    return points()  # profile_segments checks that, once merged, there are enough


def export_pipe(model: nn.Module, sample: torch.Tensor, starts: list[str]) -> Pipe:
    """Trace ``model`` on ``sample`` (one microbatch) into len(starts)+1
    stages, stage k+1 beginning at submodule ``starts[k]``."""
    wrapped = [model.get_submodule(name) for name in starts]
    patched = ("forward", "_orig_forward")  # what pipeline() sets on each split point's module
    own = [{key: vars(m)[key] for key in patched if key in vars(m)} for m in wrapped]
    try:
        with kept_state([model], sample):
            pipe = pipeline(model, mb_args=(sample,), split_spec={name: SplitPoint.BEGINNING for name in starts})
    except Exception as err:
        cause = err.__cause__ or err
        raise ValueError(f"pipeline: torch.export cannot trace {type(model).__name__} "
                         f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); "
                         f"models that are not an nn.Sequential must export as one graph") from err
    finally:
        # pipeline() marks the split points by wrapping the model's own submodules' forward: undo it.
        for module, saved in zip(wrapped, own):
            for key in patched:
                if key in saved:
                    vars(module)[key] = saved[key]
                else:
                    vars(module).pop(key, None)
    if pipe.num_stages != len(starts) + 1:
        raise ValueError(f"pipeline: splitting {type(model).__name__} before {', '.join(starts)} gave "
                         f"{pipe.num_stages} stages, not {len(starts) + 1}")
    return pipe


def uncuttable(pipe: Pipe) -> set[int]:
    """Stage boundaries k (between stages k-1 and k) that must stay inside one
    stage. PyTorch's stages take their inputs from the stage just before
    (the first: from the model's inputs) and own their parameters, so: no cut
    at or before a stage that reads a model input, none but the first after a
    stage whose output a later stage reads (a skip connection), none between
    two users of a parameter."""
    keep: set[int] = set()
    for node in pipe.split_gm.graph.nodes:
        if node.op != "call_module":
            continue
        reader = node.meta["stage_idx"]
        for source in node.all_input_nodes:
            while source.target is operator.getitem:  # one of a stage's several outputs
                source = source.args[0]
            if source.op == "placeholder":
                keep.update(range(1, reader + 1))
            else:
                keep.update(range(source.meta["stage_idx"] + 2, reader + 1))
    stage_of = _stage_indices(pipe.split_gm)
    for users in pipe.replicated_params:  # {stage submodule name: parameter name}, one per tied parameter
        indices = [stage_of[name] for name in users]
        keep.update(range(min(indices) + 1, max(indices) + 1))
    return keep


def profile_segments(model: nn.Module, sample: torch.Tensor, stages: int,
                     repeats: int = 5) -> tuple[list[str], list[LayerProfile]]:
    """The split points for ``stages`` stages that can be cut at, and one profile
    per segment between them; too few of them is an error."""
    points = split_candidates(model, sample, stages)
    pipe = export_pipe(model, sample, points[1:])
    timer = _SegmentTimer(pipe.split_gm, repeats)
    try:
        with kept_state([model], sample):
            timer.run(sample)
    finally:
        model.zero_grad(set_to_none=True)
    keep = uncuttable(pipe)
    names: list[str] = []
    profiles: list[LayerProfile] = []
    for index, name in enumerate(points):
        time_s, param_bytes, activation_bytes, matrices = timer.measured[index]
        if index in keep:  # merged into the segment before
            last = profiles[-1]
            last.time_s += time_s
            last.param_bytes += param_bytes
            last.activation_bytes = activation_bytes
            last.matrices += matrices
            continue
        names.append(name)
        profiles.append(LayerProfile(index=len(profiles), kind=type(model.get_submodule(name)).__name__,
                                     time_s=time_s, param_bytes=param_bytes, activation_bytes=activation_bytes,
                                     matrices=matrices))
    if len(names) < stages:
        raise ValueError(f"pipeline: {stages} stages but {type(model).__name__} splits into at most {len(names)} "
                         f"(a stage begins at a submodule with parameters that forward calls once, at a cut "
                         f"PyTorch's stages can run: {', '.join(names) or 'none'})")
    return names, profiles


def stage_tensors(model: nn.Module, stage_module: nn.Module) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """The model's own parameters and buffers that one exported stage holds."""
    own = {id(t) for t in [*model.parameters(), *model.buffers()]}
    params, buffers = dict(stage_module.named_parameters()), dict(stage_module.named_buffers())
    for kind, held in (("parameter", params), ("buffer", buffers)):
        for name, tensor in held.items():
            if id(tensor) not in own:
                raise ValueError(f"pipeline: the exported stage's {kind} {name} ({tuple(tensor.shape)}) is not "
                                 f"one of {type(model).__name__}'s own tensors; training the stage would not "
                                 f"update the model")
    return list(params.values()), list(buffers.values())


class _SegmentTimer(fx.Interpreter):
    """Runs a split graph segment by segment, timing each one's forward and
    backward on detached copies of its real inputs (:func:`time_forward_backward`)."""

    def __init__(self, split_gm: fx.GraphModule, repeats: int):
        super().__init__(split_gm)
        self.repeats = repeats
        self.stage_of = _stage_indices(split_gm)
        # stage: (seconds, parameter bytes, output bytes, weight matrices)
        self.measured: dict[int, tuple[float, int, int, tuple[tuple[int, int], ...]]] = {}

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        segment = self.fetch_attr(target)
        time_s, out = time_forward_backward(lambda *inputs: segment(*inputs, **kwargs), args, self.repeats)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.measured[self.stage_of[target]] = (
            time_s,
            sum(p.numel() * p.element_size() for p in segment.parameters()),
            sum(t.numel() * t.element_size() for t in outputs),
            weight_matrices(segment.parameters()),
        )
        return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out)


def _stage_indices(split_gm: fx.GraphModule) -> dict[str, int]:
    """Each stage module's name in the split graph: its stage index (numbered by PyTorch's Pipe)."""
    return {node.target: node.meta["stage_idx"] for node in split_gm.graph.nodes if node.op == "call_module"}
