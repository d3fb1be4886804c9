"""Out-of-distribution refusal (skinray.ood): the kNN score, its threshold's guarantee, the report."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from skinray import conformal, ood


def test_the_score_is_the_smallest_mahalanobis_distance_under_the_shared_covariance():
    """Against the definition (Lee et al. 2018), with scikit-learn's Ledoit-Wolf covariance of the
    class-centred features."""
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    features = rng.normal(size=(200, 8)) + labels[:, None] * 2.0
    stats = ood.fit_statistics(features, labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(3)])
    precision = LedoitWolf().fit(features - means[labels]).precision_
    queries = rng.normal(size=(20, 8)) * 3
    expected = np.min([[(q - m) @ precision @ (q - m) for m in means] for q in queries], axis=1)
    np.testing.assert_allclose(ood.mahalanobis_scores(stats, queries), expected, rtol=1e-4)
    assert ood.mahalanobis_scores(stats, np.zeros((0, 8))).shape == (0,)


def test_the_threshold_refuses_at_most_the_asked_share_of_known_images():
    """Split-conformal: over many draws of calibration and test images from one distribution, the
    share of test images scoring above the threshold averages at most r (and close to it)."""
    refused = []
    for seed in range(200):
        scores = np.random.default_rng(seed).gamma(2.0, size=300)
        t = conformal.threshold(scores[:100], 0.95)
        refused.append((scores[100:] > t).mean())
    assert np.mean(refused) <= 0.05 and np.mean(refused) > 0.035
    assert math.isinf(conformal.threshold(np.ones(10), 0.95))  # 11 * 0.95 -> the 11th of 10


def test_foreign_features_are_refused_and_known_ones_kept():
    """Two members see three classes as clusters; foreign images fall elsewhere in feature space."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 32)) * 3
    view = rng.normal(size=(32, 32)) / 4  # the second member: another view of the same images

    def known(n):
        labels = rng.integers(0, 3, n)
        return centres[labels] + rng.normal(size=(n, 32)), labels

    a, labels = known(400)
    fitting, calibration = np.arange(0, 400, 2), np.arange(1, 400, 2)
    b = a @ view
    fitted = ood.fit([a[fitting], b[fitting]], labels[fitting], [a[calibration], b[calibration]], 0.05)
    assert len(fitted["statistics"]) == 2 and fitted["calibration_images"] == 200
    assert fitted["reference_images"] == 200

    def ensemble_scores(features):
        members = [
            ood.mahalanobis_scores(st, f) for st, f in zip(fitted["statistics"], (features, features @ view))
        ]
        return ood.combine(np.stack(members), fitted["scales"])

    fresh, _ = known(500)
    foreign = rng.normal(size=(200, 32)) * 3 + 10 * rng.normal(size=32)
    in_scores, out_scores = ensemble_scores(fresh), ensemble_scores(foreign)
    r = ood.report(in_scores, out_scores, fitted["threshold"])
    assert r["auroc"] == pytest.approx(
        roc_auc_score(np.r_[np.zeros(500), np.ones(200)], np.r_[in_scores, out_scores])
    )
    assert r["auroc"] > 0.99 and r["caught"] > 0.95 and r["false_refusal"] < 0.1


def test_statistics_round_trip_as_bundle_files_without_pickle():
    rng = np.random.default_rng(2)
    stats = ood.fit_statistics(rng.normal(size=(30, 8)), rng.integers(0, 2, 30))
    data = ood.save_statistics(stats)
    assert data[:2] == b"PK"  # an .npz: a zip of .npy arrays
    loaded = ood.load_statistics(data)
    assert all(np.array_equal(loaded[k], stats[k]) for k in ("means", "precision"))
