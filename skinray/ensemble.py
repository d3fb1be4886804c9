"""Fine-tuned members -> one calibrated, versioned bundle: temperatures, weights, abstention threshold.

    skinray ensemble --members runs/resnet50-v1 runs/inception-v1 runs/effnet-v1 \
                     --data data/dermnet --out bundles/dermnet-v1 [--coverage 0.9]

Everything is fitted on the members' shared validation split (never on images a member trained
on), except what the out-of-distribution check knows of the training images: the members' logits
and features come from the same Ray Data decode tasks and model actors as bulk scoring. The
split is cut in two stratified halves (`halves`). On the first, with scipy:

1. a temperature per member (Guo et al. 2017): the T minimising the log-loss of softmax(z / T);
2. the ensemble weights: the point of the simplex minimising the log-loss of the weighted mean of
   the calibrated probabilities (equal weights are reported beside them, and used instead under
   `ensemble.weights: equal`);
3. the abstention threshold: a top probability that answers `coverage` of the validation images
   (halfway to the next image's); below it the bundle says "uncertain, refer".

On the second, which nothing above saw: 4. the differential sets' threshold (`skinray.conformal`)
and 5. the out-of-distribution threshold (`skinray.ood`; its class means and covariance come from
the training images, `ood_reference`), whose guarantees need calibration images exchangeable
with future ones and unused by any fit. Halves rather than cross-fitting: one bundle, one set of
fitted values, an exact guarantee. (Both halves did choose each member's best epoch, as
validation images: a mild optimism the evaluation on a test split does not share.)

The bundle format and its verification are in `skinray.bundle`.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pyarrow as pa

from skinray import UserError, ood
from skinray.config import Config
from skinray.console import say, warn
from skinray.metrics import selective_metrics, summary_metrics
from skinray.predictor import softmax, weighted_mean

TEMPERATURE_RANGE = (0.05, 20.0)


# === Fitting ===


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the mean log-loss of softmax(logits / T) (bounded scalar search)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        return float(-_log_softmax(logits / math.exp(log_t))[rows, labels].mean())

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    return float(math.exp(minimize_scalar(loss, bounds=(low, high), method="bounded").x))


def fit_weights(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Weights on the simplex minimising the log-loss of sum_m w_m p_m; `probabilities` is
    (members, n, classes). Parametrised as a softmax, so they stay positive and sum to one."""
    from scipy.optimize import minimize

    members = len(probabilities)
    if members == 1:
        return np.ones(1)
    true_class = np.asarray(probabilities, np.float64)[:, np.arange(len(labels)), labels]  # (members, n)

    def loss(theta: np.ndarray) -> float:
        w = np.exp(theta - theta.max())
        w /= w.sum()
        return float(-np.log(np.clip(w @ true_class, 1e-12, None)).mean())

    theta = minimize(loss, np.zeros(members), method="L-BFGS-B").x
    w = np.exp(theta - theta.max())
    return w / w.sum()


def abstention_threshold(probabilities: np.ndarray, coverage: float) -> float:
    """The threshold on the top probability that answers `coverage` of the images (at least).

    It lies halfway between the last answered image's confidence and the next one's, so that
    float32 rounding elsewhere (another batch composition, another machine) cannot flip an image.
    """
    if coverage >= 1.0:
        return 0.0
    confidence = np.sort(probabilities.max(axis=1))[::-1]
    keep = max(1, math.ceil(coverage * len(confidence) - 1e-9))
    if keep >= len(confidence):
        return 0.0
    return float((confidence[keep - 1] + confidence[keep]) / 2)


# === Members and their validation predictions ===


def load_members(paths: list[str], archive: str):
    """Loads the members and the archive; checks that classes and validation splits agree.

    Returns (the uncalibrated Predictor of all members, the catalog, the validation rows).
    """
    from skinray.data.catalog import list_archive, model_split
    from skinray.predictor import Predictor

    predictor = Predictor.from_paths(paths, load_models=False)  # refuses members whose classes differ
    if predictor.manifest:
        raise UserError(f"'{paths[0]}' is a bundle: members are training runs or checkpoints")
    catalog = list_archive(archive)
    val = [model_split(catalog, "val", predictor.classes, m.config.data) for m in predictor.members]
    first = set(val[0]["path"].to_pylist())
    for path, member, rows in zip(paths[1:], predictor.members[1:], val[1:]):
        other, a, b = set(rows["path"].to_pylist()), predictor.config.data, member.config.data
        if other != first:
            raise UserError(
                f"members '{paths[0]}' and '{path}' validate on different images ({len(first - other)} only "
                f"in the first, {len(other - first)} only in the second; data.val_fraction {a.val_fraction} "
                f"vs {b.val_fraction}, data.seed {a.seed} vs {b.seed}): calibrating on images a member "
                "trained on would leak"
            )
    return predictor, catalog, val[0]


def ood_reference(catalog, predictor, limit: int, seed: int) -> pa.Table:
    """The training images whose features the out-of-distribution check learns (class means, the
    covariance): all of them, or a seeded sample of `limit`."""
    from skinray.data.catalog import model_split

    rows = model_split(catalog, "train", predictor.classes, predictor.config.data)
    if rows.num_rows > limit:
        rows = rows.take(np.sort(np.random.default_rng(seed).choice(rows.num_rows, limit, replace=False)))
    return rows


# === The ensemble command ===


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation split in two stratified halves (indices): each class's images in a seeded
    order, dealt alternately, the first to the fitting half (a class of one image goes there)."""
    first, second = [], []
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        members = members[np.random.default_rng([seed, int(k)]).permutation(len(members))]
        first.append(members[0::2])
        second.append(members[1::2])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def fit(
    member_logits: np.ndarray,
    labels: np.ndarray,
    coverage: float,
    differential_coverage: float = 0.9,
    u: np.ndarray | None = None,
    seed: int = 0,
    weighting: str = "fitted",
) -> dict:
    """Temperatures, weights and the abstention threshold on one stratified half of the validation
    images, the differential sets' threshold on the other (`skinray.conformal`: its guarantee needs
    images nothing else was fitted on), with the metrics before and after calibration.

    `u`: each image's draw (`conformal.draws` of its pixels); a seeded uniform one without it.
    """
    from skinray import conformal

    u = np.random.default_rng(seed).random(len(labels)) if u is None else np.asarray(u)
    fitting, calibration = halves(labels, seed)
    member_logits, held_out = np.asarray(member_logits)[:, fitting], np.asarray(member_logits)[:, calibration]
    held_labels, labels = labels[calibration], labels[fitting]
    temperatures = [fit_temperature(z, labels) for z in member_logits]
    raw = np.stack([softmax(z) for z in member_logits]).astype(np.float64)
    calibrated = np.stack([softmax(z, t) for z, t in zip(member_logits, temperatures)]).astype(np.float64)
    equal = np.full(len(member_logits), 1.0 / len(member_logits))
    weights = fit_weights(calibrated, labels) if weighting == "fitted" else equal
    ensemble = weighted_mean(calibrated, weights)
    threshold = abstention_threshold(ensemble, coverage)
    held_probabilities = weighted_mean(
        np.stack([softmax(z, t) for z, t in zip(held_out, temperatures)]), weights
    )
    q = conformal.threshold(
        conformal.scores(held_probabilities, held_labels, u[calibration]), differential_coverage
    )
    metrics = {
        "images": int(len(labels)),
        "members": [
            {"uncalibrated": summary_metrics(r, labels), "calibrated": summary_metrics(c, labels)}
            for r, c in zip(raw, calibrated)
        ],
        "ensemble_uncalibrated": summary_metrics(weighted_mean(raw, equal), labels),
        "ensemble_equal_weights": summary_metrics(weighted_mean(calibrated, equal), labels),
        "ensemble": summary_metrics(ensemble, labels) | selective_metrics(ensemble, labels, threshold),
    }
    return {
        "temperatures": temperatures,
        "weights": weights.tolist(),
        "equal_weights": equal.tolist(),
        "threshold": threshold,
        "differential": {
            "method": conformal.METHOD,
            "coverage": differential_coverage,
            "threshold": None if math.isinf(q) else q,  # None: every class (too few images for the target)
            "calibration_images": int(len(calibration)),
        },
        "metrics": metrics,
    }


def reference_answers(
    logits: np.ndarray,
    draws: np.ndarray,
    fitted: dict,
    ood_fit: dict,
    calibration: np.ndarray,
    classes: list,
    false_refusal: float,
) -> dict:
    """The bundle's answers on the calibration half of the validation split (images its temperatures
    and weights were not fitted on), summarised: what `skinray monitor` compares served answers with.
    Predicted classes are counted; confidences kept (sorted, for the Kolmogorov-Smirnov test). The
    out-of-distribution rate is the target, `false_refusal`: the threshold was fitted on these very
    images, so their own refused share is biased low (0 when they are fewer than 1/false_refusal)."""
    from skinray.predictor import Prediction

    z = np.asarray(logits)[:, calibration]
    member = np.stack([softmax(m, t) for m, t in zip(z, fitted["temperatures"])])
    prediction = Prediction(
        weighted_mean(member, fitted["weights"]),
        member,
        z,
        fitted["threshold"],
        np.asarray(draws)[calibration],
        fitted["differential"]["threshold"],
        np.asarray(ood_fit["calibration_scores"]),
        ood_fit["threshold"],
    )
    labels, sets = prediction.labels, prediction.in_set
    return {
        "images": int(len(labels)),
        "labels": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
        "confidence": [round(float(c), 5) for c in np.sort(prediction.confidence)],
        "abstained": float(prediction.abstained.mean()),
        "out_of_distribution": None if ood_fit["threshold"] is None else false_refusal,
        "differential_size": None if sets is None else float(sets.sum(axis=1).mean()),
    }


def build_ensemble(member_paths: list[str], archive: str, out: str, cfg: Config) -> dict:
    """`fit_bundle`, as an MLflow run of its own when tracking is on (`skinray.tracking`): the
    bundle's version, its validation metrics and its manifest."""
    from skinray.storage import basename, redact
    from skinray.tracking import tracked

    with tracked(cfg, f"ensemble {basename(out)}", "ensemble") as run:
        manifest = fit_bundle(member_paths, archive, out, cfg)
        run.params({"members": ", ".join(redact(p) for p in member_paths), "archive": redact(archive)})
        run.params({f"ensemble.{k}": v for k, v in dataclasses.asdict(cfg.ensemble).items()})
        run.tag("skinray.bundle_version", manifest["version"])
        run.metrics(manifest["validation"]["ensemble"])
        run.json(manifest, "bundle.json")
        return manifest


def fit_bundle(member_paths: list[str], archive: str, out: str, cfg: Config) -> dict:
    """Fits the calibration of `member_paths` on `archive`'s validation split and writes the bundle."""
    from skinray.bundle import built_before, write_bundle
    from skinray.cluster import connect, reserved_cpus
    from skinray.data.ingest import ImageSource
    from skinray.inference import labelled_logits
    from skinray.storage import absolute, redact

    member_paths = [absolute(p) for p in member_paths]  # the actors open them from their own folders
    previous = built_before(out, member_paths, archive)  # before any work: bundles are never overwritten
    if previous is not None:
        say(f"{out} holds the bundle of these members already (version {previous['version'][:16]})")
        return previous
    predictor, catalog, table = load_members(member_paths, archive)
    connect(reserved_cpus(cfg, "ensemble"))
    source = ImageSource.of(catalog, predictor.config.data.max_pixels)
    seed = predictor.config.data.seed
    reference = ood_reference(catalog, predictor, cfg.ensemble.ood_reference_images, seed)
    scored = labelled_logits(
        pa.concat_tables([table, reference]),
        member_paths,
        predictor.sizes,
        source,
        dataclasses.replace(cfg.score, precision="float32"),  # fitting is always float32
        "the validation split",
        with_features=True,
    )  # one pass of the engine: the validation split, and the training images the OOD check knows
    split = scored.subset(set(table["path"].to_pylist()))
    known = scored.subset(set(reference["path"].to_pylist()))
    if not len(split.labels):
        raise UserError(f"no image of the validation split could be read ({split.failed.num_rows} failed)")
    fitted = fit(
        split.logits,
        split.labels,
        cfg.ensemble.coverage,
        cfg.ensemble.differential_coverage,
        split.draws,
        seed,
        cfg.ensemble.weights,
    )
    fitting, calibration = halves(split.labels, seed)
    ood_fit = ood.fit(
        known.features, known.labels, [f[calibration] for f in split.features], cfg.ensemble.ood_false_refusal
    )
    if ood_fit["threshold"] is None:
        warn(
            f"{ood_fit['calibration_images']} calibration images are too few for an out-of-distribution "
            f"threshold refusing at most {cfg.ensemble.ood_false_refusal:.0%} of known images: "
            "nothing is refused"
        )
    if fitted["differential"]["threshold"] is None:
        warn(
            f"{fitted['differential']['calibration_images']} calibration images are too few for a "
            f"differential covering {cfg.ensemble.differential_coverage:.0%}: every class is in every set"
        )
    reference = reference_answers(
        split.logits,
        split.draws,
        fitted,
        ood_fit,
        calibration,
        predictor.classes,
        cfg.ensemble.ood_false_refusal,
    )
    entries = [
        {
            "name": m.name,
            "backbone": m.backbone,
            "image_size": m.image_size,
            "temperature": t,
            "weight": w,
            "source": redact(path),
            "validation": metrics,
            "ood_scale": scale,
        }
        for m, t, w, path, metrics, scale in zip(
            predictor.members,
            fitted["temperatures"],
            fitted["weights"],
            member_paths,
            fitted["metrics"]["members"],
            ood_fit["scales"],
        )
    ]
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": predictor.classes,
        "threshold": fitted["threshold"],
        "coverage": cfg.ensemble.coverage,
        "differential": fitted["differential"],
        "ood": {
            "method": ood.METHOD,
            "false_refusal": cfg.ensemble.ood_false_refusal,
            "threshold": ood_fit["threshold"],  # None: nothing is refused (too few images)
            "reference_images": ood_fit["reference_images"],
            "calibration_images": ood_fit["calibration_images"],
        },
        "equal_weights": fitted["equal_weights"],
        "weighting": cfg.ensemble.weights,
        "validation": {
            "archive": redact(archive),
            "val_fraction": predictor.config.data.val_fraction,
            "seed": predictor.config.data.seed,
            **fitted["metrics"],
        },
        "reference": reference,
    }
    statistics = [{"ood_statistics": ("ood.npz", ood.save_statistics(st))} for st in ood_fit["statistics"]]
    return write_bundle(
        out,
        entries,
        [m.file for m in predictor.members],
        [m.config for m in predictor.members],
        manifest,
        statistics,
    )


def format_manifest(manifest: dict, out: str) -> str:
    """What `skinray ensemble` prints: the bundle, each member's calibration, the ensemble's scores."""
    v = manifest["validation"]
    lines = [
        f"bundle {manifest['version'][:16]} written to {out} ({len(manifest['members'])} members, "
        f"{v['images']} validation images)"
    ]
    for member in manifest["members"]:
        cal, raw = member["validation"]["calibrated"], member["validation"]["uncalibrated"]
        lines.append(
            f"  {member['name']:24s} T {member['temperature']:.3f}  weight {member['weight']:.3f}  "
            f"acc {cal['accuracy']:.3f}  ECE {raw['ece']:.3f} -> {cal['ece']:.3f}"
        )
    e, eq = v["ensemble"], v["ensemble_equal_weights"]
    lines.append(
        f"  ensemble: acc {e['accuracy']:.3f}, macro-F1 {e['macro_f1']:.3f}, log-loss {e['log_loss']:.4f} "
        f"(equal weights {eq['log_loss']:.4f}), ECE {v['ensemble_uncalibrated']['ece']:.3f} -> {e['ece']:.3f}"
    )
    lines.append(
        f"  abstains below {e['threshold']:.3f}: answers {e['coverage']:.1%} of validation images, "
        f"{e['answered_accuracy']:.3f} of them correctly"
    )
    o = manifest.get("ood")
    if o:
        t = "nothing (too few images)" if o["threshold"] is None else f"above {o['threshold']:.3f}"
        lines.append(
            f"  out of distribution: refuses {t} ({o['method']}, fitted on {o['reference_images']} "
            f"images; at most {o['false_refusal']:.0%} of known images)"
        )
    d = manifest.get("differential")
    if d:
        q = "every class" if d["threshold"] is None else f"score threshold {d['threshold']:.4f}"
        lines.append(
            f"  differential: sets covering {d['coverage']:.0%} ({d['method']}, {q}, calibrated on "
            f"{d['calibration_images']} other validation images)"
        )
    return "\n".join(lines)
