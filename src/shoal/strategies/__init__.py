"""Training strategies, one per file, registered by name in ``shoal.registry.STRATEGIES``.

The parameter-server strategies (``async_ps``, ``ssp``, ``sync:backup=b``) live in
:mod:`shoal.ps`, the registry's other home for strategies.
"""

from shoal.strategies.base import StepStats, Strategy, WorkerContext
from shoal.strategies import ddp_baseline, localsgd, pipeline, sync  # noqa: F401  (registers)

__all__ = ["StepStats", "Strategy", "WorkerContext"]
