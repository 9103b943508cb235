"""``shoal compress``: prune, quantise and export a trained model, or search for one within a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from shoal.cli.common import fail, log_to, wide_console
from shoal.config import ConfigError


def compress_command(
    config: Optional[Path] = typer.Argument(None, help="the run's YAML config (default: the config.yaml "
                                            "'shoal train' saved in the --checkpoint directory)"),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="the 'shoal train --out' directory (or its checkpoint.pt)"),
    prune: list[str] = typer.Option(
        [], "--prune", "-p", help="pruning spec, applied in order (repeatable): magnitude:sparsity=0.9 "
        "(unstructured, global), channels:ratio=0.5 (removes channels / neurons)"),
    quantize: list[str] = typer.Option(
        [], "--quantize", "-q", help="ONNX Runtime quantisation of the compressed model, each measured as its own "
        "row (repeatable): int8-dynamic, int8-static (QDQ, per-channel, calibrated on training data), fp16, "
        "qat-int8:steps=300 (quantisation-aware training with torchao, then static QDQ int8)"),
    artefact: str = typer.Option(
        "sparse", help="the compact artefact: sparse:values=fp32|int8,scale=channel|tensor,codec=lzma|zlib"),
    export: str = typer.Option("onnx", help="export format (onnx)"),
    out: Path = typer.Option(Path("runs/compress"), "--out", "-o", help="writes model.shoal, *.onnx, report.json"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key (repeatable)"),
    threads: int = typer.Option(1, help="ONNX Runtime intra-op threads for the latency runs"),
    repeats: int = typer.Option(50, help="timed runs per latency (median reported)"),
    finetune: int = typer.Option(0, "--finetune", help="after pruning, train this many steps through shoal train "
                                 "(the config's strategy and workers), pruned weights held at zero"),
    target_size_kb: Optional[float] = typer.Option(
        None, "--target-size-kb", help="budget: search pruning and quantisation for the most accurate model whose "
        "shipped file (sparse artefact or int8 ONNX) is at most this many KB (1 KB = 1000 bytes)"),
    target_latency_ms: Optional[float] = typer.Option(
        None, "--target-latency-ms", help="budget: the most accurate model whose ONNX Runtime latency at batch 32 "
        "(median, --threads) is at most this many ms; with --target-size-kb both must hold. Exit code 2 when "
        "no candidate does"),
) -> None:
    """Prune and quantise a trained model, export it to ONNX, and measure it beside the uncompressed model.

    Prints and writes OUT/report.json: artefact bytes, non-zero parameters, ONNX Runtime latency at
    batch 1 and 32, test accuracy (run in ONNX Runtime) and the largest difference from PyTorch's
    logits, for the uncompressed model, the compressed one (restored from its artefact) and each
    quantisation. `shoal list` shows every pruner and quantizer with its options.

    With --target-size-kb and / or --target-latency-ms it searches instead of taking --prune and
    --quantize: magnitude sparsities, channel ratios, int8 artefact values and static int8, each
    candidate measured; it prints and writes OUT/budget.json with every candidate tried and the
    most accurate one within the budgets, or exits 2 naming the budget and the closest candidate.
    """
    from shoal.compress import CompressError, compress
    from shoal.compress.report import print_report

    config = config or _run_config(checkpoint)
    console = wide_console(120)  # the report's table is ~110 columns wide
    if target_size_kb is not None or target_latency_ms is not None:
        if prune or quantize:
            fail("--target-size-kb / --target-latency-ms search pruning and quantisation themselves: leave out "
                 "--prune and --quantize", "compress error")
        _compress_to_budget(config, checkpoint, out, set_, threads, repeats, finetune, target_size_kb,
                            target_latency_ms, console)
        return
    try:
        report = compress(config, checkpoint=checkpoint, prune=prune, quantize=quantize, artefact=artefact,
                          export=export, out=out, overrides=set_, threads=threads, repeats=repeats,
                          finetune_steps=finetune, log=log_to(console))
    except ConfigError as err:
        fail(str(err))
    except CompressError as err:
        fail(str(err), "compress error")
    print_report(report, console)


def _run_config(checkpoint: Path) -> Path:
    """The config a run directory holds (``shoal train`` saves it there), for a command given none."""
    run = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if not (run / "config.yaml").is_file():
        fail(f"no CONFIG given and no config.yaml in {run}: give the run's config as CONFIG")
    return run / "config.yaml"


def _compress_to_budget(config: Path, checkpoint: Path, out: Path, overrides: list[str], threads: int, repeats: int,
                        finetune: int, target_size_kb: Optional[float], target_latency_ms: Optional[float],
                        console: Console) -> None:
    from shoal.compress import CompressError
    from shoal.compress.budget import BudgetError, search
    from shoal.compress.report import print_budget

    try:
        report = search(config, checkpoint=checkpoint, target_size_kb=target_size_kb,
                        target_latency_ms=target_latency_ms, out=out, overrides=overrides, threads=threads,
                        repeats=repeats, finetune_steps=finetune, log=log_to(console))
    except ConfigError as err:
        fail(str(err))
    except BudgetError as err:
        fail(str(err), "budget not met")
    except CompressError as err:
        fail(str(err), "compress error")
    print_budget(report, console)
