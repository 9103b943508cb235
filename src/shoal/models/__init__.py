"""Reference models, registered by name, and the user entry-point path."""

from shoal.models.build import build_model, count_parameters
from shoal.models import artefact, cnn, mlp, resnet, transformer  # noqa: F401  (register)

__all__ = ["build_model", "count_parameters"]
