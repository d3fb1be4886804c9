import pytest

from skinray.config import Config, ConfigError, load_config, save_config


def test_defaults_match_the_seed_notebook():
    cfg = load_config()
    assert cfg.data.val_fraction == 0.2
    assert (cfg.augment.rotation, cfg.augment.shear, cfg.augment.zoom) == (30.0, 0.2, 0.3)
    assert (cfg.augment.width_shift, cfg.augment.height_shift, cfg.augment.horizontal_flip) == (0.2, 0.2, True)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  val_fraction: 0.3\ntrain:\n  batch_size: 16\n")
    cfg = load_config(path, ["data.val_fraction=0.1", "train.xla=true", "model.backbone=tiny"])
    assert cfg.data.val_fraction == 0.1 and cfg.train.batch_size == 16
    assert cfg.train.xla is True and cfg.model.backbone == "tiny"


def test_int_is_accepted_for_float():
    assert load_config(overrides=["train.head_lr=1"]).train.head_lr == 1.0


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
    ],
)
def test_errors_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert err.value.key == key
    assert key in str(err.value) and words in str(err.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["novalue"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(overrides=["train.epochs=7", "model.weights=none"])
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg
    assert isinstance(cfg, Config)


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
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
