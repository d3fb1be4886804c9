"""Predictions -> per-class report: accuracy, top-k, precision/recall/F1/support, confusion matrix.

The last stage of a training run and the check on every model skinray produces. `skinray evaluate`
scores a split of an archive with a trained model (a run directory, a checkpoint or a `.keras`
file; later an ensemble bundle, through the same `Predictor`) and writes `report.json`, a readable
`report.md` and the confusion matrix as JSON and PNG. The numbers are scikit-learn's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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


def build_report(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str],
                 top_k: tuple[int, ...] = (3, 5)) -> dict:
    """The full report for integer labels and per-class probabilities (scikit-learn's numbers)."""
    from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                                 top_k_accuracy_score)

    labels = np.arange(len(classes))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    report = {"num_images": int(len(y_true)), "accuracy": float(accuracy_score(y_true, y_pred))}
    # Averages over the classes that occur in the truth or the predictions (scikit-learn's default).
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        report |= {f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)}
    for k in top_k:
        if k < len(classes):
            report[f"top_{k}_accuracy"] = float(top_k_accuracy_score(y_true, probabilities, k=k, labels=labels))
    report["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support)
    }
    report["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    report["classes"] = list(classes)
    return report


# === Writing ===


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    """Writes report.json, report.md, confusion_matrix.json and confusion_matrix.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "confusion_json": out / "confusion_matrix.json",
        "confusion_png": out / "confusion_matrix.png",
    }
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["confusion_json"].write_text(json.dumps(
        {"classes": report["classes"], "matrix": report["confusion_matrix"]}, indent=2))
    paths["markdown"].write_text(_markdown(report))
    _plot_confusion(np.array(report["confusion_matrix"]), report["classes"], paths["confusion_png"])
    return paths


def _markdown(report: dict) -> str:
    lines = [f"# Evaluation: {report.get('model', 'model')} on {report.get('split', 'split')}", ""]
    lines.append(f"{report['num_images']} images; accuracy **{report['accuracy']:.4f}**, "
                 f"macro-F1 **{report['macro_f1']:.4f}**, weighted-F1 {report['weighted_f1']:.4f}")
    for key in sorted(k for k in report if k.startswith("top_")):
        lines.append(f"- {key.replace('_', ' ')}: {report[key]:.4f}")
    if report.get("failed_files"):
        lines.append(f"- unreadable files (not scored): {len(report['failed_files'])}")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name, row in report["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
    return "\n".join(lines) + "\n"


def _plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    side = max(6, 0.45 * len(classes) + 3)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    labels = [c if len(c) <= 28 else c[:26] + "…" for c in classes]
    ax.set_xticks(range(len(classes)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), labels, fontsize=7)
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=6,
                    color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (colour: share of the true class)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# === The evaluate command ===


def evaluate(model_path: str, archive: str, split: str, out: str, batch_size: int = 32) -> dict:
    """Scores one split of an archive with a trained model and writes the report to `out`.

    The validation split is re-derived with the run's own seed and fraction, so `--split val`
    scores exactly the images the run validated on. Archive classes are matched to the model's by
    name; an archive class the model does not know is an error.
    """
    import pyarrow as pa

    from skinray import UserError
    from skinray.config import save_config
    from skinray.data.catalog import list_archive, splits
    from skinray.data.pipeline import FailureLog, ImageSource, iter_stream, stream
    from skinray.predictor import Predictor

    from skinray.cluster import connect

    predictor = Predictor.from_path(model_path)
    catalog = list_archive(archive)
    connect()
    parts = splits(catalog, predictor.config.data.val_fraction, predictor.config.data.seed)
    if split not in parts:
        raise UserError(f"archive '{archive}' has no {split} split (it has: {', '.join(parts)})")
    unknown = sorted(set(catalog.classes) - set(predictor.classes))
    if unknown:
        raise UserError(f"the model does not know the archive's classes: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(predictor.classes)}
    table = parts[split]
    table = table.set_column(table.schema.get_field_index("label_index"), "label_index",
                             pa.array([index[c] for c in table["label"].to_pylist()], pa.int32()))

    failures, labels, probabilities = FailureLog(), [], []
    ds = stream(table, source=ImageSource.of(catalog, predictor.config.data.max_pixels),
                size=predictor.image_size, batch_size=batch_size)
    for batch in iter_stream(ds, batch_size):
        failures.add(batch)
        ok = batch["ok"]
        labels.append(batch["label_index"][ok])
        probabilities.append(predictor.predict(batch["image"][ok]))
    if not labels or not sum(len(x) for x in labels):
        raise UserError(f"no image of the {split} split could be read ({failures.summary()})")
    report = build_report(np.concatenate(labels), np.concatenate(probabilities), predictor.classes)
    report |= {"model": predictor.source, "split": split, "archive": archive,
               "failed_files": [{"path": p, "reason": r} for p, r in failures.files.items()]}
    write_report(report, out)
    save_config(predictor.config, out)  # the evaluated model's resolved config, next to its report
    return report


def evaluate_from_args(args) -> int:
    report = evaluate(args.model, args.data, args.split, args.out, args.batch_size)
    print(f"{report['num_images']} images of the {args.split} split: accuracy {report['accuracy']:.4f}, "
          f"macro-F1 {report['macro_f1']:.4f}; {len(report['failed_files'])} unreadable")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
