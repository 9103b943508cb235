"""Entry points for failure tests: a model builder that raises on rank 1 only."""

import os

from torch import nn


def make_model() -> nn.Module:
    if os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure on rank 1")
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


class _DiesOnce(nn.Module):
    """An MLP whose rank-1 copy SIGKILLs its own process at a given training step, first attempt only."""

    def __init__(self, die_at: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.die_at = die_at
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if self.calls == self.die_at and os.environ.get("RANK") == "1" and first_attempt:
                os.kill(os.getpid(), 9)
        return self.net(x)


def make_model_that_dies_once(die_at: int = 50) -> nn.Module:
    return _DiesOnce(die_at)


def make_plain_model(die_at: int = 50) -> nn.Module:
    """The same network without the fault, for the unbroken reference run."""
    return _DiesOnce(die_at=-1)


def make_model_that_reports_its_environment() -> nn.Module:
    """Fails on every rank, saying what SHOAL_TEST_MARK and the working directory were there
    (in the launcher, which builds the model once to check it fits the data, it is a plain MLP)."""
    if "RANK" not in os.environ:
        return make_plain_model()
    raise RuntimeError(f"mark={os.environ.get('SHOAL_TEST_MARK')} cwd={os.getcwd()}")


def make_wrong_width_model() -> nn.Module:
    """An MLP for 40 inputs: digits has 64."""
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 10))
