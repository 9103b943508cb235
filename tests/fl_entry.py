"""Entry points for the federated tests: digits models whose local training fails, or kills the
process that runs it when that is a simulation's worker."""

import os
import signal

from torch import nn


class _Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        if self.training:
            raise RuntimeError("local training exploded")
        return self.body(x)


def exploding():
    return _Exploding()


class _KilledInWorker(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.owner = os.getpid()  # the process that built it: the simulation's parent

    def forward(self, x):
        if self.training and os.getpid() != self.owner:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.body(x)


def killed_in_worker():
    return _KilledInWorker()
