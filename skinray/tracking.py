"""Experiment tracking in MLflow (the optional `skinray[mlflow]` extra).

On when `tracking.uri` is set, or else MLFLOW_TRACKING_URI; off (and MLflow never imported)
otherwise. Each stage is one MLflow run in the experiment `tracking.experiment`, logged from the
driver with MLflow's client:

- `train`: the resolved config as params, each epoch's metrics (from a Ray Train user callback,
  which runs in Train's controller: Train V2 has no place for Tune's MLflowLoggerCallback), then
  `summary.json` and the TensorBoard folder as artifacts;
- `tune`: its config as params and one child run per trial (Ray's `MLflowLoggerCallback`, which
  fits Tune), then the trial table;
- `ensemble`: the bundle's version (a tag), its validation metrics, `bundle.json`;
- `evaluate`: the report's metrics, and its report, plots and tables as artifacts;
- `pipeline`: a parent run; every stage it runs is a child of it.

A run that fails is marked FAILED. The tracking URI is never logged, stored or printed with its
credentials (`skinray.storage.redact`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from skinray import UserError

ENV = "MLFLOW_TRACKING_URI"
PARENT_TAG = "mlflow.parentRunId"
_parents: list[str] = []  # the pipeline's run, while it runs: its stages become its children


def tracking_uri(cfg) -> str:
    return cfg.tracking.uri or os.environ.get(ENV, "")


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(
            "experiment tracking is on (tracking.uri or MLFLOW_TRACKING_URI) but MLflow is not "
            "installed: pip install 'skinray[mlflow]', or unset it"
        ) from None
    return MlflowClient(tracking_uri=uri)


class Run:
    """One MLflow run, written through MLflow's client. `Run()` (no URI) does nothing, so stages
    log unconditionally."""

    def __init__(self, uri: str = "", run_id: str = "", client=None):
        self.uri, self.run_id = uri, run_id
        self.client = client or (_client(uri) if uri else None)

    @property
    def on(self) -> bool:
        return self.client is not None

    def params(self, values: dict) -> None:
        if not self.on:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(values.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict, step: int = 0) -> None:
        if not self.on:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        numbers = [
            Metric(k, float(v), now, step)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if numbers:
            self.client.log_batch(self.run_id, metrics=numbers)

    def tag(self, key: str, value: str) -> None:
        if self.on:
            self.client.set_tag(self.run_id, key, value)

    def artifact(self, location: str, path: str | None = None) -> None:
        """A file or folder, local or at a URI (copied down first), as artifacts under `path`."""
        if not self.on:
            return
        from skinray.storage import is_uri, kind

        found = kind(location)
        if found is None:
            return
        folder = found == "dir"
        with (
            _local(location, folder) if is_uri(location) else contextlib.nullcontext(Path(location)) as local
        ):
            if folder:
                self.client.log_artifacts(self.run_id, str(local), path)
            else:
                self.client.log_artifact(self.run_id, str(local), path)

    def json(self, value: dict, name: str) -> None:
        if self.on:
            self.client.log_dict(self.run_id, value, name)


@contextlib.contextmanager
def tracked(cfg, name: str, stage: str, parent: bool = False, enabled: bool = True):
    """The stage's run (one that does nothing when tracking is off, or not `enabled`): FINISHED
    when the block ends, FAILED when it raises. `parent`: the runs started inside are its children
    (the pipeline)."""
    uri = tracking_uri(cfg) if enabled else ""
    if not uri:
        yield Run()
        return
    client = _client(uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
    )
    tags = {"skinray.stage": stage, **({PARENT_TAG: _parents[-1]} if _parents else {})}
    run = Run(uri, client.create_run(experiment_id, run_name=name, tags=tags).info.run_id, client)
    if parent:
        _parents.append(run.run_id)
    try:
        yield run
    except BaseException:
        client.set_terminated(run.run_id, "FAILED")
        raise
    else:
        client.set_terminated(run.run_id, "FINISHED")
    finally:
        if parent:
            _parents.pop()


def config_params(cfg) -> dict:
    """The resolved config as flat params (`train.epochs`: 12), without the tracking section and
    with the archive's credentials redacted."""
    from skinray.config import config_to_dict, redacted

    flat: dict = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict) and value and key != "resources":
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk({k: v for k, v in config_to_dict(redacted(cfg)).items() if k != "tracking"}, "")
    return flat


def epoch_callback(run: Run):
    """A Ray Train user callback logging each epoch's metrics (rank 0's) to `run`, or None."""
    if not run.on:
        return None
    from ray.train import UserCallback

    class EpochMetrics(UserCallback):
        def __init__(self, uri: str, run_id: str):
            self.uri, self.run_id, self.run = uri, run_id, None

        def after_report(self, run_context, metrics, checkpoint):
            if self.run is None:  # in Train's controller, after unpickling
                self.run = Run(self.uri, self.run_id)
            if metrics:
                values = metrics[0]
                self.run.metrics(values, int(values.get("epoch", 0)))

    return EpochMetrics(run.uri, run.run_id)


def tune_callback(run: Run, experiment: str):
    """Ray's MLflowLoggerCallback (which fits Tune): one run per trial, children of `run`."""
    if not run.on:
        return None
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(
        tracking_uri=run.uri, experiment_name=experiment, tags={PARENT_TAG: run.run_id}, save_artifact=False
    )


@contextlib.contextmanager
def _local(uri: str, folder: bool):
    """A file or `folder` at a URI, copied into a temporary folder."""
    from skinray.storage import basename, download, resolve

    fs, path, _ = resolve(uri)
    with tempfile.TemporaryDirectory() as temporary:
        target = Path(temporary) / basename(uri)
        download(fs, path, folder, target)
        yield target
