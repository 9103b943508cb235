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

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from shoal.registry import MODELS


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
    from shoal.compress.artefact import load_artefact

    # One read: the artefact is decompressed once, in every worker.
    return load_artefact(options.path, input_shape=input_shape, num_classes=num_classes, model=options.model).train()
