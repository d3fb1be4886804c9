import dataclasses

import pytest

from skinray.config import Config, ConfigError, load_config, save_config


def test_defaults_match_the_seed_notebook():
    cfg = load_config()
    assert cfg.data.val_fraction == 0.2
    assert (cfg.augment.rotation, cfg.augment.shear, cfg.augment.zoom) == (30.0, 0.2, 0.3)
    assert (cfg.augment.width_shift, cfg.augment.height_shift, cfg.augment.horizontal_flip) == (
        0.2,
        0.2,
        True,
    )


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  val_fraction: 0.3\ntrain:\n  batch_size: 16\n")
    cfg = load_config(path, ["data.val_fraction=0.1", "train.xla=true", "model.backbone=tiny"])
    assert cfg.data.val_fraction == 0.1 and cfg.train.batch_size == 16
    assert cfg.train.xla is True and cfg.model.backbone == "tiny"


def test_int_is_accepted_for_float():
    assert load_config(overrides=["train.head_lr=1"]).train.head_lr == 1.0


def test_exponent_notation_is_a_float():
    # PyYAML (YAML 1.1) reads 2e-3 as the string '2e-3'; a learning rate is written so.
    cfg = load_config(overrides=["train.finetune_lr=2e-3", "train.head_lr=1E-4"])
    assert (cfg.train.finetune_lr, cfg.train.head_lr) == (0.002, 0.0001)
    with pytest.raises(ConfigError, match="expected float"):
        load_config(overrides=["train.head_lr=fast"])


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("data.val_fracton=0.1", "data.val_fracton", "unknown key"),
        ("nosuch.x=1", "nosuch", "unknown key"),
        ("train.batch_size=big", "train.batch_size", "expected int"),
        ("train.xla=3", "train.xla", "expected bool"),
        ("data.val_fraction=1.5", "data.val_fraction", "[0, 1)"),
        ("train.workers=0", "train.workers", ">= 1"),
        ("train.mixed_precision=fp8", "train.mixed_precision", "one of"),
        ("train.head_epochs=50", "train.head_epochs", "epochs"),
        ("train.resources.GPU=1", "train.resources.GPU", "own keys"),
        ("serve.resources.gpu_node=-1", "serve.resources.gpu_node", ">= 0"),
        ("score.resources=3", "score.resources", "expected a mapping"),
    ],
)
def test_errors_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert err.value.key == key
    assert key in str(err.value) and words in str(err.value)


def test_custom_resources_reach_what_ray_schedules(tmp_path):
    cfg = load_config(
        overrides=[
            "train.resources.gpu_node=0.01",
            "score.resources.gpu_node=0.01",
            "serve.resources={gpu_node: 0.01}",
            "data.resources.cpu_node=0.001",
            "train.gpus_per_worker=1",
        ]
    )
    assert cfg.train.worker_resources == {"CPU": 1.0, "GPU": 1.0, "gpu_node": 0.01}
    assert cfg.score.actor_options["resources"] == {"gpu_node": 0.01}
    assert cfg.serve.replica_options["resources"] == {"gpu_node": 0.01}
    assert cfg.data.task_options == {"num_cpus": 1.0, "resources": {"cpu_node": 0.001}}
    assert "resources" not in load_config().score.actor_options
    assert load_config(save_config(cfg, tmp_path)) == cfg


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["novalue"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["train.epochs=7", "model.weights=none"])
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg and load_config(path).train.epochs == 7


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3


def test_shipped_recipes_load():
    from pathlib import Path

    from skinray.models.backbones import get_backbone

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"resnet50", "inception_v3", "efficientnetv2s", "tiny_smoke"}
    for path in recipes:
        cfg = load_config(path)
        get_backbone(cfg.model.backbone)
        assert path.read_text().lstrip().startswith("#")  # each recipe says how to run it


def test_monitor_direction_is_derived_from_the_metric():
    assert load_config().train.monitor_mode == "max"
    assert load_config(overrides=["train.monitor=val_loss"]).train.monitor_mode == "min"


def test_the_recipe_follows_the_weights():
    scratch = load_config(overrides=["model.weights=none"])
    assert scratch.train.recipe == "scratch"
    assert (scratch.train.head_epochs, scratch.train.unfreeze_top, scratch.train.schedule) == (
        0,
        -1,
        "cosine",
    )
    assert scratch.train.finetune_lr == 1e-3 and scratch.train.label_smoothing == 0.0
    assert (scratch.model.dropout, scratch.model.head_dropout) == (0.0, 0.2)
    assert scratch.train.batchnorm_momentum == 0.9
    transfer = load_config(overrides=["model.weights=imagenet"])
    assert transfer.train.recipe == "transfer"
    assert (transfer.train.head_epochs, transfer.train.finetune_lr, transfer.train.schedule) == (
        3,
        1e-4,
        "plateau",
    )
    assert (transfer.model.dropout, transfer.train.label_smoothing) == (0.3, 0.1)


def test_what_the_user_sets_wins_over_the_recipe(tmp_path):
    cfg = load_config(overrides=["model.weights=none", "model.dropout=0.1", "train.schedule=plateau"])
    assert (cfg.model.dropout, cfg.train.schedule, cfg.model.head_dropout) == (0.1, "plateau", 0.2)
    named = load_config(overrides=["model.weights=none", "train.recipe=transfer"])
    assert named.train.recipe == "transfer" and named.train.head_epochs == 3
    # The saved config holds the resolved values: reloading it runs the same recipe.
    assert load_config(save_config(cfg, tmp_path)) == cfg


def test_a_recipes_epoch_counts_fit_short_runs():
    assert load_config(overrides=["train.epochs=2"]).train.head_epochs == 2
    assert load_config(overrides=["model.weights=none", "train.epochs=2"]).train.warmup_epochs == 1


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.recipe=finetune", "train.recipe"),
        ("train.schedule=step", "train.schedule"),
        ("train.unfreeze_top=-2", "train.unfreeze_top"),
        ("train.warmup_epochs=-1", "train.warmup_epochs"),
    ],
)
def test_recipe_settings_are_validated(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert err.value.key == key


def test_the_tune_section_holds_the_search_space(tmp_path):
    cfg = load_config(overrides=["tune.head_units=[32,64]", "tune.head_lr=[0.001,0.01]", "tune.trials=4"])
    assert cfg.tune.head_units == (32, 64) and cfg.tune.head_lr == (0.001, 0.01) and cfg.tune.trials == 4
    assert load_config(save_config(cfg, tmp_path)) == cfg  # lists survive the round trip


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("tune.dropout=[0.5,0.1]", "tune.dropout", "low < high"),
        ("tune.head_lr=[0.01]", "tune.head_lr", "low < high"),
        ("tune.l2=[0,0.1]", "tune.l2", "positive"),
        ("tune.head_units=[]", "tune.head_units", "non-empty"),
        ("tune.head_units=[a]", "tune.head_units[0]", "expected int"),
        ("tune.head_lr=0.1", "tune.head_lr", "expected a list"),
        ("tune.mode=fast", "tune.mode", "one of"),
        ("tune.grace_period=20", "tune.grace_period", "max_epochs"),
    ],
)
def test_a_bad_search_space_names_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert err.value.key == key and words in str(err.value)


def test_a_trials_values_land_where_train_reads_them():
    from skinray.tune.search import with_trial

    cfg = with_trial(
        load_config(),
        {
            "head_units": 64,
            "dropout": 0.1,
            "head_dropout": 0.2,
            "l2": 1e-5,
            "head_lr": 3e-3,
            "label_smoothing": 0.05,
            "batch_size": 16,
        },
    )
    assert (cfg.model.head_units, cfg.model.dropout, cfg.model.head_dropout, cfg.model.l2) == (
        64,
        0.1,
        0.2,
        1e-5,
    )
    assert (cfg.train.head_lr, cfg.train.label_smoothing, cfg.train.batch_size) == (3e-3, 0.05, 16)


def test_every_key_is_described_for_the_reference():
    import dataclasses

    from skinray.config import describe_key

    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.default_factory):
            info = describe_key(f"{section.name}.{field.name}")
            assert len(info.help) > 10, info.key
            assert info.default == getattr(section.default_factory(), field.name)


def test_a_base_file_sits_under_the_config_file(tmp_path):
    from skinray.config import load_config

    base, member = tmp_path / "base.yaml", tmp_path / "member.yaml"
    base.write_text("train:\n  workers: 8\n  epochs: 3\nscore:\n  gpus_per_actor: 1\n")
    member.write_text("train:\n  epochs: 5\n")
    cfg = load_config(member, ["train.workers=6"], base=base)
    assert (cfg.train.workers, cfg.train.epochs, cfg.score.gpus_per_actor) == (6, 5, 1.0)


@pytest.mark.parametrize(
    "key",
    ["serve.upscale_delay_s", "serve.downscale_delay_s", "serve.cpus_per_replica", "serve.gpus_per_replica"],
)
def test_a_negative_setting_is_named_by_its_own_key(key):
    from skinray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}=-1"])
    assert err.value.key == key


def test_configs_written_before_fault_injection_left_the_schema_still_load():
    from skinray.config import load_config_text

    old = "train:\n  kill_rank: -1\n  kill_at_step: -1\n  epochs: 4\n"
    assert load_config_text(old).train.epochs == 4
    with pytest.raises(ConfigError, match="SKINRAY_KILL_WORKER"):
        load_config(overrides=["train.kill_rank=1"])


def test_one_tiny_member_recipe():
    """configs/tiny_smoke.yaml is the quick demo's member recipe (the tests' shared members), with a
    longer run: the file and the code cannot drift apart."""
    from pathlib import Path

    from skinray.config import config_to_dict
    from skinray.demo import QUICK, TINY_RECIPE

    smoke = config_to_dict(load_config(Path(__file__).parents[1] / "configs" / "tiny_smoke.yaml"))
    recipe = config_to_dict(load_config(overrides=list(TINY_RECIPE)))
    keys = [setting.split("=", 1)[0].split(".") for setting in TINY_RECIPE]
    assert [smoke[a][b] for a, b in keys] == [recipe[a][b] for a, b in keys]
    assert all(set(TINY_RECIPE) <= set(member.settings) for member in QUICK)
    assert smoke["model"]["backbone"] == "tiny" and smoke["train"]["epochs"] > 5
