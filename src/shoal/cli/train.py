"""``shoal train``: one training run on one or many workers (one or many nodes), and its summary."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from shoal.cli.common import config_errors, err_console, fail, slowdown_overrides
from shoal.config import check_job, check_train_recipe, load_config


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
            fail(f"--resume {resume}: no checkpoint.pt there to resume from")
        config = config or resume / "config.yaml"
        out = resume
    if config is None:
        fail("give a CONFIG file (or --resume DIR)")
    if nnodes > 1 and not rdzv_endpoint:
        fail("--nnodes > 1 needs --rdzv-endpoint HOST:PORT")
    with config_errors():
        faults = kill_overrides(kill) if kill else []
        cfg = load_config(config, [*set_, *slowdown_overrides(slowdown), *faults], workers=workers,
                          out=str(out) if out else None)
        if nnodes == 1:  # nodes may run different worker counts; the workers check the real world size
            check_job(cfg, cfg.workers)
        else:
            check_train_recipe(cfg)
    if resume is not None and not _resume_goes_on(resume, cfg):
        return
    console = Console()
    backend = "" if cfg.backend == "auto" else f", {cfg.backend}"
    console.print(f"shoal: {'resuming' if resume else 'training'} {cfg.model.name} on {cfg.data.dataset.name}, "
                  f"{cfg.workers * nnodes} workers ({cfg.strategy.name}{backend}) -> {cfg.out}; "
                  "starting the workers (the first start imports torch) ...", highlight=False)
    with config_errors(ValueError):  # in this process, before any worker starts
        from shoal.models.fit import check_fits

        check_fits(cfg)
        from shoal.engine.privacy import preflight

        cfg, private = preflight(cfg, cfg.workers * nnodes)
    if private is not None:
        console.print(f"shoal: {private.line(cfg.privacy.options.clip)}", highlight=False, soft_wrap=True)
    if cfg.backend == "nccl":
        from shoal.worker import nccl_shortfall

        shortfall = nccl_shortfall(cfg.workers)
        if shortfall:
            fail(shortfall)
    from shoal.preload import start_worker_server

    start_worker_server()  # its imports overlap the launcher's, next
    from shoal.launch import JobFailed, Stopped, launch

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
    except Stopped as err:
        if err.step is None and (Path(err.out) / "checkpoint.pt").is_file():
            err_console.print(f"shoal: {err}, before it could checkpoint; the last checkpoint in {err.out} "
                              f"is older: shoal train --resume {err.out} goes on from there", highlight=False,
                              soft_wrap=True)
        elif err.step is None:
            err_console.print(f"shoal: {err}; nothing to resume", highlight=False)
        else:
            err_console.print(f"shoal: {err}, checkpoint in {err.out}; resume with: "
                              f"shoal train --resume {err.out}", highlight=False, soft_wrap=True)
        raise typer.Exit(err.exit_code)
    except JobFailed as err:
        # Not fail(): one message per failed rank, each with its traceback.
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
        from shoal.metrics.report import summary_table

        Console().print(summary_table(summary.model_dump()))


def _resume_goes_on(run: Path, cfg) -> bool:
    """Before resuming RUN: say what the new config changes, and whether there is anything to train."""
    import json

    def figure(name: str, key: str) -> int | None:
        try:
            return int(json.loads((run / name).read_text())[key])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    finished = figure("summary.json", "steps")
    # stopped.json is the newer when both are there: a resumed run removes it, a stop writes it.
    stopped = figure("stopped.json", "step")
    done = stopped if stopped is not None else finished
    steps = cfg.train.steps
    if finished is not None and steps is not None and finished >= steps:
        Console().print(f"shoal: {run} finished at step {finished} of train.steps={steps}: nothing to train "
                        f"(--set train.steps=N, N > {finished}, trains on)", highlight=False)
        return False
    with config_errors():
        earlier = load_config(run / "config.yaml").train.steps
    if done is not None and earlier is not None and steps is not None:
        from shoal.engine.optim import schedule_change

        note = schedule_change(cfg.schedule, cfg.optimizer.lr, done, earlier, steps)
        if note:
            err_console.print(f"note: {note}", highlight=False, soft_wrap=True)
    return True


def kill_overrides(item: str) -> list[str]:
    """``--kill 1:50`` -> ``--set fault.kill_rank=1 --set fault.kill_step=50``; ``1:50:server``
    kills the process serving rank 1's parameter shard instead."""
    rank, _, rest = item.partition(":")
    step, _, target = rest.partition(":")
    if not rank.strip().isdigit() or not step.strip().isdigit() or target not in ("", "worker", "server"):
        fail(f"--kill {item!r}: expected RANK:STEP or RANK:STEP:server, e.g. 1:50")
    return [f"fault.kill_rank={int(rank)}", f"fault.kill_step={int(step)}", f"fault.target={target or 'worker'}"]
