"""Image files -> one Parquet row of predictions per file, on Ray Data, resumable: bulk scoring.

    skinray score --model BUNDLE_OR_RUN --input PATH_OR_URI --output DIR_OR_URI

The plan: a listing of the input (written once as Parquet parts, `OUTPUT/_listing/`) -> read ->
decode-and-warp tasks (`skinray.data.ingest.load_views`: each file decoded once, one view per
member input size) -> an autoscaling pool of actors each holding the `Predictor` -> streaming
Parquet writes to `OUTPUT/predictions/`. Memory stays bounded by Ray Data's backpressure whatever
the archive's size.

Resuming is Ray Data's own checkpointing (`ray.data.checkpoint.CheckpointConfig`, with `path` as
the id column, kept in `OUTPUT/_checkpoint/`): a write records the ids it wrote with a two-phase
commit, and a rerun reads them and filters those rows out right after the listing is read. A
killed job therefore loses at most the parts in flight, and never writes a row twice.
Checkpointing needs the plan to start with a read operator: hence the listing on disk.

The decode tasks and model actors are the inference engine's (`skinray.inference.predict_rows`),
which evaluation and the ensemble's fitting use too.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc

from skinray import UserError
from skinray.config import Config
from skinray.data.catalog import is_hidden
from skinray.data.ingest import ImageSource
from skinray.inference import predict_rows
from skinray.storage import (
    absolute,
    clear_dir,
    join_uri,
    kind,
    list_files,
    lock,
    make_dir,
    read_marker,
    redact,
    resolve,
    without_credentials,
    write_json,
)

PREDICTIONS, LISTING, CHECKPOINT, RUN, LOCK = "predictions", "_listing", "_checkpoint", "run.json", ".lock"


# === Listing the input ===


def list_inputs(uri: str) -> tuple[ImageSource, pa.Table]:
    """A folder tree (every non-hidden file, recursively) or a Parquet/CSV manifest with a `path` column.

    Returns the source to read with and the inputs: a `path` column of full paths or URIs and, for
    a manifest, its other columns, which scoring passes through to each output row (so that rows
    join back to the user's own records). Non-image files are listed too: they get a row with
    their error, never a silent drop.
    """
    found = kind(uri)
    if found is None:
        raise UserError(f"input '{uri}' does not exist")
    if found == "dir":
        fs, root, prefix, files = list_files(uri)
        paths = sorted(f"{prefix}{root}/{f}" for f in files if not is_hidden(f))
        if not paths:
            raise UserError(f"input folder '{uri}' holds no files")
        return ImageSource(fs, prefix), pa.table({"path": pa.array(paths, pa.string())})
    fs, root, prefix = resolve(uri)
    table = _read_manifest(fs, root, uri)
    paths = _manifest_paths(table, root, prefix, uri)
    return ImageSource(fs, prefix), table.set_column(0, "path", pa.array(paths, pa.string()))


def _read_manifest(fs, root: str, uri: str) -> pa.Table:
    """The manifest, `path` first; refused when another column would clash with an output column."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from skinray.inference import OUTPUT_COLUMNS

    suffix = PurePosixPath(root).suffix.lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(root, filesystem=fs)
        elif suffix == ".csv":
            with fs.open_input_stream(root) as f:
                table = pacsv.read_csv(f)
        else:
            raise UserError(f"input '{uri}' is neither a folder nor a .parquet or .csv manifest")
    except (pa.ArrowInvalid, KeyError) as exc:
        raise UserError(f"manifest '{uri}' cannot be read: {exc}") from None
    if "path" not in table.column_names:
        raise UserError(f"manifest '{uri}' has no 'path' column (columns: {', '.join(table.column_names)})")
    clashes = sorted(
        c for c in table.column_names if c != "path" and (c in OUTPUT_COLUMNS or c.startswith("image_"))
    )
    if clashes:
        raise UserError(
            f"manifest '{uri}' has columns named as skinray's output columns ({', '.join(clashes)}): "
            "rename them (every other column is passed through to the output rows)"
        )
    return table.select(["path", *(c for c in table.column_names if c != "path")])


def _manifest_paths(table: pa.Table, root: str, prefix: str, uri: str) -> list[str]:
    folder = str(PurePosixPath(root).parent)
    paths = []
    for path in table["path"].to_pylist():
        if not path:
            raise UserError(f"manifest '{uri}' has an empty path")
        if "://" in path:  # a URI on the manifest's own store (whose filesystem holds its credentials)
            path = prefix + without_credentials(path.split("://", 1)[1])
        elif not path.startswith("/"):
            path = prefix + f"{folder}/{path}"
        else:
            path = prefix + path
        paths.append(path)
    if len(set(paths)) != len(paths):
        dupes = [p for p, c in Counter(paths).items() if c > 1][:3]
        raise UserError(f"manifest '{uri}' lists files more than once (e.g. {', '.join(dupes)})")
    return paths


def _write_listing(inputs: pa.Table, output: str, rows_per_file: int) -> tuple[str, int]:
    """The listing as Parquet parts under OUTPUT/_listing/: the read operator the checkpoint needs,
    and the unit of work a killed job keeps (one part becomes one output file)."""
    import pyarrow.parquet as pq

    fs, root, _ = resolve(output)
    listing = f"{root}/{LISTING}"
    clear_dir(join_uri(output, LISTING))
    make_dir(join_uri(output, LISTING))
    for part, start in enumerate(range(0, inputs.num_rows, rows_per_file)):
        pq.write_table(
            inputs.slice(start, rows_per_file),
            f"{listing}/part-{part:06d}.parquet",
            filesystem=fs,
        )
    return join_uri(output, LISTING), part + 1


# === The score command ===


def score(cfg: Config, model: str, input_uri: str, output: str) -> dict:
    """Scores every file under `input_uri` with `model`; writes Parquet rows and summary.json."""
    from skinray.cluster import connect, reserved_cpus
    from skinray.predictor import Predictor

    model = absolute(model)  # the actors open it from their own working directories
    # A bad model fails here, before any work; the actors load the version planned for, or nothing.
    predictor = Predictor.from_path(model, load_models=False, expect_version=cfg.score.expect_version)
    source, inputs = list_inputs(input_uri)
    source = ImageSource(source.filesystem, source.prefix, cfg.data.max_pixels)
    connect(reserved_cpus(cfg, "score"))
    make_dir(output)
    with lock(join_uri(output, LOCK), f"output '{redact(output)}'"):
        _claim(output, predictor, input_uri)
        return _score(cfg, model, predictor, source, inputs, output)


def _claim(output: str, predictor, input_uri: str) -> None:
    """OUTPUT/run.json names the model version and input whose rows the output holds; another model
    or input is refused, naming both, so that rows of two models never mix in one output."""
    run = {
        "model_version": predictor.version,
        "model": predictor.source,
        "input": redact(absolute(input_uri)),
    }
    previous = read_marker(join_uri(output, RUN))
    if previous is None:
        write_json(join_uri(output, RUN), run)
        return
    if (previous.get("model_version"), previous.get("input")) != (run["model_version"], run["input"]):
        raise UserError(
            f"{redact(output)} holds the rows of model {previous.get('model_version')} on "
            f"{previous.get('input')}; this run is model {run['model_version']} on {run['input']}: "
            "give it another --output (rows of two models or inputs never mix in one)"
        )


def _score(cfg: Config, model: str, predictor, source: ImageSource, inputs: pa.Table, output: str) -> dict:
    """The scoring itself, under the output's lock: listing, the engine, checkpointed writes, summary."""
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    from skinray.console import say
    from skinray.precision import resolve as resolve_precision

    score_cfg = cfg.score
    precision, why = resolve_precision(score_cfg.precision)  # as the actors on this kind of node will
    say(f"the model actors compute in {precision} ({why})")
    fs, _, _ = resolve(output)
    listing, parts = _write_listing(inputs, output, score_cfg.rows_per_file)
    context = ray.data.DataContext.get_current()
    previous = context.checkpoint_config, context.use_datasource_v2
    context.checkpoint_config = CheckpointConfig(
        id_column="path",
        checkpoint_path=_checkpoint_uri(output),
        delete_checkpoint_on_success=False,
        override_filesystem=fs,
    )
    # One read task, and so one output file, per listing part. The V2 Parquet reader (Ray 2.60's
    # default) packs small files into one task: a killed job would then keep nothing.
    context.use_datasource_v2 = False
    started = time.perf_counter()
    try:
        rows = ray.data.read_parquet(_path_of(listing), filesystem=fs, override_num_blocks=parts)
        predict_rows(
            rows,
            [model],
            predictor.sizes,
            source,
            score_cfg,
            task_options=cfg.data.task_options,
            version=predictor.bundle_version,
            passthrough=inputs.schema.remove(0),
        ).write_parquet(_path_of(join_uri(output, PREDICTIONS)), filesystem=fs)
    finally:
        context.checkpoint_config, context.use_datasource_v2 = previous
    summary = summarise(output, inputs.num_rows, predictor, time.perf_counter() - started)
    summary["precision"] = {"configured": score_cfg.precision, "used": precision, "why": why}
    write_json(join_uri(output, "summary.json"), summary)
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
    """Counts over everything written (this run and any before it): scored, failed, abstained, per class.

    Counted on the cluster, one Ray task per group of output files: the driver holds one small
    summary per file, never the rows. Rows written twice are found without a shuffle: the listing
    is sorted and cut into consecutive parts, so the files of distinct parts cover disjoint ranges
    of paths; only files whose ranges overlap are read together and their paths compared.
    """
    import ray

    fs, root, _, files = list_files(join_uri(output, PREDICTIONS))
    files = sorted(f"{root}/{f}" for f in files if f.endswith(".parquet"))
    size = max(1, math.ceil(len(files) / SUMMARY_TASKS))
    count = ray.remote(_count_files)
    per_file = [
        c
        for group in ray.get([count.remote(fs, files[i : i + size]) for i in range(0, len(files), size)])
        for c in group
    ]
    totals: Counter = Counter()
    for counts in per_file:
        totals.update(counts["counts"])
    overlapping = [group for group in _overlapping(per_file) if len(group) > 1]
    extra_rows = sum(c["counts"]["rows"] - c["distinct"] for c in per_file if c["alone"])
    distinct = ray.remote(_distinct_paths)
    extra_rows += sum(
        sum(c["counts"]["rows"] for c in group) - n
        for group, n in zip(
            overlapping, ray.get([distinct.remote(fs, [c["file"] for c in g]) for g in overlapping])
        )
    )
    per_class = {k.removeprefix("label:"): v for k, v in sorted(totals.items()) if k.startswith("label:")}
    reasons = Counter({k.removeprefix("error:"): v for k, v in totals.items() if k.startswith("error:")})
    return {
        "model": predictor.source,
        "model_version": predictor.version,
        "listed": listed,
        "rows": totals["rows"],
        "unique_paths": totals["rows"] - extra_rows,
        "scored": sum(per_class.values()),
        "failed": sum(reasons.values()),
        "abstained": totals["abstained"],
        "per_class": per_class,
        "failure_reasons": dict(reasons.most_common()),
        "seconds": round(seconds, 2),
        "predictions": redact(join_uri(output, PREDICTIONS)),
    }


SUMMARY_TASKS = 32  # at most this many counting tasks, each reading its files one after another


def _count_files(fs, files: list[str]) -> list[dict]:
    """Each file's counts (rows, abstained, per label and failure reason), its first and last path,
    and its number of distinct paths."""
    import pyarrow.parquet as pq

    found = []
    for file in files:
        block = pq.read_table(file, filesystem=fs, columns=["path", "label", "abstained", "error"])
        abstained = pc.sum(block["abstained"].cast(pa.int64())).as_py() or 0
        counts = Counter({"rows": block.num_rows, "abstained": int(abstained)})
        for key, column in (
            ("label", block["label"]),
            ("error", pc.list_element(pc.split_pattern(block["error"], ":", max_splits=1), 0)),
        ):
            for item in pc.value_counts(column.drop_null()).to_pylist():
                counts[f"{key}:{item['values']}"] += item["counts"]
        bounds = pc.min_max(block["path"]).as_py() if block.num_rows else {"min": None, "max": None}
        found.append(
            {
                "file": file,
                "counts": counts,
                "first": bounds["min"],
                "last": bounds["max"],
                "distinct": pc.count_distinct(block["path"]).as_py(),
            }
        )
    return found


def _overlapping(per_file: list[dict]) -> list[list[dict]]:
    """The files in groups whose path ranges chain into one another (sorted by first path); marks
    each file that overlaps no other one `alone`."""
    groups: list[list[dict]] = []
    last = None
    for item in sorted((c for c in per_file if c["first"] is not None), key=lambda c: c["first"]):
        if last is not None and item["first"] <= last:
            groups[-1].append(item)
            last = max(last, item["last"])
        else:
            groups.append([item])
            last = item["last"]
    for item in per_file:
        item["alone"] = item["first"] is None
    for group in groups:
        if len(group) == 1:
            group[0]["alone"] = True
    return groups


def _distinct_paths(fs, files: list[str]) -> int:
    """The number of distinct paths in files whose ranges overlap."""
    import pyarrow.parquet as pq

    return pc.count_distinct(
        pa.chunked_array([pq.read_table(f, filesystem=fs, columns=["path"])["path"] for f in files])
    ).as_py()


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['rows']} rows for {summary['listed']} files: {summary['scored']} scored, "
        f"{summary['failed']} failed, {summary['abstained']} abstained ({summary['seconds']:.1f} s)"
    ]
    for label, count in summary["per_class"].items():
        lines.append(f"  {count:6d}  {label}")
    for reason, count in summary["failure_reasons"].items():
        lines.append(f"  failed: {count} {reason}")
    lines.append(f"predictions: {summary['predictions']}")
    return "\n".join(lines)
