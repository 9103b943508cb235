"""What the ``shoal`` commands share: the one way to fail, config errors, consoles, ``-h``.

Imports stay light (typer, rich, the config module): ``import shoal.cli`` must not import torch,
so every command imports what it runs inside its own function. The tables a command prints are
drawn by the module that owns their figures (``shoal.metrics.report``, ``shoal.fl.report``,
``shoal.bench.codecs``, ...); the command prints them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from shoal.config import ConfigError

err_console = Console(stderr=True)
# Every Typer app and sub-app takes these, so that ``-h`` works as ``--help`` at each level.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


def fail(message: str, what: str = "config error", code: int = 2) -> NoReturn:
    """Print ``WHAT: MESSAGE`` to stderr and exit with CODE: 2 when the command was given something it
    cannot use, 1 when it ran and failed. MESSAGE is printed as it is (no rich markup)."""
    err_console.print(f"[red]{what}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def config_errors(*also: type[Exception]) -> Iterator[None]:
    """Fail with a config error (exit 2) on a ConfigError, or one of the types ALSO, raised inside:
    ``with config_errors(ValueError): cfg = load_config(...)``."""
    try:
        yield
    except (ConfigError, *also) as err:
        fail(str(err))


def wide_console(width: int) -> Console:
    """A stdout console for a table WIDTH columns wide: where output is no terminal (a pipe, a log
    file) rich would squeeze it to 80."""
    return Console() if Console().is_terminal else Console(width=width)


def log_to(console: Console) -> Callable[[str], None]:
    """The ``log`` callback a long command hands its library: each progress line printed as it is."""
    return lambda line: console.print(line, highlight=False, markup=False)


def slowdown_overrides(items: list[str]) -> list[str]:
    """``--slowdown 3:3.0`` -> ``--set slowdown.factors.3=3.0`` (shoal train and shoal bench straggler)."""
    overrides = []
    for item in items:
        rank, sep, factor = item.partition(":")
        if not sep or not rank.strip().isdigit():
            fail(f"--slowdown {item!r}: expected RANK:FACTOR, e.g. 3:3.0")
        try:
            float(factor)
        except ValueError:
            fail(f"--slowdown {item!r}: FACTOR must be a number >= 1")
        overrides.append(f"slowdown.factors.{int(rank)}={factor}")
    return overrides
