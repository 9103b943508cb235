"""Entry points for failure tests: a model builder that raises on rank 1 only."""

import os

from torch import nn


def make_model() -> nn.Module:
    if os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure on rank 1")
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
