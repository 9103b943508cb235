"""shoal: distributed deep-learning training on PyTorch's distributed engine, made cheaper.

Python API::

    import shoal
    summary = shoal.train("examples/mnist1d.yaml", workers=2, overrides=["train.steps=200"], out="runs/api")
    print(summary.final_accuracy)
    report = shoal.compress("examples/mnist1d.yaml", checkpoint="runs/api", prune="magnitude:sparsity=0.9")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shoal.config import ConfigError, RunConfig, check_job, load_config, validate_config
from shoal.metrics.summary import Summary

__all__ = ["train", "compress", "RunConfig", "Summary", "ConfigError", "load_config", "validate_config"]
__version__ = "0.1.0"


def train(
    config: RunConfig | dict[str, Any] | str | Path,
    *,
    workers: int | None = None,
    out: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    max_restarts: int = 0,
) -> Summary:
    """Train as ``shoal train`` does and return the run's :class:`Summary`.

    ``config`` is a :class:`RunConfig`, a mapping of config keys, or a YAML
    path. Raises :class:`ConfigError` for a bad config (before any process
    starts; a model that does not fit the data is one), :class:`shoal.launch.JobFailed`
    when a worker fails and :class:`shoal.launch.Stopped` after a SIGINT or SIGTERM
    (the run checkpointed first: ``resume=True`` goes on).
    ``max_restarts``: restarts allowed to the whole job (group restarts, and
    single workers restarted under the parameter-server strategies).
    """
    from shoal.launch import launch
    from shoal.models.fit import check_fits

    cfg = load_config(config, overrides, workers=workers, out=str(out) if out is not None else None)
    check_job(cfg, cfg.workers)
    from shoal.engine.privacy import preflight

    try:
        check_fits(cfg)  # a model that cannot take the data fails here, not in every worker
        cfg, _ = preflight(cfg, cfg.workers)  # DP-SGD: a model it cannot train, a budget the run cannot fit
    except ValueError as err:
        raise ConfigError(str(err)) from None
    summary = launch(cfg, resume=resume, max_restarts=max_restarts)
    assert summary is not None  # a single-node job always holds rank 0
    return summary


def __getattr__(name: str) -> Any:
    # ``shoal.compress(...)`` (the callable package ``shoal.compress``) is
    # imported on first use: it pulls in torch, which ``import shoal`` does not.
    if name == "compress":
        import importlib

        return importlib.import_module("shoal.compress")
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
