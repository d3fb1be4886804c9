"""Inference in bfloat16 (`skinray.precision`): the rebuilt models, `auto`, and the agreement with
float32 that `skinray evaluate --precision bfloat16` measures."""

from __future__ import annotations

import numpy as np
import pytest

from skinray import UserError
from skinray.config import ConfigError, load_config


def _stacked_views(photos, sizes) -> dict[int, np.ndarray]:
    """The photos decoded as a Predictor takes them: one stacked batch of views per input size."""
    from skinray.data.ingest import decode_views

    views = [decode_views(p.read_bytes(), sizes, 25_000_000) for p in photos]
    return {s: np.stack([v[s] for v in views]) for s in sizes}


def test_a_member_rebuilt_in_bfloat16_computes_in_it_and_answers_like_float32(bundle, photos):
    from skinray.predictor import Predictor

    fp32, bf16 = Predictor.from_path(str(bundle)), Predictor.from_path(str(bundle))
    assert bf16.to_precision("bfloat16") == ("bfloat16", "as configured")
    model = bf16.members[0].model
    inner = [layer for layer in model.get_layer("backbone").layers if layer.weights]
    assert inner and all(layer.dtype_policy.compute_dtype == "bfloat16" for layer in inner)
    assert all(v.dtype == "float32" for v in model.weights)  # variables stay float32
    assert model.get_layer("logits").dtype_policy.name == "float32"
    kinds = [
        {type(layer).__name__ for layer in p.members[0].model.get_layer("backbone").layers}
        for p in (fp32, bf16)
    ]
    assert "BatchNormalization" in kinds[0] and "BatchNormalization" not in kinds[1]  # folded
    stacked = _stacked_views(photos, fp32.sizes)
    a, b = fp32.predict(stacked), bf16.predict(stacked)
    assert b.member_logits.dtype == np.float32 and b.probabilities.dtype == np.float32
    assert np.abs(a.probabilities - b.probabilities).max() < 0.05
    # Only a near tie may change its label (a fresh-clone run saw one: 0.342 against 0.357 in float32).
    top = np.sort(a.probabilities, axis=1)
    differ = np.asarray(a.labels) != np.asarray(b.labels)
    assert (top[differ, -1] - top[differ, -2] < 0.05).all()
    assert np.abs(a.member_logits - b.member_logits).max() > 0  # it did compute in another precision


def test_the_inference_engines_fold_batch_norms_in_float32_too(bundle, photos):
    """`to_precision("float32")` (what score's actors and Serve's replicas call) folds the
    BatchNormalizations as bfloat16 does, and answers as the saved model does, to float32 rounding;
    a model loaded without it (to train from, or export) keeps its layers."""
    from skinray.predictor import Predictor

    saved, ready = Predictor.from_path(str(bundle)), Predictor.from_path(str(bundle))
    assert ready.to_precision("float32") == ("float32", "as configured")
    kinds = [
        {type(layer).__name__ for layer in p.members[0].model.get_layer("backbone").layers}
        for p in (saved, ready)
    ]
    assert "BatchNormalization" in kinds[0] and "BatchNormalization" not in kinds[1]
    assert all(layer.dtype_policy.name == "float32" for layer in ready.members[0].model.layers)
    stacked = _stacked_views(photos, saved.sizes)
    a, b = saved.predict(stacked), ready.predict(stacked)
    np.testing.assert_allclose(a.member_logits, b.member_logits, atol=1e-4)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    assert list(a.labels) == list(b.labels)


def test_folding_batch_norms_into_their_convolutions_keeps_the_outputs():
    """The folding's arithmetic, checked in float32 (where it must be exact to rounding): a plain
    and a depthwise convolution each followed by a BatchNormalization with learnt statistics are
    folded; one whose convolution also feeds another layer, or that follows an activation, is kept."""
    import keras

    from skinray.precision import _copy_weights, fold_batch_norms

    inputs = keras.Input((12, 12, 3))
    a = keras.layers.BatchNormalization(name="bn_a")(keras.layers.Conv2D(8, 3, name="conv_a")(inputs))
    b = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False, name="dw")(a)
    b = keras.layers.BatchNormalization(name="bn_dw", scale=False)(b)
    c = keras.layers.Conv2D(16, 1, name="conv_c")(b)
    kept = keras.layers.BatchNormalization(name="bn_kept")(c)  # conv_c also feeds the Add
    d = keras.layers.Add()([kept, c])
    e = keras.layers.BatchNormalization(name="bn_after_relu")(keras.layers.ReLU()(d))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(e))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") for w in layer.get_weights()])
    config = model.get_config()
    folded = fold_batch_norms(config)
    assert folded == {"bn_a": "conv_a", "bn_dw": "dw"}
    rebuilt = keras.Model.from_config(config)
    _copy_weights(model, rebuilt, folded)
    names = {layer.name for layer in rebuilt.layers}
    assert {"bn_kept", "bn_after_relu"} <= names and not {"bn_a", "bn_dw"} & names
    x = rng.uniform(0, 1, (4, 12, 12, 3)).astype("float32")
    expected, got = np.asarray(model(x, training=False)), np.asarray(rebuilt(x, training=False))
    assert np.abs(expected - got).max() < 1e-4 * np.abs(expected).max()


def test_auto_is_bfloat16_only_where_it_is_native(monkeypatch):
    from skinray import precision

    monkeypatch.setattr(precision, "native_bfloat16", lambda: "CPU avx512_bf16")
    assert precision.resolve("auto") == ("bfloat16", "auto: CPU avx512_bf16")
    monkeypatch.setattr(precision, "native_bfloat16", lambda: "")
    assert precision.resolve("auto") == ("float32", "auto: no native bfloat16 here")
    assert precision.resolve("float32") == ("float32", "as configured")
    with pytest.raises(UserError, match="must be one of"):
        precision.resolve("float16")
    with pytest.raises(ConfigError, match="score.precision"):
        load_config(overrides=["score.precision=fp8"])


def test_evaluate_in_bfloat16_reports_its_agreement_with_float32(bundle, members, ray_cluster, tmp_path):
    from skinray.evaluate import evaluate

    cfg = load_config(overrides=["score.precision=bfloat16", "score.max_actors=1"])
    report = evaluate(str(bundle), str(members["archive"]), "test", str(tmp_path), cfg)
    p = report["precision"]
    assert p["used"] == "bfloat16" and p["images"] == report["num_images"]
    assert p["top1_agreement"] >= 0.9 and 0 < p["max_probability_difference"] < 0.1
    assert set(p["ece"]) == {"float32", "bfloat16"} and set(p["differential_coverage"]) == {
        "float32",
        "bfloat16",
    }
    assert "## Precision: bfloat16 (as configured) against float32" in (tmp_path / "report.md").read_text()
