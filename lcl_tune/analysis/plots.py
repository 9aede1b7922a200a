"""Figures people would rather look at than read: confusion matrices, the search space against the
metric (parallel coordinates), parameter importances. matplotlib only, headless (Agg)."""

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
    """Row-normalised confusion matrix (colour) with the raw counts written in each cell."""
    plt = _plt()
    m = np.asarray(cm, dtype=float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(labels)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
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
    plt.close(fig)
    return Path(path)


def parallel_coordinates_png(rows: list[dict[str, Any]], params: list[str], metric: str, path: str | Path,
                             title: str = "") -> Path:
    """One line per trial across the searched parameters, coloured by ``metric`` (categorical
    parameters are spread over evenly spaced positions, log-scaled ones drawn in log space)."""
    plt = _plt()
    axes_names = params + [metric]
    cols: list[np.ndarray] = []
    ticks: list[tuple[list[float], list[str]]] = []
    for name in axes_names:
        values = [r.get(name) for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in values if v is not None)
        if numeric and any(v is not None for v in values):
            arr = np.array([np.nan if v is None else float(v) for v in values])
            finite = arr[np.isfinite(arr)]
            log = finite.size > 1 and finite.min() > 0 and finite.max() / finite.min() > 20
            arr = np.log10(arr) if log else arr
            lo, hi = np.nanmin(arr), np.nanmax(arr)
            scaled = (arr - lo) / (hi - lo) if hi > lo else np.full_like(arr, 0.5)
            labels = [f"{(10 ** v if log else v):.3g}" for v in (lo, hi)]
            ticks.append(([0.0, 1.0], labels))
        else:
            cats = sorted({str(v) for v in values if v is not None})
            pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
            scaled = np.array([np.nan if v is None else pos[str(v)] for v in values])
            ticks.append((list(pos.values()), list(pos)))
        cols.append(scaled)
    data = np.vstack(cols).T if cols else np.zeros((0, 0))
    score = data[:, -1] if data.size else np.array([])
    fig, ax = plt.subplots(figsize=(1.8 * len(axes_names) + 2, 4.5))
    cmap = plt.get_cmap("viridis")
    order = np.argsort(np.nan_to_num(score, nan=-1.0))
    for i in order:
        colour = cmap(score[i]) if np.isfinite(score[i]) else (0.7, 0.7, 0.7, 0.6)
        ax.plot(range(len(axes_names)), data[i], color=colour, alpha=0.85, lw=1.6, marker="o", ms=3)
    for x, (pos, labels) in enumerate(ticks):
        ax.axvline(x, color="black", lw=0.6)
        for p, lab in zip(pos, labels):
            ax.text(x + 0.03, p, lab, fontsize=7, va="center")
    ax.set_xticks(range(len(axes_names)), axes_names, rotation=15)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title or f"trials: search space vs {metric} (colour)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def importance_png(importances: dict[str, float], path: str | Path, title: str = "") -> Path:
    plt = _plt()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, Optuna)")
    ax.set_title(title or "parameter importance for the study metric")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
