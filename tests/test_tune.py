"""`skinray tune` on a generated archive with the tiny backbone, joined to the shared cluster.

One cached search (module fixture) runs through the command line; the tests read what it wrote,
run it again (embeddings reused, nothing rerun), kill and continue another one, and run two full
(Ray Train) trials. (Reuse by another search under the same --out goes through the same lookup.)
"""

import csv
import json
import os
import signal
import subprocess
import time

import pytest
from commands import SKINRAY, skinray

from skinray.config import load_config

TUNE = [
    "--backbone",
    "tiny",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--set",
    "tune.views=2",
    "--set",
    "tune.max_epochs=6",
    "--set",
    "tune.grace_period=1",
    "--set",
    "tune.reduction_factor=3",
    "--set",
    "tune.cpus_per_trial=0.5",
    "--set",
    "tune.batch_size=[16,32]",
]


def _tune(ray_env, archive, out, *extra, timeout=900):
    return skinray("tune", "--data", archive, "--out", out, *TUNE, *extra, timeout=timeout, env=ray_env)


def _rows(run_dir):
    with open(run_dir / "trials.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def search(ray_env, sample_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    proc = _tune(ray_env, sample_archive, out, "--name", "s", "--trials", "6", "--max-concurrent", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "dir": out / "s", "proc": proc, "archive": sample_archive}


def test_a_cached_search_writes_its_trials_and_the_best_config(search):
    rows = _rows(search["dir"])
    assert len(rows) == 6
    scores = [float(r["val_macro_f1"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    # The search finds something: its best head beats a head that answers one class (macro-F1 0.1
    # on 4 balanced classes) and its own worst trial. Random 32 px tiny features carry little: the
    # best landed between 0.165 and 0.30 in five runs here, the worst at 0.09-0.10.
    assert scores[0] > 0.12 and scores[0] - scores[-1] > 0.03, scores
    assert "| trial |" in (search["dir"] / "trials.md").read_text()
    assert "embeddings written" in search["proc"].stdout
    assert "train with it: skinray train --config" in search["proc"].stdout


def test_asha_stopped_a_trial_early(search):
    rows = _rows(search["dir"])
    stopped = [r for r in rows if r["stopped_early"] == "True"]
    assert stopped and all(int(r["epochs"]) < 6 for r in stopped)
    assert any(int(r["epochs"]) == 6 for r in rows)  # and let the best run to the end


def test_the_best_config_holds_the_best_trials_head(search):
    """best_config.yaml is a training config holding the best trial's head: it loads, and the model
    it describes is built with that head. (The quick demo trains from a search's best config end to
    end: its pipeline searches tiny48's head, then trains it.)"""
    from skinray.models import create_classifier

    best = _rows(search["dir"])[0]
    cfg = load_config(search["dir"] / "best_config.yaml", ["train.epochs=1", "train.workers=1"])
    assert cfg.model.backbone == "tiny" and cfg.model.image_size == 32
    assert cfg.model.head_units == int(best["head_units"]) and cfg.train.batch_size == int(best["batch_size"])
    assert cfg.model.dropout == pytest.approx(float(best["dropout"]))
    assert cfg.train.head_lr == pytest.approx(float(best["head_lr"]))
    model = create_classifier(cfg.model, num_classes=4)
    dense = [layer for layer in model.layers if layer.__class__.__name__ == "Dense"]
    assert [layer.units for layer in dense] == [cfg.model.head_units, 4]


def test_running_the_search_again_reuses_everything(search, ray_env):
    trials = sorted((search["dir"] / "trials").glob("*/result.json"))
    before = {p: p.read_text() for p in trials}
    proc = _tune(
        ray_env, search["archive"], search["out"], "--name", "s", "--trials", "6", "--max-concurrent", "2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embeddings reused" in proc.stdout and "continuing the search" in proc.stdout
    assert {p: p.read_text() for p in trials} == before  # no trial ran again
    assert len(_rows(search["dir"])) == 6


def test_a_search_with_other_settings_under_the_same_name_is_refused(search, ray_env):
    proc = _tune(ray_env, search["archive"], search["out"], "--name", "s", "--trials", "9")
    assert proc.returncode == 2 and "tune.trials" in proc.stderr and "another --name" in proc.stderr


def test_another_search_under_the_same_out_finds_the_embeddings(search, tmp_path):
    """The lookup by key across searches: a new search name reuses the first one's features."""
    from skinray.data.catalog import list_archive
    from skinray.data.ingest import ImageSource
    from skinray.tune.embeddings import embed
    from skinray.tune.search import _inputs, _sibling_embeddings

    cfg = load_config(search["dir"] / "config.yaml")
    _, train_rows, val_rows = _inputs(cfg)
    location, reused = embed(
        cfg,
        32,
        train_rows,
        val_rows,
        ImageSource.of(list_archive(cfg.data.archive)),
        str(tmp_path / "embeddings"),
        elsewhere=_sibling_embeddings(str(search["out"])),
    )
    assert reused and location.startswith(str(search["dir"] / "embeddings"))
    assert not (tmp_path / "embeddings").exists()


@pytest.mark.slow
def test_an_interrupted_search_continues_without_rerunning_finished_trials(search, ray_env):
    """Another search under the first one's --out (its embeddings reused: the trials are the work),
    killed once a trial finished; the same command continues it."""
    out = search["out"]
    command = [
        *SKINRAY,
        "tune",
        "--data",
        str(search["archive"]),
        "--out",
        str(out),
        "--name",
        "k",
        "--trials",
        "4",
        "--max-concurrent",
        "1",
        *TUNE,
    ]
    driver = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ray_env, start_new_session=True
    )
    finished = _wait_for_finished_trials(out / "k" / "trials", driver, count=1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = {p: p.read_text() for p in finished}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=ray_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuing the search" in proc.stdout
    assert {p: p.read_text() for p in finished} == before
    assert len(_rows(out / "k")) == 4 and "embeddings reused" in proc.stdout


def _wait_for_finished_trials(folder, driver, count, timeout=600):
    """Trials whose last result is final and that Tune's saved experiment state lists as done."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert driver.poll() is None, "the search ended before it could be interrupted"
        done = [p for p in folder.glob("*/result.json") if _is_done(p)]
        states = list(folder.glob("experiment_state-*.json"))
        if len(done) >= count and states and all(p.parent.name in states[0].read_text() for p in done):
            time.sleep(2)
            return done
        time.sleep(1)
    raise AssertionError("no trial finished in time")


def _is_done(result_json):
    lines = result_json.read_text().strip().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("done", False)


@pytest.mark.slow
def test_full_mode_runs_ray_train_trials(ray_env, sample_archive, tmp_path):
    proc = _tune(
        ray_env,
        sample_archive,
        tmp_path,
        "--name",
        "f",
        "--mode",
        "full",
        "--trials",
        "2",
        "--max-concurrent",
        "2",
        "--set",
        "tune.max_epochs=1",
        "--set",
        "tune.grace_period=1",
        "--set",
        "train.workers=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "f")
    assert len(rows) == 2 and all(r["error"] == "" for r in rows)
    assert len(list((tmp_path / "f" / "full").glob("*/checkpoint_epoch_*"))) >= 2  # real Ray Train runs
    assert not (tmp_path / "f" / "embeddings").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--backbone", "vgg16"], "invalid choice: 'vgg16'"),
        (["--set", "data.val_fraction=0"], "no validation images"),
        (["--set", "tune.dropout=[0.5,0.1]"], "tune.dropout"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(ray_env, sample_archive, tmp_path, extra, words):
    proc = _tune(ray_env, sample_archive, tmp_path / "out", *extra, timeout=300)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_one_class_is_refused(ray_env, tmp_path):
    from skinray.data.sample import write_sample

    write_sample(tmp_path / "one", per_class=8, classes=1, seed=0)
    proc = _tune(ray_env, tmp_path / "one", tmp_path / "out", timeout=300)
    assert proc.returncode == 2 and "at least 2" in proc.stderr
    assert not (tmp_path / "out").exists()
