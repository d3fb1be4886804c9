"""The data layer on an object store: the sample archive in an S3 bucket served by moto on loopback.

pyarrow.fs talks to it exactly as to S3 (same client, same requests); the filesystem, with its
endpoint and credentials, travels to the Ray tasks that read the files.
"""

from urllib.parse import quote

import numpy as np
import pyarrow.fs as pafs
import pytest
from commands import skinray

from skinray.data.catalog import list_archive
from skinray.data.ingest import ImageSource, iter_stream, stream


@pytest.fixture(scope="module")
def bucket_uri(sample_archive, s3_server):
    fs, options = s3_server
    fs.create_dir("skin-bucket")
    pafs.copy_files(
        str(sample_archive),
        "skin-bucket/dermnet",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )
    return f"s3://skin-bucket/dermnet?{options}"


def test_catalog_of_a_bucket_equals_the_local_one(bucket_uri, sample_archive):
    remote, local = list_archive(bucket_uri), list_archive(str(sample_archive))
    assert remote.classes == local.classes
    assert remote.table.num_rows == local.table.num_rows == 120
    assert remote.table["path"][0].as_py().startswith("s3://skin-bucket/dermnet/")
    assert sorted(remote.table["split"].to_pylist()) == sorted(local.table["split"].to_pylist())


def test_ray_tasks_read_the_bucket_and_decode_the_same_pixels(ray_cluster, bucket_uri, sample_archive):
    remote, local = list_archive(bucket_uri), list_archive(str(sample_archive))

    def images(catalog):
        rows = catalog.split("test").slice(0, 6)
        batches = iter_stream(stream(rows, source=ImageSource.of(catalog), size=48, batch_size=3), 3)
        return {
            p.rsplit("/", 3)[-3:][-1]: img
            for b in batches
            for p, img in zip(b["path"], b["image"])
            if b["ok"].all()
        }

    from_bucket, from_disk = images(remote), images(local)
    assert len(from_bucket) == 6 and from_bucket.keys() == from_disk.keys()
    for name in from_disk:
        assert np.array_equal(from_bucket[name], from_disk[name])


def test_data_check_on_a_bucket(ray_cluster, bucket_uri):
    from skinray.data.check import check_archive

    report = check_archive(bucket_uri)
    assert report["ok"] and sum(report["counts"]["train"].values()) == 96


@pytest.mark.slow
def test_a_run_reads_and_writes_the_bucket_and_evaluates_into_it(ray_cluster, bucket_uri, capsys):
    """The cluster path: archive, checkpoints, TensorBoard, summary, the report and a bundle all in
    object storage, through URIs that carry credentials: none of it, and no line printed, holds them."""
    from skinray.config import load_config
    from skinray.ensemble import build_ensemble
    from skinray.evaluate import evaluate
    from skinray.storage import join_uri, resolve
    from skinray.train.trainer import train

    keyed = bucket_uri.replace("s3://", f"s3://AKIAEXAMPLE:{quote(SECRET, safe='')}@")
    runs = keyed.replace("/dermnet?", "/runs?")
    cfg = load_config(
        overrides=[
            f"data.archive={keyed}",
            "model.backbone=tiny",
            "model.weights=none",
            "model.image_size=48",
            "train.workers=2",
            "train.batch_size=8",
            "train.epochs=2",
            "train.head_epochs=1",
        ]
    )
    result = train(cfg, runs, "cloud")
    fs, path, _ = resolve(join_uri(runs, "cloud"))
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(path))}
    assert {"config.yaml", "classes.json", "summary.json", "tensorboard", "checkpoint_epoch_0002"} <= names
    assert result.best_metrics["epoch"] in (1, 2)
    reports = keyed.replace("/dermnet?", "/evaluation?")  # what jobs/evaluate.py writes to
    report = evaluate(join_uri(runs, "cloud"), keyed, "test", reports)
    fs, path, _ = resolve(reports)
    assert report["num_images"] == 24
    assert {"report.md", "report.json", "confusion_matrix.png", "reliability.png", "config.yaml"} <= {
        info.base_name for info in fs.get_file_info(pafs.FileSelector(path))
    }
    bundle = keyed.replace("/dermnet?", "/bundles/cloud?")
    manifest = build_ensemble([join_uri(runs, "cloud")], keyed, bundle, cfg)
    assert manifest["members"][0]["source"].startswith("s3://***@skin-bucket/runs/cloud")
    said = capsys.readouterr()
    assert "[skinray] 4 classes" in said.out and _leaks(said.out + said.err) == []
    stored = _stored_texts(fs, ("/runs/", "/evaluation/", "/bundles/cloud/"))
    assert sum("s3://***@skin-bucket" in t for t in stored) >= 4  # the URIs were stored: redacted
    assert _leaks(*stored) == []


# === Credentials in URIs are used to open files, and never printed, stored or served ===

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYz3cr3t"  # the shape of an AWS secret key (it holds '/')


def _leaks(*texts: str) -> list[str]:
    return [t[:200] for t in texts if SECRET in t or quote(SECRET, safe="") in t]


def _stored_texts(fs, under: tuple[str, ...]) -> list[str]:
    """Every file the bucket holds below `under`, as text (Parquet as its rows' JSON)."""
    import pyarrow.parquet as pq

    texts = []
    for info in fs.get_file_info(pafs.FileSelector("skin-bucket", recursive=True)):
        if info.type != pafs.FileType.File or not any(u in info.path for u in under):
            continue
        if info.path.endswith(".parquet"):
            with fs.open_input_file(info.path) as f:
                texts.append(pq.read_table(f).to_pandas().to_json())
        else:
            with fs.open_input_stream(info.path) as f:
                texts.append(f.read().decode(errors="replace"))
    return texts


@pytest.mark.slow
def test_credentials_in_uris_never_leave(bucket_uri, bundle, s3_server, ray_env, ray_cluster):
    """Every kind of URI the commands take carries credentials (moto takes any): the commands work,
    and the secret is in no console line, no file they wrote, and none of Ray's logs."""
    import json
    from pathlib import Path
    from urllib.parse import quote

    fs, options = s3_server
    pafs.copy_files(
        str(bundle),
        "skin-bucket/bundles/v1",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=fs,
    )

    def uri(path):
        return f"s3://AKIAEXAMPLE:{quote(SECRET, safe='')}@skin-bucket/{path}?{options}"

    def run(*args, expect=0):
        out = skinray(*args, timeout=600, env=ray_env, expect=expect)
        assert SECRET not in out.stdout + out.stderr and quote(SECRET, safe="") not in out.stdout + out.stderr
        return out

    check = json.loads(run("data", "check", uri("dermnet"), "--json").stdout)
    assert check["ok"] and check["archive"].startswith("s3://***@skin-bucket/dermnet")
    scored = run(
        "score",
        "--model",
        uri("bundles/v1"),
        "--input",
        uri("dermnet/test"),
        "--output",
        uri("scored"),
        "--set",
        "score.max_actors=1",
    )
    assert "24 scored" in scored.stdout
    run("evaluate", "--model", uri("bundles/v1"), "--data", uri("dermnet"), "--out", uri("evaluation-keys"))
    missing = run(
        "evaluate", "--model", uri("bundles/v1"), "--data", uri("nowhere"), "--out", uri("x"), expect=2
    )
    assert "s3://***@skin-bucket/nowhere" in missing.stderr  # the error names the archive, not its secret

    # Serve would keep the URI in its application's stored config: refused, credentials unechoed.
    for flags in (["--print-config"], []):
        refused = run("serve", "--model", uri("bundles/v1"), *flags, expect=2)
        assert "credentials" in refused.stderr
    texts = _stored_texts(fs, ("/scored/", "/evaluation-keys/"))
    assert len(texts) >= 6 and any("model_version" in t for t in texts)  # summary, report, predictions, ...
    assert _leaks(*texts) == []
    logs = Path(ray_cluster._private.worker._global_node.get_session_dir_path()) / "logs"
    assert not [p.name for p in logs.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
