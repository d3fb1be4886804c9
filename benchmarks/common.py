"""What every benchmark shares: the statistics of interleaved repeats (best, median, spread; targets
are judged on the median) and the record of each run's JSON line under `benchmarks/results/`, from
which the documentation's tables come (`tests/test_docs.py` checks them against the latest line)."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def stats(values: list[float]) -> dict:
    """best (the highest rate), median and the spread (lowest, highest) of repeated measurements."""
    return {
        "best": round(max(values), 1),
        "median": round(statistics.median(values), 1),
        "spread": [round(min(values), 1), round(max(values), 1)],
    }


def record(line: dict, save: bool = True) -> dict:
    """Prints the run's JSON line, dated, and appends it to `benchmarks/results/BENCHMARK.jsonl`."""
    line = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), **line}
    text = json.dumps(line)
    print(text)
    if save:
        RESULTS.mkdir(exist_ok=True)
        with open(RESULTS / f"{line['benchmark']}.jsonl", "a") as f:
            f.write(text + "\n")
    return line


def accuracy_summary(sides: dict[str, list[dict]], labels: dict[str, str]) -> dict:
    """Each side's runs -> mean, lowest, highest and spread of their test accuracy (with the runs);
    prints them as a table, a row per side named by `labels`, with the mean seconds a run."""
    summary = {}
    for name, runs in sides.items():
        accuracies = [r["test_accuracy"] for r in runs]
        summary[name] = {
            "mean": statistics.fmean(accuracies),
            "min": min(accuracies),
            "max": max(accuracies),
            "std": statistics.pstdev(accuracies),
            "runs": runs,
        }
    width = max(len(label) for label in labels.values()) + 2
    print(f"{'side':<{width}} {'mean':>7} {'min':>7} {'max':>7} {'std':>7} {'s/run':>7}")
    for name, s in summary.items():
        seconds = statistics.fmean(r["seconds"] for r in s["runs"])
        print(
            f"{labels[name]:<{width}} {s['mean']:>7.4f} {s['min']:>7.4f} {s['max']:>7.4f} {s['std']:>7.4f} "
            f"{seconds:>7.0f}"
        )
    return summary


def accuracy_fields(summary: dict) -> dict:
    """An accuracy summary as a JSON line's fields: `SIDE_mean` ... `SIDE_std`, and the runs."""
    return {
        **{f"{n}_{k}": v for n, s in summary.items() for k, v in s.items() if k != "runs"},
        "runs": {n: s["runs"] for n, s in summary.items()},
    }


def latest(benchmark: str) -> list[dict]:
    """The JSON lines of the latest recorded run of `benchmark` (a run may write one per setting)."""
    path = RESULTS / f"{benchmark}.jsonl"
    lines = [json.loads(t) for t in path.read_text().splitlines() if t.strip()] if path.is_file() else []
    if not lines:
        return []
    last = lines[-1]["run"]
    return [line for line in lines if line["run"] == last]


# === The docs' rows: each benchmark prints its run as the row docs/benchmarks.md holds ===


def _row(cells: list[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _cell(s: dict, digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} ({s['spread'][0]:.{digits}f}-{s['spread'][1]:.{digits}f})"


def ingest_row(line: dict) -> str:
    return _row(
        [
            line["date"],
            str(line["size"]),
            *(_cell(line[k]) for k in ("pool", "pool_batches", "ray", "tfdata", "decode")),
            *(f"{line[k]:.2f}" for k in ("ray_vs_tfdata", "ray_vs_pool", "ray_vs_pool_batches")),
        ]
    )


def _score_date(line: dict) -> str:
    """The date cell of the scoring tables: the date, and the input size when not the default 96 px."""
    return line["date"] if line.get("size", 96) == 96 else f"{line['date']}, {line['size']} px"


def score_row(line: dict) -> str:
    cells = [
        _score_date(line),
        _cell(line["skinray"], 1),
        f"{_cell(line['end_to_end'], 1)} ({line['startup_seconds']:.0f} s)",
        _cell(line["batched_loop"], 1),
        _cell(line["per_image"], 1),
        f"{line['score_vs_batched_loop']:.2f}",
        f"{line['score_vs_per_image']:.1f}",
        f"{line['skinray_gflops']:.1f}",
        f"{line['matmul_peak_gflops']:.1f}",
        f"{line['flops_vs_matmul_peak']:.2f}",
    ]
    return _row(cells)


def score_precision_row(line: dict) -> str:
    """The precision table's row of a score run (runs before 2026-12-01 have none)."""
    cells = [
        _score_date(line),
        ", ".join(line["cpu_flags"]) or "none",
        _cell(line["skinray"], 1),
        _cell(line["skinray_bf16"], 1),
        f"{line['bf16_vs_fp32']:.2f}",
        f"{_cell(line['batched_loop'], 1)} / {_cell(line['batched_loop_bf16'], 1)}",
        f"{line['bf16_batched_vs_fp32']:.2f}",
        f"{line['bf16_top1_agreement']:.2%} ({line['bf16_max_probability_difference']:.4f})",
        f"{line['skinray_bf16_gflops']:.1f} / {line['matmul_peak_bf16_gflops']:.1f}",
    ]
    return _row(cells)


def score_choices_row(line: dict) -> str:
    """The batch-size and XLA row of a score run (runs before 2026-12-01 have none)."""
    cells = [
        _score_date(line),
        f"{_cell(line['batched_loop'], 1)} / {_cell(line['batched_loop_bf16'], 1)}",
        f"{_cell(line['batched_loop_128'], 1)} / {_cell(line['batched_loop_128_bf16'], 1)}",
        f"{line['batch_128_vs_32']:.2f} / {line['batch_128_vs_32_bf16']:.2f}",
        f"{_cell(line['batched_loop_xla'], 1)} / {_cell(line['batched_loop_xla_bf16'], 1)}",
        str(line["xla_images"]),
    ]
    return _row(cells)


def tune_row(line: dict) -> str:
    cells = [
        line["date"],
        f"{line['backbone']}, {line['size']} px, 6 x {line['per_class']} photos",
        str(line["concurrency"]),
        str(line["cached"]["trials"]),
        f"{line['cached']['seconds']:.0f} ({line['embedding_seconds']:.0f})",
        f"{line['cached_seconds_per_trial']:.1f}",
        str(line["full"]["trials"]),
        f"{line['full']['seconds']:.0f}",
        f"{line['full_seconds_per_trial']:.1f}",
        f"{line['cached_vs_full']:.1f}",
    ]
    return _row(cells)


def train_row(line: dict) -> str:
    cells = [
        line["date"],
        f"{line['backbone']}, {line['size']} px, batch {line['batch']}",
        *(_cell(line[k]) for k in ("plain", "plain_multi_worker", "ray_task", "ray")),
        f"{line['ray_vs_plain']:.2f}",
        f"{line['e2e_1_worker']:.0f}",
        f"{line['e2e_2_workers']:.0f}",
    ]
    return _row(cells)


def _accuracy(line: dict, side: str) -> str:
    """A side's mean test accuracy (lowest-highest) from its `accuracy_fields`."""
    return f"{line[side + '_mean']:.3f} ({line[side + '_min']:.3f}-{line[side + '_max']:.3f})"


def quality_row(line: dict) -> str:
    cells = [
        line["date"],
        f"{line['size']} px, {line['epochs']} epochs, batch {line['global_batch']}",
        " ".join(map(str, line["seeds"])),
        _accuracy(line, "skinray"),
        _accuracy(line, "keras"),
        f"{line['accuracy_vs_keras_fit']:+.3f}",
    ]
    return _row(cells)


def transfer_row(line: dict) -> str:
    cells = [
        line["date"],
        f"{line['train_images']} / {line['test_images']}, {line['size']} px, {line['epochs']} epochs, "
        f"batch {line['global_batch']}",
        " ".join(map(str, line["seeds"])),
        _accuracy(line, "transfer"),
        _accuracy(line, "keras"),
        _accuracy(line, "scratch"),
        f"{line['transfer_vs_keras']:+.3f}",
        f"{line['transfer_vs_scratch']:+.3f}",
    ]
    return _row(cells)


def serve_row(line: dict) -> str:
    """One row per mode: requests/s (median and spread), p50 and p99 of the median run, at
    concurrency 1, 8 and 32; then the handle, the load shedding and the ratios."""
    names = {
        "b": "batched (`together`)",
        "u": "unbatched",
        "m": "batched, `per_member`",
        "f": "batched, bfloat16",
    }
    rows = []
    for mode, name in names.items():
        if f"{mode}_c1" not in line["served"]:
            continue  # bfloat16 since 2026-12-01
        runs = [line["served"][f"{mode}_c{c}"] for c in (1, 8, 32)]
        cells = [
            line["date"],
            name,
            " / ".join(_cell(r, 1) for r in runs),
            " / ".join(f"{r['p50_ms']:.0f}" for r in runs),
            " / ".join(f"{r['p99_ms']:.0f}" for r in runs),
        ]
        rows.append(_row(cells))
    return "\n".join(rows)


def serve_precision_row(line: dict) -> str:
    """The precision row of a serve run (since 2026-12-01): batched float32 / bfloat16 at
    concurrency 32 over HTTP and through the handle, their ratios, and the agreement."""
    served, handle = line["served"], line["handle_c32_rps"]
    cells = [
        line["date"],
        ", ".join(line["cpu_flags"]) or "none",
        f"{_cell(served['b_c32'], 1)} / {_cell(served['f_c32'], 1)}",
        f"{line['bf16_vs_fp32_rps']:.2f}",
        f"{_cell(handle['b'], 1)} / {_cell(handle['f'], 1)}",
        f"{line['handle_bf16_vs_fp32_rps']:.2f}",
        f"{line['bf16_top1_agreement']:.2%} ({line['bf16_max_confidence_difference']:.4f})",
    ]
    return _row(cells)


def precision_row(line: dict) -> str:
    """One row per backbone at its own size: float32 and bfloat16 at batch 32 and 128, the ratios,
    the agreement."""
    rows = []
    for backbone, r in line["backbones"].items():
        cells = [
            line["date"],
            f"{backbone}, {r['size']} px",
            f"{_cell(r['float32_b32'], 1)} / {_cell(r['float32_b128'], 1)}",
            f"{_cell(r['bfloat16_b32'], 1)} / {_cell(r['bfloat16_b128'], 1)}",
            f"{r['bf16_vs_fp32_b32']:.2f} / {r['bf16_vs_fp32_b128']:.2f}",
            f"{r['bf16_best_vs_fp32_best']:.2f}",
            f"{r['top1_agreement']:.1%} ({r['max_logit_difference']:.3f})",
            # float32 as saved (not folded), batch 32, and what folding gained it (since stop 32)
            f"{_cell(r['saved_b32'], 1)} ({r['folded_vs_saved_fp32']:.2f})" if "saved_b32" in r else "—",
        ]
        rows.append(_row(cells))
    return "\n".join(rows)


def ood_row(line: dict) -> str:
    """One row per method: known images refused, then AUROC / share caught per foreign set."""
    rows = []
    for method, r in line["results"].items():
        sets = [k for k in r if k != "false_refusal"]
        cells = [
            line["date"],
            f"tiny, {line['classes']} x {line['per_class']} photos, {line['size']} px "
            f"(accuracy {line['accuracy']:.2f})",
            method,
            f"{r['false_refusal']:.1%}",
            *(f"{r[s]['auroc']:.3f} / {r[s]['caught']:.0%}" for s in sets),
        ]
        rows.append(_row(cells))
    return "\n".join(rows)


# More rows a recorded line has in docs/benchmarks.md, when it has their fields.
EXTRA_ROWS = {
    "score": [("bf16_vs_fp32", score_precision_row), ("batch_128_vs_32", score_choices_row)],
    "serve": [("bf16_vs_fp32_rps", serve_precision_row)],
}

ROWS = {
    "ingest": ingest_row,
    "score": score_row,
    "tune": tune_row,
    "train": train_row,
    "quality": quality_row,
    "serve": serve_row,
    "ood": ood_row,
    "transfer": transfer_row,
    "precision": precision_row,
}


def rows(benchmark: str, line: dict) -> list[str]:
    """Every row of docs/benchmarks.md a recorded line gives."""
    extra = [row(line) for field, row in EXTRA_ROWS.get(benchmark, []) if field in line]
    return [ROWS[benchmark](line), *extra]
