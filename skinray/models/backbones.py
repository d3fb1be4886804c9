"""The backbone registry: name -> spec (constructor, native input size, preprocessing, feature size).

Everything downstream derives from a spec: the data pipeline resizes to `spec.input_size` (or the
configured override), the model's first layer applies `spec.preprocessing` to raw 0..255 RGB, and
the ImageNet weights are looked for under the file name Keras itself uses. Because preprocessing
is inside the model, training, bulk scoring and serving feed the same uint8 pixels and get the same
probabilities. `tiny` is a small CNN in the same registry for tests and smoke runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from skinray import UserError

if TYPE_CHECKING:
    import keras

KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"


class BackboneError(UserError, ValueError):
    """An unknown backbone, or weights that cannot be found or fetched."""


@dataclass(frozen=True)
class BackboneSpec:
    """What skinray needs to know about a backbone.

    Args:
        name: registry name.
        build: (input_size, weights file or None) -> a Keras model from images to a feature map.
        input_size: native square input side.
        preprocessing: 'caffe' (BGR, ImageNet mean subtracted), 'tf' (scaled to [-1, 1]) or
            'raw' (0..255; the backbone normalises itself).
        feature_size: channels of the feature map (the head's input width).
        cam_layer: the backbone's layer whose output Grad-CAM explains (its last convolutional
            feature map), by name.
        min_size: the smallest input side the architecture accepts.
        keras_call: how plain Keras builds the same backbone (what exported weights load into).
        residual_bn: a pattern (`re.search`) naming the BatchNormalization layers that end a
            residual branch; those feeding an Add start at zero scale under
            `model.zero_init_residual` ('' for backbones without residual blocks).
        weights_file: the no-top ImageNet weights as Keras caches them (None: no ImageNet weights).
        weights_url: where Keras downloads them from.
        weights_hash: their MD5, as Keras checks it.
    """

    name: str
    build: Callable[[int, str | None], keras.Model]
    input_size: int
    preprocessing: str
    feature_size: int
    cam_layer: str
    min_size: int = 32
    keras_call: str = ""
    residual_bn: str = ""
    weights_file: str | None = None
    weights_url: str | None = None
    weights_hash: str | None = None


# === Constructors ===


def _resnet50(size: int, weights: str | None) -> keras.Model:
    import keras

    return keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(size, size, 3))


def _inception_v3(size: int, weights: str | None) -> keras.Model:
    import keras

    return keras.applications.InceptionV3(include_top=False, weights=weights, input_shape=(size, size, 3))


def _efficientnetv2s(size: int, weights: str | None) -> keras.Model:
    import keras

    return keras.applications.EfficientNetV2S(
        include_top=False, weights=weights, input_shape=(size, size, 3), include_preprocessing=True
    )


def _tiny(size: int, weights: str | None) -> keras.Model:
    """Three strided conv blocks with BatchNormalization: seconds to train on a CPU."""
    import keras

    inputs = keras.Input((size, size, 3))
    x = inputs
    for filters in (16, 32, 64):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False)(x)
        # Momentum 0.9: the moving statistics settle within the few hundred steps of a smoke run.
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU(name=f"relu_{filters}")(x)
    model = keras.Model(inputs, x, name="tiny")
    if weights:
        model.load_weights(weights)
    return model


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            "resnet50",
            _resnet50,
            224,
            "caffe",
            2048,
            "conv5_block3_out",
            keras_call="keras.applications.ResNet50(include_top=False, weights=None)",
            residual_bn=r"_3_bn$",
            weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=KERAS_APPLICATIONS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_hash="4d473c1dd8becc155b73f8504c6f6626",
        ),
        BackboneSpec(
            "inception_v3",
            _inception_v3,
            299,
            "tf",
            2048,
            "mixed10",
            min_size=75,
            keras_call="keras.applications.InceptionV3(include_top=False, weights=None)",
            weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=KERAS_APPLICATIONS
            + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_hash="bcbd6486424b2319ff4ef7d526e38f63",
        ),
        BackboneSpec(
            "efficientnetv2s",
            _efficientnetv2s,
            384,
            "raw",
            1280,
            "top_activation",
            keras_call="keras.applications.EfficientNetV2S(include_top=False, weights=None)",
            residual_bn=r"_project_bn$",  # the blocks whose input and output shapes match: 35 of 40
            weights_file="efficientnetv2-s_notop.h5",
            weights_url=KERAS_APPLICATIONS + "efficientnet_v2/efficientnetv2-s_notop.h5",
            weights_hash="af0682fb74e8c54910f2d4393339c070",
        ),
        BackboneSpec(
            "tiny", _tiny, 64, "tf", 64, "relu_64", keras_call="skinray.models.backbones._tiny(64, None)"
        ),
    ]
}


def get_backbone(name: str) -> BackboneSpec:
    """Looks a backbone up by name; an unknown name lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone '{name}' (known: {', '.join(REGISTRY)})") from None


def input_size(spec: BackboneSpec, override: int = 0) -> int:
    """The input side a run uses: the override when set, else the backbone's native size."""
    size = override or spec.input_size
    if size < spec.min_size:
        raise BackboneError(f"{spec.name} needs an input of at least {spec.min_size} px, got {size}")
    return size


# === Weights ===


def keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def resolve_weights(spec: BackboneSpec, weights: str) -> str | None:
    """'imagenet' -> the cached (or freshly downloaded) weights file; 'none' -> None; else a path.

    Called on the driver before any training starts, and again on every worker (each node needs
    the file); fails with a message saying exactly what to do when the file cannot be had.
    """
    if weights.lower() == "none":
        return None
    if weights.lower() != "imagenet":
        if not Path(weights).expanduser().is_file():
            raise BackboneError(f"weights file '{weights}' does not exist")
        return str(Path(weights).expanduser())
    if spec.weights_file is None:
        raise BackboneError(f"backbone '{spec.name}' has no ImageNet weights: use --weights none or a path")
    cached = keras_home() / "models" / spec.weights_file
    if cached.is_file():
        return str(cached)
    try:
        return keras.utils.get_file(
            spec.weights_file, spec.weights_url, cache_subdir="models", file_hash=spec.weights_hash
        )
    except Exception as exc:  # urllib raises several types; all mean "could not fetch"
        raise BackboneError(
            f"ImageNet weights for {spec.name} could not be downloaded ({type(exc).__name__}). "
            f"Keras expects the file '{spec.weights_file}' in {cached.parent} (set KERAS_HOME to use "
            f"another folder): download {spec.weights_url} on a machine with network access and copy "
            "it there, or pass --weights /path/to/weights.h5, or --weights none to train from scratch."
        ) from None
