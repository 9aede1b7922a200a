"""Classification metrics from a confusion matrix (numpy only, no scikit-learn needed).

The paper reports accuracy and *weighted* F1 (per-class F1 averaged with true-class support as
weights); macro-F1 is the usual companion for imbalanced label sets such as GoEmotions.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    """[C, C] int64 counts; row = true class, column = predicted class."""
    flat = labels.astype(np.int64) * num_labels + preds.astype(np.int64)
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 of each class; 0 where the class is neither present nor predicted (no 0/0 = NaN)."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # (tp + fp) + (tp + fn)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, label_names: list[str]) -> dict:
    """Scalars (accuracy, macro_f1, weighted_f1) plus per-class F1 and the confusion matrix.

    Macro-F1 averages over the classes that occur in the labels or the predictions, as
    scikit-learn does, so a dev sample missing a rare class is not penalised for it.
    """
    c = len(label_names)
    cm = confusion_matrix(labels, preds, c)
    f1 = per_class_f1(cm)
    support = cm.sum(1)
    seen = (support + cm.sum(0)) > 0
    n = max(int(support.sum()), 1)
    return {
        "accuracy": float(np.trace(cm) / n),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / n),
        "per_class_f1": {name: float(v) for name, v in zip(label_names, f1)},
        "confusion": cm.tolist(),
    }
