"""Bulk-scoring benchmark: `skinray score` against two single-process baselines, and the FLOP ceiling.

    python benchmarks/score.py [--images 320] [--size 96] [--repeats 3]

One bundle, one set of files, one machine, one run:
(s) skinray: `skinray.score.score` (Ray Data: listing, decode tasks, the model actor pool,
    Parquet writes) on a running local Ray cluster. Its throughput is marginal: (N - N/4) images
    over the difference of the wall times of scoring N and N/4 files, so that the fixed start-up
    (an actor imports TensorFlow and loads three models: ~25 s here, once per job) is left out, as
    the baselines leave out loading their models; that start-up and the end-to-end rate of the N
    files are printed beside it;
(a) batched loop: a hand-written loop in one process: read, decode, warp a batch of 32, then call
    each member model on it and combine (the same decode and warp functions, the same models);
(b) per image: the seed notebook's way: for each file load it, resize, then `model.predict` on a
    batch of one, member by member (run on `--per-image` files: it is slow).
The bundle is the three real backbones (ResNet50, InceptionV3, EfficientNetV2S, random weights:
speed does not depend on them) at `--size` px, 23 classes, equal weights. (s) and (a) are
and (b) run `--repeats` times each, interleaved, every side warmed first (the baselines' models
traced before their timed loops, as (s)'s start-up is left out of its marginal rate); the table
shows medians with best and spread, ratios are of medians (targets are judged on them). The model
arithmetic achieved by (s) (GFLOP/s, counted from the layers' shapes) is set against a large
float32 matrix multiply in TensorFlow on the same machine, the practical ceiling. Prints a table
and one JSON line, appended to benchmarks/results/score.jsonl (`--no-record`: not). Runtime on 2
cores with the defaults: about ten minutes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import record, score_row, stats

BACKBONES = ("resnet50", "inception_v3", "efficientnetv2s")


def build_bundle(folder: Path, size: int, classes: list[str]) -> Path:
    """A three-member bundle of untrained real backbones at `size` px (equal weights, no abstention)."""
    from skinray.bundle import write_bundle
    from skinray.config import load_config
    from skinray.models import create_classifier

    entries, files, configs = [], [], []
    for i, name in enumerate(BACKBONES):
        cfg = load_config(
            overrides=[f"model.backbone={name}", "model.weights=none", f"model.image_size={size}"]
        )
        model = create_classifier(cfg.model, len(classes))
        path = folder / f"{name}.keras"
        model.save(path)
        entries.append(
            {
                "name": f"{i:02d}-{name}",
                "backbone": name,
                "image_size": size,
                "temperature": 1.0,
                "weight": 1 / len(BACKBONES),
            }
        )
        files.append(path)
        configs.append(cfg)
    out = folder / "bundle"
    write_bundle(str(out), entries, files, configs, {"classes": classes, "threshold": 0.0, "coverage": 1.0})
    return out


def model_flops(model) -> float:
    """Multiply-adds x 2 of the convolutions and dense layers of one image (the rest is negligible)."""
    import keras

    total = 0.0
    for layer in _layers(model):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * c
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * layer.input.shape[-1] * c / layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return total


def _layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _layers(layer)


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of a float32 n x n matrix multiply in TensorFlow: the machine's practical ceiling."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    tf.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tf.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def skinray_seconds(bundle: Path, folder: Path, out: Path, overrides: list[str]) -> tuple[int, float]:
    """(files, wall seconds) of one `score` call into a fresh output folder."""
    import shutil

    from skinray.config import load_config
    from skinray.score import score

    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    summary = score(load_config(overrides=overrides), str(bundle), str(folder), str(out))
    seconds = time.perf_counter() - start
    assert summary["scored"] == summary["rows"], summary
    return summary["rows"], seconds


def skinray_rates(bundle: Path, full: Path, quarter: Path, out: Path, overrides: list[str]) -> dict:
    n_full, t_full = skinray_seconds(bundle, full, out, overrides)
    n_quarter, t_quarter = skinray_seconds(bundle, quarter, out, overrides)
    marginal = (n_full - n_quarter) / (t_full - t_quarter)
    return {
        "marginal": marginal,
        "end_to_end": n_full / t_full,
        "startup_seconds": t_full - n_full / marginal,
    }


def batched_rate(predictor, paths: list[str], batch: int = 32) -> float:
    from skinray.data.ingest import decode_views

    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        views = [decode_views(Path(p).read_bytes(), predictor.sizes) for p in paths[i : i + batch]]
        logits = np.stack([m.logits(np.stack([v[m.image_size] for v in views])) for m in predictor.members])
        predictor.combine(logits)
    return len(paths) / (time.perf_counter() - start)


def per_image_rate(predictor, paths: list[str]) -> float:
    """The seed notebook: PIL load, resize, then model.predict on one image, member by member."""
    from PIL import Image

    start = time.perf_counter()
    for path in paths:
        image = Image.open(path).convert("RGB")
        probabilities = []
        for member in predictor.members:
            x = np.asarray(image.resize((member.image_size, member.image_size)), np.uint8)[None]
            probabilities.append(member.model.predict(x, verbose=0))
        np.mean(probabilities, axis=0)
    return len(paths) / (time.perf_counter() - start)


def cell(values: list[float]) -> str:
    s = stats(values)
    return f"{s['median']:.1f} (best {s['best']:.1f}, {s['spread'][0]:.1f}-{s['spread'][1]:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--per-image", type=int, default=30, help="files the per-image baseline scores, a repeat"
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument(
        "--set",
        action="append",
        default=["score.max_actors=1"],
        metavar="KEY=VALUE",
        help="skinray score config (default: one model actor, right for 2 cores)",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import ray

    from skinray.data.sample import write_sample
    from skinray.predictor import Predictor

    work = Path(tempfile.mkdtemp(prefix="skinray-bench-score-"))
    per_class = max(1, args.images // 23)
    write_sample(work / "archive", per_class=per_class, classes=23, seed=0)
    folder = work / "archive" / "train"
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    classes = sorted(p.name for p in folder.iterdir())
    quarter = work / "quarter"
    quarter.mkdir()
    for i, path in enumerate(paths[::4]):
        os.link(path, quarter / f"{i:05d}{Path(path).suffix}")
    bundle = build_bundle(work, args.size, classes)
    predictor = Predictor.from_path(str(bundle))
    flops = sum(model_flops(m.model) for m in predictor.members)
    peak = matmul_peak()

    ray.init(num_cpus=max(os.cpu_count() or 1, 5), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rates = {"skinray": [], "batched": [], "per_image": [], "end_to_end": [], "startup": []}
    batched_rate(predictor, paths[:32])  # warm: each member traced at this batch shape
    per_image_rate(predictor, paths[:2])  # warm: model.predict's function traced
    for r in range(args.repeats):  # interleaved, so that drift hits every side alike
        measured = skinray_rates(bundle, folder, quarter, work / "out", args.set)
        rates["skinray"].append(measured["marginal"])
        rates["end_to_end"].append(measured["end_to_end"])
        rates["startup"].append(measured["startup_seconds"])
        rates["batched"].append(batched_rate(predictor, paths))
        start = (r * args.per_image) % len(paths)
        rates["per_image"].append(per_image_rate(predictor, paths[start : start + args.per_image]))
        print(
            f"repeat {r + 1}: skinray {measured['marginal']:.1f} (end to end {measured['end_to_end']:.1f}, "
            f"start-up {measured['startup_seconds']:.0f} s), batched loop {rates['batched'][-1]:.1f}, "
            f"per image {rates['per_image'][-1]:.1f} img/s",
            flush=True,
        )
    ray.shutdown()

    median = {k: stats(v)["median"] for k, v in rates.items()}
    achieved = median["skinray"] * flops / 1e9
    result = {
        "benchmark": "score",
        "run": time.strftime("%Y%m%dT%H%M%S"),
        "images": len(paths),
        "size": args.size,
        "members": list(BACKBONES),
        "repeats": args.repeats,
        "config": args.set,
        "skinray": stats(rates["skinray"]),
        "end_to_end": stats(rates["end_to_end"]),
        "startup_seconds": round(min(rates["startup"]), 1),
        "batched_loop": stats(rates["batched"]),
        "per_image": stats(rates["per_image"]),
        "gflop_per_image": round(flops / 1e9, 3),
        "skinray_gflops": round(achieved, 1),
        "matmul_peak_gflops": round(peak, 1),
        "score_vs_batched_loop": round(median["skinray"] / median["batched"], 3),
        "score_vs_per_image": round(median["skinray"] / median["per_image"], 2),
        "flops_vs_matmul_peak": round(achieved / peak, 3),
    }
    print(
        f"\nbundle: {', '.join(BACKBONES)} at {args.size} px, {flops / 1e9:.2f} GFLOP per image; "
        f"{len(paths)} generated photos; {os.cpu_count()} cores; {' '.join(args.set)}"
    )
    print(
        "| (s) skinray score | end to end (start-up) | (a) batched loop | (b) per image | s/a | s/b | "
        "GFLOP/s (s) | matmul peak | share |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {cell(rates['skinray'])} | {median['end_to_end']:.1f} ({min(rates['startup']):.0f} s) | "
        f"{cell(rates['batched'])} | {cell(rates['per_image'])} | "
        f"{result['score_vs_batched_loop']:.2f} | {result['score_vs_per_image']:.1f} | {achieved:.1f} | "
        f"{peak:.1f} | {result['flops_vs_matmul_peak']:.2f} |"
    )
    line = record(result, save=not args.no_record)
    print(f"\nthe row of docs/benchmarks.md (median (lowest-highest)):\n{score_row(line)}")


if __name__ == "__main__":
    main()
