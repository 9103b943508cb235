"""What a compressed model is judged by: size, non-zeros, latency, accuracy."""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from shoal.compress.onnx_export import ort_run
from shoal.data.shard import fetch


def state_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: how PyTorch ships a dense model."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(parameters, non-zero parameters)``."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return total, nonzero


def latency_ms(session, input_shape: tuple[int, ...], batch: int, *, repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of ``repeats`` timed runs on one random batch, after ``warmup`` runs."""
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    for _ in range(warmup):
        ort_run(session, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ort_run(session, x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def dataset_arrays(dataset: Dataset, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A dataset (its first ``limit`` items) as float32 inputs and int labels."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    x, y = fetch(dataset, list(range(n)))
    return x.float().numpy(), y.numpy()


def ort_accuracy(session, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1000) -> float:
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = ort_run(session, x[start:start + batch_size])
        correct += int((logits.argmax(axis=1) == y[start:start + batch_size]).sum())
    return correct / len(y)


@torch.no_grad()
def torch_outputs(model: nn.Module, x: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[s:s + batch_size])).numpy()
                           for s in range(0, len(x), batch_size)])


def op_profile(path, *, batch: int = 32, runs: int = 50, threads: int = 1) -> dict[str, float]:
    """Milliseconds per run spent in each ONNX operator type (``Conv``,
    ``QLinearConv``, ``DequantizeLinear``, ...), from ONNX Runtime's own
    profiler (``SessionOptions.enable_profiling``), over ``runs`` runs at
    ``batch`` after as many warm-up runs as the profile then drops."""
    import json
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        shape = session.get_inputs()[0].shape[1:]  # [batch, *input_shape]: the batch dimension is symbolic
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        for _ in range(2 * runs):
            ort_run(session, x)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_run: dict[str, list[float]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and "op_name" in args:
            per_run.setdefault(args["op_name"], []).append(event["dur"] / 1000)
    # Each op type appears a fixed number of times a run: keep the last ``runs`` runs' share.
    return {op: sum(times[len(times) // 2:]) / runs for op, times in sorted(per_run.items())}
