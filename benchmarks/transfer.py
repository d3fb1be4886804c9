"""Transfer benchmark: skinray's transfer recipe against the same two phases in plain Keras, from the
same pretrained weights, and against training from scratch.

    python benchmarks/transfer.py [--seeds 0 1 2] [--epochs 20] [--per-class 60] [--workers 2]

Pretraining (once): the `tiny` CNN, trained by skinray from random weights (`--weights none`) to
tell apart crops of ten real photographs that scikit-image ships (`skimage.data`: an astronaut, a
cat, coffee, the Hubble deep field, a stained tissue section, a retina, a rocket,
brick, grass and gravel), each crop labelled by the photograph it comes from.

The second, different set: scikit-learn's handwritten digits (1,797 8x8 scans by 43 people), as a
clinic's archive is to DermNet: few training images (`--per-class` a digit, of which skinray's
seeded split validates a fifth) and every other scan to test on (1,197 at 60 a digit: one scan is
0.08 points).
On it, per seed, interleaved:

1. skinray, `--weights PRETRAINED_RUN`: the transfer recipe on `--workers` Ray Train workers (head
   epochs on the frozen backbone, then the top layers at a small rate, BatchNormalization frozen);
2. plain Keras in one process, from the same weights (the file `skinray export-weights` writes)
   and the same new head, written as the seed notebook does it: the backbone frozen for the head
   epochs, then `layers[-N:]` unfrozen except BatchNormalization, recompiled at the small rate,
   ReduceLROnPlateau and early stopping by hand on validation macro-F1; the same augmentation
   (skinray's functions), global batch, epochs, rates, label smoothing and class weights;
3. skinray from random weights (the scratch recipe), the same epochs.

Prints mean and spread of the test accuracy per side, `transfer_vs_keras` (skinray's transfer
mean minus Keras's; target >= -0.02) and `transfer_vs_scratch`, the docs' row and one JSON line
(appended to benchmarks/results/). Runtime on 2 cores with the defaults: about 15 minutes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import accuracy_fields, accuracy_summary, record, transfer_row
from quality import keras_fresh, labelled_images, skinray_run, write_digits

PHOTOS = (
    "astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
    "brick", "grass", "gravel",
)  # fmt: skip


def write_photo_crops(root: Path, per_class: int, seed: int = 0) -> Path:
    """`train/<photo>/*.png`: square crops of 48 to 160 px at random places of each photograph
    (greyscale ones as RGB), `per_class` each; the left 70% of a photo only (the rest unused)."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        pixels = getattr(data, name)()
        photo = Image.fromarray(pixels).convert("RGB")
        width, height = photo.size
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(rng.integers(48, min(161, height, int(width * 0.7))))
            x = int(rng.integers(0, int(width * 0.7) - side + 1))
            y = int(rng.integers(0, height - side + 1))
            photo.crop((x, y, x + side, y + side)).save(folder / f"{i:04d}.png")
    return root


def pretrain(args, out: Path) -> tuple[str, str]:
    """skinray trains the tiny CNN on the photo crops; returns the run and its exported weights."""
    from skinray.config import load_config
    from skinray.models.sources import export_backbone
    from skinray.train.trainer import train

    archive = write_photo_crops(out / "photos", args.pretrain_per_class)
    cfg = load_config(
        overrides=[
            f"data.archive={archive}",
            "model.backbone=tiny",
            "model.weights=none",
            f"model.image_size={args.pretrain_size}",
            f"train.workers={args.workers}",
            f"train.epochs={args.pretrain_epochs}",
            f"train.batch_size={args.batch // args.workers}",
            "train.finetune_lr=0.004",  # the tiny CNN's scratch rate (skinray.demo.TINY_RECIPE)
        ]
    )
    started = time.perf_counter()
    result = train(cfg, str(out / "runs"), "pretrained")
    weights = out / "pretrained.weights.h5"
    export_backbone(result.run_dir, str(weights))
    print(
        f"pretrained on {len(PHOTOS)} photos' crops in {time.perf_counter() - started:.0f} s: validation "
        f"accuracy {result.best_metrics['val_accuracy']:.3f} (epoch {result.best_metrics['epoch']})",
        flush=True,
    )
    return result.run_dir, str(weights)


def settings(args, archive: Path, seed: int, weights: str) -> list[str]:
    """What the comparison fixes; the rest are the recipe's defaults for the weights."""
    return [
        f"data.archive={archive}",
        f"data.seed={seed}",
        "model.backbone=tiny",
        f"model.weights={weights}",
        f"model.image_size={args.size}",
        f"train.workers={args.workers}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch // args.workers}",
        # The tiny CNN's rates (skinray.demo.TINY_RECIPE's 4e-3), for every side: at the transfer
        # recipe's ImageNet-sized 1e-3 / 1e-4 nothing moved in 12 epochs (all sides near chance).
        "train.head_lr=0.004",
        "train.finetune_lr=0.001",
        *args.set,
    ]


def keras_transfer(args, archive: Path, seed: int, weights: str) -> dict:
    """The seed notebook's two phases in plain Keras, from the same weights and the same new head."""
    import keras

    from skinray.config import load_config
    from skinray.data.catalog import class_weights, list_archive, splits
    from skinray.data.ingest import ImageSource
    from skinray.metrics import confusion, confusion_metrics
    from skinray.models import create_classifier
    from skinray.train.schedule import scaled_learning_rate

    cfg = load_config(overrides=settings(args, archive, seed, weights))
    t = cfg.train
    catalog = list_archive(str(archive))
    parts = splits(catalog, cfg.data.val_fraction, cfg.data.seed)
    source, k = ImageSource.of(catalog), catalog.num_classes

    def images(table, epoch: int | None):
        return labelled_images(table, source, args.size, cfg.augment, cfg.data.seed, epoch)

    model = create_classifier(cfg.model, k, seed=seed)  # the weights file; the head skinray's run starts with
    backbone = model.get_layer("backbone")
    weights_of_class = dict(enumerate(class_weights(parts["train"]["label_index"].to_numpy(), k)))
    x_val, y_val = images(parts["val"], None)
    best = {"f1": -1.0, "weights": None, "epoch": 0}

    def compile_at(rate: float) -> None:
        model.compile(
            optimizer=keras.optimizers.Adam(
                scaled_learning_rate(rate, args.batch, t.base_batch, t.lr_scaling)
            ),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=t.label_smoothing),
        )

    def epochs(first: int, last: int, patience: int, plateau: int | None) -> None:
        """Fits epoch by epoch; keeps the best weights by validation macro-F1; plateau and stop by hand."""
        since = 0
        for epoch in range(first, last):
            x, y = images(parts["train"], epoch)
            model.fit(
                x, keras.utils.to_categorical(y, k), batch_size=args.batch, epochs=epoch + 1,
                initial_epoch=epoch, class_weight=weights_of_class, shuffle=True, verbose=0,
            )  # fmt: skip
            predicted = model.predict(x_val, batch_size=256, verbose=0).argmax(axis=1)
            f1 = confusion_metrics(confusion(y_val, predicted, k))["macro_f1"]
            since = 0 if f1 > best["f1"] else since + 1
            if f1 > best["f1"]:
                best.update(f1=f1, weights=model.get_weights(), epoch=epoch + 1)
            if plateau and since and since % plateau == 0:
                rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) * t.plateau_factor
                model.optimizer.learning_rate = max(rate, t.min_lr)
            if patience and since >= patience:
                return

    started = time.perf_counter()
    backbone.trainable = False  # phase 1: the head alone
    compile_at(t.head_lr)
    epochs(0, t.head_epochs, t.early_stopping_patience, None)
    backbone.trainable = True  # phase 2: the top layers, BatchNormalization kept frozen
    for layer in backbone.layers[: -t.unfreeze_top] if t.unfreeze_top > 0 else []:
        layer.trainable = False
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    compile_at(t.finetune_lr)
    epochs(t.head_epochs, t.epochs, t.early_stopping_patience, t.plateau_patience)
    seconds = time.perf_counter() - started
    model.set_weights(best["weights"])
    x_test, y_test = images(catalog.split("test"), None)
    accuracy = float((model.predict(x_test, batch_size=256, verbose=0).argmax(axis=1) == y_test).mean())
    return {"test_accuracy": accuracy, "best_epoch": best["epoch"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="epochs of every run on the digits")
    parser.add_argument(
        "--per-class", type=int, default=60, help="training digits a class (a fifth validate)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="global batch (every side)")
    parser.add_argument("--size", type=int, default=32, help="input side on the digits")
    parser.add_argument("--pretrain-per-class", type=int, default=120)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--pretrain-size", type=int, default=48)
    parser.add_argument("--out", help="folder for the archives and runs (default: a temporary one)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run"
    )
    args = parser.parse_args()
    if args.batch % args.workers:
        parser.error("--batch must divide over --workers")

    from skinray.cluster import connect

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        connect(reserved_cpus=args.workers)
        run, weights = pretrain(args, out)
        archive = write_digits(out / "digits", train_size=10 * args.per_class)
        sides = {"transfer": [], "keras": [], "scratch": []}
        for seed in args.seeds:  # interleaved: a slow spell of the machine hits every side
            sides["keras"].append(keras_fresh(args, archive, seed, keras_transfer, weights))
            for name, weights in (("transfer", run), ("scratch", "none")):
                overrides = settings(args, archive, seed, weights)
                sides[name].append(skinray_run(overrides, archive, out, f"{name}-seed{seed}"))
            print(
                f"seed {seed}: " + ", ".join(f"{n} {s[-1]['test_accuracy']:.4f}" for n, s in sides.items()),
                flush=True,
            )
    report(args, sides)


def report(args, sides: dict) -> None:
    tests = 1797 - 10 * args.per_class
    print(
        f"\ntiny pretrained on photo crops -> digits at {args.size} px, {10 * args.per_class} training "
        f"scans, {args.epochs} epochs, global batch {args.batch}, seeds {args.seeds}; "
        f"test accuracy on {tests} scans"
    )
    labels = {
        "transfer": f"skinray transfer ({args.workers} workers)",
        "keras": "Keras two phases (1 process)",
        "scratch": f"skinray from scratch ({args.workers} workers)",
    }
    summary = accuracy_summary(sides, labels)
    vs_keras = summary["transfer"]["mean"] - summary["keras"]["mean"]
    vs_scratch = summary["transfer"]["mean"] - summary["scratch"]["mean"]
    print(f"transfer_vs_keras = {vs_keras:+.4f} (target >= -0.02); transfer_vs_scratch = {vs_scratch:+.4f}")
    line = record(
        {
            "benchmark": "transfer",
            "run": time.strftime("%Y%m%dT%H%M%S"),
            "pretrained_on": "skimage.data photo crops",
            "dataset": "sklearn digits",
            "train_images": 10 * args.per_class,
            "test_images": tests,
            "size": args.size,
            "set": args.set,
            "epochs": args.epochs,
            "workers": args.workers,
            "global_batch": args.batch,
            "seeds": args.seeds,
            **accuracy_fields(summary),
            "transfer_vs_keras": vs_keras,
            "transfer_vs_scratch": vs_scratch,
        }
    )
    print("docs/benchmarks.md row:\n" + transfer_row(line))


if __name__ == "__main__":
    main()
