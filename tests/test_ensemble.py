"""The calibrated ensemble bundle: fitting, the bundle on disk, its verification, and its evaluation.

Two trained `tiny` members (conftest `members`: 48 and 64 px) are combined by `skinray ensemble`;
the tests read the bundle it writes and what `Predictor` and `evaluate` make of it.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from commands import SKINRAY, one_error_line, skinray

from skinray.ensemble import abstention_threshold, fit_temperature, fit_weights
from skinray.predictor import softmax

# === Fitting, on synthetic logits ===


def test_temperature_fit_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 5))
    true_t = 2.5
    probabilities = softmax(logits, true_t).astype(np.float64)
    labels = np.array([rng.choice(5, p=p / p.sum()) for p in probabilities])
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)


def test_weights_favour_the_informative_member():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 500)
    good = softmax(rng.normal(size=(500, 4)) + 3.0 * np.eye(4)[labels])
    noise = softmax(rng.normal(size=(500, 4)))
    weights = fit_weights(np.stack([noise, good]).astype(np.float64), labels)
    assert weights.sum() == pytest.approx(1.0) and (weights >= 0).all()
    assert weights[1] > 0.8


@pytest.mark.parametrize("coverage", [0.5, 0.8, 0.9, 1.0])
def test_threshold_answers_at_least_the_asked_share_and_no_more_than_needed(coverage):
    rng = np.random.default_rng(2)
    probabilities = softmax(rng.normal(scale=2.0, size=(101, 6)))
    threshold = abstention_threshold(probabilities, coverage)
    answered = (probabilities.max(axis=1) >= threshold).mean()
    assert coverage <= answered < coverage + 2 / 101


# === The bundle ===


@pytest.fixture(scope="module")
def cli_bundle(members, ray_env, tmp_path_factory):
    """`skinray ensemble` on the command line, joining the shared cluster, at coverage 0.8: the bundle
    these tests read (the shared `bundle` is the demo pipeline's)."""
    out = tmp_path_factory.mktemp("bundles") / "v1"
    proc = subprocess.run(
        [
            *SKINRAY,
            "ensemble",
            "--members",
            *members["runs"],
            "--data",
            str(members["archive"]),
            "--out",
            str(out),
            "--coverage",
            "0.8",
            "--set",
            "score.max_actors=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ray_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "abstains below" in proc.stdout
    return out


def test_manifest_describes_every_member(cli_bundle, members):
    manifest = json.loads((cli_bundle / "bundle.json").read_text())
    assert manifest["classes"] == json.loads((Path(members["runs"][0]) / "classes.json").read_text())
    assert [m["image_size"] for m in manifest["members"]] == [48, 64]
    assert [m["backbone"] for m in manifest["members"]] == ["tiny", "tiny"]
    assert sum(m["weight"] for m in manifest["members"]) == pytest.approx(1.0)
    for member in manifest["members"]:
        assert (cli_bundle / member["file"]).is_file() and (cli_bundle / member["config"]).is_file()
        assert 0.05 <= member["temperature"] <= 20 and member["temperature"] != 1.0
    assert len(manifest["version"]) == 64 and manifest["coverage"] == 0.8
    assert manifest["validation"]["images"] == 24  # half of the 48: the other half calibrates the sets
    differential = manifest["differential"]
    assert differential["method"] == "aps-randomised" and differential["coverage"] == 0.9
    assert differential["calibration_images"] == 24 and 0 < differential["threshold"] <= 1


def test_calibration_does_not_worsen_the_log_loss_it_minimises(cli_bundle):
    """On the images it was fitted on (ECE, 15 bins over 24 images, is too coarse to say more here;
    the temperature tests below check calibration itself)."""
    validation = json.loads((cli_bundle / "bundle.json").read_text())["validation"]
    before, after = validation["ensemble_uncalibrated"], validation["ensemble"]
    assert after["log_loss"] <= before["log_loss"] + 1e-9
    for member in validation["members"]:  # each temperature minimises its member's log-loss
        assert member["calibrated"]["log_loss"] <= member["uncalibrated"]["log_loss"] + 1e-9
    # The fitted weights are at least as good as equal weights, on the data they were fitted on.
    assert after["log_loss"] <= validation["ensemble_equal_weights"]["log_loss"] + 1e-9


def test_thresholds_are_fitted_on_their_own_halves_of_validation(cli_bundle, members):
    """Recomputed from scratch, in this process, from the bundle's predictions on the validation
    split: the abstention threshold answers the asked share of the fitting half, and the sets'
    threshold is the conformal quantile of the other half, with each image's draw taken from its
    pixels here exactly as the actors that fitted it took it (one photo, one differential)."""

    from skinray import conformal
    from skinray.data.catalog import list_archive, model_split
    from skinray.data.ingest import decode_views
    from skinray.ensemble import halves
    from skinray.predictor import Predictor

    predictor = Predictor.from_path(str(cli_bundle))
    rows = model_split(list_archive(str(members["archive"])), "val", predictor.classes, predictor.config.data)
    views = [decode_views(open(p, "rb").read(), predictor.sizes) for p in rows["path"].to_pylist()]
    prediction = predictor.predict({s: np.stack([v[s] for v in views]) for s in predictor.sizes})
    labels = rows["label_index"].to_numpy()
    fitting, calibration = halves(labels, predictor.config.data.seed)
    assert len(fitting) == len(calibration) == 24 and not set(fitting) & set(calibration)
    answered = 1.0 - prediction.abstained[fitting].mean()
    assert 0.8 <= answered < 0.8 + 2 / len(fitting)
    scores = conformal.scores(
        prediction.probabilities[calibration], labels[calibration], prediction.draws[calibration]
    )
    ordered = np.sort(scores)  # the ceil(25 * 0.9) = 23rd smallest, halfway to the 24th
    assert predictor.set_threshold == pytest.approx((ordered[22] + ordered[23]) / 2, abs=1e-6)
    inside = conformal.sets(prediction.probabilities, prediction.draws, predictor.set_threshold)
    assert inside[calibration, labels[calibration]].mean() >= 0.9
    answers = prediction.answers(predictor.classes, 3)
    assert all(a["differential"][0] == a["label"] for a in answers)


def test_a_tampered_bundle_is_refused(cli_bundle, tmp_path):
    from skinray.bundle import BundleError
    from skinray.predictor import Predictor

    cases = {
        "changed file": lambda b: _flip_a_byte(b / "members/00-tiny/model.keras"),
        "unexpected file": lambda b: (b / "members/extra.py").write_text("import os"),
        "missing file": lambda b: (b / "members/01-tiny/config.yaml").unlink(),
        "was edited": lambda b: (b / "bundle.json").write_text(_edit_manifest(b)),
    }
    for expected, tamper in cases.items():
        copy = tmp_path / expected.replace(" ", "-")
        shutil.copytree(cli_bundle, copy)
        tamper(copy)
        with pytest.raises(BundleError, match=expected):
            Predictor.from_path(str(copy))
    assert (
        Predictor.from_path(str(cli_bundle)).version
        == json.loads((cli_bundle / "bundle.json").read_text())["version"]
    )


def test_a_resealed_bundle_pointing_outside_itself_is_refused(cli_bundle, tmp_path):
    """The version is a hash anyone can recompute: a manifest edited to load a model from outside
    the bundle, then resealed, still loads nothing."""
    from skinray.bundle import BundleError, manifest_version
    from skinray.predictor import Predictor

    copy = tmp_path / "bundle"
    shutil.copytree(cli_bundle, copy)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(copy / "members/00-tiny/model.keras", outside / "model.keras")
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["members"][0]["file"] = "../outside/model.keras"
    manifest["version"] = manifest_version(manifest)
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'../outside/model.keras' is not one of the bundle's files"):
        Predictor.from_path(str(copy))


def test_a_model_file_changed_after_verification_is_not_loaded(cli_bundle, tmp_path):
    """A replica verifies the bundle, then loads its models: a file replaced in between (another
    writer, a tampering process) is caught on the bytes that would be loaded, not opened again."""
    from skinray.bundle import BundleError
    from skinray.predictor import Predictor

    copy = tmp_path / "bundle"
    shutil.copytree(cli_bundle, copy)
    planned = Predictor.from_path(str(copy), load_models=False)  # verified, models not yet loaded
    _flip_a_byte(copy / "members/01-tiny/model.keras")
    with pytest.raises(
        BundleError, match="members/01-tiny/model.keras changed after the bundle was verified"
    ):
        planned.load_models(planned.members)
    planned = Predictor.from_path(str(cli_bundle), load_models=False)
    planned.load_models(planned.members[:1])
    assert planned.members[0].model is not None and planned.members[1].model is None


def test_an_expected_version_refuses_any_other_bundle(cli_bundle, members, tmp_path):
    from skinray import UserError
    from skinray.bundle import BundleError
    from skinray.predictor import Predictor

    version = json.loads((cli_bundle / "bundle.json").read_text())["version"]
    for given in (version, version[:12].upper()):
        found = Predictor.from_path(str(cli_bundle), load_models=False, expect_version=given)
        assert found.version == version
    other = ("0" if version[0] != "0" else "1") + version[1:16]
    with pytest.raises(BundleError, match=f"is bundle version {version[:16]}, not the expected {other}"):
        Predictor.from_path(str(cli_bundle), load_models=False, expect_version=other)
    with pytest.raises(UserError, match="at least 12 characters"):
        Predictor.from_path(str(cli_bundle), load_models=False, expect_version=version[:8])
    with pytest.raises(UserError, match="is not a bundle"):
        Predictor.from_path(str(members["runs"][0]), load_models=False, expect_version=version)
    # Each command that opens a bundle takes --expect-version: refused in one line, before any work.
    image = next((members["archive"] / "test").rglob("*.jpg"))
    commands = {
        "score": ["--input", str(image.parent), "--output", str(tmp_path / "scores")],
        "evaluate": ["--data", str(members["archive"]), "--out", str(tmp_path / "report")],
        "explain": [str(image), "--out", str(tmp_path / "png")],
        "serve": ["--port", "0"],
    }
    for command, args in commands.items():
        proc = skinray(command, "--model", str(cli_bundle), *args, "--expect-version", other, timeout=300)
        assert one_error_line(proc).endswith(
            f"not the expected {other}: refusing it (another bundle was written there, or the wrong path)"
        ), command
        assert f"not the expected {other}" in proc.stderr, command
    assert not any((tmp_path / name).exists() for name in ("scores", "report", "png"))


def test_a_model_holding_python_code_is_refused(members, tmp_path):
    """A `.keras` file with a Lambda layer (a pickled Python function) in place of a member's model:
    safe mode refuses it, and the command says so in one line (no traceback, no advice to turn
    safe mode off)."""
    import keras

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(sorted(Path(members["runs"][0]).glob("checkpoint_epoch_*"))[-1], checkpoint)
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    outputs = keras.layers.Lambda(lambda x: keras.ops.mean(keras.ops.cast(x, "float32"), axis=(1, 2)))(inputs)
    keras.Model(inputs, outputs).save(checkpoint / "model.keras")
    image = next((members["archive"] / "test").rglob("*.jpg"))
    proc = skinray(
        "explain", "--model", str(checkpoint), str(image), "--out", str(tmp_path / "png"), timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("skinray: error: ") and "safe mode never runs" in line and "Lambda" in line
    assert "safe_mode=False" not in proc.stderr and "Traceback" not in proc.stderr


def test_only_keras_files_load(tmp_path):
    from skinray import UserError
    from skinray.predictor import load_model

    legacy = tmp_path / "model.h5"
    legacy.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(UserError, match="only the .keras format"):
        load_model(legacy)


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(folder) -> str:
    manifest = json.loads((folder / "bundle.json").read_text())
    manifest["members"][0]["temperature"] *= 2
    return json.dumps(manifest)


def test_a_bundle_is_never_overwritten(cli_bundle, members, ray_cluster, tmp_path):
    from skinray import UserError
    from skinray.config import load_config
    from skinray.ensemble import build_ensemble

    before = (cli_bundle / "bundle.json").read_text()
    with pytest.raises(UserError, match="already exists and is a bundle of other members"):
        build_ensemble(members["runs"][:1], str(members["archive"]), str(cli_bundle), load_config())
    # A resubmitted job (the same members and data) finds its bundle and changes nothing.
    again = build_ensemble(members["runs"], str(members["archive"]), str(cli_bundle), load_config())
    assert again["version"] == json.loads(before)["version"]
    assert (cli_bundle / "bundle.json").read_text() == before
    # A folder that is not a bundle is never deleted; what a killed write leaves is written anew.
    foreign = tmp_path / "foreign"
    (foreign / "members").mkdir(parents=True)
    (foreign / "notes.txt").write_text("someone's files")
    with pytest.raises(UserError, match="not a bundle .* and holds other files"):
        build_ensemble(members["runs"], str(members["archive"]), str(foreign), load_config())
    assert (foreign / "notes.txt").read_text() == "someone's files"
    partial = tmp_path / "partial"
    shutil.copytree(cli_bundle / "members", partial / "members")  # a write cut short before its manifest
    (partial / "members" / "00-tiny" / "model.keras").write_bytes(b"cut short")
    resumed = build_ensemble(
        members["runs"],
        str(members["archive"]),
        str(partial),
        load_config(overrides=["score.max_actors=1", "score.batch_size=8"]),
    )
    from skinray.predictor import Predictor

    assert Predictor.from_path(str(partial)).version == resumed["version"]  # verified: every file whole


def test_fitting_runs_in_float32_whatever_the_configured_precision(
    members, ray_cluster, tmp_path, monkeypatch
):
    """Temperatures, weights, thresholds and sets are fitted on float32 logits even when the
    config asks bulk scoring for bfloat16 (`score.precision` is the scoring engine's, not fitting's)."""
    import skinray.inference
    from skinray.config import load_config
    from skinray.ensemble import build_ensemble

    class Seen(Exception):
        pass

    asked = []

    def stop(*args, **kwargs):
        asked.append(args[4].precision)
        raise Seen  # nothing more to see

    monkeypatch.setattr(skinray.inference, "labelled_logits", stop)
    with pytest.raises(Seen):
        build_ensemble(
            members["runs"],
            str(members["archive"]),
            str(tmp_path / "bundle"),
            load_config(overrides=["score.precision=bfloat16"]),
        )
    assert asked == ["float32"]


def _member_copy(run: str, tmp_path, name: str, edit) -> str:
    copy = tmp_path / name
    shutil.copytree(run, copy)
    for checkpoint in copy.glob("checkpoint_epoch_*"):
        edit(checkpoint)
    return str(copy)


def test_members_with_other_validation_images_are_refused(members, tmp_path):
    from skinray import UserError
    from skinray.ensemble import load_members

    def other_seed(checkpoint):
        config = checkpoint / "config.yaml"
        config.write_text(config.read_text().replace("seed: 0", "seed: 7", 1))

    other = _member_copy(members["runs"][1], tmp_path, "other-seed", other_seed)
    with pytest.raises(UserError, match="validate on different images.*data.seed 0 vs 7"):
        load_members([members["runs"][0], other], str(members["archive"]))


def test_members_with_other_classes_are_refused(members, tmp_path):
    from skinray import UserError
    from skinray.ensemble import load_members

    def rename(checkpoint):
        classes = json.loads((checkpoint / "classes.json").read_text())
        (checkpoint / "classes.json").write_text(json.dumps(classes[:-1] + ["Warts"]))

    other = _member_copy(members["runs"][1], tmp_path, "other-classes", rename)
    with pytest.raises(UserError, match="different classes.*Warts"):
        load_members([members["runs"][0], other], str(members["archive"]))


def test_evaluate_reports_the_ensemble_beside_its_members(cli_bundle, members, ray_cluster, tmp_path):
    from skinray.evaluate import evaluate

    report = evaluate(str(cli_bundle), str(members["archive"]), "test", str(tmp_path))
    assert report["num_images"] == 40
    assert set(report["members"]) == {"00-tiny", "01-tiny"}
    manifest = json.loads((cli_bundle / "bundle.json").read_text())
    assert report["model_version"] == manifest["version"]
    assert report["abstention"]["threshold"] == pytest.approx(manifest["threshold"])
    assert {"ece_before", "ece_after"} <= set(report["calibration"])
    for name in ("report.json", "report.md", "confusion_matrix.png", "reliability.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "report.md").read_text()
    assert "| **ensemble** |" in markdown and "| 01-tiny |" in markdown and "F1 00-tiny" in markdown
    differential = report["differential"]
    assert differential["images"] == 40 and sum(differential["size_histogram"].values()) == 40
    assert differential["calibration_images"] == 24 and differential["target"] == 0.9
    low, high = differential["interval"]
    assert low < 0.9 < high and set(differential["per_class_coverage"]) == set(manifest["classes"])
    assert "## Differential sets (aps-randomised, target coverage 90%)" in markdown
    # Validation through the same path gives what the bundle gives in this process, differentials too.
    from skinray import conformal
    from skinray.data.catalog import list_archive, model_split
    from skinray.data.ingest import decode_views
    from skinray.predictor import Predictor

    val = evaluate(str(cli_bundle), str(members["archive"]), "val", str(tmp_path / "val"))
    predictor = Predictor.from_path(str(cli_bundle))
    rows = model_split(list_archive(str(members["archive"])), "val", predictor.classes, predictor.config.data)
    views = [decode_views(open(p, "rb").read(), predictor.sizes) for p in rows["path"].to_pylist()]
    here = predictor.predict({s: np.stack([v[s] for v in views]) for s in predictor.sizes})
    labels = rows["label_index"].to_numpy()
    assert val["accuracy"] == pytest.approx((here.labels == labels).mean())
    inside = conformal.sets(here.probabilities, here.draws, predictor.set_threshold)
    assert val["differential"]["coverage"] == pytest.approx(inside[np.arange(len(labels)), labels].mean())
    assert val["out_of_distribution"]["refused"] == pytest.approx(here.out_of_distribution.mean())


# === Subgroups and the promotion gate ===


@pytest.fixture(scope="module")
def planted(members, tmp_path_factory):
    """The demo's test split as an archive of its own, with metadata: half of each class's photos
    in group `grey` are turned to greyscale (each class's lesions differ by hue: much harder), the
    others `colour`; two photos are left out of the metadata."""
    from PIL import Image

    root = tmp_path_factory.mktemp("planted") / "archive"
    shutil.copytree(members["archive"] / "train", root / "train")
    rows = []
    for folder in sorted((members["archive"] / "test").iterdir()):
        for i, photo in enumerate(sorted(folder.iterdir())):
            target = root / "test" / folder.name / photo.name
            target.parent.mkdir(parents=True, exist_ok=True)
            image = Image.open(photo)
            group = "grey" if i % 2 else "colour"
            (image.convert("L").convert("RGB") if group == "grey" else image).save(target)
            rows.append((f"test/{folder.name}/{photo.name}", group))
    lines = ["path,tone"] + [f'"{p}",{g}' for p, g in rows[2:]]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_evaluate_by_a_metadata_column_finds_the_planted_gap(cli_bundle, planted, ray_cluster, tmp_path):
    from skinray import UserError
    from skinray.config import load_config
    from skinray.evaluate import evaluate, format_report

    cfg = load_config(overrides=["evaluate.by=tone"])
    report = evaluate(str(cli_bundle), str(planted), "test", str(tmp_path), cfg)
    groups = report["groups"]["tone"]
    assert {g: v["images"] for g, v in groups["groups"].items()} == {
        "colour": 19,
        "grey": 19,
        "(no metadata)": 2,
    }
    gap = groups["gap"]
    assert (gap["best"], gap["worst"]) == ("colour", "grey") and gap["interval"][0] > 0.1
    assert "worst-group gap" in format_report(report, str(tmp_path))
    assert "## By tone" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "groups_tone.png").read_bytes()[:4] == b"\x89PNG"
    site = load_config(overrides=["evaluate.by=site"])
    with pytest.raises(UserError, match=r"the metadata has no column 'site' \(it has: tone\)"):
        evaluate(str(cli_bundle), str(planted), "test", str(tmp_path / "x"), site)


def test_a_bundle_over_the_gap_limit_is_not_promoted_and_not_served(cli_bundle, tmp_path):
    """The pipeline's gate (`evaluate.max_group_gap`), on a report whose gap's lower bound is over
    the limit: the bundle stays and loads, its manifest says why, and serve refuses it unless told."""
    from skinray.bundle import BundleError
    from skinray.config import load_config
    from skinray.pipeline import promotion_gate
    from skinray.predictor import Predictor
    from skinray.serve.app import build_app
    from skinray.serve.command import app_args

    copy = tmp_path / "bundle"
    shutil.copytree(cli_bundle, copy)
    before = json.loads((copy / "bundle.json").read_text())["version"]
    gap = {"best": "I-II", "worst": "V-VI", "accuracy_gap": 0.21, "interval": [0.12, 0.30]}
    report = {"model_version": before, "groups": {"fitzpatrick": {"gap": gap}}}
    within = load_config(overrides=["evaluate.by=fitzpatrick", "evaluate.max_group_gap=0.15"])
    assert promotion_gate(str(copy), report, within) is True  # 0.12 <= 0.15: promoted
    cfg = load_config(overrides=["evaluate.by=fitzpatrick", "evaluate.max_group_gap=0.05"])
    assert promotion_gate(str(copy), report, cfg) is False
    manifest = json.loads((copy / "bundle.json").read_text())
    assert manifest["promotion"]["promoted"] is False and manifest["version"] != before
    assert "by fitzpatrick, V-VI is 0.210 below I-II" in manifest["promotion"]["why"]
    assert Predictor.from_path(str(copy), load_models=False).version == manifest["version"]
    with pytest.raises(
        BundleError, match="was not promoted: by fitzpatrick, V-VI.*serve.allow_unpromoted=true"
    ):
        build_app(app_args(str(copy), load_config()))
    build_app(app_args(str(copy), load_config(overrides=["serve.allow_unpromoted=true"])))
    assert promotion_gate(str(copy), report, cfg) is False  # a rerun: resealed once
    assert json.loads((copy / "bundle.json").read_text())["version"] == manifest["version"]


def test_evaluate_with_foreign_images_reports_how_well_they_are_refused(
    cli_bundle, members, ray_cluster, tmp_path
):
    """`skinray evaluate --ood DIR`: real scans that are not skin (scikit-learn's handwritten digits)
    against the test split, through the same engine; the bundle's check tells them apart."""
    from skinray import UserError
    from skinray.demo import scanned_digit
    from skinray.evaluate import evaluate, format_report

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for i in range(30):
        (foreign / f"{i:02d}.png").write_bytes(scanned_digit(i))
    (foreign / "notes.txt").write_text("not an image")  # unreadable: counted, not scored
    report = evaluate(
        str(cli_bundle), str(members["archive"]), "test", str(tmp_path / "r"), ood_dir=str(foreign)
    )
    o = report["ood"]
    assert (o["images"], o["foreign_images"], o["unreadable"]) == (40, 30, 1)
    assert (
        o["auroc"] > 0.9
        and o["caught"] > 0.8
        and o["false_refusal"] == report["out_of_distribution"]["refused"]
    )
    assert "foreign images (30): AUROC" in format_report(report, str(tmp_path / "r"))
    assert "## Out of distribution" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(UserError, match="has no out-of-distribution check"):
        evaluate(
            members["runs"][0], str(members["archive"]), "test", str(tmp_path / "x"), ood_dir=str(foreign)
        )
