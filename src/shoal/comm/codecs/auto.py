"""``auto``: the codec is chosen at the first step from measurements of this job.

Not a codec itself: the ``sync`` and ``localsgd`` strategies see it, probe
the link and the step (``shoal.comm.codec_choice``) and put the chosen codec in its
place before the first gradient is sent. Every worker makes the same choice.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload
from shoal.registry import CODECS

Candidate = Literal["none", "fp16", "bf16", "int8", "topk", "powersgd"]


class AutoOptions(CodecOptions):
    memory: Literal["none", "ef"] = Field("ef", description="error feedback for the lossy candidates")
    candidates: list[Candidate] = Field(
        default_factory=lambda: ["none", "fp16", "topk", "powersgd"], min_length=1,
        description="codecs to choose between",
    )
    topk_ratio: float = Field(0.01, gt=0, le=1, description="fraction of values the topk candidate sends")
    topk_steps: float = Field(
        1.35, ge=1, description="steps to a target with topk relative to fp32 (1.35 measured at ratio 0.01 with EF)"
    )
    powersgd_rank: int = Field(4, ge=1, le=64, description="rank of the powersgd candidate")
    powersgd_steps: float = Field(
        1.25, ge=1, description="steps to a target with powersgd relative to fp32 (1.25 measured at rank 4 with EF)"
    )
    int8_steps: float = Field(1.05, ge=1, description="steps to a target with int8 relative to fp32")
    probe_mb: float = Field(2.0, gt=0, le=256, description="size of the timed all-reduce that measures bandwidth")
    probe_steps: int = Field(3, ge=1, le=50, description="timed forward+backward passes that measure compute")


@CODECS.register("auto", AutoOptions)
class AutoCodec(Codec):
    """Measure link and compute at start-up, pick the codec predicted fastest to target."""

    # Chooses per bucket from measurements of the cluster; summable as far as the
    # hook is concerned (each bucket goes through the codec chosen for it).
    capabilities = Capabilities(summable=True, standalone=False, per_bucket=True)

    def encode(self, tensor: torch.Tensor) -> Payload:
        raise RuntimeError(
            "codec 'auto' is replaced by the codec it chooses at the first step; "
            "use it through the sync or localsgd strategy"
        )

    def decode(self, payload: Payload) -> torch.Tensor:
        return self.encode(payload.tensors[0])
