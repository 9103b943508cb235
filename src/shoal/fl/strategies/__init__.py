"""Server strategies for federated learning, one per file, registered in ``shoal.registry.FED_STRATEGIES``."""

from shoal.fl.strategies.base import ClientResult, FedStrategy
from shoal.fl.strategies import (  # noqa: F401  (registers)
    fedadagrad, fedadam, fedavg, fedavgm, fedmedian, fedprox, fedsgd, fedyogi, trimmed_mean,
)

__all__ = ["ClientResult", "FedStrategy"]
