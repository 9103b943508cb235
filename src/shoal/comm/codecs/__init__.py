"""Gradient codecs, one per file, registered by name in ``shoal.registry.CODECS``."""

from shoal.comm.codecs.base import Codec, Payload, build_codec
from shoal.comm.codecs import none  # noqa: F401  (registers)

__all__ = ["Codec", "Payload", "build_codec"]
