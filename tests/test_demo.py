"""`skinray demo --quick`: every stage, end to end, as a newcomer runs it (with tiny members)."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
from serving import free_port


def test_the_quick_demo_runs_every_stage(ray_env, tmp_path):
    out, port = tmp_path / "demo", free_port()
    proc = subprocess.run([sys.executable, "-m", "skinray", "demo", "--quick", "--exit", "--out", str(out),
                           "--port", str(port)], env=ray_env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = proc.stdout
    for stage in ("=== 1/4", "=== 2/4", "=== 3/4", "=== 4/4", "demo finished in", "where everything is"):
        assert stage in text
    assert (out / "check.json").is_file()
    assert (out / "tune" / "tiny48" / "best_config.yaml").is_file()  # the head search
    assert not (out / "tune" / "tiny64").exists()
    for member in ("tiny48", "tiny64", "tiny80"):
        assert (out / "runs" / member / "summary.json").is_file()
    manifest = json.loads((out / "bundle" / "bundle.json").read_text())
    assert [m["image_size"] for m in manifest["members"]] == [48, 64, 80]
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert set(report["members"]) == {m["name"] for m in manifest["members"]}
    assert report["accuracy"] > 0.4  # 6 classes: chance is 0.17
    scored = pq.read_table(out / "scores" / "predictions")
    assert scored.num_rows == report["num_images"]  # the test split, one row per photo
    assert f"POST http://127.0.0.1:{port}/v1/predict" in text and "true class" in text
    assert f"upload page       http://127.0.0.1:{port}/" in text
