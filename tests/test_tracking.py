"""Experiment tracking: the quick demo's pipeline ran with MLFLOW_TRACKING_URI set (conftest's
`demo`), so its stages are runs in a real MLflow store (SQLite), read back with MLflow's client."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from skinray import UserError


@pytest.fixture(scope="module")
def runs(demo, tracking_store):
    from mlflow.tracking import MlflowClient

    out, _, proc = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_store)
    experiment = client.get_experiment_by_name("skinray")
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    return client, found, out


def _stage(runs, stage):
    return [r for r in runs if r.data.tags.get("skinray.stage") == stage]


def test_the_pipeline_is_a_parent_run_of_its_stages(runs):
    client, found, _ = runs
    (pipeline,) = _stage(found, "pipeline")
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id]
    assert Counter(r.data.tags["skinray.stage"] for r in children) == {
        "tune": 1,  # the quick demo searches its first member's head only
        "train": 2,
        "ensemble": 1,
        "evaluate": 1,
    }
    assert all(r.info.status == "FINISHED" for r in [pipeline, *children])
    assert pipeline.data.metrics["accuracy"] > 0


def test_a_training_run_has_its_config_every_epoch_and_its_files(runs):
    client, found, out = runs
    run = next(r for r in _stage(found, "train") if r.info.run_name == "tiny48")
    summary = json.loads((out / "runs" / "tiny48" / "summary.json").read_text())
    assert run.data.params["model.backbone"] == "tiny" and run.data.params["model.image_size"] == "48"
    assert not any(k.startswith("tracking.") for k in run.data.params)
    history = client.get_metric_history(run.info.run_id, "val_macro_f1")
    assert [m.step for m in history] == [h["epoch"] for h in summary["history"]]
    assert [m.value for m in history] == pytest.approx([h["val_macro_f1"] for h in summary["history"]])
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "tensorboard"} <= files
    assert client.list_artifacts(run.info.run_id, "tensorboard")


def test_tune_has_a_child_run_per_trial(runs):
    client, found, _ = runs
    for search in _stage(found, "tune"):
        trials = [r for r in found if r.data.tags.get("mlflow.parentRunId") == search.info.run_id]
        assert len(trials) == int(search.data.params["tune.trials"]) >= 2
        assert all(t.data.metrics for t in trials)


def test_the_bundle_and_its_evaluation_are_logged(runs):
    client, found, out = runs
    (ensemble,) = _stage(found, "ensemble")
    (evaluation,) = _stage(found, "evaluate")
    manifest = json.loads((out / "bundle" / "bundle.json").read_text())
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert ensemble.data.tags["skinray.bundle_version"] == manifest["version"]
    assert ensemble.data.metrics["accuracy"] == pytest.approx(manifest["validation"]["ensemble"]["accuracy"])
    assert {a.path for a in client.list_artifacts(ensemble.info.run_id)} == {"bundle.json"}
    assert evaluation.data.tags["skinray.model_version"] == manifest["version"]
    assert evaluation.data.metrics["accuracy"] == pytest.approx(report["accuracy"])
    reported = {a.path for a in client.list_artifacts(evaluation.info.run_id, "report")}
    assert {"report/report.md", "report/report.json", "report/confusion_matrix.png"} <= reported


def test_without_a_tracking_uri_mlflow_is_never_imported():
    code = (
        "import sys, os\n"
        "os.environ.pop('MLFLOW_TRACKING_URI', None)\n"
        "from skinray.config import Config\n"
        "from skinray.tracking import tracked\n"
        "with tracked(Config(), 'x', 'train') as run:\n"
        "    run.params({'a': 1}); run.metrics({'b': 2.0})\n"
        "assert not run.on and 'mlflow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_tracking_uri_without_mlflow_is_one_clear_error(monkeypatch):
    from skinray.config import load_config
    from skinray.tracking import tracked

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if the extra were not installed
    with pytest.raises(UserError, match=r"pip install 'skinray\[mlflow\]'"):
        with tracked(load_config(overrides=["tracking.uri=sqlite:///x.db"]), "x", "train"):
            pass
