"""Ingest benchmark: decoded, augmented images per second on this machine, four ways, one run.

    python benchmarks/ingest.py [--images 960] [--sizes 224 384] [--repeats 2]

(a) pool:    skinray's decode-and-augment function in a plain process pool over every core, the
             ceiling for any pipeline built on it;
(b) ray:     the skinray Ray Data training stream end to end, consumed as a trainer consumes it;
(c) tfdata:  tf.data with tf.io.decode_image and Keras preprocessing layers (RandomRotation,
             RandomZoom, RandomTranslation, RandomFlip, RandomShear), num_parallel_calls=AUTOTUNE;
(d) decode:  plain full-resolution Pillow decoding in the same pool, for reference.

All four read the same generated photos (the sample archive's renderer: 480-1024 px a side, one in
eight a PNG) and produce the same output size. Prints a table, the ratios ray/tfdata and ray/pool,
and one JSON line per output size. Runtime on 2 cores: about three minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from multiprocessing import Pool
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


def _augment_one(args) -> int:
    path, size, epoch = args
    with open(path, "rb") as f:
        image = decode(f.read(), min_size=size)
    out = warp(image, sample_params(AugmentConfig(), image_seed(0, epoch, path)), size)
    return int(out[0, 0, 0])


def _decode_full(path: str) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").size[0]


def pool_rate(paths, size, repeats, full_decode=False) -> float:
    with Pool(os.cpu_count()) as pool:
        work = paths if full_decode else [(p, size, 0) for p in paths]
        fn = _decode_full if full_decode else _augment_one
        pool.map(fn, work[: 2 * os.cpu_count()], chunksize=1)  # warm the workers
        start = time.perf_counter()
        for r in range(repeats):
            work = paths if full_decode else [(p, size, r) for p in paths]
            pool.map(fn, work, chunksize=8)
        return repeats * len(paths) / (time.perf_counter() - start)


# === (b): the skinray Ray Data stream ===


def ray_rate(paths, size, repeats) -> float:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from skinray.data.pipeline import ImageSource, epochs_of_rows, iter_stream, stream

    table = pa.table({"path": paths, "label": ["x"] * len(paths),
                      "label_index": pa.array(np.zeros(len(paths)), pa.int32())})
    source = ImageSource(pafs.LocalFileSystem())

    def epochs(which: range) -> int:
        rows = epochs_of_rows(table, rank=0, world=1, batch_size=BATCH, seed=0, epochs=which)
        n = 0
        for batch in iter_stream(stream(rows, source=source, size=size, batch_size=BATCH,
                                        augment=AugmentConfig()), BATCH):
            n += len(batch["image"])
        return n

    epochs(range(99, 100))  # warm: worker processes and imports
    start = time.perf_counter()
    n = epochs(range(repeats))
    return n / (time.perf_counter() - start)


# === (c): tf.data with Keras preprocessing layers ===


def tfdata_rate(paths, size, repeats) -> float:
    import keras
    import tensorflow as tf

    layers = keras.Sequential([
        keras.layers.RandomRotation(30 / 360, fill_mode="nearest"),
        keras.layers.RandomZoom(0.3, 0.3, fill_mode="nearest"),
        keras.layers.RandomTranslation(0.2, 0.2, fill_mode="nearest"),
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomShear(x_factor=0.2, fill_mode="nearest"),
    ])

    def load(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.image.resize(image, (size, size))

    ds = (tf.data.Dataset.from_tensor_slices(paths)
          .map(load, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(BATCH, drop_remainder=True)
          .map(lambda x: tf.cast(layers(x, training=True), tf.uint8), num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE))
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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", help="reuse this folder of generated images")
    args = parser.parse_args()

    folder = Path(args.data or tempfile.mkdtemp(prefix="skinray-ingest-"))
    paths = make_archive(folder, args.images) if not any(folder.rglob("*.jpg")) else sorted(
        str(p) for p in (folder / "train").rglob("*.*"))
    print(f"{len(paths)} images in {folder}, {os.cpu_count()} cores")

    # The pools first: forked after ray.init, their workers would inherit Ray's signal handlers.
    results = {size: {"pool": pool_rate(paths, size, args.repeats),
                      "decode": pool_rate(paths, size, args.repeats, full_decode=True)}
               for size in args.sizes}
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for size in args.sizes:
        results[size]["ray"] = ray_rate(paths, size, args.repeats)
    ray.shutdown()
    for size in args.sizes:
        results[size]["tfdata"] = tfdata_rate(paths, size, args.repeats)

    print(f"\n{'size':>5} {'(a) pool':>10} {'(b) ray':>10} {'(c) tf.data':>12} {'(d) decode':>11} "
          f"{'b/c':>6} {'b/a':>6}   images/s, {os.cpu_count()} cores")
    for size, r in results.items():
        print(f"{size:>5} {r['pool']:>10.0f} {r['ray']:>10.0f} {r['tfdata']:>12.0f} {r['decode']:>11.0f} "
              f"{r['ray'] / r['tfdata']:>6.2f} {r['ray'] / r['pool']:>6.2f}")
    for size, r in results.items():
        print(json.dumps({"benchmark": "ingest", "size": size, "images": len(paths), "cores": os.cpu_count(),
                          **{k: round(v, 1) for k, v in r.items()},
                          "ray_vs_tfdata": round(r["ray"] / r["tfdata"], 3),
                          "ray_vs_pool": round(r["ray"] / r["pool"], 3)}))


if __name__ == "__main__":
    main()
