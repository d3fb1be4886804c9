"""Shared fixtures: one Ray cluster for the whole session, and generated archives."""

import os
import tempfile

import pytest

# Tests run on 2-core machines: keep TensorFlow and Ray quiet and small.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Credentials for the loopback S3 (moto) of test_object_store.py, set before Ray starts so that its
# workers have them too; no test talks to real AWS.
for key, value in {
    "AWS_ACCESS_KEY_ID": "skinray-test",
    "AWS_SECRET_ACCESS_KEY": "skinray-test",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ[key] = value
# Remote models are cached per node: the tests' cache is their own (also for Ray's workers).
os.environ["SKINRAY_MODEL_CACHE"] = tempfile.mkdtemp(prefix="skinray-test-models-")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one.

    Four logical CPUs on a 2-core machine: two training workers and two data tasks can then be
    scheduled together, as on a real cluster where trainers and ingest have their own cores.
    """
    import ray
    from serving import free_port

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _metrics_export_port=free_port(),  # Prometheus' view of the cluster (the Serve metrics test)
        log_to_driver=True,
        runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}},
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_env(ray_cluster):
    """The environment for a `skinray` subprocess that joins the shared cluster instead of starting one."""
    return {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


@pytest.fixture(scope="session")
def sample_archive(tmp_path_factory):
    """A small learnable archive in DermNet's layout: 4 classes, 24 train + 6 test images each."""
    from skinray.data.sample import write_sample

    root = tmp_path_factory.mktemp("sample")
    write_sample(root, per_class=24, classes=4, seed=0)
    return root


@pytest.fixture(scope="session")
def awkward_files(tmp_path_factory):
    """The corpus of odd files (tests/corpus.py), keyed by case name."""
    from corpus import write_corpus

    return write_corpus(tmp_path_factory.mktemp("awkward"))


@pytest.fixture(scope="session")
def s3_server():
    """An S3 endpoint (moto) on 127.0.0.1 for the session: (pyarrow filesystem, URI query options)."""
    import pyarrow.fs as pafs

    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    fs = pafs.S3FileSystem(
        endpoint_override=f"http://{host}:{port}", region="us-east-1", allow_bucket_creation=True
    )
    yield fs, f"endpoint_override=http://{host}:{port}&region=us-east-1"  # credentials: set above
    server.stop()


@pytest.fixture(scope="session")
def members(ray_cluster, tmp_path_factory):
    """Two trained `tiny` members at different input sizes (48 and 64 px) on one archive, with a
    validation split large enough to calibrate on (48 images): what the ensemble and scoring tests share.
    """
    from skinray.config import load_config
    from skinray.data.sample import write_sample
    from skinray.train.trainer import train

    root = tmp_path_factory.mktemp("members")
    archive = root / "archive"
    write_sample(archive, per_class=40, classes=4, seed=1)  # 160 train (112 + 48 val), 40 test
    runs = []
    for name, size in (("small", 48), ("large", 64)):
        cfg = load_config(
            overrides=[
                f"data.archive={archive}",
                "data.val_fraction=0.3",
                "model.backbone=tiny",
                "model.weights=none",
                f"model.image_size={size}",
                "train.workers=1",
                "train.batch_size=16",
                "train.epochs=5",
                "train.finetune_lr=0.004",
            ]
        )
        runs.append(train(cfg, str(root / "runs"), name).run_dir)
    return {"archive": archive, "runs": runs, "root": root}


@pytest.fixture(scope="session")
def bundle(members, ray_cluster, tmp_path_factory):
    """The two members calibrated into one bundle: what scoring and serving tests load."""
    from skinray.config import load_config
    from skinray.ensemble import build_ensemble

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    build_ensemble(
        members["runs"],
        str(members["archive"]),
        str(out),
        load_config(overrides=["score.max_actors=1", "score.batch_size=8", "score.rows_per_file=8"]),
    )
    return out


# === The Serve endpoint (test_serve.py, test_page.py) ===


@pytest.fixture(scope="module")
def serve_url(ray_cluster):
    """Serve on the shared cluster, its proxy on a free loopback port; shut down after the module,
    so that its replicas do not hold the cluster's CPUs while training and scoring tests run."""
    from ray import serve
    from serving import free_port

    port = free_port()
    from skinray.serve.app import serve_section

    # A short request timeout, so that the slow-upload test ends soon (the slowest request takes seconds).
    serve.start(http_options=serve_section({"port": port, "request_timeout_s": 15}).http_options)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def endpoint(serve_url, bundle):
    """The bundle served without keys at / (the `together` layout), its ingress sized for the flood
    test: 6 MP images at most, 750 MB reserved (two decodes at once)."""
    from serving import FLOOD, deploy

    deploy(bundle, "open", "/", **FLOOD)
    return serve_url


@pytest.fixture(scope="module")
def keyed(serve_url, bundle, tmp_path_factory):
    """The bundle served with API keys from a file at /keyed, one deployment per member."""
    from serving import ANOTHER_KEY, KEY, deploy

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# one key per line\n{ANOTHER_KEY}\n{KEY}\n")
    deploy(bundle, "keyed", "/keyed", api_keys_file=str(keys), layout="per_member", docs=True)
    return serve_url + "/keyed"


@pytest.fixture(scope="session")
def photos(members):
    """Three of the members' test photos."""
    return sorted((members["archive"] / "test").rglob("*.jpg"))[:3]


# === Where the suite's time goes ===
_seconds_per_module: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Setup, call and teardown of every test, summed per test module (module fixtures included)."""
    module = report.nodeid.split("::", 1)[0]
    _seconds_per_module[module] = _seconds_per_module.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _seconds_per_module:
        return
    total = sum(_seconds_per_module.values())
    terminalreporter.section("seconds per test module")
    for module, seconds in sorted(_seconds_per_module.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:7.1f}  {100 * seconds / total:4.1f}%  {module}")
    terminalreporter.write_line(f"{total:7.1f}  total")
