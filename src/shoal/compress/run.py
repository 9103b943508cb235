"""``shoal compress``: prune, store sparse, export, quantise, and measure each
result beside the uncompressed model.

1. Load the run's trained model (config + checkpoint) and its test set.
2. Baseline: export it to ONNX, time it in ONNX Runtime at batch 1 and 32,
   score it on the test set.
3. Apply each ``--prune`` spec in order; with ``--finetune STEPS`` train the
   pruned model on through ``shoal train``, masks fixed; save the sparse
   artefact and load it back: the restored model is what is exported and
   measured, so the numbers describe what ships.
4. Each ``--quantize`` spec turns that ONNX file into another, measured
   the same way; ``qat-int8`` first trains the restored PyTorch model with
   fake quantisation (:mod:`shoal.compress.qat`), and its row is compared
   with that fake-quantised model.
5. Write ``report.json``; the CLI prints it as a table.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from shoal.compress.base import CompressError
from shoal.compress.finetune import finetune
from shoal.compress.load import checkpoint_path, load_trained
from shoal.compress.measure import dataset_arrays, latency_ms, parameter_counts, state_bytes, torch_outputs
from shoal.compress.onnx_export import export_onnx, ort_run, ort_session
from shoal.config import ConfigError, RunConfig, format_error, load_config
from shoal.models.artefact import load_artefact
from shoal.models.artefact_file import ArtefactOptions, save_artefact
from shoal.registry import PRUNERS, QUANTIZERS, Component, load_builtins, parse_spec

REPORT = "report.json"
ARTEFACT = "model.shoal"
BASELINE_ONNX = "baseline.onnx"
MODEL_ONNX = "model.onnx"


class Row(BaseModel):
    """One model as measured. ``max_abs_diff``: ONNX Runtime's logits against
    the PyTorch model it was made from, over the test set."""

    name: str  # uncompressed, compressed, or the quantizer's name
    kind: Literal["baseline", "compressed", "quantized"]
    spec: str  # every step that made it, with all options: "magnitude:sparsity=0.9,scope=global | sparse:..."
    artefact: str
    artefact_bytes: int
    onnx: str
    onnx_bytes: int
    parameters: int
    nonzero_parameters: int
    latency_ms_batch1: float
    latency_ms_batch32: float
    accuracy: float
    torch_accuracy: float | None
    max_abs_diff: float


class CompressReport(BaseModel):
    out: str
    checkpoint: str
    model: str
    dataset: str
    prune: list[str]
    quantize: list[str]
    artefact: str
    artefact_max_abs_diff: float  # restored from the artefact vs the pruned model in memory
    threads: int
    repeats: int
    test_samples: int
    versions: dict[str, str]
    rows: list[Row]
    finetune: dict[str, Any] | None = None  # steps, workers, strategy, schedule, sparsity, accuracy, run


def parse_options(prune: list[Any], quantize: list[Any], artefact: Any) -> tuple[
        list[Component], list[Component], ArtefactOptions]:
    """Validate every spec before any work; :class:`CompressError` names the bad one."""
    load_builtins(PRUNERS, QUANTIZERS)
    try:
        prunes = [PRUNERS.resolve(spec) for spec in prune]
        quants = [QUANTIZERS.resolve(spec) for spec in quantize]
    except ValueError as err:
        raise CompressError(str(err)) from None
    name, options = parse_spec(artefact) if artefact else ("sparse", {})
    if name != "sparse":
        raise CompressError(f"unknown artefact {name!r}; allowed: sparse")
    try:
        return prunes, quants, ArtefactOptions(**options)
    except ValidationError as err:
        raise CompressError(f"artefact 'sparse': {format_error(err)}") from None


def compress(
    config: RunConfig | dict[str, Any] | str | Path,
    *,
    checkpoint: str | Path,
    prune: str | list[str] | tuple[str, ...] = (),
    quantize: str | list[str] | tuple[str, ...] = (),
    artefact: str | dict[str, Any] | None = None,
    export: str = "onnx",
    out: str | Path = "runs/compress",
    overrides: list[str] | tuple[str, ...] = (),
    threads: int = 1,
    repeats: int = 50,
    finetune_steps: int = 0,
    log=None,
) -> CompressReport:
    """Compress a trained model as ``shoal compress`` does and return the report.

    ``config`` is the run's config (path, mapping or :class:`RunConfig`),
    ``checkpoint`` its ``shoal train --out`` directory. ``prune`` and
    ``quantize`` are spec strings (or lists of them, applied / measured in
    order); ``artefact`` is ``sparse:values=int8,scale=channel``;
    ``finetune_steps`` > 0 trains the pruned model that many steps through
    ``shoal train`` (the config's strategy and workers), masks held fixed
    (:mod:`shoal.compress.finetune`). Raises
    :class:`CompressError` (a :class:`ValueError`) or
    :class:`shoal.ConfigError` for bad input, before any work.
    """
    prune = [prune] if isinstance(prune, str) else list(prune)
    quantize = [quantize] if isinstance(quantize, str) else list(quantize)
    if export != "onnx":
        raise CompressError(f"unknown export format {export!r}; allowed: onnx")
    if threads < 1 or repeats < 1:
        raise CompressError("threads and repeats must be >= 1")
    if finetune_steps < 0:
        raise CompressError(f"--finetune {finetune_steps}: steps must be >= 0")
    cfg = load_config(config, overrides)
    prunes, quants, store = parse_options(prune, quantize, artefact)
    if not finetune_steps and any(getattr(c.options, "schedule", None) == "gradual" for c in prunes):
        raise CompressError("schedule=gradual prunes while fine-tuning: give --finetune STEPS")
    ckpt = checkpoint_path(checkpoint)
    say = log or (lambda line: None)
    model, data = load_trained(cfg, ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(data.input_shape)
    x, y = dataset_arrays(data.test)

    def measure(name: str, kind: str, spec: str, onnx_name: str, reference: np.ndarray, *, artefact_name: str,
                artefact_bytes: int, counts: tuple[int, int], torch_accuracy: float | None) -> Row:
        say(f"measuring {name}")
        session = ort_session(out / onnx_name, threads=threads)
        logits = np.concatenate([ort_run(session, x[s:s + 1000]) for s in range(0, len(x), 1000)])
        return Row(
            name=name, kind=kind, spec=spec, artefact=artefact_name, artefact_bytes=artefact_bytes, onnx=onnx_name,
            onnx_bytes=(out / onnx_name).stat().st_size, parameters=counts[0], nonzero_parameters=counts[1],
            latency_ms_batch1=latency_ms(session, shape, 1, repeats=repeats),
            latency_ms_batch32=latency_ms(session, shape, 32, repeats=repeats),
            accuracy=float((logits.argmax(axis=1) == y).mean()), torch_accuracy=torch_accuracy,
            max_abs_diff=float(np.abs(logits - reference).max()),
        )

    def accuracy(logits: np.ndarray) -> float:
        return float((logits.argmax(axis=1) == y).mean())

    say(f"exporting the uncompressed model to {out / BASELINE_ONNX}")
    export_onnx(model, shape, out / BASELINE_ONNX)
    base_logits = torch_outputs(model, x)
    rows = [measure("uncompressed", "baseline", "fp32", BASELINE_ONNX, base_logits, artefact_name="state_dict (torch.save)",
                    artefact_bytes=state_bytes(model), counts=parameter_counts(model),
                    torch_accuracy=accuracy(base_logits))]

    pruned = copy.deepcopy(model)
    example = torch.from_numpy(x[:2]).clone()
    gradual = None
    for component in prunes:
        say(f"pruning: {full_spec(component)}")
        pruned = component.target(component.options, pruned, example).model
        if getattr(component.options, "schedule", None) == "gradual":
            gradual = component.options.sparsity  # reached while fine-tuning
    tuned = None
    if finetune_steps:
        pruned, tuned = finetune(cfg, pruned, steps=finetune_steps, out=out, input_shape=shape,
                                 num_classes=data.num_classes, gradual=gradual, log=say)
    size = save_artefact(out / ARTEFACT, pruned, model_spec=cfg.model.to_config(), input_shape=shape,
                         num_classes=data.num_classes, options=store)
    restored = load_artefact(out / ARTEFACT, model=cfg.model.to_config())  # the architecture it was written from
    logits = torch_outputs(restored, x)
    round_trip = float(np.abs(logits - torch_outputs(pruned, x)).max())
    export_onnx(restored, shape, out / MODEL_ONNX)
    spec = " | ".join([*(full_spec(c) for c in prunes), artefact_spec(store)])
    compressed = measure("compressed", "compressed", spec, MODEL_ONNX, logits, artefact_name=ARTEFACT, artefact_bytes=size,
                         counts=parameter_counts(restored), torch_accuracy=accuracy(logits))
    rows.append(compressed)

    for component in quants:
        target = f"model.{component.name}.onnx"
        say(f"quantizing: {full_spec(component)}")
        reference, torch_accuracy = logits, None
        if getattr(component.target, "trains", False):  # QAT: trains the PyTorch model, returns it fake-quantised
            trained = component.target(component.options, out / MODEL_ONNX, out / target, train=data.train,
                                       seed=cfg.seed, model=restored, input_shape=shape, log=say)
            reference = torch_outputs(trained, x)
            torch_accuracy = accuracy(reference)
        else:
            component.target(component.options, out / MODEL_ONNX, out / target, train=data.train, seed=cfg.seed)
        rows.append(measure(component.name, "quantized", f"{spec} | {full_spec(component)}", target, reference,
                            artefact_name=target, artefact_bytes=(out / target).stat().st_size,
                            counts=(compressed.parameters, compressed.nonzero_parameters),
                            torch_accuracy=torch_accuracy))

    report = CompressReport(
        out=str(out), checkpoint=str(ckpt), model=cfg.model.spec(), dataset=cfg.data.dataset.spec(),
        prune=[full_spec(c) for c in prunes], quantize=[full_spec(c) for c in quants], artefact=artefact_spec(store),
        artefact_max_abs_diff=round_trip, threads=threads, repeats=repeats, test_samples=len(y), finetune=tuned,
        versions=_versions(), rows=rows,
    )
    from shoal.metrics.summary import write_json_atomic

    write_json_atomic(out / REPORT, report.model_dump())
    return report


def full_spec(component: Component) -> str:
    """The spec with every option, defaults included: ``magnitude:sparsity=0.9,scope=global``."""
    options = component.option_dict()
    return component.name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def artefact_spec(options: ArtefactOptions) -> str:
    return "sparse:" + ",".join(f"{k}={v}" for k, v in options.model_dump().items())


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


__all__ = ["compress", "CompressReport", "Row", "CompressError", "ConfigError", "REPORT", "ARTEFACT"]
