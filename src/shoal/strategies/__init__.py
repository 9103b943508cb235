"""Training strategies, one per file, registered by name in ``shoal.registry.STRATEGIES``.

The parameter-server strategies (``async_ps``, ``ssp``, ``sync:backup=b``) live in
:mod:`shoal.ps`, the registry's other home for strategies.
"""

from shoal.strategies.base import StepStats, Strategy, WorkerContext

__all__ = ["StepStats", "Strategy", "WorkerContext"]
