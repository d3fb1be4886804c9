"""The head search: a Ray Tune run over `tune`'s space under ASHA, then the trial table and the
best configuration as a config `skinray train --config` reads unchanged.

    skinray tune --backbone resnet50 --data data/dermnet --out tuning [--trials 16] [--mode cached]

Cached mode (the default): the embeddings are computed once (`embeddings.py`); each trial is a
light function trainable that builds the head with the code `skinray train` uses
(`models.classifier.head`), trains it on the features of one augmented view per epoch and reports
the validation metrics every epoch. Full mode: each trial is a real Ray Train run of the head phase
(backbone frozen), built by `train.trainer.train` with Tune's report callback. Everything lives in
`OUT/RUN/`; running the same command again continues an interrupted search (Tune's restore):
finished trials are not rerun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from skinray import UserError
from skinray.cluster import connect, reserved_cpus
from skinray.config import Config, TuneConfig, load_config_text, redacted, save_config
from skinray.console import say, verbose
from skinray.data.catalog import class_weights, list_archive, splits
from skinray.data.ingest import ImageSource
from skinray.storage import absolute, basename, join_uri, list_dirs, make_dir, read_text, write_text
from skinray.tracking import config_params, tracked, tune_callback

# Where each searched value goes in the config that `skinray train` reads.
SEARCHED = {
    "head_units": "model",
    "dropout": "model",
    "head_dropout": "model",
    "l2": "model",
    "head_lr": "train",
    "label_smoothing": "train",
    "batch_size": "train",
}


def search_space(t: TuneConfig) -> dict:
    from ray import tune

    space = {name: tune.choice(list(getattr(t, name))) for name in ("head_units", "batch_size")}
    for name in ("dropout", "head_dropout", "label_smoothing"):
        space[name] = tune.uniform(*getattr(t, name))
    for name in ("head_lr", "l2"):
        space[name] = tune.loguniform(*getattr(t, name))
    return space


def with_trial(cfg: Config, trial: dict) -> Config:
    """The config a trial's values mean: each searched key set where `skinray train` reads it."""
    sections = {"model": {}, "train": {}}
    for name, value in trial.items():
        if name in SEARCHED:
            sections[SEARCHED[name]][name] = value.item() if hasattr(value, "item") else value
    return cfg.replace(
        model=dataclasses.replace(cfg.model, **sections["model"]),
        train=dataclasses.replace(cfg.train, **sections["train"]),
    )


# === Trials ===


def cached_trial(trial: dict, *, data, cfg: Config, weights: list[float]) -> None:
    """One head on cached features: an epoch = one augmented view of every training image."""
    from skinray.console import load_tensorflow, quiet_process

    quiet_process()
    load_tensorflow(expect_gpu=False)  # a head trains on the CPU
    import keras
    import tensorflow as tf

    # One thread per trial: many trials share the cores, and a head's matrices are too small to split.
    if tf.config.threading.get_intra_op_parallelism_threads() != 1:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already initialised its pools in this actor
            pass
    from ray import tune

    from skinray.metrics import confusion, confusion_metrics
    from skinray.models.classifier import build_head
    from skinray.train.schedule import scaled_learning_rate

    trial_cfg = with_trial(cfg, trial)
    k = len(weights)
    keras.backend.clear_session()  # the actor may have run other trials before (reuse_actors)
    keras.utils.set_random_seed(cfg.tune.seed)
    checkpoint, start = tune.get_checkpoint(), 0
    if checkpoint:
        with checkpoint.as_directory() as folder:
            model = keras.models.load_model(Path(folder, "head.keras"), safe_mode=True)
            start = json.loads(Path(folder, "state.json").read_text())["epoch"]
    else:
        model = build_head(data.train_x.shape[1], k, trial_cfg.model)
        rate = scaled_learning_rate(
            trial_cfg.train.head_lr, trial_cfg.train.batch_size, cfg.train.base_batch, cfg.train.lr_scaling
        )
        model.compile(
            optimizer=keras.optimizers.Adam(rate),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=trial_cfg.train.label_smoothing
            ),
            jit_compile=False,
        )  # XLA's compile of a new model takes seconds; a head's epoch, a fraction of one
    for epoch in range(start, cfg.tune.max_epochs):
        view = data.train_view == epoch % cfg.tune.views
        model.fit(
            data.train_x[view],
            keras.utils.to_categorical(data.train_y[view], k),
            batch_size=trial_cfg.train.batch_size,
            class_weight=dict(enumerate(weights)),
            epochs=1,
            verbose=0,
        )
        logits = np.asarray(model(data.val_x, training=False))  # a head is a few layers: no graph to trace
        scores = confusion_metrics(confusion(data.val_y, logits.argmax(axis=1), k))
        loss = float(
            np.mean(keras.losses.sparse_categorical_crossentropy(data.val_y, logits, from_logits=True))
        )
        with tempfile.TemporaryDirectory() as folder:
            model.save(Path(folder, "head.keras"))
            Path(folder, "state.json").write_text(json.dumps({"epoch": epoch + 1}))
            tune.report(
                {
                    "epoch": epoch + 1,
                    "val_loss": loss,
                    "val_accuracy": scores["accuracy"],
                    "val_macro_f1": scores["macro_f1"],
                },
                checkpoint=tune.Checkpoint.from_directory(folder),
            )


def full_trial(trial: dict, *, cfg: Config, out: str) -> None:
    """One Ray Train run of the head phase (backbone frozen), reporting to Tune every epoch."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from skinray.train.trainer import train

    t = cfg.tune
    trial_cfg = with_trial(cfg, trial)
    trial_cfg = trial_cfg.replace(
        train=dataclasses.replace(
            trial_cfg.train,
            recipe="transfer",
            epochs=t.max_epochs,
            head_epochs=t.max_epochs,
            early_stopping_patience=0,
            monitor=t.metric,
        )
    )
    trial = tune.get_context().get_trial_id()
    train(trial_cfg, out, name=trial, callbacks=[TuneReportCallback()], track=False)  # Tune's run has it


# === The search ===


def tune_head(cfg: Config, out: str, name: str = "") -> dict:
    """Runs (or continues) the search; returns the best trial's row and where the outputs are."""
    from skinray.models import check_model

    spec, size = check_model(cfg.model)  # a missing weights file fails here, before anything is written
    catalog, train_rows, val_rows = _inputs(cfg)
    out = absolute(out)
    run_dir = join_uri(out, name or f"tune-{spec.name}")
    _refuse_a_different_search(cfg, run_dir)
    make_dir(run_dir)
    with tempfile.TemporaryDirectory() as folder:
        write_text(join_uri(run_dir, "config.yaml"), save_config(cfg, folder).read_text())
    weights = class_weights(train_rows["label_index"].to_numpy(), catalog.num_classes)
    if cfg.tune.mode == "cached":
        from skinray.tune.embeddings import embed, load_embeddings

        connect(reserved_cpus(cfg, "tune"))
        location, reused = embed(
            cfg,
            size,
            train_rows,
            val_rows,
            ImageSource.of(catalog, cfg.data.max_pixels),
            join_uri(run_dir, "embeddings"),
            elsewhere=_sibling_embeddings(out),
        )
        say(f"embeddings {'reused' if reused else 'written'}: {location}")
        trainable = _cached_trainable(cfg, load_embeddings(location), weights)
    else:
        connect(reserved_cpus(cfg, "tune"))
        trainable = _full_trainable(cfg, join_uri(run_dir, "full"))
    with tracked(cfg, basename(run_dir), "tune") as run:
        run.params(config_params(cfg))
        results = _run(cfg, trainable, run_dir, tune_callback(run, cfg.tracking.experiment))
        summary = write_outputs(results, cfg, run_dir)
        run.metrics({f"best_{k}": v for k, v in summary["best"].items()})
        run.artifact(join_uri(run_dir, "trials.md"))
        return summary


def _refuse_a_different_search(cfg: Config, run_dir: str) -> None:
    """The same name continues a search; with other settings it would silently continue the old one."""
    text = read_text(join_uri(run_dir, "config.yaml"))
    if text is None:
        return
    saved, cfg = load_config_text(text), redacted(cfg)  # as saved: no credentials in the archive's URI
    changed = [
        f"{section}.{key}"
        for section in ("data", "augment", "model", "tune")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items()
        if dataclasses.asdict(getattr(saved, section))[key] != value
    ]
    if changed:
        raise UserError(
            f"{run_dir} holds a search with other settings ({', '.join(changed)}); "
            "run it with its own settings to continue it, or pick another --name"
        )


def _sibling_embeddings(out: str) -> list[str]:
    """Embedding folders of the other searches under the same --out, for reuse by key."""
    return [join_uri(join_uri(out, name), "embeddings") for name in list_dirs(out)]


def _inputs(cfg: Config):
    if not cfg.data.archive:
        raise UserError("no archive given: pass --data DIR (or set data.archive)")
    catalog = list_archive(cfg.data.archive)
    if catalog.num_classes < 2:
        raise UserError(f"the archive has {catalog.num_classes} class(es): a search needs at least 2")
    parts = splits(catalog, cfg.data.val_fraction, cfg.data.seed)
    if parts["val"].num_rows == 0:
        raise UserError(
            "the archive has no validation images: set data.val_fraction > 0 or add a val/ folder"
        )
    return catalog, parts["train"], parts["val"]


def _cached_trainable(cfg: Config, data, weights: list[float]):
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(cached_trial, data=data, cfg=cfg, weights=weights),
        {"cpu": cfg.tune.cpus_per_trial},
    )


def _full_trainable(cfg: Config, out: str):
    from ray import tune

    # The trial's driver function only waits (Tune needs some resource); its Ray Train workers
    # reserve the CPUs.
    return tune.with_resources(tune.with_parameters(full_trial, cfg=cfg, out=out), {"cpu": 0.01})


def _run(cfg: Config, trainable, run_dir: str, tracking=None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    t = cfg.tune
    # One kept checkpoint per trial (enough to continue it) makes Tune snapshot its state after
    # every report, which it warns about; on small trials that is the point, not a bottleneck.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trials_uri = join_uri(run_dir, "trials")
    if tune.Tuner.can_restore(trials_uri):
        say(f"continuing the search in {trials_uri}")
        tuner = tune.Tuner.restore(trials_uri, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(t),
            tune_config=tune.TuneConfig(
                metric=t.metric,
                mode=t.metric_mode,
                num_samples=t.trials,
                max_concurrent_trials=t.max_concurrent or None,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=t.max_epochs,
                    grace_period=t.grace_period,
                    reduction_factor=t.reduction_factor,
                ),
                # The limit goes to the generator too: given one, Tune does not apply it for us.
                search_alg=BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent),
                # A cached trial's own work is a second or two; loading TensorFlow into a new actor
                # is several. Kept actors load it once and run trial after trial.
                reuse_actors=t.mode == "cached",
            ),
            run_config=tune.RunConfig(
                name="trials",
                storage_path=run_dir,
                verbose=2 if verbose() else 1,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[tracking] if tracking else None,  # MLflow: a run per trial
            ),
        )
    return tuner.fit()


# === Outputs ===


def trial_rows(results, t: TuneConfig) -> list[dict]:
    """One row per trial: its configuration, best metric, validation loss, epochs, stopped early."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        if frame is None or t.metric not in frame:
            rows.append(
                {"trial": _trial_id(result), **_searched(result.config), "error": str(result.error)[:200]}
            )
            continue
        best = frame[t.metric].idxmax() if t.metric_mode == "max" else frame[t.metric].idxmin()
        epochs = int(frame["training_iteration"].max())
        rows.append(
            {
                "trial": _trial_id(result),
                **_searched(result.config),
                t.metric: float(frame.loc[best, t.metric]),
                "val_loss": float(frame.loc[best, "val_loss"]),
                "best_epoch": int(frame.loc[best, "training_iteration"]),
                "epochs": epochs,
                "stopped_early": epochs < t.max_epochs and result.error is None,
                "error": "" if result.error is None else str(result.error)[:200],
            }
        )
    key = (
        (lambda r: -r.get(t.metric, -np.inf))
        if t.metric_mode == "max"
        else (lambda r: r.get(t.metric, np.inf))
    )
    return sorted(rows, key=key)


def write_outputs(results, cfg: Config, run_dir: str) -> dict:
    """trials.csv, trials.md and best_config.yaml in the run directory; returns the best row."""
    import pandas as pd

    rows = trial_rows(results, cfg.tune)
    finished = [r for r in rows if cfg.tune.metric in r]
    if not finished:
        raise UserError(f"no trial finished an epoch; see the trial errors in {join_uri(run_dir, 'trials')}")
    best = finished[0]
    frame = pd.DataFrame(rows)
    write_text(join_uri(run_dir, "trials.csv"), frame.to_csv(index=False))
    write_text(join_uri(run_dir, "trials.md"), _markdown(frame, cfg.tune))
    best_cfg = with_trial(cfg, {k: best[k] for k in SEARCHED})
    with tempfile.TemporaryDirectory() as folder:
        saved = save_config(best_cfg, folder, "best_config.yaml")
        text = (
            f"# The best of {len(rows)} trials of `skinray tune` ({cfg.tune.mode} mode): {cfg.tune.metric} "
            f"{best[cfg.tune.metric]:.4f} at epoch {best['best_epoch']}, trial {best['trial']}.\n"
            f"#   skinray train --config best_config.yaml --data ARCHIVE --out runs\n"
        ) + saved.read_text()
        write_text(join_uri(run_dir, "best_config.yaml"), text)
    return {
        "best": best,
        "run_dir": run_dir,
        "best_config": join_uri(run_dir, "best_config.yaml"),
        "trials": len(rows),
        "stopped_early": sum(bool(r.get("stopped_early")) for r in rows),
    }


def _markdown(frame, t: TuneConfig) -> str:
    columns = list(frame.columns)
    lines = [
        f"# Head search: {len(frame)} trials, ranked by {t.metric}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(format_value(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def format_value(value) -> str:
    """A trial table's cell: floats to 4 significant digits, NaN as blank."""
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4g}"
    return str(value)


def _searched(config: dict) -> dict:
    return {k: config[k] for k in SEARCHED if k in config}


def _trial_id(result) -> str:
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name)
