"""Subgroup reports: how a model does for each skin type, body site, sex, age band, ... an archive records.

Published dermatology models lose a quarter to a third of their accuracy on darker skin (the DDI
study); an overall accuracy hides that. Metadata lives beside the archive: `ARCHIVE/metadata.csv`
or `metadata.parquet` (or any file given as `evaluate.metadata`), a `path` column relative to the
archive (`test/Eczema Photos/0001.jpg`) and any other columns. `skinray evaluate --by COLUMN,...`
reports, for each value of each column: images, accuracy, macro-F1, ECE, the differential's
coverage and mean size, the abstention and out-of-distribution rates, each with a 95% percentile
bootstrap interval (images resampled within the group); and the worst-group gap (best group's
accuracy minus worst group's) with its interval, resampling every group at once. Images the
metadata does not list form their own group, `(no metadata)`, which the gap leaves out.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from skinray import UserError

NO_METADATA = "(no metadata)"


def metadata_for(archive: str, cfg) -> pa.Table | None:
    """The metadata `evaluate.by` groups by (`cfg`: the EvaluateConfig), read and checked before any
    work: a missing file or column is refused in one line. None when nothing is grouped."""
    if not cfg.columns:
        return None
    from skinray.storage import redact

    metadata = read_metadata(archive, cfg.metadata)
    if metadata is None:
        raise UserError(
            f"--by {cfg.by} needs metadata: '{redact(archive)}' has no metadata.csv or "
            "metadata.parquet (a `path` column relative to the archive, and the columns to group by); "
            "or give one with --metadata"
        )
    missing = [c for c in cfg.columns if c not in metadata.column_names]
    if missing:
        known = ", ".join(c for c in metadata.column_names if c != "path")
        raise UserError(f"the metadata has no column '{missing[0]}' (it has: {known})")
    return metadata


def read_metadata(archive: str, explicit: str = "") -> pa.Table | None:
    """The metadata table (`explicit`, else the archive's own file), or None when there is none."""
    from skinray.data.catalog import METADATA_FILES
    from skinray.storage import join_uri, kind, resolve

    candidates = [explicit] if explicit else [join_uri(archive, name) for name in METADATA_FILES]
    for uri in candidates:
        if kind(uri) != "file":
            if explicit:
                raise UserError(f"metadata file '{explicit}' does not exist")
            continue
        fs, path, _ = resolve(uri)
        table = _read_table(fs, path)
        if "path" not in table.column_names:
            raise UserError(f"metadata '{uri}' has no `path` column (paths relative to the archive)")
        return table
    return None


def _read_table(fs, path: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.lower().endswith(".parquet"):
        return pq.read_table(path, filesystem=fs)
    with fs.open_input_stream(path) as f:
        return pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))


def group_labels(relative_paths: list[str], metadata: pa.Table, column: str) -> list[str]:
    """Each image's group in `column` (as text; `metadata_for` checked it exists); `NO_METADATA`
    where the metadata has no value."""
    values = {
        str(p).lstrip("/"): (None if v is None else str(v))
        for p, v in zip(metadata["path"].to_pylist(), metadata[column].to_pylist())
    }
    return [values.get(p) or NO_METADATA for p in relative_paths]


def _metrics(index: np.ndarray, data: dict) -> dict[str, float]:
    """The reported metrics of the images at `index` (a bootstrap sample or the group itself)."""
    from skinray.metrics import confusion, confusion_metrics, expected_calibration_error

    labels, probabilities = data["labels"][index], data["probabilities"][index]
    predicted = probabilities.argmax(axis=1)
    k = data["probabilities"].shape[1]
    scores = confusion_metrics(confusion(labels, predicted, k))
    out = {
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": scores["macro_f1"],
        "ece": expected_calibration_error(probabilities, labels),
        "abstained": float(data["abstained"][index].mean()),
        "out_of_distribution": float(data["ood"][index].mean()),
    }
    if data.get("in_set") is not None:
        inside = data["in_set"][index]
        out["coverage"] = float(inside[np.arange(len(index)), labels].mean())
        out["set_size"] = float(inside.sum(axis=1).mean())
    return out


def report(groups: list[str], data: dict, resamples: int, seed: int = 0) -> dict:
    """Per group: images, metrics and their 95% intervals; the worst-group accuracy gap with its
    interval. `data`: labels (n,), probabilities (n, k), abstained and ood (n,) bools, and
    optionally in_set (n, k) for the differential."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups, object)
    names = sorted(set(groups), key=lambda g: (g == NO_METADATA, g))
    members = {g: np.flatnonzero(groups == g) for g in names}
    per_group, samples = {}, {}
    for g in names:
        index = members[g]
        draws = [index[rng.integers(0, len(index), len(index))] for _ in range(resamples)]
        boot = [_metrics(d, data) for d in draws]
        samples[g] = np.array([b["accuracy"] for b in boot])
        point = _metrics(index, data)
        per_group[g] = {
            "images": int(len(index)),
            **point,
            "intervals": {
                m: [
                    float(np.percentile([b[m] for b in boot], 2.5)),
                    float(np.percentile([b[m] for b in boot], 97.5)),
                ]
                for m in point
            },
        }
    compared = [g for g in names if g != NO_METADATA]
    gap = None
    if len(compared) >= 2:
        accuracy = {g: per_group[g]["accuracy"] for g in compared}
        best, worst = max(accuracy, key=accuracy.get), min(accuracy, key=accuracy.get)
        boot_gap = np.max([samples[g] for g in compared], axis=0) - np.min(
            [samples[g] for g in compared], axis=0
        )
        gap = {
            "best": best,
            "worst": worst,
            "accuracy_gap": accuracy[best] - accuracy[worst],
            "interval": [float(np.percentile(boot_gap, 2.5)), float(np.percentile(boot_gap, 97.5))],
        }
    return {"groups": per_group, "gap": gap, "resamples": resamples}


def console_lines(column: str, r: dict) -> list[str]:
    """What `skinray evaluate` and the pipeline print: each group's accuracy, interval and images,
    then the gap."""
    lines = [f"by {column} (accuracy, 95% interval, images):"]
    lines += [
        f"  {g:14s} {v['accuracy']:.3f} ({v['intervals']['accuracy'][0]:.3f}-"
        f"{v['intervals']['accuracy'][1]:.3f})  {v['images']}"
        for g, v in r["groups"].items()
    ]
    gap = r["gap"]
    if gap:
        lines.append(
            f"  worst-group gap {gap['accuracy_gap']:.3f} ({gap['interval'][0]:.3f}-"
            f"{gap['interval'][1]:.3f}): {gap['worst']} below {gap['best']}"
        )
    return lines


def markdown(column: str, r: dict) -> list[str]:
    """A section of report.md: one row per group, then the gap."""

    def cell(g: dict, metric: str, fmt: str = ".3f") -> str:
        if metric not in g:
            return "-"
        low, high = g["intervals"][metric]
        return f"{g[metric]:{fmt}} ({low:{fmt}}-{high:{fmt}})"

    lines = [
        f"## By {column}",
        "",
        "| group | images | accuracy | macro-F1 | ECE | set coverage | set size | abstained "
        "| out of distribution |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, g in r["groups"].items():
        cells = [cell(g, m) for m in ("accuracy", "macro_f1", "ece", "coverage")]
        cells += [cell(g, "set_size", ".2f"), cell(g, "abstained"), cell(g, "out_of_distribution")]
        lines.append(f"| {name} | {g['images']} | " + " | ".join(cells) + " |")
    gap = r["gap"]
    if gap:
        low, high = gap["interval"]
        lines += [
            "",
            f"Worst-group gap: accuracy {gap['accuracy_gap']:.3f} ({low:.3f}-{high:.3f}, 95%) between "
            f"{gap['best']} and {gap['worst']}; intervals from {r['resamples']} bootstrap resamples.",
        ]
    return lines


def plot(column: str, r: dict, path) -> None:
    """Accuracy per group with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["groups"])
    values = [r["groups"][g]["accuracy"] for g in names]
    low = [v - r["groups"][g]["intervals"]["accuracy"][0] for g, v in zip(names, values)]
    high = [r["groups"][g]["intervals"]["accuracy"][1] - v for g, v in zip(names, values)]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(names) + 2), 4))
    ax.bar(range(len(names)), values, yerr=[low, high], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (95% bootstrap interval)")
    ax.set_title(f"accuracy by {column}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
