"""Model compression for edge deployment: prune, store sparse, export to ONNX,
quantise with ONNX Runtime, and measure size / latency / accuracy against the
uncompressed model.

Python API (the package itself is callable, like ``shoal.train``)::

    import shoal
    report = shoal.compress("examples/mnist1d.yaml", checkpoint="runs/demo",
                            prune="magnitude:sparsity=0.9", quantize=["int8-static"], out="runs/compressed")
    for row in report.rows:
        print(row.name, row.artefact_bytes, row.latency_ms_batch32, row.accuracy)

Pruners and quantizers register by name (``shoal list``); heavy libraries
(onnx, onnxruntime, torch-pruning) are imported only when used.
"""

from __future__ import annotations

import sys
import types

from shoal.compress import channels, fp16, int8_dynamic, int8_static, magnitude, qat  # noqa: F401  (register)
from shoal.compress.base import CompressError, Pruned
from shoal.compress.run import CompressReport, Row, compress
from shoal.models.artefact import load_artefact
from shoal.models.artefact_file import ArtefactOptions, read_artefact, save_artefact
from shoal.compress.budget import BudgetError, BudgetReport, search as search_budget  # noqa: E402  (uses run)

__all__ = ["compress", "CompressReport", "Row", "CompressError", "Pruned", "ArtefactOptions", "load_artefact",
           "read_artefact", "save_artefact", "search_budget", "BudgetReport", "BudgetError"]


class _CallableModule(types.ModuleType):
    # ``shoal.compress`` is both this package and the API call, as ``shoal.train``
    # is a call: Python binds the name to the package whenever it is imported,
    # so the package is made callable instead of fighting that binding.
    def __call__(self, *args, **kwargs) -> CompressReport:
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
