"""Post-training dynamic int8 quantisation with ONNX Runtime.

1. Weights of MatMul / Gemm / Conv become int8 once, offline (symmetric).
2. Activations are quantised at run time from each batch's own range, so no
   calibration data is needed.

On CPUs without VNNI its integer convolutions (``ConvInteger``) run slower
than fp32 (DESIGN.md: 3-6x); it suits Linear-heavy models.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from shoal.registry import QUANTIZERS


class DynamicOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    per_channel: bool = Field(False, description="one weight scale per output channel")


@QUANTIZERS.register("int8-dynamic", DynamicOptions)
def int8_dynamic(options: DynamicOptions, source: Path, target: Path, *, train: Dataset, seed: int) -> None:
    """ONNX Runtime dynamic int8: int8 weights, activations quantised per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from shoal.compress.int8_static import preprocess

    prepared = preprocess(source, target)
    try:
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=options.per_channel)
    finally:
        prepared.unlink(missing_ok=True)
