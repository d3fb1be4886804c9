"""A real two-node Ray cluster on this machine, with token authentication: the pipeline job is
submitted through the Jobs API, runs on both nodes, and a submission without the token is refused.

The nodes are two `ray start` processes with their own temp folders (as two machines have their
own disks) and their own ports, so the session's shared test cluster is left alone; they are
stopped by signalling exactly their processes (`ray stop` would stop every Ray on the machine).
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from serving import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class TwoNodes:
    def __init__(self, folder: Path):
        self.folder = folder
        self.token = folder / "token"
        self.token.write_text(secrets.token_hex(32))
        self.gcs, self.dashboard = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.dashboard}"
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        }

    def ray(self, *args, timeout=180, env=None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True, timeout=timeout
        )

    def start(self) -> None:
        head = self.ray(
            "start",
            "--head",
            f"--port={self.gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=2",
            f"--temp-dir={self.folder / 'head'}",
            "--disable-usage-stats",
        )
        assert head.returncode == 0, head.stderr[-3000:]
        # The second node: its own CPUs, and the custom resource the training workers ask for.
        worker = self.ray(
            "start",
            f"--address=127.0.0.1:{self.gcs}",
            "--num-cpus=2",
            '--resources={"trainer": 2}',
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.folder / 'worker'}",
        )
        assert worker.returncode == 0, worker.stderr[-3000:]

    def processes(self) -> list[int]:
        marker = str(self.folder)
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                        errors="replace"
                    ):
                        found.append(int(entry.name))
                except OSError:
                    continue
        return found

    def stop(self) -> None:
        """As `ray stop` does, for these two nodes only: SIGTERM, a grace period, then SIGKILL."""
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.5)


@pytest.fixture
def two_nodes(sample_archive):
    nodes = TwoNodes(Path(tempfile.mkdtemp(prefix="skr", dir="/tmp")))  # short: Ray's socket paths
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
    assert not nodes.processes(), "a Ray process of the two-node cluster outlived the stop"


def _http(url: str, method: str = "GET", token: str | None = None) -> int:
    """The status of a Jobs API request (a POST submits a job)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    data = json.dumps({"entrypoint": "echo should-not-run"}).encode() if method == "POST" else None
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=data, headers=headers, method=method), timeout=30
        ) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
def test_the_pipeline_job_runs_on_two_nodes_with_token_auth(two_nodes, sample_archive, tmp_path):
    jobs = f"{two_nodes.url}/api/jobs/"
    assert _http(jobs, "POST") == 401  # no token: refused
    assert _http(jobs, "POST", token="not-the-token") == 403
    assert _http(jobs) == 401
    refused = two_nodes.ray(
        "job",
        "submit",
        f"--address={two_nodes.url}",
        "--",
        "echo",
        "hi",
        timeout=60,
        env={**two_nodes.env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")},
    )
    assert refused.returncode != 0

    out = tmp_path / "out"
    job = two_nodes.ray(
        "job",
        "submit",
        f"--address={two_nodes.url}",
        f"--working-dir={ROOT}",
        "--",
        "python",
        "jobs/pipeline.py",
        "--data",
        str(sample_archive),
        "--out",
        str(out),
        "--members",
        "configs/tiny_smoke.yaml",
        "--no-tune",
        "--set",
        "model.image_size=32",
        "--set",
        "train.epochs=1",
        "--set",
        "train.resources.trainer=1",
        "--set",
        "score.max_actors=1",
        timeout=900,
    )
    assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-3000:]
    assert "[pipeline] test split" in job.stdout
    assert (out / "bundle" / "bundle.json").is_file() and (out / "evaluation" / "report.json").is_file()

    # The refused submissions left nothing behind: the pipeline is the cluster's only job.
    request = urllib.request.Request(jobs, headers={"Authorization": f"Bearer {two_nodes.token.read_text()}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        submitted = json.loads(response.read())
    assert [j["entrypoint"].split()[:2] for j in submitted] == [["python", "jobs/pipeline.py"]]
    nodes = json.loads(two_nodes.ray("list", "nodes", f"--address={two_nodes.url}", "--format=json").stdout)
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker = next(n["node_id"] for n in nodes if not n["is_head_node"])
    actors = json.loads(
        two_nodes.ray(
            "list", "actors", f"--address={two_nodes.url}", "--detail", "--format=json", "--limit=10000"
        ).stdout
    )
    trainers = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    used = {a["node_id"] for a in actors if a["class_name"] != "JobSupervisor"}
    assert trainers == {worker}  # where the `trainer` resource is
    assert used == {head, worker}
