"""Typed, frozen configuration: one dataclass per concern, loaded from YAML with `--set` overrides.

Every stage takes a `Config`; every run writes the resolved one next to its outputs (`save_config`),
so a result can always be traced back to exactly the settings that produced it. Errors name the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from skinray import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range; `key` names it."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def ray_options(
    cpus: float, gpus: float = 0.0, resources: dict[str, float] | None = None, memory_mb: float = 0.0
) -> dict[str, Any]:
    """Ray's options of a task or actor (a decode task, a model actor, a Serve replica): its CPUs, and
    GPUs, custom resources and memory where it reserves any."""
    return {
        "num_cpus": cpus,
        **({"num_gpus": gpus} if gpus else {}),
        **({"resources": dict(resources)} if resources else {}),
        **({"memory": int(memory_mb * 2**20)} if memory_mb else {}),
    }


def _require_resources(resources: dict[str, float], key: str) -> None:
    """Custom Ray resources (node-type markers of cluster.yaml): named, not CPU or GPU, >= 0."""
    for name, amount in resources.items():
        _require(
            name not in ("CPU", "GPU", "memory") and bool(name),
            f"{key}.{name}",
            "CPU and GPU have their own keys; name a custom resource of the cluster's nodes",
        )
        _require(amount >= 0, f"{key}.{name}", "must be >= 0")


def _resources() -> Any:
    return field(default_factory=dict)


# === Sections ===


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split.

    Args:
        archive: folder-per-class archive: a local path or any URI pyarrow.fs reads (s3://, gs://).
        val_fraction: share of each class's training images held out for validation.
        seed: seeds the split, the per-epoch shuffle, every augmentation draw and a training
            run's initial weights and dropout (the same seed starts the same network).
        max_pixels: images claiming more pixels than this are refused (decompression-bomb guard).
        cpus_per_task: CPUs Ray Data reserves for each decode-and-augment task.
        resources: custom Ray resources each decode task reserves, e.g. {cpu_node: 0.001} keeps
            decoding on cluster.yaml's CPU nodes (docs/cluster.md).
    """

    archive: str = ""
    val_fraction: float = 0.2
    seed: int = 0
    max_pixels: int = 80_000_000
    cpus_per_task: float = 1.0
    resources: dict[str, float] = _resources()

    def __post_init__(self):
        _require_resources(self.resources, "resources")
        _require(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        _require(self.max_pixels > 0, "max_pixels", "must be positive")
        _require(self.cpus_per_task > 0, "cpus_per_task", "must be positive")

    @property
    def task_options(self) -> dict[str, Any]:
        """Ray options of each decode task."""
        return ray_options(self.cpus_per_task, resources=self.resources)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation, as the seed notebook's ImageDataGenerator, drawn per image and epoch.

    Args:
        rotation: maximum rotation in degrees, either way.
        shear: maximum shear factor (tangent of the shear angle), either way.
        zoom: each axis is scaled by a factor drawn from [1 - zoom, 1 + zoom].
        width_shift: maximum horizontal shift as a fraction of the width.
        height_shift: maximum vertical shift as a fraction of the height.
        horizontal_flip: flip half of the images left to right.
    """

    rotation: float = 30.0
    shear: float = 0.2
    zoom: float = 0.3
    width_shift: float = 0.2
    height_shift: float = 0.2
    horizontal_flip: bool = True

    def __post_init__(self):
        _require(0.0 <= self.rotation <= 180.0, "rotation", "must be in [0, 180] degrees")
        _require(0.0 <= self.shear < 1.0, "shear", "must be in [0, 1)")
        _require(0.0 <= self.zoom < 1.0, "zoom", "must be in [0, 1)")
        _require(0.0 <= self.width_shift < 1.0, "width_shift", "must be in [0, 1)")
        _require(0.0 <= self.height_shift < 1.0, "height_shift", "must be in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a registered backbone and the classification head on top of it.

    Args:
        backbone: a name from the backbone registry (`skinray.models.backbones`).
        image_size: input side in pixels; 0 means the backbone's native size.
        weights: 'imagenet', 'none', a Keras weights file for the backbone (`.h5`, `.weights.h5`),
            or a trained skinray model whose backbone to start from: a run directory (its best
            checkpoint), a checkpoint or a bundle (local or URI). The head is always new.
        weights_member: with a bundle as `weights`, the member whose backbone to take (e.g.
            '00-resnet50'); empty: the bundle's only member.
        weights_from: written by training, not set: the bundle version and member, or the
            checkpoint, that the backbone's weights came from (a run's config.yaml records it, and a
            resume refuses a source that has changed since).
        head_units: width of the head's hidden dense layer.
        head_activation: activation of that layer (any Keras activation name).
        dropout: dropout before the hidden dense layer (unset: the recipe's, see `RECIPES`).
        head_dropout: dropout between the hidden dense layer and the logits (unset: the recipe's).
        l2: L2 penalty on the head's kernels.
        zero_init_residual: with random weights, start every residual block as the identity: the
            BatchNormalization ending each residual branch starts at zero scale (Goyal et al. 2017).
            The scratch recipe's (on the sample archive it took ResNet50 from validation accuracy
            0.73 to 0.98 in 12 epochs); unset: the recipe's. Pretrained weights are never changed.
    """

    backbone: str = "resnet50"
    image_size: int = 0
    weights: str = "imagenet"
    weights_member: str = ""
    weights_from: str = ""
    head_units: int = 256
    head_activation: str = "relu"
    dropout: float | None = None
    head_dropout: float | None = None
    l2: float = 1e-4
    zero_init_residual: bool | None = None

    def __post_init__(self):
        _require(
            self.image_size == 0 or 32 <= self.image_size <= 1024,
            "image_size",
            "must be 0 (native) or between 32 and 1024",
        )
        _require(bool(self.weights), "weights", "must be 'imagenet', 'none' or a path")
        _require(self.head_units > 0, "head_units", "must be positive")
        _require(self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _require(
            self.head_dropout is None or 0.0 <= self.head_dropout < 1.0, "head_dropout", "must be in [0, 1)"
        )
        _require(self.l2 >= 0.0, "l2", "must be >= 0")


MIXED_PRECISION = ("none", "mixed_float16", "mixed_bfloat16")
LR_SCALING = ("linear", "sqrt", "none")
SCHEDULES = ("plateau", "cosine")
RECIPE_NAMES = ("auto", "transfer", "scratch")
MONITORS = ("val_macro_f1", "val_accuracy", "val_loss")


def improves(metric: str) -> str:
    """'min' for a loss, 'max' for accuracy and F1: which way a validation metric improves."""
    return "min" if metric == "val_loss" else "max"


@dataclass(frozen=True)
class TrainConfig:
    """Distributed fine-tuning on Ray Train.

    Learning rates are given for `base_batch` images a step; the rate used is scaled to the global
    batch (`batch_size` x `workers`) by `lr_scaling` (docs/training.md). Settings
    left unset take the recipe's value (`RECIPES`): the recipe follows the weights.

    Args:
        recipe: 'transfer' (two phases: head on a frozen backbone, then fine-tune the top layers),
            'scratch' (one phase, every layer trainable from the first epoch) or 'auto': scratch
            when `model.weights` is 'none', transfer otherwise.
        workers: Ray Train workers (one per GPU on a GPU cluster).
        gpus_per_worker: GPUs each worker reserves; 0 trains on CPUs.
        cpus_per_worker: CPUs each worker reserves.
        resources: custom Ray resources each worker reserves (which nodes train).
        batch_size: images per worker per step.
        epochs: total epochs (over both phases of the transfer recipe).
        head_epochs: epochs of the first phase (backbone frozen); the rest train the backbone.
        head_lr: learning rate of the head phase, for `base_batch` images.
        finetune_lr: learning rate of the phase that trains the backbone, for `base_batch` images.
        base_batch: the global batch the learning rates are given for.
        lr_scaling: 'linear', 'sqrt' or 'none': how rates follow the global batch.
        unfreeze_top: backbone layers trained in the second phase, counted from the top (-1: all).
        schedule: 'plateau' (reduce on a plateau of `monitor`) or 'cosine' (cosine decay to
            `min_lr` over each phase, after `warmup_epochs` of linear warm-up).
        warmup_epochs: epochs of linear learning-rate warm-up at the start of each phase.
        label_smoothing: label smoothing of the cross-entropy loss.
        batchnorm_momentum: momentum of every BatchNormalization layer's moving statistics
            (0: the backbone's own). Keras' applications use 0.99, which on a small archive leaves
            the statistics a random network validates with far from the data's after a few
            hundred steps; the scratch recipe uses 0.9.
        monitor: the validation metric early stopping, plateau and checkpoint ranking follow.
        early_stopping_patience: epochs without improvement before a phase stops (0: never).
        plateau_patience: epochs without improvement before the learning rate is reduced.
        plateau_factor: factor the learning rate is multiplied by on a plateau.
        min_lr: the learning rate is never reduced below this.
        mixed_precision: 'none', 'mixed_float16' (with loss scaling) or 'mixed_bfloat16'.
        xla: compile the train step with XLA.
        memory_growth: let TensorFlow grow GPU memory instead of taking it all at start.
        keep_checkpoints: best checkpoints kept, ranked by `monitor`.
        max_failures: worker-group failures survived by restarting from the latest checkpoint.
        run_name: name of the run directory under --out; empty picks backbone and time.
    """

    recipe: str = "auto"
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    resources: dict[str, float] = _resources()
    batch_size: int = 32
    epochs: int = 10
    head_epochs: int | None = None
    head_lr: float = 1e-3
    finetune_lr: float | None = None
    base_batch: int = 32
    lr_scaling: str = "linear"
    unfreeze_top: int | None = None
    schedule: str | None = None
    warmup_epochs: int | None = None
    label_smoothing: float | None = None
    batchnorm_momentum: float | None = None
    monitor: str = "val_macro_f1"
    early_stopping_patience: int = 5
    plateau_patience: int | None = None
    plateau_factor: float = 0.2
    min_lr: float = 1e-6
    mixed_precision: str = "none"
    xla: bool = False
    memory_growth: bool = True
    keep_checkpoints: int = 3
    max_failures: int = 2
    run_name: str = ""

    def __post_init__(self):
        _require(self.recipe in RECIPE_NAMES, "recipe", f"must be one of {RECIPE_NAMES}")
        _require(self.workers >= 1, "workers", "must be >= 1")
        _require(self.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")
        _require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")
        _require_resources(self.resources, "resources")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.epochs >= 1, "epochs", "must be >= 1")

        def unset(value) -> bool:  # recipe settings not yet resolved pass; Config resolves them
            return value is None

        _require(
            unset(self.head_epochs) or 0 <= self.head_epochs <= self.epochs,
            "head_epochs",
            "must be in [0, epochs]",
        )
        _require(self.head_lr > 0, "head_lr", "must be positive")
        _require(unset(self.finetune_lr) or self.finetune_lr > 0, "finetune_lr", "must be positive")
        _require(self.base_batch >= 1, "base_batch", "must be >= 1")
        _require(self.lr_scaling in LR_SCALING, "lr_scaling", f"must be one of {LR_SCALING}")
        _require(
            unset(self.unfreeze_top) or self.unfreeze_top >= -1, "unfreeze_top", "must be >= -1 (-1: all)"
        )
        _require(
            unset(self.schedule) or self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}"
        )
        _require(unset(self.warmup_epochs) or self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        _require(
            unset(self.label_smoothing) or 0.0 <= self.label_smoothing < 1.0,
            "label_smoothing",
            "must be in [0, 1)",
        )
        _require(
            unset(self.batchnorm_momentum) or 0.0 <= self.batchnorm_momentum < 1.0,
            "batchnorm_momentum",
            "must be in [0, 1) (0: the backbone's own)",
        )
        _require(self.monitor in MONITORS, "monitor", f"must be one of {MONITORS}")
        _require(self.early_stopping_patience >= 0, "early_stopping_patience", "must be >= 0")
        _require(
            unset(self.plateau_patience) or self.plateau_patience >= 1, "plateau_patience", "must be >= 1"
        )
        _require(0.0 < self.plateau_factor < 1.0, "plateau_factor", "must be in (0, 1)")
        _require(self.min_lr >= 0, "min_lr", "must be >= 0")
        _require(
            self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"must be one of {MIXED_PRECISION}"
        )
        _require(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _require(self.max_failures >= -1, "max_failures", "must be >= -1 (-1: retry forever)")

    @property
    def monitor_mode(self) -> str:
        return improves(self.monitor)

    @property
    def worker_resources(self) -> dict[str, float]:
        """What each Ray Train worker reserves."""
        return {
            "CPU": self.cpus_per_worker,
            **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {}),
            **self.resources,
        }


@dataclass(frozen=True)
class EnsembleConfig:
    """How members become one calibrated bundle (`skinray ensemble`).

    Args:
        coverage: share of validation images the ensemble answers; the abstention threshold is the
            top probability that keeps this share (below it: "uncertain, refer").
        differential_coverage: share of images whose differential (the set of conditions that
            remain possible) holds the true one: split-conformal sets calibrated on the half of the
            validation split that nothing else is fitted on (docs/bundle-and-scoring.md, "Differential").
        ood_false_refusal: share of in-distribution images the out-of-distribution check may refuse;
            its threshold is set on that same half (docs/bundle-and-scoring.md, "Out of distribution").
        ood_reference_images: training images (a seeded sample, at most this many) whose features
            give the out-of-distribution check its class means and covariance.
        weights: 'fitted' (the members' weights minimise the log-loss on the fitting half) or
            'equal' (their plain average: when the validation split is too small to tell members
            apart, e.g. one is perfect on its few fitting images and would take all the weight).
    """

    coverage: float = 0.9
    differential_coverage: float = 0.9
    ood_false_refusal: float = 0.05
    ood_reference_images: int = 2000
    weights: str = "fitted"

    def __post_init__(self):
        _require(0.0 < self.coverage <= 1.0, "coverage", "must be in (0, 1]")
        _require(0.0 < self.differential_coverage < 1.0, "differential_coverage", "must be in (0, 1)")
        _require(0.0 < self.ood_false_refusal < 1.0, "ood_false_refusal", "must be in (0, 1)")
        _require(self.ood_reference_images >= 1, "ood_reference_images", "must be >= 1")
        _require(self.weights in ("fitted", "equal"), "weights", "must be 'fitted' or 'equal'")


@dataclass(frozen=True)
class EvaluateConfig:
    """Subgroup reports of `skinray evaluate` and the promotion gate of `skinray pipeline`.

    Args:
        by: metadata columns reported per group, comma-separated (e.g. fitzpatrick,site); each
            group's accuracy, macro-F1, ECE, differential coverage and size, abstention and
            out-of-distribution rates, with 95% bootstrap intervals, and the worst-group gap.
        metadata: a CSV or Parquet file with a `path` column (relative to the archive) and any
            columns; empty: the archive's own metadata.csv or metadata.parquet, when it has one.
        max_group_gap: the pipeline does not promote a bundle whose accuracy gap between its best
            and worst group (of a `by` column) has a 95% lower bound above this (0: no gate).
        bootstrap: resamples behind every interval.
    """

    by: str = ""
    metadata: str = ""
    max_group_gap: float = 0.0
    bootstrap: int = 1000

    def __post_init__(self):
        _require(0.0 <= self.max_group_gap < 1.0, "max_group_gap", "must be in [0, 1)")
        _require(self.bootstrap >= 100, "bootstrap", "must be at least 100")
        _require(
            not self.max_group_gap or self.by, "max_group_gap", "needs evaluate.by (the groups to compare)"
        )

    @property
    def columns(self) -> list[str]:
        return [c.strip() for c in self.by.split(",") if c.strip()]


@dataclass(frozen=True)
class MonitorConfig:
    """Drift of served answers from the bundle's validation answers (`skinray monitor`).

    Args:
        max_psi: flag a group whose predicted-class distribution has a population stability index
            above this (0.1: a small shift; 0.25: a large one, by the usual reading).
        max_ks: flag a group whose confidences differ from the validation ones by a
            Kolmogorov-Smirnov statistic above this, at p < 0.01.
        max_abstention_change, max_ood_change: flag a group whose abstention (or out-of-distribution)
            rate is this far, or further, from the validation rate (absolute, 0.1 = 10 points).
        min_rows: groups with fewer answers are reported, never flagged.
    """

    max_psi: float = 0.25
    max_ks: float = 0.2
    max_abstention_change: float = 0.15
    max_ood_change: float = 0.1
    min_rows: int = 100

    def __post_init__(self):
        for key in ("max_psi", "max_ks", "max_abstention_change", "max_ood_change"):
            _require(getattr(self, key) > 0, key, "must be positive")
        _require(self.max_ks < 1, "max_ks", "must be below 1")
        _require(self.min_rows >= 1, "min_rows", "must be >= 1")


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking in MLflow (`pip install 'skinray[mlflow]'`; docs/operating.md).

    Args:
        uri: the MLflow tracking URI (e.g. sqlite:///mlflow.db, or http://mlflow:5000); empty:
            MLFLOW_TRACKING_URI when set, else no tracking. Never stored with its credentials.
        experiment: the MLflow experiment the runs go into.
    """

    uri: str = ""
    experiment: str = "skinray"

    def __post_init__(self):
        _require(bool(self.experiment), "experiment", "must not be empty")


@dataclass(frozen=True)
class ScoreConfig:
    """Bulk scoring on Ray Data (`skinray score`, and the predictions of `evaluate` and `ensemble`).

    Args:
        min_actors, max_actors: the autoscaling pool of model actors (each holds every member).
        cpus_per_actor, gpus_per_actor: what each model actor reserves.
        resources: custom Ray resources each model actor reserves (which nodes score).
        batch_size: images per model call.
        top_k: classes listed per image in the output's `top_k` column.
        rows_per_file: input files per listing part: the unit of progress a killed job keeps.
        expect_version: refuse a bundle of any other version (its whole version, or the first 12
            or more characters of it); empty: any. Used by score, evaluate and explain.
        precision: float32, bfloat16, or auto (bfloat16 where the device executes it natively:
            a CPU with avx512_bf16 or amx_bf16, a GPU of compute capability 8.0+). Logits stay
            float32; `skinray evaluate --precision bfloat16` measures the agreement.
    """

    min_actors: int = 1
    max_actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    resources: dict[str, float] = _resources()
    batch_size: int = 32
    top_k: int = 3
    rows_per_file: int = 256
    expect_version: str = ""
    precision: str = "float32"

    def __post_init__(self):
        _require(self.min_actors >= 1, "min_actors", "must be >= 1")
        _require(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        _require(self.max_actors >= self.min_actors, "max_actors", "must be >= min_actors")
        _require(self.cpus_per_actor >= 0, "cpus_per_actor", "must be >= 0")
        _require(self.gpus_per_actor >= 0, "gpus_per_actor", "must be >= 0")
        _require_resources(self.resources, "resources")
        _require(
            self.cpus_per_actor > 0 or self.gpus_per_actor > 0,
            "cpus_per_actor",
            "an actor must reserve a CPU or a GPU",
        )
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.top_k >= 1, "top_k", "must be >= 1")
        _require(self.rows_per_file >= 1, "rows_per_file", "must be >= 1")

    @property
    def actor_options(self) -> dict[str, Any]:
        """Ray options of each model actor (scoring, and the tune stage's embedding actors)."""
        return ray_options(self.cpus_per_actor, self.gpus_per_actor, self.resources)


TUNE_MODES = ("cached", "full")
LOG_RANGES = ("head_lr", "l2")  # searched log-uniformly; the other ranges uniformly


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune's search over the classification head (`skinray tune`).

    The search space: `head_units` and `batch_size` are lists of choices; the other searched
    settings are [low, high] ranges, log-uniform for `head_lr` and `l2`, uniform otherwise. Each
    searched value lands on the same key `skinray train` reads (model.head_units, model.dropout,
    model.head_dropout, model.l2, train.head_lr, train.label_smoothing, train.batch_size).

    Args:
        mode: 'cached' (heads train on embeddings computed once) or 'full' (each trial is a Ray
            Train run of the head phase).
        trials: configurations sampled from the space.
        max_concurrent: trials running at once (0: as many as the cluster's CPUs allow).
        cpus_per_trial: CPUs each cached trial reserves; a trial runs TensorFlow on one thread.
        seed: seeds the sampling of configurations.
        views: augmented views of each training image embedded in cached mode (one per epoch, in turn).
        metric: the validation metric ASHA and the ranking follow (as `train.monitor`).
        grace_period: epochs every trial runs before ASHA may stop it.
        reduction_factor: ASHA keeps 1 / reduction_factor of the trials at each rung.
        max_epochs: epochs of a trial that is never stopped.
        embed_batch_size: images per call of the frozen backbone in the embedding job.
        head_units, batch_size: the choices searched for model.head_units and train.batch_size.
        dropout, head_dropout, label_smoothing: [low, high], searched uniformly (model.dropout,
            model.head_dropout, train.label_smoothing).
        head_lr, l2: [low, high], searched log-uniformly (train.head_lr, model.l2).
    """

    mode: str = "cached"
    trials: int = 16
    max_concurrent: int = 0
    cpus_per_trial: float = 1.0
    seed: int = 0
    views: int = 4
    metric: str = "val_macro_f1"
    grace_period: int = 2
    reduction_factor: int = 3
    max_epochs: int = 12
    embed_batch_size: int = 32
    head_units: tuple[int, ...] = (64, 128, 256, 512)
    batch_size: tuple[int, ...] = (16, 32, 64)
    dropout: tuple[float, ...] = (0.0, 0.5)
    head_dropout: tuple[float, ...] = (0.0, 0.5)
    head_lr: tuple[float, ...] = (1e-4, 1e-2)
    l2: tuple[float, ...] = (1e-6, 1e-3)
    label_smoothing: tuple[float, ...] = (0.0, 0.2)

    def __post_init__(self):
        _require(self.mode in TUNE_MODES, "mode", f"must be one of {TUNE_MODES}")
        _require(self.trials >= 1, "trials", "must be >= 1")
        _require(self.max_concurrent >= 0, "max_concurrent", "must be >= 0 (0: as the CPUs allow)")
        _require(self.cpus_per_trial > 0, "cpus_per_trial", "must be positive")
        _require(self.views >= 1, "views", "must be >= 1")
        _require(self.metric in MONITORS, "metric", f"must be one of {MONITORS}")
        _require(self.max_epochs >= 1, "max_epochs", "must be >= 1")
        _require(1 <= self.grace_period <= self.max_epochs, "grace_period", "must be in [1, max_epochs]")
        _require(self.reduction_factor >= 2, "reduction_factor", "must be >= 2")
        _require(self.embed_batch_size >= 1, "embed_batch_size", "must be >= 1")
        for name in ("head_units", "batch_size"):
            values = getattr(self, name)
            _require(
                len(values) >= 1 and all(v >= 1 for v in values),
                name,
                "must be a non-empty list of positive choices",
            )
        for name in ("dropout", "head_dropout", "head_lr", "l2", "label_smoothing"):
            low_high = getattr(self, name)
            _require(
                len(low_high) == 2 and low_high[0] < low_high[1],
                name,
                "must be a range [low, high] with low < high",
            )
            _require(
                low_high[0] >= 0 and (name not in LOG_RANGES or low_high[0] > 0),
                name,
                "must be positive" if name in LOG_RANGES else "must be >= 0",
            )
        for name in ("dropout", "head_dropout", "label_smoothing"):
            _require(getattr(self, name)[1] < 1.0, name, "must stay below 1")

    @property
    def metric_mode(self) -> str:
        return improves(self.metric)


SERVE_LAYOUTS = ("together", "per_member")
PRECISIONS = ("float32", "bfloat16", "auto")  # skinray.precision
# An idle ingress replica's memory (a Ray worker with FastAPI and skinray's serving code loaded, no
# TensorFlow: about 300 MB measured), with room for request bodies in flight.
INGRESS_BASE_MB = 450


@dataclass(frozen=True)
class ServeConfig:
    """The online endpoint (`skinray serve`): Ray Serve deployments, batching, limits and keys.

    Args:
        host, port: where Serve's HTTP proxy listens (127.0.0.1: this machine only).
        layout: `together` (one model deployment holds every member) or `per_member` (one
            deployment per member, composed by the ingress); docs/serving.md.
        min_replicas, max_replicas, target_ongoing_requests: autoscaling of each model deployment.
        upscale_delay_s, downscale_delay_s: how long the load must last before it scales.
        max_ongoing_requests, max_queued_requests: per model replica, and the callers' queue
            beyond which requests get a 503 at once.
        cpus_per_replica, gpus_per_replica: what each model replica reserves.
        resources: custom Ray resources each model replica reserves (which nodes serve).
        ingress_replicas, ingress_cpus, ingress_max_ongoing_requests: the HTTP ingress (decoding
            happens there); its queue holds as many again (the model queues are the limit that bites).
        ingress_memory_mb: memory each ingress replica reserves from Ray. The images it decodes at
            once are as many as fit in it beside the replica itself (`decode_slots`): a decode holds
            up to 20 bytes per pixel the header claims (an RGBA WebP; a JPEG well under 1).
        max_pixels: images whose header claims more pixels are refused (400) before decoding; its
            own limit, lower than training's `data.max_pixels`, since a 50 KB PNG can claim 25 MP.
        max_batch_size, batch_wait_s: dynamic batching (`@serve.batch`); 1 turns it off.
        max_request_mb: request bodies above this get 413 before they are read whole.
        max_images: images one batch request may carry.
        top_k: classes listed in each answer.
        api_keys_file: a file of API keys, one per line, each at least 32 characters; the env var
            SKINRAY_API_KEYS (comma separated) adds more. A file without a key is refused.
        allow_unauthenticated: serve a host other machines reach without any API key (behind a
            gateway that authenticates); without it, that is refused. On 127.0.0.1 no key is needed.
        allow_unpromoted: serve a bundle `skinray pipeline` did not promote (its evaluation failed
            the subgroup gate, `evaluate.max_group_gap`); without it, that is refused.
        docs: serve /docs, /redoc and /openapi.json (Swagger's page loads scripts from a CDN).
        request_timeout_s: Serve's proxy answers 408 to a request not answered in this time, from its
            first byte: a slow upload cannot hold a connection and an ingress slot for longer.
        keep_alive_timeout_s: how long the proxy keeps an idle client connection open.
        max_drain_mb: a body over max_request_mb is read and discarded up to this size before
            the 413 (so that clients which send everything before reading, like Python's urllib,
            see the 413); past it, the connection is closed with the 413.
        expect_version: refuse to serve a bundle of any other version (its whole version, or the
            first 12 or more characters of it); empty: any.
        canary: a second bundle (or run) that answers `canary_percent` of the requests, in the same
            application; each answer names the version that computed it. Empty: none.
        canary_percent: the canary's share of requests (0 to 100): sticky per client (the same
            X-Request-Id, else the same API key, gets the same version), random without either. A
            canary that cannot answer falls back to the stable version (counted in a metric).
        shadow: a bundle (or run) that scores a copy of the requests after they are answered: its
            answers go to the prediction log and the agreement metric, never to the client.
        shadow_percent: the share of requests copied to the shadow (0 to 100).
        prediction_log: a folder or object-store URI the ingress writes one Parquet row per answered
            image into (time, request id, version, label, confidence, abstention, differential size,
            OOD score, latency, input size), off the request path; empty: no log. `skinray monitor`
            reads it.
        prediction_log_sample: the share of requests logged (0 to 1).
        prediction_log_images: also log each image's bytes (off by default: logs then hold photos).
        prediction_log_rows, prediction_log_minutes: a replica starts a new log file after this many
            rows or minutes, whichever comes first.
        precision: the model replicas' precision, as `score.precision` (auto: each replica's device).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    layout: str = "together"
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    max_ongoing_requests: int = 32
    max_queued_requests: int = 128
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    resources: dict[str, float] = _resources()
    ingress_replicas: int = 1
    ingress_cpus: float = 0.5
    ingress_max_ongoing_requests: int = 128
    ingress_memory_mb: float = 2048.0
    max_pixels: int = 25_000_000
    max_batch_size: int = 16
    batch_wait_s: float = 0.05
    max_request_mb: float = 20.0
    max_images: int = 32
    top_k: int = 3
    api_keys_file: str = ""
    allow_unauthenticated: bool = False
    allow_unpromoted: bool = False
    docs: bool = False
    request_timeout_s: float = 60.0
    max_drain_mb: float = 100.0
    keep_alive_timeout_s: float = 15.0
    expect_version: str = ""
    canary: str = ""
    canary_percent: float = 0.0
    shadow: str = ""
    shadow_percent: float = 100.0
    prediction_log: str = ""
    prediction_log_sample: float = 1.0
    prediction_log_images: bool = False
    prediction_log_rows: int = 10_000
    prediction_log_minutes: float = 5.0
    precision: str = "float32"

    def __post_init__(self):
        _require(bool(self.host), "host", "must not be empty")
        _require(0 <= self.port < 65536, "port", "must be in [0, 65535]")
        _require(self.layout in SERVE_LAYOUTS, "layout", f"must be one of {', '.join(SERVE_LAYOUTS)}")
        _require(self.min_replicas >= 1, "min_replicas", "must be >= 1")
        _require(self.max_replicas >= self.min_replicas, "max_replicas", "must be >= min_replicas")
        _require(self.target_ongoing_requests > 0, "target_ongoing_requests", "must be positive")
        _require(self.upscale_delay_s >= 0, "upscale_delay_s", "must be >= 0")
        _require(self.downscale_delay_s >= 0, "downscale_delay_s", "must be >= 0")
        _require(self.max_ongoing_requests >= 1, "max_ongoing_requests", "must be >= 1")
        _require(
            self.max_queued_requests >= 1,
            "max_queued_requests",
            "must be >= 1 (unlimited queues hide overload)",
        )
        _require(self.cpus_per_replica >= 0, "cpus_per_replica", "must be >= 0")
        _require(self.gpus_per_replica >= 0, "gpus_per_replica", "must be >= 0")
        _require(
            self.cpus_per_replica > 0 or self.gpus_per_replica > 0,
            "cpus_per_replica",
            "a replica must reserve a CPU or a GPU",
        )
        _require_resources(self.resources, "resources")
        _require(self.ingress_replicas >= 1, "ingress_replicas", "must be >= 1")
        _require(self.ingress_cpus > 0, "ingress_cpus", "must be positive")
        _require(self.ingress_max_ongoing_requests >= 1, "ingress_max_ongoing_requests", "must be >= 1")
        _require(self.max_pixels > 0, "max_pixels", "must be positive")
        one_decode = INGRESS_BASE_MB + _decode_mb(self.max_pixels)
        _require(
            self.ingress_memory_mb >= one_decode,
            "ingress_memory_mb",
            f"must hold the ingress ({INGRESS_BASE_MB} MB) and one decode of serve.max_pixels "
            f"({_decode_mb(self.max_pixels):.0f} MB): at least {one_decode:.0f}",
        )
        _require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        _require(self.batch_wait_s >= 0, "batch_wait_s", "must be >= 0")
        _require(self.max_request_mb > 0, "max_request_mb", "must be positive")
        _require(self.max_images >= 1, "max_images", "must be >= 1")
        _require(self.top_k >= 1, "top_k", "must be >= 1")
        _require(self.request_timeout_s > 0, "request_timeout_s", "must be positive")
        _require(self.keep_alive_timeout_s >= 0, "keep_alive_timeout_s", "must be >= 0")
        _require(self.max_drain_mb >= 0, "max_drain_mb", "must be >= 0")
        _require(0.0 <= self.canary_percent <= 100.0, "canary_percent", "must be in [0, 100]")
        _require(
            not self.canary_percent or self.canary, "canary_percent", "needs serve.canary (--canary BUNDLE)"
        )
        _require(0.0 <= self.shadow_percent <= 100.0, "shadow_percent", "must be in [0, 100]")
        _require(0.0 <= self.prediction_log_sample <= 1.0, "prediction_log_sample", "must be in [0, 1]")
        _require(self.prediction_log_rows >= 1, "prediction_log_rows", "must be >= 1")
        _require(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        _require(self.prediction_log_minutes > 0, "prediction_log_minutes", "must be positive")

    @property
    def decode_slots(self) -> int:
        """How many images one ingress replica decodes at once: as many as fit in its memory."""
        return int((self.ingress_memory_mb - INGRESS_BASE_MB) // _decode_mb(self.max_pixels))

    @property
    def ingress_options(self) -> dict[str, Any]:
        """Ray actor options of each ingress replica: its CPUs and the memory its decodes are sized to."""
        return ray_options(self.ingress_cpus, memory_mb=self.ingress_memory_mb)

    @property
    def http_options(self) -> dict[str, Any]:
        """Serve's HTTP proxy: where it listens, and how long a request and an idle connection may last."""
        return {
            "host": self.host,
            "port": self.port,
            "request_timeout_s": self.request_timeout_s,
            "keep_alive_timeout_s": int(self.keep_alive_timeout_s),
        }

    @property
    def replica_options(self) -> dict[str, Any]:
        """Ray actor options of each model replica."""
        return ray_options(self.cpus_per_replica, self.gpus_per_replica, self.resources)


def _decode_mb(pixels: int) -> float:
    from skinray.data.decode import PEAK_BYTES_PER_PIXEL

    return pixels * PEAK_BYTES_PER_PIXEL / 2**20


@dataclass(frozen=True)
class Config:
    """Everything a run needs, one section per concern."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        model, train = resolve_recipe(self.model, self.train)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "train", train)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


# === Recipes: the defaults that follow the weights ===

# Measured with benchmarks/quality.py (scratch) and the seed notebook (transfer); docs/training.md, "Recipes".
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "transfer": {
        "model": {"dropout": 0.3, "head_dropout": 0.3, "zero_init_residual": False},
        "train": {
            "head_epochs": 3,
            "finetune_lr": 1e-4,
            "unfreeze_top": 30,
            "schedule": "plateau",
            "warmup_epochs": 0,
            "label_smoothing": 0.1,
            "plateau_patience": 2,
            "batchnorm_momentum": 0.0,
        },
    },
    "scratch": {
        "model": {"dropout": 0.0, "head_dropout": 0.2, "zero_init_residual": True},
        "train": {
            "head_epochs": 0,
            "finetune_lr": 1e-3,
            "unfreeze_top": -1,
            "schedule": "cosine",
            "warmup_epochs": 2,
            "label_smoothing": 0.0,
            "plateau_patience": 4,
            "batchnorm_momentum": 0.9,
        },
    },
}


def recipe_for(weights: str, recipe: str = "auto") -> str:
    """'scratch' for `weights: none` and 'transfer' otherwise, unless a recipe is named."""
    if recipe != "auto":
        return recipe
    return "scratch" if weights == "none" else "transfer"


def resolve_recipe(model: ModelConfig, train: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """Fills the settings left unset with the recipe's values; the train section names the recipe.

    A recipe's epoch counts are capped to fit the run (3 head epochs in a 2-epoch run become 2).
    """
    name = recipe_for(model.weights, train.recipe)
    defaults = RECIPES[name]
    caps = {"head_epochs": train.epochs, "warmup_epochs": train.epochs - 1}
    model_values = {k: v for k, v in defaults["model"].items() if getattr(model, k) is None}
    train_values = {
        k: min(v, caps[k]) if k in caps else v
        for k, v in defaults["train"].items()
        if getattr(train, k) is None
    }
    return (
        _replace_section(model, "model", model_values),
        _replace_section(train, "train", {"recipe": name, **train_values}),
    )


def _replace_section(section: Any, prefix: str, values: dict[str, Any]) -> Any:
    try:
        return dataclasses.replace(section, **values)
    except ConfigError as err:
        raise ConfigError(f"{prefix}.{err.key}", str(err).split(": ", 1)[1]) from None


# === Loading ===


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: str | Path | None = None,
) -> Config:
    """Builds a `Config` from defaults, then a `base` YAML file, then a YAML file, then `key.sub=value`
    overrides (each key the last one sets wins).

    Example:
        >>> load_config(overrides=["data.val_fraction=0.1"]).data.val_fraction
        0.1
    """
    raw: dict[str, Any] = {}
    for file in (base, path):
        if file is None:
            continue
        loaded = yaml.safe_load(Path(file).read_text()) or {}
        if not isinstance(loaded, dict) or not all(isinstance(v, dict) or v is None for v in loaded.values()):
            raise ConfigError("<root>", f"{file} must hold a mapping of sections")
        for section, values in loaded.items():
            raw.setdefault(section, {}).update(values or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, "an override must look like section.key=value")
        if key.strip() in RETIRED_KEYS:
            raise ConfigError(
                key.strip(), "no longer a setting: fault injection is SKINRAY_KILL_WORKER=RANK:STEP"
            )
        _set_dotted(raw, key.strip().split("."), yaml.safe_load(value) if value != "" else "")
    return from_dict(Config, raw)


def load_config_text(text: str) -> Config:
    """A config from YAML text (a saved config.yaml read from any filesystem)."""
    loaded = yaml.safe_load(text) or {}
    if not isinstance(loaded, dict):
        raise ConfigError("<root>", "a config must hold a mapping of sections")
    return from_dict(Config, loaded)


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parts), f"'{part}' is not a section")
        tree = node
    tree[parts[-1]] = value


# Keys that configs written by earlier versions hold and this one no longer has: read and ignored,
# so that older runs and bundles still load. (Fault injection is SKINRAY_KILL_WORKER now.)
RETIRED_KEYS = frozenset({"train.kill_rank", "train.kill_at_step"})


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from a plain mapping, checking keys and types recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    raw = {k: v for k, v in raw.items() if f"{prefix}{k}" not in RETIRED_KEYS}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}", f"unknown key (known: {', '.join(names)})")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}")
    try:
        return cls(**values)
    except ConfigError as err:
        if prefix and not err.key.startswith(prefix):
            raise ConfigError(f"{prefix}{err.key}", str(err).split(": ", 1)[1]) from None
        raise


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, f"{key}.")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            return None
        hint = options[0]
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 2e-3 and 1E5 as strings
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, float, str, bool):
        if isinstance(value, bool) and hint is not bool or not isinstance(value, hint):
            raise ConfigError(key, f"expected {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {hint}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# === Describing keys: what the CLI's flags and the configuration reference show ===


@dataclass(frozen=True)
class KeyInfo:
    """One config key: its Python type, its default, the help its section's docstring gives it."""

    key: str
    type: type
    default: Any
    help: str


def describe_key(key: str) -> KeyInfo:
    """`describe_key("train.epochs")` -> its type, default and help (from the section's `Args:`)."""
    section_name, _, name = key.partition(".")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section_name not in sections or "." in name:
        raise ConfigError(key, "not a config key of the form section.key")
    section = sections[section_name].default_factory
    fields = {f.name: f for f in dataclasses.fields(section)}
    if name not in fields:
        raise ConfigError(key, f"unknown key (known: {', '.join(fields)})")
    hint = typing.get_type_hints(section)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    return KeyInfo(key, hint, getattr(section(), name), _docstring_help(section).get(name, ""))


def _docstring_help(section: type) -> dict[str, str]:
    """`Args:` entries of a section's docstring, by key; `a, b: text` gives both keys the text."""
    helps, current = {}, []
    lines = (section.__doc__ or "").split("Args:", 1)[-1].splitlines()
    for line in lines:
        stripped = line.strip()
        head, colon, text = stripped.partition(": ")
        names = [n.strip() for n in head.split(",")]
        if (
            colon
            and all(n.isidentifier() for n in names)
            and line.startswith(" " * 8)
            and not line.startswith(" " * 12)
        ):
            current = names
            for n in names:
                helps[n] = text
        elif stripped and current:
            for n in current:
                helps[n] += " " + stripped
    return helps


# === Writing ===


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain YAML-safe data: sections as mappings, lists as lists."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, directory: str | Path, name: str = "config.yaml") -> Path:
    """Writes the resolved config next to a run's outputs; `load_config` reads it back unchanged
    (but for credentials in the archive's URI, which are never stored: see `redacted`)."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(redacted(cfg)), sort_keys=False))
    return path


def redacted(cfg: Config) -> Config:
    """The config as it may be stored and shown: the archive's and the tracking URI without
    credentials."""
    from skinray.storage import redact

    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, archive=redact(cfg.data.archive)),
        tracking=dataclasses.replace(cfg.tracking, uri=redact(cfg.tracking.uri)),
    )
