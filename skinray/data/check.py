"""`skinray data check`: an archive's health report before anything trains on it.

Reads every catalogued file once, in parallel Ray Data tasks, and reports per-class counts per split,
the imbalance ratio, files with the same content within and across splits (a test image that is also
a training image inflates every metric), files that cannot be decoded with the reason, and images
whose content does not match their extension.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from skinray.data.catalog import list_archive
from skinray.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode, format_matches, open_image
from skinray.data.ingest import ImageSource, dataset
from skinray.storage import read_bytes, redact

# Enough pixels to prove the whole file decodes (a reduced JPEG decode still reads every byte).
CHECK_SIZE = 64


def inspect_batch(batch: dict[str, np.ndarray], *, source: ImageSource) -> dict[str, np.ndarray]:
    """Ray Data map function: content hash, format and decode result of each file."""
    digests, formats, errors = [], [], []
    for path in batch["path"]:
        digest, fmt, error = "", "", ""
        try:
            data = read_bytes(source.filesystem, source.prefix, path)
            digest = hashlib.sha256(data).hexdigest()
            decode(data, min_size=CHECK_SIZE, max_pixels=source.max_pixels)
            fmt = open_image(data, source.max_pixels).format
        except DecodeError as exc:
            error = exc.reason
        except OSError as exc:
            error = f"cannot read file: {exc}"
        digests.append(digest)
        formats.append(fmt)
        errors.append(error)
    return {
        "path": batch["path"],
        "label": batch["label"],
        "split": batch["split"],
        "sha256": np.asarray(digests, dtype=object),
        "format": np.asarray(formats, dtype=object),
        "error": np.asarray(errors, dtype=object),
    }


def check_archive(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Builds the report as a JSON-ready dict; `report["ok"]` is False when a file is unreadable
    or the same image sits in two splits."""
    from skinray.cluster import connect

    catalog = list_archive(uri)
    connect()
    source = ImageSource.of(catalog, max_pixels)
    rows = (
        dataset(catalog.table, 32)
        .map_batches(inspect_batch, batch_size=None, fn_kwargs={"source": source})
        .take_all()
    )
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {c: 0 for c in catalog.classes})
    by_digest: dict[str, list[dict]] = defaultdict(list)
    unreadable, misnamed = [], []
    for row in sorted(rows, key=lambda r: r["path"]):
        counts[row["split"]][row["label"]] += 1
        if row["error"]:
            unreadable.append({"path": row["path"], "reason": row["error"]})
            continue
        by_digest[row["sha256"]].append(row)
        if not format_matches(row["path"], row["format"]):
            misnamed.append({"path": row["path"], "format": row["format"]})
    duplicates = [
        {"sha256": digest, "paths": [r["path"] for r in group], "splits": sorted({r["split"] for r in group})}
        for digest, group in sorted(by_digest.items())
        if len(group) > 1
    ]
    across = sum(1 for d in duplicates if len(d["splits"]) > 1)
    return {
        "archive": redact(uri),
        "classes": catalog.classes,
        "counts": {split: dict(c) for split, c in sorted(counts.items())},
        "imbalance": {split: _imbalance(c) for split, c in sorted(counts.items())},
        "skipped": catalog.skipped,
        "unreadable": unreadable,
        "duplicates": duplicates,
        "duplicates_within_split": len(duplicates) - across,
        "duplicates_across_splits": across,
        "misnamed": misnamed,
        "ok": not unreadable and across == 0,
    }


def _imbalance(counts: dict[str, int]) -> float | None:
    """Largest class over smallest non-empty class; None when no class has images."""
    present = [n for n in counts.values() if n > 0]
    return round(max(present) / min(present), 2) if present else None


def format_report(report: dict) -> str:
    """The report as a person reads it."""
    lines = [f"archive: {report['archive']}  ({len(report['classes'])} classes)"]
    splits = [s for s in ("train", "val", "test") if s in report["counts"]]
    width = max(len(c) for c in report["classes"])
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in splits))
    for cls in report["classes"]:
        lines.append(f"{cls:<{width}}  " + "  ".join(f"{report['counts'][s][cls]:>6}" for s in splits))
    lines.append(
        f"{'total':<{width}}  " + "  ".join(f"{sum(report['counts'][s].values()):>6}" for s in splits)
    )
    lines.append(
        "imbalance (largest / smallest class): "
        + ", ".join(f"{s} {r}" for s, r in report["imbalance"].items())
    )
    if report["skipped"]:
        lines.append("skipped: " + ", ".join(f"{n} {why}" for why, n in report["skipped"].items()))
    lines.append(
        f"duplicate groups: {report['duplicates_within_split']} within a split, "
        f"{report['duplicates_across_splits']} across splits"
    )
    for dup in report["duplicates"][:20]:
        lines.append(f"  same content ({', '.join(dup['splits'])}): " + " | ".join(dup["paths"]))
    lines.append(f"unreadable files: {len(report['unreadable'])}")
    for bad in report["unreadable"]:
        lines.append(f"  {bad['path']}: {bad['reason']}")
    if report["misnamed"]:
        lines.append(f"content does not match extension (decoded by content): {len(report['misnamed'])}")
        for m in report["misnamed"][:20]:
            lines.append(f"  {m['path']}: {m['format']}")
    lines.append("ok" if report["ok"] else "PROBLEMS FOUND")
    return "\n".join(lines)
