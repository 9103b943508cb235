"""Post-training static int8 quantisation with ONNX Runtime (QDQ format).

1. Pre-process: symbolic shape inference and graph optimisation
   (``quant_pre_process``), which fuses what would otherwise be quantised
   separately.
2. Calibrate: run ``batches`` batches of training data through the model and
   record each activation's range (min/max).
3. Insert QuantizeLinear / DequantizeLinear pairs: int8 weights with one scale
   per output channel, int8 activations with calibrated scales. ONNX Runtime
   fuses each QDQ pattern into an integer kernel (QLinearConv, ...).

On this machine type (AVX2, no VNNI) this is the int8 path that pays
(DESIGN.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from shoal.registry import QUANTIZERS


class StaticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batches: int = Field(8, ge=1, le=1000, description="calibration batches drawn from the training data")
    batch_size: int = Field(32, ge=1, description="samples per calibration batch")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="calibration of activation ranges")


def calibration_batches(dataset: Dataset, *, batches: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """``batches`` float32 input batches of a seeded random sample of ``dataset`` (fewer if it is small)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    out = []
    for b in range(batches):
        idx = order[b * batch_size:(b + 1) * batch_size].tolist()
        if not idx:
            break
        out.append(torch.stack([torch.as_tensor(dataset[i][0]) for i in idx]).float().numpy())
    return out


def preprocess(source: Path, target: Path) -> Path:
    """``quant_pre_process`` into a file beside ``target``; returns its path."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(target.stem + ".pre.onnx")
    quant_pre_process(str(source), str(prepared))
    return prepared


@QUANTIZERS.register("int8-static", StaticOptions)
def int8_static(options: StaticOptions, source: Path, target: Path, *, train: Dataset, seed: int) -> None:
    """ONNX Runtime static int8, QDQ, per-channel weights, activations calibrated on training batches."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from shoal.compress.onnx_export import INPUT

    batches = calibration_batches(train, batches=options.batches, batch_size=options.batch_size, seed=seed)

    class Reader:
        def __init__(self) -> None:
            self.items = iter([{INPUT: x} for x in batches])

        def get_next(self):
            return next(self.items, None)

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.method]
    prepared = preprocess(source, target)
    try:
        quantize_static(
            str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
        )
    finally:
        prepared.unlink(missing_ok=True)
