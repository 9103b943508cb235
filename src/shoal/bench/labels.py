"""Labels beside a scatter plot's points that cover neither each other nor another point."""

from __future__ import annotations

import math
from typing import Any, Sequence

from matplotlib.transforms import Bbox


def label_points(ax: Any, xy: Sequence[tuple[float, float]], labels: Sequence[str], *, fontsize: float = 7,
                 **style: Any) -> list[Any]:
    """Annotate each point of ``ax`` with its label where the label covers no other label and no marker:

    1. take the figure's final layout (call after ``tight_layout``): placement is in pixels;
    2. for each point, try positions around it, nearest first, then further out;
    3. keep the first whose box is inside the axes, clear of the labels placed so far and of a margin
       around every other marker, and whose centre is nearer its own point than any other (so a reader
       pairs them right), else the one scoring least; a label away from its point gets a leader line.
    """
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    margin = 9 * ax.figure.dpi / 72  # pixels: the Pareto front's ring (markersize 11) and some air
    pixels = ax.transData.transform(xy)
    markers = [Bbox.from_bounds(px - margin, py - margin, 2 * margin, 2 * margin) for px, py in pixels]
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    offsets = [(dx * d, dy * d) for d in (7, 14, 24, 36) for dx, dy in directions]  # points
    placed: list[Bbox] = []
    notes = []
    for i, ((x, y), label) in enumerate(zip(xy, labels)):
        obstacles = [*placed, *markers[:i], *markers[i + 1:]]
        note = ax.annotate(label, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=fontsize, **style)
        best = None
        for dx, dy in offsets:
            note.xyann = (dx, dy)
            note.set(ha=_align(dx, "left", "right"), va=_align(dy, "bottom", "top"))
            box = note.get_window_extent(renderer).padded(1)
            outside = _area(box) - _area(Bbox.intersection(box, frame))
            score = 10 * outside + sum(_area(Bbox.intersection(box, other)) for other in obstacles)
            centre = ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
            if min(range(len(pixels)), key=lambda j: math.dist(pixels[j], centre)) != i:
                score += _area(box) / 2
            if best is None or score < best[0]:
                best = (score, (dx, dy), box)
            if score == 0:
                break
        _, (dx, dy), box = best
        note.xyann = (dx, dy)
        note.set(ha=_align(dx, "left", "right"), va=_align(dy, "bottom", "top"))
        if max(abs(dx), abs(dy)) > offsets[0][0]:
            # A leader line: one more annotation, the line alone, so the label's box stays as measured.
            ax.annotate("", (x, y), xytext=(dx, dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5", "shrinkA": 0, "shrinkB": 4})
        placed.append(box)
        notes.append(note)
    return notes


def _align(offset: float, positive: str, negative: str) -> str:
    """The text's anchor for a label offset this way from its point (away from the point)."""
    return positive if offset > 0 else negative if offset < 0 else "center"


def _area(box: Bbox | None) -> float:
    return 0.0 if box is None else box.width * box.height
