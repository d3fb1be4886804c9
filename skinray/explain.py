"""Visual explanations: where in a photo the ensemble found the evidence for its answer.

Grad-CAM (Selvaraju et al., 2017) for every member: the gradient of the explained class's logit
with respect to the member's last convolutional feature map (the layer its backbone's registry
entry names, `BackboneSpec.cam_layer`), averaged over space, weights that map's channels; the
ReLU of their weighted sum is where the evidence lies. Each member's map is stretched back over the
photo (the evaluation warp stretches the whole photo to the member's square input, so this is its
exact inverse), scaled to [0, 1], and the maps are averaged with the ensemble's member weights.
Every member explains the same class: the ensemble's answer.

    skinray explain --model BUNDLE_OR_RUN photo.jpg folder/ --out explanations/

The server's `POST /v1/explain` and the upload page draw the same overlay (`render`).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from skinray import UserError
from skinray.data.decode import is_image_name

COLOUR_MAP = "turbo"  # matplotlib's: dark blue (no evidence) -> green -> yellow -> dark red (strongest)
DISPLAY_SIDE = 512  # the longer side of a drawn explanation, in pixels


class Explainer:
    """Grad-CAM of a list of members (an ensemble's, or the part of it a Serve replica holds)."""

    def __init__(self, members: list):
        from skinray.models.backbones import get_backbone

        self.members = members
        self._parts = [_split(m.model, get_backbone(m.backbone).cam_layer) for m in members]

    def cams(self, views: dict[int, np.ndarray], classes: np.ndarray) -> list[np.ndarray]:
        """uint8 views keyed by input size, the class to explain per image -> per member, (n, h, w)
        maps (h, w: that member's feature-map size), not yet scaled."""
        return [
            _grad_cam(parts, views[m.image_size], np.asarray(classes))
            for m, parts in zip(self.members, self._parts)
        ]


def _split(model, layer: str):
    """The classifier as (preprocessing, backbone input -> (the layer's map, backbone output), the
    layers after the backbone): Grad-CAM needs the map and the logits of one forward pass."""
    import keras

    backbone = model.get_layer("backbone")
    try:
        feature_map = backbone.get_layer(layer).output
    except (
        ValueError
    ):  # saved before its registry entry named the layer: the backbone's own output is that map
        feature_map = backbone.outputs[0]
    probe = keras.Model(backbone.inputs, [feature_map, backbone.outputs[0]])
    names = [lyr.name for lyr in model.layers]
    return model.get_layer("preprocessing"), probe, model.layers[names.index("backbone") + 1 :]


def _grad_cam(parts, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    preprocessing, probe, top = parts
    x = preprocessing(tf.convert_to_tensor(images))
    with tf.GradientTape() as tape:
        tape.watch(x)  # records the forward pass, so the gradient can reach the map inside it
        feature_map, y = probe(x, training=False)
        for layer in top:
            y = layer(y, training=False)
        target = tf.gather(y, classes, axis=1, batch_dims=1)
    grads = tf.cast(tape.gradient(target, feature_map), tf.float32)
    channel_weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(channel_weights * tf.cast(feature_map, tf.float32), axis=-1)).numpy()


def heat_map(member_cams: list[np.ndarray], weights, width: int, height: int) -> np.ndarray:
    """One image's member maps -> one (height, width) map in [0, 1]: each stretched over the photo
    and scaled to its own maximum, then averaged with the members' normalised weights."""
    weights = np.asarray(weights, np.float64)
    heat = np.zeros((height, width), np.float64)
    for cam, weight in zip(member_cams, weights / weights.sum()):
        up = cv2.resize(np.asarray(cam, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        top = up.max()
        heat += weight * (up / top if top > 0 else up)
    top = heat.max()
    return (heat / top if top > 0 else heat).astype(np.float32)


def colour(heat: np.ndarray) -> np.ndarray:
    """[0, 1] values -> uint8 RGB through the colour map."""
    from matplotlib import colormaps

    return colormaps[COLOUR_MAP](heat, bytes=True)[..., :3]


def overlay(photo: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The photo with the heat drawn over it: opaque where the evidence is strong, clear where none."""
    alpha = (0.2 + 0.5 * heat)[..., None]
    return (photo * (1 - alpha) + colour(heat) * alpha).astype(np.uint8)


def render(
    image: Image.Image, member_cams: list[np.ndarray], weights, caption: list[str] = ()
) -> Image.Image:
    """A photo (decoded, upright RGB), one image's member maps and their weights -> the drawn
    explanation: the photo with its heat overlay, a colour legend under it, then the caption lines."""
    scale = DISPLAY_SIDE / max(image.size)
    photo = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
    )
    heat = heat_map(member_cams, weights, photo.width, photo.height)
    drawn = overlay(np.asarray(photo), heat)
    font = _font(14)
    legend_height, line_height = 34, 20
    width = max(photo.width, 320)
    canvas = Image.new("RGB", (width, photo.height + legend_height + line_height * len(caption) + 6), "white")
    canvas.paste(Image.fromarray(drawn), ((width - photo.width) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    bar_left, bar_right, top = 70, width - 70, photo.height + 8
    ramp = colour(np.linspace(0, 1, bar_right - bar_left))[None].repeat(12, axis=0)
    canvas.paste(Image.fromarray(ramp), (bar_left, top))
    draw.text((8, top - 2), "weaker", fill="black", font=font)
    draw.text((bar_right + 6, top - 2), "stronger", fill="black", font=font)
    draw.text((bar_left, top + 14), "evidence for the answer (Grad-CAM)", fill="dimgray", font=_font(11))
    for i, line in enumerate(caption):
        draw.text((8, photo.height + legend_height + i * line_height), line, fill="black", font=font)
    return canvas


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def caption_lines(answer: dict, version: str) -> list[str]:
    """What a reader needs beside the picture (`Prediction.answers`' answer): the answer (or the
    referral), the runners-up, the differential (a bundle's), the model."""
    label, confidence = answer["label"], answer["confidence"]
    if answer.get("out_of_distribution"):
        first = f"not answered: {answer['reason']} (most likely {label}, {confidence:.0%})"
    elif answer["abstained"]:
        first = f"uncertain, refer (most likely {label}, {confidence:.0%})"
    else:
        first = f"{label} ({confidence:.0%} confidence)"
    top = ", ".join(f"{t['label']} {t['probability']:.0%}" for t in answer["top_k"])
    lines = [first, f"top: {top}"]
    if answer.get("differential"):
        lines.append(f"differential: {', '.join(answer['differential'])}")
    return [*lines, f"model {version}"]


# === skinray explain ===


def explain_files(cfg, model: str, names: list[str], out: str, overwrite: bool = False) -> int:
    """Writes one PNG per readable input image into `out` (its caption lists `score.top_k` classes);
    prints an error line for each one that is not. Returns the exit code: 1 when any failed.
    PNGs already there are replaced only with `overwrite`; without it, nothing is done."""
    from skinray.console import load_tensorflow
    from skinray.data.decode import DecodeError
    from skinray.data.ingest import decode_photo
    from skinray.predictor import Predictor

    inputs = _inputs(names)
    there = [name for _, name in inputs if (Path(out) / f"{name}.png").exists()]
    if there and not overwrite:
        raise UserError(
            f"{len(there)} explanation(s) are in {out} already (e.g. {there[0]}.png): pass "
            "--overwrite to replace them, or give another --out"
        )
    load_tensorflow(expect_gpu=False)
    predictor = Predictor.from_path(model, expect_version=cfg.score.expect_version)
    explainer, weights = Explainer(predictor.members), [m.weight for m in predictor.members]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path, name in inputs:
        try:
            image, views = decode_photo(path.read_bytes(), predictor.sizes, predictor.config.data.max_pixels)
        except (DecodeError, OSError) as exc:
            print(f"{path}: not explained: {getattr(exc, 'reason', None) or exc}", file=sys.stderr)
            failed += 1
            continue
        views = {size: view[None] for size, view in views.items()}
        prediction = predictor.predict(views)
        cams = [c[0] for c in explainer.cams(views, prediction.labels)]
        (answer,) = prediction.answers(predictor.classes, cfg.score.top_k)
        caption = caption_lines(answer, predictor.version)
        target = out / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png(render(image, cams, weights, caption)))
        print(f"{path}: {caption[0]} -> {target}")
    print(
        f"{len(inputs) - failed} explanation(s) written to {out}"
        + (f"; {failed} input(s) failed" if failed else "")
    )
    return 1 if failed else 0


def _inputs(names: list[str]) -> list[tuple[Path, str]]:
    """(file, output name) of each image: files as given, folders searched for image files."""
    found = []
    for name in names:
        path = Path(name).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name))
            found += [(p, str(p.relative_to(path).with_suffix(""))) for p in files]
        elif path.exists():
            found.append((path, path.stem))
        else:
            raise UserError(f"no such file or folder: {name}")
    if not found:
        raise UserError("no images found in the given inputs")
    seen: dict[str, int] = {}
    for i, (path, stem) in enumerate(found):  # two inputs of the same name get name.png and name-2.png
        seen[stem] = seen.get(stem, 0) + 1
        if seen[stem] > 1:
            found[i] = (path, f"{stem}-{seen[stem]}")
    return found
