"""Differential sets with a coverage guarantee: split-conformal adaptive prediction sets.

A bundle's answer names, beside its top label, the *differential*: the conditions that remain
possible, as a set that holds the true condition for `ensemble.differential_coverage` (say 90%) of
images like the ones it was calibrated on. The method is the randomised adaptive prediction set
(APS: Romano, Sesia and Candès 2020; as RAPS with no penalty in Angelopoulos et al. 2021):

- rank the classes by probability; the score of label y is the probability mass ranked above y
  plus u times y's own, u uniform in [0, 1);
- on n calibration images (never used for anything else), the threshold q is the
  ceil((n + 1) * coverage)-th smallest score of the true labels;
- an image's set is every label whose score is at most q: a prefix of the ranking, so the
  differential reads in probability order.

Randomised, because deterministic sets (u = 1) over-cover, sometimes by a lot; exchangeability
then gives coverage >= the target, and at most target + 1 / (n + 1) on average. Two choices of ours:

- u is not a fresh draw but a hash of the image's pixels as the model sees them (its largest
  view): uniform over images, independent of the label, and the same for the same photo however it
  arrives (a scoring job, the endpoint, an explanation), so one photo always gets one differential;
- a set is never empty (the top label is always in it; Angelopoulos et al.'s `allow_zero_sets=False`):
  an empty differential means "refused" elsewhere in skinray. This can only add coverage; its share
  is reported beside the coverage (`forced_top`).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

METHOD = "aps-randomised"


def draws(images: np.ndarray) -> np.ndarray:
    """u in [0, 1) for each uint8 image (n, h, w, 3): from a BLAKE2b hash of its pixels."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=8).digest()) / 2**64
            for x in images
        ],
        np.float64,
    )


def _ranked(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: classes by descending probability (ties: lower index first), and the mass ranked
    above each class (`above[i, c]`: the sum of the probabilities of the classes ranked before c)."""
    p = np.asarray(probabilities, np.float64)
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    above_sorted = np.cumsum(sorted_p, axis=1) - sorted_p
    above = np.empty_like(p)
    np.put_along_axis(above, order, above_sorted, axis=1)
    return order, above


def scores(probabilities: np.ndarray, labels: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The randomised APS score of each image's true label: the mass above it + u * its own."""
    p = np.asarray(probabilities, np.float64)
    rows = np.arange(len(p))
    _, above = _ranked(p)
    return above[rows, labels] + np.asarray(u, np.float64) * p[rows, labels]


def threshold(calibration_scores: np.ndarray, coverage: float) -> float:
    """q: the ceil((n + 1) * coverage)-th smallest score, moved halfway to the next one (past the
    largest by a relative 1e-6), so that float rounding elsewhere (another batch composition,
    another machine) cannot move a calibration image across it; any q at or above that order
    statistic keeps the guarantee. Infinity (every class) when n is too small for the target
    (n + 1 < 1 / (1 - coverage)). The out-of-distribution threshold is this rule too."""
    s = np.sort(np.asarray(calibration_scores, np.float64))
    rank = math.ceil((len(s) + 1) * coverage - 1e-9)
    if rank > len(s):
        return math.inf
    if rank < len(s):
        return float((s[rank - 1] + s[rank]) / 2)
    return float(s[-1] + 1e-6 * max(abs(s[-1]), 1.0))


def sets(probabilities: np.ndarray, u: np.ndarray, q: float) -> np.ndarray:
    """(n, classes) bool: label c is in image i's set when its score is at most q; the top label
    always is."""
    p = np.asarray(probabilities, np.float64)
    order, above = _ranked(p)
    inside = above + np.asarray(u, np.float64)[:, None] * p <= q
    inside[np.arange(len(p)), order[:, 0]] = True
    return inside


def differential(probabilities: np.ndarray, inside: np.ndarray, classes: list[str]) -> list[list[str]]:
    """Each image's set as labels, most probable first."""
    order = np.argsort(-np.asarray(probabilities), axis=1, kind="stable")
    return [[classes[c] for c in row if inside[i, c]] for i, row in enumerate(order)]


def coverage_interval(n_calibration: int, coverage: float, n_test: int, level: float = 0.95) -> tuple:
    """The range in which the coverage measured on `n_test` fresh images falls with probability
    `level` (split conformal with continuous scores: coverage given the calibration set is
    Beta(n + 1 - l, l), l = floor((n + 1) * (1 - coverage)); the test count is beta-binomial
    around it; Angelopoulos and Bates 2021, section 3.2)."""
    from scipy.stats import betabinom

    misses = math.floor((n_calibration + 1) * (1 - coverage) + 1e-9)  # the paper's l
    if misses < 1 or n_test < 1:
        return (1.0, 1.0)
    dist = betabinom(n_test, n_calibration + 1 - misses, misses)
    tail = (1 - level) / 2
    return (float(dist.ppf(tail) / n_test), float(dist.ppf(1 - tail) / n_test))


def report(
    probabilities: np.ndarray, labels: np.ndarray, u: np.ndarray, fitted: dict, classes: list[str]
) -> dict:
    """What `skinray evaluate` says of a bundle's sets on labelled images: coverage overall and per
    class against its interval, the share added by never-empty sets, set sizes, and top-k at the
    same mean size (the fixed-size list a set replaces)."""
    p = np.asarray(probabilities, np.float64)
    inside = sets(p, u, fitted["threshold"])
    rows = np.arange(len(p))
    covered = inside[rows, labels]
    sizes = inside.sum(axis=1)
    raw = scores(p, labels, u) <= fitted["threshold"]  # covered without the never-empty rule
    mean_size = float(sizes.mean())
    order = np.argsort(-p, axis=1, kind="stable")
    rank_of_true = np.argmax(order == labels[:, None], axis=1)  # 0 for the top label
    top_k = {
        str(k): float((rank_of_true < k).mean())
        for k in sorted({max(1, math.floor(mean_size)), math.ceil(mean_size)})
    }
    low, high = coverage_interval(fitted["calibration_images"], fitted["coverage"], len(p))
    forced = float((covered & ~raw).mean())
    return {
        "method": fitted["method"],
        "target": fitted["coverage"],
        "threshold": fitted["threshold"],
        "calibration_images": fitted["calibration_images"],
        "images": int(len(p)),
        "coverage": float(covered.mean()),
        "interval": [low, high + forced],
        "interval_exact": [low, high],
        "forced_top": forced,
        "per_class_coverage": {
            c: float(covered[labels == k].mean()) for k, c in enumerate(classes) if (labels == k).any()
        },
        "mean_size": mean_size,
        "size_histogram": {str(s): int((sizes == s).sum()) for s in range(1, int(sizes.max()) + 1)},
        "top_k_at_mean_size": top_k,
    }
