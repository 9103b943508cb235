"""The header of a sparse artefact, checked before any byte after it is read.

An artefact is a file users hand around (to edge devices, between teams), so
its header is hostile until checked: every field typed and bounded, every
tensor record consistent with itself, and the model it names either one of
shoal's registered models or, for a ``package.module:function`` model, one the
caller names from its own config (importing a name a file chose would run
code the file chose).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_DIMS = 8
MAX_ELEMENTS = 1 << 31
MAX_TENSORS = 100_000
MAX_SPEC_CHARS = 4096
MAX_HEADER_BYTES = 64 << 20
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TensorRecord(_Strict):
    name: str = Field(..., min_length=1, max_length=512)
    shape: list[int] = Field(..., max_length=MAX_DIMS)
    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    coding: Literal["raw", "mask", "dense"]
    values: Literal["fp32", "int8"] | None = None
    nnz: int | None = None
    scales: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "TensorRecord":
        if any(d < 0 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: negative dimension in {self.shape}")
        numel = math.prod(self.shape)
        if numel > MAX_ELEMENTS:
            raise ValueError(f"tensor {self.name!r}: {numel} elements, at most {MAX_ELEMENTS}")
        if self.coding == "raw":
            return self
        if self.dtype != "float32" or self.values is None:
            raise ValueError(f"tensor {self.name!r}: coding {self.coding} is for float32 values with 'values' set")
        if self.nnz is None or not 0 <= self.nnz <= numel:
            raise ValueError(f"tensor {self.name!r}: nnz must be in [0, {numel}]")
        if self.values == "int8" and (self.scales is None or self.scales < 1 or numel % self.scales):
            raise ValueError(f"tensor {self.name!r}: int8 values need a number of scales that divides {numel}")
        return self


class ArtefactHeader(_Strict):
    model: str | dict[str, Any]
    input_shape: list[int] = Field(..., min_length=1, max_length=MAX_DIMS)
    num_classes: int = Field(..., ge=1, le=1 << 20)
    values: Literal["fp32", "int8"]
    scale: Literal["channel", "tensor"]
    codec: Literal["lzma", "zlib"]
    tensors: list[TensorRecord] = Field(..., max_length=MAX_TENSORS)

    @field_validator("model")
    @classmethod
    def _bounded(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if len(json.dumps(value)) > MAX_SPEC_CHARS:
            raise ValueError(f"model spec longer than {MAX_SPEC_CHARS} characters")
        return value

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(not 1 <= d <= 1 << 20 for d in value):
            raise ValueError(f"input_shape {value}: every dimension must be in [1, {1 << 20}]")
        return value


def parse_header(raw: bytes) -> ArtefactHeader:
    """The checked header; ``ValueError`` naming the first bad field."""
    try:
        return ArtefactHeader.model_validate(json.loads(raw))
    except json.JSONDecodeError as err:
        raise ValueError(f"header is not JSON ({err})") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"header field {where}: {first['msg']}") from None
