"""The model factory: every network skinray builds comes from these functions.

    list_backbones()                   the registry's names (what --backbone and model.backbone take)
    check_model(cfg.model)             validates backbone, input size and weights; (spec, size)
    weights_file(spec, cfg.model)      the starting weights' local file (`sources.py`: from a run)
    create_classifier(cfg.model, k)    uint8 images -> logits (training; `seed=` fixes the start)
    create_features(cfg.model)         uint8 images -> pooled features (tuning's cached embeddings)

The registry (`backbones.py`) knows each backbone's constructor, native size, preprocessing and
weights; `classifier.py` puts the preprocessing layer before it and the head after it. Keras and
TensorFlow load only when a model is created, so listing names stays cheap (the CLI's --help).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

    from skinray.config import ModelConfig
    from skinray.models.backbones import BackboneSpec


def list_backbones() -> tuple[str, ...]:
    from skinray.models.backbones import REGISTRY

    return tuple(REGISTRY)


def check_model(cfg: ModelConfig) -> tuple[BackboneSpec, int]:
    """The backbone's spec and the input side, after checking that the backbone exists, takes that
    size and has its weights (the driver calls it before a cluster starts: mistakes fail early)."""
    from skinray.models.backbones import get_backbone, input_size

    spec = get_backbone(cfg.backbone)
    size = input_size(spec, cfg.image_size)
    weights_file(spec, cfg)
    return spec, size


def weights_file(spec: BackboneSpec, cfg: ModelConfig) -> str | None:
    """The local file of the backbone's starting weights (None: random): ImageNet's, a weights file,
    or the backbone of a trained run, checkpoint or bundle member (`skinray.models.sources`)."""
    from skinray.models.backbones import resolve_weights
    from skinray.models.sources import backbone_weights, is_source

    if is_source(cfg.weights):
        return backbone_weights(spec, cfg.weights, cfg.weights_member)
    return resolve_weights(spec, cfg.weights)


def create_classifier(cfg: ModelConfig, num_classes: int, seed: int | None = None) -> keras.Model:
    """uint8 images (size x size x 3) -> logits over `num_classes` (see `classifier.build_classifier`).

    With `seed`, the random initial weights are that seed's (Keras' global seed is set first, so
    the same seed builds the same network in any process); without it, they are Keras' draw.
    """
    import keras

    from skinray.models.backbones import get_backbone, input_size
    from skinray.models.classifier import build_classifier

    spec = get_backbone(cfg.backbone)
    size, weights = input_size(spec, cfg.image_size), weights_file(spec, cfg)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return build_classifier(spec, num_classes, cfg, size, weights)


def create_features(cfg: ModelConfig) -> keras.Model:
    """uint8 images -> the backbone's pooled features: exactly the lower part of `create_classifier`'s
    model (the frozen embedding model of `skinray tune`)."""
    import keras

    from skinray.models.backbones import get_backbone, input_size
    from skinray.models.classifier import build_features

    spec = get_backbone(cfg.backbone)
    size, weights = input_size(spec, cfg.image_size), weights_file(spec, cfg)
    return keras.Model(*build_features(spec, size, weights))
