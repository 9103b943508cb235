"""``curves.png``: training loss and test accuracy against wall time, or against rounds for a federated run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shoal.metrics.ticks import plain_ticks  # noqa: E402
from shoal.metrics.writer import read_metrics  # noqa: E402


def plot_curves(metrics_path: str | Path, out_path: str | Path, *, title: str = "", metric: str = "accuracy") -> None:
    """Training loss and the test ``metric`` (the task's main one): accuracy on a 0..1 axis, others scaled to fit."""
    records = read_metrics(metrics_path)
    # A federated run's records carry their round: progress is counted in rounds, not seconds.
    by_round = any("round" in r for r in records)
    x, xlabel = ("round", "round") if by_round else ("time_s", "wall time (s)")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    train = [(r[x], r["loss"]) for r in records if "loss" in r and x in r]
    key = f"test_{metric}"
    evals = [(r[x], r[key]) for r in records if key in r and x in r]
    if train:
        ax_loss.plot(*zip(*train), lw=0.8, label="train loss (rank 0)")
        ax_loss.legend()
    ax_loss.set(xlabel=xlabel, ylabel="loss", yscale="log")
    if evals:
        ax_acc.plot(*zip(*evals), marker="o", label=f"test {metric}")
    ax_acc.set(xlabel=xlabel, ylabel=metric, **({"ylim": (0, 1)} if metric == "accuracy" else {}))
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        plain_ticks(ax, integer_x=by_round)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(out_path).with_name(f".{Path(out_path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
