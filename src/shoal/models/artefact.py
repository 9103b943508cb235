"""A model stored by ``shoal compress`` (its sparse artefact), to train further.

``model: artefact:path=runs/compressed/pruned.shoal`` builds the artefact's
architecture (channel-pruned layers keep their smaller widths) with its
weights, so ``shoal train`` can fine-tune a compressed model with any
strategy on any number of workers; every worker reads the same file, so all
start from the same weights. The artefact's own model spec is used when it
names one of shoal's models; for a ``package.module:function`` model, name
it here (``model: {name: artefact, path: ..., model: mypkg.models:net}``):
an entry point is never imported because a file says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from shoal.data.base import DatasetBundle
from shoal.models.artefact_file import CompressError, read_artefact
from shoal.models.build import build_model
from shoal.registry import MODELS, load_builtins, parse_spec


class ArtefactModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="a shoal compress artefact (model.shoal)")
    model: str | dict[str, Any] | None = Field(
        None, description="the architecture to build (default: the artefact's, if one of shoal's models)")

    @field_validator("path")
    @classmethod
    def _exists(cls, value: str) -> str:
        if not Path(value).is_file():
            raise ValueError(f"{value}: no such artefact file")
        return value


@MODELS.register("artefact", ArtefactModelOptions)
def artefact(options: ArtefactModelOptions, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model a ``shoal compress`` artefact holds, weights included."""
    # One read: the artefact is decompressed once, in every worker.
    return load_artefact(options.path, input_shape=input_shape, num_classes=num_classes, model=options.model).train()


def load_artefact(path: str | Path, *, input_shape: tuple[int, ...] | None = None,
                  num_classes: int | None = None, model: str | dict[str, Any] | None = None) -> nn.Module:
    """Rebuild the model an artefact holds: build its architecture, resize it
    to the stored shapes, load the values.

    The architecture is the stored model spec when it names a registered
    model; a ``package.module:function`` model must come from the caller
    (``model``, from its own config), never from the file. ``input_shape`` /
    ``num_classes``: what the caller's data has; an artefact made for other
    data is a ``ValueError``."""
    header, state = read_artefact(path)
    stored = tuple(header["input_shape"]), header["num_classes"]
    if (input_shape is not None and tuple(input_shape) != stored[0]) or \
            (num_classes is not None and num_classes != stored[1]):
        raise ValueError(f"artefact {path} takes inputs {stored[0]} and {stored[1]} classes; the dataset has "
                         f"{tuple(input_shape or stored[0])} and {num_classes or stored[1]}")
    load_builtins(MODELS)
    spec = model if model is not None else header["model"]
    if model is None:
        try:
            name = parse_spec(spec)[0]
        except ValueError as err:
            raise CompressError(f"{path}: refused: its model spec does not parse ({err})") from None
        if name not in MODELS.names():
            raise CompressError(
                f"{path}: refused: its model {name!r} is not one of shoal's ({', '.join(MODELS.names())}); "
                "an entry point named by a file would import and run code the file chose. For your own "
                f"model, name it yourself: model: {{name: artefact, path: {path}, model: {name}}}")
    component = MODELS.resolve(spec)
    # build_model reads only the shapes of the data bundle.
    built = build_model(component, DatasetBundle(None, None, tuple(header["input_shape"]), header["num_classes"]))
    resize_to(built, {name: tuple(t.shape) for name, t in state.items()})
    built.load_state_dict(state)
    return built.eval()


def resize_to(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give each named parameter / buffer of ``model`` the stored shape (after
    structured pruning) and set the layers' width attributes to match."""
    for name, shape in shapes.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, leaf)
        if current is None or tuple(current.shape) == shape:
            continue
        fresh = torch.empty(shape, dtype=current.dtype)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(fresh, requires_grad=current.requires_grad)
        else:
            module._buffers[leaf] = fresh
    for module in model.modules():
        _sync_widths(module)


def _sync_widths(module: nn.Module) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        first, second = module.weight.shape[0], module.weight.shape[1] * module.groups
        module.in_channels, module.out_channels = (first, second) if module.transposed else (second, first)
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
