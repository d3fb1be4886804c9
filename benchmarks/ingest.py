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
eight a PNG) and produce the same output size. (a), (a2), (b) and (d) are the best of `--repeats`
interleaved measurements (the spread is printed); (c) runs once. Prints a table, the ratios
ray/tfdata, ray/pool and ray/pool-batches, and one JSON line per output size. Runtime on 2 cores:
about six minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

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


def tfdata_rate(paths, size, repeats) -> float:
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
    start, n = time.perf_counter(), 0
    for _ in range(repeats):
        for batch in ds:
            n += int(batch.shape[0])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", help="reuse this folder of generated images")
    args = parser.parse_args()

    folder = Path(args.data or tempfile.mkdtemp(prefix="skinray-ingest-"))
    paths = (
        make_archive(folder, args.images)
        if not any(folder.rglob("*.jpg"))
        else sorted(str(p) for p in (folder / "train").rglob("*.*"))
    )
    print(f"{len(paths)} images in {folder}, {os.cpu_count()} cores")

    # Interleaved repeats, best and spread: a slow spell of this small machine hits every side.
    # The pools start (spawned, warm) before Ray, so their workers inherit none of Ray's handlers.
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(os.cpu_count())
    pool.map(_augment_one, [(p, 64, 0) for p in paths[: 4 * os.cpu_count()]], chunksize=1)  # warm
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = {size: {k: [] for k in ("pool", "pool_batches", "ray", "decode")} for size in args.sizes}
    for size in args.sizes:
        ray_rate(paths[:256], size, 1)  # warm: Ray's worker processes and their imports
        for r in range(args.repeats):
            runs[size]["pool"].append(pool_rate(pool, paths, size, r))
            runs[size]["pool_batches"].append(pool_rate(pool, paths, size, r, deliver=True))
            runs[size]["ray"].append(ray_rate(paths, size, 2))  # one stream spans a run's epochs
            runs[size]["decode"].append(pool_rate(pool, paths, size, r, full_decode=True))
    ray.shutdown()
    pool.close()
    results = {size: {k: max(v) for k, v in r.items()} for size, r in runs.items()}
    for size in args.sizes:
        results[size]["tfdata"] = tfdata_rate(paths, size, 1)

    print(
        f"\n{'size':>5} {'(a) pool':>10} {'(a2) pool, batches':>19} {'(b) ray':>10} {'(c) tf.data':>12} "
        f"{'(d) decode':>11} {'b/c':>6} {'b/a':>6} {'b/a2':>6}   images/s, best of {args.repeats}, "
        f"{os.cpu_count()} cores"
    )
    for size, r in results.items():
        print(
            f"{size:>5} {r['pool']:>10.0f} {r['pool_batches']:>19.0f} {r['ray']:>10.0f} {r['tfdata']:>12.0f} "
            f"{r['decode']:>11.0f} {r['ray'] / r['tfdata']:>6.2f} {r['ray'] / r['pool']:>6.2f} "
            f"{r['ray'] / r['pool_batches']:>6.2f}"
        )
    for size, r in runs.items():
        print(
            f"spread at {size} px (min-max): "
            + ", ".join(f"{k} {min(v):.0f}-{max(v):.0f}" for k, v in r.items())
        )
    for size, r in results.items():
        print(
            json.dumps(
                {
                    "benchmark": "ingest",
                    "size": size,
                    "images": len(paths),
                    "cores": os.cpu_count(),
                    "repeats": args.repeats,
                    **{k: round(v, 1) for k, v in r.items()},
                    "runs": {k: [round(x, 1) for x in v] for k, v in runs[size].items()},
                    "ray_vs_tfdata": round(r["ray"] / r["tfdata"], 3),
                    "ray_vs_pool": round(r["ray"] / r["pool"], 3),
                    "ray_vs_pool_batches": round(r["ray"] / r["pool_batches"], 3),
                }
            )
        )


if __name__ == "__main__":
    main()
