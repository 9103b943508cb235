"""Does the model fit the data? Checked in the launching process, before any worker starts.

A model whose first layer expects another input shape (``cnn2d`` on 1-D
signals, an MLP sized for digits on MNIST-1D) otherwise fails in every
worker after the job has started. Here the model is built and handed two
training samples, so such a config is refused in seconds, as a config error
naming the model, the dataset and the shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from shoal.data import build_dataset
from shoal.data.shard import fetch
from shoal.models.build import build_model


def check_fits(cfg: Any) -> None:
    """Raise ValueError when ``cfg.model`` cannot take ``cfg.data``'s training samples."""
    data = build_dataset(cfg.data.dataset)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        torch.manual_seed(cfg.seed)
        try:
            model = build_model(cfg.model, data)
        except (ValueError, TypeError):
            raise  # a model that cannot be built for this data: a config error too
        except Exception:  # noqa: BLE001 - a user's builder failing its own way: the workers report it, by rank
            return
    x, _ = fetch(data.train, [0, 1] if len(data.train) > 1 else [0])
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model: {cfg.model.spec()} does not fit dataset {cfg.data.dataset.spec()} "
                         f"(samples of shape {tuple(x.shape[1:])}, {x.dtype}): {reason}") from None
