"""Training and validation images -> the frozen backbone's pooled features, once per search.

A Ray Data job: catalog rows (every training image `tune.views` times, each view its own
augmentation draw, as training draws one per epoch; the validation images once, resized) -> the
decode-and-augment tasks of training (`load_batch`) -> an actor pool holding the frozen lower part
of the classifier (`models.create_features`: the backbone's own preprocessing, the backbone, global average
pooling) -> Parquet under `OUT/RUN/embeddings/KEY/{train,val}/`. KEY hashes what the features
depend on (the archive's files and labels, the backbone, input size, weights, views, augmentation,
and the split's seed and fraction): a rerun of the same search reuses them, a changed one does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skinray.config import Config, ModelConfig
from skinray.data.ingest import ImageSource, dataset, load_batch
from skinray.storage import clear_dir, join_uri, kind, resolve, write_json

DONE = "_SUCCESS.json"


@dataclass
class Embeddings:
    """Features (float32, one row per image or view), labels, the view of each training row."""

    train_x: np.ndarray
    train_y: np.ndarray
    train_view: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    failed: int


FORMAT = 2  # 2: every actor draws the same random backbone (weights none); 1 did not


def embeddings_key(cfg: Config, size: int, train_rows: pa.Table, val_rows: pa.Table) -> str:
    what = {
        "train": _files(train_rows),
        "val": _files(val_rows),
        "backbone": cfg.model.backbone,
        "size": size,
        "weights": cfg.model.weights,
        "views": cfg.tune.views,
        "augment": dataclasses.asdict(cfg.augment),
        "seed": cfg.data.seed,
        "val_fraction": cfg.data.val_fraction,
        "format": FORMAT,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _files(rows: pa.Table) -> list:
    return sorted(zip(rows["path"].to_pylist(), rows["label_index"].to_pylist()))


def embed(
    cfg: Config,
    size: int,
    train_rows: pa.Table,
    val_rows: pa.Table,
    source: ImageSource,
    folder: str,
    elsewhere: list[str] = (),
) -> tuple[str, bool]:
    """Writes the embeddings under `folder`/KEY unless they are there or in one of the `elsewhere`
    folders (other searches'); returns (location, reused)."""
    key = embeddings_key(cfg, size, train_rows, val_rows)
    for candidate in (folder, *elsewhere):
        if kind(join_uri(join_uri(candidate, key), DONE)) is not None:
            return join_uri(candidate, key), True
    target = join_uri(folder, key)
    fs, path, _ = resolve(target)
    views = pa.concat_tables(
        [
            train_rows.select(["path", "label_index"]).append_column(
                "epoch", pa.array(np.full(train_rows.num_rows, v), pa.int32())
            )
            for v in range(cfg.tune.views)
        ]
    )
    val = val_rows.select(["path", "label_index"]).append_column(
        "epoch", pa.array(np.zeros(val_rows.num_rows), pa.int32())
    )
    for split, rows, augment in (("train", views, cfg.augment), ("val", val, None)):
        clear_dir(join_uri(target, split))  # a killed job's partial files
        _features(cfg, size, rows, source, augment).write_parquet(f"{path}/{split}", filesystem=fs)
    write_json(
        join_uri(target, DONE),
        {"train_images": train_rows.num_rows, "views": cfg.tune.views, "val_images": val_rows.num_rows},
    )
    return target, False


def _features(cfg: Config, size: int, rows: pa.Table, source: ImageSource, augment):
    import ray.data

    from skinray.inference import decode_task_memory

    batch, score = cfg.tune.embed_batch_size, cfg.score
    decoded = dataset(rows, rows_per_block=4 * batch).map_batches(
        load_batch,
        batch_size=None,
        **cfg.data.task_options,
        fn_kwargs=dict(source=source, size=size, augment=augment, seed=cfg.data.seed),
        memory=decode_task_memory(4 * batch, (size,)),
    )  # keeps decoding out of the actors (see score.py)
    return decoded.map_batches(
        EmbedActor,
        batch_size=batch,
        compute=ray.data.ActorPoolStrategy(min_size=score.min_actors, max_size=score.max_actors),
        **score.actor_options,
        fn_constructor_kwargs={
            "model": dataclasses.replace(cfg.model, image_size=size),
            "seed": cfg.data.seed,
        },
    )


class EmbedActor:
    """Holds the frozen backbone; decoded images -> rows of pooled features."""

    def __init__(self, model: ModelConfig, seed: int):
        import ray

        from skinray.console import load_tensorflow, quiet_process

        quiet_process()
        load_tensorflow(expect_gpu=bool(ray.get_gpu_ids()))
        import keras

        from skinray.models import create_features

        # Every actor must hold the same network: with weights none its layers start random, and
        # features from differently drawn networks would mean nothing together.
        keras.utils.set_random_seed(seed)
        self.model = create_features(model)
        self.size = int(self.model.output.shape[-1])

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.asarray(batch["ok"], bool)
        features = np.zeros((len(ok), self.size), np.float32)
        if ok.any():
            features[ok] = np.asarray(self.model.predict_on_batch(batch["image"][ok]), np.float32)
        return pa.table(
            {
                "features": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), self.size),
                "label_index": pa.array(batch["label_index"], pa.int32()),
                "view": pa.array(batch["epoch"], pa.int32()),
                "ok": pa.array(ok),
                "path": pa.array(list(batch["path"]), pa.string()),
            }
        )


def load_embeddings(location: str) -> Embeddings:
    """The features written by `embed`, images that failed to decode left out (and counted)."""
    import pyarrow.parquet as pq

    fs, path, _ = resolve(location)
    parts, failed = {}, 0
    for split in ("train", "val"):
        table = pq.read_table(f"{path}/{split}", filesystem=fs)
        failed += table.num_rows - pc.sum(table["ok"]).as_py() if table.num_rows else 0
        table = table.filter(table["ok"])
        width = table.schema.field("features").type.list_size
        x = (
            table["features"].combine_chunks().flatten().to_numpy().reshape(-1, width)
            if table.num_rows
            else np.zeros((0, width), np.float32)
        )
        parts[split] = (x, table["label_index"].to_numpy(), table["view"].to_numpy())
    return Embeddings(*parts["train"], *parts["val"][:2], failed=int(failed))
