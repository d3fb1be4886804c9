"""The driver side of training: catalog and splits, then a TensorflowTrainer with scaling, checkpoint
and failure configs from the typed config; ends with the run directory and its best checkpoint.

    skinray train --backbone resnet50 --data data/dermnet --out runs --workers 4 --gpus-per-worker 1

The run directory is `OUT/NAME` (local or any pyarrow.fs URI). Ray Train writes one
`checkpoint_epoch_NNNN/` per epoch there and keeps the best `train.keep_checkpoints` by
`train.monitor` (and always the latest); skinray adds `config.yaml`, `classes.json`,
`tensorboard/` and, at the end, `summary.json`. Running the same command with the same `--name`
resumes an interrupted run from its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

from skinray import UserError, rundir
from skinray.cluster import connect, reserved_cpus
from skinray.config import Config, config_to_dict
from skinray.console import say, train_logging_config, verbose, warn
from skinray.data.catalog import class_weights, list_archive, splits
from skinray.data.ingest import ImageSource, steps_per_epoch
from skinray.storage import absolute, join_uri, lock, redact
from skinray.tracking import config_params, epoch_callback, tracked
from skinray.train.loop import LoopInputs, train_loop_per_worker


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    best_checkpoint: str
    best_metrics: dict
    history: list


def train(cfg: Config, out: str, name: str = "", callbacks: tuple = (), track: bool = True) -> TrainResult:
    """Fine-tunes `cfg.model.backbone` on `cfg.data.archive`; returns where the best model is.

    `callbacks`: Ray Train callbacks, e.g. Tune's report callback when a Tune trial runs it.
    `track`: an MLflow run of its own when tracking is on (a Tune trial has Tune's instead).
    """
    from skinray.console import load_tensorflow

    load_tensorflow(expect_gpu=cfg.train.gpus_per_worker > 0)
    from skinray.models import check_model

    spec, _ = check_model(cfg.model)  # fail here, not after the cluster has started
    cfg = _with_weights_source(cfg)
    inputs = _inputs(cfg)
    _announce_recipe(cfg)
    run_name = name or cfg.train.run_name or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = absolute(out)
    run_uri = join_uri(storage, run_name)
    inputs = replace(inputs, run_uri=run_uri)
    with lock(join_uri(run_uri, ".lock"), f"the run '{redact(run_uri)}'"):
        _check_resume(cfg, inputs.classes, run_uri)
        rundir.write_run_files(cfg, inputs.classes, run_uri)
        with tracked(cfg, run_name, "train", enabled=track) as run:
            run.params(config_params(cfg))
            run.tag("skinray.run_dir", redact(run_uri))
            epochs = epoch_callback(run)
            result = _fit(
                cfg, inputs, storage, run_name, run_uri, [*callbacks, *([epochs] if epochs else [])]
            )
            run.metrics({f"best_{k}": v for k, v in result.best_metrics.items()})
            run.artifact(join_uri(run_uri, rundir.SUMMARY))
            run.artifact(join_uri(run_uri, "tensorboard"), "tensorboard")
            return result


def _fit(
    cfg: Config, inputs: LoopInputs, storage: str, run_name: str, run_uri: str, callbacks
) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    train_cfg = cfg.train
    connect(reserved_cpus(cfg, "train"))  # once the inputs are known good: a mistake fails before Ray starts
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=ScalingConfig(
            num_workers=train_cfg.workers,
            use_gpu=train_cfg.gpus_per_worker > 0,
            resources_per_worker=train_cfg.worker_resources,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=train_cfg.keep_checkpoints,
                checkpoint_score_attribute="checkpoint_score",
                checkpoint_score_order=train_cfg.monitor_mode,
            ),
            failure_config=FailureConfig(max_failures=train_cfg.max_failures),
            logging_config=train_logging_config(),
            callbacks=list(callbacks),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"training failed ({first}). Checkpoints so far are in {redact(run_uri)}: run the same "
            "command again (same --out and --name) to resume from the latest one."
        ) from None
    return _summarise(result, cfg, run_uri)


# What a resumed run may not change: its classes, its model, and which images it trains and validates on.
RESUME_FIXED = ("model.", "data.archive", "data.val_fraction", "data.seed", "train.recipe")


def _check_resume(cfg: Config, classes: list[str], run_uri: str) -> None:
    """A run directory that holds a run already is resumed only with the same classes and model, so
    that no checkpoint is silently continued under other labels; the difference is named."""
    from skinray.config import load_config_text, redacted

    saved = rundir.read_run_files(run_uri)
    if saved is None:
        return
    saved_classes, saved_config = saved
    where = redact(run_uri)
    try:
        before, before_cfg = json.loads(saved_classes), load_config_text(saved_config)
    except ValueError as exc:
        raise UserError(
            f"{where} holds a run whose classes.json or config.yaml cannot be read ({exc}): "
            "give this run another --name, or remove that folder"
        ) from None
    if before != classes:
        from skinray.predictor import describe_difference

        what = describe_difference(before, classes, ("classes only before", "only now"))
        raise UserError(
            f"{where} holds a run on other classes ({what}): resuming it would relabel its "
            "checkpoints. Give this run another --name (or --out)"
        )
    now, then = _flat(config_to_dict(redacted(cfg))), _flat(config_to_dict(before_cfg))
    changed = [
        f"{key}: {then.get(key)!r} then, {now.get(key)!r} now"
        for key in sorted(now)
        if key.startswith(RESUME_FIXED) and now.get(key) != then.get(key)
    ]
    if changed:
        raise UserError(
            f"{where} holds a run with other settings ({'; '.join(changed)}): resume it with its "
            "own, or give this run another --name"
        )


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "resources":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _inputs(cfg: Config) -> LoopInputs:
    if not cfg.data.archive:
        raise UserError("no archive given: pass --data DIR (or set data.archive)")
    catalog = list_archive(cfg.data.archive)
    parts = splits(catalog, cfg.data.val_fraction, cfg.data.seed)
    train_rows, val_rows = parts["train"], parts["val"]
    if val_rows.num_rows == 0:
        raise UserError("the validation split is empty: set data.val_fraction > 0 or add a val/ folder")
    global_batch = cfg.train.batch_size * cfg.train.workers
    if steps_per_epoch(train_rows.num_rows, cfg.train.workers, cfg.train.batch_size) == 0:
        raise UserError(
            f"the training split has {train_rows.num_rows} images, fewer than one global batch "
            f"({cfg.train.workers} workers x {cfg.train.batch_size}): lower train.batch_size"
        )
    say(
        f"{catalog.num_classes} classes; {train_rows.num_rows} training and {val_rows.num_rows} "
        f"validation images; global batch {global_batch}"
    )
    return LoopInputs(
        cfg=cfg,
        train_rows=train_rows,
        val_rows=val_rows,
        classes=catalog.classes,
        class_weights=class_weights(train_rows["label_index"].to_numpy(), catalog.num_classes),
        source=ImageSource.of(catalog, cfg.data.max_pixels),
        run_uri="",
        verbose=verbose(),
        kill=_fault_injection(),
    )


KILL_ENV = "SKINRAY_KILL_WORKER"


def _fault_injection() -> tuple[int, int] | None:
    """SKINRAY_KILL_WORKER=RANK:STEP makes that worker SIGKILL itself once, at that global step (the
    tests of recovery use it; not a setting of the config, which users read)."""
    value = os.environ.get(KILL_ENV, "")
    if not value:
        return None
    rank, sep, step = value.partition(":")
    if not (sep and rank.isdigit() and step.isdigit()):
        raise UserError(f"{KILL_ENV} must look like RANK:STEP, e.g. 1:20 (got {value!r})")
    return int(rank), int(step)


def _with_weights_source(cfg: Config) -> Config:
    """Records in `model.weights_from` which bundle version and member, or which checkpoint, a
    trained model given as `model.weights` resolved to; a config that recorded another is refused."""
    from skinray.models.sources import is_source, open_source

    if not is_source(cfg.model.weights):
        return cfg
    found = open_source(cfg.model.weights, cfg.model.weights_member).description
    if cfg.model.weights_from and cfg.model.weights_from != found:
        raise UserError(
            f"model.weights_from is '{cfg.model.weights_from}', but --weights {redact(cfg.model.weights)} "
            f"now holds {found}: train from what it holds with --set model.weights_from= (empty)"
        )
    say(f"backbone weights from {redact(cfg.model.weights)}: {found}; the head is new")
    return replace(cfg, model=replace(cfg.model, weights_from=found))


def _announce_recipe(cfg: Config) -> None:
    """The recipe in words before the first epoch, and a warning for each contradicting setting."""
    from skinray.train.recipe import contradictions, describe

    say(describe(cfg, cfg.train.batch_size * cfg.train.workers))
    for problem in contradictions(cfg):
        warn(problem)


def _summarise(result, cfg: Config, run_uri: str) -> TrainResult:
    if result.error:
        raise result.error
    ranked = [(c, m) for c, m in result.best_checkpoints if rundir.SCORE in m]
    if not ranked:
        raise UserError(f"the run at {redact(run_uri)} reported no checkpoint")
    checkpoint, metrics = rundir.best(ranked, cfg.train.monitor_mode)
    history = _history(result.checkpoint or checkpoint)
    summary = {
        "run_dir": redact(run_uri),
        "best_checkpoint": checkpoint.path,
        "best_metrics": metrics,
        "monitor": cfg.train.monitor,
        "history": history,
    }
    rundir.write_summary(run_uri, summary)
    return TrainResult(run_uri, checkpoint.path, metrics, history)


def _history(checkpoint) -> list:
    with checkpoint.as_directory() as folder:
        return rundir.read_state(folder)["history"]
