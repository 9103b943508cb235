"""What a dataset builder returns, and how a user's entry point becomes one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

from shoal.registry import Component


@dataclass
class DatasetBundle:
    """Train and test sets plus what a model needs to know about them."""

    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int


def build_dataset(component: Component) -> DatasetBundle:
    """Build a registered dataset, or call a user's ``module:function``.

    A user function returns ``(train, test)`` (two map-style ``Dataset``s whose
    items are ``(input, label)``) or a :class:`DatasetBundle`.
    """
    if not component.entry_point:
        return component.target(component.options)
    result = component.target(**component.option_dict())
    if isinstance(result, DatasetBundle):
        return result
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise TypeError(
            f"dataset entry point {component.name!r} must return (train, test) datasets "
            f"or a DatasetBundle, got {type(result).__name__}"
        )
    train, test = result
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"dataset entry point {component.name!r} returned an empty train or test set")
    x0, _ = train[0]
    return DatasetBundle(train, test, tuple(torch.as_tensor(x0).shape), _count_classes(train, test))


def _count_classes(*datasets: Dataset) -> int:
    for ds in datasets:
        classes = getattr(ds, "classes", None)
        if classes is not None:
            return len(classes)
    top = -1
    for ds in datasets:
        if isinstance(ds, TensorDataset):
            top = max(top, int(ds.tensors[1].max()))
        else:
            top = max(top, max(int(ds[i][1]) for i in range(len(ds))))
    return top + 1
