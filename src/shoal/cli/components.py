"""``shoal list``: every registered component, one table per registry.

(Not ``list.py``: a submodule of that name would shadow the builtin in ``shoal.cli``'s namespace.)
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def list_components() -> None:
    """List the registered datasets, models, strategies, codecs, pruners and quantizers."""
    from shoal.registry import CODECS, DATASETS, MODELS, PRUNERS, QUANTIZERS, STRATEGIES, load_builtins

    load_builtins()
    console = Console()
    for registry in (DATASETS, MODELS, STRATEGIES, CODECS, PRUNERS, QUANTIZERS):
        table = Table(title=registry.plural, show_header=True)
        table.add_column("name", style="bold")
        table.add_column("options")
        table.add_column("what it is")
        for name, summary in registry:
            fields = registry.options_model(name).model_fields
            opts = ", ".join(f"{k}={f.default!r}" if f.default_factory is None else f"{k}=..." for k, f in fields.items())
            table.add_row(name, opts or "-", summary)
        console.print(table)
