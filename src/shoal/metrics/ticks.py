"""Numbers and tick labels a person reads at a glance, for every plot and report shoal draws.

Matplotlib's defaults label a log axis ``10⁻¹, 2×10⁰`` and a narrow linear one
with an offset (``+2.3`` in the corner); a round count may get ``2.5``. Here a
log axis reads ``0.1 0.2 0.5 1 2``, a linear one plain decimals, and a counted
axis (rounds, steps) integers only.
"""

from __future__ import annotations

import math

from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.ticker import LogFormatter, LogFormatterSciNotation, MaxNLocator, ScalarFormatter


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits (all of its integer part), thousands separated:
    0.03541 -> 0.0354, 12.34 -> 12.3, 1234.56 -> 1,235."""
    rounded = float(f"{value:.{digits - 1}e}")  # its magnitude once rounded: 9.999 shows as 10.0
    decimals = 0 if rounded == 0 else max(0, digits - 1 - math.floor(math.log10(abs(rounded))))
    return f"{value:,.{decimals}f}"


def plain_number(x: float) -> str:
    """A tick's value: :func:`significant` without trailing zeros, so 0.30000000000000004 -> 0.3,
    2 -> 2, 0.00002 -> 0.00002, 20000 -> 20,000."""
    if not math.isfinite(x):
        return str(x)
    text = significant(x)
    return text.rstrip("0").rstrip(".") if "." in text else text


class PlainLogFormatter(LogFormatter):
    """Matplotlib's choice of which log ticks to label (decades, and between them only when the axis spans
    few decades), written as plain numbers."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return plain_number(x) if super().__call__(x, pos) else ""


def _plain_axis(axis: Axis) -> None:
    # Only matplotlib's own number formatters are replaced: a categorical axis keeps its names.
    if axis.get_scale() in ("log", "symlog") and type(axis.get_major_formatter()) is LogFormatterSciNotation:
        base = getattr(axis.get_transform(), "base", 10)
        axis.set_major_formatter(PlainLogFormatter(base))
        axis.set_minor_formatter(PlainLogFormatter(base, labelOnlyBase=False))
    elif axis.get_scale() == "linear" and type(axis.get_major_formatter()) is ScalarFormatter:
        formatter = ScalarFormatter(useOffset=False)
        formatter.set_scientific(False)
        axis.set_major_formatter(formatter)


def plain_ticks(ax: Axes, *, integer_x: bool = False) -> None:
    """Plain tick labels on both of ``ax``'s axes (call after setting their scales); with ``integer_x``
    the x axis counts something (rounds) and gets whole-number ticks only."""
    _plain_axis(ax.xaxis)
    _plain_axis(ax.yaxis)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
