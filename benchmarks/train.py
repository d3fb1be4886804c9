"""Training benchmark: what Ray Train itself costs, then where the time goes end to end.

    python benchmarks/train.py [--backbone tiny] [--size 128] [--batch 32] [--steps 150]

(1) plain: skinray's distributed train step (MultiWorkerMirroredStrategy, one worker) on
    pre-decoded in-memory batches, in a plain process; once more with a one-worker TF_CONFIG, as
    Ray Train sets it (the strategy then runs in multi-worker mode: collective ops over gRPC);
(2) ray:   the same model, step and batches inside one Ray Train (TensorflowTrainer) worker.
    The ratio ray/plain is Ray Train's cost (target >= 0.95); for the breakdown, the same
    measurement in a plain Ray task (Ray core without Train) is printed too.
(3) e2e:   `skinray train` on a generated archive with the Ray Data pipeline feeding 1 and then 2
    workers (training images/s of the epochs after the first, which includes tracing).

All on this machine in one run; every side of (1) and (2) is measured `--repeats` (3) times,
interleaved, and reported as its median with the lowest and highest; the ratio (target >= 0.95) is
of medians. Prints a table, the docs' row and one JSON line (appended to benchmarks/results/).
Runtime on 2 cores with the defaults: about ten minutes. On a GPU machine, e.g.
`--backbone resnet50 --size 224 --batch 128 --gpus-per-worker 1`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import record, stats, train_row

NUM_CLASSES = 8


def _batches(size: int, batch: int, count: int = 4):
    rng = np.random.default_rng(0)
    return [
        (
            rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
            np.ones(batch, np.float32),
        )
        for _ in range(count)
    ]


def cpu_seconds() -> Counter:
    """CPU seconds used so far: this process per thread name, and every other process by name.

    From /proc (Linux): the difference of two snapshots around the measured steps says where the
    machine's cores went while the step ran: the step's own threads (TensorFlow's pools, gRPC,
    Ray's and Ray Train's threads in a worker) and the other processes (raylet, the GCS, Ray
    Train's controller, idle workers).
    """
    tick, me, used = os.sysconf("SC_CLK_TCK"), os.getpid(), Counter()

    def read(folder: str) -> tuple[str, float]:
        text = Path(folder, "stat").read_text()
        comm, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        return comm, (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    for entry, prefix in [
        (f"/proc/{me}/task/{t}", "step process: ") for t in os.listdir(f"/proc/{me}/task")
    ] + [(f"/proc/{p}", "other process: ") for p in os.listdir("/proc") if p.isdigit() and int(p) != me]:
        try:
            comm, seconds = read(entry)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        name = "kernel workers" if comm.startswith("kworker") else comm.rstrip("0123456789_-")
        used[prefix + name] += seconds
    return used


def measure_step(backbone: str, size: int, batch: int, steps: int) -> dict:
    """Images/s of skinray's train step on pre-decoded batches, in the calling process, and the CPU
    seconds per 1,000 images spent meanwhile in each thread group and process."""
    import keras
    import tensorflow as tf

    from skinray.config import load_config
    from skinray.models import create_classifier
    from skinray.train.step import make_train_step

    # The model as `skinray train` builds it: the config with the recipe's head settings resolved.
    cfg = load_config(
        overrides=[f"model.backbone={backbone}", "model.weights=none", f"model.image_size={size}"]
    )
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = create_classifier(cfg.model, NUM_CLASSES)
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
    step = make_train_step(strategy, model, optimizer, [1.0] * NUM_CLASSES, 0.1, global_batch=batch)
    batches = _batches(size, batch)
    for i in range(10):  # trace and warm up (the first steps are much slower)
        step(*batches[i % len(batches)])
    before, start = cpu_seconds(), time.perf_counter()
    for i in range(steps):
        loss, _ = step(*batches[i % len(batches)])
    float(loss)
    elapsed, after = time.perf_counter() - start, cpu_seconds()
    per_1000 = 1000 / (steps * batch)
    cpu = {k: round((after[k] - before.get(k, 0.0)) * per_1000, 3) for k in after}
    return {
        "rate": steps * batch / elapsed,
        "cpu": {k: v for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.01},
    }


def _plain(args, queue, tf_config):
    if tf_config:
        os.environ["TF_CONFIG"] = tf_config
    queue.put(measure_step(args.backbone, args.size, args.batch, args.steps))


def plain_rate(args, multi_worker: bool = False) -> dict:
    """In a fresh process, as a Ray worker is: TensorFlow's collective setup happens once per process.

    `multi_worker`: with a one-worker TF_CONFIG, as Ray Train sets it, so the strategy runs in
    multi-worker mode (a gRPC server and collective ops for every all-reduce) without Ray.
    """
    import socket

    tf_config = ""
    if multi_worker:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tf_config = json.dumps(
            {"cluster": {"worker": [f"127.0.0.1:{port}"]}, "task": {"type": "worker", "index": 0}}
        )
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(target=_plain, args=(args, queue, tf_config))
    process.start()
    rate = queue.get()
    process.join()
    return rate


def ray_task_rate(args) -> dict:
    import ray

    @ray.remote(num_cpus=1, max_calls=1)
    def task():
        return measure_step(args.backbone, args.size, args.batch, args.steps)

    return ray.get(task.remote())


def _ray_worker(config):
    result = measure_step(config["backbone"], config["size"], config["batch"], config["steps"])
    Path(config["result"]).write_text(json.dumps(result))


def ray_rate(args) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "rate.json"
        config = {
            "backbone": args.backbone,
            "size": args.size,
            "batch": args.batch,
            "steps": args.steps,
            "result": str(result),
        }
        TensorflowTrainer(
            _ray_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=1,
                use_gpu=args.gpus_per_worker > 0,
                resources_per_worker={
                    "CPU": 1,
                    **({"GPU": args.gpus_per_worker} if args.gpus_per_worker else {}),
                },
            ),
            run_config=RunConfig(storage_path=folder, name="bench"),
        ).fit()
        return json.loads(result.read_text())


def end_to_end_rate(args, workers: int, archive: Path, out: Path) -> float:
    from skinray.config import load_config
    from skinray.train.trainer import train

    cfg = load_config(
        overrides=[
            f"data.archive={archive}",
            f"model.backbone={args.backbone}",
            "model.weights=none",
            f"model.image_size={args.size}",
            f"train.workers={workers}",
            f"train.batch_size={args.batch // workers}",
            "train.epochs=3",
            f"train.gpus_per_worker={args.gpus_per_worker}",  # the scratch recipe: every layer trains
        ]
    )
    result = train(cfg, str(out), name=f"e2e-{workers}")
    later = [h["images_per_second"] for h in result.history[1:]]
    return float(np.mean(later))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--gpus-per-worker", type=float, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved measurements of (1) and (2)")
    parser.add_argument(
        "--per-class", type=int, default=60, help="images per class of the e2e archive (8 classes)"
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import ray

    from skinray.cluster import connect
    from skinray.data.sample import write_sample

    # `--repeats` interleaved measurements of each side: on a small machine one can be 30% off.
    connect(reserved_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = {"plain": [], "plain_multi_worker": [], "ray_task": [], "ray": []}
    for _ in range(args.repeats):
        runs["plain"].append(plain_rate(args))
        runs["plain_multi_worker"].append(plain_rate(args, multi_worker=True))
        runs["ray_task"].append(ray_task_rate(args))
        runs["ray"].append(ray_rate(args))
    rates = {k: stats([r["rate"] for r in v]) for k, v in runs.items()}
    median = {k: sorted(v, key=lambda r: r["rate"])[len(v) // 2] for k, v in runs.items()}
    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "archive"
        write_sample(archive, per_class=args.per_class, classes=NUM_CLASSES, seed=0)
        e2e = {w: end_to_end_rate(args, w, archive, Path(folder) / "runs") for w in (1, 2)}

    print(
        f"\n{args.backbone} at {args.size} px, global batch {args.batch}, {os.cpu_count()} cores"
        f"{'' if args.gpus_per_worker else ', CPU only'}; images/s, median of {args.repeats} "
        "interleaved (lowest-highest)"
    )
    for name, label in (
        ("plain", "(1) plain process"),
        ("plain_multi_worker", "plain, one-worker TF_CONFIG"),
        ("ray_task", "Ray task"),
        ("ray", "(2) Ray Train worker"),
    ):
        s = rates[name]
        print(f"{label:<30} {s['median']:>7.0f} ({s['spread'][0]:.0f}-{s['spread'][1]:.0f})")
    ratio = rates["ray"]["median"] / rates["plain"]["median"]
    print(f"ray_vs_plain (medians) = {ratio:.2f} (target >= 0.95)")
    print(f"end to end: 1 worker {e2e[1]:.0f}, 2 workers {e2e[2]:.0f} images/s")
    print_cpu_account(median)
    line = record(
        {
            "benchmark": "train",
            "run": time.strftime("%Y%m%dT%H%M%S"),
            "backbone": args.backbone,
            "size": args.size,
            "batch": args.batch,
            "repeats": args.repeats,
            **rates,
            "cpu_seconds_per_1000_images": {k: v["cpu"] for k, v in median.items()},
            "ray_vs_plain": round(ratio, 3),
            "ray_vs_plain_multi_worker": round(
                rates["ray"]["median"] / rates["plain_multi_worker"]["median"], 3
            ),
            "e2e_1_worker": round(e2e[1], 1),
            "e2e_2_workers": round(e2e[2], 1),
        }
    )
    print("docs/benchmarks.md row:\n" + train_row(line))


def print_cpu_account(best: dict) -> None:
    """CPU seconds per 1,000 images, by thread group and process, in each side's median run."""
    names = sorted(
        {k for r in best.values() for k in r["cpu"]},
        key=lambda k: -max(r["cpu"].get(k, 0) for r in best.values()),
    )
    print("\nCPU seconds per 1,000 images while the step ran (the median run of each side)")
    print(f"{'where':<44}" + "".join(f"{k:>19}" for k in best))
    for name in names[:14]:
        print(f"{name[:44]:<44}" + "".join(f"{r['cpu'].get(name, 0):>19.3f}" for r in best.values()))
    print(f"{'total':<44}" + "".join(f"{sum(r['cpu'].values()):>19.3f}" for r in best.values()))


if __name__ == "__main__":
    main()
