"""The ``shoal`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shoal.config import ConfigError, check_job, load_config

app = typer.Typer(
    help="shoal: distributed deep-learning training on PyTorch's distributed engine, made cheaper.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _fail_config(message: str) -> None:
    err_console.print(f"[red]config error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML run config (optional with --resume: the run's own config.yaml)"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="worker processes on this node"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key: --set train.steps=500 (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default: the config's 'out')"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this directory from its last checkpoint"),
    nnodes: int = typer.Option(1, help="nodes in the job (each runs this command)"),
    rdzv_endpoint: Optional[str] = typer.Option(None, help="HOST:PORT of the rendezvous store (multi-node)"),
    rdzv_id: Optional[str] = typer.Option(None, help="job id shared by all nodes (multi-node)"),
    is_host: Optional[bool] = typer.Option(None, "--is-host/--not-host", help="this node hosts the rendezvous store"),
    local_addr: Optional[str] = typer.Option(None, help="this node's address as the others reach it"),
    max_restarts: int = typer.Option(0, help="times the launcher may restart a failed worker group"),
    slowdown: list[str] = typer.Option(
        [], "--slowdown", help="RANK:FACTOR — make that worker's compute FACTOR times slower (repeatable)"
    ),
    kill: Optional[str] = typer.Option(
        None, "--kill", help="RANK:STEP — SIGKILL that worker after that step, first attempt only (tests recovery); "
        "RANK:STEP:server — the process serving its parameter shard (parameter-server strategies)"
    ),
) -> None:
    """Train a model on one or many workers; writes metrics.jsonl, summary.json, curves.png and checkpoint.pt to OUT."""
    if resume is not None:
        if not (resume / "checkpoint.pt").is_file():
            _fail_config(f"--resume {resume}: no checkpoint.pt there to resume from")
        config = config or resume / "config.yaml"
        out = resume
    if config is None:
        _fail_config("give a CONFIG file (or --resume DIR)")
    if nnodes > 1 and not rdzv_endpoint:
        _fail_config("--nnodes > 1 needs --rdzv-endpoint HOST:PORT")
    try:
        faults = _kill_overrides(kill) if kill else []
        cfg = load_config(config, [*set_, *_slowdown_overrides(slowdown), *faults], workers=workers,
                          out=str(out) if out else None)
        if nnodes == 1:  # nodes may run different worker counts; the workers check the real world size
            check_job(cfg, cfg.workers)
    except ConfigError as err:
        _fail_config(str(err))
    if cfg.backend == "nccl":
        from shoal.worker import nccl_shortfall

        shortfall = nccl_shortfall(cfg.workers)
        if shortfall:
            _fail_config(shortfall)
    from shoal.preload import start_worker_server

    start_worker_server()  # its imports overlap the launcher's, next
    from shoal.launch import JobFailed, launch

    try:
        summary = launch(
            cfg,
            resume=resume is not None,
            nnodes=nnodes,
            rdzv_endpoint=rdzv_endpoint,
            run_id=rdzv_id,
            is_host=is_host,
            local_addr=local_addr,
            max_restarts=max_restarts,
        )
    except JobFailed as err:
        for failure in err.failures:
            err_console.print(
                f"[red]rank {failure.rank} failed[/] (exit code {failure.exitcode}): {escape(failure.message)}",
                highlight=False,
                soft_wrap=True,
            )
            if failure.traceback:
                err_console.print(failure.traceback.rstrip(), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1)
    if summary is not None:
        print_summary(summary.model_dump())


def _slowdown_overrides(items: list[str]) -> list[str]:
    """``--slowdown 3:3.0`` -> ``--set slowdown.factors.3=3.0``."""
    overrides = []
    for item in items:
        rank, sep, factor = item.partition(":")
        if not sep or not rank.strip().isdigit():
            _fail_config(f"--slowdown {item!r}: expected RANK:FACTOR, e.g. 3:3.0")
        try:
            float(factor)
        except ValueError:
            _fail_config(f"--slowdown {item!r}: FACTOR must be a number >= 1")
        overrides.append(f"slowdown.factors.{int(rank)}={factor}")
    return overrides


def _kill_overrides(item: str) -> list[str]:
    """``--kill 1:50`` -> ``--set fault.kill_rank=1 --set fault.kill_step=50``; ``1:50:server``
    kills the process serving rank 1's parameter shard instead."""
    rank, _, rest = item.partition(":")
    step, _, target = rest.partition(":")
    if not rank.strip().isdigit() or not step.strip().isdigit() or target not in ("", "worker", "server"):
        _fail_config(f"--kill {item!r}: expected RANK:STEP or RANK:STEP:server, e.g. 1:50")
    return [f"fault.kill_rank={int(rank)}", f"fault.kill_step={int(step)}", f"fault.target={target or 'worker'}"]


def print_summary(summary: dict) -> None:
    table = Table(title=f"shoal run: {summary['out']}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    ttt = summary["time_to_target_s"]
    rows = [
        ("final test accuracy", f"{summary['final_accuracy']:.4f}"),
        ("best test accuracy", f"{summary['best_accuracy']:.4f}"),
        ("target accuracy", "-" if summary["target_accuracy"] is None else f"{summary['target_accuracy']:.4f}"),
        ("time to target", "not reached" if ttt is None else f"{ttt:.1f} s (step {summary['steps_to_target']})"),
        ("steps", str(summary["steps"])),
        ("workers", str(summary["workers"])),
        ("strategy / codec", f"{summary['strategy']} / {summary['codec']}"
         + (f" -> {summary['codec_chosen']}" if summary.get("codec_chosen") else "")),
        ("model (parameters)", f"{summary['model']} ({summary['parameters']:,})"),
        ("training time", f"{summary['train_time_s']:.1f} s"),
        ("wall time (after setup)", f"{summary['wall_time_s']:.1f} s"),
        ("throughput", f"{summary['samples_per_s']:,.0f} samples/s"),
        ("wire bytes per worker", _bytes(summary["wire_bytes_per_worker"])),
        ("fp32 all-reduce would send", _bytes(summary["dense_bytes_per_worker"])),
    ]
    if summary.get("resumed_from_step") is not None:
        rows.append(("resumed from step", str(summary["resumed_from_step"])))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


@app.command("list")
def list_components() -> None:
    """List the registered datasets, models, strategies, codecs, pruners and quantizers."""
    from shoal.registry import CODECS, DATASETS, MODELS, PRUNERS, QUANTIZERS, STRATEGIES, load_builtins

    load_builtins()
    console = Console()
    for registry in (DATASETS, MODELS, STRATEGIES, CODECS, PRUNERS, QUANTIZERS):
        table = Table(title=registry.plural, show_header=True)
        table.add_column("name", style="bold")
        table.add_column("options")
        table.add_column("what it is")
        for name, summary in registry:
            fields = registry.options_model(name).model_fields
            opts = ", ".join(f"{k}={f.default!r}" if f.default_factory is None else f"{k}=..." for k, f in fields.items())
            table.add_row(name, opts or "-", summary)
        console.print(table)


@app.command("plan")
def plan_command(
    config: Path = typer.Argument(..., help="the run's YAML config (model, data, batch size, optimizer)"),
    workers: int = typer.Option(4, "--workers", "-n", min=1, help="workers to plan for"),
    rate: str = typer.Option("10gbit", help="each worker's link, e.g. 1gbit, 100mbit"),
    latency: str = typer.Option("50us", help="per-message latency, e.g. 50us, 1ms"),
    memory: Optional[str] = typer.Option(None, help="memory per worker, e.g. 16GiB (layouts above it do not fit)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a config key (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="also write the plan as JSON here"),
) -> None:
    """Predict step time and memory of data-parallel (each codec), pipeline and hybrid layouts, and recommend one.

    Predictions come from this machine's measured per-layer forward+backward
    times (two batch sizes), parameter and activation sizes, and the
    alpha-beta model of the link. Also prints the best layout at 64, 256 and
    1024 workers on 1, 10 and 100 Gbit/s links.
    """
    from shoal.netem.costmodel import Link
    from shoal.netem.testbed import rate_bits
    from shoal.parallel.plan import parse_bytes, parse_seconds
    from shoal.parallel.planner import make_plan, print_plan

    try:
        cfg = load_config(config, set_)
        link = Link(alpha_s=parse_seconds(latency), beta_bytes_per_s=rate_bits(rate) / 8)
        cap = parse_bytes(memory) if memory else None
    except (ConfigError, ValueError) as err:
        _fail_config(str(err))
    try:
        report = make_plan(cfg, workers=workers, link=link, cap=cap)
    except ValueError as err:
        _fail_config(str(err))
    print_plan(report, Console())
    if out is not None:
        from shoal.metrics.summary import write_json_atomic

        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report)


@app.command("compress")
def compress_command(
    config: Path = typer.Argument(..., help="the run's YAML config (the one 'shoal train' ran)"),
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

    # The table is ~110 columns wide; where output is no terminal (a pipe, a
    # log file) rich would squeeze it to 80.
    console = Console() if Console().is_terminal else Console(width=120)
    if target_size_kb is not None or target_latency_ms is not None:
        if prune or quantize:
            err_console.print("[red]compress error:[/] --target-size-kb / --target-latency-ms search pruning and "
                              "quantisation themselves: leave out --prune and --quantize", highlight=False)
            raise typer.Exit(2)
        _compress_to_budget(config, checkpoint, out, set_, threads, repeats, finetune, target_size_kb,
                            target_latency_ms, console)
        return
    try:
        report = compress(config, checkpoint=checkpoint, prune=prune, quantize=quantize, artefact=artefact,
                          export=export, out=out, overrides=set_, threads=threads, repeats=repeats,
                          finetune_steps=finetune, log=lambda line: console.print(line, highlight=False, markup=False))
    except ConfigError as err:
        _fail_config(str(err))
    except CompressError as err:
        err_console.print(f"[red]compress error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    print_report(report, console)


def _compress_to_budget(config: Path, checkpoint: Path, out: Path, overrides: list[str], threads: int, repeats: int,
                        finetune: int, target_size_kb: Optional[float], target_latency_ms: Optional[float],
                        console: Console) -> None:
    from shoal.compress import CompressError
    from shoal.compress.budget import BudgetError, search

    try:
        report = search(config, checkpoint=checkpoint, target_size_kb=target_size_kb,
                        target_latency_ms=target_latency_ms, out=out, overrides=overrides, threads=threads,
                        repeats=repeats, finetune_steps=finetune,
                        log=lambda line: console.print(line, highlight=False, markup=False))
    except ConfigError as err:
        _fail_config(str(err))
    except BudgetError as err:
        err_console.print(f"[red]budget not met:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except CompressError as err:
        err_console.print(f"[red]compress error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    table = Table(title="shoal compress: candidates tried (latency: ONNX Runtime, batch 32, median)")
    for column in ("candidate", "size", "latency b=32", "accuracy", "within budget"):
        table.add_column(column, justify="left" if column == "candidate" else "right", no_wrap=True)
    for c in report.candidates:
        table.add_row(c.label, f"{c.size_bytes / 1000:,.1f} KB", f"{c.latency_ms_batch32:.3f} ms", f"{c.accuracy:.4f}",
                      "yes" if c.within else "no", style="bold" if c == report.winner else None)
    console.print(table)
    winner = report.winner
    console.print(f"winner: {winner.label} ({winner.spec}): {winner.file}; wrote {out / 'budget.json'}",
                  highlight=False, markup=False, soft_wrap=True)


bench_app = typer.Typer(help="Benchmarks; each writes DIR/bench.json and compares against its baseline in the same run.")
app.add_typer(bench_app, name="bench")


@bench_app.command("codecs")
def bench_codecs(
    numel: int = typer.Option(25_000_000, help="elements of the fp32 test tensor"),
    repeats: int = typer.Option(5, help="timed repetitions per codec (median reported)"),
    codec: list[str] = typer.Option([], "--codec", "-c", help="codec spec to time (repeatable; default: all)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write DIR/bench.json"),
) -> None:
    """Encode+decode throughput (GB/s of fp32 input) and compression of each codec; sampled vs exact top-k."""
    from shoal.bench.codecs import run

    if numel < 1000 or repeats < 1:
        _fail_config("--numel must be >= 1000 and --repeats >= 1")
    try:
        report = run(numel=numel, repeats=repeats, specs=codec or None)
    except ValueError as err:
        _fail_config(str(err))
    table = Table(title=f"codec throughput, {numel:,} fp32 elements, {report['threads']} threads")
    for column in ("codec", "encode+decode", "GB/s", "wire bytes", "compression"):
        table.add_column(column, justify="left" if column == "codec" else "right")
    for row in report["rows"]:
        table.add_row(
            row["codec"], f"{row['median_s'] * 1000:.1f} ms", f"{row['gb_per_s']:.2f}",
            _bytes(row["wire_bytes"]), f"{row['compression']:.0f}x",
        )
    console = Console()
    console.print(table)
    if report["sampled_topk_speedup"] is not None:
        console.print(f"sampled top-k (DGC) vs exact torch.topk at ratio 0.001: {report['sampled_topk_speedup']:.2f}x faster")
    if out is not None:
        from shoal.metrics.summary import write_json_atomic

        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "bench.json", report)


@bench_app.command("comm")
def bench_comm(
    workers: int = typer.Option(4, help="namespace hosts, one worker each"),
    rate: str = typer.Option("100mbit,1gbit,none", help="link rates to run, comma-separated ('none' = unshaped)"),
    out: Path = typer.Option(Path("runs/bench-comm"), "--out", "-o", help="writes bench.json, report.html, PNGs"),
    config: Path = typer.Option(Path("examples/bench_comm.yaml"), help="the training workload"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a workload key (repeatable)"),
    quick: bool = typer.Option(False, help="a reduced run (small model, 2 workers' worth of steps, 4 rows) for tests"),
    rows: Optional[str] = typer.Option(None, help="only these configurations, comma-separated labels (default: all)"),
    repeat: int = typer.Option(1, min=1, help="runs of each configuration; bench.json holds the medians"),
    timeout: float = typer.Option(1800, help="seconds before one run is killed"),
) -> None:
    """Strategies and codecs as real training runs on shaped links, against PyTorch DDP and its own hooks.

    Configurations (labels for --rows): ddp-fp32, ddp-fp16-hook, ddp-powersgd-hook (rank 2),
    ddp-powersgd-hook-r4, compute-only (no communication: the ceiling), shoal-fp16, shoal-topk-ef,
    shoal-powersgd-ef, shoal-localsgd-8-fp16, shoal-localsgd-4-powersgd, shoal-auto.

    Choosing a codec, from the medians in BENCHMARKS.md (4 hosts, 2.5 M parameters): see the README's
    "Which codec?" table.
    """
    from shoal.bench import comm, report
    from shoal.netem import check_available

    reason = check_available()
    if reason:
        err_console.print(f"[red]bench comm:[/] needs the emulated cluster: {reason}", highlight=False)
        raise typer.Exit(2)
    rates = [None if r.strip() in ("", "none") else r.strip() for r in rate.split(",")]
    overrides = [*(comm.QUICK_OVERRIDES if quick else []), *set_]
    try:
        load_config(config, overrides)
        from shoal.netem.testbed import rate_bits

        for r in rates:
            if r is not None:
                rate_bits(r)
    except (ConfigError, ValueError) as err:
        _fail_config(str(err))
    if workers < 2:
        _fail_config("--workers must be at least 2")
    selected = _select_rows(rows, comm.QUICK_ROWS if quick else comm.FULL_ROWS, [*comm.FULL_ROWS, *comm.QUICK_ROWS])
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    results = comm.run_bench(
        workers=workers, rates=rates, out=out, config=config, rows=selected, extra_overrides=overrides,
        timeout_s=timeout, repeat=repeat, log=lambda line: console.print(line, highlight=False, markup=False),
    )
    images = [*report.plot_accuracy(results, out), report.plot_bytes(results, out)]
    command = "shoal " + " ".join(sys.argv[1:])
    page = report.write_html(results, out, images, "shoal bench comm", command)
    console.print(f"wrote {out / 'bench.json'}, {page} and {len(images)} plots")
    if any(r["failed"] for r in results):
        raise typer.Exit(1)


def _select_rows(rows: Optional[str], default: list, known: list) -> list:
    """``--rows a,b``: those benchmark rows by label, or exit 2 naming the allowed labels."""
    if not rows:
        return default
    by_label = {r.label: r for r in known}
    labels = [label.strip() for label in rows.split(",") if label.strip()]
    unknown = [label for label in labels if label not in by_label]
    if unknown or not labels:
        _fail_config(f"--rows: unknown label {', '.join(unknown) or repr(rows)}; allowed: {', '.join(by_label)}")
    return [by_label[label] for label in labels]


@bench_app.command("straggler")
def bench_straggler(
    workers: int = typer.Option(4, help="worker processes on this machine"),
    slowdown: list[str] = typer.Option(["3:3.0"], help="RANK:FACTOR, repeatable; 'none' for no straggler"),
    out: Path = typer.Option(Path("runs/bench-straggler"), "--out", "-o", help="writes bench.json, report.html, PNGs"),
    config: Path = typer.Option(Path("examples/bench_straggler.yaml"), help="the training workload"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a workload key (repeatable)"),
    quick: bool = typer.Option(False, help="a reduced run (small model on digits, sync and async-ps) for tests"),
    rows: Optional[str] = typer.Option(None, help="only these configurations, comma-separated labels (default: all)"),
    repeat: int = typer.Option(1, min=1, help="runs of each configuration; bench.json holds the medians"),
    timeout: float = typer.Option(1800, help="seconds before one run is killed"),
) -> None:
    """Strategies for unequal workers (sync, backup workers, throughput balance, async PS, SSP) to a target.

    Configurations (labels for --rows): sync, sync-backup-1, sync-balance, async-ps, ssp-2, ssp-8.
    """
    from shoal.bench import report, straggler

    slow = [] if slowdown == ["none"] else slowdown
    overrides = [*(straggler.QUICK_OVERRIDES if quick else []), *set_]
    try:
        load_config(config, [*overrides, *_slowdown_overrides(slow)], workers=workers)
    except ConfigError as err:
        _fail_config(str(err))
    if workers < 2:
        _fail_config("--workers must be at least 2")
    selected = _select_rows(rows, straggler.QUICK_ROWS if quick else straggler.FULL_ROWS, straggler.FULL_ROWS)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    results = straggler.run_bench(
        workers=workers, slowdown=slow, out=out, config=config, rows=selected, overrides=overrides,
        timeout_s=timeout, repeat=repeat, log=lambda line: console.print(line, highlight=False, markup=False),
    )
    images = report.plot_accuracy(results, out, group="slowdown", title="slowdown {}")
    command = "shoal " + " ".join(sys.argv[1:])
    columns = ["label", "strategy", "slowdown", "time_to_target_s", "speedup_vs_sync", "final_accuracy",
               "accuracy_vs_sync", "samples_per_s", "throughput_vs_sync", "mean_staleness"]
    page = report.write_html(results, out, images, "shoal bench straggler", command, columns)
    console.print(f"wrote {out / 'bench.json'}, {page} and {len(images)} plots")
    if any(r["failed"] for r in results):
        raise typer.Exit(1)


@bench_app.command("fl")
def bench_fl(
    out: Path = typer.Option(Path("runs/bench-fl"), "--out", "-o", help="writes bench.json, report.html, PNGs"),
    config: Path = typer.Option(Path("examples/bench_fl.yaml"), help="the federated workload and its bench: section"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a workload key, or bench.KEY (repeatable)"),
    rows: Optional[str] = typer.Option(None, help="only these configurations, comma-separated labels (default: all)"),
    repeat: int = typer.Option(1, min=1, help="runs of each configuration (seeds 0..N-1); bench.json holds medians"),
    quick: bool = typer.Option(False, help="a reduced run (small MLP on digits, 10 rounds, 4 rows) for tests"),
) -> None:
    """Federated strategies in simulation: centralised reference, FedSGD vs FedAvg, FedAvg/FedProx/FedAdam
    under label skew, FedAvg with uplink compression.

    Labels for --rows: centralised, fedsgd, fedavg-iid, fedprox-iid, fedadam-iid, then the same three
    per alpha (fedavg-a0.1, ...), and fedavg-CODEC per uplink codec (fedavg-topk, fedavg-int8, fedavg-terngrad).
    """
    from shoal.bench import fl, report

    overrides = [*(fl.QUICK_OVERRIDES if quick else []), *set_]
    try:
        cfg, options = fl.load_bench(config, overrides)
    except ConfigError as err:
        _fail_config(str(err))
    known = fl.all_rows(options)
    default = [r for r in known if r.label in fl.QUICK_LABELS] if quick else known
    selected = _select_rows(rows, default, known)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    results = fl.run_bench(cfg, selected, options, out=out, repeat=repeat,
                           log=lambda line: console.print(line, highlight=False, markup=False))
    images = report.plot_accuracy(results, out, group="partition", title="{}", x="round", xlabel="round")
    command = "shoal " + " ".join(sys.argv[1:])
    columns = ["label", "partition", "strategy", "codec", "rounds_to_target", "rounds", "rounds_vs_fedavg",
               "final_accuracy", "accuracy_vs_fedavg", "accuracy_vs_centralised", "uplink_bytes",
               "uplink_reduction", "note"]
    page = report.write_html(results, out, images, "shoal bench fl", command, columns)
    console.print(f"wrote {out / 'bench.json'}, {page} and {len(images)} plots")
    if any(r["failed"] for r in results):
        raise typer.Exit(1)


@bench_app.command("compress")
def bench_compress(
    out: Path = typer.Option(Path("runs/bench-compress"), "--out", "-o", help="writes bench.json, report.html, PNGs"),
    config: Path = typer.Option(Path("examples/bench_compress.yaml"), help="the models' training configs and bench: section"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a workload key: models.NAME.KEY or bench.KEY (repeatable)"),
    models: Optional[str] = typer.Option(None, help="only these models, comma-separated names (default: all)"),
    repeat: int = typer.Option(1, min=1, help="runs of each model (seeds 0..N-1); bench.json holds medians"),
    quick: bool = typer.Option(False, help="a reduced run (a tiny cnn2d on digits, no fine-tuning) for tests"),
) -> None:
    """Pruning and quantisation of the reference CNNs, each row measured against the fp32 model.

    Per model (cnn1d on MNIST-1D, cnn2d on digits): trained with shoal train, then fp32, int8-dynamic,
    int8-static, prune-50/80/90/95 (unstructured, fine-tuned, int8 values in the sparse artefact),
    channels-50 (structured), prune-90+int8-static, channels-50+int8-static. Each row: artefact bytes,
    size ratio, non-zero parameters, ONNX Runtime latency at batch 1 and 32 (1 thread, median) with the
    speed-up, accuracy and its delta. ONNX Runtime's per-operator profile of fp32 against int8-static
    and against channels-50 is printed with the verdict against the 1.5x and 3x speed-up targets at
    batch 32 (and kept in bench.json). Writes report.html and a Pareto plot per model.
    """
    from shoal.bench import compress, report

    overrides = [*(compress.QUICK_OVERRIDES if quick else []), *set_]
    try:
        cfgs, options = compress.load_bench(config, overrides)
    except ConfigError as err:
        _fail_config(str(err))
    if models:
        names = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [m for m in names if m not in cfgs]
        if unknown or not names:
            _fail_config(f"--models: unknown model {', '.join(unknown) or repr(models)}; allowed: {', '.join(cfgs)}")
        cfgs = {m: cfgs[m] for m in names}
    out.mkdir(parents=True, exist_ok=True)
    console = Console() if Console().is_terminal else Console(width=140)
    say = lambda line: console.print(line, highlight=False, markup=False)  # noqa: E731
    results = compress.run_bench(cfgs, options, out=out, repeat=repeat, log=say)
    table = Table(title=f"shoal bench compress: ONNX Runtime {options.threads} thread(s), median of "
                        f"{options.latency_repeats} runs" + (f", medians of {repeat} seeds" if repeat > 1 else ""))
    for column in ("model", "row", "artefact", "non-zeros", "b=1", "b=32", "accuracy"):
        table.add_column(column, justify="left" if column in ("model", "row") else "right", no_wrap=True)
    for r in results:
        if r["failed"]:
            table.add_row(r["model"], r["label"], "FAILED", "", "", "", "")
            continue
        def cell(value, form: str) -> str:  # a ratio is missing where its model's fp32 row failed
            return "-" if value is None else format(value, form)

        table.add_row(r["model"], r["label"], f"{r['artefact_bytes'] / 1000:,.1f} KB {cell(r['size_ratio'], '.1f')}x",
                      f"{r['nonzero_parameters']:,}", f"{r['latency_ms_batch1']:.3f} ms {cell(r['speedup_batch1'], '.2f')}x",
                      f"{r['latency_ms_batch32']:.3f} ms {cell(r['speedup_batch32'], '.2f')}x",
                      f"{r['accuracy']:.4f} {cell(r['accuracy_delta'] and r['accuracy_delta'] * 100, '+.1f')}pt")
    console.print(table)
    for line in compress.profile_lines(results):
        say(line)
    images = compress.plot_pareto(results, out)
    command = "shoal " + " ".join(sys.argv[1:])
    page = report.write_html(results, out, images, "shoal bench compress", command, compress.COLUMNS)
    console.print(f"wrote {out / 'bench.json'}, {page} and {len(images)} plots")
    if any(r["failed"] for r in results):
        raise typer.Exit(1)


@bench_app.command("parallel")
def bench_parallel(
    out: Path = typer.Option(Path("runs/bench-parallel"), "--out", "-o", help="writes bench.json"),
    config: Path = typer.Option(Path("examples/bench_parallel.yaml"), help="the workload"),
    rate: str = typer.Option("none,1gbit,100mbit", help="link rates to run at, comma-separated ('none': unshaped)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a workload key (repeatable)"),
    rows: Optional[str] = typer.Option(None, help="only these layouts, comma-separated labels (default: all)"),
    quick: bool = typer.Option(False, help="a reduced run (smaller model, 2 rows, 20 steps) for tests"),
    timeout: float = typer.Option(600, help="seconds before one run is killed"),
) -> None:
    """Pipeline (equal vs automatic partition, 1F1B vs GPipe) and hybrid layouts on the emulated cluster, against the planner.

    Layouts (labels for --rows): data-parallel-2, pp2-equal-1f1b, pp2-auto-1f1b,
    pp2-auto-gpipe, hybrid-2x2, and bubble-1f1b, bubble-gpipe (the schedules'
    bubble on a coarser workload, four 4096 x 4096 layers, no memory cap). Needs
    root (network namespaces).
    """
    from shoal.bench import parallel
    from shoal.netem import check_available
    from shoal.netem.testbed import rate_bits

    rates = [r.strip() for r in rate.split(",") if r.strip()]
    overrides = [*(parallel.QUICK_OVERRIDES if quick else []), *set_]
    try:
        load_config(config, overrides)
        for r in rates:
            if r != "none":
                rate_bits(r)
    except (ConfigError, ValueError) as err:
        _fail_config(str(err))
    if not rates:
        _fail_config("--rate: give at least one link rate")
    reason = check_available()
    if reason is not None:
        err_console.print(f"[red]bench parallel:[/] needs the emulated cluster: {reason}", highlight=False)
        raise typer.Exit(2)
    selected = _select_rows(rows, parallel.QUICK_ROWS if quick else parallel.FULL_ROWS, parallel.FULL_ROWS)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    results = parallel.run_bench(rates=rates, out=out, config=config, rows=selected, overrides=overrides,
                                 timeout_s=timeout, log=lambda line: console.print(line, highlight=False, markup=False))
    summary = parallel.summarize(results)
    if summary["median_prediction_error"] is not None:
        console.print(f"planner: median |predicted - measured| / measured = {summary['median_prediction_error']:.1%}; "
                      f"fastest layout ranked first in {summary['cases_ranked_right']} of {summary['cases']} cases "
                      f"(rate x workload)")
    console.print(f"wrote {out / 'bench.json'}")
    if any(r["failed"] for r in results):
        raise typer.Exit(1)


netem_app = typer.Typer(help="Emulated cluster: network-namespace hosts on shaped links (needs root and iproute2).")
app.add_typer(netem_app, name="netem")


@netem_app.command("up")
def netem_up(
    hosts: int = typer.Option(2, "--hosts", "-n", help="hosts (namespaces) to create, 1-250"),
    rate: Optional[str] = typer.Option(
        None, help="tc rate of every host's link ('100mbit'), or one per host ('1gbit,1gbit,100mbit'); none = unshaped"
    ),
    latency: str = typer.Option("50ms", help="tbf queue latency bound"),
) -> None:
    """Build the testbed, print its hosts, hold it until Ctrl-C (or SIGTERM), then remove everything."""
    import signal
    import time

    from shoal.netem import Testbed, TestbedError, check_available

    reason = check_available()
    if reason:
        err_console.print(f"[red]netem:[/] {reason}", highlight=False)
        raise typer.Exit(2)
    rates: Optional[list[Optional[str]]] = None
    if rate:
        parts = [r.strip() or None for r in rate.split(",")]
        rates = parts * hosts if len(parts) == 1 else parts
    try:
        testbed = Testbed(hosts, rate=rates, latency=latency)
    except ValueError as err:
        err_console.print(f"[red]netem:[/] {err}", highlight=False)
        raise typer.Exit(2)
    # SIGTERM and SIGHUP end the hold like Ctrl-C, so the cleanup below runs.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        with testbed:
            table = Table(title=f"shoal testbed {testbed.run_id}")
            for column in ("host", "namespace", "address", "link"):
                table.add_column(column)
            for i in range(hosts):
                table.add_row(str(i), testbed.namespace(i), testbed.host_address(i), testbed.rates[i] or "unshaped")
            console = Console()
            console.print(table)
            console.print(
                f"run on host 0:  ip netns exec {testbed.namespace(0)} env GLOO_SOCKET_IFNAME=eth0 COMMAND\n"
                f"ready: press Ctrl-C to remove the testbed", highlight=False,
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        Console().print(f"testbed {testbed.run_id} removed", highlight=False)
    except TestbedError as err:
        err_console.print(f"[red]netem:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(1)


@netem_app.command("down")
def netem_down(
    run_id: Optional[str] = typer.Argument(None, help="the testbed id that 'netem up' printed"),
    all_: bool = typer.Option(False, "--all", help="remove every shoal testbed on this machine (stale ones too)"),
) -> None:
    """Remove a testbed (or all of them) that was left behind."""
    from shoal.netem import check_available, down_all, down_one

    reason = check_available()
    if reason:
        err_console.print(f"[red]netem:[/] {reason}", highlight=False)
        raise typer.Exit(2)
    if all_ == (run_id is not None):
        err_console.print("[red]netem down:[/] give a testbed id or --all", highlight=False)
        raise typer.Exit(2)
    if all_:
        found = down_all()
        Console().print(f"removed {len(found)} objects" + (f": {', '.join(found)}" if found else ""), highlight=False)
    else:
        try:
            found = down_one(run_id)
        except ValueError as err:
            err_console.print(f"[red]netem down:[/] {err}", highlight=False)
            raise typer.Exit(2)
        Console().print(f"testbed {run_id} removed" if found else f"no testbed {run_id} here", highlight=False)


from shoal.fl.cli import fl_app  # noqa: E402  (its commands import their modules lazily)

app.add_typer(fl_app, name="fl")


def main() -> None:
    # Like ``python -m``, let entry points name modules in the working directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    sys.exit(app())


if __name__ == "__main__":
    main()
