"""Figures people would rather look at than read: confusion matrices, and the saving of figures
that libraries draw (Optuna's parallel coordinates and importances). matplotlib only, headless (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(cm: Sequence[Sequence[int]], labels: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (colour) with the raw counts written in each cell. Drawn on
    a figure of its own (no pyplot state), so a sender thread can draw it while others run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(cm, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(labels)
    size = max(4.0, 0.45 * n + 2)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (rows normalised)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def save_figure(figure: Any, path: str | Path, title: str = "") -> Path:
    """Save a figure drawn by a library (an ``Axes`` or an array of them, as Optuna's matplotlib
    plots return) as a PNG, with ``title`` over it, and close it."""
    plt = _plt()
    axes = np.ravel(figure)
    fig = axes[0].get_figure()
    if title:
        fig.suptitle(title)
    fig.set_size_inches(max(fig.get_size_inches()[0], 8.0), max(fig.get_size_inches()[1], 5.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
