"""Out-of-distribution benchmark: which score tells foreign images from known ones.

    python benchmarks/ood.py [--classes 4] [--per-class 60] [--size 64] [--epochs 8]

A `tiny` member is trained (`skinray train`, 2 Ray Train workers) on a generated archive in
DermNet's layout; its validation split is cut in the halves `skinray ensemble` uses (reference
features on the first, the threshold for a 5% false-refusal rate on the second). Known images:
the archive's test split. Foreign images, three sets:

- `generated`: drawings unlike any skin photo (random shapes and lines on flat backgrounds);
- `digits`: scikit-learn's handwritten digits (real scans, shipped in the package), upscaled;
- `photos`: random crops of scikit-learn's two sample photographs (a temple, a flower).

Scores compared on the same features and probabilities:

- Mahalanobis: the smallest distance to a class mean under the shared covariance (Lee et al.
  2018; Ledoit-Wolf shrinkage, since a covariance of d dimensions from a few hundred images is
  otherwise singular), what `skinray.ood` does (chosen on this benchmark's first run);
- kNN: the distance to the k-th nearest normalised reference feature (Sun et al. 2022);
- the baseline, maximum softmax probability (Hendrycks and Gimpel 2017): what a classifier with
  no such check has.

Prints AUROC and the share caught at the threshold per method and set, the mean AUROC of skinray's
score over the baseline's, and one JSON line (appended to benchmarks/results/ood.jsonl).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ood_row, record


def foreign_sets(root: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """The three foreign folders, n images each."""
    from PIL import Image, ImageDraw
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    folders = {name: root / name for name in ("generated", "digits", "photos")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (320, 320), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            box = sorted(rng.integers(0, 320, 2)), sorted(rng.integers(0, 320, 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.rectangle([box[0][0], box[1][0], box[0][1], box[1][1]], fill=colour)
            else:
                draw.line(
                    [tuple(rng.integers(0, 320, 2)), tuple(rng.integers(0, 320, 2))], fill=colour, width=6
                )
        image.save(folders["generated"] / f"{i:04d}.png")
    digits = load_digits()
    for i in range(n):
        pixels = np.round(digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((256, 256), Image.NEAREST).convert("RGB").save(
            folders["digits"] / f"{i:04d}.png"
        )
    photos = load_sample_images().images
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(200, 400))
        y, x = (int(rng.integers(0, photo.shape[k] - side)) for k in (0, 1))
        Image.fromarray(photo[y : y + side, x : x + side]).save(folders["photos"] / f"{i:04d}.jpg")
    return folders


def predict_folder(predictor, paths: list[Path]):
    from skinray.data.ingest import decode_views

    views = [decode_views(p.read_bytes(), predictor.sizes) for p in paths]
    return predictor.predict(
        {s: np.stack([v[s] for v in views]) for s in predictor.sizes}, keep_features=True
    )


def knn_scores(reference: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Sun et al. 2022: the distance from the normalised features to the k-th nearest normalised
    reference, k about 1% of the references (their sampling ratio), at least 1."""

    def unit(f):
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    k = int(min(50, max(1, round(len(reference) / 100))))
    squared = np.maximum(2.0 - 2.0 * unit(features) @ unit(reference).T, 0.0)
    return np.sqrt(np.partition(squared, k - 1, axis=1)[:, k - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--foreign", type=int, default=150, help="images per foreign set")
    parser.add_argument("--out", help="folder for the archive and the run (default: a temporary one)")
    args = parser.parse_args()

    from sklearn.metrics import roc_auc_score

    from skinray import conformal, ood
    from skinray.cluster import connect
    from skinray.config import load_config
    from skinray.data.catalog import list_archive, model_split
    from skinray.data.sample import write_sample
    from skinray.demo import TINY_RECIPE
    from skinray.ensemble import halves
    from skinray.predictor import Predictor
    from skinray.train.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        archive = out / "archive"
        write_sample(archive, per_class=args.per_class, classes=args.classes)
        connect(reserved_cpus=2)
        cfg = load_config(
            overrides=[
                f"data.archive={archive}",
                *TINY_RECIPE,
                f"model.image_size={args.size}",
                f"train.epochs={args.epochs}",
                "data.val_fraction=0.3",
            ]
        )
        run = train(cfg, str(out / "runs"), "member")
        predictor = Predictor.from_path(run.run_dir)
        catalog = list_archive(str(archive))
        val = model_split(catalog, "val", predictor.classes, predictor.config.data)
        test = model_split(catalog, "test", predictor.classes, predictor.config.data)
        labels = val["label_index"].to_numpy()
        fitting, calibration = halves(labels, cfg.data.seed)
        known = predict_folder(predictor, [Path(p) for p in val["path"].to_pylist()])
        fresh = predict_folder(predictor, [Path(p) for p in test["path"].to_pylist()])
        accuracy = float((fresh.labels == test["label_index"].to_numpy()).mean())
        folders = foreign_sets(out / "foreign", args.foreign)
        foreign = {name: predict_folder(predictor, sorted(f.iterdir())) for name, f in folders.items()}

        features = known.member_features[0]
        statistics = ood.fit_statistics(features[fitting], labels[fitting])
        methods = {
            "mahalanobis": lambda p: ood.mahalanobis_scores(statistics, p.member_features[0]),
            "knn": lambda p: knn_scores(features[fitting], p.member_features[0]),
            "max_softmax": lambda p: -p.probabilities.max(axis=1),
        }
        results = {}
        for method, score in methods.items():
            threshold = conformal.threshold(score(known)[calibration], 0.95)
            in_scores = score(fresh)
            results[method] = {"false_refusal": float((in_scores > threshold).mean())}
            for name, prediction in foreign.items():
                out_scores = score(prediction)
                y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
                results[method][name] = {
                    "auroc": float(roc_auc_score(y, np.r_[in_scores, out_scores])),
                    "caught": float((out_scores > threshold).mean()),
                }

    sets = list(folders)
    print(
        f"\ntiny member, {args.classes} generated classes x {args.per_class} photos at {args.size} px, "
        f"{args.epochs} epochs (test accuracy {accuracy:.3f}); reference {len(fitting)} validation images, "
        f"threshold on {len(calibration)} others for 5% false refusals; {len(fresh.labels)} known test images"
    )
    print(f"{'method':<12} {'refused known':>13} " + " ".join(f"{s + ' AUROC / caught':>24}" for s in sets))
    for method, r in results.items():
        cells = " ".join(f"{r[s]['auroc']:>15.3f} / {r[s]['caught']:>6.1%}" for s in sets)
        print(f"{method:<12} {r['false_refusal']:>13.1%} {cells}")
    mean_auroc = {m: float(np.mean([r[s]["auroc"] for s in sets])) for m, r in results.items()}
    ratio = mean_auroc["mahalanobis"] / mean_auroc["max_softmax"]
    print(f"mahalanobis_vs_max_softmax (mean AUROC) = {ratio:.2f}; knn {mean_auroc['knn']:.3f}")
    line = record(
        {
            "benchmark": "ood",
            "run": time.strftime("%Y%m%dT%H%M%S"),
            "classes": args.classes,
            "per_class": args.per_class,
            "size": args.size,
            "epochs": args.epochs,
            "accuracy": accuracy,
            "reference_images": int(len(fitting)),
            "calibration_images": int(len(calibration)),
            "known_images": int(len(fresh.labels)),
            "foreign_images": args.foreign,
            "results": results,
            "mean_auroc": mean_auroc,
            "mahalanobis_vs_max_softmax": ratio,
        }
    )
    print(ood_row(line))


if __name__ == "__main__":
    main()
