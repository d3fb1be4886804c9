"""The documentation site builds with `mkdocs build --strict` (a broken link or a missing page fails
it), its reference pages are generated from the code, and the README stays a front door."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build(project: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(project / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        cwd=project,
    )


def test_the_site_builds_strictly_with_every_key_and_command(tmp_path):
    from skinray.cli import COMMAND_FLAGS
    from skinray.config import Config

    proc = _build(ROOT, tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    configuration = (tmp_path / "site" / "configuration" / "index.html").read_text()
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.default_factory):
            assert f"<code>{section.name}.{field.name}</code>" in configuration, (
                f"{section.name}.{field.name}"
            )
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    for command in [*COMMAND_FLAGS, "data fetch", "data sample", "data check", "demo"]:
        if command != "check":
            assert f"<code>skinray {command}</code>" in cli, command


def test_every_config_key_has_its_meaning_written_down():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.pop(0)
    rows = [line for line in hooks.config_reference().splitlines() if line.startswith("| `")]
    assert len(rows) > 80
    assert [row for row in rows if row.rstrip().endswith("|  |")] == []


def test_a_broken_link_fails_the_build(tmp_path):
    """The positive control of the first test: strict mode is on, so a link to a page that is not
    there stops the build."""
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copyfile(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    (project / "docs" / "tuning.md").write_text("# Tuning\n\nSee [the missing page](missing.md).\n")
    proc = _build(project, tmp_path / "site")
    assert proc.returncode != 0 and "missing.md" in proc.stderr


def test_the_readme_is_a_front_door_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    links = re.findall(r"\]\((docs/[^)#]+)\)", text)
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")} - {"docs/index.md"}
    assert set(links) == pages  # every page linked, every link a page
    assert "./dev demo" in text and "./dev test" in text


def test_the_benchmark_tables_hold_the_latest_recorded_runs():
    """Every benchmark whose runs are recorded under benchmarks/results/ has its latest run in
    docs/benchmarks.md, as the row the benchmark printed (one formatter: benchmarks/common.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
    finally:
        sys.path.pop(0)
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    recorded = sorted(p.stem for p in (ROOT / "benchmarks" / "results").glob("*.jsonl"))
    assert {"ingest", "score"} <= set(recorded)
    for name in recorded:
        lines = common.latest(name)
        assert lines, name
        for line in lines:
            for row in common.rows(name, line):
                assert row in text, (name, row)
