"""Many tensors as one flat vector, by offsets: the layout every exchange uses.

A strategy that averages, pushes or broadcasts a model's tensors sends them as
one flat vector (one collective instead of one per tensor) and writes the
result back. :func:`flatten` is PyTorch's ``parameters_to_vector`` for any
tensors (gradients, state, ``None`` gradients as zeros); writing back copies
into the tensors' own storage, which ``vector_to_parameters`` does not (it
makes each parameter a view of the vector, and DDP's buckets would lose them).
Sparse training sends only the kept entries: :func:`pack` and :func:`unpack`
go between the dense vector and those.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch


def flatten(tensors: Iterable[torch.Tensor | None], like: Sequence[torch.Tensor] | None = None, *,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """One flat vector of ``tensors``, in order. A ``None`` (a parameter without
    a gradient) counts as zeros shaped like the same place of ``like``."""
    parts = []
    for i, t in enumerate(tensors):
        if t is None:
            if like is None:
                raise ValueError(f"tensor {i} is None and no `like` says its shape")
            t = torch.zeros_like(like[i])
        t = t.detach().reshape(-1)
        parts.append(t if dtype is None else t.to(dtype))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype or torch.float32)


def pieces(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Views of ``flat`` shaped like each of ``like`` in turn (``flat`` must hold them exactly)."""
    total = sum(t.numel() for t in like)
    if flat.numel() != total:
        raise ValueError(f"a flat vector of {flat.numel()} values for tensors of {total}")
    offset = 0
    for t in like:
        yield flat[offset : offset + t.numel()].view(t.shape)
        offset += t.numel()


@torch.no_grad()
def copy_into(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Write ``flat`` back into ``tensors``' own storage (cast to each one's dtype)."""
    for t, piece in zip(tensors, pieces(flat, tensors)):
        t.copy_(piece)


def as_grads(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Set each parameter's ``.grad`` to its piece of ``flat`` (a copy of its own)."""
    for p, piece in zip(params, pieces(flat, params)):
        p.grad = piece.to(p.dtype).clone()


def pack(flat: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The entries of ``flat`` a boolean ``mask`` keeps (all without a mask)."""
    return flat if mask is None else flat[mask]


def unpack(kept: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The dense vector whose kept entries are ``kept`` and the rest zeros."""
    if mask is None:
        return kept
    if int(mask.sum()) != kept.numel():
        raise ValueError(f"{kept.numel()} values for a mask that keeps {int(mask.sum())}")
    return kept.new_zeros(mask.numel()).masked_scatter_(mask, kept)
