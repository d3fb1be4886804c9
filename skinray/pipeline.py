"""Archive -> bundle: every stage in order (`skinray pipeline`, jobs/pipeline.py, the demo).

    skinray pipeline --data ARCHIVE --out STORAGE [--members CONFIG ...] [--config FILE] [--no-tune] [--gpu]
                     [--set K=V ...]

Check the archive -> per member: search its head (Ray Tune), train it (Ray Train) -> calibrate the
members into one bundle -> evaluate the bundle beside its members on the test split. Everything lands
under STORAGE (a folder or an object-store URI): check.json, tune/MEMBER/, runs/MEMBER/, bundle/,
evaluation/. Running the same command again continues: a finished stage is skipped (its output is
read back), a search or training run that was cut off continues where it stopped (Tune's restore;
the run's latest checkpoint).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from skinray import UserError, console, subgroups
from skinray.config import Config, load_config
from skinray.storage import absolute, basename, join_uri, read_marker, read_text, redact, write_json
from skinray.tracking import tracked


def say(message: str) -> None:
    """The pipeline's progress lines, tagged `pipeline`."""
    console.say(message, tag="pipeline")


DEFAULT_MEMBERS = ("configs/resnet50.yaml", "configs/inception_v3.yaml", "configs/efficientnetv2s.yaml")


@dataclass(frozen=True)
class MemberSpec:
    """One backbone of the ensemble: a config file and/or overrides; `name` names its folders;
    `tune`: search its head before training it."""

    name: str
    config: str | None = None
    settings: tuple[str, ...] = ()
    tune: bool = True

    @classmethod
    def of_file(cls, path: str) -> MemberSpec:
        if not Path(path).is_file():
            raise UserError(f"member config '{path}' not found (see configs/)")
        return cls(Path(path).stem, path)


def member_configs(
    archive: str, members: list[MemberSpec], settings: list[str] = (), base_config: str | None = None
) -> list[Config]:
    """Each member's config: `base_config`, then its own file, then its settings, then `settings`.
    Bad settings fail here, and `--by` without its metadata, before Ray or any training."""
    if len({m.name for m in members}) != len(members):
        raise UserError("two members share a name: give each member config its own file name")
    configs = [
        load_config(m.config, [*m.settings, *settings, f"data.archive={archive}"], base=base_config)
        for m in members
    ]
    subgroups.metadata_for(archive, configs[0].evaluate)
    return configs


def run_pipeline(
    archive: str,
    out: str,
    members: list[MemberSpec],
    settings: list[str] = (),
    tune: bool = True,
    base_config: str | None = None,
) -> dict:
    """Runs (or continues) every stage; returns the test-split report of the bundle."""
    configs = member_configs(archive, members, settings, base_config)  # bad settings fail here
    out = absolute(out)
    shared = [*settings, f"data.archive={archive}"]
    check_stage(archive, out, configs[0].data.max_pixels)
    # With tracking on, one MLflow run whose children are the stages' runs.
    with tracked(configs[0], f"pipeline {basename(out)}", "pipeline", parent=True) as run:
        run.params(
            {"archive": redact(archive), "out": redact(out), "members": ", ".join(m.name for m in members)}
        )
        runs = []
        for member, cfg in zip(members, configs):
            if tune and member.tune:
                cfg = tune_stage(member, cfg, [*member.settings, *shared], out)
            runs.append(train_stage(member, cfg, out))
        bundle = ensemble_stage(runs, archive, out, configs[0])
        report = evaluate_stage(bundle, archive, out, configs[0])
        run.metrics(report)
        return report


def check_stage(archive: str, out: str, max_pixels: int) -> dict:
    from skinray.data.check import check_archive, format_report

    done = read_marker(join_uri(out, "check.json"))
    if done is not None:
        say(f"data check: done before ({join_uri(out, 'check.json')})")
        return done
    say(f"data check of {archive}")
    report = check_archive(archive, max_pixels)
    say(format_report(report))
    if not report["ok"]:
        raise UserError(
            "the archive has unreadable files or images in two splits (report above): "
            "fix the archive, then run the pipeline again"
        )
    write_json(join_uri(out, "check.json"), report)
    return report


def tune_stage(member: MemberSpec, cfg: Config, settings: list[str], out: str) -> Config:
    """The member's config with the best head the search found (searched once, continued if cut off)."""
    from skinray.tune.search import tune_head

    best = join_uri(join_uri(join_uri(out, "tune"), member.name), "best_config.yaml")
    text = read_text(best)
    if text is None:
        say(f"{member.name}: head search, {cfg.tune.trials} trials ({cfg.tune.mode} mode)")
        result = tune_head(cfg, join_uri(out, "tune"), member.name)
        say(f"{member.name}: best {cfg.tune.metric} {result['best'][cfg.tune.metric]:.4f}")
        text = read_text(best)
    else:
        say(f"{member.name}: head search done before ({best})")
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder, "best_config.yaml")
        local.write_text(text)
        return load_config(local, settings)


def train_stage(member: MemberSpec, cfg: Config, out: str) -> str:
    """The member's run directory, trained (or resumed) unless its summary says it finished."""
    from skinray.train.trainer import train

    run_dir = join_uri(join_uri(out, "runs"), member.name)
    summary = read_marker(join_uri(run_dir, "summary.json"))
    if summary is None:
        say(
            f"{member.name}: training ({cfg.model.backbone} at "
            f"{cfg.model.image_size or 'native'} px, "
            f"{cfg.train.workers} workers, {cfg.train.epochs} epochs)"
        )
        result = train(cfg, join_uri(out, "runs"), member.name)
        summary = {"best_metrics": result.best_metrics}
    else:
        say(f"{member.name}: trained before ({run_dir})")
    say(
        f"{member.name}: best {cfg.train.monitor} "
        f"{summary['best_metrics'].get(cfg.train.monitor, float('nan')):.4f}"
    )
    return run_dir


def ensemble_stage(runs: list[str], archive: str, out: str, cfg: Config) -> str:
    from skinray.ensemble import build_ensemble

    bundle = join_uri(out, "bundle")
    say(f"ensemble of {len(runs)} members -> {bundle}")
    manifest = build_ensemble(runs, archive, bundle, cfg)  # a bundle of the same members: read back
    say(f"bundle version {manifest['version'][:16]}")
    return bundle


def evaluate_stage(bundle: str, archive: str, out: str, cfg: Config) -> dict:
    """The bundle's report on the test split (its members beside it), in OUT/evaluation."""
    from skinray.evaluate import evaluate

    where = join_uri(out, "evaluation")
    report = read_marker(join_uri(where, "report.json"))
    if report is None:
        say("evaluation of the bundle and its members on the test split")
        report = evaluate(bundle, archive, "test", where, cfg)
    lines = [
        f"test split, {report['num_images']} images: ensemble accuracy {report['accuracy']:.3f}, "
        f"macro-F1 {report['macro_f1']:.3f}"
    ]
    lines += [
        f"  member {name}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}"
        for name, m in report["members"].items()
    ]
    for column, r in report.get("groups", {}).items():
        lines += [f"  {line}" for line in subgroups.console_lines(column, r)]
    say("\n".join(lines) + f"\nreport: {join_uri(where, 'report.md')}")
    return report | {"promoted": promotion_gate(bundle, report, cfg)}


def promotion_gate(bundle: str, report: dict, cfg: Config) -> bool:
    """With `evaluate.max_group_gap`: a bundle whose worst-group accuracy gap has a 95% lower bound
    above the limit is marked not promoted (the bundle and the report stay); says which groups."""
    from skinray.bundle import refuse_promotion
    from skinray.console import warn

    limit = cfg.evaluate.max_group_gap
    if not limit:
        return True
    failed = [
        (column, r["gap"])
        for column, r in report.get("groups", {}).items()
        if r["gap"] and r["gap"]["interval"][0] > limit
    ]
    if not failed:
        say(f"promotion gate: every worst-group accuracy gap is within {limit:.3f} (95% lower bound)")
        return True
    why = "; ".join(
        f"by {column}, {gap['worst']} is {gap['accuracy_gap']:.3f} below {gap['best']} in accuracy (95% "
        f"interval {gap['interval'][0]:.3f}-{gap['interval'][1]:.3f}, limit {limit:.3f})"
        for column, gap in failed
    )
    manifest = refuse_promotion(
        bundle, {"why": why, "limit": limit, "evaluated_version": report["model_version"]}
    )
    warn(f"bundle not promoted: {why}; its manifest says so (version now {manifest['version'][:16]})")
    return False


# `skinray pipeline --gpu`: one GPU per Train worker and per model actor.
GPU_SETTINGS = ("train.gpus_per_worker=1", "score.gpus_per_actor=1")
