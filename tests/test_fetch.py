import json
import os
import subprocess
import sys
import zipfile

import pytest

from skinray.data.fetch import MARKER, FetchError, extract, has_credentials
from skinray.data.sample import DERMNET_CLASSES


def _dermnet_like_zip(path, wrap="dermnet/", per_class=2, classes=DERMNET_CLASSES[:3], extra=()):
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "test"):
            for cls in classes:
                for i in range(per_class):
                    z.writestr(f"{wrap}{split}/{cls}/{i:03d}.jpg", f"{split}{cls}{i}".encode())
        z.writestr(f"{wrap}LICENSE.txt", "cc")
        for name, data in extra:
            z.writestr(name, data)
    return path


def test_extracts_the_real_layout_and_second_run_does_nothing(tmp_path):
    zpath = _dermnet_like_zip(tmp_path / "dermnet.zip")
    dest = tmp_path / "data"
    result = extract(zpath, dest, verify_dermnet=False)
    assert result["already_present"] is False
    assert result["counts"] == {"train": 6, "test": 6}
    assert sorted(p.name for p in (dest / "train").iterdir()) == sorted(DERMNET_CLASSES[:3])
    sample = dest / "test" / DERMNET_CLASSES[0] / "001.jpg"
    assert sample.read_bytes() == f"test{DERMNET_CLASSES[0]}1".encode()
    stamp = sample.stat().st_mtime_ns
    again = extract(zpath, dest, verify_dermnet=False)
    assert again["already_present"] is True
    assert sample.stat().st_mtime_ns == stamp
    assert not [p for p in dest.iterdir() if p.name.startswith(".extract")]
    assert json.loads((dest / MARKER).read_text())["counts"] == {"train": 6, "test": 6}


def test_dermnet_verification_refuses_an_incomplete_download(tmp_path):
    zpath = _dermnet_like_zip(tmp_path / "d.zip", classes=DERMNET_CLASSES)
    with pytest.raises(FetchError, match="incomplete"):
        extract(zpath, tmp_path / "out")
    assert not (tmp_path / "out" / "train").exists()


def test_corrupt_zip(tmp_path):
    zpath = tmp_path / "broken.zip"
    zpath.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(FetchError, match="not a readable zip"):
        extract(zpath, tmp_path / "out", verify_dermnet=False)


def test_bad_crc_is_detected(tmp_path):
    zpath = _dermnet_like_zip(tmp_path / "d.zip", wrap="", per_class=1)
    data = bytearray(zpath.read_bytes())
    at = data.find(b"train" + DERMNET_CLASSES[0].encode() + b"0")
    data[at] ^= 0xFF
    zpath.write_bytes(bytes(data))
    with pytest.raises(FetchError, match="corrupt"):
        extract(zpath, tmp_path / "out", verify_dermnet=False)


def test_zip_slip_is_refused(tmp_path):
    zpath = _dermnet_like_zip(tmp_path / "d.zip", extra=[("../../evil.jpg", b"x")])
    with pytest.raises(FetchError, match="escape"):
        extract(zpath, tmp_path / "out", verify_dermnet=False)
    assert not (tmp_path / "evil.jpg").exists()


def test_wrong_layout(tmp_path):
    zpath = tmp_path / "flat.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("images/a.jpg", b"x")
    with pytest.raises(FetchError, match="train or test"):
        extract(zpath, tmp_path / "out", verify_dermnet=False)


def test_credential_sources(tmp_path):
    assert not has_credentials(env={}, home=tmp_path)
    assert has_credentials(env={"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, home=tmp_path)
    assert not has_credentials(env={"KAGGLE_USERNAME": "u"}, home=tmp_path)
    assert has_credentials(env={"KAGGLE_API_TOKEN": "t"}, home=tmp_path)
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert has_credentials(env={}, home=tmp_path)


def _run_fetch(tmp_path, env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE")}
    env.update(HOME=str(tmp_path / "home"), **env_extra)
    return subprocess.run([sys.executable, "-m", "skinray", "data", "fetch", "--dest", str(tmp_path / "d")],
                          env=env, capture_output=True, text=True, timeout=120)


def test_missing_credentials_say_what_to_do(tmp_path):
    proc = _run_fetch(tmp_path, {})
    assert proc.returncode != 0
    assert "kaggle.json" in proc.stderr and "KAGGLE_USERNAME" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_network_is_a_short_message_that_never_shows_the_key(tmp_path):
    """Kaggle is unreachable from this machine: the command must fail cleanly, key unprinted."""
    proc = _run_fetch(tmp_path, {"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "s3cr3t-key-value"})
    assert proc.returncode != 0
    assert "could not download" in proc.stderr and "--zip" in proc.stderr
    assert "s3cr3t-key-value" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d" / "train").exists()


def test_cli_extracts_a_downloaded_zip(tmp_path):
    zpath = _dermnet_like_zip(tmp_path / "d.zip")
    proc = subprocess.run([sys.executable, "-m", "skinray", "data", "fetch", "--zip", str(zpath),
                           "--dest", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "23 classes" in proc.stderr  # a 3-class zip is not DermNet
