"""How a training set is dealt out to federated clients, registered by name.

Real fleets are not IID: a phone sees its owner's digits, a hospital its own
patients. These partitions reproduce the usual benchmark conditions:

- ``iid``: a random permutation cut into equal parts;
- ``dirichlet:alpha=A``: for every class, its samples are split over the
  clients in proportions drawn from Dirichlet(A) (Hsu et al. 2019); small A
  gives each client few classes, large A approaches IID;
- ``shards:classes=C``: sort by label, cut into clients*C shards, give each
  client C of them (McMahan et al. 2017's "pathological" non-IID);
- ``quantity:alpha=A``: IID labels but client sizes drawn from Dirichlet(A).

Every client gets at least ``min_size`` samples (redrawn or topped up), and
the result depends only on the labels and the seed.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shoal.registry import PARTITIONS, Component, NoOptions


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_size: int = Field(2, ge=1, description="fewest samples any client may hold")


class DirichletOptions(_Options):
    alpha: float = Field(0.5, gt=0, description="concentration: 0.1 very skewed, 100 near IID")


class ShardOptions(_Options):
    classes: int = Field(2, ge=1, description="label-sorted shards (about one class each) per client")


def partition(component: Component, labels: np.ndarray, clients: int, seed: int) -> list[np.ndarray]:
    """Indices of the samples each of ``clients`` clients holds."""
    labels = np.asarray(labels)
    if clients > len(labels):
        raise ValueError(f"{clients} clients but only {len(labels)} training samples")
    parts = component.target(component.options, labels, clients, np.random.default_rng(seed))
    return [np.sort(p) for p in parts]


@PARTITIONS.register("iid", NoOptions)
def iid(options: BaseModel, labels: np.ndarray, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random permutation cut into equal parts."""
    return np.array_split(rng.permutation(len(labels)), clients)


@PARTITIONS.register("dirichlet", DirichletOptions)
def dirichlet(options: DirichletOptions, labels: np.ndarray, clients: int,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Every class split over the clients in proportions drawn from Dirichlet(alpha) (Hsu et al. 2019)."""
    classes = np.unique(labels)
    for _ in range(100):  # redraw until every client holds enough (as Hsu et al.'s code does)
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(clients, options.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].extend(piece.tolist())
        if min(len(p) for p in parts) >= options.min_size:
            return [np.array(p, dtype=np.int64) for p in parts]
    return _top_up([np.array(p, dtype=np.int64) for p in parts], options.min_size, rng)


@PARTITIONS.register("shards", ShardOptions)
def shards(options: ShardOptions, labels: np.ndarray, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sorted by label, cut into clients x ``classes`` shards, ``classes`` dealt to each (McMahan et al. 2017)."""
    order = np.argsort(labels, kind="stable")
    count = clients * options.classes
    if count > len(labels):
        raise ValueError(f"shards: {clients} clients x {options.classes} shards exceeds {len(labels)} samples")
    pieces = np.array_split(order, count)
    deal = rng.permutation(count)
    return [np.concatenate([pieces[j] for j in deal[k * options.classes:(k + 1) * options.classes]])
            for k in range(clients)]


@PARTITIONS.register("quantity", DirichletOptions)
def quantity(options: DirichletOptions, labels: np.ndarray, clients: int,
             rng: np.random.Generator) -> list[np.ndarray]:
    """IID labels, but client sizes in proportions drawn from Dirichlet(alpha)."""
    n = len(labels)
    if clients * options.min_size > n:
        raise ValueError(f"quantity: {clients} clients x min_size {options.min_size} exceeds {n} samples")
    spare = n - clients * options.min_size
    sizes = options.min_size + np.floor(rng.dirichlet(np.full(clients, options.alpha)) * spare).astype(int)
    sizes[: n - sizes.sum()] += 1  # hand out what flooring left over
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move samples from the largest clients to those below ``min_size``."""
    parts = [p.copy() for p in parts]
    for k in range(len(parts)):
        while len(parts[k]) < min_size:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            if len(parts[donor]) <= min_size:
                raise ValueError(f"not enough samples to give every client {min_size}")
            take = rng.integers(len(parts[donor]))
            parts[k] = np.append(parts[k], parts[donor][take])
            parts[donor] = np.delete(parts[donor], take)
    return parts
