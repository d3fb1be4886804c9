"""A trained skinray model as the source of a backbone's weights: fine-tuning from a run, a
checkpoint or a bundle member, and exporting a backbone for plain Keras.

    --weights runs/dermnet-resnet50                  a run directory (its best checkpoint)
    --weights runs/dermnet-resnet50/checkpoint_epoch_0011
    --weights bundles/v3 --weights-member 00-resnet50     a bundle's member (the one of the
                                                     backbone, when --weights-member is not given)

The backbone's weights are taken from the source's model (its head is left behind: the new run's
head is new, for the new archive's classes) and written once per node into the model cache as a
Keras `.weights.h5` file, which the backbone's constructor loads as it loads ImageNet weights, at
any input size the backbone accepts. The same file is what `skinray export-weights` writes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from skinray.models.backbones import BackboneError, BackboneSpec
from skinray.storage import model_cache, redact

WEIGHTS_SUFFIX = ".weights.h5"  # what Keras 3's save_weights/load_weights require


def is_source(weights: str) -> bool:
    """True when `model.weights` names a trained model rather than 'imagenet', 'none' or a file of
    weights (`.h5`, `.weights.h5`)."""
    if weights.lower() in ("imagenet", "none"):
        return False
    return not (weights.endswith(".h5") and Path(weights).expanduser().is_file())


@dataclass
class Source:
    """The chosen member of a trained model, before or after its Keras model is loaded."""

    predictor: object  # skinray.predictor.Predictor
    member: object  # skinray.predictor.Member
    shown: str  # the location, credentials hidden

    @property
    def description(self) -> str:
        """Where the weights come from, as the run's config.yaml records it (`model.weights_from`)."""
        if self.predictor.manifest:
            return f"bundle {self.predictor.version}, member {self.member.name}"
        return f"checkpoint {self.predictor.version}"


def open_source(location: str, member: str = "") -> Source:
    """Opens a run, checkpoint or bundle (without loading its models) and picks the member: the
    one named, else the only one. Raises BackboneError saying what exists."""
    from skinray import UserError
    from skinray.predictor import Predictor

    shown = redact(location)
    try:
        predictor = Predictor.from_path(location, load_models=False)
    except UserError as exc:
        raise BackboneError(
            f"--weights '{shown}' is not 'imagenet', 'none', a weights file (.h5) or a skinray run, "
            f"checkpoint or bundle ({exc})"
        ) from None
    names = [m.name for m in predictor.members]
    if member:
        chosen = [m for m in predictor.members if m.name == member]
        if not chosen:
            raise BackboneError(f"--weights-member {member}: '{shown}' has the members {', '.join(names)}")
    elif len(names) > 1:
        raise BackboneError(
            f"'{shown}' has {len(names)} members ({', '.join(names)}): name one with --weights-member"
        )
    else:
        chosen = predictor.members
    return Source(predictor, chosen[0], shown)


def backbone_weights(spec: BackboneSpec, location: str, member: str = "") -> str:
    """The local `.weights.h5` file of the source's backbone, for a backbone of `spec` (checked: the
    same architecture); written once per node into the model cache, atomically."""
    source = open_source(location, member)
    theirs = source.member.backbone
    if theirs != spec.name:
        raise BackboneError(
            f"--weights '{source.shown}' ({source.member.name}) holds a {theirs} backbone, and this run "
            f"builds a {spec.name}: pass --backbone {theirs}, or weights of a {spec.name}"
        )
    file = Path(source.member.file)
    stat = file.stat()
    key = hashlib.sha256(
        f"{source.predictor.version}\n{source.member.name}\n{file}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()
    ).hexdigest()[:24]
    target = model_cache() / "backbones" / f"{spec.name}-{key}{WEIGHTS_SUFFIX}"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        save_backbone(source, target)
    return str(target)


def save_backbone(source: Source, file: Path) -> None:
    """Writes the source member's backbone weights to `file` (a `.weights.h5` path), whole or not at all."""
    source.predictor.load_models([source.member])
    backbone = source.member.model.get_layer("backbone")
    partial = file.with_name(f".partial-{uuid.uuid4().hex[:8]}-{file.name}")
    try:
        backbone.save_weights(partial)
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)


def export_backbone(location: str, out: str, member: str = "") -> str:
    """`skinray export-weights`: writes the chosen member's backbone weights to `out` (a local path
    or URI ending in .weights.h5); returns a line saying what was written and how to load it."""
    from skinray.models.backbones import get_backbone
    from skinray.storage import write_file

    if not out.endswith(WEIGHTS_SUFFIX):
        raise BackboneError(
            f"--out must end in {WEIGHTS_SUFFIX} (Keras' weights format), got '{redact(out)}'"
        )
    source = open_source(location, member)
    spec = get_backbone(source.member.backbone)
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / f"backbone{WEIGHTS_SUFFIX}"
        save_backbone(source, file)
        write_file(file, out)
    return (
        f"{redact(out)}: the {spec.name} backbone of {source.description} "
        f"(trained at {source.member.image_size} px). Plain Keras: {spec.keras_call}"
        f".load_weights(FILE); skinray: --weights FILE"
    )
