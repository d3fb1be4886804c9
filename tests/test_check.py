import json
import shutil

import pytest
from commands import skinray


@pytest.fixture(scope="module")
def messy_archive(sample_archive, awkward_files, tmp_path_factory):
    """The sample archive, plus a duplicate within train, a train image copied into test, and the
    awkward corpus as its own class."""
    root = tmp_path_factory.mktemp("messy")
    shutil.copytree(sample_archive, root, dirs_exist_ok=True)
    classes = sorted(p.name for p in (root / "train").iterdir())
    first = sorted((root / "train" / classes[0]).glob("*.jpg"))[0]
    shutil.copy(first, root / "train" / classes[0] / "copy_of_first.jpg")
    second = sorted((root / "train" / classes[1]).glob("*.jpg"))[0]
    shutil.copy(second, root / "test" / classes[1] / "leaked.jpg")
    shutil.copytree(next(iter(awkward_files.values())).parent, root / "train" / "Odd")
    return root


def test_report(ray_cluster, messy_archive):
    from skinray.data.check import check_archive, format_report

    report = check_archive(str(messy_archive))
    assert report["counts"]["test"][report["classes"][1]] == 7
    assert report["counts"]["train"][report["classes"][0]] == 25
    assert report["imbalance"]["train"] == pytest.approx(25 / 11, abs=0.01)  # the odd class: 11 files
    assert report["duplicates_within_split"] == 1 and report["duplicates_across_splits"] == 1
    leaked = [d for d in report["duplicates"] if d["splits"] == ["test", "train"]][0]
    assert any(p.endswith("leaked.jpg") for p in leaked["paths"])
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in report["unreadable"]}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.jpg", "bomb.png", "texture.jpg"}
    assert "empty file" in reasons["empty.jpg"]
    assert (
        "not an image skinray reads" in reasons["texture.jpg"]
    )  # a DDS texture: its report line, not a crash
    assert [m["path"].rsplit("/", 1)[-1] for m in report["misnamed"]] == ["really_png.jpg"]
    assert report["ok"] is False
    text = format_report(report)
    assert "PROBLEMS FOUND" in text and "truncated.jpg" in text


def test_cli_json_and_exit_codes(ray_env, messy_archive, sample_archive):
    proc = skinray("data", "check", str(messy_archive), "--json", timeout=300, env=ray_env)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["duplicates_across_splits"] == 1
    clean = skinray("data", "check", str(sample_archive), timeout=300, env=ray_env)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.strip().endswith("ok")


def test_console_shows_rays_info_logs_only_when_verbose(ray_env, sample_archive):
    """By default Ray Data's INFO lines (execution plans) go to Ray's log files; --verbose shows them."""

    def check(*flags):
        proc = skinray(*flags, "data", "check", str(sample_archive), timeout=300, env=ray_env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    quiet, loud = check(), check("--verbose")
    assert "Execution plan" not in quiet and "Ray's own logs: " in quiet
    assert "Execution plan" in loud
