"""Built-in datasets that need no download: MNIST-1D, scikit-learn digits, synthetic (classes or real values).

MNIST-1D (Greydanus & Kobak, 2020) is generated procedurally by the ``mnist1d``
package; the result is cached under ``$SHOAL_CACHE`` (default
``~/.cache/shoal``) so that every worker of a run, and every later run, loads
the same arrays instead of regenerating them. The digits are cached the same
way (read once through scikit-learn).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import TensorDataset

from shoal.data.base import DatasetBundle
from shoal.registry import DATASETS


def cache_dir() -> Path:
    return Path(os.environ.get("SHOAL_CACHE", Path.home() / ".cache" / "shoal"))


class Mnist1dOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(15000, ge=100, description="total samples; 80% train, 20% test")
    data_seed: int = Field(42, description="seed of the generator (fixed so runs compare)")


@DATASETS.register("mnist1d", Mnist1dOptions)
def mnist1d(options: Mnist1dOptions) -> DatasetBundle:
    """MNIST-1D: 10 classes of 40-sample 1-D signals, generated offline."""
    arrays = _cached(f"mnist1d-{options.samples}-{options.data_seed}", lambda: _make_mnist1d(options))
    train = TensorDataset(torch.from_numpy(arrays["x"]).float().unsqueeze(1), torch.from_numpy(arrays["y"]).long())
    test = TensorDataset(
        torch.from_numpy(arrays["x_test"]).float().unsqueeze(1), torch.from_numpy(arrays["y_test"]).long()
    )
    return DatasetBundle(train, test, (1, arrays["x"].shape[1]), 10)


def _make_mnist1d(options: Mnist1dOptions) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = options.samples
    args.seed = options.data_seed
    # make_dataset reseeds the global numpy and random generators; put them back.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _cached(key: str, make) -> dict[str, np.ndarray]:
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as loaded:
                return {k: loaded[k] for k in loaded.files}
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    arrays = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{hashlib.md5(key.encode()).hexdigest()[:6]}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # concurrent writers produce identical files; last rename wins
    return arrays


class DigitsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0


@DATASETS.register("digits", DigitsOptions)
def digits(options: DigitsOptions) -> DatasetBundle:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    # Cached like MNIST-1D: importing scikit-learn takes half a second in every worker.
    raw = _cached("digits", _load_digits)
    x = torch.from_numpy(raw["images"] / 16.0).float().unsqueeze(1)
    y = torch.from_numpy(raw["target"]).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(options.split_seed))
    n_test = int(round(len(y) * options.test_fraction))
    test_idx, train_idx = order[:n_test], order[n_test:]
    return DatasetBundle(
        TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]), (1, 8, 8), 10
    )


def _load_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    raw = load_digits()
    return {"images": np.asarray(raw.images), "target": np.asarray(raw.target)}


class SyntheticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(8192, ge=10)
    test_samples: int = Field(2048, ge=10)
    shape: list[int] = Field(default_factory=lambda: [1, 40], min_length=1, max_length=3)
    classes: int = Field(10, ge=2)
    noise: float = Field(0.5, ge=0)
    data_seed: int = 0


@DATASETS.register("synthetic", SyntheticOptions)
def synthetic(options: SyntheticOptions) -> DatasetBundle:
    """Gaussian inputs labelled by a random linear teacher plus noise: learnable, any shape."""
    x, logits = _teacher(options, options.classes, "synthetic")
    y = logits.argmax(dim=1)
    n = options.samples
    return DatasetBundle(
        TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), tuple(options.shape), options.classes
    )


def _teacher(options: SyntheticOptions | SyntheticRegressionOptions, width: int,
             name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs of ``options.shape`` and a random linear teacher's ``width`` scores of them plus noise."""
    if any(d < 1 for d in options.shape):
        raise ValueError(f"{name} shape must be positive, got {options.shape}")
    gen = torch.Generator().manual_seed(options.data_seed)
    features = int(np.prod(options.shape))
    teacher = torch.randn(features, width, generator=gen)
    total = options.samples + options.test_samples
    x = torch.randn(total, features, generator=gen)
    scores = x @ teacher / features**0.5 + options.noise * torch.randn(total, width, generator=gen)
    return x.view(total, *options.shape), scores


class SyntheticRegressionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(8192, ge=10)
    test_samples: int = Field(2048, ge=10)
    shape: list[int] = Field(default_factory=lambda: [1, 40], min_length=1, max_length=3)
    outputs: int = Field(1, ge=1, description="real values to predict per sample")
    noise: float = Field(0.1, ge=0, description="standard deviation of the noise added to the targets")
    data_seed: int = 0


@DATASETS.register("synthetic_regression", SyntheticRegressionOptions)
def synthetic_regression(options: SyntheticRegressionOptions) -> DatasetBundle:
    """Gaussian inputs, float targets from a random linear teacher plus noise (task: regression)."""
    x, y = _teacher(options, options.outputs, "synthetic_regression")
    n = options.samples
    # num_classes is the models' output width: one unit per predicted value.
    return DatasetBundle(
        TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), tuple(options.shape), options.outputs
    )
