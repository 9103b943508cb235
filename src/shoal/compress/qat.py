"""Quantisation-aware training (QAT) to int8, run in ONNX Runtime as static QDQ.

Post-training int8 (``int8-static``) rounds a model that never saw rounding;
QAT (Jacob et al. 2018) trains it a few hundred steps *with* the rounding in
the forward pass, so the weights settle where int8 costs least.

1. Fake quantisation goes into the compressed PyTorch model (after pruning,
   restored from its artefact) on exactly the grids ONNX Runtime's static
   QDQ quantizer will use:
   - every Conv / Linear weight: int8, symmetric, one scale per output
     channel, ``scale = max|w| / 127`` on [-127, 127] (ORT's ``WeightSymmetric``
     int8 range), recomputed from the weights at every step;
   - every Conv / Linear input and the logits: int8, asymmetric, one scale
     and zero point per tensor on [-128, 127], from the min / max the tensor
     takes on the calibration batches (the same ``calibrate`` x 32 training
     samples ``int8-static`` calibrates on), measured again every
     ``steps // 4`` steps and once after training, as ORT's ``minmax``
     calibration measures them.
   The rounding is torchao's QAT primitive (``_fake_quantize_affine``: round
   with a straight-through gradient) and the scales are its
   ``choose_qparams_affine``. torchao's module-swapping QAT
   (``quantize_(model, QATConfig(...))``) is not used: it swaps only Linear
   and Embedding layers (no Conv), has no per-tensor activation scale, and
   its per-channel int8 weight grid is [-128, 127] with ``max|w| / 127.5``,
   which ORT does not reproduce.
2. Fine-tune ``steps`` steps in this process (not through ``shoal train``):
   SGD with momentum 0.9, learning rate ``lr`` decayed along a cosine to zero,
   batches of ``batch_size`` training samples; a pruned weight stays exactly
   zero (its mask multiplies the weight inside the fake quantisation, so it
   gets no gradient, and is applied again after training).
3. Export the trained fp32 weights to ONNX and quantise them with ONNX
   Runtime's static QDQ quantizer (per-channel int8 weights, minmax-calibrated
   int8 activations; :mod:`shoal.compress.int8_static`). Its weight grid is
   the one trained on, so each int8 weight is the value the fake
   quantisation used. The row's ``max |diff|`` compares ORT's logits with the
   fake-quantised PyTorch model's: how closely the shipped int8 model follows
   the one that was trained.

Why not torchao's convert step: it produces torchao tensor subclasses (for
its own CPU / GPU kernels) that the ONNX exporter does not translate, and on
this CPU (AVX2, no VNNI) ORT's static QDQ is the int8 path that pays.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from shoal.compress.base import CompressError
from shoal.registry import QUANTIZERS

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class QatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(300, ge=1, le=1_000_000, description="fine-tuning steps with fake quantisation")
    lr: float = Field(0.01, gt=0, le=10, description="starting learning rate (SGD, momentum 0.9, cosine to 0)")
    batch_size: int = Field(64, ge=1, description="training samples per step")
    calibrate: int = Field(8, ge=1, le=1000, description="calibration batches of 32 training samples (as int8-static)")


def _torchao():
    """torchao's QAT primitives; its import logs about CUDA kernels a CPU build cannot load."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.quantization.quant_primitives import MappingType, _fake_quantize_affine, choose_qparams_affine
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return MappingType, _fake_quantize_affine, choose_qparams_affine


class WeightFakeQuant(nn.Module):
    """A parametrisation: ``mask * w`` rounded to int8 per output channel, ORT's symmetric grid."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.enabled = True
        self.mapping, self.fake_quantize, self.choose = _torchao()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight * self.mask
        rows = (weight * self.mask).reshape(weight.shape[0], -1)
        block = (1, rows.shape[1])
        scale, zero = self.choose(rows, self.mapping.SYMMETRIC, block, torch.int8, quant_min=-127, quant_max=127,
                                  eps=torch.finfo(torch.float32).tiny)
        return self.fake_quantize(rows, block, scale, zero, torch.int8, -127, 127).reshape(weight.shape)


class ActivationFakeQuant:
    """Per-tensor asymmetric int8 fake quantisation of one tensor, from an observed [min, max]."""

    def __init__(self) -> None:
        self.mapping, self.fake_quantize, self.choose = _torchao()
        self.low = self.high = None
        self.observing = False
        self.scale = self.zero = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            low, high = x.detach().min(), x.detach().max()
            self.low = low if self.low is None else torch.minimum(self.low, low)
            self.high = high if self.high is None else torch.maximum(self.high, high)
            return x
        if self.scale is None:
            return x
        return self.fake_quantize(x, tuple(x.shape), self.scale, self.zero, torch.int8, -128, 127)

    def freeze(self) -> None:
        """Scale and zero point from the observed range, as ORT's ``compute_scale_zp`` makes them."""
        span = torch.stack([torch.minimum(self.low, torch.zeros(())), torch.maximum(self.high, torch.zeros(()))])
        self.scale, self.zero = self.choose(span, self.mapping.ASYMMETRIC, (2,), torch.int8, quant_min=-128,
                                            quant_max=127, eps=torch.finfo(torch.float32).tiny)
        self.low = self.high = None


class FakeQuantized:
    """``model`` with fake quantisation of its Conv / Linear weights, their inputs and its output."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # parametrize gives each layer a class of its own, shared by deep copies: removing it from a copy
        # would remove it here too, so plain() fills a copy taken before.
        self.template = copy.deepcopy(model).eval()
        self.layers = [m for m in model.modules() if isinstance(m, LAYERS)]
        if not self.layers:
            raise CompressError("qat-int8: the model has no Linear or Conv layer to quantise")
        for layer in self.layers:
            parametrize.register_parametrization(layer, "weight", WeightFakeQuant((layer.weight != 0).float()))
        self.points = [ActivationFakeQuant() for _ in range(len(self.layers) + 1)]
        self.hooks = [layer.register_forward_pre_hook(lambda _m, args, q=q: (q(args[0]), *args[1:]))
                      for layer, q in zip(self.layers, self.points)]
        out = self.points[-1]
        self.hooks.append(model.register_forward_hook(lambda _m, _args, y: out(y)))

    @contextlib.contextmanager
    def observing(self):
        """Record activation ranges of the model without rounding, as ORT calibrates the fp32 graph."""
        weights = [layer.parametrizations.weight[0] for layer in self.layers]
        for q in self.points:
            q.observing = True
        for w in weights:
            w.enabled = False
        try:
            yield
        finally:
            for q in self.points:
                q.observing = False
            for w in weights:
                w.enabled = True

    @torch.no_grad()
    def calibrate(self, batches: list[np.ndarray]) -> None:
        mode = self.model.training
        self.model.eval()
        with self.observing():
            for x in batches:
                self.model(torch.from_numpy(x))
        for q in self.points:
            q.freeze()
        self.model.train(mode)

    @torch.no_grad()
    def plain(self) -> nn.Module:
        """A copy without fake quantisation: the trained fp32 weights, pruned ones exactly zero."""
        model = copy.deepcopy(self.template)
        trained = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            param.copy_(trained[name] if name in trained else self._weight(name))
        statistics = dict(self.model.named_buffers())  # running means and variances moved while training
        for name, buffer in model.named_buffers():
            if name in statistics and statistics[name].shape == buffer.shape:
                buffer.copy_(statistics[name])
        return model

    def _weight(self, name: str) -> torch.Tensor:
        owner = self.model.get_submodule(name.rpartition(".")[0])
        return owner.parametrizations.weight.original * owner.parametrizations.weight[0].mask


def train_qat(model: nn.Module, train: Dataset, options: QatOptions, *, seed: int, log=None) -> FakeQuantized:
    """Fake-quantise a copy of ``model`` and train it ``options.steps`` steps on ``train``."""
    from shoal.compress.int8_static import calibration_batches
    from shoal.data.shard import fetch

    say = log or (lambda line: None)
    net = FakeQuantized(copy.deepcopy(model))
    calibration = calibration_batches(train, batches=options.calibrate, batch_size=32, seed=seed)
    net.calibrate(calibration)
    optimizer = torch.optim.SGD([p for p in net.model.parameters() if p.requires_grad], lr=options.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1)
    every = max(1, options.steps // 4)
    net.model.train()
    losses = []
    for step in range(options.steps):
        for group in optimizer.param_groups:
            group["lr"] = options.lr * 0.5 * (1 + math.cos(math.pi * step / options.steps))
        x, y = fetch(train, torch.randint(len(train), (options.batch_size,), generator=gen).tolist())
        loss = F.cross_entropy(net.model(x.float()), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == options.steps:
            net.calibrate(calibration)  # activation ranges follow the weights, as ORT will measure them
            say(f"qat step {step + 1}/{options.steps}: train loss {np.mean(losses[-every:]):.4f}")
    net.model.eval()
    return net


@QUANTIZERS.register("qat-int8", QatOptions)
def qat_int8(options: QatOptions, source: Path, target: Path, *, train: Dataset, seed: int, model: nn.Module,
             input_shape: tuple[int, ...], log=None) -> nn.Module:
    """Quantisation-aware training (torchao fake quantisation, ORT's grids), then ONNX Runtime static int8 QDQ.

    Returns the fake-quantised PyTorch model that was trained: the reference
    the int8 ONNX model is compared with.
    """
    from shoal.compress.int8_static import StaticOptions, int8_static
    from shoal.compress.onnx_export import export_onnx

    net = train_qat(model, train, options, seed=seed, log=log)
    trained = target.with_name(target.stem + ".fp32.onnx")
    try:
        export_onnx(net.plain(), input_shape, trained)
        int8_static(StaticOptions(batches=options.calibrate, batch_size=32, per_channel=True, method="minmax"),
                    trained, target, train=train, seed=seed)
    finally:
        trained.unlink(missing_ok=True)
    return net.model


qat_int8.trains = True  # run.py hands it the PyTorch model and measures against what it returns
