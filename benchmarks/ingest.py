"""Ingest benchmark: decoded, augmented images per second on this machine, four ways, one run.

    python benchmarks/ingest.py [--images 960] [--sizes 224 384] [--repeats 3]

(a) pool:    skinray's decode-and-augment function in a plain process pool over every core, each
             image dropped in the worker: the function's own rate;
(a2) pool, batches: the same, delivering 32-image batches to the parent as a trainer fed by a
             pool would receive them (the fair ceiling for a pipeline that must hand pixels over);
(b) ray:     the skinray Ray Data training stream end to end (two epochs in one stream, as a run
             streams all its epochs), consumed as a trainer consumes it;
(c) tfdata:  tf.data with tf.io.decode_image and Keras preprocessing layers (RandomRotation,
             RandomZoom, RandomTranslation, RandomFlip, RandomShear), num_parallel_calls=AUTOTUNE;
(d) decode:  plain full-resolution Pillow decoding in the same pool, for reference.

All read the same generated photos (the sample archive's renderer: 480-1024 px a side, one in
eight a PNG) and produce the same output size. Every side runs `--repeats` interleaved
measurements after the same warm-up; the table shows the median (the best in brackets), the
ratios are of medians, and one JSON line per output size carries best, median and spread; it is
appended to benchmarks/results/ingest.jsonl (`--no-record`: not). Runtime on 2 cores: about seven
minutes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ingest_row, record, stats

from skinray.config import AugmentConfig
from skinray.data.augment import image_seed, sample_params, warp
from skinray.data.decode import decode
from skinray.data.sample import write_sample

BATCH = 32


def make_archive(folder: Path, images: int) -> list[str]:
    classes = 8
    write_sample(folder, per_class=max(1, images // classes), classes=classes, seed=1, test_fraction=0.0)
    return sorted(str(p) for p in (folder / "train").rglob("*.*"))


# === (a) and (d): a plain process pool ===


def _augment(path: str, size: int, epoch: int) -> np.ndarray:
    with open(path, "rb") as f:
        image = decode(f.read(), min_size=size)
    return warp(image, sample_params(AugmentConfig(), image_seed(0, epoch, path)), size)


def _augment_one(args) -> int:
    """The image is made and dropped in the worker: the function's own rate."""
    return int(_augment(*args)[0, 0, 0])


def _augment_batch(args) -> np.ndarray:
    """A batch delivered to the parent, as a trainer fed by a process pool would receive it."""
    paths, size, epoch = args
    return np.stack([_augment(p, size, epoch) for p in paths])


def _decode_full(path: str) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").size[0]


def pool_rate(pool, paths, size, epoch: int, full_decode: bool = False, deliver: bool = False) -> float:
    """One epoch over `paths` in a warm pool of every core."""
    start = time.perf_counter()
    if full_decode:
        pool.map(_decode_full, paths, chunksize=8)
    elif deliver:
        batches = [(paths[i : i + BATCH], size, epoch) for i in range(0, len(paths), BATCH)]
        for batch in pool.imap(_augment_batch, batches):
            assert batch.shape[1] == size
    else:
        pool.map(_augment_one, [(p, size, epoch) for p in paths], chunksize=8)
    return len(paths) / (time.perf_counter() - start)


# === (b): the skinray Ray Data stream ===


def ray_rate(paths, size, repeats) -> float:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from skinray.data.ingest import ImageSource, epochs_of_rows, iter_stream, stream

    table = pa.table(
        {
            "path": paths,
            "label": ["x"] * len(paths),
            "label_index": pa.array(np.zeros(len(paths)), pa.int32()),
        }
    )
    source = ImageSource(pafs.LocalFileSystem())

    def epochs(which: range) -> int:
        rows = epochs_of_rows(table, rank=0, world=1, batch_size=BATCH, seed=0, epochs=which)
        n = 0
        for batch in iter_stream(
            stream(rows, source=source, size=size, batch_size=BATCH, augment=AugmentConfig()), BATCH
        ):
            n += len(batch["image"])
        return n

    start = time.perf_counter()
    n = epochs(range(repeats))
    return n / (time.perf_counter() - start)


# === (c): tf.data with Keras preprocessing layers ===


def tfdata_stream(paths, size):
    """The tf.data pipeline, warmed (its graph traced) before any measurement."""
    import keras
    import tensorflow as tf

    layers = keras.Sequential(
        [
            keras.layers.RandomRotation(30 / 360, fill_mode="nearest"),
            keras.layers.RandomZoom(0.3, 0.3, fill_mode="nearest"),
            keras.layers.RandomTranslation(0.2, 0.2, fill_mode="nearest"),
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomShear(x_factor=0.2, fill_mode="nearest"),
        ]
    )

    def load(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.image.resize(image, (size, size))

    ds = (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(load, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(BATCH, drop_remainder=True)
        .map(lambda x: tf.cast(layers(x, training=True), tf.uint8), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    for _ in ds.take(2):
        pass
    return ds


def tfdata_rate(ds) -> float:
    start, n = time.perf_counter(), 0
    for batch in ds:
        n += int(batch.shape[0])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", help="reuse this folder of generated images")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/")
    args = parser.parse_args()

    folder = Path(args.data or tempfile.mkdtemp(prefix="skinray-ingest-"))
    paths = (
        make_archive(folder, args.images)
        if not any(folder.rglob("*.jpg"))
        else sorted(str(p) for p in (folder / "train").rglob("*.*"))
    )
    print(f"{len(paths)} images in {folder}, {os.cpu_count()} cores")

    # Interleaved repeats, every side the same number of times after the same warm-up; best,
    # median and spread: a slow spell of this small machine hits every side alike.
    # The pools start (spawned, warm) before Ray, so their workers inherit none of Ray's handlers.
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(os.cpu_count())
    pool.map(_augment_one, [(p, 64, 0) for p in paths[: 4 * os.cpu_count()]], chunksize=1)  # warm
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    sides = ("pool", "pool_batches", "ray", "tfdata", "decode")
    runs = {size: {k: [] for k in sides} for size in args.sizes}
    for size in args.sizes:
        ray_rate(paths[:256], size, 1)  # warm: Ray's worker processes and their imports
        tfdata = tfdata_stream(paths, size)  # warm: its graph traced
        for r in range(args.repeats):
            runs[size]["pool"].append(pool_rate(pool, paths, size, r))
            runs[size]["pool_batches"].append(pool_rate(pool, paths, size, r, deliver=True))
            runs[size]["ray"].append(ray_rate(paths, size, 2))  # one stream spans a run's epochs
            runs[size]["tfdata"].append(tfdata_rate(tfdata))
            runs[size]["decode"].append(pool_rate(pool, paths, size, r, full_decode=True))
    ray.shutdown()
    pool.close()
    results = {size: {k: stats(v) for k, v in r.items()} for size, r in runs.items()}

    print(
        f"\n{'size':>5} {'(a) pool':>10} {'(a2) pool, batches':>19} {'(b) ray':>10} {'(c) tf.data':>12} "
        f"{'(d) decode':>11} {'b/c':>6} {'b/a':>6} {'b/a2':>6}   images/s, median of {args.repeats} "
        f"(best), {os.cpu_count()} cores; ratios of medians"
    )
    for size, r in results.items():
        m = {k: v["median"] for k, v in r.items()}
        cells = " ".join(f"{m[k]:>6.0f} ({r[k]['best']:.0f})" for k in sides)
        print(
            f"{size:>5} {cells} {m['ray'] / m['tfdata']:>6.2f} {m['ray'] / m['pool']:>6.2f} "
            f"{m['ray'] / m['pool_batches']:>6.2f}"
        )
    run = time.strftime("%Y%m%dT%H%M%S")
    rows = []
    for size, r in results.items():
        m = {k: v["median"] for k, v in r.items()}
        rows.append(
            record(
                {
                    "benchmark": "ingest",
                    "run": run,
                    "size": size,
                    "images": len(paths),
                    "repeats": args.repeats,
                    **r,
                    "ray_vs_tfdata": round(m["ray"] / m["tfdata"], 3),
                    "ray_vs_pool": round(m["ray"] / m["pool"], 3),
                    "ray_vs_pool_batches": round(m["ray"] / m["pool_batches"], 3),
                },
                save=not args.no_record,
            )
        )
    print("\nthe rows of docs/benchmarks.md (median (lowest-highest)):")
    for line in rows:
        print(ingest_row(line))


if __name__ == "__main__":
    main()
