"""The batch-inference engine on Ray Data: rows with a `path` -> decode tasks -> model actors -> rows.

    predict_rows(ds, ...)      a Dataset of rows -> a Dataset of prediction rows (streaming)
    predict_table(table, ...)  a small table -> its prediction rows on the driver, in input order
    labelled_logits(...)       a labelled split -> `Labelled` predictions (ensemble, evaluation)

Every batch consumer runs through it: `skinray score` (which adds the listing, checkpointed writes
and the summary), `skinray evaluate`, the ensemble's fitting, and tune's embeddings (its task
memory). Each file is decoded once, in a task of its own (`skinray.data.ingest.load_views`: one
view per member input size), and an autoscaling pool of actors each holding the `Predictor` turns
the views into rows: a row per input, with nulls and the error where the file could not be used.
Evaluating on a cluster therefore uses the cluster, exactly as scoring does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from skinray import UserError
from skinray.config import ScoreConfig
from skinray.data.ingest import ImageSource, load_views, view_column

# Every column a prediction row may have, and those the batches carry on the way: an input
# manifest's own columns, passed through to the rows, may not take these names.
OUTPUT_COLUMNS = (
    "path", "label", "confidence", "top_k", "differential", "abstained", "reason", "out_of_distribution",
    "ood_score", "probabilities", "member_probabilities", "model_version", "error", "label_index",
    "member_logits", "draw", "member_features", "ok", "epoch",
)  # fmt: skip

# === The model actor ===


class ModelActor:
    """Holds the Predictor (loaded once per actor) and turns decoded views into output rows."""

    def __init__(
        self,
        model: list[str],
        top_k: int,
        with_logits: bool = False,
        version: str = "",
        with_features: bool = False,
        passthrough: pa.Schema | None = None,
        precision: str = "float32",
    ):
        import ray

        from skinray.console import load_tensorflow, quiet_process
        from skinray.predictor import Predictor

        quiet_process()  # before TensorFlow loads in this actor
        load_tensorflow(expect_gpu=bool(ray.get_gpu_ids()))
        self.predictor = Predictor.from_paths(model, expect_version=version)
        self.predictor.to_precision(precision)
        self.top_k, self.with_logits, self.with_features = top_k, with_logits, with_features
        self.passthrough = passthrough

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.asarray(batch["ok"], bool)
        views = {size: batch[view_column(size)][ok] for size in self.predictor.sizes}
        prediction = self.predictor.predict(views, keep_features=self.with_features)
        table = prediction_table(self.predictor, prediction, batch, ok, self.top_k, self.with_logits)
        for field in self.passthrough or ():  # the input manifest's own columns, as they were typed
            table = table.append_column(
                field, pa.array(list(batch[field.name]), field.type, from_pandas=True)
            )
        return table


def prediction_table(
    predictor, prediction, batch: dict, ok: np.ndarray, top_k: int, with_logits: bool = False
) -> pa.Table:
    """The output rows of one batch: a row per input, with nulls and the error where it failed."""
    n, classes = len(ok), predictor.classes
    where = np.flatnonzero(ok)  # row i of the prediction belongs to input row where[i]
    scored = np.full(n, -1)
    scored[where] = np.arange(len(where))
    order, top_probs = prediction.top_k(top_k)
    differentials, reasons, ood = (
        prediction.differentials(classes),
        prediction.reasons,
        prediction.out_of_distribution,
    )

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
        "reason": pa.array(per_row(lambda j: reasons[j]), pa.string()),
        "out_of_distribution": pa.array(per_row(lambda j: bool(ood[j])), pa.bool_()),
        "ood_score": pa.array(
            per_row(lambda j: None if prediction.ood_scores is None else float(prediction.ood_scores[j])),
            pa.float32(),
        ),
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
    if prediction.member_features is not None:
        columns["member_features"] = pa.array(
            per_row(lambda j: [f[j].tolist() for f in prediction.member_features]),
            pa.list_(pa.list_(pa.float32())),
        )
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
    with_features: bool = False,
    passthrough: pa.Schema | None = None,
):
    """A Dataset of rows with a `path` -> a Dataset of prediction rows (see `prediction_table`).
    `version`: the bundle version the driver planned for; an actor refuses any other.
    `with_logits`: each member's logits and the image's draw; `with_features`: its pooled features;
    `passthrough`: input columns copied to each row, with these types."""
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
            "with_features": with_features,
            "passthrough": passthrough,
            "precision": cfg.precision,
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
    with_features: bool = False,
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
        with_features=with_features,
    )
    ds.context.execution_options.preserve_order = True
    return pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))


@dataclass
class Labelled:
    """A labelled split's predictions, for fitting (`skinray ensemble`) and reporting (`evaluate`)."""

    logits: np.ndarray  # (members, n, classes), raw, of the n images that could be read
    labels: np.ndarray  # (n,)
    paths: list[str]  # (n,)
    draws: np.ndarray  # (n,) each image's draw for its differential
    ood_scores: np.ndarray | None  # (n,) the ensemble's out-of-distribution scores (a bundle's)
    features: list[np.ndarray] | None  # each member's (n, d) pooled features, when asked for
    failed: pa.Table  # the rows of the images that could not be read, with their error

    def subset(self, paths: set[str]) -> Labelled:
        """The predictions of the images in `paths` (in this order)."""
        keep = np.array([p in paths for p in self.paths], bool)
        return Labelled(
            self.logits[:, keep],
            self.labels[keep],
            [p for p, k in zip(self.paths, keep) if k],
            self.draws[keep],
            None if self.ood_scores is None else self.ood_scores[keep],
            None if self.features is None else [f[keep] for f in self.features],
            self.failed.filter(pa.array([p in paths for p in self.failed["path"].to_pylist()], pa.bool_())),
        )


def labelled_logits(
    table: pa.Table,
    model: list[str],
    sizes: tuple[int, ...],
    source: ImageSource,
    cfg: ScoreConfig,
    what: str,
    version: str = "",
    with_features: bool = False,
) -> Labelled:
    """A split's predictions (`Labelled`); `what` names the split in the error when no image could
    be read."""
    rows = predict_table(
        table, model, sizes, source, cfg, with_logits=True, version=version, with_features=with_features
    )
    good, failed = rows.filter(rows["error"].is_null()), rows.filter(rows["error"].is_valid())
    if good.num_rows == 0:
        raise UserError(f"no image of {what} could be read ({failed.num_rows} failed)")
    logits = np.array(good["member_logits"].to_pylist(), np.float32).transpose(1, 0, 2)
    features = None
    if with_features:
        per_row = good["member_features"].to_pylist()
        features = [np.array([row[m] for row in per_row], np.float32) for m in range(len(per_row[0]))]
    scores = good["ood_score"]
    return Labelled(
        logits,
        good["label_index"].to_numpy(),
        good["path"].to_pylist(),
        good["draw"].to_numpy(),
        None if scores.null_count else scores.to_numpy().astype(np.float64),
        features,
        failed,
    )
