"""Precision benchmark: each backbone at its own input size, bfloat16 against float32, batch 32 against 128.

    python benchmarks/precision.py [--images 128] [--repeats 3]

benchmarks/score.py measures the three-member bundle at 96 px, where a batch is little work; this
measures each member at the size skinray trains and serves it (ResNet50 at 224 px, InceptionV3 at
299, EfficientNetV2S at 384; random weights: speed does not depend on them), in one process:
images/s of a member's traced function (`Member.logits`, the code the score actors and the model
replicas run) on `--images` generated photos decoded beforehand. float32 is the baseline; bfloat16
(`skinray.precision.in_precision`: the member rebuilt under `mixed_bfloat16`, logits float32) is
the project's figure; both as the inference engines run them (BatchNormalizations folded into
their convolutions), each at a batch of 32 (`score.batch_size`'s default) and 128; beside them
the model as saved (float32, not folded) at 32, for the folding's own gain. Every
combination runs `--repeats` times, interleaved, each warmed (traced) first: medians, best and
spread; ratios are of medians. Beside them: the top-1 agreement of the two precisions on the
photos and the largest logit difference (untrained models answer near-uniformly: a harsh case),
and the CPU's bfloat16 flags. Prints a table, the docs' rows and one JSON line (appended to
benchmarks/results/precision.jsonl; `--no-record`: not). Runtime on 2 cores with the defaults:
about ten minutes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import record, rows, stats
from score import BACKBONES, cpu_flags

BATCHES = (32, 128)


def members(backbone: str) -> dict:
    """One untrained model of `backbone` at its own input size, as `Member`s with the same weights:
    as saved, and as the inference engines run it in float32 and in bfloat16."""
    from skinray.config import load_config
    from skinray.models import create_classifier
    from skinray.models.backbones import REGISTRY
    from skinray.precision import in_precision
    from skinray.predictor import Member

    size = REGISTRY[backbone].input_size
    cfg = load_config(
        overrides=[f"model.backbone={backbone}", "model.weights=none", f"model.image_size={size}"]
    )
    model = create_classifier(cfg.model, 23)
    models = {"saved": model, **{p: in_precision(model, p) for p in ("float32", "bfloat16")}}
    return {p: Member(name=backbone, model=m, backbone=backbone, image_size=size) for p, m in models.items()}


def rate(m, images: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Images per second of `m.logits` over `images` in batches of `batch`, and the logits."""
    start = time.perf_counter()
    logits = [m.logits(images[i : i + batch]) for i in range(0, len(images), batch)]
    return len(images) / (time.perf_counter() - start), np.concatenate(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from skinray.data.ingest import decode_views
    from skinray.data.sample import write_sample

    work = Path(tempfile.mkdtemp(prefix="skinray-bench-precision-"))
    write_sample(work, per_class=max(1, args.images // 23) + 1, classes=23, seed=0)
    files = sorted(p for p in (work / "train").rglob("*") if p.is_file())[: args.images]
    results, agreement = {}, {}
    for backbone in BACKBONES:
        variants = members(backbone)
        size = variants["float32"].image_size
        images = np.stack([decode_views(f.read_bytes(), (size,))[size] for f in files])
        for m in variants.values():  # warm: traced (the graph takes any batch size)
            m.logits(images[:2])
        runs = {(p, b): [] for p in variants for b in BATCHES if p != "saved" or b == BATCHES[0]}
        for _ in range(args.repeats):  # interleaved, so that drift hits every side alike
            for (p, b), values in runs.items():
                value, logits = rate(variants[p], images, b)
                values.append(value)
                if b == BATCHES[0]:
                    agreement.setdefault(backbone, {})[p] = logits
            print(
                f"{backbone} at {size} px: "
                + ", ".join(f"{p} b{b} {v[-1]:.1f}" for (p, b), v in runs.items())
            )
        a, b = agreement[backbone]["float32"], agreement[backbone]["bfloat16"]
        median = {k: stats(v)["median"] for k, v in runs.items()}
        best32 = max(median["float32", n] for n in BATCHES)
        results[backbone] = {
            "size": size,
            **{f"{p}_b{n}": stats(v) for (p, n), v in runs.items()},
            "bf16_vs_fp32_b32": round(median["bfloat16", 32] / median["float32", 32], 3),
            "bf16_vs_fp32_b128": round(median["bfloat16", 128] / median["float32", 128], 3),
            "bf16_best_vs_fp32_best": round(max(median["bfloat16", n] for n in BATCHES) / best32, 3),
            "b128_vs_b32_fp32": round(median["float32", 128] / median["float32", 32], 3),
            "b128_vs_b32_bf16": round(median["bfloat16", 128] / median["bfloat16", 32], 3),
            "folded_vs_saved_fp32": round(median["float32", 32] / median["saved", 32], 3),
            "top1_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 4),
            "max_logit_difference": round(float(np.abs(a - b).max()), 4),
        }
        del variants
    line = record(
        {
            "benchmark": "precision",
            "run": time.strftime("%Y%m%dT%H%M%S"),
            "images": len(files),
            "repeats": args.repeats,
            "cpu_flags": cpu_flags(),
            "backbones": results,
        },
        save=not args.no_record,
    )
    print(
        f"\n{len(files)} generated photos, {os.cpu_count()} cores, CPU flags {line['cpu_flags']}; "
        "img/s, median (lowest-highest)"
    )
    print("\n".join(rows("precision", line)))


if __name__ == "__main__":
    main()
