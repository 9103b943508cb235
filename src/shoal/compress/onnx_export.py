"""Export to ONNX, check it, and open it in ONNX Runtime.

torch 2.13's exporter is ``torch.onnx.export(..., dynamo=True)``: it traces
with ``torch.export`` and translates with onnxscript. It writes weights to a
side file unless ``external_data=False``. The batch dimension is declared
dynamic, so one file serves batch 1 and batch 32; the example batch has 2
rows because ``torch.export`` specialises a size-1 dimension to a constant.
1-D convolutions are then rewritten as 2-D ones of unit height, which ONNX
Runtime runs through its faster NCHWc kernels
(:mod:`shoal.compress.conv1d_as_2d`); the logits are the same.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT, OUTPUT = "input", "logits"


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *, conv1d_as_2d: bool = True) -> int:
    """Write ``model`` as ONNX to ``path``, run ``onnx.checker``; return the file's bytes.

    ``conv1d_as_2d=False`` keeps 1-D convolutions as the exporter writes them
    (slower in ONNX Runtime; for comparison).
    """
    import onnx

    from shoal.compress.conv1d_as_2d import conv1d_as_conv2d

    model = model.eval()
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch")
    # The exporter reports progress on stdout and warns about optional
    # torchvision ops; neither belongs in shoal's output.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, external_data=False, optimize=True,
                input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=({0: batch},), verbose=False,
            )
    finally:
        logger.setLevel(level)
    if conv1d_as_2d:
        proto = onnx.load(str(path))
        if conv1d_as_conv2d(proto):
            onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return Path(path).stat().st_size


def ort_session(path: str | Path, *, threads: int = 1):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(session, x: np.ndarray) -> np.ndarray:
    """Logits of the session's model for the float32 batch ``x`` (cast if the model takes fp16)."""
    first = session.get_inputs()[0]
    if "float16" in first.type:
        x = x.astype(np.float16)
    return np.asarray(session.run(None, {first.name: x})[0], dtype=np.float32)
