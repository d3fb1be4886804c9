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


def test_subgroup_report_intervals_and_the_worst_group_gap():
    """Per group: the metrics of its images, each inside its bootstrap interval; the gap between
    the best and worst group leaves out the images without metadata."""
    from skinray.subgroups import NO_METADATA, report

    rng = np.random.default_rng(0)
    n, k = 300, 4
    labels = rng.integers(0, k, n)
    groups = np.array(["light"] * 120 + ["dark"] * 120 + [NO_METADATA] * 60)
    correct = np.where(groups == "dark", rng.random(n) < 0.5, rng.random(n) < 0.9)
    predicted = np.where(correct, labels, (labels + 1) % k)
    probabilities = np.full((n, k), 0.1 / (k - 1))
    probabilities[np.arange(n), predicted] = 0.9
    data = {
        "labels": labels,
        "probabilities": probabilities,
        "abstained": groups == "dark",
        "ood": np.zeros(n, bool),
        "in_set": probabilities > 0.02,  # every class: covered
    }
    r = report(list(groups), data, resamples=300)
    assert list(r["groups"]) == ["dark", "light", NO_METADATA]
    for name, g in r["groups"].items():
        mask = groups == name
        assert g["images"] == mask.sum()
        assert g["accuracy"] == pytest.approx(correct[mask].mean())
        for metric, (low, high) in g["intervals"].items():
            assert low <= g[metric] + 1e-9 and g[metric] <= high + 1e-9, (name, metric)
    assert r["groups"]["dark"]["abstained"] == 1.0 and r["groups"]["light"]["coverage"] == 1.0
    gap = r["gap"]
    assert (gap["best"], gap["worst"]) == ("light", "dark")
    assert gap["accuracy_gap"] == pytest.approx(
        correct[groups == "light"].mean() - correct[groups == "dark"].mean()
    )
    assert 0.25 < gap["interval"][0] < gap["accuracy_gap"] < gap["interval"][1] < 0.6
    assert report(["a"] * 10, {key: v[:10] for key, v in data.items()}, resamples=100)["gap"] is None
