"""Reference models, registered by name, the user entry-point path, and the sparse
artefact file format that ``shoal compress`` writes and ``model: artefact`` reads."""

from shoal.models.build import build_model, count_parameters
from shoal.models import artefact, cnn, mlp, resnet, transformer  # noqa: F401  (register)

__all__ = ["build_model", "count_parameters"]
