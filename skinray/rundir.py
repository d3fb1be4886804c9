"""The run directory: what a training run leaves, and how every reader finds its best model.

    OUT/NAME/
      config.yaml, classes.json      written before the first epoch (a resume is checked against them)
      tensorboard/                   rank 0's event files
      checkpoint_epoch_NNNN/         one an epoch; Ray Train keeps the best `train.keep_checkpoints`
        model.keras                  the model (preprocessing inside)
        optimizer.npz                the optimizer's variables (a resume continues them)
        best.weights.h5              the best epoch's weights, when this epoch is not the best
        state.json                   the loop's state: epoch, phase, history, events
        model.json                   backbone, input size, classes, epoch, metrics (checkpoint_score)
        classes.json, config.yaml    the same as the run's, so that a checkpoint stands alone
      summary.json                   at the end: the best checkpoint, its metrics, the history

Training writes it (`train/trainer.py`: the run's files and summary; `train/loop.py`: the
checkpoints, through `write_checkpoint_files`); `predictor.py` reads it. The best checkpoint is
chosen in one way, here: by `checkpoint_score` (the monitored metric, ties to the earlier epoch),
as Ray Train ranks the checkpoints it keeps.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

CONFIG = "config.yaml"
CLASSES = "classes.json"
SUMMARY = "summary.json"
MODEL = "model.keras"
DESCRIPTION = "model.json"
STATE = "state.json"
OPTIMIZER = "optimizer.npz"
BEST_WEIGHTS = "best.weights.h5"
SCORE = "checkpoint_score"  # the metric Ray Train ranks checkpoints by (see train/monitor.py)


def checkpoint_name(epoch: int) -> str:
    """The folder of the checkpoint written after `epoch` (counted from 1)."""
    return f"checkpoint_epoch_{epoch:04d}"


def best(candidates: list, mode: str):
    """The (checkpoint, metrics) pair with the best `checkpoint_score` ("max" or "min")."""
    pick = min if mode == "min" else max
    return pick(candidates, key=lambda pair: pair[1][SCORE])


# === Written by training ===


def write_run_files(cfg, classes: list[str], run_uri: str) -> None:
    """config.yaml and classes.json next to the checkpoints, before the first epoch."""
    from skinray.config import save_config
    from skinray.storage import upload_folder

    with tempfile.TemporaryDirectory() as folder:
        save_config(cfg, folder, CONFIG)
        Path(folder, CLASSES).write_text(json.dumps(classes))
        upload_folder(folder, run_uri)


def read_run_files(run_uri: str) -> tuple[str, str] | None:
    """The texts of a run's classes.json and config.yaml; None when the folder holds no run yet."""
    from skinray.storage import join_uri, read_text

    classes, config = read_text(join_uri(run_uri, CLASSES)), read_text(join_uri(run_uri, CONFIG))
    return None if classes is None or config is None else (classes, config)


def write_summary(run_uri: str, summary: dict) -> None:
    from skinray.storage import join_uri, write_json

    write_json(join_uri(run_uri, SUMMARY), summary)


def write_checkpoint_files(folder: Path, cfg, classes: list[str], state: dict, description: dict) -> None:
    """A checkpoint's files besides the model's and the optimizer's (which the loop writes)."""
    from skinray.config import save_config

    (folder / STATE).write_text(json.dumps(state, indent=2))
    (folder / CLASSES).write_text(json.dumps(classes))
    (folder / DESCRIPTION).write_text(json.dumps({**description, "classes": classes}, indent=2))
    save_config(cfg, folder, CONFIG)


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE).read_text())


# === Read by the predictor ===


def best_checkpoint(folder: Path) -> Path | None:
    """A checkpoint is itself; a run directory resolves to the checkpoint its summary names, or
    (a run cut short) the best of its checkpoints by `checkpoint_score` in the run's monitor mode.
    None: the folder is neither."""
    from skinray.config import load_config

    if (folder / MODEL).is_file():
        return folder
    summary = folder / SUMMARY
    if summary.is_file():
        named = folder / Path(json.loads(summary.read_text())["best_checkpoint"]).name
        if (named / MODEL).is_file():
            return named
    described = [
        (p, json.loads((p / DESCRIPTION).read_text())["metrics"])
        for p in sorted(folder.glob("checkpoint_*"))
        if (p / DESCRIPTION).is_file()
    ]
    if not described:
        return None
    config = load_config(folder / CONFIG) if (folder / CONFIG).is_file() else load_config()
    return best(described, config.train.monitor_mode)[0]
