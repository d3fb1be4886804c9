"""Predictions -> per-class report, calibration and reliability: the check on every model skinray makes.

`skinray evaluate` scores a split of an archive with a model (an ensemble bundle, a training run,
a checkpoint or a `.keras` file) through the same Ray Data decode tasks and model actors as bulk
scoring, and writes `report.json`, a readable `report.md`, the confusion matrix (JSON and PNG) and
the reliability diagram (PNG). A bundle is reported beside each of its members, with the
calibration error before and after calibration and the coverage and accuracy at its abstention
threshold. The numbers come from `skinray.metrics` (scikit-learn's where it has them).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from skinray import UserError, subgroups
from skinray.config import Config
from skinray.metrics import build_report, reliability_bins, selective_metrics, summary_metrics
from skinray.storage import join_uri, redact

# === Writing ===


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    """Writes report.json, report.md, confusion_matrix.json and confusion_matrix.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "confusion_json": out / "confusion_matrix.json",
        "confusion_png": out / "confusion_matrix.png",
        "reliability_png": out / "reliability.png",
    }
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["confusion_json"].write_text(
        json.dumps({"classes": report["classes"], "matrix": report["confusion_matrix"]}, indent=2)
    )
    paths["markdown"].write_text(_markdown(report))
    _plot_confusion(np.array(report["confusion_matrix"]), report["classes"], paths["confusion_png"])
    _plot_reliability(report["calibration"]["reliability"], paths["reliability_png"])
    for column, r in report.get("groups", {}).items():
        paths[f"groups_{column}"] = out / f"groups_{column}.png"
        subgroups.plot(column, r, paths[f"groups_{column}"])
    return paths


def _markdown(report: dict) -> str:
    lines = [f"# Evaluation: {report.get('model', 'model')} on {report.get('split', 'split')}", ""]
    if report.get("model_version"):
        lines.append(f"model version `{report['model_version']}`")
    lines.append(
        f"{report['num_images']} images; accuracy **{report['accuracy']:.4f}**, "
        f"macro-F1 **{report['macro_f1']:.4f}**, weighted-F1 {report['weighted_f1']:.4f}"
    )
    for key in sorted(k for k in report if k.startswith("top_")):
        lines.append(f"- {key.replace('_', ' ')}: {report[key]:.4f}")
    if report.get("failed_files"):
        lines.append(f"- unreadable files (not scored): {len(report['failed_files'])}")
    calibration, abstention = report.get("calibration"), report.get("abstention")
    if calibration:
        lines.append(
            f"- expected calibration error: {calibration['ece_before']:.4f} before calibration, "
            f"{calibration['ece_after']:.4f} after (log-loss {calibration['log_loss_before']:.4f} -> "
            f"{calibration['log_loss_after']:.4f})"
        )
    if abstention:
        lines.append(
            f"- abstention threshold {abstention['threshold']:.3f}: answers {abstention['coverage']:.1%} "
            f"of the images, accuracy on those {abstention['answered_accuracy']:.4f}"
        )
    differential = report.get("differential")
    if differential:
        lines += ["", *_differential_lines(differential)]
    if report.get("precision"):
        p = report["precision"]
        ece = " -> ".join(f"{v:.4f}" for v in p["ece"].values())
        lines += [
            "",
            f"## Precision: {p['used']} ({p['why']}) against float32",
            "",
            f"- top-1 agreement {p['top1_agreement']:.2%} on {p['images']} images; largest probability "
            f"difference {p['max_probability_difference']:.4f}; ECE {ece} (float32 -> {p['used']})",
        ]
    if report.get("ood"):
        lines += ["", *_ood_lines(report["ood"], report.get("out_of_distribution", {}))]
    for column, r in report.get("groups", {}).items():
        lines += ["", *subgroups.markdown(column, r), "", f"![accuracy by {column}](groups_{column}.png)"]
    members = report.get("members", {})
    if len(members) > 1:
        lines += [
            "",
            "| model | accuracy | macro-F1 | log-loss | ECE (uncalibrated -> calibrated) |",
            "|---|---:|---:|---:|---|",
        ]
        lines.append(
            f"| **ensemble** | {report['accuracy']:.4f} | {report['macro_f1']:.4f} | "
            f"{calibration['log_loss_after']:.4f} | {calibration['ece_before']:.4f} -> "
            f"{calibration['ece_after']:.4f} |"
        )
        for name, m in members.items():
            lines.append(
                f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['log_loss']:.4f} | "
                f"{m['ece_uncalibrated']:.4f} -> {m['ece']:.4f} |"
            )
    member_names = list(members) if len(members) > 1 else []
    lines += [
        "",
        "| class | precision | recall | F1 | " + "".join(f"F1 {n} | " for n in member_names) + "support |",
        "|---|---:|---:|---:|" + "---:|" * len(member_names) + "---:|",
    ]
    for name, row in report["per_class"].items():
        member_f1 = "".join(f"{members[n]['per_class_f1'][name]['f1']:.3f} | " for n in member_names)
        lines.append(
            f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {member_f1}"
            f"{row['support']} |"
        )
    return "\n".join(lines) + "\n"


def _ood_lines(o: dict, refused: dict) -> list[str]:
    """The out-of-distribution section of report.md (`skinray evaluate --ood`)."""
    auroc = "n/a" if o["auroc"] is None else f"{o['auroc']:.4f}"
    return [
        "## Out of distribution",
        "",
        f"- {o['foreign_images']} foreign images from `{o['folder']}` against the split's {o['images']}: "
        f"AUROC **{auroc}**",
        f"- at the bundle's threshold {o['threshold']:.4f}: {o['caught']:.1%} of the foreign images "
        f"refused, {o['false_refusal']:.1%} of the split's (target at most {refused.get('target', 0):.0%})",
    ]


def _differential_lines(d: dict) -> list[str]:
    """The differential sets' section of report.md."""
    low, high = d["interval"]
    top_k = ", ".join(f"top-{k} {v:.4f}" for k, v in d["top_k_at_mean_size"].items())
    sizes = ", ".join(f"{size}: {count}" for size, count in d["size_histogram"].items())
    return [
        f"## Differential sets ({d['method']}, target coverage {d['target']:.0%})",
        "",
        f"- coverage **{d['coverage']:.4f}** on {d['images']} images; expected in [{low:.4f}, {high:.4f}] "
        f"(95%, from {d['calibration_images']} calibration images; never-empty sets add "
        f"{d['forced_top']:.4f})",
        f"- mean set size {d['mean_size']:.2f} (sizes: {sizes}); beside it: {top_k}",
        "",
        "| class | coverage |",
        "|---|---:|",
        *(f"| {c} | {v:.3f} |" for c, v in d["per_class_coverage"].items()),
    ]


def _plot_confusion(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    side = max(6, 0.45 * len(classes) + 3)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    labels = [c if len(c) <= 28 else c[:26] + "…" for c in classes]
    ax.set_xticks(range(len(classes)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), labels, fontsize=7)
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(
                j,
                i,
                str(count),
                ha="center",
                va="center",
                fontsize=6,
                color="white" if normalised[i, j] > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (colour: share of the true class)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_reliability(curves: dict[str, list[dict]], path: Path) -> None:
    """Accuracy against confidence per bin, one line per curve (before and after calibration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, bins in curves.items():
        used = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# === The evaluate command ===


def evaluate(
    model_path: str, archive: str, split: str, out: str, cfg: Config | None = None, ood_dir: str | None = None
) -> dict:
    """`evaluate_split`, as an MLflow run of its own when tracking is on (`skinray.tracking`): the
    report's headline metrics, the model's version, and the report's files as artifacts."""
    from skinray.tracking import tracked

    with tracked(cfg or Config(), f"evaluate {split}", "evaluate") as run:
        report = evaluate_split(model_path, archive, split, out, cfg, ood_dir)
        run.params({"model": redact(report["model"]), "archive": redact(archive), "split": split})
        run.tag("skinray.model_version", report["model_version"])
        run.metrics(report)
        for section in ("calibration", "abstention", "out_of_distribution", "differential"):
            run.metrics({f"{section}.{k}": v for k, v in (report.get(section) or {}).items()})
        run.artifact(str(out), "report")
        return report


def evaluate_split(
    model_path: str, archive: str, split: str, out: str, cfg: Config | None = None, ood_dir: str | None = None
) -> dict:
    """Scores one split of an archive with a model and writes the report to `out`.

    The validation split is re-derived with the model's own seed and fraction, so `--split val`
    scores exactly the images the run validated on (and a bundle was calibrated on). Archive
    classes are matched to the model's by name; an archive class the model does not know is an error.
    The engine runs with `cfg.score` (actors, GPUs, batch size: the command's config); without a
    `cfg`, with the model's own. `ood_dir`: a folder (or manifest) of foreign images, to report how
    well a bundle's out-of-distribution check tells them from the split's.
    """
    from skinray.cluster import connect, reserved_cpus
    from skinray.data.catalog import list_archive, model_split
    from skinray.data.ingest import ImageSource
    from skinray.inference import labelled_logits
    from skinray.predictor import Predictor
    from skinray.storage import absolute

    model_path = absolute(model_path)  # the actors open it from their own working directories
    expected = cfg.score.expect_version if cfg else ""
    predictor = Predictor.from_path(
        model_path, load_models=False, expect_version=expected
    )  # actors load them
    catalog = list_archive(archive)
    table = model_split(catalog, split, predictor.classes, predictor.config.data)
    cfg = cfg or predictor.config
    metadata = subgroups.metadata_for(archive, cfg.evaluate)  # a missing file or column: before any work
    if ood_dir and predictor.ood_threshold is None:
        raise UserError(
            f"'{redact(model_path)}' has no out-of-distribution check (only bundles made by skinray "
            "ensemble have one): --ood has nothing to evaluate"
        )
    connect(reserved_cpus(cfg, "evaluate"))
    scored = labelled_logits(
        table,
        [model_path],
        predictor.sizes,
        ImageSource.of(catalog, predictor.config.data.max_pixels),
        cfg.score,
        f"the {split} split",
        predictor.bundle_version,
    )
    labels, failed = scored.labels, scored.failed
    calibrated = replace(predictor.combine(scored.logits, scored.draws), ood_scores=scored.ood_scores)
    report = model_report(predictor, calibrated, predictor.combine_uncalibrated(scored.logits), labels)
    from skinray.precision import resolve as resolve_precision

    precision, why = resolve_precision(cfg.score.precision)
    if precision != "float32":  # the same split in float32 beside it: agreement is measured, never assumed
        reference = labelled_logits(
            table,
            [model_path],
            predictor.sizes,
            ImageSource.of(catalog, predictor.config.data.max_pixels),
            replace(cfg.score, precision="float32"),
            f"the {split} split in float32",
            predictor.bundle_version,
        )
        report["precision"] = precision_report(predictor, scored, reference, precision, why)
    if ood_dir:
        report["ood"] = _foreign_report(predictor, model_path, scored.ood_scores, ood_dir, cfg)
    if metadata is not None:
        report["groups"] = _group_reports(predictor, calibrated, scored, catalog, metadata, cfg)
    report |= {
        "model": predictor.source,
        "model_version": predictor.version,
        "split": split,
        "archive": redact(archive),
        "failed_files": [
            {"path": p, "reason": r} for p, r in zip(failed["path"].to_pylist(), failed["error"].to_pylist())
        ],
    }
    _store(report, predictor.config, out)
    return report


def precision_report(predictor, scored, reference, precision: str, why: str) -> dict:
    """How the answers in `precision` compare with float32's on the same images: top-1 agreement,
    the largest difference of a calibrated probability, ECE, and the differential sets' coverage."""
    from skinray.metrics import expected_calibration_error

    where = {p: i for i, p in enumerate(reference.paths)}
    both = [i for i, p in enumerate(scored.paths) if p in where]
    ours = predictor.combine(scored.logits[:, both], scored.draws[both])
    theirs = predictor.combine(
        reference.logits[:, [where[scored.paths[i]] for i in both]], scored.draws[both]
    )
    labels = scored.labels[both]
    out = {
        "used": precision,
        "why": why,
        "images": len(both),
        "top1_agreement": float((ours.labels == theirs.labels).mean()),
        "max_probability_difference": float(np.abs(ours.probabilities - theirs.probabilities).max()),
        "ece": {
            "float32": float(expected_calibration_error(theirs.probabilities, labels)),
            precision: float(expected_calibration_error(ours.probabilities, labels)),
        },
    }
    if ours.in_set is not None:
        rows = np.arange(len(labels))
        out["differential_coverage"] = {
            "float32": float(theirs.in_set[rows, labels].mean()),
            precision: float(ours.in_set[rows, labels].mean()),
        }
    return out


def _group_reports(predictor, calibrated, scored, catalog, metadata, cfg: Config) -> dict:
    """`skinray.subgroups.report` for each `evaluate.by` column, on the archive's metadata."""
    from skinray.conformal import sets

    root = f"{catalog.prefix}{catalog.root}/"
    relative = [p[len(root) :] if p.startswith(root) else p for p in scored.paths]
    data = {
        "labels": scored.labels,
        "probabilities": calibrated.probabilities,
        "abstained": calibrated.abstained,
        "ood": calibrated.out_of_distribution,
        "in_set": None
        if predictor.set_threshold is None
        else sets(calibrated.probabilities, calibrated.draws, predictor.set_threshold),
    }
    return {
        column: subgroups.report(
            subgroups.group_labels(relative, metadata, column), data, cfg.evaluate.bootstrap
        )
        for column in cfg.evaluate.columns
    }


def _foreign_report(predictor, model_path: str, in_scores, ood_dir: str, cfg: Config) -> dict:
    """AUROC, false refusals and foreign images caught (`skinray.ood.report`), foreign images scored
    through the same engine."""
    import pyarrow as pa

    from skinray.inference import predict_table
    from skinray.ood import report
    from skinray.score import list_inputs

    source, inputs = list_inputs(ood_dir)
    table = pa.table({"path": inputs["path"], "label_index": pa.array([-1] * inputs.num_rows, pa.int32())})
    rows = predict_table(
        table,
        [model_path],
        predictor.sizes,
        source,
        cfg.score,
        with_logits=False,
        version=predictor.bundle_version,
    )
    good = rows.filter(rows["error"].is_null())
    if good.num_rows == 0:
        raise UserError(f"no image in '{redact(ood_dir)}' could be read ({rows.num_rows} files)")
    foreign = good["ood_score"].to_numpy().astype(np.float64)
    return report(in_scores, foreign, predictor.ood_threshold) | {
        "folder": redact(ood_dir),
        "unreadable": rows.num_rows - good.num_rows,
    }


def _store(report: dict, config, out: str) -> None:
    """The report files and the evaluated model's resolved config, in a folder or an object store."""
    import tempfile

    from skinray.config import save_config
    from skinray.storage import upload_folder

    with tempfile.TemporaryDirectory() as folder:  # drawn locally, then stored: report.json last
        write_report(report, folder)
        save_config(config, folder)
        upload_folder(folder, out, last=("report.json",))


def model_report(predictor, calibrated, uncalibrated, labels: np.ndarray) -> dict:
    """The ensemble's full report, each member beside it, calibration before and after, abstention."""
    report = build_report(labels, calibrated.probabilities, predictor.classes)
    report["members"] = {
        m.name: summary_metrics(calibrated.member_probabilities[k], labels)
        | {
            "ece_uncalibrated": summary_metrics(uncalibrated.member_probabilities[k], labels)["ece"],
            "per_class_f1": build_report(
                labels, calibrated.member_probabilities[k], predictor.classes, top_k=()
            )["per_class"],
        }
        for k, m in enumerate(predictor.members)
    }
    before, after = uncalibrated.probabilities, calibrated.probabilities
    scores_before, scores_after = summary_metrics(before, labels), summary_metrics(after, labels)
    report["calibration"] = {
        "ece_before": scores_before["ece"],
        "ece_after": scores_after["ece"],
        "log_loss_before": scores_before["log_loss"],
        "log_loss_after": scores_after["log_loss"],
        "reliability": {
            "before calibration": reliability_bins(before, labels),
            "after calibration": reliability_bins(after, labels),
        },
    }
    report["abstention"] = selective_metrics(after, labels, predictor.threshold)
    if calibrated.ood_scores is not None:
        refused = calibrated.out_of_distribution
        report["out_of_distribution"] = {
            "target": predictor.manifest["ood"]["false_refusal"],
            "threshold": predictor.ood_threshold,
            "refused": float(refused.mean()),
            "accuracy_of_refused": float((calibrated.labels[refused] == labels[refused]).mean())
            if refused.any()
            else None,
        }
    if calibrated.in_set is not None:
        from skinray.conformal import report as set_report

        fitted = predictor.manifest["differential"]
        report["differential"] = set_report(
            after,
            labels,
            calibrated.draws,
            fitted | {"threshold": predictor.set_threshold},
            predictor.classes,
        )
    return report


def format_report(report: dict, out: str) -> str:
    """What `skinray evaluate` prints: the headline scores, each member's, calibration, abstention."""
    lines = [
        f"{report['num_images']} images of the {report['split']} split: accuracy {report['accuracy']:.4f}, "
        f"macro-F1 {report['macro_f1']:.4f}; {len(report['failed_files'])} unreadable"
    ]
    if len(report["members"]) > 1:
        for name, m in report["members"].items():
            lines.append(f"  member {name}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    calibration, abstention = report["calibration"], report["abstention"]
    lines.append(
        f"ECE {calibration['ece_before']:.4f} before calibration, {calibration['ece_after']:.4f} after; "
        f"answers {abstention['coverage']:.1%} at threshold {abstention['threshold']:.3f}, "
        f"{abstention['answered_accuracy']:.4f} of them correctly"
    )
    if report.get("out_of_distribution"):
        r = report["out_of_distribution"]
        lines.append(f"refused as out of distribution: {r['refused']:.1%} (target at most {r['target']:.0%})")
    if report.get("ood"):
        o = report["ood"]
        auroc = "n/a" if o["auroc"] is None else f"{o['auroc']:.3f}"
        lines.append(
            f"foreign images ({o['foreign_images']}): AUROC {auroc}, {o['caught']:.1%} refused "
            f"at the bundle's threshold"
        )
    d = report.get("differential")
    if d:
        lines.append(
            f"differential: covers {d['coverage']:.1%} (target {d['target']:.0%}, expected "
            f"{d['interval'][0]:.1%}-{d['interval'][1]:.1%}), mean size {d['mean_size']:.2f}"
        )
    for column, r in report.get("groups", {}).items():
        lines += subgroups.console_lines(column, r)
    lines.append(f"report: {join_uri(out, 'report.md')}")
    return "\n".join(lines)
