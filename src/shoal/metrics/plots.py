"""``curves.png``: training loss and test accuracy against wall time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from shoal.metrics.writer import read_metrics  # noqa: E402


def plot_curves(metrics_path: str | Path, out_path: str | Path, *, title: str = "") -> None:
    records = read_metrics(metrics_path)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    train = [(r["time_s"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["time_s"], r["test_accuracy"]) for r in records if "test_accuracy" in r]
    if train:
        ax_loss.plot(*zip(*train), lw=0.8, label="train loss (rank 0)")
        ax_loss.legend()
    ax_loss.set(xlabel="wall time (s)", ylabel="loss", yscale="log")
    if evals:
        ax_acc.plot(*zip(*evals), marker="o", label="test accuracy")
    ax_acc.set(xlabel="wall time (s)", ylabel="accuracy", ylim=(0, 1))
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(out_path).with_name(f".{Path(out_path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
