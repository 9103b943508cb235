"""Gradient codecs, one per file, registered by name in ``shoal.registry.CODECS``."""

from shoal.comm.codecs.base import Codec, CodecOptions, Payload, build_codec
from shoal.comm.codecs import auto, fp16, int8, none, powersgd, qsgd, randk, signsgd, terngrad, threshold, topk  # noqa: F401

__all__ = ["Codec", "CodecOptions", "Payload", "build_codec"]
