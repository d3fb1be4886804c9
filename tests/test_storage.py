"""storage.py: locations, whole-file writes on disk and on an object store, and URI redaction."""

import json

import pytest

from skinray import storage


def test_a_json_file_round_trips_and_no_temporary_file_is_left(tmp_path):
    target = tmp_path / "deep" / "summary.json"
    storage.write_json(str(target), {"rows": 3})
    storage.write_json(str(target), {"rows": 4})  # replaced whole
    assert storage.read_json(str(target)) == {"rows": 4}
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]
    assert storage.read_json(str(tmp_path / "absent.json")) is None


def test_a_failed_write_leaves_what_was_there_and_no_temporary_file(tmp_path):
    """The rename onto a non-empty folder fails: the folder and its file stay as they were."""
    target = tmp_path / "report.json"
    target.mkdir()
    (target / "keep.txt").write_text("kept")
    with pytest.raises(OSError):
        storage.write_text(str(target), "new")
    assert (target / "keep.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_the_same_calls_on_an_object_store(s3_server):
    fs, options = s3_server
    fs.create_dir("storage-bucket")
    base = f"s3://storage-bucket/out?{options}"
    assert storage.is_uri(base) and storage.kind(base) is None and storage.is_empty(base)
    storage.write_json(storage.join_uri(base, "a/check.json"), {"ok": True})
    assert storage.read_json(storage.join_uri(base, "a/check.json")) == {"ok": True}
    assert storage.kind(storage.join_uri(base, "a/check.json")) == "file"
    assert storage.list_dirs(base) == ["a"] and not storage.is_empty(base)
    local = storage.local_copy(storage.join_uri(base, "a"))
    assert json.loads((local / "check.json").read_text()) == {"ok": True}


def test_locations():
    assert storage.join_uri("s3://b/runs?region=x", "r1") == "s3://b/runs/r1?region=x"
    assert not storage.is_uri("/data/x") and not storage.is_uri("file:///data/x")
    assert storage.absolute("s3://b/x") == "s3://b/x" and storage.absolute("x").startswith("/")
    with pytest.raises(FileNotFoundError):
        storage.local_copy("/nowhere/at/all")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("s3://AKIAX:wJalr/XUtnFEMI@bucket/dermnet", "s3://***@bucket/dermnet"),
        (
            "s3://bucket/runs?region=eu-west-1&secret_key=S3CRET&access_key=AK",
            "s3://bucket/runs?region=eu-west-1&secret_key=***&access_key=***",
        ),
        ("gs://bucket/x?access_token=ya29.tok", "gs://bucket/x?access_token=***"),
        ("archive 's3://K:S@b/x' is not a folder", "archive 's3://***@b/x' is not a folder"),
        ("input=s3://K:S@b/x", "input=s3://***@b/x"),
        ("s3://bucket/plain/path?region=us-east-1", "s3://bucket/plain/path?region=us-east-1"),
        ("/local/path/with:colon@at", "/local/path/with:colon@at"),
    ],
)
def test_credentials_in_uris_are_redacted(text, expected):
    assert storage.redact(text) == expected


def test_an_at_sign_in_a_path_is_not_taken_for_credentials():
    assert storage.redact("s3://bucket/user@clinic/a.jpg") == "s3://bucket/user@clinic/a.jpg"


def test_a_path_is_opened_without_the_credentials_its_uri_carried():
    assert storage.without_credentials("AKIA:se/cret@bucket/a/b.jpg") == "bucket/a/b.jpg"
    assert storage.without_credentials("bucket/user@clinic/b.jpg") == "bucket/user@clinic/b.jpg"


def test_redaction_leaves_the_text_around_a_uri_alone():
    line = '{"archive": "s3://K:S/x@b/dermnet?endpoint_override=http://127.0.0.1:9000&secret_key=Z", "n": 1}'
    assert storage.redact(line) == (
        '{"archive": "s3://***@b/dermnet?endpoint_override=http://127.0.0.1:9000&secret_key=***", "n": 1}'
    )


def test_a_remote_model_is_copied_once_per_node_and_anew_when_it_changes(s3_server, tmp_path, monkeypatch):
    fs, options = s3_server
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    fs.create_dir("cache-bucket/run")
    with fs.open_output_stream("cache-bucket/run/model.keras") as f:
        f.write(b"weights")
    run = f"s3://cache-bucket/run?{options}"
    first = storage.local_copy(run)
    inode = (first / "model.keras").stat().st_ino
    again = storage.local_copy(run)
    assert again == first and (again / "model.keras").stat().st_ino == inode  # not copied again
    with fs.open_output_stream("cache-bucket/run/model.keras") as f:
        f.write(b"weights, trained further")
    changed = storage.local_copy(run)
    assert changed != first and (changed / "model.keras").read_bytes() == b"weights, trained further"
    single = storage.local_copy(f"s3://cache-bucket/run/model.keras?{options}")
    assert single.name == "model.keras" and single.read_bytes() == b"weights, trained further"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".partial-")]


def test_the_cache_evicts_the_least_recently_used_past_its_bound(tmp_path, monkeypatch):
    import os
    import time

    cache = tmp_path / "cache"
    hours_ago = time.time() - 3 * 3600
    for name, age in (("oldest", 3), ("older", 2), ("recent", 0)):
        entry = cache / name
        (entry / "content").mkdir(parents=True)
        (entry / "content" / "model.keras").write_bytes(b"x" * 2**20)
        (entry / storage.COMPLETE).write_text("s3://b/m")
        os.utime(entry / storage.COMPLETE, (time.time() - age * 3600,) * 2)
    stale = cache / ".partial-abc-1-deadbeef"  # a copy whose process died
    stale.mkdir()
    os.utime(stale, (hours_ago, hours_ago))
    monkeypatch.setenv(storage.CACHE_LIMIT_ENV, str(1.5 / 1024))  # 1.5 MB: room for one entry
    storage.evict(cache, keep=cache / "recent")
    assert sorted(p.name for p in cache.iterdir()) == ["recent"]
    monkeypatch.setenv(storage.CACHE_LIMIT_ENV, "0")
    storage.evict(cache)
    assert sorted(p.name for p in cache.iterdir()) == ["recent"]  # used within the hour: kept over the bound


def test_a_lock_has_one_holder_and_a_dead_holder_is_replaced(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from skinray import UserError

    lock = str(tmp_path / ".lock")
    with storage.lock(lock, "output 'x'"):
        with pytest.raises(UserError, match=r"output 'x' is being written by another run \(pid \d+"):
            with storage.lock(lock, "output 'x'"):
                pass
    assert not (tmp_path / ".lock").exists()  # released
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (tmp_path / ".lock").write_text(
            json.dumps({"host": socket.gethostname(), "pid": alive.pid, "since": 0})
        )
        with pytest.raises(UserError, match=f"pid {alive.pid}"):
            with storage.lock(lock, "output 'x'"):
                pass
        for left in (json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": 0}), ""):
            (tmp_path / ".lock").write_text(left)  # a killed run's lock; one cut short while written
            with storage.lock(lock, "output 'x'"):
                assert json.loads((tmp_path / ".lock").read_text())["pid"] != dead.pid
    finally:
        alive.kill()


def test_a_marker_cut_short_reads_as_missing_with_a_warning(tmp_path, capsys):
    from skinray.storage import read_marker

    assert read_marker(str(tmp_path / "summary.json")) is None and capsys.readouterr().err == ""
    (tmp_path / "summary.json").write_text('{"best_metrics": {"val_acc')
    assert read_marker(str(tmp_path / "summary.json")) is None
    said = capsys.readouterr().err
    assert said.startswith("[skinray] warning: ") and "summary.json is unreadable" in said
    storage.write_json(str(tmp_path / "summary.json"), {"ok": True})
    assert read_marker(str(tmp_path / "summary.json")) == {"ok": True}
