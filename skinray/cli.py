"""The `skinray` command, the only face: parse, build the config, run a stage, report.

Every command that runs a model or Ray takes `--config FILE` and `--set section.key=value`; its
other options are either what it works on (`--model`, `--data`, `--out`, ...) or a config key with a
flag of its own (`COMMAND_FLAGS`), declared once: the flag's type, default and help are the config
field's (`skinray.config.describe_key`), so `--help`, the config and the docs cannot disagree. The
flags win over `--set`, which wins over `--config`, which wins over the defaults. Stages take a
`Config`, and connect to Ray (`skinray.cluster`) only once their inputs are known good, so a
mistake fails before any cluster starts; the pipeline, whose stages need different workers, is
connected here, sized for the largest. A user's mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skinray import UserError, __version__

# Each command's flags of its own: flag -> the config key it sets.
MODEL_FLAGS = {
    "--backbone": "model.backbone",
    "--data": "data.archive",
    "--image-size": "model.image_size",
    "--weights": "model.weights",
    "--weights-member": "model.weights_member",
}
COMMAND_FLAGS = {
    "train": {
        **MODEL_FLAGS,
        "--workers": "train.workers",
        "--gpus-per-worker": "train.gpus_per_worker",
        "--epochs": "train.epochs",
    },
    "tune": {
        **MODEL_FLAGS,
        "--trials": "tune.trials",
        "--max-concurrent": "tune.max_concurrent",
        "--mode": "tune.mode",
    },
    "ensemble": {"--coverage": "ensemble.coverage"},
    "score": {
        "--top-k": "score.top_k",
        "--expect-version": "score.expect_version",
        "--precision": "score.precision",
    },
    "evaluate": {
        "--batch-size": "score.batch_size",
        "--expect-version": "score.expect_version",
        "--precision": "score.precision",
        "--by": "evaluate.by",
        "--metadata": "evaluate.metadata",
    },
    "serve": {
        "--precision": "serve.precision",
        "--host": "serve.host",
        "--port": "serve.port",
        "--expect-version": "serve.expect_version",
        "--canary": "serve.canary",
        "--canary-percent": "serve.canary_percent",
        "--shadow": "serve.shadow",
    },
    "explain": {"--top-k": "score.top_k", "--expect-version": "score.expect_version"},
    "pipeline": {
        "--by": "evaluate.by",
        "--metadata": "evaluate.metadata",
        "--max-group-gap": "evaluate.max_group_gap",
    },
    "check": {"--max-pixels": "data.max_pixels"},
    "monitor": {"--max-psi": "monitor.max_psi", "--min-rows": "monitor.min_rows"},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinray",
        description="Train, tune and serve skin-disease image classifiers at cluster scale on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"skinray {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and TensorFlow's own INFO logs too (or set SKINRAY_VERBOSE=1)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = commands.add_parser("data", help="fetch, generate and check image archives")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = data_commands.add_parser("fetch", help="download DermNet from Kaggle and extract it")
    fetch.add_argument("--dest", required=True, help="folder to extract train/ and test/ into")
    fetch.add_argument("--zip", help="extract this already-downloaded DermNet zip instead of downloading")
    fetch.add_argument(
        "--not-dermnet",
        action="store_true",
        help="with --zip: another archive in DermNet's layout (train/ and test/ of class folders); "
        "checks the layout, not DermNet's 23 classes and image counts",
    )
    sample = data_commands.add_parser("sample", help="write the generated sample archive")
    sample.add_argument("--dest", required=True)
    sample.add_argument("--per-class", type=int, default=40, help="training images per class (default 40)")
    sample.add_argument("--classes", type=int, default=23, help="number of classes, 1 to 23 (default 23)")
    sample.add_argument("--seed", type=int, default=0)
    check = data_commands.add_parser("check", help="counts, imbalance, duplicates and unreadable files")
    check.add_argument("archive", help="archive folder or URI (s3://, gs://)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    _config_flags(check, "check", with_files=False)

    train = _command(commands, "train", "fine-tune a backbone on Ray Train")
    train.add_argument("--out", required=True, help="storage folder or URI for runs")
    train.add_argument("--name", help="run name; the same name resumes an interrupted run")

    tune = _command(commands, "tune", "search the classification head's hyperparameters with Ray Tune")
    tune.add_argument("--out", required=True, help="folder or URI for searches")
    tune.add_argument("--name", help="search name (default tune-BACKBONE); the same name continues a search")

    ensemble = _command(commands, "ensemble", "calibrate members and write one versioned bundle")
    ensemble.add_argument(
        "--members",
        nargs="+",
        required=True,
        metavar="RUN_OR_CHECKPOINT",
        help="training run directories or checkpoints (same classes, same validation split)",
    )
    ensemble.add_argument("--data", required=True, help="the archive the members were trained on")
    ensemble.add_argument("--out", required=True, help="new bundle folder or URI (never overwritten)")

    score = _command(commands, "score", "bulk-score a folder or manifest of images to Parquet on Ray Data")
    score.add_argument("--model", required=True, help="bundle, run directory, checkpoint or .keras file")
    score.add_argument(
        "--input",
        required=True,
        help="folder tree of images (local or URI), or a .parquet/.csv manifest with a 'path' column",
    )
    score.add_argument("--output", required=True, help="folder or URI; rerun with the same one to resume")

    serve = _command(commands, "serve", "the online endpoint (Ray Serve) in the foreground until interrupted")
    serve.add_argument("--model", required=True, help="bundle, run directory, checkpoint or .keras file")
    serve.add_argument(
        "--detach",
        action="store_true",
        help="deploy onto the running cluster (RAY_ADDRESS) and return, leaving the endpoint up",
    )
    serve.add_argument(
        "--print-config",
        action="store_true",
        help="print the Serve config file that deploys the same application, and exit",
    )

    explain = _command(commands, "explain", "Grad-CAM explanations of images as PNG files, without a server")
    explain.add_argument("--model", required=True, help="bundle, run directory, checkpoint or .keras file")
    explain.add_argument(
        "inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched for them"
    )
    explain.add_argument(
        "--out", required=True, help="folder for the PNG files (one per image, named after it)"
    )
    explain.add_argument(
        "--overwrite", action="store_true", help="replace PNGs already in --out (refused otherwise)"
    )

    export = commands.add_parser(
        "export-weights", help="write a trained model's backbone weights for plain Keras (.weights.h5)"
    )
    export.add_argument("model", metavar="RUN_OR_BUNDLE", help="run directory, checkpoint or bundle")
    export.add_argument("--member", default="", help="a bundle's member (default: its only one)")
    export.add_argument("--out", required=True, help="file or URI ending in .weights.h5")

    evaluate = _command(commands, "evaluate", "per-class report of a bundle or trained model")
    evaluate.add_argument("--model", required=True, help="bundle, run directory, checkpoint, or .keras file")
    evaluate.add_argument("--data", required=True, help="archive folder or URI")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument(
        "--out", required=True, help="folder for report.json, report.md and the confusion matrix"
    )
    evaluate.add_argument(
        "--ood",
        metavar="DIR",
        help="foreign images (a folder or manifest): report how a bundle's out-of-distribution check "
        "tells them from the split's (AUROC, refused shares)",
    )

    monitor = _command(
        commands, "monitor", "drift of served (or bulk-scored) answers from the bundle's validation answers"
    )
    monitor.add_argument(
        "--logs", required=True, help="the prediction log (serve.prediction_log), or a skinray score output"
    )
    monitor.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="BUNDLE",
        help="the bundle(s) whose answers to compare (a canary's too); each with its own validation answers",
    )
    monitor.add_argument(
        "--since", default="", help="only answers since then: 7d, 24h, 30m, or an ISO date or time"
    )
    monitor.add_argument("--out", required=True, help="folder for report.json, report.md and drift.png")

    pipeline = commands.add_parser(
        "pipeline",
        help="archive to evaluated bundle: check, tune and train each member, ensemble, evaluate (resumable)",
    )
    _config_flags(pipeline, "pipeline", with_files=False)
    pipeline.add_argument("--data", required=True, help="archive folder or URI")
    pipeline.add_argument(
        "--out",
        required=True,
        help="storage folder or URI for every stage's output; the same one continues a stopped run",
    )
    pipeline.add_argument(
        "--members",
        nargs="+",
        metavar="CONFIG",
        help="one config file per member (default: configs/resnet50.yaml, inception_v3.yaml, "
        "efficientnetv2s.yaml)",
    )
    pipeline.add_argument("--config", help="YAML settings for every member, under each member's own file")
    pipeline.add_argument(
        "--no-tune", action="store_true", help="train with the member configs' heads as they are"
    )
    pipeline.add_argument("--gpu", action="store_true", help="one GPU per Train worker and per model actor")
    pipeline.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value of every member, e.g. --set train.workers=8 (repeatable)",
    )

    demo = commands.add_parser("demo", help="the end-to-end demo on a generated sample archive")
    demo.add_argument("--out", default="demo-output", help="folder for everything the demo writes")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--quick", action="store_true", help="tiny members instead of the three real backbones")
    demo.add_argument("--port", type=int, default=8000, help="the endpoint's port (default 8000)")
    demo.add_argument(
        "--exit", action="store_true", help="end after the last stage instead of serving until Ctrl-C"
    )
    return parser


def _command(commands, name: str, help: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help)
    _config_flags(parser, name)
    return parser


def _config_flags(parser: argparse.ArgumentParser, command: str, with_files: bool = True) -> None:
    """--config and --set, then the command's own flags, each described by its config field."""
    from skinray.config import PRECISIONS, TUNE_MODES, describe_key
    from skinray.models import list_backbones

    # The keys with a flag whose values are a closed set.
    choices = {
        "tune.mode": TUNE_MODES,
        "model.backbone": list_backbones(),
        "score.precision": PRECISIONS,
        "serve.precision": PRECISIONS,
    }
    if with_files:
        parser.add_argument("--config", help="YAML config file (see configs/)")
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set train.batch_size=64 (repeatable)",
        )
    for flag, key in COMMAND_FLAGS[command].items():
        info = describe_key(key)
        parser.add_argument(
            flag,
            dest=key,
            type=info.type,
            choices=choices.get(key),
            default=None,
            metavar=None if key in choices else key.split(".")[1].upper(),
            help=f"{info.help.rstrip('.')} [{key}; default {info.default!r}]".replace("%", "%%"),
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from skinray.console import set_verbose, setup_driver
    from skinray.storage import redact

    set_verbose(args.verbose)
    setup_driver(redact)
    try:
        return COMMANDS[args.command](args)
    except (UserError, FileNotFoundError) as exc:
        print(f"skinray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("skinray: interrupted", file=sys.stderr)
        return 130


# === From flags to a config, and to a cluster ===


def flag_settings(args: argparse.Namespace) -> list[str]:
    """The command's own flags that were given, as `key=value` settings."""
    flags = COMMAND_FLAGS["check" if args.command == "data" else args.command]
    return [f"{key}={vars(args)[key]}" for key in flags.values() if vars(args).get(key) is not None]


def config_of(args: argparse.Namespace):
    """--config, then --set, then the command's own flags (which win)."""
    from skinray.config import load_config

    path, settings = getattr(args, "config", None), list(getattr(args, "set", ()))
    overrides = flag_settings(args)
    epochs = vars(args).get("train.epochs")
    if epochs is not None and load_config(path, settings).train.head_epochs > epochs:
        overrides.append(f"train.head_epochs={epochs}")  # fewer epochs than the file's head phase
    return load_config(path, [*settings, *overrides])


# === The commands ===


def _train(args) -> int:
    from skinray.train.trainer import train

    cfg = config_of(args)
    result = train(cfg, args.out, args.name or "")
    best = result.best_metrics
    print(f"run directory: {result.run_dir}")
    print(
        f"best checkpoint: {result.best_checkpoint} (epoch {best.get('epoch')}, "
        f"{cfg.train.monitor} {best.get(cfg.train.monitor, float('nan')):.4f})"
    )
    return 0


def _tune(args) -> int:
    from skinray.storage import join_uri
    from skinray.tune.search import SEARCHED, format_value, tune_head

    cfg = config_of(args)
    summary = tune_head(cfg, args.out, args.name or "")
    best, t = summary["best"], cfg.tune
    searched = ", ".join(f"{k} {format_value(best[k])}" for k in SEARCHED)
    print(
        f"\nbest of {summary['trials']} trials ({summary['stopped_early']} stopped early by ASHA): "
        f"{t.metric} {best[t.metric]:.4f} at epoch {best['best_epoch']}: {searched}"
    )
    print(f"trial table: {join_uri(summary['run_dir'], 'trials.md')}")
    print(
        f"train with it: skinray train --config {summary['best_config']} --data {cfg.data.archive} --out runs"
    )
    return 0


def _ensemble(args) -> int:
    from skinray.ensemble import build_ensemble, format_manifest

    cfg = config_of(args)
    manifest = build_ensemble(args.members, args.data, args.out, cfg)
    print(format_manifest(manifest, args.out))
    return 0


def _score(args) -> int:
    from skinray.score import format_summary, score

    cfg = config_of(args)
    print(format_summary(score(cfg, args.model, args.input, args.output)))
    return 0


def _evaluate(args) -> int:
    from skinray.evaluate import evaluate, format_report

    cfg = config_of(args)
    report = evaluate(args.model, args.data, args.split, args.out, cfg, args.ood)
    print(format_report(report, args.out))
    return 0


def _monitor(args) -> int:
    from skinray.monitor import format_report, monitor

    report = monitor(args.logs, args.model, args.out, config_of(args).monitor, args.since)
    print(format_report(report, args.out))
    return 1 if report["drift"] else 0


def _serve(args) -> int:
    from skinray.serve.command import serve_command

    return serve_command(config_of(args), args.model, print_config=args.print_config, detach=args.detach)


def _explain(args) -> int:
    from skinray.explain import explain_files

    return explain_files(config_of(args), args.model, args.inputs, args.out, overwrite=args.overwrite)


def _pipeline(args) -> int:
    from skinray.cluster import connect, reserved_cpus
    from skinray.pipeline import DEFAULT_MEMBERS, GPU_SETTINGS, MemberSpec, member_configs, run_pipeline

    members = [MemberSpec.of_file(path) for path in (args.members or DEFAULT_MEMBERS)]
    settings = [*(GPU_SETTINGS if args.gpu else ()), *args.set, *flag_settings(args)]
    configs = member_configs(args.data, members, settings, args.config)  # bad settings fail here, before Ray
    connect(reserved_cpus=max(reserved_cpus(cfg, "pipeline") for cfg in configs))
    report = run_pipeline(
        args.data, args.out, members, settings, tune=not args.no_tune, base_config=args.config
    )
    return 0 if report["num_images"] and report.get("promoted", True) else 1


def _demo(args) -> int:
    from skinray.demo import run_demo

    return run_demo(
        args.out, workers=args.workers, quick=args.quick, port=args.port, exit_when_done=args.exit
    )


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "fetch":
        from skinray.data.fetch import DATASET, extract, fetch

        if args.not_dermnet and not args.zip:
            raise UserError("--not-dermnet goes with --zip FILE (a download from Kaggle is always DermNet)")
        if args.zip:
            result = extract(
                args.zip,
                args.dest,
                verify_dermnet=not args.not_dermnet,
                dataset=Path(args.zip).name if args.not_dermnet else DATASET,
            )
        else:
            result = fetch(args.dest)
        state = "already present" if result.pop("already_present") else "extracted"
        print(
            f"{result['dataset']} {state} in {args.dest}: {result['counts']} images, "
            f"{len(result['classes'])} classes"
        )
        return 0
    if args.data_command == "sample":
        from skinray.data.sample import write_sample

        counts = write_sample(args.dest, per_class=args.per_class, classes=args.classes, seed=args.seed)
        print(f"sample archive written to {args.dest}: {counts}")
        return 0
    from skinray.data.check import check_archive, format_report

    cfg = config_of(args)
    report = check_archive(args.archive, max_pixels=cfg.data.max_pixels)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def _export_weights(args) -> int:
    from skinray.console import load_tensorflow
    from skinray.models.sources import export_backbone

    load_tensorflow(expect_gpu=False)
    print(export_backbone(args.model, args.out, args.member))
    return 0


COMMANDS = {
    "data": _data,
    "train": _train,
    "tune": _tune,
    "ensemble": _ensemble,
    "score": _score,
    "evaluate": _evaluate,
    "serve": _serve,
    "explain": _explain,
    "export-weights": _export_weights,
    "monitor": _monitor,
    "pipeline": _pipeline,
    "demo": _demo,
}


if __name__ == "__main__":
    sys.exit(main())
