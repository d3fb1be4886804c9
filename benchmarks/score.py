"""Bulk-scoring benchmark: `skinray score` against two single-process baselines, and the FLOP ceiling.

    python benchmarks/score.py [--images 960] [--size 96] [--repeats 3]

One bundle, one set of files, one machine, one run:
(s) skinray: `skinray.score.score` (Ray Data: listing, decode tasks, the model actor pool,
    Parquet writes) on a running local Ray cluster. Its throughput is its steady rate, read from
    the output itself: the rows of every output file but the first over the time from the first
    file's write to the last's (one file per listing part: `score.rows_per_file` 64 here, so 15
    files), so that the fixed start-up (an actor imports TensorFlow and loads three models, and in
    bfloat16 rebuilds them: 20-35 s here, once per job) is left out, as the baselines leave out
    loading their models; that start-up and the end-to-end rate are printed beside it;
(a) batched loop: a hand-written loop in one process: read, decode, warp a batch of 32, then call
    each member model on it and combine (the same decode and warp functions, the same models as
    the score actors run them: `Predictor.to_precision`, BatchNormalizations folded);
(b) per image: the seed notebook's way: for each file load it, resize, then `model.predict` on a
    batch of one, member by member, the models as saved (run on `--per-image` files: it is slow).
The bundle is the three real backbones (ResNet50, InceptionV3, EfficientNetV2S, random weights:
speed does not depend on them) at `--size` px, 23 classes, equal weights. Precision is a column:
(s) and (a) run in float32 and in bfloat16 (`score.precision`, `Predictor.to_precision`), each
repeat interleaving them, with the top-1 agreement of (a)'s two precisions on every file and the
largest difference of a probability (untrained models answer near-uniformly, so agreement on them
is a harsh test), and a bfloat16 matrix multiply beside the float32 one (the new ceiling). Two
more columns measure choices rather than skinray: (a) at a batch of 128 in both precisions, and
(a) with each member's function compiled by XLA (`jit_compile=True`) in both precisions, on the
first `--xla-images` files. Every side runs `--repeats` times, interleaved, every side warmed
first (the baselines' models traced before their timed loops, as (s)'s start-up is left out of its
rate); the tables show medians with best and spread, ratios are of medians (targets are judged on
them). The model arithmetic achieved by (s) (GFLOP/s, counted from the layers' shapes) is set
against a large matrix multiply in TensorFlow on the same machine, the practical ceiling. Prints
tables and one JSON line, appended to benchmarks/results/score.jsonl (`--no-record`: not).
Runtime on 2 cores with the defaults: about twenty-five minutes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import record, rows, stats

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


def matmul_peak(n: int = 4096, repeats: int = 5, dtype: str = "float32") -> float:
    """GFLOP/s of an n x n matrix multiply in TensorFlow in `dtype`: the machine's practical ceiling."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    tf.matmul(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        tf.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def skinray_rates(bundle: Path, folder: Path, out: Path, overrides: list[str]) -> dict:
    """One `score` call into a fresh output folder: its steady rate (the rows of every output file
    but the first, over the time from the first file's write to the last's), its end-to-end rate,
    and its start-up (the wall time the steady rate does not account for)."""
    import shutil

    import pyarrow.parquet as pq

    from skinray.config import load_config
    from skinray.score import PREDICTIONS, score

    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    summary = score(load_config(overrides=overrides), str(bundle), str(folder), str(out))
    seconds = time.perf_counter() - start
    assert summary["scored"] == summary["rows"], summary
    written = sorted(
        (f.stat().st_mtime, pq.read_metadata(f).num_rows) for f in (out / PREDICTIONS).rglob("*.parquet")
    )
    assert len(written) >= 4, f"{len(written)} output files: too few for a steady rate"
    steady = sum(n for _, n in written[1:]) / (written[-1][0] - written[0][0])
    return {
        "steady": steady,
        "end_to_end": summary["rows"] / seconds,
        "startup_seconds": seconds - summary["rows"] / steady,
    }


def batched_rate(
    predictor, paths: list[str], batch: int = 32, keep: list | None = None, functions=None
) -> float:
    """Images per second of the hand-written loop; with `keep`, each batch's probabilities are
    appended to it; with `functions` (one per member), those compute the logits."""
    from skinray.data.ingest import decode_views

    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        views = [decode_views(Path(p).read_bytes(), predictor.sizes) for p in paths[i : i + batch]]
        logits = np.stack(
            [
                np.asarray(f(np.stack([v[m.image_size] for v in views])), np.float32)
                for m, f in zip(predictor.members, functions or [m.logits for m in predictor.members])
            ]
        )
        probabilities = predictor.combine(logits).probabilities
        if keep is not None:
            keep.append(probabilities)
    return len(paths) / (time.perf_counter() - start)


def compiled(predictor) -> list:
    """Each member's logits as one XLA-compiled function (`jit_compile=True`): the option measured."""
    import tensorflow as tf

    return [
        tf.function(lambda x, m=m.model: m(x, training=False), jit_compile=True) for m in predictor.members
    ]


def cpu_flags() -> list[str]:
    """The CPU's bfloat16 flags (what `auto` looks for)."""
    from skinray.precision import CPU_FLAGS

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return [f for f in CPU_FLAGS if f in flags]


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
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--per-image", type=int, default=30, help="files the per-image baseline scores, a repeat"
    )
    parser.add_argument("--xla-images", type=int, default=96, help="files the XLA loops score, a repeat")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/")
    parser.add_argument(
        "--set",
        action="append",
        default=["score.max_actors=1", "score.rows_per_file=64"],
        metavar="KEY=VALUE",
        help="skinray score config (default: one model actor, right for 2 cores; 64 files a part)",
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
    bundle = build_bundle(work, args.size, classes)
    saved, predictor, bf16 = (Predictor.from_path(str(bundle)) for _ in range(3))
    predictor.to_precision("float32")  # as the score actors run them (folded), like bfloat16
    bf16.to_precision("bfloat16")
    xla, xla_bf16 = compiled(predictor), compiled(bf16)
    flops = sum(model_flops(m.model) for m in saved.members)
    peak, peak_bf16 = matmul_peak(), matmul_peak(dtype="bfloat16")

    ray.init(num_cpus=max(os.cpu_count() or 1, 5), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    loops = {  # (a)'s variants: predictor, batch, functions, files
        "batched": (predictor, 32, None, paths),
        "batched_bf16": (bf16, 32, None, paths),
        "batched_128": (predictor, 128, None, paths),
        "batched_128_bf16": (bf16, 128, None, paths),
        "xla": (predictor, 32, xla, paths[: args.xla_images]),
        "xla_bf16": (bf16, 32, xla_bf16, paths[: args.xla_images]),
    }
    for model, batch, functions, _ in loops.values():  # warm: each traced (or compiled) at its shapes
        batched_rate(model, paths[:batch], batch, functions=functions)
    per_image_rate(saved, paths[:2])  # warm: model.predict's function traced
    names = ("skinray", "skinray_bf16", *loops, "per_image", "end_to_end", "startup", "startup_bf16")
    rates = {k: [] for k in names}
    fp32_probabilities, bf16_probabilities = [], []
    keep = {"batched": fp32_probabilities, "batched_bf16": bf16_probabilities}
    for r in range(args.repeats):  # interleaved, so that drift hits every side alike
        measured = skinray_rates(bundle, folder, work / "out", args.set)
        rates["skinray"].append(measured["steady"])
        rates["end_to_end"].append(measured["end_to_end"])
        rates["startup"].append(measured["startup_seconds"])
        in_bf16 = skinray_rates(bundle, folder, work / "out", [*args.set, "score.precision=bfloat16"])
        rates["skinray_bf16"].append(in_bf16["steady"])
        rates["startup_bf16"].append(in_bf16["startup_seconds"])
        for name, (model, batch, functions, files) in loops.items():
            kept = keep.get(name) if r == 0 else None
            rates[name].append(batched_rate(model, files, batch, keep=kept, functions=functions))
        start = (r * args.per_image) % len(paths)
        rates["per_image"].append(per_image_rate(saved, paths[start : start + args.per_image]))
        print(
            f"repeat {r + 1}: skinray {measured['steady']:.1f} (end to end {measured['end_to_end']:.1f}, "
            f"start-up {measured['startup_seconds']:.0f} s), in bfloat16 {in_bf16['steady']:.1f} "
            f"(start-up {in_bf16['startup_seconds']:.0f} s); "
            + "; ".join(f"{name} {rates[name][-1]:.1f}" for name in loops)
            + f"; per image {rates['per_image'][-1]:.1f} img/s",
            flush=True,
        )
    ray.shutdown()
    a, b = np.concatenate(fp32_probabilities), np.concatenate(bf16_probabilities)

    median = {k: stats(v)["median"] for k, v in rates.items()}
    achieved = median["skinray"] * flops / 1e9
    achieved_bf16 = median["skinray_bf16"] * flops / 1e9
    result = {
        "benchmark": "score",
        "run": time.strftime("%Y%m%dT%H%M%S"),
        "images": len(paths),
        "size": args.size,
        "members": list(BACKBONES),
        "repeats": args.repeats,
        "config": args.set,
        "rate": "steady",  # (s): rows after the first output file over the first-to-last write time
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
        "cpu_flags": cpu_flags(),
        "skinray_bf16": stats(rates["skinray_bf16"]),
        "startup_seconds_bf16": round(min(rates["startup_bf16"]), 1),
        "batched_loop_bf16": stats(rates["batched_bf16"]),
        "bf16_vs_fp32": round(median["skinray_bf16"] / median["skinray"], 3),
        "bf16_batched_vs_fp32": round(median["batched_bf16"] / median["batched"], 3),
        "bf16_top1_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 4),
        "bf16_max_probability_difference": round(float(np.abs(a - b).max()), 4),
        "skinray_bf16_gflops": round(achieved_bf16, 1),
        "matmul_peak_bf16_gflops": round(peak_bf16, 1),
        "batched_loop_128": stats(rates["batched_128"]),
        "batched_loop_128_bf16": stats(rates["batched_128_bf16"]),
        "batch_128_vs_32": round(median["batched_128"] / median["batched"], 3),
        "batch_128_vs_32_bf16": round(median["batched_128_bf16"] / median["batched_bf16"], 3),
        "xla_images": len(loops["xla"][3]),
        "batched_loop_xla": stats(rates["xla"]),
        "batched_loop_xla_bf16": stats(rates["xla_bf16"]),
    }
    print(
        f"\nbundle: {', '.join(BACKBONES)} at {args.size} px, {flops / 1e9:.2f} GFLOP per image; "
        f"{len(paths)} generated photos; {os.cpu_count()} cores; CPU flags {result['cpu_flags']}; "
        f"{' '.join(args.set)}"
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
    print(
        f"\nbfloat16: skinray score {cell(rates['skinray_bf16'])} img/s ({result['bf16_vs_fp32']:.2f}x "
        f"float32; start-up {min(rates['startup_bf16']):.0f} s), batched loop {cell(rates['batched_bf16'])} "
        f"({result['bf16_batched_vs_fp32']:.2f}x); top-1 agreement {result['bf16_top1_agreement']:.2%} "
        f"(largest probability difference {result['bf16_max_probability_difference']:.4f}); "
        f"{achieved_bf16:.1f} GFLOP/s against a bfloat16 matmul peak of {peak_bf16:.1f}"
    )
    print(
        f"choices, (a) in img/s: batch 128 {cell(rates['batched_128'])} in float32 "
        f"({result['batch_128_vs_32']:.2f}x batch 32), {cell(rates['batched_128_bf16'])} in bfloat16 "
        f"({result['batch_128_vs_32_bf16']:.2f}x); XLA on {result['xla_images']} files "
        f"{cell(rates['xla'])} in float32, {cell(rates['xla_bf16'])} in bfloat16"
    )
    line = record(result, save=not args.no_record)
    print("\nthe rows of docs/benchmarks.md (median (lowest-highest)):")
    print("\n".join(rows("score", line)))


if __name__ == "__main__":
    main()
