"""Differential sets (skinray.conformal): the paper's definition, the coverage guarantee, the draws."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from skinray import conformal


def _aps_set_by_definition(p: np.ndarray, u: float, q: float) -> set[int]:
    """Romano et al. 2020, eq. (5)-(6) as written: walk the classes by descending probability; label
    y is in the set when (mass strictly before y) + u * p_y <= q. Plus the top label (non-empty)."""
    inside, before = set(), 0.0
    for c in sorted(range(len(p)), key=lambda c: (-p[c], c)):
        if before + u * p[c] <= q:
            inside.add(c)
        before += p[c]
    return inside | {int(np.argmax(p))}


probabilities = (
    st.integers(2, 8)
    .flatmap(lambda k: arrays(np.float64, (5, k), elements=st.floats(0.001, 1.0)))
    .map(lambda a: a / a.sum(axis=1, keepdims=True))
)


@settings(max_examples=200, deadline=None)
@given(probabilities, st.lists(st.floats(0, 0.999), min_size=5, max_size=5), st.floats(0, 1.2))
def test_sets_are_the_papers_sets_prefixes_of_the_ranking_and_never_empty(p, u, q):
    inside = conformal.sets(p, np.array(u), q)
    classes = [str(c) for c in range(p.shape[1])]
    for i in range(len(p)):
        assert set(np.flatnonzero(inside[i])) == _aps_set_by_definition(p[i], u[i], q)
        listed = conformal.differential(p, inside, classes)[i]
        assert listed and listed[0] == str(np.argmax(p[i]))  # the top label first
        ranked = [str(c) for c in np.argsort(-p[i], kind="stable")]
        assert listed == ranked[: len(listed)]  # a prefix of the ranking
    assert (conformal.sets(p, np.array(u), q + 0.1) >= inside).all()  # a higher threshold only adds
    # The score of a label (what calibration ranks) is the same walk: mass before it + u * its own.
    for y in range(p.shape[1]):
        labels = np.full(len(p), y)
        before = [
            sum(p[i][c] for c in range(p.shape[1]) if (-p[i][c], c) < (-p[i][y], y)) for i in range(len(p))
        ]
        assert np.allclose(conformal.scores(p, labels, np.array(u)), np.array(before) + np.array(u) * p[:, y])


def test_the_threshold_is_the_finite_sample_quantile_with_a_margin():
    scores = np.arange(1, 20) / 20  # n = 19
    assert conformal.threshold(scores, 0.9) == pytest.approx(
        0.925
    )  # ceil(20 * 0.9) = 18th, halfway to the 19th
    assert conformal.threshold(scores, 0.5) == pytest.approx(0.525)  # the 10th, halfway to the 11th
    assert conformal.threshold(scores, 0.95) == pytest.approx(0.95 * (1 + 1e-6))  # the 19th: the largest
    assert math.isinf(conformal.threshold(scores[:8], 0.9))  # ceil(9 * 0.9) = 9 > 8: every class


def _model(rng, n: int, k: int = 6):
    """Probabilities from a miscalibrated model (sharpened Dirichlet) and labels drawn from the
    true ones: coverage must hold whatever the model's quality."""
    truth = rng.dirichlet(np.full(k, 0.6), n)
    labels = np.array([rng.choice(k, p=t) for t in truth])
    sharpened = truth**2 / (truth**2).sum(axis=1, keepdims=True)
    return sharpened, labels


@pytest.mark.parametrize("target", [0.8, 0.9])
def test_coverage_on_held_out_images_lands_in_its_interval_over_seeds(target):
    """Split conformal's guarantee, checked as evaluate reports it: calibrate on 400 images, measure
    on 2,000 others; every seed's coverage within its interval (99.9% here, so that 10 seeds
    cannot miss by chance), the average within a point of the exact expectation, sets adaptive."""
    measured = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        p, y = _model(rng, 2400)
        u = rng.random(2400)
        q = conformal.threshold(conformal.scores(p[:400], y[:400], u[:400]), target)
        fitted = {"method": conformal.METHOD, "coverage": target, "threshold": q, "calibration_images": 400}
        r = conformal.report(p[400:], y[400:], u[400:], fitted, [str(c) for c in range(6)])
        low, high = conformal.coverage_interval(400, target, 2000, level=0.999)
        assert low <= r["coverage"] <= high + r["forced_top"], (seed, r["coverage"], low, high)
        assert r["interval"][0] < target < r["interval"][1]
        measured.append(r["coverage"] - r["forced_top"])
        sizes = {int(s): c for s, c in r["size_histogram"].items()}
        assert len(sizes) > 2  # adaptive: sizes vary with the image's uncertainty
    expected = math.ceil(401 * target) / 401  # E[coverage] for continuous scores, n = 400
    assert abs(np.mean(measured) - expected) < 0.01


def test_the_report_counts_per_class_sizes_and_top_k_beside_them():
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]])
    y = np.array([0, 1, 2, 2])
    u = np.full(4, 0.5)
    fitted = {"method": conformal.METHOD, "coverage": 0.9, "threshold": 0.6, "calibration_images": 50}
    r = conformal.report(p, y, u, fitted, ["a", "b", "c"])
    # u = .5: {a} (.35 <= .6; b: .7 + .1 > .6), {a, b} (.2, .575), {c} (.4; a: .8 + .05), {a} (b: .65)
    assert conformal.differential(p, conformal.sets(p, u, 0.6), ["a", "b", "c"]) == [
        ["a"],
        ["a", "b"],
        ["c"],
        ["a"],
    ]
    assert r["coverage"] == 0.75 and r["per_class_coverage"] == {"a": 1.0, "b": 1.0, "c": 0.5}
    assert r["size_histogram"] == {"1": 3, "2": 1} and r["mean_size"] == 1.25
    assert r["top_k_at_mean_size"] == {"1": 0.5, "2": 0.75}


def test_draws_are_uniform_and_the_same_for_the_same_pixels():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2000, 8, 8, 3), dtype=np.uint8)
    u = conformal.draws(images)
    assert np.array_equal(u, conformal.draws(images.copy()))
    assert conformal.draws(images[:1])[0] == u[0]  # whatever the batch
    assert 0 <= u.min() and u.max() < 1
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    from scipy.stats import chisquare

    assert chisquare(counts).pvalue > 0.001
    other = images[:1].copy()
    other[0, 0, 0, 0] ^= 1
    assert conformal.draws(other)[0] != u[0]
