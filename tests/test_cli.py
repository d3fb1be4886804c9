from commands import skinray

from skinray import __version__


def test_help_lists_every_command():
    proc = skinray("--help")
    assert proc.returncode == 0
    for command in ("data", "train", "tune", "ensemble", "score", "evaluate", "demo"):
        assert command in proc.stdout
    data = skinray("data", "--help")
    for action in ("fetch", "sample", "check"):
        assert action in data.stdout


def test_version():
    assert skinray("--version").stdout.strip() == f"skinray {__version__}"


def test_bad_configuration_is_one_clear_line(sample_archive, tmp_path):
    proc = skinray(
        "train", "--data", str(sample_archive), "--out", str(tmp_path), "--set", "train.batch_sise=8"
    )
    assert proc.returncode == 2
    assert "train.batch_sise" in proc.stderr and "unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_backbone(sample_archive, tmp_path):
    """The flag's choices are the registry's (list_backbones); a config naming another is refused too."""
    proc = skinray("train", "--backbone", "vgg16", "--data", str(sample_archive), "--out", str(tmp_path))
    assert (
        proc.returncode == 2
        and "invalid choice: 'vgg16' (choose from 'resnet50', 'inception_v3'" in proc.stderr
    )
    proc = skinray(
        "train", "--set", "model.backbone=vgg16", "--data", str(sample_archive), "--out", str(tmp_path)
    )
    assert proc.returncode == 2 and "known: resnet50, inception_v3, efficientnetv2s, tiny" in proc.stderr


def test_missing_imagenet_weights_fail_before_training(sample_archive, tmp_path):
    """No network here: the run stops before any cluster starts, saying where the file goes."""
    proc = skinray(
        "train", "--backbone", "resnet50", "--data", str(sample_archive), "--out", str(tmp_path), timeout=120
    )
    assert proc.returncode == 2
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_missing_archive(tmp_path):
    proc = skinray(
        "train",
        "--backbone",
        "tiny",
        "--weights",
        "none",
        "--data",
        str(tmp_path / "nope"),
        "--out",
        str(tmp_path / "runs"),
    )
    assert proc.returncode == 2 and "not a folder" in proc.stderr


# === Flags declared once, from the config ===

MODEL_COMMANDS = ("train", "tune", "ensemble", "evaluate", "score", "serve", "pipeline", "explain")


def _options(command: str) -> set[str]:
    from skinray.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return {s for action in subparsers.choices[command]._actions for s in action.option_strings}


def test_every_command_that_runs_a_model_or_ray_takes_config_and_set():
    for command in MODEL_COMMANDS:
        assert {"--config", "--set"} <= _options(command), command


def test_each_flag_takes_its_help_and_default_from_the_config_field():
    from skinray.cli import COMMAND_FLAGS
    from skinray.config import describe_key

    for command, flags in COMMAND_FLAGS.items():
        text = " ".join(
            skinray(*(["data", "check"] if command == "check" else [command]), "--help").stdout.split()
        )
        for flag, key in flags.items():
            info = describe_key(key)
            assert flag in text and key in text and f"default {info.default!r}" in text, (command, flag)
            assert " ".join(info.help.rstrip(".").split())[:30] in text, (command, flag)


def test_a_flag_wins_over_set_which_wins_over_the_file(tmp_path):
    from skinray.cli import build_parser, config_of

    file = tmp_path / "c.yaml"
    file.write_text("train:\n  epochs: 7\n  workers: 3\n  head_epochs: 2\n")
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(file),
            "--set",
            "train.epochs=5",
            "--set",
            "train.workers=4",
            "--epochs",
            "1",
            "--out",
            "x",
        ]
    )
    cfg = config_of(args)
    assert (cfg.train.epochs, cfg.train.workers, cfg.train.head_epochs) == (1, 4, 1)


def test_evaluate_takes_the_score_settings_its_job_documents():
    """jobs/evaluate.py tells cluster users to pass --set score.gpus_per_actor=1 (argparse refused it)."""
    from skinray.cli import build_parser, config_of

    args = build_parser().parse_args(
        [
            "evaluate",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--batch-size",
            "8",
            "--set",
            "score.gpus_per_actor=1",
        ]
    )
    cfg = config_of(args)
    assert (cfg.score.gpus_per_actor, cfg.score.batch_size) == (1.0, 8)


def test_a_bad_setting_on_evaluate_is_one_line(tmp_path):
    proc = skinray(
        "evaluate",
        "--model",
        str(tmp_path),
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "score.gpus_per_actr=1",
    )
    assert proc.returncode == 2 and "score.gpus_per_actr" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bad_sample_flags_are_one_line(tmp_path):
    for flags, message in (
        (["--classes", "99"], "--classes must be between 1 and 23"),
        (["--per-class", "0"], "--per-class must be at least 1"),
    ):
        proc = skinray("data", "sample", "--dest", str(tmp_path / "s"), *flags)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_subgroup_flags_reach_evaluate_and_the_pipeline_as_config(tmp_path):
    from skinray.cli import build_parser, config_of, flag_settings
    from skinray.config import load_config

    args = build_parser().parse_args(
        [
            "evaluate",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--by",
            "fitzpatrick,site",
            "--metadata",
            "x.csv",
        ]
    )
    assert config_of(args).evaluate.columns == ["fitzpatrick", "site"]
    assert config_of(args).evaluate.metadata == "x.csv" and args.ood is None
    assert (
        build_parser().parse_args(["evaluate", "--model", "m", "--data", "d", "--out", "o", "--ood", "f"]).ood
        == "f"
    )
    args = build_parser().parse_args(
        ["pipeline", "--data", "d", "--out", "o", "--by", "fitzpatrick", "--max-group-gap", "0.05"]
    )
    settings = flag_settings(args)
    assert load_config(overrides=settings).evaluate.max_group_gap == 0.05
    proc = skinray("pipeline", "--data", "d", "--out", "o", "--max-group-gap", "0.05")
    assert (
        proc.returncode == 2
        and "evaluate.max_group_gap" in proc.stderr
        and "needs evaluate.by" in proc.stderr
    )
    proc = skinray("pipeline", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--by", "fitzpatrick")
    assert proc.returncode == 2 and "--by fitzpatrick needs metadata" in proc.stderr  # before any training
    assert not (tmp_path / "o").exists()
