"""A deterministic, learnable sample archive in DermNet's layout: the demo's and the tests' data.

DermNet itself needs a Kaggle account and network access; this writes photos of realistic size
(480 to 1024 px a side, varied aspect ratios, one in eight a PNG) under `train/<class>/` and
`test/<class>/`, with the 23 class folder names exactly as Kaggle spells them. Each class draws its
lesions in its own colour, texture and shape on a textured skin background, so that a small CNN can
learn the classes even through the seed notebook's strong augmentation. `metadata.csv` records
each photo's skin tone (`skin_tone`, 1 lightest to 4 darkest), which `skinray evaluate --by
skin_tone` reports by. The same seed writes the same bytes.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from skinray import UserError

DERMNET_CLASSES = (
    "Acne and Rosacea Photos",
    "Actinic Keratosis Basal Cell Carcinoma and other Malignant Lesions",
    "Atopic Dermatitis Photos",
    "Bullous Disease Photos",
    "Cellulitis Impetigo and other Bacterial Infections",
    "Eczema Photos",
    "Exanthems and Drug Eruptions",
    "Hair Loss Photos Alopecia and other Hair Diseases",
    "Herpes HPV and other STDs Photos",
    "Light Diseases and Disorders of Pigmentation",
    "Lupus and other Connective Tissue diseases",
    "Melanoma Skin Cancer Nevi and Moles",
    "Nail Fungus and other Nail Disease",
    "Poison Ivy Photos and other Contact Dermatitis",
    "Psoriasis pictures Lichen Planus and related diseases",
    "Scabies Lyme Disease and other Infestations and Bites",
    "Seborrheic Keratoses and other Benign Tumors",
    "Systemic Disease",
    "Tinea Ringworm Candidiasis and other Fungal Infections",
    "Urticaria Hives",
    "Vascular Tumors",
    "Vasculitis Photos",
    "Warts Molluscum and other Viral Infections",
)
PATTERNS = ("blob", "spots", "ring", "stripes")
SKIN_TONES = ((234, 192, 160), (210, 160, 120), (170, 120, 85), (120, 80, 55))


def class_style(index: int) -> tuple[tuple[int, int, int], str]:
    """A class's lesion colour and pattern: hues a golden angle apart, so any prefix of the class
    list (`--classes K`) is as distinct as possible."""
    hue = (index * 137.508) % 360 / 360
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.75)
    return (int(r * 255), int(g * 255), int(b * 255)), PATTERNS[index % len(PATTERNS)]


def render(index: int, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """One photo of class `index`: skin background, then the class's lesions; and the skin tone
    drawn (an index into SKIN_TONES, lightest first)."""
    width, height = (int(v) for v in rng.integers(480, 1025, size=2))
    tone_index = int(rng.integers(len(SKIN_TONES)))
    tone = np.array(SKIN_TONES[tone_index], dtype=np.float32)
    # Low-frequency shading plus fine grain: texture that is not the class signal.
    shade = rng.normal(0, 12, size=(height // 32 + 1, width // 32 + 1)).astype(np.float32)
    shade = np.asarray(Image.fromarray(shade, "F").resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 6, size=(height, width)).astype(np.float32)
    background = np.clip(tone[None, None, :] + (shade + grain)[..., None], 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")

    colour, pattern = class_style(index)
    jitter = rng.integers(-20, 21, size=3)
    colour = tuple(int(c) for c in np.clip(np.array(colour) + jitter, 0, 255))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
        r = rng.uniform(0.12, 0.22) * side
        _draw_lesion(draw, pattern, colour, cx, cy, r, rng)
    return image.filter(ImageFilter.GaussianBlur(radius=1.5)), tone_index


def _draw_lesion(draw, pattern, colour, cx, cy, r, rng) -> None:
    if pattern == "blob":
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        radii = r * rng.uniform(0.7, 1.1, size=angles.size)
        draw.polygon([(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(radii, angles)], fill=colour)
    elif pattern == "spots":
        for _ in range(int(rng.integers(12, 25))):
            x, y = cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)
            s = rng.uniform(0.06, 0.14) * r
            draw.ellipse([x - s, y - s, x + s, y + s], fill=colour)
    elif pattern == "ring":
        draw.ellipse(
            [cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], outline=colour, width=max(4, int(r * 0.25))
        )
    else:  # stripes
        for k in range(-3, 4):
            off = k * r * 0.3
            draw.line(
                [cx - r, cy + off - r * 0.4, cx + r, cy + off + r * 0.4],
                fill=colour,
                width=max(3, int(r * 0.12)),
            )


def write_sample(
    dest: str | Path, per_class: int = 40, classes: int = 23, seed: int = 0, test_fraction: float = 0.25
) -> dict[str, int]:
    """Writes the sample archive; returns the number of images written per split.

    `per_class` training images per class and round(per_class * test_fraction) test images (at
    least one). Files that already exist with the same name are rewritten identically.

    Example:
        >>> write_sample("data/sample", per_class=20, classes=4)
        {'train': 80, 'test': 20}
    """
    if not 1 <= classes <= len(DERMNET_CLASSES):
        raise UserError(f"--classes must be between 1 and {len(DERMNET_CLASSES)}, got {classes}")
    if per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {per_class}")
    dest = Path(dest)
    counts = {"train": per_class, "test": max(1, round(per_class * test_fraction))}
    metadata = []  # metadata.csv: each photo's skin tone, 1 (lightest) to 4 (what evaluate --by reads)
    for split_id, (split, n) in enumerate(counts.items()):
        for index, name in enumerate(DERMNET_CLASSES[:classes]):
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, index, i])
                image, tone = render(index, rng)
                file_name = f"{split}_{index:02d}_{i:04d}.{'png' if i % 8 == 7 else 'jpg'}"
                if i % 8 == 7:
                    image.save(folder / file_name, optimize=False)
                else:
                    image.save(folder / file_name, quality=90)
                metadata.append(f'"{split}/{name}/{file_name}",{tone + 1}')
    (dest / "metadata.csv").write_text("path,skin_tone\n" + "\n".join(metadata) + "\n")
    return {split: n * classes for split, n in counts.items()}
