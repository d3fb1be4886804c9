"""Predictions -> numbers: confusion metrics, the per-class report, calibration error, reliability.

One place for every metric skinray reports, shared by training (each epoch's all-reduced confusion
matrix), evaluation (reports of runs and bundles) and the ensemble (calibration is fitted and
checked with these). The numbers are scikit-learn's where scikit-learn has them.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """The confusion matrix (rows: true class, columns: predicted) of whole label arrays."""
    matrix = np.zeros((num_classes, num_classes))
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def confusion_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 from a confusion matrix (rows: truth, columns: prediction).

    Used every epoch on the all-reduced matrix of all workers; equals scikit-learn's
    `accuracy_score` and `f1_score(average="macro", zero_division=0)` over the labels that occur.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum()
    true_pos = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    denominator = support + predicted
    f1 = np.divide(2 * true_pos, denominator, out=np.zeros_like(true_pos), where=denominator > 0)
    present = denominator > 0
    return {
        "accuracy": float(true_pos.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def build_report(
    y_true: np.ndarray, probabilities: np.ndarray, classes: list[str], top_k: tuple[int, ...] = (3, 5)
) -> dict:
    """The full report for integer labels and per-class probabilities (scikit-learn's numbers)."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    labels = np.arange(len(classes))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    report = {"num_images": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    # Averages over the classes that occur in the truth or the predictions (scikit-learn's default).
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        report |= {f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)}
    for k in top_k:
        if k < len(classes):
            report[f"top_{k}_accuracy"] = float(
                top_k_accuracy_score(y_true, probabilities, k=k, labels=labels)
            )
    report["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    }
    report["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    report["classes"] = list(classes)
    return report


# === Calibration ===


def reliability_bins(probabilities: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width confidence bins: for each, how many images, their mean confidence and accuracy.

    Confidence is the top probability; a bin covers (lower, upper], the first also 0.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        rows.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "confidence": float(confidence[members].mean()) if count else 0.0,
                "accuracy": float(correct[members].mean()) if count else 0.0,
            }
        )
    return rows


def expected_calibration_error(probabilities: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE (Guo et al. 2017): the count-weighted mean gap between confidence and accuracy per bin."""
    rows = reliability_bins(probabilities, y_true, bins)
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / max(total, 1))


def negative_log_likelihood(probabilities: np.ndarray, y_true: np.ndarray) -> float:
    """Mean log-loss of the true class (scikit-learn's `log_loss` over all classes)."""
    from sklearn.metrics import log_loss

    p = np.asarray(probabilities, np.float64)  # float32 rows sum to 1 only within rounding
    return float(log_loss(y_true, p / p.sum(axis=1, keepdims=True), labels=np.arange(p.shape[1])))


def selective_metrics(probabilities: np.ndarray, y_true: np.ndarray, threshold: float) -> dict[str, float]:
    """Coverage (share answered: top probability >= threshold) and accuracy on the answered images."""
    answered = probabilities.max(axis=1) >= threshold
    correct = probabilities.argmax(axis=1) == y_true
    return {
        "threshold": float(threshold),
        "coverage": float(answered.mean()) if len(y_true) else 0.0,
        "answered_accuracy": float(correct[answered].mean()) if answered.any() else 0.0,
    }


def summary_metrics(probabilities: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """The headline numbers of one model on one split: accuracy, macro-F1, log-loss, ECE."""
    from sklearn.metrics import accuracy_score, f1_score

    y_pred = probabilities.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "log_loss": negative_log_likelihood(probabilities, y_true),
        "ece": expected_calibration_error(probabilities, y_true),
    }
