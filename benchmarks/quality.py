"""Accuracy benchmark: skinray's from-scratch recipe on Ray Train against a plain Keras `model.fit`.

    python benchmarks/quality.py [--seeds 0 1 2] [--epochs 30] [--workers 2] [--size 32]

Data: scikit-learn's handwritten digits (`sklearn.datasets.load_digits`: 1,797 8x8 scans of digits
written by 43 people, from the UCI collection; shipped inside the scikit-learn package), written as a
folder-per-class archive of PNGs with a stratified 80/20 train/test split (1,437 / 360 images).
Both sides train the `tiny` CNN from random weights at `--size` px on the same training split (the
same validation images held out by skinray's seeded split), with skinray's augmentation
functions, the same global batch, epochs, optimizer, learning-rate schedule, class weights, dropout
and early stopping (the `weights: none` defaults), keep the epoch with the best validation
macro-F1, and are scored on the same held-out test split:

- skinray: `skinray train` (`--workers` Ray Train workers, the Ray Data pipeline) then `evaluate`;
- keras:   one process, `model.fit` one epoch at a time on that epoch's augmented images.

Each side runs once per seed, interleaved; prints mean and spread of the test accuracy per side,
`accuracy_vs_keras_fit` (skinray's mean minus Keras's; target >= -0.02), the docs' row and one
JSON line (appended to benchmarks/results/).
Runtime on 2 cores with the defaults: about 25 minutes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import accuracy_fields, accuracy_summary, quality_row, record


def write_digits(root: Path, train_size: float | int = 0.8) -> Path:
    """The digits as `train/<digit>/*.png` and `test/<digit>/*.png` (stratified, fixed split):
    `train_size` is the training share, or (an int) the number of training scans."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # 17 grey levels -> 0..255
    indices = np.arange(len(images))
    train, test = train_test_split(indices, train_size=train_size, stratify=digits.target, random_state=0)
    for split, chosen in (("train", train), ("test", test)):
        for i in chosen:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).convert("RGB").save(folder / f"{i:04d}.png")
    return root


def settings(args, archive: Path, seed: int) -> list[str]:
    """Only what the comparison fixes; the rest are skinray's defaults for `weights: none`."""
    return [
        f"data.archive={archive}",
        f"data.seed={seed}",
        "model.backbone=tiny",
        "model.weights=none",
        f"model.image_size={args.size}",
        f"train.workers={args.workers}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch // args.workers}",
        *args.set,
    ]


def skinray_run(overrides: list[str], archive: Path, out: Path, name: str) -> dict:
    """`skinray train` with these settings, then `evaluate` of its best checkpoint on the test split."""
    from skinray.config import load_config
    from skinray.evaluate import evaluate
    from skinray.train.trainer import train

    cfg = load_config(overrides=overrides)
    started = time.perf_counter()
    result = train(cfg, str(out / "runs"), name)
    seconds = time.perf_counter() - started
    report = evaluate(result.run_dir, str(archive), "test", str(out / f"eval-{name}"))
    return {
        "test_accuracy": report["accuracy"],
        "best_epoch": result.best_metrics["epoch"],
        "seconds": seconds,
    }


def labelled_images(table, source, size: int, augment, seed: int, epoch: int | None):
    """A split's images through skinray's decode and warp (`augment` for a training `epoch`, the
    plain resize with `epoch` None), and their labels: what the Keras sides fit and score on."""
    from skinray.data.ingest import load_batch

    rows = {
        "path": np.asarray(table["path"].to_pylist(), object),
        "label_index": table["label_index"].to_numpy(),
        "epoch": np.full(table.num_rows, epoch or 0, np.int32),
    }
    batch = load_batch(
        rows, source=source, size=size, augment=augment if epoch is not None else None, seed=seed
    )
    return batch["image"], batch["label_index"]


def keras_run(args, archive: Path, seed: int) -> dict:
    """A plain single-process `model.fit` with the same recipe, data and augmentation."""
    import keras

    from skinray.config import load_config
    from skinray.data.catalog import class_weights, list_archive, splits
    from skinray.data.ingest import ImageSource
    from skinray.metrics import confusion, confusion_metrics
    from skinray.models import create_classifier
    from skinray.train.monitor import Monitor
    from skinray.train.schedule import scaled_learning_rate, scheduled_learning_rate

    cfg = load_config(overrides=settings(args, archive, seed))
    train_cfg = cfg.train
    catalog = list_archive(str(archive))
    parts = splits(catalog, cfg.data.val_fraction, cfg.data.seed)
    source = ImageSource.of(catalog)
    k = catalog.num_classes

    def images(table, epoch: int | None):
        return labelled_images(table, source, args.size, cfg.augment, cfg.data.seed, epoch)

    model = create_classifier(cfg.model, k, seed=seed)  # the initial weights skinray's run starts from
    base = scaled_learning_rate(train_cfg.finetune_lr, args.batch, train_cfg.base_batch, train_cfg.lr_scaling)
    model.compile(
        optimizer=keras.optimizers.Adam(base),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=train_cfg.label_smoothing
        ),
    )
    weights = dict(enumerate(class_weights(parts["train"]["label_index"].to_numpy(), k)))
    x_val, y_val = images(parts["val"], None)
    monitor = Monitor(
        mode="max", patience=train_cfg.early_stopping_patience, plateau_patience=train_cfg.plateau_patience
    )
    best_weights, started = None, time.perf_counter()
    for epoch in range(train_cfg.epochs):
        lr = scheduled_learning_rate(
            base, epoch, 0, train_cfg.epochs, train_cfg.warmup_epochs, train_cfg.min_lr, train_cfg.schedule
        )
        if lr is not None:
            model.optimizer.learning_rate = lr
        x, y = images(parts["train"], epoch)
        model.fit(
            x,
            keras.utils.to_categorical(y, k),
            batch_size=args.batch,
            epochs=epoch + 1,
            initial_epoch=epoch,
            class_weight=weights,
            shuffle=True,
            verbose=0,
        )
        predicted = model.predict(x_val, batch_size=256, verbose=0).argmax(axis=1)
        f1 = confusion_metrics(confusion(y_val, predicted, k))["macro_f1"]
        improved, _, stop = monitor.update(f1, epoch)
        if improved:
            best_weights = model.get_weights()
        if stop:
            break
    seconds = time.perf_counter() - started
    model.set_weights(best_weights)
    x_test, y_test = images(catalog.split("test"), None)
    accuracy = float((model.predict(x_test, batch_size=256, verbose=0).argmax(axis=1) == y_test).mean())
    return {"test_accuracy": accuracy, "best_epoch": monitor.best_epoch + 1, "seconds": seconds}


def _keras_in_process(run, args, archive: Path, seed: int, extra: tuple, queue) -> None:
    queue.put(run(args, archive, seed, *extra))


def keras_fresh(args, archive: Path, seed: int, run=keras_run, *extra) -> dict:
    """`run(args, archive, seed, *extra)` in a fresh process (TensorFlow's state and threads as a
    user's own script would have them)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_keras_in_process, args=(run, args, archive, seed, extra, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="global batch (both sides)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--out", help="folder for the archive and runs (default: a temporary one)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for both sides, to compare recipes (repeatable)",
    )
    args = parser.parse_args()
    if args.batch % args.workers:
        parser.error("--batch must divide over --workers")

    from skinray.cluster import connect

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        archive = write_digits(out / "digits")
        connect(reserved_cpus=args.workers)
        sides = {"skinray": [], "keras": []}
        for seed in args.seeds:  # interleaved: a slow spell of the machine hits both sides
            sides["keras"].append(keras_fresh(args, archive, seed))
            sides["skinray"].append(skinray_run(settings(args, archive, seed), archive, out, f"seed{seed}"))
            print(
                f"seed {seed}: skinray {sides['skinray'][-1]['test_accuracy']:.4f}, "
                f"keras {sides['keras'][-1]['test_accuracy']:.4f}",
                flush=True,
            )
    report(args, sides)


def report(args, sides: dict) -> None:
    print(
        f"\ntiny from scratch, digits at {args.size} px, {args.epochs} epochs, global batch {args.batch}, "
        f"seeds {args.seeds}{', ' + ' '.join(args.set) if args.set else ''}; test accuracy on 360 "
        "held-out scans"
    )
    labels = {
        "skinray": f"skinray ({args.workers} Ray Train workers)",
        "keras": "Keras model.fit (1 process)",
    }
    summary = accuracy_summary(sides, labels)
    gap = summary["skinray"]["mean"] - summary["keras"]["mean"]
    print(f"accuracy_vs_keras_fit = {gap:+.4f} (target >= -0.02)")
    line = record(
        {
            "benchmark": "quality",
            "run": time.strftime("%Y%m%dT%H%M%S"),
            "dataset": "sklearn digits",
            "size": args.size,
            "set": args.set,
            "epochs": args.epochs,
            "workers": args.workers,
            "global_batch": args.batch,
            "seeds": args.seeds,
            **accuracy_fields(summary),
            "accuracy_vs_keras_fit": gap,
        }
    )
    print("docs/benchmarks.md row:\n" + quality_row(line))


if __name__ == "__main__":
    main()
