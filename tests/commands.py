"""Running commands in tests: the `skinray` command line as a user runs it, and the Debian tools
the tests install when missing."""

import os
import shutil
import subprocess
import sys

import pytest

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


def debian_tool(command: str, package: str) -> str:
    """The path of `command`, installing Debian's `package` with apt-get when it is missing (as
    root, or through sudo): the browser of the page tests, Prometheus for the metrics test."""
    found = shutil.which(command)
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", package]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"could not install Debian's {package}: {done.stderr[-2000:]}")
    return shutil.which(command)
