"""Bulk scoring: one Parquet row per input file, errors as rows, parity with Predictor, resume after a
killed driver, manifests, and an object-store round trip."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from commands import SKINRAY, skinray
from corpus import dds_without_pixel_format

from skinray import UserError
from skinray.config import load_config
from skinray.score import read_predictions

SMALL = ["score.max_actors=1", "score.batch_size=8", "score.rows_per_file=8"]


@pytest.fixture(scope="module")
def mixed_folder(members, tmp_path_factory):
    """The archive's test photos in a nested tree, plus files that are not usable images."""
    root = tmp_path_factory.mktemp("mixed")
    photos = sorted((members["archive"] / "test").rglob("*.*"))[:20]
    for i, photo in enumerate(photos):
        target = root / ("a" if i % 2 else "b/c") / f"{i:02d}{photo.suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, target)
    (root / "notes.txt").write_text("not a photo")
    (root / "b" / "truncated.jpg").write_bytes(photos[0].read_bytes()[:400])
    (root / "empty.png").write_bytes(b"")
    (root / "a" / "texture.jpg").write_bytes(dds_without_pixel_format())  # Pillow's DDS decoder raised
    (root / ".DS_Store").write_bytes(b"\0\0")  # hidden: not an input
    return root


@pytest.fixture(scope="module")
def scored(bundle, mixed_folder, ray_cluster, tmp_path_factory):
    from skinray.score import score

    out = tmp_path_factory.mktemp("scored")
    summary = score(
        load_config(overrides=SMALL + ["score.top_k=2"]), str(bundle), str(mixed_folder), str(out)
    )
    return {"summary": summary, "table": read_predictions(str(out)), "out": out}


def test_one_row_per_file_with_errors_as_rows(scored, mixed_folder, bundle):
    table, summary = scored["table"], scored["summary"]
    files = sorted(str(p) for p in mixed_folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert sorted(table["path"].to_pylist()) == files  # exactly once each
    rows = {r["path"]: r for r in table.to_pylist()}
    for broken in ("notes.txt", "b/truncated.jpg", "empty.png", "a/texture.jpg"):
        row = rows[str(mixed_folder / broken)]
        assert row["error"] and row["label"] is None and row["confidence"] is None
    assert "not an image skinray reads" in rows[str(mixed_folder / "a/texture.jpg")]["error"]
    good = [r for r in rows.values() if r["error"] is None]
    assert len(good) == 20
    manifest = json.loads((bundle / "bundle.json").read_text())
    for row in good:
        assert row["label"] in manifest["classes"] and row["model_version"] == manifest["version"]
        assert [t["label"] for t in row["top_k"]][0] == row["label"] and len(row["top_k"]) == 2
        assert row["confidence"] == pytest.approx(max(row["probabilities"]))
        unsure = row["confidence"] < manifest["threshold"]
        assert row["out_of_distribution"] == (row["ood_score"] > manifest["ood"]["threshold"])
        assert row["abstained"] == (unsure or row["out_of_distribution"])
        expected = (
            "not like the images this model knows"
            if row["out_of_distribution"]
            else "uncertain, refer"
            if unsure
            else None
        )
        assert row["reason"] == expected
        if row["out_of_distribution"]:
            assert row["differential"] == []  # refused: nothing said
        else:
            assert row["differential"][0] == row["label"]
        assert set(row["member_probabilities"]) == {"00-tiny", "01-tiny"}
    assert (summary["rows"], summary["scored"], summary["failed"]) == (24, 20, 4)
    assert summary["unique_paths"] == summary["listed"] == 24
    assert sum(summary["per_class"].values()) == 20
    assert json.loads((scored["out"] / "summary.json").read_text()) == summary


def test_scoring_equals_the_predictor_on_the_same_files(scored, bundle):
    """Parity: the Ray Data path and a direct Predictor call give the same probabilities (up to
    float32 rounding of batches of another composition)."""
    from skinray.data.ingest import decode_views
    from skinray.predictor import Predictor

    predictor = Predictor.from_path(str(bundle))
    good = [r for r in scored["table"].to_pylist() if r["error"] is None]
    views = [decode_views(open(r["path"], "rb").read(), predictor.sizes) for r in good]
    direct = predictor.predict({s: np.stack([v[s] for v in views]) for s in predictor.sizes})
    np.testing.assert_allclose(np.array([r["probabilities"] for r in good]), direct.probabilities, atol=1e-5)
    assert [r["label"] for r in good] == [predictor.classes[i] for i in direct.labels]


def test_monitor_reads_the_output_as_logs(scored, bundle, tmp_path):
    """`skinray monitor --logs` takes a bulk-scoring output: its answered rows, one group (no time)."""
    from skinray.config import MonitorConfig
    from skinray.monitor import monitor

    report = monitor(str(scored["out"]), [str(bundle)], tmp_path, MonitorConfig(min_rows=5))
    ((group,),) = [v["groups"] for v in report["versions"]]
    answered = sum(e is None for e in scored["table"]["error"].to_pylist())
    assert scored["summary"]["precision"] == {
        "configured": "float32",
        "used": "float32",
        "why": "as configured",
    }
    assert group["day"] == "all days" and group["rows"] == report["rows"] == answered > 0


def test_a_rerun_with_the_same_output_adds_nothing(scored, bundle, mixed_folder, ray_cluster):
    from skinray.score import score

    files_before = sorted(p.name for p in (scored["out"] / "predictions").iterdir())
    summary = score(load_config(overrides=SMALL), str(bundle), str(mixed_folder), str(scored["out"]))
    assert summary["rows"] == summary["unique_paths"] == 24
    assert sorted(p.name for p in (scored["out"] / "predictions").iterdir()) == files_before


def test_a_training_run_scores_as_a_one_member_model(members, mixed_folder, ray_cluster, tmp_path):
    from skinray.score import score

    summary = score(load_config(overrides=SMALL), members["runs"][0], str(mixed_folder), str(tmp_path))
    rows = read_predictions(str(tmp_path)).to_pylist()
    assert summary["scored"] == 20 and len(rows) == 24
    good = [r for r in rows if r["error"] is None]
    assert all(not r["abstained"] for r in good)  # no threshold without calibration
    assert all(set(r["member_probabilities"]) == {"tiny"} for r in good)
    best = json.loads((Path(members["runs"][0]) / "summary.json").read_text())["best_checkpoint"]
    assert {r["model_version"] for r in rows} == {f"{members['runs'][0]}/{Path(best).name}"}


def test_a_manifest_lists_the_inputs_and_its_columns_reach_the_rows(
    bundle, mixed_folder, ray_cluster, tmp_path
):
    """Users join scores back to their own records by their own ids: every other column of the
    manifest is passed through to the output rows, with its type, failed files included."""
    from skinray.score import score

    pq.write_table(
        pa.table(
            {
                "record_id": pa.array([1001, None], pa.int64()),
                "path": ["a/01.jpg", str(mixed_folder / "notes.txt")],
                "taken": pa.array([None, "2026-11-30"], pa.string()),
            }
        ),
        mixed_folder / "list.parquet",
    )
    (tmp_path / "list.csv").write_text(f"path,source\n{mixed_folder / 'a' / '01.jpg'},clinic\n")
    summary = score(
        load_config(overrides=SMALL), str(bundle), str(mixed_folder / "list.parquet"), str(tmp_path / "o1")
    )
    assert (summary["rows"], summary["scored"], summary["failed"]) == (2, 1, 1)
    table = read_predictions(str(tmp_path / "o1"))
    assert table.schema.field("record_id").type == pa.int64()
    rows = {Path(r["path"]).name: r for r in table.to_pylist()}
    assert (rows["01.jpg"]["record_id"], rows["01.jpg"]["taken"]) == (1001, None)
    assert (rows["notes.txt"]["record_id"], rows["notes.txt"]["taken"]) == (None, "2026-11-30")
    assert rows["notes.txt"]["error"] is not None
    (mixed_folder / "list.parquet").unlink()
    summary = score(
        load_config(overrides=SMALL), str(bundle), str(tmp_path / "list.csv"), str(tmp_path / "o2")
    )
    assert summary["scored"] == 1
    assert read_predictions(str(tmp_path / "o2"))["source"].to_pylist() == ["clinic"]
    (tmp_path / "clash.csv").write_text(f"path,label\n{mixed_folder / 'a' / '01.jpg'},Eczema\n")
    with pytest.raises(UserError, match=r"output columns \(label\): rename them"):
        score(load_config(overrides=SMALL), str(bundle), str(tmp_path / "clash.csv"), str(tmp_path / "o3"))


def test_bad_inputs_are_one_clear_line(bundle, tmp_path):
    def run(*args):
        return skinray("score", "--model", str(bundle), *args, timeout=300)

    (tmp_path / "list.csv").write_text("file\nx.jpg\n")
    for args, message in [
        (["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], "does not exist"),
        (["--input", str(tmp_path / "list.csv"), "--output", str(tmp_path / "o")], "no 'path' column"),
        (
            ["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--set", "score.max_actors=0"],
            "score.max_actors",
        ),
    ]:
        proc = run(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    proc = skinray(
        "score",
        "--model",
        str(tmp_path / "nothing"),
        "--input",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        timeout=300,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.slow
def test_a_killed_driver_resumes_with_every_row_exactly_once(bundle, members, ray_env, tmp_path):
    """SIGKILL the `skinray score` process once some parts are written; the same command finishes."""
    archive = tmp_path / "many"
    photos = sorted((members["archive"] / "train").rglob("*.*"))
    for i in range(160):
        target = archive / f"{i // 40}" / f"{i:03d}{photos[i % len(photos)].suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photos[i % len(photos)], target)
    out = tmp_path / "out"
    command = [
        *SKINRAY,
        "score",
        "--model",
        str(bundle),
        "--input",
        str(archive),
        "--output",
        str(out),
        "--set",
        "score.max_actors=1",
        "--set",
        "score.batch_size=4",
        "--set",
        "score.rows_per_file=4",
    ]
    first = subprocess.Popen(command, env=ray_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    committed = out / "_checkpoint"  # one file per part whose rows are written for good
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and len(list(committed.glob("*.parquet"))) < 3:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    parts_done = len(list(committed.glob("*.parquet")))
    assert 0 < parts_done < 40, f"the kill came too late to test resuming ({parts_done} of 40 parts written)"

    second = subprocess.run(command, env=ray_env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    paths = read_predictions(str(out))["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 160
    assert json.loads((out / "summary.json").read_text())["rows"] == 160


def test_scoring_reads_and_writes_an_object_store(bundle, mixed_folder, s3_server, ray_cluster):
    """Photos, the bundle and the predictions all in a bucket."""
    from skinray.score import score

    fs, options = s3_server
    fs.create_dir("score-bucket")
    for local, remote in ((mixed_folder / "a", "photos"), (bundle, "bundles/v1")):
        pafs.copy_files(
            str(local),
            f"score-bucket/{remote}",
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )
    output = f"s3://score-bucket/predictions-v1?{options}"
    summary = score(
        load_config(overrides=SMALL),
        f"s3://score-bucket/bundles/v1?{options}",
        f"s3://score-bucket/photos?{options}",
        output,
    )
    assert (summary["rows"], summary["scored"], summary["failed"]) == (11, 10, 1)  # a/texture.jpg: a DDS file
    assert summary["model_version"] == json.loads((bundle / "bundle.json").read_text())["version"]
    table = read_predictions(output)
    assert all(p.startswith("s3://score-bucket/photos/") for p in table["path"].to_pylist())
    with fs.open_input_stream("score-bucket/predictions-v1/summary.json") as f:
        assert json.loads(f.read())["rows"] == 11


def test_another_model_or_input_is_refused_into_the_same_output(
    bundle, members, mixed_folder, ray_cluster, tmp_path
):
    """Rows of two model versions (or of two inputs) silently mixed in one output before."""
    from skinray import UserError
    from skinray.score import score

    out = tmp_path / "out"
    score(load_config(overrides=SMALL), str(bundle), str(mixed_folder / "a"), str(out))
    run = json.loads((out / "run.json").read_text())
    assert (
        run["input"] == str(mixed_folder / "a")
        and run["model_version"] == read_predictions(str(out))["model_version"][0].as_py()
    )
    with pytest.raises(UserError, match="give it another --output") as other_model:
        score(load_config(overrides=SMALL), members["runs"][0], str(mixed_folder / "a"), str(out))
    assert run["model_version"] in str(other_model.value) and members["runs"][0] in str(other_model.value)
    with pytest.raises(UserError, match=f"on {mixed_folder / 'b'}"):
        score(load_config(overrides=SMALL), str(bundle), str(mixed_folder / "b"), str(out))
    assert not (out / ".lock").exists() and json.loads((out / "run.json").read_text()) == run


SUMMARY_PEAK = """
import json, sys, ray, pyarrow as pa
ray.init()
from skinray.score import summarise
class Model: source, version = "m", "v"
summary = summarise(sys.argv[1], int(sys.argv[2]), Model, 0.0)
print(json.dumps({"peak": pa.default_memory_pool().max_memory(), "summary": summary}))
"""


def test_rows_written_twice_are_found_across_overlapping_files_and_within_one(ray_cluster, tmp_path):
    """Files whose path ranges interleave without a common path count every row once; a path twice
    in one file, or in two files whose ranges overlap, counts once among the unique paths."""
    from skinray.score import summarise

    class Model:
        source, version = "m", "v"

    folder = tmp_path / "predictions"
    folder.mkdir()
    for name, paths in {
        "a": ["p1", "p3", "p5"],
        "b": ["p2", "p4"],  # inside a's range, no path in common
        "c": ["q1", "q1"],  # one path twice in one file
        "d": ["p4", "p9"],  # p4 again, in a file whose range overlaps b's
        "e": [],
    }.items():
        n = len(paths)
        table = pa.table(
            {"path": paths, "label": ["x"] * n, "abstained": [False] * n, "error": [None] * n},
            schema=pa.schema(
                [
                    ("path", pa.string()),
                    ("label", pa.string()),
                    ("abstained", pa.bool_()),
                    ("error", pa.string()),
                ]
            ),
        )
        pq.write_table(table, folder / f"{name}.parquet")
    summary = summarise(str(tmp_path), 8, Model, 0.0)
    assert (summary["rows"], summary["unique_paths"], summary["scored"]) == (9, 7, 9)


def test_the_summary_is_counted_on_the_cluster_not_in_the_drivers_memory(ray_env, tmp_path):
    """200,000 rows whose paths alone take 30 MB: the driver's Arrow memory peaks far below that
    (before: the whole table, then a Python list of every path, in the driver)."""
    n, folder = 200_000, tmp_path / "predictions"
    folder.mkdir()
    for part in range(8):
        rows = range(part * n // 8, (part + 1) * n // 8)
        pq.write_table(
            pa.table(
                {
                    "path": [f"s3://archive/clinic-{i % 97:02d}/{'x' * 100}/{i:07d}.jpg" for i in rows],
                    "label": [None if i % 10 == 0 else f"class-{i % 3}" for i in rows],
                    "abstained": [i % 4 == 0 for i in rows],
                    "error": [f"unreadable image header: {i}" if i % 10 == 0 else None for i in rows],
                }
            ),
            folder / f"part-{part}.parquet",
        )
    pq.write_table(pq.read_table(folder / "part-0.parquet").slice(0, 5), folder / "again.parquet")  # 5 twice
    proc = subprocess.run(
        [sys.executable, "-c", SUMMARY_PEAK, str(tmp_path), str(n)],
        env=ray_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = result["summary"]
    assert (summary["rows"], summary["unique_paths"], summary["failed"]) == (n + 5, n, n // 10 + 1)
    assert summary["failure_reasons"] == {"unreadable image header": n // 10 + 1}
    assert summary["per_class"] == {
        f"class-{k}": sum(1 for i in range(n) if i % 10 and i % 3 == k)
        + sum(1 for i in range(5) if i % 10 and i % 3 == k)
        for k in range(3)
    }
    assert summary["abstained"] == n // 4 + 2
    assert result["peak"] < 5_000_000, result["peak"]
