"""Entry points for the federated tests: a digits model whose local training fails."""

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
