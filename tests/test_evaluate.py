import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from skinray.evaluate import write_report
from skinray.metrics import build_report, confusion_metrics

CLASSES = ["a", "b", "c", "d", "e", "f"]


@pytest.fixture
def predictions():
    rng = np.random.default_rng(7)
    y_true = rng.integers(0, 6, 200)
    y_true[y_true == 5] = 4  # class "f" never occurs in the truth
    logits = rng.normal(size=(200, 6)) + 2.0 * np.eye(6)[y_true]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probabilities


def test_report_equals_scikit_learn(predictions):
    y_true, probabilities = predictions
    y_pred = probabilities.argmax(axis=1)
    report = build_report(y_true, probabilities, CLASSES)
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert report["weighted_f1"] == pytest.approx(
        f1_score(y_true, y_pred, average="weighted", zero_division=0)
    )
    assert report["top_3_accuracy"] == pytest.approx(
        top_k_accuracy_score(y_true, probabilities, k=3, labels=range(6))
    )
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(6), zero_division=0)
    for i, name in enumerate(CLASSES):
        row = report["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i])
        )
    assert report["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=range(6)).tolist()


def test_epoch_metrics_from_the_confusion_matrix_equal_scikit_learn(predictions):
    y_true, probabilities = predictions
    y_pred = probabilities.argmax(axis=1)
    scores = confusion_metrics(confusion_matrix(y_true, y_pred, labels=range(6)))
    assert scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))


def test_written_files_of_a_two_member_ensemble(predictions, tmp_path):
    """The report of a calibrated two-member ensemble (models are not needed to combine logits)."""
    from skinray.evaluate import model_report
    from skinray.predictor import Member, Predictor

    y_true, probabilities = predictions
    logits = np.stack([np.log(probabilities) * 0.5, np.log(probabilities) * 2.0])  # under-, over-confident
    predictor = Predictor(
        [
            Member("00-a", None, "tiny", 48, temperature=0.5, weight=0.4),
            Member("01-b", None, "tiny", 64, temperature=2.0, weight=0.6),
        ],
        CLASSES,
        "m",
        threshold=0.5,
    )
    report = model_report(
        predictor, predictor.combine(logits), predictor.combine_uncalibrated(logits), y_true
    )
    report |= {"model": "m", "split": "test", "failed_files": []}
    # Both temperatures undo the distortion exactly: the calibrated ensemble is the original model.
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, probabilities.argmax(axis=1)))
    assert report["calibration"]["log_loss_after"] < report["calibration"]["log_loss_before"]
    assert set(report["members"]) == {"00-a", "01-b"}
    paths = write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text())["macro_f1"] == report["macro_f1"]
    assert json.loads(paths["confusion_json"].read_text())["classes"] == CLASSES
    markdown = paths["markdown"].read_text()
    assert "| a |" in markdown and "| **ensemble** |" in markdown and "F1 01-b" in markdown
    for png in ("confusion_png", "reliability_png"):
        assert paths[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
