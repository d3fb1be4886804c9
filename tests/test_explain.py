"""Explanations: Grad-CAM points at the evidence, and `skinray explain` writes one PNG per image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

SIZE = 64


def quadrant_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is decided by the stripes in their top-left quadrant (horizontal: 0,
    vertical: 1); the rest is smooth colour noise with no stripes, the same for both classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = np.empty((n, SIZE, SIZE, 3), np.float32)
    across = np.sin(2 * np.pi * np.arange(SIZE // 2) / 6)
    for i, label in enumerate(labels):
        coarse = Image.fromarray(rng.integers(40, 216, (8, 8, 3), dtype=np.uint8)).resize((SIZE, SIZE))
        image = np.asarray(coarse, np.float32) + rng.normal(0, 12, (SIZE, SIZE, 3))
        stripes = (
            np.repeat(across[:, None], SIZE // 2, 1) if label == 0 else np.repeat(across[None], SIZE // 2, 0)
        )
        image[: SIZE // 2, : SIZE // 2] = 0.3 * image[: SIZE // 2, : SIZE // 2] + 90 * (
            1 + stripes[..., None]
        )
        images[i] = image
    return np.clip(images, 0, 255).astype(np.uint8), labels


def test_grad_cam_puts_the_heat_on_the_quadrant_that_decides_the_class():
    import keras

    from skinray.config import load_config
    from skinray.explain import Explainer, heat_map
    from skinray.models import create_classifier
    from skinray.predictor import Member

    keras.utils.set_random_seed(0)
    cfg = load_config(
        overrides=[
            "model.backbone=tiny",
            "model.head_units=32",
            "model.dropout=0.1",
            "model.weights=none",
            f"model.image_size={SIZE}",
        ]
    )
    model = create_classifier(cfg.model, 2)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = quadrant_images(320, seed=0)
    model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    test_x, test_y = quadrant_images(40, seed=1)
    logits = np.asarray(model(test_x, training=False))
    assert (logits.argmax(1) == test_y).mean() >= 0.9  # it learned the pattern

    member = Member("00-tiny", model, "tiny", SIZE)
    (cams,) = Explainer([member]).cams({SIZE: test_x}, logits.argmax(1))
    assert cams.shape == (40, 8, 8)  # the map of the layer named in tiny's registry entry
    heat = np.stack([heat_map([c], [1.0], SIZE, SIZE) for c in cams])
    assert heat.min() >= 0 and heat.max() <= 1
    share = heat[:, : SIZE // 2, : SIZE // 2].sum(axis=(1, 2)) / heat.sum(axis=(1, 2))
    assert np.median(share) > 0.6, (
        share
    )  # a quarter of the picture holds most of the evidence (seen: 0.83-0.9)


def test_heat_maps_combine_members_by_weight():
    from skinray.explain import heat_map

    left, right = np.zeros((2, 2), np.float32), np.zeros((3, 3), np.float32)
    left[:, 0], right[:, 2] = 1.0, 5.0  # different feature-map sizes and scales, as members have
    heat = heat_map([left, right], [3.0, 1.0], 40, 20)
    assert heat.shape == (20, 40) and heat.max() == pytest.approx(1.0)
    assert heat[:, :5].mean() > 2 * heat[:, -5:].mean() > 0  # the heavier member's evidence weighs more


def test_skinray_explain_writes_one_png_per_image_and_an_error_line_per_broken_one(
    bundle, photos, tmp_path, capsys
):
    from skinray.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for p in photos[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(photos[0].read_bytes()[:300])
    out = tmp_path / "out"
    code = main(["explain", "--model", str(bundle), str(folder), str(photos[2]), "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 1  # one input could not be explained
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in photos)
    assert "broken.jpg: not explained:" in printed.err and not (out / "broken.png").exists()
    assert "3 explanation(s) written" in printed.out and "1 input(s) failed" in printed.out
    picture = Image.open(out / f"{photos[0].stem}.png")
    assert picture.format == "PNG" and picture.width >= 320
    # The caption area under the picture holds text (dark pixels on white).
    caption = np.asarray(picture.convert("L"))[-50:]
    assert (caption < 100).any() and (caption > 250).mean() > 0.5
    # Run again into the same folder: refused, nothing replaced, unless --overwrite says so.
    written = (out / f"{photos[0].stem}.png").stat().st_mtime_ns
    assert main(["explain", "--model", str(bundle), str(folder), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / f"{photos[0].stem}.png").stat().st_mtime_ns == written
    assert main(["explain", "--model", str(bundle), str(photos[0]), "--out", str(out), "--overwrite"]) == 0
    assert (out / f"{photos[0].stem}.png").stat().st_mtime_ns != written


def test_skinray_explain_refuses_a_missing_input(bundle, tmp_path, capsys):
    from skinray.cli import main

    assert main(["explain", "--model", str(bundle), str(tmp_path / "nope.jpg"), "--out", str(tmp_path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_the_caption_names_the_differential_of_a_bundle():
    from skinray.explain import caption_lines

    answer = {
        "label": "Eczema",
        "confidence": 0.52,
        "top_k": [{"label": "Eczema", "probability": 0.52}, {"label": "Psoriasis", "probability": 0.3}],
        "differential": ["Eczema", "Psoriasis"],
        "abstained": False,
    }
    assert caption_lines(answer, "v1") == [
        "Eczema (52% confidence)",
        "top: Eczema 52%, Psoriasis 30%",
        "differential: Eczema, Psoriasis",
        "model v1",
    ]
    assert "differential" not in " ".join(caption_lines(answer | {"differential": None}, "v1"))
    refused = answer | {
        "abstained": True,
        "differential": [],
        "out_of_distribution": True,
        "reason": "not like the images this model knows",
    }
    assert caption_lines(refused, "v1")[0] == (
        "not answered: not like the images this model knows (most likely Eczema, 52%)"
    )
    assert "differential" not in " ".join(caption_lines(refused, "v1"))
