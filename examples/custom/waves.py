"""Bring your own model and data: shoal calls these two functions by name.

Config (see custom.yaml beside this file)::

    model: waves:make_model:width=32
    data:
      dataset: waves:make_datasets:samples=4000

Run from this folder (so that ``waves`` is importable)::

    shoal train custom.yaml

``make_datasets`` returns ``(train, test)`` map-style datasets of
``(input, label)``; ``make_model`` returns any ``torch.nn.Module`` whose output
is one logit per class.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset


class NoisyWaves(Dataset):
    """Classify which of 4 frequencies a noisy, randomly shifted sine wave has."""

    classes = ["1 cycle", "2 cycles", "3 cycles", "4 cycles"]

    def __init__(self, samples: int, length: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, len(self.classes), (samples,), generator=gen)
        phase = torch.rand(samples, 1, generator=gen) * 2 * math.pi
        t = torch.linspace(0, 2 * math.pi, length).unsqueeze(0)
        waves = torch.sin((self.labels.unsqueeze(1) + 1) * t + phase)
        self.inputs = (waves + 0.8 * torch.randn(samples, length, generator=gen)).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.inputs[i], int(self.labels[i])


def make_datasets(samples: int = 4000, length: int = 64) -> tuple[Dataset, Dataset]:
    return NoisyWaves(samples, length, seed=1), NoisyWaves(samples // 4, length, seed=2)


class WaveNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 7, padding=3), nn.ReLU(), nn.Conv1d(width, width, 7, padding=3), nn.ReLU()
        )
        self.classify = nn.Linear(width, len(NoisyWaves.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x).mean(dim=2))


def make_model(width: int = 32) -> nn.Module:
    return WaveNet(width)
