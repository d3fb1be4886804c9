import subprocess
import sys

from skinray import __version__


def _skinray(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "skinray", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_command():
    proc = _skinray("--help")
    assert proc.returncode == 0
    for command in ("data", "train", "tune", "ensemble", "score", "evaluate", "demo"):
        assert command in proc.stdout
    data = _skinray("data", "--help")
    for action in ("fetch", "sample", "check"):
        assert action in data.stdout


def test_version():
    assert _skinray("--version").stdout.strip() == f"skinray {__version__}"


def test_bad_configuration_is_one_clear_line(sample_archive, tmp_path):
    proc = _skinray("train", "--data", str(sample_archive), "--out", str(tmp_path), "--set", "train.batch_sise=8")
    assert proc.returncode == 2
    assert "train.batch_sise" in proc.stderr and "unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_backbone(sample_archive, tmp_path):
    proc = _skinray("train", "--backbone", "vgg16", "--data", str(sample_archive), "--out", str(tmp_path))
    assert proc.returncode == 2 and "known: resnet50" in proc.stderr


def test_missing_imagenet_weights_fail_before_training(sample_archive, tmp_path):
    """No network here: the run stops before any cluster starts, saying where the file goes."""
    proc = _skinray("train", "--backbone", "resnet50", "--data", str(sample_archive), "--out", str(tmp_path),
                    timeout=120)
    assert proc.returncode == 2
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_missing_archive(tmp_path):
    proc = _skinray("train", "--backbone", "tiny", "--weights", "none", "--data", str(tmp_path / "nope"),
                    "--out", str(tmp_path / "runs"))
    assert proc.returncode == 2 and "not a folder" in proc.stderr
