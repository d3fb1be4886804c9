import numpy as np
import pytest

from skinray.config import Config, ModelConfig
from skinray.models.backbones import REGISTRY, BackboneError, get_backbone, input_size, resolve_weights


def _model(**settings) -> ModelConfig:
    """A model section as a loaded config holds it (the recipe's dropout filled in)."""
    return Config(model=ModelConfig(**settings)).model


def test_registry_entries_carry_what_the_pipeline_needs():
    assert {"resnet50", "inception_v3", "efficientnetv2s", "tiny"} <= set(REGISTRY)
    assert (
        REGISTRY["resnet50"].input_size,
        REGISTRY["inception_v3"].input_size,
        REGISTRY["efficientnetv2s"].input_size,
    ) == (224, 299, 384)
    assert REGISTRY["efficientnetv2s"].preprocessing == "raw"  # it normalises itself


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(BackboneError, match="known: resnet50, inception_v3, efficientnetv2s, tiny"):
        get_backbone("resnet51")


def test_the_factory_builds_the_classifier_and_its_feature_part_alike():
    """create_features is exactly the classifier's lower part: the same layers give the same pooled
    features once the weights agree; check_model refuses what create_* would, before building."""
    import keras

    from skinray.models import check_model, create_classifier, create_features, list_backbones

    assert list_backbones() == ("resnet50", "inception_v3", "efficientnetv2s", "tiny")
    cfg = _model(backbone="tiny", weights="none", image_size=40)
    classifier, features = create_classifier(cfg, 3), create_features(cfg)
    assert classifier.output_shape == (None, 3) and features.output_shape == (None, 64)
    features.set_weights(classifier.get_weights()[: len(features.get_weights())])
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    pooled = keras.Model(classifier.inputs, classifier.get_layer("pool").output)
    assert np.allclose(features(images), pooled(images), atol=1e-6)
    assert (
        check_model(cfg)[1] == 40 and check_model(ModelConfig(backbone="resnet50", weights="none"))[1] == 224
    )
    with pytest.raises(BackboneError, match="at least 75"):
        create_features(ModelConfig(backbone="inception_v3", weights="none", image_size=64))
    with pytest.raises(BackboneError, match="has no ImageNet weights"):
        check_model(ModelConfig(backbone="tiny", weights="imagenet"))


def test_a_seed_fixes_the_initial_weights():
    """data.seed starts a run from the same network (the quality benchmark's two sides, a rerun)."""
    from skinray.models import create_classifier

    cfg = _model(backbone="tiny", weights="none", image_size=32)

    def weights(seed):
        return create_classifier(cfg, 3, seed=seed).get_weights()

    first, again, other = weights(3), weights(3), weights(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_the_scratch_recipe_starts_residual_blocks_as_the_identity():
    """model.zero_init_residual (the scratch recipe's): the BatchNormalization ending each residual
    branch starts at zero scale, so a block passes its shortcut through; a shortcut's own layer (the
    previous block's output, or ResNet's projection) keeps its scale. Pretrained or off: untouched."""
    import keras

    from skinray.models import create_classifier

    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)

    def outputs(model, *names):
        backbone = model.get_layer("backbone")
        probe = keras.Model(backbone.inputs, [backbone.get_layer(n).output for n in names])
        x = model.get_layer("preprocessing")(images)
        return [np.asarray(y) for y in probe(x, training=False)]

    resnet = create_classifier(_model(backbone="resnet50", weights="none", image_size=64), 3)
    a, b = outputs(resnet, "conv2_block1_out", "conv2_block2_out")
    assert np.array_equal(a, b)  # relu(shortcut + 0) of a relu output
    gammas = {
        layer.name: np.asarray(layer.gamma)
        for layer in resnet.get_layer("backbone").layers
        if "_bn" in layer.name
    }
    assert sum(not g.any() for g in gammas.values()) == 16 and gammas["conv2_block1_0_bn"].all()

    effnet = create_classifier(_model(backbone="efficientnetv2s", weights="none", image_size=64), 3)
    shortcut, added = outputs(effnet, "block2a_project_bn", "block2b_add")
    assert shortcut.any() and np.allclose(shortcut, added)
    zeroed = [x.name for x in effnet.get_layer("backbone").layers if "_bn" in x.name and not np.any(x.gamma)]
    assert len(zeroed) == 35 and "block2a_project_bn" not in zeroed

    off = create_classifier(
        _model(backbone="resnet50", weights="none", image_size=64, zero_init_residual=False), 3
    )
    a, b = outputs(off, "conv2_block1_out", "conv2_block2_out")
    assert not np.array_equal(a, b)


def test_image_size_override_and_minimum():
    assert input_size(get_backbone("resnet50")) == 224
    assert input_size(get_backbone("resnet50"), 128) == 128
    with pytest.raises(BackboneError, match="at least 75"):
        input_size(get_backbone("inception_v3"), 64)


def test_weights_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = get_backbone("resnet50")
    assert resolve_weights(spec, "none") is None
    with pytest.raises(BackboneError, match="does not exist"):
        resolve_weights(spec, str(tmp_path / "missing.h5"))
    with pytest.raises(BackboneError, match="no ImageNet weights"):
        resolve_weights(get_backbone("tiny"), "imagenet")
    cached = tmp_path / "models" / spec.weights_file
    cached.parent.mkdir()
    cached.write_bytes(b"pretend")
    assert resolve_weights(spec, "imagenet") == str(cached)  # found in the cache: no download


def test_unreachable_imagenet_weights_say_where_to_put_the_file(tmp_path, monkeypatch):
    """No network here: the error names the file, the KERAS_HOME folder and the alternatives."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(BackboneError) as err:
        resolve_weights(get_backbone("efficientnetv2s"), "imagenet")
    message = str(err.value)
    assert "efficientnetv2-s_notop.h5" in message and str(tmp_path / "models") in message
    assert "KERAS_HOME" in message and "--weights" in message


def test_preprocessing_layer_modes_and_round_trip():
    import keras

    from skinray.models.classifier import CAFFE_MEAN_BGR, ImagePreprocessing

    pixels = np.array([[[[255, 0, 10]]]], dtype="uint8")
    assert np.allclose(ImagePreprocessing("tf")(pixels), [[[[1.0, -1.0, 10 / 127.5 - 1]]]])
    bgr = np.array([10, 0, 255]) - np.array(CAFFE_MEAN_BGR)
    assert np.allclose(ImagePreprocessing("caffe")(pixels), bgr[None, None, None, :], atol=1e-4)
    assert np.allclose(ImagePreprocessing("raw")(pixels), pixels)
    layer = ImagePreprocessing.from_config(ImagePreprocessing("caffe").get_config())
    assert layer.mode == "caffe"
    with pytest.raises(ValueError):
        ImagePreprocessing("torch")
    assert keras.saving.get_registered_object("skinray>ImagePreprocessing") is ImagePreprocessing


def test_classifier_saves_and_loads_with_the_same_outputs(tmp_path):
    import keras

    from skinray.models import create_classifier

    model = create_classifier(_model(backbone="tiny", weights="none", image_size=48), 5)
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    assert np.allclose(model(images, training=False), loaded(images, training=False), atol=1e-5)
    assert model.output_shape == (None, 5)


def test_two_phase_freezing():
    from skinray.models import create_classifier
    from skinray.models.classifier import freeze_backbone, unfreeze_top

    model = create_classifier(_model(backbone="tiny", weights="none", image_size=32), 3)
    freeze_backbone(model)
    names = {w.path.split("/")[0] for w in model.trainable_weights}
    assert names == {"hidden", "logits"}
    assert unfreeze_top(model, 2, keep_batchnorm_frozen=True) == 2  # the last conv block's conv + BN
    backbone = model.get_layer("backbone")
    trainable = [layer.name for layer in backbone.layers if layer.trainable and layer.weights]
    assert len(trainable) == 1 and "conv" in trainable[0]  # BN stays frozen with pretrained weights
    assert unfreeze_top(model, 100, keep_batchnorm_frozen=False) == 6
    assert all(layer.trainable for layer in backbone.layers if layer.weights)


@pytest.mark.parametrize(
    "name, size, precision, xla",
    [
        pytest.param("resnet50", 64, "float32", False, marks=pytest.mark.slow),
        pytest.param("inception_v3", 75, "float32", False, marks=pytest.mark.slow),
        pytest.param("efficientnetv2s", 64, "float32", False, marks=pytest.mark.slow),
        ("tiny", 32, "float32", False),
        ("tiny", 32, "mixed_float16", False),
        ("tiny", 32, "mixed_bfloat16", True),
    ],
)
def test_each_backbone_runs_one_distributed_step(ray_cluster, name, size, precision, xla):
    """The real train step under MultiWorkerMirroredStrategy, in a fresh process per case; mixed
    precision (with loss scaling for float16) and XLA are the same step with other settings."""
    import ray

    @ray.remote(max_calls=1, num_cpus=1)
    def one_step(name, size):
        import keras
        import tensorflow as tf

        from skinray.models import create_classifier
        from skinray.train.step import make_train_step

        keras.config.set_dtype_policy(precision)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        with strategy.scope():
            # Residual blocks not started as the identity: their branches' weights would get no
            # gradient in the first step (the zeroed scale), and this checks that every weight moves.
            cfg = ModelConfig(backbone=name, weights="none", image_size=size, zero_init_residual=False)
            model = create_classifier(Config(model=cfg).model, 4)
            optimizer = keras.optimizers.Adam(1e-3)
            if precision == "mixed_float16":
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizer.build(model.trainable_variables)
        assert model.get_layer("logits").compute_dtype == "float32"
        # Grad-CAM's layer, as the registry names it, is a feature map inside this backbone.
        assert len(model.get_layer("backbone").get_layer(get_backbone(name).cam_layer).output.shape) == 4
        step = make_train_step(strategy, model, optimizer, [1.0, 2.0, 1.0, 0.5], 0.1, global_batch=4, xla=xla)
        images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
        before = [w.numpy().copy() for w in model.trainable_weights]
        loss, predictions = step(images, np.array([0, 1, 2, 3], np.int32), np.ones(4, np.float32))
        changed = sum(not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights))
        return float(loss), changed, len(before)

    loss, changed, total = ray.get(one_step.remote(name, size))
    assert np.isfinite(loss) and loss > 0
    assert changed == total  # every trainable weight moved


# === A trained model as the source of a backbone's weights (fine-tuning, export) ===


def _backbone_kernels(model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_layer("backbone").get_weights()]


def test_a_run_or_a_bundle_member_gives_its_backbone_and_never_its_head(members, bundle):
    """--weights RUN / BUNDLE --weights-member NAME: the backbone starts from the source's weights
    (at another input size too), the head is new and sized for the new classes."""
    from skinray.models import create_classifier
    from skinray.predictor import Predictor

    run = members["runs"][0]  # tiny, 48 px
    source = Predictor.from_path(run).members[0].model
    model = create_classifier(_model(backbone="tiny", weights=run, image_size=56), 7, seed=0)
    assert model.output_shape == (None, 7) and model.input_shape[1] == 56
    for theirs, ours in zip(_backbone_kernels(source), _backbone_kernels(model), strict=True):
        assert np.array_equal(theirs, ours)

    member = Predictor.from_path(str(bundle)).members[1]  # the 64 px member
    model = create_classifier(
        _model(backbone="tiny", weights=str(bundle), weights_member=member.name, image_size=64), 3
    )
    assert all(
        np.array_equal(a, b)
        for a, b in zip(_backbone_kernels(member.model), _backbone_kernels(model), strict=True)
    )
    assert not np.array_equal(  # the other member's backbone is another
        _backbone_kernels(Predictor.from_path(str(bundle)).members[0].model)[0], _backbone_kernels(model)[0]
    )


def test_a_source_that_does_not_fit_is_a_one_line_error_naming_both(members, bundle, tmp_path):
    from skinray.models import check_model
    from skinray.predictor import Predictor

    run, names = members["runs"][0], [m.name for m in Predictor.from_path(str(bundle), False).members]
    cases = [
        (_model(backbone="resnet50", weights=run), ["holds a tiny backbone", "builds a resnet50"]),
        (_model(backbone="tiny", weights=str(bundle)), ["2 members", *names, "--weights-member"]),
        (_model(backbone="tiny", weights=str(bundle), weights_member="tiny99"), ["tiny99", *names]),
        (_model(backbone="tiny", weights=str(tmp_path / "nothing")), ["not 'imagenet', 'none'"]),
        (_model(backbone="inception_v3", weights=run, image_size=64), ["at least 75"]),
    ]
    for cfg, words in cases:
        with pytest.raises(BackboneError) as err:
            check_model(cfg)
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_exported_weights_load_into_plain_keras_and_back(tmp_path):
    """`skinray export-weights` writes the backbone so that Keras' own constructor loads it (by
    structure, at its native size), and `--weights FILE` starts a skinray model from it."""
    import keras

    from skinray import rundir
    from skinray.config import Config
    from skinray.models import create_classifier
    from skinray.models.sources import export_backbone

    cfg = Config(model=_model(backbone="resnet50", weights="none", image_size=32))
    trained = create_classifier(cfg.model, 3, seed=5)
    checkpoint = tmp_path / "checkpoint_epoch_0001"
    checkpoint.mkdir()
    trained.save(checkpoint / rundir.MODEL)
    rundir.write_checkpoint_files(checkpoint, cfg, ["a", "b", "c"], {}, {"image_size": 32})
    out = tmp_path / "resnet50.weights.h5"
    line = export_backbone(str(checkpoint), str(out))
    assert "keras.applications.ResNet50(include_top=False, weights=None).load_weights" in line

    plain = keras.applications.ResNet50(include_top=False, weights=None)
    plain.load_weights(out)
    expected = trained.get_layer("backbone").get_layer("conv4_block2_2_conv").get_weights()[0]
    assert np.array_equal(plain.get_layer("conv4_block2_2_conv").get_weights()[0], expected)

    again = create_classifier(_model(backbone="resnet50", weights=str(out), image_size=48), 5)
    assert np.array_equal(
        again.get_layer("backbone").get_layer("conv4_block2_2_conv").get_weights()[0], expected
    )
    with pytest.raises(BackboneError, match="must end in .weights.h5"):
        export_backbone(str(checkpoint), str(tmp_path / "resnet50.h5"))
