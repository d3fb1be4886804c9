import json
import os
import shutil
import zipfile

import pytest
from commands import one_error_line, skinray

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
    return skinray("data", "fetch", "--dest", str(tmp_path / "d"), env=env, timeout=120)


def test_missing_credentials_say_what_to_do(tmp_path):
    line = one_error_line(_run_fetch(tmp_path, {}))
    assert "kaggle.json" in line and "KAGGLE_USERNAME" in line


def test_no_network_is_a_short_message_that_never_shows_the_key(tmp_path):
    """Kaggle is unreachable from this machine: the command must fail cleanly, key unprinted."""
    proc = _run_fetch(tmp_path, {"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": "s3cr3t-key-value"})
    line = one_error_line(proc)
    assert "could not download" in line and "--zip" in line
    assert "s3cr3t-key-value" not in proc.stderr + proc.stdout
    assert not (tmp_path / "d" / "train").exists()


def _fetch_zip(zpath, dest, *flags):
    return skinray("data", "fetch", "--zip", str(zpath), "--dest", str(dest), *flags, timeout=120)


def test_cli_extracts_a_downloaded_zip(tmp_path):
    """A zip in DermNet's layout (wrapped in a top folder, a licence file beside) extracts; a second
    run finds it; a 3-class zip is refused as DermNet in one line, and accepted with --not-dermnet."""
    zpath = _dermnet_like_zip(tmp_path / "d.zip")
    assert "23 classes" in one_error_line(_fetch_zip(zpath, tmp_path / "out"))
    assert not (tmp_path / "out" / "train").exists()
    proc = _fetch_zip(zpath, tmp_path / "out", "--not-dermnet")
    assert proc.returncode == 0, proc.stderr
    assert "d.zip extracted in" in proc.stdout and "'train': 6" in proc.stdout and "3 classes" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out" / "test").iterdir()) == sorted(DERMNET_CLASSES[:3])
    again = _fetch_zip(zpath, tmp_path / "out", "--not-dermnet")
    assert again.returncode == 0 and "already present" in again.stdout


def test_split_folders_it_did_not_write_are_never_replaced(tmp_path):
    zpath = _dermnet_like_zip(tmp_path / "d.zip")
    mine = tmp_path / "out" / "train" / "my-class" / "photo.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"someone's photo")
    with pytest.raises(FetchError, match="did not extract there"):
        extract(zpath, tmp_path / "out", verify_dermnet=False)
    assert mine.read_bytes() == b"someone's photo"
    (tmp_path / "empty" / "train").mkdir(parents=True)  # an empty folder holds nothing to lose
    assert extract(zpath, tmp_path / "empty", verify_dermnet=False)["counts"]["train"] == 6


def test_free_space_is_checked_before_extracting(tmp_path, monkeypatch):
    zpath = _dermnet_like_zip(tmp_path / "d.zip")
    monkeypatch.setattr("shutil.disk_usage", lambda _: shutil._ntuple_diskusage(100, 90, 10))
    with pytest.raises(FetchError, match=r"extracts to 0\.00 GB but .* has 0\.00 GB free"):
        extract(zpath, tmp_path / "out", verify_dermnet=False)
    assert not (tmp_path / "out" / "train").exists()


def test_an_unreadable_marker_means_not_extracted(tmp_path, capsys):
    zpath = _dermnet_like_zip(tmp_path / "d.zip")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / MARKER).write_text('{"dataset": "shubh')  # a write cut short (before: a traceback)
    result = extract(zpath, tmp_path / "out", verify_dermnet=False)
    assert result["already_present"] is False and result["counts"] == {"train": 6, "test": 6}
    assert "unreadable" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / MARKER).read_text())["counts"] == {"train": 6, "test": 6}
