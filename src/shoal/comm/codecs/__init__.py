"""Gradient codecs, one per file, registered by name in ``shoal.registry.CODECS``."""

from shoal.comm.codecs.base import Capabilities, Codec, CodecOptions, Payload, build_codec, codecs_that
from shoal.comm.codecs import auto, fp16, int8, none, powersgd, qsgd, randk, signsgd, terngrad, threshold, topk  # noqa: F401

__all__ = ["Capabilities", "Codec", "CodecOptions", "Payload", "build_codec", "codecs_that"]
