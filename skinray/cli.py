"""The `skinray` command: parse the arguments, dispatch to a stage, report errors in one line.

Nothing here does work of its own; each subcommand calls one function of the package, and options
that configure a run are sugar for `--set section.key=value` overrides of the typed config.
"""

from __future__ import annotations

import argparse
import json
import sys

from skinray import UserError, __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinray",
        description="Train, tune and serve skin-disease image classifiers at cluster scale on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"skinray {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and TensorFlow's own INFO logs too (or set SKINRAY_VERBOSE=1)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = commands.add_parser("data", help="fetch, generate and check image archives")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = data_commands.add_parser("fetch", help="download DermNet from Kaggle and extract it")
    fetch.add_argument("--dest", required=True, help="folder to extract train/ and test/ into")
    fetch.add_argument("--zip", help="extract this already-downloaded DermNet zip instead of downloading")
    sample = data_commands.add_parser("sample", help="write the generated sample archive")
    sample.add_argument("--dest", required=True)
    sample.add_argument("--per-class", type=int, default=40, help="training images per class (default 40)")
    sample.add_argument("--classes", type=int, default=23, help="number of classes, 1 to 23 (default 23)")
    sample.add_argument("--seed", type=int, default=0)
    check = data_commands.add_parser("check", help="counts, imbalance, duplicates and unreadable files")
    check.add_argument("archive", help="archive folder or URI (s3://, gs://)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--max-pixels", type=int, default=None, help="decompression-bomb limit")

    train = commands.add_parser("train", help="fine-tune a backbone on Ray Train")
    _config_options(train)
    train.add_argument("--backbone", help="registered backbone (resnet50, inception_v3, efficientnetv2s, tiny)")
    train.add_argument("--data", help="archive folder or URI")
    train.add_argument("--out", required=True, help="storage folder or URI for runs")
    train.add_argument("--workers", type=int)
    train.add_argument("--gpus-per-worker", type=float)
    train.add_argument("--epochs", type=int, help="total epochs (over both phases of the transfer recipe)")
    train.add_argument("--image-size", type=int, help="input side in pixels (default: the backbone's)")
    train.add_argument("--weights", help="imagenet, none, or a path to a weights file")
    train.add_argument("--name", help="run name; the same name resumes an interrupted run")

    tune = commands.add_parser("tune", help="search the classification head's hyperparameters with Ray Tune")
    _config_options(tune)
    tune.add_argument("--backbone", help="registered backbone (resnet50, inception_v3, efficientnetv2s, tiny)")
    tune.add_argument("--data", help="archive folder or URI")
    tune.add_argument("--out", required=True, help="folder or URI for searches")
    tune.add_argument("--name", help="search name (default tune-BACKBONE); the same name continues a search")
    tune.add_argument("--trials", type=int, help="configurations to try (default 16)")
    tune.add_argument("--max-concurrent", type=int, help="trials at once (default: as the CPUs allow)")
    tune.add_argument("--mode", choices=["cached", "full"], help="cached embeddings (default) or full Ray Train runs")
    tune.add_argument("--image-size", type=int, help="input side in pixels (default: the backbone's)")
    tune.add_argument("--weights", help="imagenet, none, or a path to a weights file")

    ensemble = commands.add_parser("ensemble", help="calibrate members and write one versioned bundle")
    _config_options(ensemble)
    ensemble.add_argument("--members", nargs="+", required=True, metavar="RUN_OR_CHECKPOINT",
                          help="training run directories or checkpoints (same classes, same validation split)")
    ensemble.add_argument("--data", required=True, help="the archive the members were trained on")
    ensemble.add_argument("--out", required=True, help="new bundle folder or URI (never overwritten)")
    ensemble.add_argument("--coverage", type=float, help="share of validation images answered (default 0.9)")

    score = commands.add_parser("score", help="bulk-score a folder or manifest of images to Parquet on Ray Data")
    _config_options(score)
    score.add_argument("--model", required=True, help="bundle, run directory, checkpoint or .keras file")
    score.add_argument("--input", required=True,
                       help="folder tree of images (local or URI), or a .parquet/.csv manifest with a 'path' column")
    score.add_argument("--output", required=True, help="folder or URI; rerun with the same one to resume")
    score.add_argument("--top-k", type=int, help="classes listed per image (default 3)")

    serve = commands.add_parser("serve", help="the online endpoint (Ray Serve) in the foreground until interrupted")
    _config_options(serve)
    serve.add_argument("--model", required=True, help="bundle, run directory, checkpoint or .keras file")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--detach", action="store_true",
                       help="deploy onto the running cluster (RAY_ADDRESS) and return, leaving the endpoint up")
    serve.add_argument("--print-config", action="store_true",
                       help="print the Serve config file that deploys the same application, and exit")

    explain = commands.add_parser("explain", help="Grad-CAM explanations of images as PNG files, without a server")
    explain.add_argument("--model", required=True, help="bundle, run directory, checkpoint or .keras file")
    explain.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched for them")
    explain.add_argument("--out", required=True, help="folder for the PNG files (one per image, named after it)")

    evaluate = commands.add_parser("evaluate", help="per-class report of a bundle or trained model")
    evaluate.add_argument("--model", required=True, help="bundle, run directory, checkpoint, or .keras file")
    evaluate.add_argument("--data", required=True, help="archive folder or URI")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--out", required=True, help="folder for report.json, report.md and the confusion matrix")
    evaluate.add_argument("--batch-size", type=int, default=32)

    pipeline = commands.add_parser("pipeline", help="archive to evaluated bundle: check, tune and train each member, "
                                                    "ensemble, evaluate (resumable)")
    pipeline.add_argument("--data", required=True, help="archive folder or URI")
    pipeline.add_argument("--out", required=True,
                          help="storage folder or URI for every stage's output; the same one continues a stopped run")
    pipeline.add_argument("--members", nargs="+", metavar="CONFIG",
                          help="one config file per member (default: configs/resnet50.yaml, inception_v3.yaml, "
                               "efficientnetv2s.yaml)")
    pipeline.add_argument("--no-tune", action="store_true", help="train with the member configs' heads as they are")
    pipeline.add_argument("--gpu", action="store_true", help="one GPU per Train worker and per model actor")
    pipeline.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value of every member, e.g. --set train.workers=8 (repeatable)")

    demo = commands.add_parser("demo", help="the end-to-end demo on a generated sample archive")
    demo.add_argument("--out", default="demo-output", help="folder for everything the demo writes")
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--quick", action="store_true", help="tiny members instead of the three real backbones")
    demo.add_argument("--port", type=int, default=8000, help="the endpoint's port (default 8000)")
    demo.add_argument("--exit", action="store_true", help="end after the last stage instead of serving until Ctrl-C")
    return parser


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.batch_size=64 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from skinray.console import set_verbose, setup_driver

    set_verbose(args.verbose)
    setup_driver()
    try:
        return _dispatch(args)
    except (UserError, FileNotFoundError) as exc:
        print(f"skinray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("skinray: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":
        return _data(args)
    if args.command == "train":
        from skinray.train.trainer import train_from_args

        return train_from_args(args)
    if args.command == "tune":
        from skinray.tune.search import tune_from_args

        return tune_from_args(args)
    if args.command == "evaluate":
        from skinray.evaluate import evaluate_from_args

        return evaluate_from_args(args)
    if args.command == "ensemble":
        from skinray.ensemble import ensemble_from_args

        return ensemble_from_args(args)
    if args.command == "score":
        from skinray.score import score_from_args

        return score_from_args(args)
    if args.command == "serve":
        from skinray.serve.command import serve_from_args

        return serve_from_args(args)
    if args.command == "explain":
        from skinray.explain import explain_from_args

        return explain_from_args(args)
    if args.command == "pipeline":
        from skinray.workflow import pipeline_from_args

        return pipeline_from_args(args)
    if args.command == "demo":
        from skinray.demo import run_demo

        return run_demo(args.out, workers=args.workers, quick=args.quick, port=args.port, exit_when_done=args.exit)
    raise UserError(f"unknown command {args.command}")


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "fetch":
        from skinray.data.fetch import extract, fetch

        result = extract(args.zip, args.dest) if args.zip else fetch(args.dest)
        state = "already present" if result.pop("already_present") else "extracted"
        print(f"DermNet {state} in {args.dest}: {result['counts']} images, {len(result['classes'])} classes")
        return 0
    if args.data_command == "sample":
        from skinray.data.sample import write_sample

        counts = write_sample(args.dest, per_class=args.per_class, classes=args.classes, seed=args.seed)
        print(f"sample archive written to {args.dest}: {counts}")
        return 0
    if args.data_command == "check":
        from skinray.data.check import check_archive, format_report
        from skinray.data.decode import DEFAULT_MAX_PIXELS

        report = check_archive(args.archive, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return 0 if report["ok"] else 1
    raise UserError(f"unknown data action {args.data_command}")


if __name__ == "__main__":
    sys.exit(main())
