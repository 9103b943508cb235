"""Gradient inversion: what one client's plain update tells whoever reads it.

The attack DP-FedAvg is there to defeat. From the gradient of the loss on ONE
example (a client's update from one local SGD step is ``-lr`` times it):

1. the label, by iDLG (Zhao et al. 2020, "iDLG: Improved Deep Leakage from
   Gradients"): with cross-entropy the last linear layer's bias gradient is
   softmax(z) - onehot(y), negative at the true class only; without a bias
   its weight rows, (p - y) h^T with h >= 0 after a ReLU, sum the same signs;
2. the input, by DLG (Zhu et al. 2019, "Deep Leakage from Gradients"): start
   from a random dummy input, and optimise it until the gradient it induces
   (with the label of step 1) matches the observed one; the mismatch is
   1 - cosine similarity over all parameters together, as in Geiping et al.
   2020, "Inverting Gradients - How easy is it to break privacy in federated
   learning?", which ignores the update's scale and so survives clipping.

A plain update gives back its sample; the test
(``tests/test_privacy_inversion.py``) shows that, and that under DP-FedAvg's
clip and Gaussian noise the same attack ends no nearer than where it started.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from shoal.comm.layout import pieces


class Inversion(NamedTuple):
    reconstruction: torch.Tensor  # shaped like one input, without the batch dimension
    label: int
    loss: float  # the final 1 - cosine similarity between the dummy's gradient and the observed one


def output_layer(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear``, taken to produce the logits."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer to read the label from")
    return linear[-1]


def infer_label(model: nn.Module, gradient: Sequence[torch.Tensor]) -> int:
    """iDLG: the class whose last-layer gradient is the most negative (step 1)."""
    by_param = {id(p): g for p, g in zip(model.parameters(), gradient)}
    layer = output_layer(model)
    if layer.bias is not None:
        return int(by_param[id(layer.bias)].argmin())
    return int(by_param[id(layer.weight)].sum(dim=1).argmin())


def invert_gradient(model: nn.Module, gradient: Sequence[torch.Tensor] | torch.Tensor,
                    input_shape: tuple[int, ...], num_classes: int, *, steps: int = 300, lr: float = 0.1,
                    generator: torch.Generator | None = None) -> Inversion:
    """Reconstruct the single example whose cross-entropy gradient on ``model`` is ``gradient``.

    ``gradient`` is one tensor per parameter (in ``model.parameters()``
    order) or all of them as one flat vector. The dummy input starts as
    N(0, 1) from ``generator`` and takes ``steps`` Adam steps of ``lr``;
    the result is deterministic given the generator's seed.
    """
    params = list(model.parameters())
    if isinstance(gradient, torch.Tensor):
        gradient = list(pieces(gradient.detach().flatten(), params))
    if len(gradient) != len(params):
        raise ValueError(f"gradient: {len(gradient)} tensors for a model of {len(params)} parameters")
    if output_layer(model).out_features != num_classes:
        raise ValueError(f"num_classes: {num_classes}, but the output layer has "
                         f"{output_layer(model).out_features} outputs")
    observed = [g.detach().to(p.dtype) for p, g in zip(params, gradient)]
    label = infer_label(model, observed)
    target = torch.tensor([label])
    dummy = torch.randn((1, *input_shape), generator=generator).requires_grad_(True)
    optimiser = torch.optim.Adam([dummy], lr=lr)

    def mismatch() -> torch.Tensor:
        induced = torch.autograd.grad(F.cross_entropy(model(dummy), target), params, create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(induced, observed))
        norm_induced = torch.sqrt(sum(a.pow(2).sum() for a in induced))
        norm_observed = torch.sqrt(sum(b.pow(2).sum() for b in observed))
        return 1 - dot / (norm_induced * norm_observed + 1e-12)

    for _ in range(steps):
        optimiser.zero_grad()
        loss = mismatch()
        loss.backward(inputs=[dummy])  # the model's own .grad stays as the caller left it
        optimiser.step()
    return Inversion(dummy.detach()[0], label, float(mismatch().detach()))
