"""A trained model from a run config and its ``shoal train --out`` directory."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from shoal.compress.base import CompressError
from shoal.config import RunConfig
from shoal.data.base import DatasetBundle, build_dataset
from shoal.models import build_model
from shoal.engine.checkpoint import CorruptCheckpoint, WrongModel, load_weights

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(run: str | Path) -> Path:
    """``RUN_DIR/checkpoint.pt``, or the file itself when given one."""
    path = Path(run)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CompressError(f"--checkpoint {run}: no {CHECKPOINT} there; give a 'shoal train --out' directory "
                            "or its checkpoint file")
    return path


def load_trained(cfg: RunConfig, run: str | Path) -> tuple[nn.Module, DatasetBundle]:
    """Build the config's dataset and model and load the run's trained weights into it.

    Raises :class:`CompressError` when the checkpoint is missing, damaged, or
    holds another architecture than the config's model."""
    path = checkpoint_path(run)
    data = build_dataset(cfg.data.dataset)
    model = build_model(cfg.model, data)
    try:
        load_weights(model, path)
    except WrongModel as err:
        own = path.parent / "config.yaml"
        hint = (f"; the run trained with {own}: leave CONFIG out of shoal compress (or give that file) to use it"
                if own.is_file() else "")
        raise CompressError(f"checkpoint {path} does not match the config's model {cfg.model.spec()!r}: "
                            f"{err.differences}{hint}") from None
    except (CorruptCheckpoint, ValueError) as err:
        raise CompressError(str(err)) from None
    return model.eval(), data
