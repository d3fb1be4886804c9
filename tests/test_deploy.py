"""The cluster definitions: cluster.yaml (Ray's own validator, and its security settings), the
container image, the KubeRay manifests (KubeRay's own CRD schemas), the Serve config and the jobs."""

import functools
import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from commands import skinray

ROOT = Path(__file__).resolve().parent.parent
CRDS = Path(__file__).resolve().parent / "data" / "kuberay"
JOBS = ("pipeline", "tune", "train", "ensemble", "evaluate", "score", "deploy", "data_check")
# The command deploy/serve.yaml says it was written by.
SERVE_SETTINGS = [
    "serve.host=0.0.0.0",
    "serve.gpus_per_replica=1",
    "serve.cpus_per_replica=1",
    "serve.max_replicas=4",
    "serve.max_batch_size=32",
    "serve.batch_wait_s=0.01",
    "serve.resources.gpu_node=0.001",
    "serve.api_keys_file=/etc/skinray/api-keys",
]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_validator(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cluster)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0}  # the head only schedules
    assert types["gpu"]["resources"]["GPU"] >= 1 and types["gpu"]["resources"]["gpu_node"] > 0
    assert types["cpu"]["resources"]["cpu_node"] > 0 and "GPU" not in types["cpu"]["resources"]
    assert types["gpu"]["max_workers"] > types["gpu"]["min_workers"] == 0  # autoscaled
    assert prepared["idle_timeout_minutes"] > 0
    assert prepared["docker"]["image"]


def test_cluster_yaml_keeps_the_jobs_api_private_and_requires_the_token(cluster):
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    head = next(c for c in cluster["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text().split("available_node_types")[1]
    assert all("RAY_AUTH_MODE=token" in c for c in ray_starts)
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    # The token comes from the user's machine, never from the repository.
    sources = list(cluster["file_mounts"].values())
    assert sources == ["~/.ray/auth_token"]
    assert not any(Path(ROOT, s).exists() for s in sources if not s.startswith("~"))


def test_cluster_yaml_gives_each_node_least_privilege_and_ssh_only_to_admins(cluster):
    """Ray's default head role holds EC2 and S3 full access, and workers get none (s3:// reads there
    fail); SSH was open to the world by default."""
    profiles = {
        name: t["node_config"]["IamInstanceProfile"]["Arn"]
        for name, t in cluster["available_node_types"].items()
    }
    assert profiles["head"].endswith("/skinray-head") and profiles["cpu"] == profiles["gpu"]
    assert profiles["gpu"].endswith("/skinray-worker")
    policies = {
        who: json.loads((ROOT / "deploy" / "aws" / f"skinray-{who}-policy.json").read_text())
        for who in ("head", "worker")
    }
    for who, policy in policies.items():
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert "*" not in actions and not any(a.endswith(":*") for a in actions), (who, actions)
            if any(a.startswith("s3:") for a in actions):
                assert all("BUCKET" in r for r in statement["Resource"]), (who, statement)  # two buckets only
    worker_actions = {a for s in policies["worker"]["Statement"] for a in s["Action"]}
    assert all(a.startswith("s3:") for a in worker_actions)  # workers launch nothing
    passed = [s for s in policies["head"]["Statement"] if s["Action"] == "iam:PassRole"]
    assert [s["Resource"] for s in passed] == ["arn:aws:iam::ACCOUNT_ID:role/skinray-worker"]
    rules = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])


@pytest.mark.parametrize("manifest", ["rayjob.yaml", "rayservice.yaml"])
def test_every_kuberay_container_is_unprivileged_and_bounded(manifest):
    doc = yaml.safe_load((ROOT / "deploy" / manifest).read_text())
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    templates += [doc["spec"]["submitterPodTemplate"]] if "submitterPodTemplate" in doc["spec"] else []
    containers = [c for t in templates for c in t["spec"]["containers"]]
    assert len(containers) == len(templates) >= 2
    for container in containers:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, container["name"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), container["name"]


def _pins(path) -> dict:
    """name -> (version, marker) of a lock file's `name==version ; marker` lines."""
    from packaging.requirements import Requirement

    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = (str(req.specifier).removeprefix("=="), req.marker)
    return pins


def test_one_set_of_versions_for_the_tests_and_the_image():
    """requirements.lock pins every dependency within pyproject.toml's ranges; the image's lock pins the
    same versions of everything they share; and this environment runs exactly the lock's versions."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked, gpu = _pins(ROOT / "requirements.lock"), _pins(ROOT / "deploy" / "requirements-gpu.lock")
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = req.name.lower()
        assert name in locked and req.specifier.contains(locked[name][0]), spec
    assert {"tensorflow", "nvidia-cudnn-cu12"} <= set(gpu)
    assert {n: v for n, (v, _) in gpu.items() if n in locked} == {n: locked[n][0] for n in gpu if n in locked}
    installed = {
        n: importlib.metadata.version(n)
        for n, (_, marker) in locked.items()
        if marker is None or marker.evaluate()
    }
    assert installed == {n: v for n, (v, marker) in locked.items() if marker is None or marker.evaluate()}
    dev = (ROOT / "dev").read_text()
    assert (
        "pip install -r requirements.lock" in dev
        and "cat pyproject.toml requirements.lock | sha256sum" in dev
    )


def test_the_image_is_rays_gpu_image_with_tensorflow_and_cuda():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.\d+-py311-gpu$", dockerfile, re.M)
    assert "pip install --no-cache-dir -r requirements-gpu.lock" in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    tensorflow = next(d for d in project["dependencies"] if d.startswith("tensorflow"))
    assert project["optional-dependencies"]["gpu"] == [
        tensorflow.replace("tensorflow", "tensorflow[and-cuda]")
    ]
    assert not re.search(r"(?i)(token|secret|password|api.?key)\s*=", dockerfile)


@functools.cache
def _schemas() -> dict:
    schemas = {}
    for path in CRDS.glob("ray.io_*.yaml.gz"):
        crd = yaml.load(
            gzip.decompress(path.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        )
        for version in crd["spec"]["versions"]:
            schemas[(f"ray.io/{version['name']}", crd["spec"]["names"]["kind"])] = version["schema"][
                "openAPIV3Schema"
            ]
    return schemas


@pytest.mark.parametrize("manifest, kind", [("rayjob.yaml", "RayJob"), ("rayservice.yaml", "RayService")])
def test_kuberay_manifests_match_kuberays_schemas(manifest, kind):
    doc = yaml.safe_load((ROOT / "deploy" / manifest).read_text())
    assert doc["kind"] == kind
    schema = _schemas()[(doc["apiVersion"], kind)]
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors]
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"].startswith("2.60")
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"  # dashboard and Jobs API stay inside
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["maxReplicas"] > gpu["minReplicas"]  # autoscaled


def test_a_broken_manifest_is_caught_by_the_schema():
    doc = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())
    doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    doc["spec"]["backoffLimit"] = "two"
    schema = _schemas()[("ray.io/v1", "RayJob")]
    paths = {"/".join(map(str, e.path)) for e in jsonschema.Draft7Validator(schema).iter_errors(doc)}
    assert paths == {"spec/rayClusterSpec/authOptions/mode", "spec/backoffLimit"}


def test_the_rayjob_runs_the_pipeline_job():
    entry = yaml.safe_load((ROOT / "deploy" / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    script = re.search(r"/home/ray/skinray/(jobs/\S+\.py)", entry).group(1)
    assert (ROOT / script).is_file() and script == "jobs/pipeline.py"
    assert "COPY --chown=ray:users jobs ./jobs" in (ROOT / "deploy" / "Dockerfile").read_text()


def test_the_serve_configs_are_what_skinray_serve_prints():
    from skinray.config import load_config
    from skinray.serve.app import serve_section
    from skinray.serve.command import app_args, serve_config_file

    printed = yaml.safe_load(
        serve_config_file(app_args("s3://BUCKET/skinray/v1/bundle", load_config(overrides=SERVE_SETTINGS)))
    )
    checked_in = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    service = yaml.safe_load((ROOT / "deploy" / "rayservice.yaml").read_text())
    assert checked_in == printed
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == printed
    settings = printed["applications"][0]["args"]["serve"]
    assert serve_section(settings).resources == {"gpu_node": 0.001}  # what build_app validates on the cluster


@pytest.mark.parametrize("job", JOBS)
def test_each_job_says_how_to_submit_it_and_takes_its_commands_options(job):
    path = ROOT / "jobs" / f"{job}.py"
    text = path.read_text()
    doc = text.split('"""')[1]
    assert "ray job submit" in doc and "--working-dir ." in doc
    assert "Expected" in doc or "expected" in doc.lower()
    proc = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0 and "usage: skinray" in proc.stdout


@pytest.mark.slow
def test_the_deploy_job_then_a_canary_then_a_promotion_answer_every_request(
    ray_env, ray_cluster, bundle, members, photos, tmp_path
):
    """The deploy job leaves v1 running on the cluster; then, while a closed-loop client sends
    requests, `skinray serve --detach` adds v2 as a 50% canary, then promotes v2 with v1 as its
    shadow, as a RayService update would. No request fails, and every answer's version is the one
    whose answer it is (the two models give this photo different confidences)."""
    import threading
    import time

    import duckdb
    import requests
    from ray import serve
    from serving import free_port

    port, v2 = free_port(), members["runs"][0]
    small = ["--set", "serve.cpus_per_replica=0.5", "--set", "serve.ingress_cpus=0.25"]
    url, photo = f"http://127.0.0.1:{port}", photos[0].read_bytes()
    log = tmp_path / "log"
    answers, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            r = requests.post(
                f"{url}/v1/predict",
                data=photo,
                headers={"Content-Type": "image/jpeg", "X-Request-Id": f"r{len(answers)}"},
                timeout=60,
            )
            answers.append((r.status_code, r.json().get("model_version"), r.json().get("confidence")))

    def detach(*args):  # the command in this process (already on the cluster): no start-up to wait for
        from skinray.cli import main

        assert main(["serve", "--detach", "--port", str(port), *args, *small]) == 0

    job = [sys.executable, str(ROOT / "jobs" / "deploy.py"), "--model", str(bundle), "--port", str(port)]
    proc = subprocess.run(job + small, capture_output=True, text=True, timeout=300, env=ray_env)
    thread = threading.Thread(target=client)
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "deployed as Serve application 'skinray'" in proc.stdout
        # The job's driver has exited; the application answers.
        assert requests.get(f"{url}/readyz", timeout=60).status_code == 200
        thread.start()
        detach("--model", str(bundle), "--canary", v2, "--canary-percent", "50")
        canary_at = len(answers)
        time.sleep(2)
        detach("--model", v2, "--shadow", str(bundle), "--set", f"serve.prediction_log={log}",
               "--set", "serve.prediction_log_minutes=0.005")  # fmt: skip
        promoted_at = len(answers)
        time.sleep(3)
        stop.set()
        thread.join(60)
        model = requests.get(f"{url}/v1/model", timeout=10).json()
    finally:
        stop.set()
        serve.shutdown()
    assert [a for a in answers if a[0] != 200] == [] and len(answers) > promoted_at > canary_at > 0
    confidence = {}
    for _, version, conf in answers:
        assert confidence.setdefault(version, conf) == pytest.approx(conf, abs=1e-5), version
    v1 = answers[0][1]
    assert len(confidence) == 2 and {v for _, v, _ in answers[canary_at:promoted_at]} == set(confidence)
    assert answers[-1][1] != v1 and {v["role"]: v["version"] for v in model["versions"]}["shadow"] == v1
    shadow = duckdb.sql(
        f"select * from read_parquet('{log}/*/*.parquet', hive_partitioning=false) where role = 'shadow'"
    ).df()
    assert len(shadow) and set(shadow["model_version"]) == {v1}


def test_detach_refuses_a_cluster_that_would_end_with_the_command(bundle):
    import os

    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = skinray("serve", "--model", str(bundle), "--detach", timeout=300, env=env)
    assert proc.returncode == 2 and "--detach deploys onto a running cluster" in proc.stderr
