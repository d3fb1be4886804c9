"""Image files -> one Parquet row of predictions per file, on Ray Data, resumable: bulk scoring.

    skinray score --model BUNDLE_OR_RUN --input PATH_OR_URI --output DIR_OR_URI

The plan: a listing of the input (written once as Parquet parts, `OUTPUT/_listing/`) -> read ->
decode-and-warp tasks (`skinray.data.pipeline.load_views`: each file decoded once, one view per
member input size) -> an autoscaling pool of actors each holding the `Predictor` -> streaming
Parquet writes to `OUTPUT/predictions/`. Memory stays bounded by Ray Data's backpressure whatever
the archive's size.

Resuming is Ray Data's own checkpointing (`ray.data.checkpoint.CheckpointConfig`, with `path` as
the id column, kept in `OUTPUT/_checkpoint/`): a write records the ids it wrote with a two-phase
commit, and a rerun reads them and filters those rows out right after the listing is read. A
killed job therefore loses at most the parts in flight, and never writes a row twice.
Checkpointing needs the plan to start with a read operator: hence the listing on disk.

Evaluation and the ensemble's fitting predict through the same decode tasks and actors
(`predict_rows`), so evaluating on a cluster uses the cluster.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from skinray import UserError
from skinray.config import Config, ScoreConfig
from skinray.data.catalog import join_uri, resolve
from skinray.data.pipeline import ImageSource, load_views, view_column

PREDICTIONS, LISTING, CHECKPOINT = "predictions", "_listing", "_checkpoint"


# === The model actor ===


class ScoreActor:
    """Holds the Predictor (loaded once per actor) and turns decoded views into output rows."""

    def __init__(self, model: list[str], top_k: int, with_logits: bool = False):
        import ray

        from skinray.console import load_tensorflow, quiet_process
        from skinray.predictor import Predictor

        quiet_process()  # before TensorFlow loads in this actor
        load_tensorflow(expect_gpu=bool(ray.get_gpu_ids()))
        self.predictor = Predictor.from_paths(model)
        self.top_k, self.with_logits = top_k, with_logits

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.asarray(batch["ok"], bool)
        views = {size: batch[view_column(size)][ok] for size in self.predictor.sizes}
        prediction = self.predictor.predict(views)
        return prediction_table(self.predictor, prediction, batch, ok, self.top_k, self.with_logits)


def prediction_table(predictor, prediction, batch: dict, ok: np.ndarray, top_k: int,
                     with_logits: bool = False) -> pa.Table:
    """The output rows of one batch: a row per input, with nulls and the error where it failed."""
    n, classes = len(ok), predictor.classes
    where = np.flatnonzero(ok)  # row i of the prediction belongs to input row where[i]
    scored = np.full(n, -1)
    scored[where] = np.arange(len(where))
    order, top_probs = prediction.top_k(top_k)

    def per_row(make):
        return [make(scored[i]) if scored[i] >= 0 else None for i in range(n)]

    columns = {
        "path": pa.array([str(p) for p in batch["path"]], pa.string()),
        "label": pa.array(per_row(lambda j: classes[prediction.labels[j]]), pa.string()),
        "confidence": pa.array(per_row(lambda j: float(prediction.confidence[j])), pa.float32()),
        "top_k": pa.array(per_row(lambda j: [{"label": classes[c], "probability": float(p)}
                                             for c, p in zip(order[j], top_probs[j])]),
                          pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float32())]))),
        "abstained": pa.array(per_row(lambda j: bool(prediction.abstained[j])), pa.bool_()),
        "probabilities": pa.array(per_row(lambda j: prediction.probabilities[j].tolist()), pa.list_(pa.float32())),
        "member_probabilities": pa.array(
            per_row(lambda j: {m.name: prediction.member_probabilities[k, j].tolist()
                               for k, m in enumerate(predictor.members)}),
            pa.struct([(m.name, pa.list_(pa.float32())) for m in predictor.members])),
        "model_version": pa.array([predictor.version] * n, pa.string()),
        "error": pa.array([None if good else str(e) for good, e in zip(ok, batch["error"])], pa.string()),
    }
    if "label_index" in batch:
        columns["label_index"] = pa.array(np.asarray(batch["label_index"], np.int32))
    if with_logits:
        columns["member_logits"] = pa.array(per_row(lambda j: prediction.member_logits[:, j].tolist()),
                                            pa.list_(pa.list_(pa.float32())))
    return pa.table(columns)


# === Plans ===


def predict_rows(ds, model: list[str], sizes: tuple[int, ...], source: ImageSource, cfg: ScoreConfig,
                 task_options: dict | None = None, with_logits: bool = False):
    """A Dataset of rows with a `path` -> a Dataset of prediction rows (see `prediction_table`)."""
    import ray.data

    views = ds.map_batches(
        load_views, batch_size=cfg.batch_size, **(task_options or {"num_cpus": 1.0}),
        fn_kwargs={"source": source, "sizes": tuple(sizes)},
        # Reserving the memory a task's batch takes also keeps decoding a task pool of its own: with
        # the same resources as the model actors, Ray Data would fuse it into them and decode in at
        # most `max_actors` processes, however many CPUs the cluster has.
        memory=decode_task_memory(cfg.batch_size, sizes))
    return views.map_batches(
        ScoreActor, batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        **cfg.actor_options,
        fn_constructor_kwargs={"model": list(model), "top_k": cfg.top_k, "with_logits": with_logits})


WORKER_BYTES = 256 * 2**20  # a decode worker's own memory (Python, NumPy, OpenCV, PyArrow): ~165 MiB measured


def decode_task_memory(batch_size: int, sizes: tuple[int, ...]) -> int:
    """Bytes a decode task holds: its batch of views (twice: built, then serialised), one decoded
    photo of up to 64 MP, and the worker process itself (Ray Data warns when a task's measured
    memory, with 25% headroom, exceeds what it reserved)."""
    return 2 * batch_size * sum(3 * s * s for s in sizes) + 3 * 64_000_000 + WORKER_BYTES


def predict_table(table: pa.Table, model: list[str], sizes: tuple[int, ...], source: ImageSource,
                  cfg: ScoreConfig, with_logits: bool = True) -> pa.Table:
    """Predictions for a small table of rows (an archive split), collected on the driver, in input order.

    The path for evaluation and ensemble fitting: the same tasks and actors as `score`, without
    the files and the checkpoint.
    """
    from skinray.data.pipeline import dataset

    rows_per_block = max(cfg.batch_size, math.ceil(table.num_rows / 16))
    ds = predict_rows(dataset(table.select(["path", "label_index"]), rows_per_block), model, sizes,
                      source, cfg, with_logits=with_logits)
    ds.context.execution_options.preserve_order = True
    return pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))


def labelled_logits(table: pa.Table, model: list[str], sizes: tuple[int, ...], source: ImageSource,
                    cfg: ScoreConfig, what: str) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """A split's member logits (members, n, classes) and labels (n,) of the images that could be
    read, and the rows of those that could not; `what` names the split in the error when none could."""
    rows = predict_table(table, model, sizes, source, cfg, with_logits=True)
    good, failed = rows.filter(rows["error"].is_null()), rows.filter(rows["error"].is_valid())
    if good.num_rows == 0:
        raise UserError(f"no image of {what} could be read ({failed.num_rows} failed)")
    logits = np.array(good["member_logits"].to_pylist(), np.float32).transpose(1, 0, 2)
    return logits, good["label_index"].to_numpy(), failed


# === Listing the input ===


def list_inputs(uri: str) -> tuple[ImageSource, list[str]]:
    """A folder tree (every non-hidden file, recursively) or a Parquet/CSV manifest with a `path` column.

    Returns the source to read with and the files as full paths or URIs. Non-image files are
    listed too: they get a row with their error, never a silent drop.
    """
    fs, root, prefix = resolve(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"input '{uri}' does not exist")
    if info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        paths = sorted(prefix + e.path for e in entries if e.type == pafs.FileType.File and not any(
            part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(e.path[len(root):]).parts))
        if not paths:
            raise UserError(f"input folder '{uri}' holds no files")
        return ImageSource(fs, prefix), paths
    return ImageSource(fs, prefix), _manifest_paths(fs, root, prefix, uri)


def _manifest_paths(fs, root: str, prefix: str, uri: str) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = PurePosixPath(root).suffix.lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(root, filesystem=fs, columns=["path"])
        elif suffix == ".csv":
            with fs.open_input_stream(root) as f:
                table = pacsv.read_csv(f)
        else:
            raise UserError(f"input '{uri}' is neither a folder nor a .parquet or .csv manifest")
    except (pa.ArrowInvalid, KeyError) as exc:
        raise UserError(f"manifest '{uri}' cannot be read: {exc}") from None
    if "path" not in table.column_names:
        raise UserError(f"manifest '{uri}' has no 'path' column (columns: {', '.join(table.column_names)})")
    folder = str(PurePosixPath(root).parent)
    paths = []
    for path in table["path"].to_pylist():
        if not path:
            raise UserError(f"manifest '{uri}' has an empty path")
        if "://" in path:  # a URI on the manifest's own store
            path = prefix + path.split("://", 1)[1] if prefix else path.split("://", 1)[1]
        elif not path.startswith("/"):
            path = prefix + f"{folder}/{path}"
        else:
            path = prefix + path
        paths.append(path)
    if len(set(paths)) != len(paths):
        dupes = [p for p, c in Counter(paths).items() if c > 1][:3]
        raise UserError(f"manifest '{uri}' lists files more than once (e.g. {', '.join(dupes)})")
    return paths


def _write_listing(paths: list[str], output: str, rows_per_file: int) -> tuple[str, int]:
    """The listing as Parquet parts under OUTPUT/_listing/: the read operator the checkpoint needs,
    and the unit of work a killed job keeps (one part becomes one output file)."""
    import pyarrow.parquet as pq

    fs, root, _ = resolve(output)
    listing = f"{root}/{LISTING}"
    if fs.get_file_info(listing).type != pafs.FileType.NotFound:
        fs.delete_dir(listing)
    fs.create_dir(listing, recursive=True)
    for part, start in enumerate(range(0, len(paths), rows_per_file)):
        pq.write_table(pa.table({"path": paths[start:start + rows_per_file]}),
                       f"{listing}/part-{part:06d}.parquet", filesystem=fs)
    return join_uri(output, LISTING), part + 1


# === The score command ===


def score(cfg: Config, model: str, input_uri: str, output: str) -> dict:
    """Scores every file under `input_uri` with `model`; writes Parquet rows and summary.json."""
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    from skinray.cluster import connect
    from skinray.predictor import Predictor, absolute

    model = absolute(model)  # the actors open it from their own working directories
    predictor = Predictor.from_path(model, load_models=False)  # a bad model fails here, before any work
    source, paths = list_inputs(input_uri)
    source = ImageSource(source.filesystem, source.prefix, cfg.data.max_pixels)
    score_cfg = cfg.score
    # The actors, the checkpoint filter's actor and at least one decode task must fit together.
    connect(reserved_cpus=score_cfg.max_actors * score_cfg.cpus_per_actor + 1)
    fs, root, _ = resolve(output)
    fs.create_dir(root, recursive=True)
    listing, parts = _write_listing(paths, output, score_cfg.rows_per_file)
    context = ray.data.DataContext.get_current()
    previous = context.checkpoint_config, context.use_datasource_v2
    context.checkpoint_config = CheckpointConfig(
        id_column="path", checkpoint_path=_checkpoint_uri(output), delete_checkpoint_on_success=False,
        override_filesystem=fs)
    # One read task, and so one output file, per listing part. The V2 Parquet reader (Ray 2.60's
    # default) packs small files into one task: a killed job would then keep nothing.
    context.use_datasource_v2 = False
    started = time.perf_counter()
    try:
        rows = ray.data.read_parquet(_path_of(listing), filesystem=fs, override_num_blocks=parts)
        predict_rows(rows, [model], predictor.sizes, source, score_cfg,
                     task_options=cfg.data.task_options).write_parquet(_path_of(join_uri(output, PREDICTIONS)),
                                                                         filesystem=fs)
    finally:
        context.checkpoint_config, context.use_datasource_v2 = previous
    summary = summarise(output, len(paths), predictor, time.perf_counter() - started)
    with fs.open_output_stream(f"{root}/summary.json") as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary


def _path_of(uri: str) -> str:
    return resolve(uri)[1]


def _checkpoint_uri(output: str) -> str:
    fs, root, prefix = resolve(output)
    # CheckpointConfig parses the path itself; the filesystem (with its options) is passed beside it.
    return f"{prefix}{root}/{CHECKPOINT}" if prefix else f"{root}/{CHECKPOINT}"


def read_predictions(output: str) -> pa.Table:
    """Every row written under OUTPUT/predictions/."""
    import pyarrow.dataset as pads

    fs, root, _ = resolve(output)
    return pads.dataset(f"{root}/{PREDICTIONS}", filesystem=fs, format="parquet").to_table()


def summarise(output: str, listed: int, predictor, seconds: float) -> dict:
    """Counts over everything written (this run and any before it): scored, failed, abstained, per class."""
    table = read_predictions(output).select(["path", "label", "abstained", "error"])
    errors = [e for e in table["error"].to_pylist() if e is not None]
    labels = [label for label in table["label"].to_pylist() if label is not None]
    return {
        "model": predictor.source, "model_version": predictor.version, "listed": listed,
        "rows": table.num_rows, "unique_paths": len(set(table["path"].to_pylist())),
        "scored": len(labels), "failed": len(errors),
        "abstained": int(sum(1 for a in table["abstained"].to_pylist() if a)),
        "per_class": dict(sorted(Counter(labels).items())),
        "failure_reasons": dict(Counter(e.split(":")[0] for e in errors).most_common()),
        "seconds": round(seconds, 2), "predictions": join_uri(output, PREDICTIONS),
    }


def format_summary(summary: dict) -> str:
    lines = [f"{summary['rows']} rows for {summary['listed']} files: {summary['scored']} scored, "
             f"{summary['failed']} failed, {summary['abstained']} abstained ({summary['seconds']:.1f} s)"]
    for label, count in summary["per_class"].items():
        lines.append(f"  {count:6d}  {label}")
    for reason, count in summary["failure_reasons"].items():
        lines.append(f"  failed: {count} {reason}")
    lines.append(f"predictions: {summary['predictions']}")
    return "\n".join(lines)


def score_from_args(args) -> int:
    from skinray.config import load_config

    overrides = list(args.set) + ([f"score.top_k={args.top_k}"] if args.top_k else [])
    cfg = load_config(args.config, overrides)
    summary = score(cfg, args.model, args.input, args.output)
    print(format_summary(summary))
    return 0
