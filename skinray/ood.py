"""Out-of-distribution refusal: a photo unlike every image the bundle was fitted on is not answered.

A classifier gives a confident label to anything, a photo of a temple or a scanned letter
included. Each member therefore also scores how far an image's pooled backbone features lie from
those of known images, with the Mahalanobis distance of Lee et al. 2018: the squared distance to
the nearest class mean under the covariance shared by the classes (estimated with Ledoit-Wolf
shrinkage: a covariance of hundreds or thousands of dimensions from a few hundred images is
otherwise singular). `benchmarks/ood.py` measured it against the k-nearest-neighbour distance of
Sun et al. 2022 and the maximum softmax probability on three foreign image sets; it was chosen on
those measurements (docs/bundle-and-scoring.md, "Out of distribution").

At `skinray ensemble`: class means and the shared precision come from the training images (a
seeded sample of at most `ensemble.ood_reference_images`); each member's scores on the half of
the validation split that nothing else is fitted on set its scale (their median), the
ensemble's score is the plain mean of the members' scaled scores (not weighted by the answer's
weights: `combine`), and the threshold is the
ceil((n + 1)(1 - r))-th smallest ensemble score on that half, so that at most a share r
(`ensemble.ood_false_refusal`) of in-distribution images is refused (split-conformal, as the
differential's threshold).
"""

from __future__ import annotations

import io
import math

import numpy as np

from skinray import conformal

METHOD = "mahalanobis"
REASON = "not like the images this model knows"


def fit_statistics(features: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Class means (classes present, d) and the shared precision (d, d) of one member's features."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, np.float64)
    classes = np.unique(labels)
    means = np.stack([f[labels == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf().fit(centred).precision_
    return {"means": means.astype(np.float32), "precision": precision.astype(np.float32)}


def mahalanobis_scores(statistics: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Each image's smallest squared Mahalanobis distance to a class mean (n,)."""
    f = np.asarray(features, np.float64)
    if len(f) == 0:
        return np.zeros(0, np.float32)
    means, precision = (np.asarray(statistics[k], np.float64) for k in ("means", "precision"))
    projected = f @ precision
    distances = (
        np.einsum("nd,nd->n", projected, f)[:, None]
        - 2.0 * projected @ means.T
        + np.einsum("kd,de,ke->k", means, precision, means)[None, :]
    )
    return np.maximum(distances.min(axis=1), 0.0).astype(np.float32)


def save_statistics(statistics: dict[str, np.ndarray]) -> bytes:
    """A member's statistics as .npz bytes (no pickles): a bundle file."""
    buffer = io.BytesIO()
    np.savez(buffer, **statistics)
    return buffer.getvalue()


def load_statistics(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        return {k: stored[k] for k in ("means", "precision")}


def fit(
    reference_features: list[np.ndarray],
    reference_labels: np.ndarray,
    calibration_features: list[np.ndarray],
    false_refusal: float,
) -> dict:
    """Each member's statistics (from the reference images: the training split's) and scale, and
    the ensemble's threshold (on the calibration images: validation images nothing else was fitted
    on). Returns {statistics, scales, threshold (None: infinite), reference_images, calibration_images,
    calibration_scores (the ensemble's score of each calibration image)}."""
    statistics = [fit_statistics(f, reference_labels) for f in reference_features]
    member_scores = [mahalanobis_scores(s, f) for s, f in zip(statistics, calibration_features)]
    scales = [float(np.median(s)) if len(s) and np.median(s) > 0 else 1.0 for s in member_scores]
    ensemble = combine(np.stack(member_scores), scales)
    threshold = conformal.threshold(ensemble, 1 - false_refusal)
    return {
        "statistics": statistics,
        "scales": scales,
        "threshold": None if math.isinf(threshold) else threshold,
        "reference_images": int(len(reference_labels)),
        "calibration_images": int(len(calibration_features[0])),
        "calibration_scores": ensemble,
    }


def combine(member_scores: np.ndarray, scales: list[float]) -> np.ndarray:
    """The ensemble's score: the mean of each member's score over its scale. Every member counts
    alike, whatever its weight in the answer: a member the calibration gives no say in the label
    still sees what its features see (measured on the demo's bundle: ResNet50, weight 0, scored a
    photo of a temple 8x its typical in-distribution score; weighted, the ensemble let it through)."""
    scaled = np.asarray(member_scores, np.float64) / np.asarray(scales, np.float64)[:, None]
    return scaled.mean(axis=0)


def report(in_scores: np.ndarray, foreign_scores: np.ndarray, threshold: float) -> dict:
    """What `skinray evaluate --ood DIR` says: AUROC (foreign images as positives), the false-refusal
    rate on the evaluated split, and the share of foreign images caught at the bundle's threshold."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(foreign_scores))]
    scores = np.r_[in_scores, foreign_scores]
    return {
        "images": int(len(in_scores)),
        "foreign_images": int(len(foreign_scores)),
        "auroc": float(roc_auc_score(y, scores)) if len(in_scores) and len(foreign_scores) else None,
        "false_refusal": float((np.asarray(in_scores) > threshold).mean()) if len(in_scores) else 0.0,
        "caught": float((np.asarray(foreign_scores) > threshold).mean()) if len(foreign_scores) else 0.0,
        "threshold": threshold,
    }
