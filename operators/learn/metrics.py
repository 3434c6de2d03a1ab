"""Classification metrics from confusion matrices (mergeable across workers), and class weights."""
from __future__ import annotations

import numpy as np

def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(np.asarray(y_true, np.int64) * n + np.asarray(y_pred, np.int64), minlength=n * n).reshape(n, n)


def scores(cm: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 from a confusion matrix (rows: true, columns: predicted)."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    return {"accuracy": float(tp.sum() / total) if total else 0.0,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0}


def class_weights(counts: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights, mean 1 over the classes present (balanced, as scikit-learn's)."""
    counts = np.asarray(counts, dtype=np.float64)
    w = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
    return w.astype(np.float32)


