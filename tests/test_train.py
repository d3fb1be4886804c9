"""Distributed training end to end: two tiny-CNN workers on a generated archive.

One run (module fixture) is killed mid-epoch and must finish from its checkpoint; the tests read
what it wrote. A second, CLI-driven run is interrupted for good and resumed by running the same
command again; its console is what a user reads. The transfer recipe here is on purpose (its two
phases and plateau rule); the tests' shared members are the quick demo's (scratch, `TINY_RECIPE`).
"""

import json
import os
import subprocess

import numpy as np
import pytest
from commands import SKINRAY
from corpus import dds_without_pixel_format

from skinray.config import load_config
from skinray.train.monitor import Monitor, checkpoint_score
from skinray.train.recipe import contradictions, describe
from skinray.train.schedule import scaled_learning_rate, scheduled_learning_rate
from skinray.train.trainer import KILL_ENV

EPOCHS, HEAD_EPOCHS, KILL_STEP = 12, 2, 20
# The transfer recipe on a random backbone, for its two phases and plateau rule (and its warnings).
TINY = [
    "model.backbone=tiny",
    "model.weights=none",
    "model.image_size=64",
    "train.workers=2",
    "train.recipe=transfer",
    "train.batch_size=8",
    "train.head_lr=0.004",
    "train.finetune_lr=0.004",
    "train.unfreeze_top=100",
    "train.early_stopping_patience=0",
    "train.plateau_patience=1",
]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from skinray.data.sample import write_sample

    root = tmp_path_factory.mktemp("train-archive")
    write_sample(root, per_class=40, classes=4, seed=0)  # 128 train, 32 val, 40 test images
    first_class = sorted(p for p in (root / "train").iterdir())[0]
    (first_class / "texture.jpg").write_bytes(dds_without_pixel_format())  # Pillow's DDS decoder raised
    return root


@pytest.fixture(scope="module")
def run(ray_cluster, archive, tmp_path_factory):
    from skinray.train.trainer import train

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(
        overrides=TINY
        + [
            f"data.archive={archive}",
            f"train.epochs={EPOCHS}",
            f"train.head_epochs={HEAD_EPOCHS}",
            "train.max_failures=1",
        ]
    )
    os.environ[KILL_ENV] = f"1:{KILL_STEP}"  # read by the driver, handed to the workers
    try:
        result = train(cfg, str(out), "faulty")
    finally:
        del os.environ[KILL_ENV]
    final = sorted((out / "faulty").glob("checkpoint_epoch_*"))[-1]
    return {
        "result": result,
        "dir": out / "faulty",
        "state": json.loads((final / "state.json").read_text()),
        "cfg": cfg,
        "archive": archive,
    }


# === Pure logic ===


def test_monitor_reduces_on_plateau_and_stops_after_patience():
    m = Monitor(mode="max", patience=3, plateau_patience=2)
    assert m.update(0.5, 0) == (True, False, False)
    assert m.update(0.4, 1) == (False, False, False)
    assert m.update(0.5, 2) == (False, True, False)  # equal is not better: second epoch on the plateau
    assert m.update(0.45, 3) == (False, False, True)  # third: stop the phase
    assert (m.best, m.best_epoch) == (0.5, 0)
    m.new_phase()
    assert m.update(0.6, 4) == (True, False, False)
    low = Monitor(mode="min", patience=0, plateau_patience=1)
    assert low.update(1.0, 0)[0] and low.update(1.1, 1) == (False, True, False)  # patience 0 never stops


def test_checkpoint_score_breaks_ties_towards_the_earlier_epoch():
    assert checkpoint_score(0.9, 3, "max") > checkpoint_score(0.9, 7, "max")
    assert checkpoint_score(0.3, 3, "min") < checkpoint_score(0.3, 7, "min")
    assert checkpoint_score(0.91, 9, "max") > checkpoint_score(0.9, 1, "max")


def test_learning_rate_scaling_rule():
    assert scaled_learning_rate(1e-3, 256, 32, "linear") == pytest.approx(8e-3)
    assert scaled_learning_rate(1e-3, 128, 32, "sqrt") == pytest.approx(2e-3)
    assert scaled_learning_rate(1e-3, 256, 32, "none") == 1e-3


def test_warm_up_then_cosine_decay():
    rates = [scheduled_learning_rate(1.0, e, 0, 10, 2, 0.0, "cosine") for e in range(10)]
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in zip(rates[2:], rates[3:]))  # strictly down after the warm-up
    assert rates[-1] < 0.05
    # A phase starting at epoch 4 follows the same curve from there (a resumed run too).
    assert scheduled_learning_rate(1.0, 7, 4, 14, 2, 0.0, "cosine") == pytest.approx(rates[3])


def test_plateau_schedule_leaves_the_rate_to_the_monitor_after_warm_up():
    assert scheduled_learning_rate(2.0, 0, 0, 10, 1, 0.0, "plateau") == 1.0
    assert scheduled_learning_rate(2.0, 1, 0, 10, 1, 0.0, "plateau") == 2.0
    assert scheduled_learning_rate(2.0, 5, 0, 10, 1, 0.0, "plateau") is None


def test_settings_that_contradict_the_weights_are_named():
    assert contradictions(load_config(overrides=["model.weights=none"])) == []
    assert contradictions(load_config(overrides=["model.weights=imagenet"])) == []
    frozen = contradictions(load_config(overrides=["model.weights=none", "train.recipe=transfer"]))
    assert any("train.head_epochs=3" in line for line in frozen)
    assert any("train.unfreeze_top=30" in line for line in frozen)
    assert any("train.finetune_lr=0.0001" in line for line in frozen)
    pretrained = contradictions(load_config(overrides=["model.weights=imagenet", "train.recipe=scratch"]))
    assert len(pretrained) == 1 and "train.recipe=scratch" in pretrained[0]


def test_the_recipe_is_described_with_its_reason():
    text = describe(load_config(overrides=["model.weights=none", "train.workers=2"]), global_batch=64)
    assert text.startswith("recipe scratch (model.weights is 'none')")
    assert "2.0e-03 at global batch 64" in text and "cosine" in text


# === The distributed run ===


def test_tiny_cnn_learns_the_sample_archive(run):
    best = run["result"].best_metrics
    # Four classes: chance is 0.25. Seen here: 0.9 to 1.0 by epoch 8.
    assert best["val_accuracy"] >= 0.75
    assert best["val_macro_f1"] >= 0.7


def test_a_file_the_decoder_fails_on_is_counted_and_training_goes_on(run):
    """A DDS texture named .jpg among the training photos (Pillow's DDS decoder raised
    NotImplementedError, which failed the run): the run finished, and its epochs counted the file."""
    from skinray.data.catalog import list_archive, splits

    parts = splits(list_archive(str(run["archive"])), run["cfg"].data.val_fraction, run["cfg"].data.seed)
    assert any(p.endswith("texture.jpg") for p in parts["train"]["path"].to_pylist())
    assert len(run["state"]["history"]) == EPOCHS
    assert sum(h["failed_files"] for h in run["state"]["history"]) >= 1


def test_killed_worker_resumes_from_a_checkpoint_not_from_scratch(run):
    state = run["state"]
    assert (run["dir"] / "fault_injected_rank1").exists()
    resumed = [e for e in state["events"] if e["event"] == "resumed"]
    killed_in = KILL_STEP // (128 // 16)  # epoch index 2
    # The latest epoch's report may not have reached the controller when the worker died, so the
    # run resumes from the last or the one before; never from scratch (from_epoch -1).
    assert len(resumed) == 1 and killed_in - 2 <= resumed[0]["from_epoch"] <= killed_in - 1
    # Each epoch ran once to completion: the history was carried over, not restarted.
    assert [h["epoch"] for h in state["history"]] == list(range(1, EPOCHS + 1))
    assert state["finished"] is True


def test_two_phases(run):
    phases = [h["phase"] for h in run["state"]["history"]]
    assert phases == ["head"] * HEAD_EPOCHS + ["finetune"] * (EPOCHS - HEAD_EPOCHS)


def test_plateau_reduction_acted_when_the_metric_stalled(run):
    """Replays the monitor over the recorded metrics: the run reduced the rate exactly after the
    epochs that did not improve, and the next epoch trained at the reduced rate."""
    history, events = run["state"]["history"], run["state"]["events"]
    cfg = run["cfg"].train
    replay = Monitor(mode=cfg.monitor_mode, patience=0, plateau_patience=cfg.plateau_patience)
    expected = []
    for i, h in enumerate(history):
        if i and h["phase"] != history[i - 1]["phase"]:
            replay.new_phase()
        if replay.update(h[cfg.monitor], i)[1] and h["learning_rate"] > cfg.min_lr:
            expected.append(h["epoch"])
    reductions = [e for e in events if e["event"] == "reduce_lr"]
    # Patience 1: any epoch that does not beat the best reduces the rate; on 4 easy classes the
    # macro-F1 of 32 validation images cannot rise strictly for 12 epochs.
    assert reductions
    assert [e["epoch"] for e in reductions] == expected
    for event in reductions:
        epoch = event["epoch"]
        after = history[epoch] if epoch < len(history) else None
        if after and after["phase"] == history[epoch - 1]["phase"]:
            assert after["learning_rate"] == pytest.approx(event["learning_rate"])
            assert after["learning_rate"] < history[epoch - 1]["learning_rate"]


def test_best_checkpoint_is_the_best_epoch_and_evaluates_the_same(run, tmp_path):
    """The kept model is the best epoch's (what early stopping restores), and evaluating it on the
    validation split reproduces the accuracy the workers measured in that epoch."""
    from skinray.evaluate import evaluate

    history = run["state"]["history"]
    scores = [h["val_macro_f1"] for h in history]
    best_epoch = int(np.argmax(scores)) + 1  # argmax: the first of equals
    assert run["result"].best_metrics["epoch"] == best_epoch
    assert run["state"]["monitor"]["best_epoch"] == best_epoch - 1
    assert run["result"].best_checkpoint.endswith(f"checkpoint_epoch_{best_epoch:04d}")
    report = evaluate(str(run["dir"]), str(run["archive"]), "val", str(tmp_path))
    assert report["num_images"] == 32
    assert load_config(tmp_path / "config.yaml") == run["cfg"]  # the model's config beside its report
    # The same pixels and weights; only oneDNN's batch-size-dependent rounding differs (the workers
    # score batches of 16, evaluate of 32), which can tip one near-tie: at most one image of 32.
    assert report["accuracy"] == pytest.approx(history[best_epoch - 1]["val_accuracy"], abs=1 / 32 + 1e-9)


def test_a_run_cut_short_resolves_to_the_checkpoint_training_ranks_best(run, tmp_path):
    """Without summary.json (a run killed before its end), the run directory still resolves to the
    checkpoint Ray Train ranks best: one ranking (rundir.best), used by training and by readers."""
    import shutil

    from skinray import rundir

    copy = tmp_path / "cut"
    shutil.copytree(run["dir"], copy)
    (copy / rundir.SUMMARY).unlink()
    best_name = run["result"].best_checkpoint.rsplit("/", 1)[-1]
    assert rundir.best_checkpoint(copy) == copy / best_name
    assert rundir.best_checkpoint(copy / best_name) == copy / best_name
    assert rundir.best_checkpoint(tmp_path) is None
    pairs = [("a", {"checkpoint_score": 0.5}), ("b", {"checkpoint_score": 0.7})]
    assert rundir.best(pairs, "max")[0] == "b" and rundir.best(pairs, "min")[0] == "a"


def test_run_directory_contents(run):
    folder = run["dir"]
    assert {"config.yaml", "classes.json", "summary.json", "tensorboard"} <= {
        p.name for p in folder.iterdir()
    }
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    checkpoints = sorted(folder.glob("checkpoint_epoch_*"))
    assert len(checkpoints) <= 3 + 1  # keep_checkpoints best, plus the latest
    for name in ("model.keras", "optimizer.npz", "state.json", "classes.json", "config.yaml", "model.json"):
        assert (checkpoints[-1] / name).is_file()
    assert load_config(folder / "config.yaml") == run["cfg"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["best_checkpoint"] == run["result"].best_checkpoint


@pytest.mark.slow
def test_interrupted_run_resumes_when_the_same_command_runs_again(ray_env, archive, tmp_path):
    """max_failures=0: the kill ends the run; the same command then resumes from the latest checkpoint."""
    command = [
        *SKINRAY,
        "train",
        "--backbone",
        "tiny",
        "--data",
        str(archive),
        "--out",
        str(tmp_path),
        "--name",
        "again",
        "--epochs",
        "3",
        "--workers",
        "2",
        "--image-size",
        "32",
        "--weights",
        "none",
    ]
    for item in ["train.batch_size=8", "train.max_failures=0"]:
        command += ["--set", item]
    killed = {**ray_env, KILL_ENV: "1:20"}  # 8 steps an epoch: in the third epoch
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=killed)
    assert first.returncode != 0
    assert "run the same command again" in first.stderr
    # The console: the recipe and skinray's lines; Ray's per-report dicts went to its log files.
    assert "recipe scratch (model.weights is 'none')" in first.stdout
    assert "[skinray] epoch 1/3 [scratch]" in first.stdout + first.stderr
    assert "TrainingReport(" not in first.stdout + first.stderr
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ray_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "best checkpoint:" in second.stdout
    # The resumed run is a screenful: the recipe, its epochs, the result. TensorFlow's C++ start-up
    # lines (oneDNN, CUDA stubs, CPU instructions), which each worker would print twice, are filtered
    # out of the workers' stderr (the command joins the tests' cluster as a new driver). The tests'
    # cluster runs without Ray's dashboard, so Ray Train's placement-group cleaner cannot reach the
    # State API and says so every few seconds: the test's setting, not a user's.
    for proc in (first, second):
        lines = [
            line
            for line in (proc.stdout + proc.stderr).strip().splitlines()
            if "(PlacementGroupCleaner" not in line
        ]
        assert not [line for line in lines if "oneDNN" in line or "cudart_stub" in line or "absl::" in line]
    assert "[skinray] epoch 3/3" in second.stdout + second.stderr and len(lines) <= 15, "\n".join(lines)
    final = sorted((tmp_path / "again").glob("checkpoint_epoch_*"))[-1]
    state = json.loads((final / "state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    # `--weights none` ran the scratch recipe: one phase, warm-up then cosine, no warnings.
    cfg = load_config(tmp_path / "again" / "config.yaml")
    assert [h["phase"] for h in state["history"]] == ["scratch"] * 3
    base = scaled_learning_rate(cfg.train.finetune_lr, 16, cfg.train.base_batch, cfg.train.lr_scaling)
    assert [h["learning_rate"] for h in state["history"]] == pytest.approx(
        [
            scheduled_learning_rate(base, e, 0, 3, cfg.train.warmup_epochs, cfg.train.min_lr, "cosine")
            for e in range(3)
        ]
    )
    assert "[skinray] warning" not in first.stderr + second.stderr
    # From the second epoch's checkpoint, or the first's if the second's report was still in flight.
    assert [e["from_epoch"] for e in state["events"] if e["event"] == "resumed"] in ([1], [0])


def test_a_resume_on_other_classes_or_settings_is_refused_naming_the_difference(run, tmp_path):
    """The same --out and --name on another archive or model would continue the checkpoints under
    other labels: refused before Ray starts, the difference named, the run folder untouched."""
    from skinray import UserError
    from skinray.data.sample import write_sample
    from skinray.storage import lock
    from skinray.train.trainer import train

    folder, saved = run["dir"], (run["dir"] / "config.yaml").read_text()
    fourth = json.loads((folder / "classes.json").read_text())[3]
    write_sample(tmp_path / "three", per_class=10, classes=3, seed=0)
    base = TINY + [f"train.epochs={EPOCHS}", f"train.head_epochs={HEAD_EPOCHS}"]
    other_classes = load_config(overrides=base + [f"data.archive={tmp_path / 'three'}"])
    with pytest.raises(
        UserError, match=rf"other classes \(classes only before: \['{fourth}'\]; only now: none\)"
    ):
        train(other_classes, str(folder.parent), "faulty")
    other_size = load_config(overrides=base + [f"data.archive={run['archive']}", "model.image_size=32"])
    with pytest.raises(UserError, match="other settings \\(model.image_size: 64 then, 32 now\\)"):
        train(other_size, str(folder.parent), "faulty")
    assert (folder / "config.yaml").read_text() == saved
    with lock(str(folder / ".lock"), "the test"):  # a second training of the same run, still alive
        with pytest.raises(UserError, match=f"being written by another run \\(pid {os.getpid()} "):
            train(run["cfg"], str(folder.parent), "faulty")


def test_fine_tuning_a_bundle_member_on_a_clinics_own_archive(ray_cluster, bundle, tmp_path, capsys):
    """--weights BUNDLE --weights-member NAME on an archive of other classes: the transfer recipe
    starts from the member's backbone (frozen in the head phase: unchanged after it), trains a new
    head for 3 classes, and the run's config.yaml records the bundle version and member."""
    from skinray.data.sample import write_sample
    from skinray.predictor import Predictor
    from skinray.train.trainer import train

    write_sample(tmp_path / "clinic", per_class=12, classes=3, seed=7)
    source = Predictor.from_path(str(bundle))
    member = source.members[0]
    settings = [
        f"data.archive={tmp_path / 'clinic'}",
        f"model.weights={bundle}",
        f"model.weights_member={member.name}",
        "model.backbone=tiny",
        "model.image_size=56",
        "train.epochs=1",
        "train.workers=2",
        "train.batch_size=8",
    ]
    result = train(load_config(overrides=settings), str(tmp_path / "runs"), "clinic")
    described = f"bundle {source.version}, member {member.name}"
    printed = capsys.readouterr().out
    assert f"backbone weights from {bundle}: {described}; the head is new" in printed
    assert "recipe transfer" in printed
    assert load_config(tmp_path / "runs" / "clinic" / "config.yaml").model.weights_from == described
    tuned = Predictor.from_path(result.run_dir).members[0].model
    assert tuned.output_shape == (None, 3) and tuned.input_shape[1] == 56
    theirs, ours = member.model.get_layer("backbone"), tuned.get_layer("backbone")
    for a, b in zip(theirs.get_weights(), ours.get_weights(), strict=True):
        assert np.array_equal(a, b)
