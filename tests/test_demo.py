"""`skinray demo --quick`: every stage, end to end, as a newcomer runs it (with tiny members)."""

import json

import pyarrow.parquet as pq


def test_the_quick_demo_runs_every_stage(demo):
    out, port, proc = demo
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = proc.stdout
    for stage in ("=== 1/4", "=== 2/4", "=== 3/4", "=== 4/4", "demo finished in", "where everything is"):
        assert stage in text
    assert (out / "check.json").is_file()
    assert (out / "tune" / "tiny48" / "best_config.yaml").is_file()  # the head search
    assert not (out / "tune" / "tiny64").exists()
    for member in ("tiny48", "tiny64"):
        assert (out / "runs" / member / "summary.json").is_file()
    manifest = json.loads((out / "bundle" / "bundle.json").read_text())
    assert [m["image_size"] for m in manifest["members"]] == [48, 64]
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert set(report["members"]) == {m["name"] for m in manifest["members"]}
    assert report["accuracy"] > 0.4  # 6 classes: chance is 0.17
    scored = pq.read_table(out / "scores" / "predictions")
    assert scored.num_rows == report["num_images"]  # the test split, one row per photo
    assert f"POST http://127.0.0.1:{port}/v1/predict" in text and "true class" in text
    assert "  differential: " in text  # the answer's set of conditions that remain possible
    assert "  by skin_tone (accuracy, 95% interval, images):" in text and "worst-group gap" in text
    assert set(report["groups"]["skin_tone"]["groups"]) <= {"1", "2", "3", "4"}  # the sample's metadata
    refused = "not skin -> not answered: not like the images this model knows"
    assert f"a scanned handwritten digit (scikit-learn's digits), {refused}" in text
    assert "a photo of a temple (scikit-learn's china.jpg), not skin -> " in text  # refused or not: said
    assert f"upload page       http://127.0.0.1:{port}/" in text


def test_running_the_pipeline_again_recomputes_nothing(demo, ray_cluster, capsys):
    """A resubmitted pipeline job: every stage's output is found and read back, nothing is redone."""
    from skinray.demo import QUICK, QUICK_SEARCH, SHARED
    from skinray.pipeline import run_pipeline

    out, _, proc = demo
    assert proc.returncode == 0
    first = json.loads((out / "evaluation" / "report.json").read_text())
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_pipeline(str(out / "archive"), str(out), QUICK, [*SHARED, *QUICK_SEARCH, "train.workers=2"])
    said = capsys.readouterr().out
    assert "data check: done before" in said and "tiny48: head search done before" in said
    assert "tiny48: trained before" in said and "tiny64: trained before" in said
    assert "holds the bundle of these members already" in said
    assert (again["accuracy"], again["model_version"]) == (first["accuracy"], first["model_version"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written


def test_an_unreadable_marker_reruns_its_step_with_a_warning(demo, ray_cluster, capsys):
    """check.json and report.json cut short (as a kill mid-write on a filesystem without atomic
    renames would leave them): the pipeline says so and redoes those steps, not a traceback."""
    from skinray.demo import QUICK, QUICK_SEARCH, SHARED
    from skinray.pipeline import run_pipeline

    out, _, proc = demo
    assert proc.returncode == 0
    first = json.loads((out / "evaluation" / "report.json").read_text())
    for marker in (out / "check.json", out / "evaluation" / "report.json"):
        marker.write_text(marker.read_text()[:40])
    again = run_pipeline(str(out / "archive"), str(out), QUICK, [*SHARED, *QUICK_SEARCH, "train.workers=2"])
    said = capsys.readouterr()
    assert said.err.count("is unreadable (cut short, or edited): treating its step as not finished") == 2
    assert "[pipeline] data check of" in said.out and "[pipeline] tiny48: trained before" in said.out
    assert json.loads((out / "check.json").read_text())["ok"] is True
    assert (again["accuracy"], again["model_version"]) == (first["accuracy"], first["model_version"])
    assert json.loads((out / "evaluation" / "report.json").read_text())["accuracy"] == first["accuracy"]
