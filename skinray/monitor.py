"""Drift: served answers against the bundle's validation answers (`skinray monitor`).

    skinray monitor --logs PATH_OR_URI --model BUNDLE [BUNDLE ...] [--since 7d] --out DIR

The logs are the endpoint's prediction log (`serve.prediction_log`, `skinray.serve.prediction_log`)
or a `skinray score` output folder. The reference is what the bundle answered on the half of its
validation split that its temperatures and weights were not fitted on (the manifest's `reference`,
written by `skinray ensemble`). Answers are grouped by model version and by day (UTC; bulk-scoring
output has no time: one group); each group of a given bundle's version is compared with that
bundle's reference:

- predicted classes: the population stability index, sum((p - q) * ln(p / q)) over the classes'
  shares (each count + 0.5, so that a class absent on one side counts as rare, not impossible);
- confidence: the two-sample Kolmogorov-Smirnov statistic and its p-value (scipy);
- abstention and out-of-distribution rates: the change from the reference's, in points.

A group of at least `monitor.min_rows` answers with a figure past its `monitor.*` threshold, at p <
0.01 (chi-square for the classes, Kolmogorov-Smirnov, Fisher's exact test for abstention against
the reference's counts, a binomial test for refusals against the target rate), is flagged; the
command then exits 1 (for a cron job or an alert). Rows of versions not given are counted, not compared.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from skinray import UserError
from skinray.config import MonitorConfig

COLUMNS = ("time", "model_version", "label", "confidence", "abstained", "out_of_distribution")
RELATIVE = re.compile(r"^(\d+)([dhm])$")
SIGNIFICANCE = 0.01  # a figure past its threshold is flagged only at p below this


# === Reading answers ===


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`7d`, `24h`, `30m` (before now), or an ISO date or time (UTC unless it says otherwise)."""
    now = now or datetime.now(UTC)
    relative = RELATIVE.match(text.strip())
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return now - timedelta(**{{"d": "days", "h": "hours", "m": "minutes"}[unit]: amount})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserError(
            f"--since '{text}': give a time before now (7d, 24h, 30m) or an ISO date or time "
            "(2026-12-01, 2026-12-01T08:00)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def read_answers(location: str, since: datetime | None = None) -> pd.DataFrame:
    """The answered rows of a prediction log or a `skinray score` output (its `predictions/`),
    with COLUMNS (`time` missing for bulk scoring) and `differential_size` where there is one."""
    import pyarrow.parquet as pq

    from skinray.storage import join_uri, kind, list_files

    if kind(location) != "dir":
        raise UserError(f"logs '{location}' is not a folder (a prediction log, or a skinray score output)")
    if kind(join_uri(location, "predictions")) == "dir":
        location = join_uri(location, "predictions")
    fs, root, _, files = list_files(location)
    parts = [f for f in sorted(files) if f.endswith(".parquet") and not _hidden(f)]
    if not parts:
        raise UserError(f"logs '{location}' holds no Parquet file")
    frames = []
    for part in parts:
        path = f"{root}/{part}"
        names = pq.read_schema(path, filesystem=fs).names
        wanted = [c for c in (*COLUMNS, "differential", "differential_size", "error") if c in names]
        frames.append(pq.read_table(path, filesystem=fs, columns=wanted).to_pandas())
    rows = pd.concat(frames, ignore_index=True)
    missing = [c for c in COLUMNS[1:] if c not in rows]
    if missing:
        raise UserError(f"logs '{location}' lack the columns {', '.join(missing)}: not skinray's answers")
    if "error" in rows:
        rows = rows[rows["error"].isna()]  # bulk scoring's unreadable files: no answer
    if "differential" in rows and "differential_size" not in rows:
        rows["differential_size"] = rows["differential"].map(lambda d: None if d is None else len(d))
    if since is not None:
        if "time" not in rows:
            raise UserError("--since needs logs with a time column (bulk-scoring output has none)")
        rows = rows[rows["time"] >= pd.Timestamp(since)]
    return rows.reset_index(drop=True)


def _hidden(path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in path.split("/"))


# === Comparing ===


def psi(counts: np.ndarray, reference: np.ndarray) -> float:
    """The population stability index of two count vectors over the same classes."""
    p = (counts + 0.5) / (counts.sum() + 0.5 * len(counts))
    q = (reference + 0.5) / (reference.sum() + 0.5 * len(reference))
    return float(np.sum((p - q) * np.log(p / q)))


def compare(rows: pd.DataFrame, reference: dict, classes: list[str], cfg: MonitorConfig) -> dict:
    """One group's answers against the reference: the figures, their p-values, and the flags: a
    figure past its threshold at p < `SIGNIFICANCE` (a small validation split or a quiet day moves
    the rates by chance: 6 of 36 referred against 0 of 24 is p 0.07)."""
    from scipy.stats import binomtest, chi2_contingency, fisher_exact, ks_2samp

    n = len(rows)
    counts = rows["label"].value_counts().reindex(classes, fill_value=0).to_numpy()
    ref_counts = np.array([reference["labels"].get(c, 0) for c in classes])
    table = np.stack([counts, ref_counts])[:, (counts + ref_counts) > 0]
    ks = ks_2samp(rows["confidence"].to_numpy(float), np.asarray(reference["confidence"], float))
    abstained = int(rows["abstained"].sum())
    ref_abstained = round(reference["abstained"] * reference["images"])
    abstention = [[abstained, n - abstained], [ref_abstained, reference["images"] - ref_abstained]]
    figures = {
        "rows": n,
        "psi": psi(counts, ref_counts),
        "psi_p": float(chi2_contingency(table).pvalue) if table.shape[1] > 1 else 1.0,
        "ks": float(ks.statistic),
        "ks_p": float(ks.pvalue),
        "abstained": abstained / n,
        "abstention_change": abstained / n - reference["abstained"],
        "abstention_p": float(fisher_exact(abstention)[1]),
        "shares": {c: round(float(k) / n, 4) for c, k in zip(classes, counts)},
        "unknown_labels": int((~rows["label"].isin(classes)).sum()),
    }
    if reference.get("out_of_distribution") is not None:
        refused = int(rows["out_of_distribution"].sum())
        figures |= {
            "out_of_distribution": refused / n,
            "ood_change": refused / n - reference["out_of_distribution"],
            "ood_p": float(binomtest(refused, n, reference["out_of_distribution"]).pvalue),
        }
    if "differential_size" in rows and rows["differential_size"].notna().any():
        figures["differential_size"] = float(rows["differential_size"].mean())
    f, flags = figures, []
    if n >= cfg.min_rows:
        if f["psi"] > cfg.max_psi and f["psi_p"] < SIGNIFICANCE:
            flags.append(
                f"predicted classes shifted (PSI {f['psi']:.3f} > {cfg.max_psi}, p {f['psi_p']:.1e})"
            )
        if f["ks"] > cfg.max_ks and f["ks_p"] < SIGNIFICANCE:
            flags.append(f"confidence shifted (KS {f['ks']:.3f} > {cfg.max_ks}, p {f['ks_p']:.1e})")
        if abs(f["abstention_change"]) >= cfg.max_abstention_change and f["abstention_p"] < SIGNIFICANCE:
            flags.append(f"abstention rate moved {f['abstention_change']:+.1%} (p {f['abstention_p']:.1e})")
        if abs(f.get("ood_change", 0.0)) >= cfg.max_ood_change and f["ood_p"] < SIGNIFICANCE:
            flags.append(f"out-of-distribution rate moved {f['ood_change']:+.1%} (p {f['ood_p']:.1e})")
    return figures | {"flags": flags, "judged": n >= cfg.min_rows}


def monitor(logs: str, models: list[str], out: str | Path, cfg: MonitorConfig, since: str = "") -> dict:
    """Compares the logged answers of each of `models`' versions with that bundle's reference;
    writes report.json, report.md and a plot per version into `out`. Returns the report (`drift`:
    any group flagged)."""
    from skinray.storage import redact

    bundles = [(model, *_reference(model)) for model in models]
    rows = read_answers(logs, parse_since(since) if since else None)
    rows["day"] = rows["time"].dt.strftime("%Y-%m-%d") if "time" in rows else "all"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    versions = []
    for model, predictor, reference in bundles:
        ours = rows[rows["model_version"] == predictor.version]
        groups = (
            [{"day": "all days", **compare(ours, reference, predictor.classes, cfg)}] if len(ours) else []
        )
        if ours["day"].nunique() > 1:
            groups += [
                {"day": day, **compare(part, reference, predictor.classes, cfg)}
                for day, part in ours.groupby("day")
            ]
        plot = f"drift-{predictor.version[:12]}.png" if len(ours) else None
        if plot:
            _plot(ours, reference, predictor.classes, out / plot)
        versions.append(
            {
                "model": redact(model),
                "model_version": predictor.version,
                "reference": {k: v for k, v in reference.items() if k != "confidence"},
                "rows": int(len(ours)),
                "groups": groups,
                "plot": plot,
            }
        )
    known = {v["model_version"] for v in versions}
    others = rows[~rows["model_version"].isin(known)]["model_version"].value_counts()
    report = {
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "logs": redact(logs),
        "since": since or None,
        "thresholds": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "rows": int(len(rows)),
        "versions": versions,
        "other_versions": {str(v): int(n) for v, n in others.items()},
        "drift": any(g["flags"] for v in versions for g in v["groups"]),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    return report


def _reference(model: str):
    """(the bundle's Predictor, without models; its validation answers), or a clear error."""
    from skinray.predictor import Predictor

    predictor = Predictor.from_path(model, load_models=False)
    reference = predictor.manifest.get("reference")
    if not reference:
        raise UserError(
            f"'{model}' has no validation answers to compare with (a bundle written before "
            "`skinray monitor` existed, or not a bundle): rebuild it with skinray ensemble"
        )
    return predictor, reference


# === Reports ===


def markdown(report: dict) -> str:
    flagged = sum(bool(g["flags"]) for v in report["versions"] for g in v["groups"])
    lines = [
        "# Drift of served answers",
        "",
        f"Logs: {report['logs']}" + (f" since {report['since']}" if report["since"] else "") + ".",
        "",
        f"**Drift: {flagged} group(s) flagged.**" if flagged else "**No drift flagged.**",
    ]
    for v in report["versions"]:
        r = v["reference"]
        ood = r.get("out_of_distribution")
        lines += [
            "",
            f"## Bundle {v['model_version'][:16]} ({v['rows']} answers)",
            "",
            f"Reference: the bundle's answers on {r['images']} validation images (abstained "
            f"{r['abstained']:.1%}" + ("" if ood is None else f", out of distribution {ood:.1%}") + ").",
            "",
            "| day | rows | PSI | KS (p) | abstained (change) | out of distribution (change) | flags |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for g in v["groups"]:
            ood = "-" if "ood_change" not in g else f"{g['out_of_distribution']:.1%} ({g['ood_change']:+.1%})"
            flags = "; ".join(g["flags"]) or ("-" if g["judged"] else "too few rows to judge")
            lines.append(
                f"| {g['day']} | {g['rows']} | {g['psi']:.3f} | {g['ks']:.3f} ({g['ks_p']:.1e}) | "
                f"{g['abstained']:.1%} ({g['abstention_change']:+.1%}) | {ood} | {flags} |"
            )
        if v["plot"]:
            lines += ["", f"![predicted classes and confidence, validation against served]({v['plot']})"]
    if report["other_versions"]:
        lines += ["", "Other versions in the logs (not compared; pass their bundles with --model):", ""]
        lines += [f"- {v[:16]}: {n} rows" for v, n in report["other_versions"].items()]
    t = report["thresholds"]
    lines += [
        "",
        f"Thresholds: PSI > {t['max_psi']}, KS > {t['max_ks']} (p < 0.01), abstention change >= "
        f"{t['max_abstention_change']:.0%}, out-of-distribution change >= {t['max_ood_change']:.0%}, "
        f"groups of at least {t['min_rows']} rows.",
        "",
    ]
    return "\n".join(lines)


def _plot(rows: pd.DataFrame, reference: dict, classes: list[str], path: Path) -> None:
    """Predicted-class shares and confidence distributions, served against the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    served = rows["label"].value_counts(normalize=True).reindex(classes, fill_value=0)
    total = max(sum(reference["labels"].values()), 1)
    ref = [reference["labels"].get(c, 0) / total for c in classes]
    x = np.arange(len(classes))
    left.bar(x - 0.2, ref, 0.4, label="validation")
    left.bar(x + 0.2, served.to_numpy(), 0.4, label="served")
    left.set_xticks(x, [c if len(c) <= 20 else c[:18] + "…" for c in classes], rotation=90, fontsize=7)
    left.set_ylabel("share of answers")
    left.set_title("predicted classes")
    left.legend(fontsize=8)
    for values, name in ((reference["confidence"], "validation"), (rows["confidence"], "served")):
        values = np.sort(np.asarray(values, float))
        right.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=name)
    right.set_xlim(0, 1)
    right.set_xlabel("confidence (top probability)")
    right.set_ylabel("share of answers at or below")
    right.set_title("confidence")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_report(report: dict, out: str) -> str:
    """What `skinray monitor` prints."""
    lines = [f"{report['rows']} logged answers"]
    for v in report["versions"]:
        lines.append(f"bundle {v['model_version'][:16]}: {v['rows']} answers")
        for g in v["groups"]:
            state = "; ".join(g["flags"]) or ("ok" if g["judged"] else "too few rows to judge")
            lines.append(f"  {g['day']}: {g['rows']} rows, PSI {g['psi']:.3f}, KS {g['ks']:.3f}: {state}")
    for version, n in report["other_versions"].items():
        lines.append(f"other version {version[:16]}: {n} rows, not compared")
    lines.append(f"{'DRIFT' if report['drift'] else 'no drift'}; report: {Path(out) / 'report.md'}")
    return "\n".join(lines)
