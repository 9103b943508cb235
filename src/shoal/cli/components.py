"""``shoal list``: every registered component, one table per registry.

(Not ``list.py``: a submodule of that name would shadow the builtin in ``shoal.cli``'s namespace.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from shoal.registry import Registry


def list_components() -> None:
    """List every registered component: datasets, models, tasks, strategies, codecs, federated
    strategies, partitions, pruners and quantizers, each with its options and their defaults."""
    from shoal.registry import ALL, load_builtins

    from shoal.config import TrainConfig

    load_builtins()
    console = Console()
    for registry in ALL:
        console.print(registry_table(registry))
    console.print(options_table("train options (train.KEY in a config, or --set train.KEY=...)", TrainConfig))


def options_table(title: str, model: Any) -> Table:
    """A config section's keys: default and what each does (precision, accumulation, clipping, ...)."""
    table = Table(title=title, show_header=True)
    table.add_column("key", style="bold", overflow="fold")
    table.add_column("default", overflow="fold")
    table.add_column("what it does", overflow="fold")
    for key, field in model.model_fields.items():
        allowed = getattr(field.annotation, "__args__", None)
        what = field.description or ""
        if allowed and all(isinstance(a, str) for a in allowed):  # a Literal: name the choices
            what = f"{' | '.join(allowed)}: {what}" if what else " | ".join(allowed)
        table.add_row(key, _default(field), what or "-")
    return table


def registry_table(registry: Registry[Any]) -> Table:
    """One row per name: its options (``key=default``, ``key=<required>``) and what it is. Every
    column wraps, folding a word longer than the column, so nothing is cut at 80 columns."""
    table = Table(title=registry.plural, show_header=True)
    table.add_column("name", style="bold", overflow="fold")
    table.add_column("options", overflow="fold")
    table.add_column("what it is", overflow="fold")
    for name, summary in registry:
        fields = registry.options_model(name).model_fields
        options = ", ".join(f"{key}={_default(field)}" for key, field in fields.items())
        table.add_row(name, options or "-", summary)
    return table


def _default(field: FieldInfo) -> str:
    """A pydantic field's default as a user would write it; ``<required>`` when it has none."""
    if field.is_required():
        return "<required>"
    if getattr(field, "default_factory_takes_data", False):  # depends on the other fields' values
        return "..."
    return repr(field.get_default(call_default_factory=True))
