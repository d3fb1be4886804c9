"""The batch-inference engine on Ray Data: rows with a `path` -> decode tasks -> model actors -> rows.

    predict_rows(ds, ...)      a Dataset of rows -> a Dataset of prediction rows (streaming)
    predict_table(table, ...)  a small table -> its prediction rows on the driver, in input order
    labelled_logits(...)       a labelled split -> member logits, labels, draws (ensemble, evaluation)

Every batch consumer runs through it: `skinray score` (which adds the listing, checkpointed writes
and the summary), `skinray evaluate`, the ensemble's fitting, and tune's embeddings (its task
memory). Each file is decoded once, in a task of its own (`skinray.data.ingest.load_views`: one
view per member input size), and an autoscaling pool of actors each holding the `Predictor` turns
the views into rows: a row per input, with nulls and the error where the file could not be used.
Evaluating on a cluster therefore uses the cluster, exactly as scoring does.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from skinray import UserError
from skinray.config import ScoreConfig
from skinray.data.ingest import ImageSource, load_views, view_column

# === The model actor ===


class ModelActor:
    """Holds the Predictor (loaded once per actor) and turns decoded views into output rows."""

    def __init__(self, model: list[str], top_k: int, with_logits: bool = False, version: str = ""):
        import ray

        from skinray.console import load_tensorflow, quiet_process
        from skinray.predictor import Predictor

        quiet_process()  # before TensorFlow loads in this actor
        load_tensorflow(expect_gpu=bool(ray.get_gpu_ids()))
        self.predictor = Predictor.from_paths(model, expect_version=version)
        self.top_k, self.with_logits = top_k, with_logits

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.asarray(batch["ok"], bool)
        views = {size: batch[view_column(size)][ok] for size in self.predictor.sizes}
        prediction = self.predictor.predict(views)
        return prediction_table(self.predictor, prediction, batch, ok, self.top_k, self.with_logits)


def prediction_table(
    predictor, prediction, batch: dict, ok: np.ndarray, top_k: int, with_logits: bool = False
) -> pa.Table:
    """The output rows of one batch: a row per input, with nulls and the error where it failed."""
    n, classes = len(ok), predictor.classes
    where = np.flatnonzero(ok)  # row i of the prediction belongs to input row where[i]
    scored = np.full(n, -1)
    scored[where] = np.arange(len(where))
    order, top_probs = prediction.top_k(top_k)
    differentials = prediction.differentials(classes)

    def per_row(make):
        return [make(scored[i]) if scored[i] >= 0 else None for i in range(n)]

    columns = {
        "path": pa.array([str(p) for p in batch["path"]], pa.string()),
        "label": pa.array(per_row(lambda j: classes[prediction.labels[j]]), pa.string()),
        "confidence": pa.array(per_row(lambda j: float(prediction.confidence[j])), pa.float32()),
        "top_k": pa.array(
            per_row(
                lambda j: [
                    {"label": classes[c], "probability": float(p)} for c, p in zip(order[j], top_probs[j])
                ]
            ),
            pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float32())])),
        ),
        "differential": pa.array(per_row(lambda j: differentials[j]), pa.list_(pa.string())),
        "abstained": pa.array(per_row(lambda j: bool(prediction.abstained[j])), pa.bool_()),
        "probabilities": pa.array(
            per_row(lambda j: prediction.probabilities[j].tolist()), pa.list_(pa.float32())
        ),
        "member_probabilities": pa.array(
            per_row(
                lambda j: {
                    m.name: prediction.member_probabilities[k, j].tolist()
                    for k, m in enumerate(predictor.members)
                }
            ),
            pa.struct([(m.name, pa.list_(pa.float32())) for m in predictor.members]),
        ),
        "model_version": pa.array([predictor.version] * n, pa.string()),
        "error": pa.array([None if good else str(e) for good, e in zip(ok, batch["error"])], pa.string()),
    }
    if "label_index" in batch:
        columns["label_index"] = pa.array(np.asarray(batch["label_index"], np.int32))
    if with_logits:
        columns["member_logits"] = pa.array(
            per_row(lambda j: prediction.member_logits[:, j].tolist()), pa.list_(pa.list_(pa.float32()))
        )
        columns["draw"] = pa.array(per_row(lambda j: float(prediction.draws[j])), pa.float64())
    return pa.table(columns)


# === Plans ===


def predict_rows(
    ds,
    model: list[str],
    sizes: tuple[int, ...],
    source: ImageSource,
    cfg: ScoreConfig,
    task_options: dict | None = None,
    with_logits: bool = False,
    version: str = "",
):
    """A Dataset of rows with a `path` -> a Dataset of prediction rows (see `prediction_table`).
    `version`: the bundle version the driver planned for; an actor refuses any other."""
    import ray.data

    views = ds.map_batches(
        load_views,
        batch_size=cfg.batch_size,
        **(task_options or {"num_cpus": 1.0}),
        fn_kwargs={"source": source, "sizes": tuple(sizes)},
        # Reserving the memory a task's batch takes also keeps decoding a task pool of its own: with
        # the same resources as the model actors, Ray Data would fuse it into them and decode in at
        # most `max_actors` processes, however many CPUs the cluster has.
        memory=decode_task_memory(cfg.batch_size, sizes),
    )
    return views.map_batches(
        ModelActor,
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        **cfg.actor_options,
        fn_constructor_kwargs={
            "model": list(model),
            "top_k": cfg.top_k,
            "with_logits": with_logits,
            "version": version,
        },
    )


WORKER_BYTES = 256 * 2**20  # a decode worker's own memory (Python, NumPy, OpenCV, PyArrow): ~165 MiB measured


def decode_task_memory(batch_size: int, sizes: tuple[int, ...]) -> int:
    """Bytes a decode task holds: its batch of views (twice: built, then serialised), one decoded
    photo of up to 64 MP, and the worker process itself (Ray Data warns when a task's measured
    memory, with 25% headroom, exceeds what it reserved)."""
    return 2 * batch_size * sum(3 * s * s for s in sizes) + 3 * 64_000_000 + WORKER_BYTES


def predict_table(
    table: pa.Table,
    model: list[str],
    sizes: tuple[int, ...],
    source: ImageSource,
    cfg: ScoreConfig,
    with_logits: bool = True,
    version: str = "",
) -> pa.Table:
    """Predictions for a small table of rows (an archive split), collected on the driver, in input order.

    The path for evaluation and ensemble fitting: the same tasks and actors as `score`, without
    the files and the checkpoint.
    """
    from skinray.data.ingest import dataset

    rows_per_block = max(cfg.batch_size, math.ceil(table.num_rows / 16))
    ds = predict_rows(
        dataset(table.select(["path", "label_index"]), rows_per_block),
        model,
        sizes,
        source,
        cfg,
        with_logits=with_logits,
        version=version,
    )
    ds.context.execution_options.preserve_order = True
    return pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def labelled_logits(
    table: pa.Table,
    model: list[str],
    sizes: tuple[int, ...],
    source: ImageSource,
    cfg: ScoreConfig,
    what: str,
    version: str = "",
) -> tuple[np.ndarray, np.ndarray, pa.Table, np.ndarray]:
    """A split's member logits (members, n, classes), labels (n,) and differential draws (n,) of the
    images that could be read, and the rows of those that could not; `what` names the split in the
    error when none could."""
    rows = predict_table(table, model, sizes, source, cfg, with_logits=True, version=version)
    good, failed = rows.filter(rows["error"].is_null()), rows.filter(rows["error"].is_valid())
    if good.num_rows == 0:
        raise UserError(f"no image of {what} could be read ({failed.num_rows} failed)")
    logits = np.array(good["member_logits"].to_pylist(), np.float32).transpose(1, 0, 2)
    return logits, good["label_index"].to_numpy(), failed, good["draw"].to_numpy()
