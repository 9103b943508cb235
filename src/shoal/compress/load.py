"""A trained model from a run config and its ``shoal train --out`` directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shoal.compress.base import CompressError
from shoal.config import RunConfig
from shoal.data.base import DatasetBundle, build_dataset
from shoal.models import build_model
from shoal.training.checkpoint import CorruptCheckpoint, load_checkpoint

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
    try:
        saved = load_checkpoint(path)
    except CorruptCheckpoint as err:
        raise CompressError(str(err)) from None
    state = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise CompressError(f"{path}: holds no model weights")
    data = build_dataset(cfg.data.dataset)
    model = build_model(cfg.model, data)
    problems = mismatches(model.state_dict(), state)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CompressError(f"checkpoint {path} does not match the config's model {cfg.model.spec()!r}: "
                            + "; ".join(problems[:3]) + more)
    model.load_state_dict(state)
    return model.eval(), data


def mismatches(expected: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``saved`` from loading into a model whose state is ``expected``, one line each."""
    problems = [f"{k} is {list(saved[k].shape)} there, {list(v.shape)} here"
                for k, v in expected.items() if k in saved and saved[k].shape != v.shape]
    problems += [f"{k} missing" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    return problems
