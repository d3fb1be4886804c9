"""Catalog rows -> Ray Data streams of fixed-shape uint8 batches, for training, evaluation and scoring.

The hot path of the whole system: at ~300 augmented images/s per core, a GPU that trains ResNet50 at
thousands of images/s needs a dozen or more CPU cores of this pipeline, so what it costs per image
decides what a cluster costs. It is built to carry nothing it does not need:

* The rows are only (path, label); each Ray Data task reads its own files through pyarrow.fs, so
  raw bytes never travel through the object store.
* A block is a whole number of batches (about `BLOCK_ROWS` images): a task decodes and warps them
  into one contiguous array, and the consumer's batches are zero-copy slices of it. Blocks of one
  32-image batch spent ~12% more per image on task overhead than blocks of 64 (2-core machine).
* The global shuffle is a permutation of the (small) catalog, drawn per (seed, epoch), and each
  training worker streams its own equal share of it. Equal shares matter: under
  MultiWorkerMirroredStrategy every worker must take the same number of steps.
* A worker's epochs are one stream (rows carry their epoch), in order: no executor start-up and
  no empty pipeline at each epoch boundary, and the next epoch's images are decoded while the
  current one finishes. Resuming at epoch k is a stream that starts at epoch k.

A file that cannot be read or decoded does not stop the stream and is not dropped: its row comes
out with `ok = False`, an all-black image and the reason in `error`, so the batch keeps its shape,
the trainer gives it zero weight, and the run reports how many failed and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from skinray.config import AugmentConfig
from skinray.data.augment import IDENTITY, image_seed, resize, sample_params, warp
from skinray.data.catalog import Catalog
from skinray.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode
from skinray.storage import read_bytes

BLOCK_ROWS = 64


@dataclass(frozen=True)
class ImageSource:
    """How a task reads catalogued files: the archive's filesystem and its URI prefix (picklable)."""

    filesystem: object  # a pyarrow filesystem (storage.resolve)
    prefix: str = ""
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def of(cls, catalog: Catalog, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageSource:
        return cls(catalog.filesystem, catalog.prefix, max_pixels)


def load_image(source: ImageSource, path: str, size: int):
    """Reads and decodes one file for output side `size`; raises DecodeError with the reason."""
    try:
        data = read_bytes(source.filesystem, source.prefix, path)
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc}") from None
    return decode(data, min_size=size, max_pixels=source.max_pixels)


def load_batch(
    batch: dict[str, np.ndarray],
    *,
    source: ImageSource,
    size: int,
    augment: AugmentConfig | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The Ray Data map function: a block of catalog rows -> a batch of model input.

    With `augment`, each image gets its own draw for (seed, epoch, path), the epoch taken from the
    row's `epoch` column (see `epochs_of_rows`; 0 without one); without, a plain resize.
    """
    paths = batch["path"]
    epochs = batch["epoch"] if "epoch" in batch else np.zeros(len(paths), np.int32)
    images = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    ok = np.ones(len(paths), dtype=bool)
    errors = [""] * len(paths)
    for i, path in enumerate(paths):
        try:
            image = load_image(source, path, size)
        except DecodeError as exc:
            ok[i], errors[i] = False, exc.reason
            continue
        params = sample_params(augment, image_seed(seed, int(epochs[i]), path)) if augment else IDENTITY
        images[i] = warp(image, params, size)
    return {
        "image": images,
        "label_index": np.asarray(batch["label_index"], dtype=np.int32),
        "ok": ok,
        "path": np.asarray(paths, dtype=object),
        "error": np.asarray(errors, dtype=object),
        "epoch": np.asarray(epochs, dtype=np.int32),
    }


# === Scoring: decode once, one view per input size ===


def decode_views(
    data: bytes, sizes: tuple[int, ...], max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[int, np.ndarray]:
    """Image bytes -> one uint8 (size, size, 3) view per input size; raises DecodeError.

    What bulk scoring, evaluation and serving feed a `Predictor`: the image is decoded once, for
    the largest size, and each member's view is the evaluation warp of that one decode.
    """
    return decode_photo(data, sizes, max_pixels)[1]


def decode_photo(data: bytes, sizes: tuple[int, ...], max_pixels: int = DEFAULT_MAX_PIXELS):
    """`decode_views`, keeping the decoded photo too (what an explanation is drawn on): (image, views)."""
    image = decode(data, min_size=max(sizes), max_pixels=max_pixels)
    return image, views_of(image, sizes)


def views_of(image, sizes: tuple[int, ...]) -> dict[int, np.ndarray]:
    """One decoded image -> its evaluation warp to each size."""
    return {size: resize(image, size) for size in sizes}


def view_column(size: int) -> str:
    return f"image_{size}"


def load_views(
    batch: dict[str, np.ndarray], *, source: ImageSource, sizes: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """The Ray Data map function of scoring: rows with a `path` -> `image_<size>` views, `ok`, `error`.

    Every other input column passes through. A file that cannot be read or decoded keeps its row,
    with `ok = False`, black views and the reason in `error`.
    """
    paths = batch["path"]
    views = {size: np.zeros((len(paths), size, size, 3), np.uint8) for size in sizes}
    ok, errors = np.ones(len(paths), dtype=bool), [""] * len(paths)
    for i, path in enumerate(paths):
        try:
            image = load_image(source, path, max(sizes))
        except DecodeError as exc:
            ok[i], errors[i] = False, exc.reason
            continue
        for size, view in views_of(image, sizes).items():
            views[size][i] = view
    return {
        **batch,
        **{view_column(s): v for s, v in views.items()},
        "ok": ok,
        "error": np.asarray(errors, dtype=object),
    }


# === Which rows a consumer gets ===


def shard(
    table: pa.Table, *, rank: int, world: int, batch_size: int, seed: int, epoch: int, train: bool
) -> pa.Table:
    """One worker's rows for one epoch.

    Training: a fresh permutation per (seed, epoch), cut to a whole number of global batches so
    every worker gets exactly the same number of full batches. Evaluation: every row, in order,
    dealt round-robin.
    """
    n = table.num_rows
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        steps = n // (world * batch_size)
        order = order[: steps * world * batch_size]
    else:
        order = np.arange(n)
    return table.take(pa.array(order[rank::world], pa.int64()))


def epochs_of_rows(
    table: pa.Table, *, rank: int, world: int, batch_size: int, seed: int, epochs: range
) -> pa.Table:
    """One training worker's rows for several epochs, in order, each row tagged with its epoch."""
    parts = []
    for epoch in epochs:
        rows = shard(table, rank=rank, world=world, batch_size=batch_size, seed=seed, epoch=epoch, train=True)
        parts.append(rows.append_column("epoch", pa.array(np.full(rows.num_rows, epoch), pa.int32())))
    return pa.concat_tables(parts) if parts else table.slice(0, 0)


def steps_per_epoch(num_rows: int, world: int, batch_size: int) -> int:
    return num_rows // (world * batch_size)


def dataset(table: pa.Table, rows_per_block: int):
    """A Ray Dataset of catalog rows in blocks of `rows_per_block` (one block per task)."""
    import ray.data

    if table.num_rows == 0:
        return ray.data.from_arrow(table.slice(0, 0))
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(blocks)


def stream(
    table: pa.Table,
    *,
    source: ImageSource,
    size: int,
    batch_size: int,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    task_options: dict | None = None,
):
    """A Ray Dataset of decoded (and, with `augment`, augmented) images, in blocks of whole batches.

    Example:
        >>> rows = epochs_of_rows(table, rank=0, world=1, batch_size=32, seed=0, epochs=range(10))
        >>> for batch in iter_stream(stream(rows, source=src, size=224, batch_size=32, augment=cfg), 32):
        ...     batch["image"].shape   # (32, 224, 224, 3) uint8
    """
    rows_per_block = batch_size * max(1, round(BLOCK_ROWS / batch_size))
    ds = dataset(table, rows_per_block).map_batches(
        load_batch,
        batch_size=None,
        **(task_options or {"num_cpus": 1.0}),
        fn_kwargs=dict(source=source, size=size, augment=augment, seed=seed),
    )
    # Ray Data reserves half of the CPUs for "other operators" by default; this pipeline has one
    # operator, so the reservation only idles cores (on 2 CPUs: one task at a time, 0.4x the
    # throughput; see benchmarks/ingest.py). Backpressure on object-store memory still applies.
    ds.context.op_resource_reservation_enabled = False
    # In order, so that a training stream's epochs end exactly where its steps say they do. With
    # tasks of equal size this costs no throughput (measured).
    ds.context.execution_options.preserve_order = True
    return ds


def iter_stream(ds, batch_size: int, prefetch_batches: int = 2):
    """Iterates a `stream` in batches of `batch_size`; the last one may be smaller when the rows
    are not a whole number of batches (training shards always are)."""
    return ds.iter_batches(batch_size=batch_size, prefetch_batches=prefetch_batches)


class FailureLog:
    """Counts the files a stream could not use, by reason, keeping the paths for the report."""

    def __init__(self):
        self.reasons: Counter[str] = Counter()
        self.files: dict[str, str] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for i in np.flatnonzero(~batch["ok"]):
            path, reason = str(batch["path"][i]), str(batch["error"][i])
            self.files[path] = reason
            self.reasons[reason.split(":")[0]] += 1

    @property
    def count(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        if not self.files:
            return "0 files failed"
        parts = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
        return f"{self.count} files failed ({parts})"
