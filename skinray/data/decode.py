"""Bytes -> upright RGB image, or a `DecodeError` that says why not.

Sits between the catalog (which lists files) and augment (which warps pixels). `ray.data.read_images`
stops the whole dataset at the first bad file; skinray decodes bytes itself so that a truncated,
empty or non-image file becomes a recorded failure with its reason, never a crash or a silent drop.

Decoding is the most expensive step of ingest, so it decodes no more pixels than the output needs:
JPEGs are decoded at a reduced scale (libjpeg's DCT scaling via Pillow `draft`), and any image still
at least twice the needed size is box-reduced before the single resampling warp in `augment`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Every format Pillow reads that a photo archive plausibly holds; matched case-insensitively.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)
DEFAULT_MAX_PIXELS = 80_000_000
# Transparent pixels are composited onto white: a cut-out lesion photo on white looks like a
# photo on a white sheet, whereas dropping alpha shows whatever colour the encoder left behind.
BACKGROUND = (255, 255, 255)


class DecodeError(Exception):
    """The bytes are not a usable image; `reason` says why in words a user can act on."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def decode(data: bytes, min_size: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes image bytes to an upright RGB image.

    Args:
        data: the file's bytes, in any format Pillow reads (the first frame of an animation).
        min_size: the smallest side the caller needs. Both sides of the result stay at least this
            large, but the image may be decoded smaller than stored. None keeps full resolution.
        max_pixels: refuse images whose header claims more pixels than this.

    Raises:
        DecodeError: empty, unrecognised, oversized, truncated or corrupt data.

    Example:
        >>> image = decode(open("photo.jpg", "rb").read(), min_size=224)
    """
    image = _open(data, max_pixels)
    if min_size and image.format == "JPEG":
        image.draft(None, (min_size, min_size))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"corrupt image data: {exc}") from None
    image = to_rgb(image)
    if min_size:
        factor = min(image.size) // min_size
        if factor >= 2:
            image = image.reduce(factor)
    return image


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # Our own limit below decides; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not an image: format not recognised") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"unreadable image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise DecodeError(f"image claims an empty size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            f"decompression bomb refused: image claims {width}x{height} pixels, over the limit "
            f"of {max_pixels:,} (data.max_pixels)"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB, scaling high bit depths and compositing alpha."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image)), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Maps 16-bit, 32-bit integer or float grey levels to 0..255 by their nominal range."""
    if values.dtype.kind == "f":
        peak = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        return np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8)
    peak = 65535 if values.dtype.itemsize >= 2 and values.max(initial=0) > 255 else 255
    return (values.astype(np.uint32) * 255 // peak).clip(0, 255).astype(np.uint8)


def is_image_name(name: str) -> bool:
    """True when a file name has an image extension (case-insensitive)."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_EXTENSIONS
