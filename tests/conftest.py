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
def tracking_store(tmp_path_factory):
    """An MLflow store (SQLite, artifacts in a folder of their own) the demo's stages log into:
    its URI, for MLFLOW_TRACKING_URI."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("skinray", artifact_location=(root / "artifacts").as_uri())
    return uri


@pytest.fixture(scope="session")
def demo(ray_env, tracking_store, tmp_path_factory):
    """`skinray demo --quick --exit`, run once as a newcomer runs it (joining the tests' cluster),
    with experiment tracking on (`tracking_store`): (output folder, its port, the finished
    process). Its two trained members and its bundle are what the ensemble, scoring, serving and
    explanation tests share."""
    from commands import skinray
    from serving import free_port

    out, port = tmp_path_factory.mktemp("demo") / "out", free_port()
    proc = skinray(
        "demo",
        "--quick",
        "--exit",
        "--out",
        str(out),
        "--port",
        str(port),
        env={**ray_env, "MLFLOW_TRACKING_URI": tracking_store},
        timeout=1200,
    )
    return out, port, proc


@pytest.fixture(scope="session")
def members(demo):
    """The quick demo's two trained `tiny` members (48 and 64 px, `skinray.demo.TINY_RECIPE`) on its
    archive: 4 classes, 160 training photos of which 48 validate, 40 test photos."""
    out, _, proc = demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        "archive": out / "archive",
        "runs": [str(out / "runs" / "tiny48"), str(out / "runs" / "tiny64")],
        "root": out,
    }


@pytest.fixture(scope="session")
def bundle(members):
    """The quick demo's bundle of its two members: what scoring and serving tests load."""
    return members["root"] / "bundle"


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
def keyed_log(tmp_path_factory):
    """The folder the keyed endpoint writes its prediction log into."""
    return tmp_path_factory.mktemp("prediction-log")


@pytest.fixture(scope="module")
def keyed(serve_url, bundle, keyed_log, tmp_path_factory):
    """The bundle served with API keys from a file at /keyed, one deployment per member, logging
    its answers into `keyed_log`."""
    from serving import ANOTHER_KEY, KEY, deploy

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# one key per line\n{ANOTHER_KEY}\n{KEY}\n")
    deploy(
        bundle,
        "keyed",
        "/keyed",
        api_keys_file=str(keys),
        layout="per_member",
        docs=True,
        prediction_log=str(keyed_log),
        prediction_log_minutes=0.005,  # a file every third of a second: the test reads it soon
    )
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
