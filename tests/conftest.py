"""Shared fixtures: one Ray cluster for the whole session, and generated archives."""

import os

import pytest

# Tests run on 2-core machines: keep TensorFlow and Ray quiet and small.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Credentials for the loopback S3 (moto) of test_object_store.py, set before Ray starts so that its
# workers have them too; no test talks to real AWS.
for key, value in {"AWS_ACCESS_KEY_ID": "skinray-test", "AWS_SECRET_ACCESS_KEY": "skinray-test",
                   "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ[key] = value


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one.

    Four logical CPUs on a 2-core machine: two training workers and two data tasks can then be
    scheduled together, as on a real cluster where trainers and ingest have their own cores.
    """
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


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
