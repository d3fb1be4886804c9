"""Running the `skinray` command line in tests, as a user runs it: one helper for every test."""

import subprocess
import sys

SKINRAY = [sys.executable, "-m", "skinray"]  # for the tests that need a Popen (to kill it)


def skinray(*args, env=None, timeout=300, expect=None, **options) -> subprocess.CompletedProcess:
    """`skinray ARGS` in a subprocess, its output captured; with `expect`, asserts the exit code."""
    proc = subprocess.run(
        [*SKINRAY, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **options
    )
    if expect is not None:
        assert proc.returncode == expect, (args, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The promise for a user's mistake: exit code 2 and one `skinray: error:` line on stderr."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skinray: error: "), proc.stderr[-3000:]
    return lines[0]
