"""Error-feedback residuals kept with their parameters, across DDP's re-bucketing and checkpoints.

The DDP hook keeps one residual per bucket (:class:`shoal.comm.memory.ErrorFeedback`,
keyed by the bucket's index), but a bucket is not a stable thing: DDP orders a
bucket's parameters one way in its first step and another after it rebuilds its
buckets, and may move a parameter to a bucket that runs earlier. So:

1. each bucket's parameters are remembered as last seen (:func:`follow_layout`)
2. when one bucket's parameters change, every residual is cut per parameter by
   the layout it was made in (:func:`split_residual`), dense (pruned entries
   zero), and waits in ``state.restored``
3. a bucket puts its own residual together again when it next runs, packed to
   its kept entries under sparse training (:func:`adopt_restored`)
4. a checkpoint keeps residuals per parameter, by name
   (:func:`residuals_by_parameter`), and a resumed run starts from step 2
   (:func:`restore_residuals`)

The state these read and write (``memory``, ``packed``, ``layouts``,
``restored``) is the hook's own :class:`shoal.comm.hooks.CodecHookState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shoal.comm import layout

if TYPE_CHECKING:
    from shoal.comm.hooks import CodecHookState


def split_residual(state: CodecHookState, bucket: int) -> dict[int, torch.Tensor]:
    """A bucket's residual cut per parameter of its last layout, dense (pruned entries zero), by id."""
    residual, params = state.memory.residuals.get(bucket), state.layouts.get(bucket)
    if residual is None or params is None:
        return {}
    numel = sum(p.numel() for p in params)
    packed = state.packed.get(bucket)
    if packed is not None and packed[0] == tuple(id(p) for p in params) and residual.numel() == packed[2].numel() != numel:
        residual = residual.new_zeros(numel).index_put_((packed[2],), residual)
    if residual.numel() != numel:
        return {}  # a stale one
    # Flat pieces, as checkpoints have always kept them.
    return {id(p): piece.reshape(-1).clone() for p, piece in zip(params, layout.pieces(residual.detach(), params))}


def residuals_by_parameter(state: CodecHookState, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """The error-feedback residuals cut per parameter, dense (pruned entries zero), by name."""
    out: dict[str, torch.Tensor] = {}
    if state.memory is None:
        return out
    for bucket in state.memory.residuals:
        out.update({names[pid]: part.cpu() for pid, part in split_residual(state, bucket).items()})
    for pid, residual in state.restored.items():  # restored, not yet used: kept as they came
        out.setdefault(names[pid], residual.cpu())
    return out


def follow_layout(state: CodecHookState, bucket: int, params: list[torch.Tensor]) -> None:
    """Remember ``bucket``'s parameters; if DDP regrouped them (after its first step), every
    residual is cut per parameter by the layout it was made in, and each bucket puts its own
    together again when it runs (a parameter may have moved to a bucket that runs earlier)."""
    before = state.layouts.get(bucket)
    if before is not None and state.memory is not None and [id(p) for p in before] != [id(p) for p in params]:
        for name in list(state.memory.residuals):
            state.restored.update(split_residual(state, name))
        state.memory.residuals.clear()
        state.packed.clear()
    state.layouts[bucket] = params


def restore_residuals(state: CodecHookState, saved: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Residuals saved by :func:`residuals_by_parameter`, each bucket's put together when it first runs."""
    state.restored = {id(params[name]): residual for name, residual in saved.items() if name in params}
    if state.memory is not None:
        state.memory.residuals.clear()


def adopt_restored(state: CodecHookState, bucket: int, params: list[torch.Tensor], keep: torch.Tensor | None) -> None:
    """``bucket``'s residual from the per-parameter ones waiting for it (zeros for a parameter
    without one), packed to the entries ``keep`` (None: all of them)."""
    if state.memory is None or not state.restored or not any(id(p) in state.restored for p in params):
        return
    parts = [state.restored.pop(id(p), None) for p in params]
    dense = layout.flatten([part.to(p.device) if part is not None else None for part, p in zip(parts, params)],
                           like=params)
    state.memory.residuals[bucket] = dense if keep is None else dense[keep]
