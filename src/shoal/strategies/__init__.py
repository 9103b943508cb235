"""Training strategies, one per file, registered by name in ``shoal.registry.STRATEGIES``."""

from shoal.strategies.base import StepStats, Strategy, WorkerContext
from shoal.strategies import async_ps, ddp_baseline, localsgd, pipeline, ssp, sync  # noqa: F401  (registers)

__all__ = ["StepStats", "Strategy", "WorkerContext"]
