"""plumbing/plots.py: pictures, drawn to PNG files without a display: matplotlib set up for files
only, an atomic PNG writer, and train.py's loss curve.
"""

import io

from plumbing.files import atomic_write_bytes
from plumbing.runs import read_metrics


def pyplot():
    """matplotlib.pyplot drawing to files only (no window, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, png_path, dpi=110):
    """Write a matplotlib figure as a PNG atomically, and close it."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(png_path, png.getvalue())


def save_plot(metrics_path, png_path):
    """Train vs validation loss curve (the overfitting view)."""
    plt = pyplot()
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (per step)", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, png_path, dpi=100)
