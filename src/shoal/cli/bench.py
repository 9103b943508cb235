"""``shoal bench ...``: the benchmarks; each compares against its baseline measured in the same run.

Every bench but ``codecs`` has one shape: check its options and workload (exit 2 naming what is
wrong), then :class:`BenchRun` makes OUT, prints each row's progress, writes report.html and exits
1 if a row failed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import typer
from rich.console import Console

from shoal.cli.common import CONTEXT_SETTINGS, config_errors, fail, log_to, slowdown_overrides, wide_console
from shoal.config import load_config

bench_app = typer.Typer(help="Benchmarks; each writes DIR/bench.json and compares against its baseline in the same run.",
                        context_settings=CONTEXT_SETTINGS)


class BenchRun:
    """One bench's run after its checks: OUT made, a console for the progress log, and the ending."""

    def __init__(self, out: Path, console: Optional[Console] = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.console = console or Console()
        self.log = log_to(self.console)

    def finish(self, results: list[dict[str, Any]], *, title: Optional[str] = None, images: Sequence[Path] = (),
               columns: Sequence[str] = ()) -> None:
        """Name what was written (with TITLE: also report.html, its table COLUMNS and its IMAGES), then
        exit 1 if any row failed."""
        if title is None:
            self.console.print(f"wrote {self.out / 'bench.json'}")
        else:
            from shoal.bench import report

            command = "shoal " + " ".join(sys.argv[1:])
            page = report.write_html(results, self.out, list(images), title, command, list(columns))
            self.console.print(f"wrote {self.out / 'bench.json'}, {page} and {len(images)} plots")
        if any(r["failed"] for r in results):
            raise typer.Exit(1)


def _overrides(quick_overrides: list[str], quick: bool, set_: list[str]) -> list[str]:
    """The workload's overrides: the --quick run's, then the user's --set (which win)."""
    return [*(quick_overrides if quick else []), *set_]


def _select_rows(rows: Optional[str], default: list, known: list) -> list:
    """``--rows a,b``: those benchmark rows by label, or exit 2 naming the allowed labels."""
    if not rows:
        return default
    by_label = {r.label: r for r in known}
    labels = [label.strip() for label in rows.split(",") if label.strip()]
    unknown = [label for label in labels if label not in by_label]
    if unknown or not labels:
        fail(f"--rows: unknown label {', '.join(unknown) or repr(rows)}; allowed: {', '.join(by_label)}")
    return [by_label[label] for label in labels]


@bench_app.command("codecs")
def bench_codecs(
    numel: int = typer.Option(25_000_000, help="elements of the fp32 test tensor"),
    repeats: int = typer.Option(5, help="timed repetitions per codec (median reported)"),
    codec: list[str] = typer.Option([], "--codec", "-c", help="codec spec to time (repeatable; default: all)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="write DIR/bench.json"),
) -> None:
    """Encode+decode throughput (GB/s of fp32 input, beside a memory copy's) and compression of each codec;
    sampled vs exact top-k."""
    from shoal.bench.codecs import report_table, run

    if numel < 1000 or repeats < 1:
        fail("--numel must be >= 1000 and --repeats >= 1")
    with config_errors(ValueError):
        report = run(numel=numel, repeats=repeats, specs=codec or None)
    Console().print(report_table(report))
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
    from shoal.netem.testbed import rate_bits

    reason = check_available()
    if reason:
        fail(f"needs the emulated cluster: {reason}", "bench comm")
    rates = [None if r.strip() in ("", "none") else r.strip() for r in rate.split(",")]
    overrides = _overrides(comm.QUICK_OVERRIDES, quick, set_)
    with config_errors(ValueError):
        load_config(config, overrides)
        for r in rates:
            if r is not None:
                rate_bits(r)
    if workers < 2:
        fail("--workers must be at least 2")
    selected = _select_rows(rows, comm.QUICK_ROWS if quick else comm.FULL_ROWS, [*comm.FULL_ROWS, *comm.QUICK_ROWS])
    run = BenchRun(out)
    results = comm.run_bench(
        workers=workers, rates=rates, out=out, config=config, rows=selected, extra_overrides=overrides,
        timeout_s=timeout, repeat=repeat, log=run.log,
    )
    images = [*report.plot_accuracy(results, out), report.plot_bytes(results, out)]
    run.finish(results, title="shoal bench comm", images=images, columns=comm.COLUMNS)


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
    overrides = _overrides(straggler.QUICK_OVERRIDES, quick, set_)
    with config_errors():
        load_config(config, [*overrides, *slowdown_overrides(slow)], workers=workers)
    if workers < 2:
        fail("--workers must be at least 2")
    selected = _select_rows(rows, straggler.QUICK_ROWS if quick else straggler.FULL_ROWS, straggler.FULL_ROWS)
    run = BenchRun(out)
    results = straggler.run_bench(
        workers=workers, slowdown=slow, out=out, config=config, rows=selected, overrides=overrides,
        timeout_s=timeout, repeat=repeat, log=run.log,
    )
    images = report.plot_accuracy(results, out, group="slowdown", title="slowdown {}")
    run.finish(results, title="shoal bench straggler", images=images, columns=straggler.COLUMNS)


@bench_app.command("fl")
def bench_fl(
    out: Path = typer.Option(Path("runs/bench-fl"), "--out", "-o", help="writes bench.json, report.html, PNGs"),
    config: Path = typer.Option(Path("examples/bench_fl.yaml"), help="the federated workload and its bench: section"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a workload key, or bench.KEY (repeatable)"),
    rows: Optional[str] = typer.Option(None, help="only these configurations, comma-separated labels (default: all)"),
    repeat: int = typer.Option(1, min=1, help="runs of each configuration (seeds 0..N-1); bench.json holds medians"),
    quick: bool = typer.Option(False, help="a reduced run (small MLP on digits, 10 rounds, 4 rows) for tests"),
    flower: bool = typer.Option(False, "--flower", help="instead: shoal fl simulate against Flower 1.42's simulation "
                                "(Ray) on CONFIG's own work (e.g. examples/fl_mnist1d.yaml), each its own process: "
                                "rounds and seconds to fl.target_accuracy, peak memory (needs the bench-flower extra)"),
) -> None:
    """Federated strategies in simulation: centralised reference, FedSGD vs FedAvg, FedAvg/FedProx/FedAdam
    under label skew, FedAvg with uplink compression.

    Labels for --rows: centralised, fedsgd, fedavg-iid, fedprox-iid, fedadam-iid, then the same three
    per alpha (fedavg-a0.1, ...), and fedavg-CODEC per uplink codec (fedavg-topk, fedavg-int8, fedavg-terngrad).
    With --flower: two rows, shoal and flower, on CONFIG as it is (medians of --repeat runs each).
    """
    if flower:
        _bench_fl_flower(out, config, set_, repeat)
        return
    from shoal.bench import fl, report

    with config_errors():
        cfg, options = fl.load_bench(config, _overrides(fl.QUICK_OVERRIDES, quick, set_))
    known = fl.all_rows(options)
    default = [r for r in known if r.label in fl.QUICK_LABELS] if quick else known
    selected = _select_rows(rows, default, known)
    run = BenchRun(out)
    results = fl.run_bench(cfg, selected, options, out=out, repeat=repeat, log=run.log)
    images = report.plot_accuracy(results, out, group="partition", title="{}", x="round", xlabel="round")
    run.finish(results, title="shoal bench fl", images=images, columns=fl.COLUMNS)


def _bench_fl_flower(out: Path, config: Path, set_: list[str], repeat: int) -> None:
    from shoal.bench import flower_fl
    from shoal.bench.flower_secagg import available
    from shoal.metrics.summary import write_json_atomic

    missing = available()
    if missing:
        fail(missing)
    run = BenchRun(out)
    with config_errors(ValueError):
        rows = flower_fl.compare(config, set_, out, repeat=repeat, log=run.log)
    write_json_atomic(out / "bench.json", rows)
    for row in rows:
        run.log(f"{row['label']}: {row['rounds_to_target']} rounds, {row['time_to_target_s']} s to the target, "
                f"peak {row['peak_memory_mb']:.0f} MB" + (f"; {row['speedup_vs_flower']:.2f}x Flower's speed, "
                f"{row['memory_vs_flower']:.2f}x its memory" if "speedup_vs_flower" in row else ""))
    run.finish(rows)


@bench_app.command("privacy")
def bench_privacy(
    out: Path = typer.Option(Path("runs/bench-privacy"), "--out", "-o", help="writes bench.json, report.html, PNGs"),
    config: Path = typer.Option(Path("examples/bench_privacy.yaml"), help="the training workload and its bench: section"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override a workload key, or bench.KEY (repeatable)"),
    rows: Optional[str] = typer.Option(None, help="only these configurations, comma-separated labels (default: all)"),
    repeat: int = typer.Option(1, min=1, help="runs of each configuration; bench.json holds the medians"),
    quick: bool = typer.Option(False, help="a reduced run (small MLP on digits, one epsilon, a small federation) for tests"),
) -> None:
    """Differential privacy's cost: DP-SGD at each epsilon against non-private training and a plain Opacus loop
    on the same work, and DP-FedAvg against FedAvg.

    Labels for --rows: none, dp-sgd-epsE and opacus-epsE per bench.epsilons (default 8, 3, 1), fedavg,
    dp-fedavg-epsE (bench.fl_epsilon). Opacus rows are skipped, saying why, where Opacus is not installed.
    """
    from shoal.bench import privacy, report

    with config_errors():
        cfg, options = privacy.load_bench(config, _overrides(privacy.QUICK_OVERRIDES, quick, set_))
    known = privacy.all_rows(options)
    selected = _select_rows(rows, known, known)
    run = BenchRun(out)
    results = privacy.run_bench(cfg, selected, options, out=out, repeat=repeat, log=run.log)
    images = privacy.plot(results, out, privacy.target_quantile(options))
    run.finish(results, title="shoal bench privacy", images=images, columns=privacy.COLUMNS)


@bench_app.command("secure")
def bench_secure(
    out: Path = typer.Option(Path("runs/bench-secure"), "--out", "-o", help="writes bench.json and report.html"),
    clients: str = typer.Option("10,50,100", help="clients in the round, comma-separated"),
    drops: str = typer.Option("0,0.1,0.3", help="shares of them dropped before their masked input, comma-separated"),
    numel: int = typer.Option(185_418, min=1, help="values in an update (default: the demo cnn1d's parameters)"),
    value_bits: int = typer.Option(16, min=2, max=24, help="bits of each coordinate's fixed-point code"),
    threshold: float = typer.Option(0.5, min=0.0, max=0.99, help="t = floor(threshold * k) + 1 shares recover a "
                                    "secret (fl.secure=secagg:threshold=)"),
    neighbours: Optional[int] = typer.Option(None, min=2, help="k (default: about 3 log2 n)"),
    repeat: int = typer.Option(3, min=1, help="rounds per row; bench.json holds the medians"),
    quick: bool = typer.Option(False, help="a reduced run (n = 6, 10 clients of 20,000 values, one round) for tests"),
    flower: bool = typer.Option(False, "--flower", help="after each row, Flower 1.42's SecAgg+ on the same updates, "
                                "drops, k and t (needs the bench-flower extra)"),
) -> None:
    """SecAgg+'s cost against plain aggregation: uplink per client against fp32, keys and shares against the
    payload, client and server seconds and the server's unmasking, per number of clients and share dropped.

    The dropped clients leave after sharing their secrets, before their masked input (the server's costliest
    recovery). Every message is packed and unpacked as gRPC would carry it; all parties run in this process.
    With --flower, Flower's own SecAgg+ workflow and client mod run each row too, their messages serialised
    with Flower's protobuf serde.
    """
    from shoal.bench import flower_secagg, secure

    if flower and (missing := flower_secagg.available()):
        fail(f"--flower: {missing}")
    try:
        ns, fractions = secure.parse_list(clients, int, "--clients"), secure.parse_list(drops, float, "--drops")
        secure.check(ns, fractions)
    except ValueError as err:
        fail(str(err))
    if quick:
        ns, fractions, numel, repeat = [6, 10], [0.0, 0.3], 20_000, 1
    run = BenchRun(out, wide_console(160))
    results = secure.run_bench(clients=ns, drops=fractions, numel=numel, repeat=repeat, out=out, log=run.log,
                               value_bits=value_bits, threshold=threshold, neighbours=neighbours, flower=flower)
    run.finish(results, title="shoal bench secure", columns=secure.COLUMNS)


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
    from shoal.bench import compress

    with config_errors():
        cfgs, options = compress.load_bench(config, _overrides(compress.QUICK_OVERRIDES, quick, set_))
    if models:
        names = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [m for m in names if m not in cfgs]
        if unknown or not names:
            fail(f"--models: unknown model {', '.join(unknown) or repr(models)}; allowed: {', '.join(cfgs)}")
        cfgs = {m: cfgs[m] for m in names}
    run = BenchRun(out, wide_console(140))
    results = compress.run_bench(cfgs, options, out=out, repeat=repeat, log=run.log)
    compress.print_table(results, options, repeat, run.console)
    for line in compress.profile_lines(results):
        run.log(line)
    images = compress.plot_pareto(results, out)
    run.finish(results, title="shoal bench compress", images=images, columns=compress.COLUMNS)


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
    overrides = _overrides(parallel.QUICK_OVERRIDES, quick, set_)
    with config_errors(ValueError):
        load_config(config, overrides)
        for r in rates:
            if r != "none":
                rate_bits(r)
    if not rates:
        fail("--rate: give at least one link rate")
    reason = check_available()
    if reason is not None:
        fail(f"needs the emulated cluster: {reason}", "bench parallel")
    selected = _select_rows(rows, parallel.QUICK_ROWS if quick else parallel.FULL_ROWS, parallel.FULL_ROWS)
    run = BenchRun(out)
    results = parallel.run_bench(rates=rates, out=out, config=config, rows=selected, overrides=overrides,
                                 timeout_s=timeout, log=run.log)
    summary = parallel.summarize(results)
    if summary["median_prediction_error"] is not None:
        run.console.print(f"planner: median |predicted - measured| / measured = {summary['median_prediction_error']:.1%}; "
                          f"fastest layout ranked first in {summary['cases_ranked_right']} of {summary['cases']} cases "
                          f"(rate x workload)")
    run.finish(results)
