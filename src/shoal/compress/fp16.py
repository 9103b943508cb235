"""Half-precision weights and compute with ONNX Runtime's float16 converter.

Every float32 initializer and operator becomes float16; the model's inputs
and outputs stay float32 (``keep_io_types``), so callers need not change.
Halves the file; on CPUs without native fp16 arithmetic it brings no speed.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset

from shoal.registry import QUANTIZERS


class Fp16Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


@QUANTIZERS.register("fp16", Fp16Options)
def fp16(options: Fp16Options, source: Path, target: Path, *, train: Dataset, seed: int) -> None:
    """ONNX Runtime float16 conversion: fp16 weights and compute, fp32 inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))
