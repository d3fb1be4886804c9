"""What runs inside each Ray Train worker: the epochs of a recipe (transfer: two phases; scratch: one).

The step itself is in `step.py`, the early-stopping and plateau decisions in `monitor.py`, the
TensorBoard writer in `tensorboard.py`. Each worker streams its own equal shard of the training set
(skinray.data.ingest), so every worker takes the same number of steps; validation metrics are
all-reduced so that every worker makes the same early-stopping and learning-rate decisions. Every
epoch ends with a checkpoint reported together with its metrics (Train V2 keeps only those), and a
restarted worker group resumes from the latest one.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from skinray import rundir
from skinray.config import Config
from skinray.console import tagged
from skinray.data.ingest import (
    FailureLog,
    ImageSource,
    epochs_of_rows,
    iter_stream,
    shard,
    steps_per_epoch,
    stream,
)
from skinray.metrics import confusion_metrics
from skinray.storage import join_uri, kind, write_text
from skinray.train.monitor import Monitor, checkpoint_score
from skinray.train.schedule import scaled_learning_rate, scheduled_learning_rate
from skinray.train.step import make_train_step
from skinray.train.tensorboard import TensorBoard

# Through Ray Train's own logging: a print() in a worker is teed and shows up twice on the driver.
logger = logging.getLogger("skinray.train")
logger.setLevel(logging.INFO)


@dataclass
class LoopInputs:
    """Everything the driver hands each worker (pickled once per worker)."""

    cfg: Config
    train_rows: pa.Table
    val_rows: pa.Table
    classes: list[str]
    class_weights: list[float]
    source: ImageSource
    run_uri: str
    verbose: bool = False  # the driver's --verbose: Ray's INFO logs on the console
    kill: tuple[int, int] | None = None  # fault injection: (rank, global step), from SKINRAY_KILL_WORKER


@dataclass
class LoopState:
    """Where a run is: saved as state.json in every checkpoint."""

    epoch: int = -1  # last completed epoch
    phase: str = "head"
    phase_start: int = 0  # first epoch of the current phase
    learning_rate: float = 0.0
    finished: bool = False
    monitor: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    events: list = field(default_factory=list)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train entry point: `config["inputs"]` is a `LoopInputs`."""
    from skinray.console import load_tensorflow, quiet_process, set_verbose

    inputs = config["inputs"]
    set_verbose(inputs.verbose)
    quiet_process()  # before TensorFlow loads in this worker
    load_tensorflow(expect_gpu=inputs.cfg.train.gpus_per_worker > 0)
    WorkerLoop(inputs).run()


class WorkerLoop:
    def __init__(self, inputs: LoopInputs):
        import ray.train

        self.inputs, self.cfg = inputs, inputs.cfg
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.batch = self.cfg.train.batch_size
        self.global_batch = self.batch * self.world
        self.steps = steps_per_epoch(inputs.train_rows.num_rows, self.world, self.batch)
        self.num_classes = len(inputs.classes)
        self.best_weights = None  # the weights of the best epoch so far (early stopping restores them)
        self.saved_optimizer = None  # optimizer state from a checkpoint, applied by the next phase
        # One stream per worker: Ray's per-operator progress bars from every worker would interleave.
        import ray.data
        from ray.util.debug import log_once

        from skinray.console import quiet_process

        ray.data.DataContext.get_current().enable_progress_bars = False
        log_once("ray_data_progress_manager_disabled")  # the choice is ours: no "bars disabled" warning
        quiet_process()  # Ray Data's console handler exists now

    # === Setup ===

    def run(self) -> None:
        self._setup_tensorflow()
        self._build()
        state = self._restore()
        if state.finished or state.epoch + 1 >= self.cfg.train.epochs:
            self._log(f"run already complete at epoch {state.epoch + 1}; nothing to do")
            return
        self._train(state)

    def _setup_tensorflow(self) -> None:
        import keras
        import tensorflow as tf

        if self.cfg.train.memory_growth:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
        keras.config.set_dtype_policy(
            "float32" if self.cfg.train.mixed_precision == "none" else self.cfg.train.mixed_precision
        )
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
        self.local_replicas = len(self.strategy.extended.worker_devices)
        if self.batch % self.local_replicas:
            raise ValueError(
                f"train.batch_size {self.batch} must divide over {self.local_replicas} local GPUs"
            )

    def _build(self) -> None:
        import keras

        from skinray.models import create_classifier
        from skinray.models.backbones import get_backbone, input_size

        # The driver checked the model; create_classifier resolves the weights (once: opening a
        # bundle given as --weights verifies its files).
        self.spec = get_backbone(self.cfg.model.backbone)
        self.size = input_size(self.spec, self.cfg.model.image_size)
        self.pretrained = self.cfg.model.weights.lower() != "none"
        seed = self.cfg.data.seed
        with self.strategy.scope():  # the chief's initial values are broadcast to every worker
            self.model = create_classifier(self.cfg.model, self.num_classes, seed=seed)
        # Dropout's draws: seeded, and different on each worker (each sees different images).
        keras.utils.set_random_seed(int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0]))
        if self.cfg.train.batchnorm_momentum:
            for layer in _all_layers(self.model):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.momentum = self.cfg.train.batchnorm_momentum
        self.all_sum = self._make_all_sum()

    def _restore(self) -> LoopState:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        state = LoopState()
        if checkpoint is None:
            return state
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            state = LoopState(**rundir.read_state(folder))
            self.model.load_weights(folder / rundir.MODEL)
            self.best_weights = self._load_best(folder)
            self.saved_optimizer = dict(np.load(folder / rundir.OPTIMIZER))
        state.events.append({"event": "resumed", "from_epoch": state.epoch, "time": time.time()})
        self._log(
            f"resumed from the checkpoint of epoch {state.epoch + 1} ({self._phase_label(state.phase)} phase)"
        )
        return state

    def _load_best(self, folder: Path):
        """The best epoch's weights: a checkpoint without best.weights.h5 is the best epoch itself."""
        if not (folder / rundir.BEST_WEIGHTS).exists():
            return self.model.get_weights()
        current = self.model.get_weights()
        self.model.load_weights(folder / rundir.BEST_WEIGHTS)
        best = self.model.get_weights()
        self.model.set_weights(current)
        return best

    # === Phases ===

    def _start_phase(self, phase: str, learning_rate: float | None) -> float:
        """Freezes or unfreezes, builds the phase's optimizer and traces its train step."""
        import keras

        from skinray.models.classifier import freeze_backbone, unfreeze_top

        train = self.cfg.train
        if phase == "head":
            freeze_backbone(self.model)
        else:
            count = unfreeze_top(self.model, train.unfreeze_top, keep_batchnorm_frozen=self.pretrained)
            self._log(
                f"every layer trains ({count} backbone layers, BatchNormalization included)"
                if train.unfreeze_top < 0 and not self.pretrained
                else f"fine-tuning: top {count} backbone layers unfrozen"
            )
        if learning_rate is None:
            learning_rate = self._base_lr(phase)
        with self.strategy.scope():
            optimizer = keras.optimizers.Adam(learning_rate)
            if train.mixed_precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(self.model.trainable_variables)
        saved = self.saved_optimizer
        if saved is not None and len(saved) == len(optimizer.variables):
            for i, variable in enumerate(optimizer.variables):
                variable.assign(saved[f"v{i}"])
        self.saved_optimizer = None
        self.optimizer = optimizer
        self.train_step = make_train_step(
            self.strategy,
            self.model,
            optimizer,
            self.inputs.class_weights,
            train.label_smoothing,
            self.global_batch,
            train.xla,
        )
        return learning_rate

    def _base_lr(self, phase: str) -> float:
        train = self.cfg.train
        return scaled_learning_rate(
            train.head_lr if phase == "head" else train.finetune_lr,
            self.global_batch,
            train.base_batch,
            train.lr_scaling,
        )

    def _scheduled_lr(self, state: LoopState, epoch: int, lr: float) -> float:
        """The epoch's rate under `train.schedule`, applied to the optimizer."""
        train = self.cfg.train
        end = train.head_epochs if state.phase == "head" else train.epochs
        scheduled = scheduled_learning_rate(
            self._base_lr(state.phase),
            epoch,
            state.phase_start,
            end,
            train.warmup_epochs,
            train.min_lr,
            train.schedule,
        )
        if scheduled is not None and scheduled != lr:
            lr = scheduled
            self.optimizer.learning_rate = lr
        return lr

    # === The distributed step's helpers ===

    def _distribute(self, *arrays):
        """Splits a worker's batch over its local replicas (one, unless a worker has several GPUs)."""
        if self.local_replicas == 1:
            return arrays
        n = len(arrays[0]) // self.local_replicas

        def part(ctx):
            i = ctx.replica_id_in_sync_group % self.local_replicas
            return tuple(a[i * n : (i + 1) * n] for a in arrays)

        return self.strategy.experimental_distribute_values_from_function(part)

    def _make_all_sum(self):
        """Sums a float vector over all workers (every worker must call it, once per epoch)."""
        import tensorflow as tf

        strategy, local = self.strategy, self.local_replicas

        @tf.function
        def all_sum(vector):
            # tf.identity places the value on the replica's device; all_reduce needs one.
            summed = strategy.run(
                lambda v: tf.distribute.get_replica_context().all_reduce("SUM", tf.identity(v)),
                args=(vector,),
            )
            return strategy.experimental_local_results(summed)[0]

        # Each local replica contributes the worker's vector once: divide by their number.
        return lambda array: all_sum(tf.constant(array, tf.float64)).numpy() / local

    # === Epochs ===

    def _train(self, state: LoopState) -> None:
        train = self.cfg.train
        monitor = (
            Monitor(**state.monitor)
            if state.monitor
            else Monitor(
                mode=train.monitor_mode,
                patience=train.early_stopping_patience,
                plateau_patience=train.plateau_patience,
            )
        )
        start = state.epoch + 1
        learning_rate = state.learning_rate or None  # resuming mid-phase keeps the phase's rate
        if state.phase == "head" and start >= train.head_epochs:
            state.phase, state.phase_start, learning_rate = (
                "finetune",
                start,
                None,
            )  # a new phase, its own rate
            self.saved_optimizer = None
        lr = self._start_phase(state.phase, learning_rate)
        rows = epochs_of_rows(
            self.inputs.train_rows,
            rank=self.rank,
            world=self.world,
            batch_size=self.batch,
            seed=self.cfg.data.seed,
            epochs=range(start, train.epochs),
        )
        batches = iter(
            iter_stream(
                stream(
                    rows,
                    source=self.inputs.source,
                    size=self.size,
                    batch_size=self.batch,
                    augment=self.cfg.augment,
                    seed=self.cfg.data.seed,
                    task_options=self.cfg.data.task_options,
                ),
                self.batch,
            )
        )
        writer = TensorBoard(self.inputs.run_uri) if self.rank == 0 else None
        try:
            for epoch in range(start, train.epochs):
                if state.phase == "head" and epoch >= train.head_epochs:
                    state.phase, state.phase_start, lr = (
                        "finetune",
                        epoch,
                        self._start_phase("finetune", None),
                    )
                    monitor.new_phase()
                lr = self._scheduled_lr(state, epoch, lr)
                started = time.perf_counter()
                metrics = self._train_epoch(batches, epoch)
                metrics["images_per_second"] = (
                    self.steps * self.global_batch / (time.perf_counter() - started)
                )
                metrics |= self._validate() | {
                    "epoch": epoch + 1,
                    "phase": self._phase_label(state.phase),
                    "learning_rate": lr,
                }
                lr = self._after_epoch(state, monitor, metrics, epoch, lr)
                self._report(state, metrics, monitor)
                if writer:
                    writer.write(metrics)
                if state.finished:
                    break
        finally:  # its local folder goes when the run ends, however it ends
            if writer:
                writer.close()

    def _after_epoch(self, state: LoopState, monitor: Monitor, metrics: dict, epoch: int, lr: float) -> float:
        """Records the epoch and takes the monitor's decisions; returns the next learning rate.

        Under the plateau schedule, a plateau multiplies the rate by `plateau_factor` (the cosine
        schedule sets the rate itself); an early stop in the head phase
        restores that phase's best weights and starts fine-tuning, in the fine-tuning phase it
        ends the run.
        """
        train = self.cfg.train
        improved, reduce_lr, stop = monitor.update(metrics[train.monitor], epoch)
        metrics["checkpoint_score"] = checkpoint_score(metrics[train.monitor], epoch, monitor.mode)
        if improved:
            self.best_weights = self.model.get_weights()
        state.epoch = epoch
        state.history.append(metrics)
        if reduce_lr and train.schedule == "plateau" and lr > train.min_lr:
            lr = max(lr * train.plateau_factor, train.min_lr)
            self.optimizer.learning_rate = lr
            state.events.append({"event": "reduce_lr", "epoch": epoch + 1, "learning_rate": lr})
        if stop:
            state.events.append({"event": "early_stop", "epoch": epoch + 1, "phase": state.phase})
            if state.phase == "head" and epoch + 1 < train.epochs:
                self.model.set_weights(self.best_weights)
                state.phase, state.phase_start = "finetune", epoch + 1
                lr = self._start_phase("finetune", None)
                monitor.new_phase()
            else:
                state.finished = True
        state.finished = state.finished or epoch + 1 == train.epochs
        state.learning_rate, state.monitor = lr, asdict(monitor)
        return lr

    def _train_epoch(self, batches, epoch: int) -> dict:
        confusion = np.zeros((self.num_classes, self.num_classes))
        loss_sum, failures = 0.0, FailureLog()
        for step in range(self.steps):
            self._maybe_inject_fault(epoch * self.steps + step)
            batch = next(batches)
            failures.add(batch)
            valid = batch["ok"].astype(np.float32)
            loss, predictions = self.train_step(
                *self._distribute(batch["image"], batch["label_index"], valid)
            )
            loss_sum += float(loss)
            predicted = np.concatenate(
                [np.asarray(p) for p in self.strategy.experimental_local_results(predictions)]
            )
            np.add.at(confusion, (batch["label_index"][batch["ok"]], predicted[batch["ok"]]), 1)
        matrix, (failed,) = self._all_sum_confusion(confusion, failures.count)
        self._average_batchnorm_statistics()
        scores = confusion_metrics(matrix)
        if failures.count:
            self._log(
                f"rank {self.rank}: {failures.summary()}: "
                + "; ".join(f"{p}: {r}" for p, r in list(failures.files.items())[:5])
            )
        return {
            "train_loss": loss_sum / max(self.steps, 1),
            "train_accuracy": scores["accuracy"],
            "train_macro_f1": scores["macro_f1"],
            "failed_files": int(failed),
        }

    def _all_sum_confusion(self, confusion: np.ndarray, *extras: float) -> tuple[np.ndarray, np.ndarray]:
        """Sums a confusion matrix and a few scalars over all workers, in one all-reduce."""
        totals = self.all_sum(np.concatenate([confusion.ravel(), extras]))
        k2 = confusion.size
        return totals[:k2].reshape(confusion.shape), totals[k2:]

    def _average_batchnorm_statistics(self) -> None:
        """Averages BatchNormalization's moving mean and variance over the workers, once an epoch.

        Keras keeps them per worker (each sees only its shard), so without this every worker would
        validate with different statistics and the checkpoint would carry rank 0's alone.
        """
        import keras

        variables = [
            v
            for layer in _all_layers(self.model)
            if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)
        ]
        if not variables:
            return
        flat = np.concatenate([np.asarray(v.numpy(), np.float64).ravel() for v in variables])
        mean = self.all_sum(flat) / self.world
        offset = 0
        for variable in variables:
            size = int(np.prod(variable.shape))
            variable.assign(mean[offset : offset + size].reshape(variable.shape).astype(variable.dtype))
            offset += size

    def _validate(self) -> dict:
        """Every worker scores its share of the validation set; the sums are all-reduced."""
        import keras
        import tensorflow as tf

        if not hasattr(self, "predict"):
            self.predict = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)
        rows = shard(
            self.inputs.val_rows,
            rank=self.rank,
            world=self.world,
            batch_size=self.batch,
            seed=0,
            epoch=0,
            train=False,
        )
        confusion = np.zeros((self.num_classes, self.num_classes))
        loss_sum = 0.0
        if rows.num_rows:
            ds = stream(
                rows,
                source=self.inputs.source,
                size=self.size,
                batch_size=self.batch,
                task_options=self.cfg.data.task_options,
            )
            for batch in iter_stream(ds, self.batch):
                ok = batch["ok"]
                if not ok.any():
                    continue
                logits = self.predict(batch["image"][ok]).numpy()
                labels = batch["label_index"][ok]
                loss_sum += float(
                    tf.reduce_sum(
                        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                    )
                )
                np.add.at(confusion, (labels, logits.argmax(axis=1)), 1)
        matrix, (loss_total,) = self._all_sum_confusion(confusion, loss_sum)
        scores = confusion_metrics(matrix)
        return {
            "val_loss": float(loss_total / max(matrix.sum(), 1)),
            "val_accuracy": scores["accuracy"],
            "val_macro_f1": scores["macro_f1"],
        }

    # === Checkpoints, faults, logs ===

    def _report(self, state: LoopState, metrics: dict, monitor: Monitor) -> None:
        """Every worker reports; rank 0 attaches the checkpoint (the model is the same on all)."""
        import ray.train

        self._log(
            _progress_line(metrics, self.cfg.train.epochs)
            + ("  *best*" if monitor.best_epoch == state.epoch else "")
        )
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                self._write_checkpoint(Path(folder), state, monitor)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=rundir.checkpoint_name(state.epoch + 1)
            )

    def _write_checkpoint(self, folder: Path, state: LoopState, monitor: Monitor) -> None:
        self.model.save(folder / rundir.MODEL)
        np.savez(
            folder / rundir.OPTIMIZER, **{f"v{i}": v.numpy() for i, v in enumerate(self.optimizer.variables)}
        )
        if monitor.best_epoch != state.epoch and self.best_weights is not None:
            current = self.model.get_weights()
            self.model.set_weights(self.best_weights)
            self.model.save_weights(folder / rundir.BEST_WEIGHTS)
            self.model.set_weights(current)
        description = {
            "backbone": self.spec.name,
            "image_size": self.size,
            "epoch": state.epoch + 1,
            "metrics": state.history[-1],
        }
        rundir.write_checkpoint_files(folder, self.cfg, self.inputs.classes, asdict(state), description)

    def _maybe_inject_fault(self, global_step: int) -> None:
        """Fault injection for tests: the chosen worker SIGKILLs itself once, at the chosen step."""
        if self.inputs.kill != (self.rank, global_step):
            return
        marker = join_uri(self.inputs.run_uri, f"fault_injected_rank{self.rank}")
        if kind(marker) is not None:  # done once already
            return
        write_text(marker, f"killed at step {global_step}\n")
        self._log(f"fault injection: rank {self.rank} kills itself at step {global_step}", every_rank=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def _phase_label(self, phase: str) -> str:
        """'head', 'finetune', or 'scratch' for the one phase of the scratch recipe."""
        return "scratch" if phase == "finetune" and self.cfg.train.recipe == "scratch" else phase

    def _log(self, message: str, every_rank: bool = False) -> None:
        if self.rank == 0 or every_rank:
            logger.info(tagged(message))


def _all_layers(model):
    """Every layer of a model, nested models (the backbone) included."""
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _progress_line(m: dict, epochs: int) -> str:
    return (
        f"epoch {m['epoch']}/{epochs} [{m['phase']}] loss {m['train_loss']:.4f} "
        f"acc {m['train_accuracy']:.3f} f1 {m['train_macro_f1']:.3f} | val loss {m['val_loss']:.4f} "
        f"acc {m['val_accuracy']:.3f} f1 {m['val_macro_f1']:.3f} | lr {m['learning_rate']:.2e} | "
        f"{m['images_per_second']:.0f} img/s | {m['failed_files']} files failed"
    )
