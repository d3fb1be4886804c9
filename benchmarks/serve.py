"""Online-serving benchmark: the Serve endpoint under bounded load, batched and unbatched, against
the same bundle called in-process; and the replica count of an autoscaled deployment in a burst.

    python benchmarks/serve.py [--size 96] [--seconds 10] [--repeats 2] [--burst 60] [--idle 90] [--cpus 2]

One bundle (the three real backbones of benchmarks/score.py, random weights, at `--size` px), one
set of 64 generated JPEG photos (480 to 1024 px a side), this machine, one run:

(b) batched:    `skinray serve`'s application, dynamic batching on (serve.max_batch_size 16,
                batch_wait_s 0.05), one model replica reserving `--cpus` (Ray sets its
                OMP_NUM_THREADS, so TensorFlow's threads, from that: 2 = the baseline's threads);
(u) unbatched:  the same with serve.max_batch_size 1;
(m) per member: batched, one deployment per member (serve.layout per_member), for the layout choice;
(f) bfloat16:   batched, the model replica computing in bfloat16 (serve.precision), the precision
                column: its requests/s against (b)'s is `bf16_vs_fp32_rps` (concurrency 32);
(p) in-process: the baseline: decode, warp, and `Predictor.predict` on one image at a time in
                this process (what a Flask wrapper around the models would do), and on batches of
                16 (the machine's ceiling for this model).

A closed-loop load generator keeps `concurrency` requests in flight (1, 8, 32) for `--seconds`
each, posting raw JPEG bytes to /v1/predict over keep-alive connections. The measurements of (b),
(u), (m) and (f) are interleaved `--repeats` times; each is reported as the median requests/s with the
lowest and highest, and the p50/p99 of its median run. Beside them, (b), (u) and (f) are called through
a Serve handle at concurrency 32 with views decoded beforehand: the model deployment's batching
without the HTTP path. Load shedding: a deployment with one request at a time and a queue of one
(`max_ongoing_requests` 1, `max_queued_requests` 1) gets concurrency 16 for `--seconds`; the
latency of its 503 answers (p50, p99) is how fast a client that cannot be served hears so. Then a
deployment with autoscaling (1 to --max-replicas replicas, 2 ongoing requests each) gets a burst at
concurrency 32 for `--burst` seconds and then nothing for `--idle` seconds, and the replica count
(running, +starting) is printed every 2 s. Prints tables, the docs' row and one JSON line with
every figure (appended to benchmarks/results/), `batched_vs_unbatched_rps` (concurrency 32, of
medians, target >= 2) and `p99_over_p50` (batched, concurrency 8, target <= 3). Runtime on 2 cores
with the defaults: about 20 minutes.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import record, rows, stats  # noqa: E402
from score import build_bundle, cpu_flags  # noqa: E402  (benchmarks/score.py: the same bundle)

CONCURRENCY = (1, 8, 32)
MODES = {
    "b": {"max_batch_size": 16},
    "u": {"max_batch_size": 1},
    "m": {"max_batch_size": 16, "layout": "per_member"},
    "f": {"max_batch_size": 16, "precision": "bfloat16"},
}
NAMES = {"b": "batched", "u": "unbatched", "m": "per member", "f": "batched bf16"}


def photos(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = rng.integers(480, 1025, size=2)
        pixels = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).resize((w, h)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def load(url: str, images: list[bytes], concurrency: int, seconds: float) -> dict:
    """A closed loop: `concurrency` clients, each posting the next image as soon as it has an answer."""
    import requests

    latencies, errors, refused, stop = [], [], [], time.monotonic() + seconds
    lock = threading.Lock()

    def client(k: int):
        session, i = requests.Session(), k
        while time.monotonic() < stop:
            started = time.perf_counter()
            r = session.post(
                f"{url}/v1/predict", data=images[i % len(images)], headers={"Content-Type": "image/jpeg"}
            )
            with lock:
                {200: latencies, 503: refused}.get(r.status_code, errors).append(
                    time.perf_counter() - started
                )
            i += concurrency

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    ms, refused_ms = np.array(latencies) * 1000, np.array(refused) * 1000
    return {
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "requests": len(latencies),
        "refused": len(refused),
        "refused_p50_ms": float(np.percentile(refused_ms, 50)) if len(refused_ms) else None,
        "refused_p99_ms": float(np.percentile(refused_ms, 99)) if len(refused_ms) else None,
        "errors": len(errors),
    }


def in_process(bundle: Path, images: list[bytes], seconds: float) -> dict:
    from skinray.data.ingest import decode_views
    from skinray.predictor import Predictor

    predictor = Predictor.from_path(str(bundle))
    out = {}
    for batch in (1, 16):
        predictor.predict(
            {s: np.zeros((batch, s, s, 3), np.uint8) for s in predictor.sizes}
        )  # traced, as served
        done, started, latencies = 0, time.perf_counter(), []
        while time.perf_counter() - started < seconds:
            t = time.perf_counter()
            views = [decode_views(images[(done + j) % len(images)], predictor.sizes) for j in range(batch)]
            predictor.predict({s: np.stack([v[s] for v in views]) for s in predictor.sizes})
            latencies.append(time.perf_counter() - t)
            done += batch
        out[batch] = {
            "rps": done / (time.perf_counter() - started),
            "p50_ms": float(np.median(latencies) * 1000),
        }
    return out


def model_deployment(app: str) -> str:
    """The name of an application's model deployment (`Model-` and its version's first 12 hex digits)."""
    from ray import serve

    return next(name for name in serve.status().applications[app].deployments if name.startswith("Model"))


def handle_load(app: str, sizes: tuple[int, ...], concurrency: int, seconds: float) -> float:
    """Requests/s of the model deployment alone: `concurrency` calls in flight through a Serve handle,
    each one image's views (decoded once, beforehand): what batching gives without the HTTP path."""
    from ray import serve

    handle = serve.get_deployment_handle(model_deployment(app), app_name=app)
    views = {s: np.random.default_rng(0).integers(0, 256, (1, s, s, 3), dtype=np.uint8) for s in sizes}
    pending, done, started = [], 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        while len(pending) < concurrency:
            pending.append(handle.remote(views))
        pending.pop(0).result()
        done += 1
    rate = done / (time.perf_counter() - started)
    for response in pending:
        response.result()
    return rate


def agreement(url: str, images: list[bytes]) -> dict:
    """(f)'s answers against (b)'s on every photo: the share with the same label, and the largest
    difference of a confidence."""
    import requests

    same, largest = 0, 0.0
    for image in images:
        a, b = (
            requests.post(f"{url}/{m}/v1/predict", data=image, headers={"Content-Type": "image/jpeg"}).json()
            for m in ("b", "f")
        )
        same += a["label"] == b["label"]
        largest = max(largest, abs(a["confidence"] - b["confidence"]))
    return {"top1_agreement": round(same / len(images), 4), "max_confidence_difference": round(largest, 4)}


def deploy(bundle: Path, name: str, **settings) -> None:
    from ray import serve

    from skinray.serve.app import build_app

    base = {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 256}
    serve.run(
        build_app({"model": str(bundle), "serve": {**base, **settings}}), name=name, route_prefix=f"/{name}"
    )


def replica_timeline(url: str, images: list[bytes], burst: float, idle: float) -> tuple[list, dict]:
    """[(seconds, model replicas)] every 2 s during a burst at concurrency 32 and after it;
    and the burst's load figures."""
    from ray import serve

    def replicas() -> str:
        """Running model replicas, and "+k" for k starting (asked for, loading their models)."""
        states = serve.status().applications["scale"].deployments[model_deployment("scale")].replica_states
        starting = states.get("STARTING", 0)
        return f"{states.get('RUNNING', 0)}" + (f"+{starting}" if starting else "")

    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(load(url, images, 32, burst)))
    worker.start()
    timeline, started = [], time.monotonic()
    while time.monotonic() - started < burst + idle:
        time.sleep(2)
        timeline.append((round(time.monotonic() - started), replicas()))
    worker.join()
    return timeline, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--burst", type=float, default=60)
    parser.add_argument(
        "--idle",
        type=float,
        default=90,
        help="seconds watched after the burst (Serve's look-back "
        "window of 30 s and the downscale delay pass before a replica goes)",
    )
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument(
        "--cpus", type=float, default=2.0, help="serve.cpus_per_replica of the measured model replicas"
    )
    args = parser.parse_args()

    import ray
    from ray import serve

    from skinray.cluster import connect

    # Four applications deployed at once (only one of them busy): (b), (u) and (f) hold one model
    # replica, (m) one per member; each has an ingress of 0.5 CPU.
    connect(reserved_cpus=6 * args.cpus + 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    images = photos(64)
    classes = [f"class {i:02d}" for i in range(23)]
    with tempfile.TemporaryDirectory() as folder:
        bundle = build_bundle(Path(folder), args.size, classes)
        baseline = in_process(bundle, images, args.seconds)
        for name, settings in MODES.items():
            deploy(bundle, name, cpus_per_replica=args.cpus, ingress_cpus=0.5, **settings)
        runs = {(m, c): [] for m in MODES for c in CONCURRENCY}
        handles = {"b": [], "u": [], "f": []}
        for _ in range(args.repeats):
            for c in CONCURRENCY:
                for m in MODES:
                    load(f"{url}/{m}", images, c, 2)  # warm the connections and the batch sizes
                    runs[m, c].append(load(f"{url}/{m}", images, c, args.seconds))
            for m in handles:
                handles[m].append(handle_load(m, (args.size,), 32, args.seconds))
        agreed = agreement(url, images)
        for name in MODES:
            serve.delete(name)
        deploy(bundle, "busy", cpus_per_replica=args.cpus, max_ongoing_requests=1, max_queued_requests=1)
        load(f"{url}/busy", images, 1, 2)
        shed = load(f"{url}/busy", images, 16, args.seconds)
        serve.delete("busy")
        deploy(
            bundle,
            "scale",
            cpus_per_replica=1.0,
            ingress_cpus=0.5,
            min_replicas=1,
            max_replicas=args.max_replicas,
            target_ongoing_requests=2,
            upscale_delay_s=2,
            downscale_delay_s=10,
            max_batch_size=16,
        )
        timeline, burst = replica_timeline(f"{url}/scale", images, args.burst, args.idle)
    serve.shutdown()
    ray.shutdown()
    report(args, baseline, runs, handles, timeline, burst, shed, agreed)


def report(
    args, baseline: dict, runs: dict, handles: dict, timeline: list, burst: dict, shed: dict, agreed: dict
) -> None:
    rates = {k: stats([r["rps"] for r in v]) for k, v in runs.items()}
    median = {k: sorted(v, key=lambda r: r["rps"])[len(v) // 2] for k, v in runs.items()}
    handle = {m: stats(v) for m, v in handles.items()}
    print(
        f"\nthree backbones at {args.size} px, 23 classes, {os.cpu_count()} cores, {args.seconds:g} "
        f"s a measurement, median of {args.repeats} interleaved (lowest-highest requests/s)"
    )
    ceiling = baseline[16]["rps"] / baseline[1]["rps"]
    print(
        f"in-process baseline (p): batch 1 {baseline[1]['rps']:.1f} img/s (p50 "
        f"{baseline[1]['p50_ms']:.0f} ms), "
        f"batch 16 {baseline[16]['rps']:.1f} img/s: batching's ceiling on this machine {ceiling:.2f}x"
    )
    print(
        f"{'mode':<14} {'conc':>4} {'req/s':>7} {'spread':>13} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'vs (p) b1':>9} {'errors':>6}"
    )
    for (m, c), r in median.items():
        lo, hi = rates[m, c]["spread"]
        print(
            f"{NAMES[m]:<14} {c:>4} "
            f"{rates[m, c]['median']:>7.1f} {f'{lo:.1f}-{hi:.1f}':>13} {r['p50_ms']:>8.0f} "
            f"{r['p99_ms']:>8.0f} {rates[m, c]['median'] / baseline[1]['rps']:>9.2f} {r['errors']:>6}"
        )
    handle_ratio = handle["b"]["median"] / handle["u"]["median"]
    print(
        "the model deployment alone (Serve handle, concurrency 32, no HTTP): batched "
        f"{handle['b']['median']:.1f} ({handle['b']['spread'][0]:.1f}-{handle['b']['spread'][1]:.1f}), "
        f"unbatched {handle['u']['median']:.1f} ({handle['u']['spread'][0]:.1f}-"
        f"{handle['u']['spread'][1]:.1f}) req/s: {handle_ratio:.2f}x"
    )
    bf16 = rates["f", 32]["median"] / rates["b", 32]["median"]
    handle_bf16 = handle["f"]["median"] / handle["b"]["median"]
    print(
        f"bfloat16 (CPU flags {cpu_flags()}): batched {rates['f', 32]['median']:.1f} against "
        f"{rates['b', 32]['median']:.1f} req/s at concurrency 32 ({bf16:.2f}x); the deployment alone "
        f"{handle['f']['median']:.1f} against {handle['b']['median']:.1f} ({handle_bf16:.2f}x); the same "
        f"label as float32 on {agreed['top1_agreement']:.1%} of the photos (largest confidence "
        f"difference {agreed['max_confidence_difference']:.4f})"
    )
    print(
        f"load shedding (one at a time, a queue of one, concurrency 16): {shed['refused']} answered 503 "
        f"in p50 {shed['refused_p50_ms']:.0f} ms, p99 {shed['refused_p99_ms']:.0f} ms; "
        f"{shed['requests']} answered 200"
    )
    print(
        f"autoscaling: a burst at concurrency 32 for {args.burst:g} s ({burst['rps']:.1f} req/s, p99 "
        f"{burst['p99_ms']:.0f} ms), then idle for {args.idle:g} s; model replicas "
        "(running+starting) every 2 s:"
    )
    print("  " + " ".join(f"{t}s:{n}" for t, n in timeline))
    ratio = rates["b", 32]["median"] / rates["u", 32]["median"]
    tail = median["b", 8]["p99_ms"] / median["b", 8]["p50_ms"]
    print(
        f"batched_vs_unbatched_rps (c32, medians) = {ratio:.2f} (target >= 2); p99_over_p50 (batched, "
        f"c8) = {tail:.2f} (target <= 3)"
    )
    line = record(
        {
            "benchmark": "serve",
            "run": time.strftime("%Y%m%dT%H%M%S"),
            "size": args.size,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "cpus_per_replica": args.cpus,
            "in_process": baseline,
            "in_process_batch_gain": round(ceiling, 2),
            "served": {f"{m}_c{c}": {**rates[m, c], **median[m, c]} for (m, c) in median},
            "handle_c32_rps": handle,
            "handle_batched_vs_unbatched_rps": round(handle_ratio, 2),
            "shed": shed,
            "replica_timeline": [[t, n] for t, n in timeline],
            "burst": burst,
            "batched_vs_unbatched_rps": round(ratio, 2),
            "p99_over_p50": round(tail, 2),
            "cpu_flags": cpu_flags(),
            "bf16_vs_fp32_rps": round(bf16, 3),
            "handle_bf16_vs_fp32_rps": round(handle_bf16, 3),
            "bf16_top1_agreement": agreed["top1_agreement"],
            "bf16_max_confidence_difference": agreed["max_confidence_difference"],
        }
    )
    print("docs/benchmarks.md rows:\n" + "\n".join(rows("serve", line)))


if __name__ == "__main__":
    main()
