"""Backbone + head = the classifier; freezing for the two transfer-learning phases.

The model takes raw uint8 RGB images of the run's input size and returns logits. Its first layer
applies the backbone's own preprocessing, so a saved `.keras` model is all a scorer needs besides
the resize: training, bulk scoring and serving cannot disagree about normalisation.
"""

from __future__ import annotations

import keras
from keras import ops

from skinray.config import ModelConfig
from skinray.models.backbones import BackboneSpec

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="skinray")
class ImagePreprocessing(keras.layers.Layer):
    """Raw 0..255 RGB -> the input a backbone was trained on.

    Args:
        mode: 'caffe' (RGB->BGR, ImageNet mean subtracted; ResNet50), 'tf' (scaled to [-1, 1];
            InceptionV3) or 'raw' (unchanged; EfficientNetV2 normalises itself).

    Example:
        >>> ImagePreprocessing("tf")(np.full((1, 2, 2, 3), 255, "uint8"))  # all 1.0
    """

    MODES = ("caffe", "tf", "raw")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"preprocessing mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_classifier(
    spec: BackboneSpec, num_classes: int, cfg: ModelConfig, size: int, weights: str | None
) -> keras.Model:
    """uint8 images (size x size x 3) -> logits over `num_classes`.

    The backbone is a nested model named "backbone", so freezing can address it as a whole.
    The logits stay float32 under mixed precision, for a numerically safe softmax and loss.
    """
    inputs, features = build_features(spec, size, weights)
    model = keras.Model(inputs, head(features, num_classes, cfg), name=f"skinray_{spec.name}")
    if weights is None and cfg.zero_init_residual:
        zero_init_residual(model.get_layer("backbone"), spec.residual_bn)
    return model


def build_features(spec: BackboneSpec, size: int, weights: str | None):
    """uint8 images -> the backbone's pooled features: (input, output) of the model's lower part.

    The frozen embedding model of `skinray tune` is exactly this part of the classifier.
    """
    inputs = keras.Input((size, size, 3), dtype="uint8", name="image")
    x = ImagePreprocessing(spec.preprocessing, name="preprocessing")(inputs)
    backbone = spec.build(size, weights)
    backbone.name = "backbone"
    return inputs, keras.layers.GlobalAveragePooling2D(name="pool")(backbone(x))


def head(features, num_classes: int, cfg: ModelConfig):
    """Pooled features -> logits: dropout, dense(head_units, activation, L2), dropout, dense.

    One function for the head of `skinray train` and the heads `skinray tune` trains on cached
    features, so a tuned configuration means the same layers in both.
    """
    regularizer = keras.regularizers.L2(cfg.l2) if cfg.l2 else None
    x = keras.layers.Dropout(cfg.dropout, name="dropout")(features)
    x = keras.layers.Dense(
        cfg.head_units, activation=cfg.head_activation, kernel_regularizer=regularizer, name="hidden"
    )(x)
    x = keras.layers.Dropout(cfg.head_dropout, name="head_dropout")(x)
    return keras.layers.Dense(num_classes, kernel_regularizer=regularizer, dtype="float32", name="logits")(x)


def build_head(feature_size: int, num_classes: int, cfg: ModelConfig) -> keras.Model:
    """The head alone, on pooled features of `feature_size` (what a cached tuning trial trains)."""
    features = keras.Input((feature_size,), name="features")
    return keras.Model(features, head(features, num_classes, cfg), name="skinray_head")


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1: only the head trains."""
    model.get_layer("backbone").trainable = False


def unfreeze_top(model: keras.Model, count: int, keep_batchnorm_frozen: bool) -> int:
    """Phase 2: the top `count` layers of the backbone train too (-1: all); returns how many.

    With pretrained weights, BatchNormalization layers stay frozen (and so in inference mode):
    their ImageNet statistics are worth more than what small fine-tuning batches would estimate.
    """
    backbone = model.get_layer("backbone")
    backbone.trainable = True
    layers = [layer for layer in backbone.layers if layer.weights]  # "layers" count those with weights
    cut = 0 if count < 0 else max(len(layers) - count, 0)
    for i, layer in enumerate(layers):
        # Set every layer explicitly: an earlier phase's settings must not survive.
        batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = i >= cut and not (batchnorm and keep_batchnorm_frozen)
    return len(layers) - cut


def zero_init_residual(backbone: keras.Model, pattern: str) -> int:
    """Starts every residual block as the identity: the BatchNormalization that ends each residual
    branch gets a zero scale, so the signal first flows through the shortcuts alone (Goyal et al.
    2017, "Accurate, Large Minibatch SGD", section 5.1). Returns how many layers were set.

    A layer ends a residual branch when its name matches `pattern` and its output reaches nothing
    but an Add (through stochastic depth's Dropout or an activation, which map zero to zero); a
    block's output that the next block's shortcut adds is also read by that block's convolution.
    """
    import re

    def only_into_add(layer) -> bool:
        consumers = [node.operation for node in layer._outbound_nodes]
        return bool(consumers) and all(
            isinstance(c, keras.layers.Add)
            or isinstance(c, (keras.layers.Dropout, keras.layers.Activation))
            and only_into_add(c)
            for c in consumers
        )

    count = 0
    for layer in backbone.layers:
        if (
            pattern
            and isinstance(layer, keras.layers.BatchNormalization)
            and re.search(pattern, layer.name)
            and only_into_add(layer)
        ):
            layer.gamma.assign(ops.zeros_like(layer.gamma))
            count += 1
    return count
