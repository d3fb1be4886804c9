"""Tuning benchmark: seconds per trial of the cached head search against full Ray Train trials.

    python benchmarks/tune.py [--trials 16] [--full-trials 3] [--backbone tiny] [--size 64] [--per-class 40]

Both modes search the same space with the same seed, scheduler and epochs on the same generated
archive (6 classes x `--per-class` photos) on this machine, in one run:

- cached: `skinray tune` as shipped: one embedding job (the frozen backbone over `tune.views`
  augmented views of every training image and the validation images), then `--trials` heads on the
  embeddings;
- full:   `--mode full`: each trial a Ray Train run of the head phase (backbone frozen),
  `--full-trials` of them (each takes as long as the others).

Both run at the same concurrency (`--concurrency` trials at once, default 2) and are charged their
whole wall time: seconds per trial = the search's wall time (the embedding job included, for
cached) / its trials. The embedding job's own time is printed beside it. Prints a table,
`cached_vs_full` (full's seconds per trial / cached's; target >= 10) and one JSON line, appended
to benchmarks/results/tune.jsonl (`--no-record`: not). One run of each: a search takes minutes.
Runtime on 2 cores with the defaults: about ten minutes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import record, tune_row

EXTRA = []


def timed_search(args, archive: Path, out: Path, name: str, mode: str, trials: int) -> dict:
    from skinray.config import load_config
    from skinray.tune.search import tune_head

    cfg = load_config(
        overrides=[
            f"data.archive={archive}",
            f"model.backbone={args.backbone}",
            "model.weights=none",
            f"model.image_size={args.size}",
            f"tune.mode={mode}",
            f"tune.trials={trials}",
            f"tune.max_epochs={args.epochs}",
            "tune.grace_period=2",
            *EXTRA,
            "train.workers=1",
            "score.max_actors=1",
            f"tune.max_concurrent={args.concurrency}",
        ]
    )
    started = time.perf_counter()
    summary = tune_head(cfg, str(out), name)
    return {
        "seconds": time.perf_counter() - started,
        "trials": summary["trials"],
        "stopped_early": summary["stopped_early"],
        "best": summary["best"][cfg.tune.metric],
    }


def embedding_seconds(out: Path, name: str) -> float:
    """The embedding job's wall time: from the search's config.yaml to the embeddings' marker."""
    run = out / name
    marker = next(run.glob("embeddings/*/_SUCCESS.json"))
    return marker.stat().st_mtime - (run / "config.yaml").stat().st_mtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--full-trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=40, help="training photos per class (6 classes)")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once, in both modes")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/")
    args = parser.parse_args()

    from skinray.cluster import connect
    from skinray.data.sample import write_sample

    connect(reserved_cpus=args.concurrency)
    with tempfile.TemporaryDirectory() as folder:
        archive, out = Path(folder) / "archive", Path(folder) / "out"
        write_sample(archive, per_class=args.per_class, classes=6, seed=0)
        cached = timed_search(args, archive, out, "cached", "cached", args.trials)
        embed = embedding_seconds(out, "cached")
        full = timed_search(args, archive, out, "full", "full", args.full_trials)
    cached_trial = cached["seconds"] / cached["trials"]
    full_trial = full["seconds"] / full["trials"]
    print(
        f"\n{args.backbone} at {args.size} px, 6 classes x {args.per_class} photos, {args.epochs} "
        "epochs a trial, "
        f"ASHA, {args.concurrency} trials at once, {os.cpu_count()} cores"
    )
    print(f"{'mode':<8} {'trials':>6} {'stopped early':>14} {'search s':>9} {'s / trial':>10} {'best f1':>8}")
    print(
        f"{'cached':<8} {cached['trials']:>6} {cached['stopped_early']:>14} {cached['seconds']:>9.0f} "
        f"{cached_trial:>10.1f} {cached['best']:>8.3f}   (of which the embedding job: {embed:.0f} s)"
    )
    print(
        f"{'full':<8} {full['trials']:>6} {full['stopped_early']:>14} {full['seconds']:>9.0f} "
        f"{full_trial:>10.1f} {full['best']:>8.3f}"
    )
    print(f"cached_vs_full = {full_trial / cached_trial:.1f} (target >= 10)")
    line = record(
        {
            "benchmark": "tune",
            "run": time.strftime("%Y%m%dT%H%M%S"),
            "concurrency": args.concurrency,
            "backbone": args.backbone,
            "size": args.size,
            "per_class": args.per_class,
            "epochs": args.epochs,
            "cached": cached,
            "full": full,
            "embedding_seconds": round(embed, 1),
            "cached_seconds_per_trial": round(cached_trial, 2),
            "full_seconds_per_trial": round(full_trial, 2),
            "cached_vs_full": round(full_trial / cached_trial, 2),
        },
        save=not args.no_record,
    )
    print(f"\nthe row of docs/benchmarks.md:\n{tune_row(line)}")


if __name__ == "__main__":
    main()
