"""Bytes -> upright RGB image, or a `DecodeError` that says why not.

Sits between the catalog (which lists files) and augment (which warps pixels). `ray.data.read_images`
stops the whole dataset at the first bad file; skinray decodes bytes itself so that a truncated,
empty or non-image file becomes a recorded failure with its reason, never a crash or a silent drop.

Only the formats in `FORMATS` are opened, whatever a file is called: Pillow knows some forty, and
each exotic decoder is one more way for one file to fail in a way nobody tested (a 128-byte DDS file
raised NotImplementedError and stopped whole scoring jobs). Any exception while decoding one file is
that file's `DecodeError`, never the caller's crash.

Decoding is the most expensive step of ingest, so it decodes no more pixels than the output needs:
JPEGs are decoded at a reduced scale (libjpeg's DCT scaling via Pillow `draft`), and any image still
at least twice the needed size is box-reduced, before mode conversion and alpha compositing (which
copy the image) and before the single resampling warp in `augment`. At most `PEAK_BYTES_PER_PIXEL`
bytes per pixel the header claims are held at once (tests/test_decode.py measures it), which is
what the endpoint's memory budget is sized by.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The formats skinray reads (Pillow's names) and the file extensions each goes by. The one list:
# the catalog's file filter, the decoder's `Image.open(formats=...)` and `data check`'s misnamed-file
# report all read it.
FORMATS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (".jpg", ".jpeg"),  # a camera JPEG with a second picture: opened by the JPEG opener
    "PNG": (".png",),
    "WEBP": (".webp",),
    "BMP": (".bmp",),
    "TIFF": (".tif", ".tiff"),
    "GIF": (".gif",),
}
IMAGE_EXTENSIONS = frozenset(ext for extensions in FORMATS.values() for ext in extensions)
OPENERS = [name for name in FORMATS if name != "MPO"]
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, TIFF or GIF"
DEFAULT_MAX_PIXELS = 80_000_000
# The most memory one decode holds, per pixel the header claims, with a margin for the allocator
# (measured by tests/test_decode.py): an RGBA WebP (libwebp's buffer, Pillow's copy, the
# premultiplied copy `reduce` makes) 16.7; PNGs with alpha or a palette 8-9; RGB PNG 4; JPEG ~0.2.
PEAK_BYTES_PER_PIXEL = 20
# Modes Pillow's `reduce` averages correctly; others are converted first (palette indices and
# 1-bit pixels cannot be averaged, and 16-bit greys are not supported).
REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F"})
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
        DecodeError: empty, unrecognised, oversized, truncated or corrupt data, a format skinray
            does not read, or any other failure of the decoder on these bytes.

    Example:
        >>> image = decode(open("photo.jpg", "rb").read(), min_size=224)
    """
    image = open_image(data, max_pixels)
    try:
        with _quiet():
            if min_size and image.format in ("JPEG", "MPO"):
                image.draft(None, (min_size, min_size))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            if min_size:
                image = _reduce(image, min_size)
            return to_rgb(image)
    except Exception as exc:  # any failure on these bytes is this file's, whatever the decoder raised
        raise DecodeError(f"corrupt image data: {_describe(exc)}") from None


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parses the header only (`image.format` says which of `FORMATS` it is); raises DecodeError."""
    if not data:
        raise DecodeError("empty file")
    try:
        with _quiet():
            image = Image.open(io.BytesIO(data), formats=OPENERS)
    except UnidentifiedImageError:
        raise DecodeError(f"not an image skinray reads: not {FORMAT_NAMES}") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb refused: {exc}") from None
    except Exception as exc:
        raise DecodeError(f"unreadable image header: {_describe(exc)}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise DecodeError(f"image claims an empty size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(
            f"decompression bomb refused: image claims {width}x{height} pixels, over the limit "
            f"of {max_pixels:,} (data.max_pixels; the endpoint's is serve.max_pixels)"
        )
    return image


@contextlib.contextmanager
def _quiet():
    """Pillow's warnings while decoding one file: its bomb warning (our own limit decides) and its
    per-file complaints (corrupt EXIF, ...), which a bulk job would print once per file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
        yield


def _reduce(image: Image.Image, min_size: int) -> Image.Image:
    """Box-reduces by the largest whole factor that keeps both sides at least `min_size`."""
    factor = min(image.size) // min_size
    if factor < 2:
        return image
    if image.mode not in REDUCIBLE_MODES:
        image = image.convert(_reducible_mode(image))
    return image.reduce(factor)


def _reducible_mode(image: Image.Image) -> str:
    if image.mode.startswith("I"):
        return "I"
    if image.mode in ("PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        return "RGBA"
    return "L" if image.mode == "1" else "RGB"


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def format_matches(name: str, image_format: str) -> bool:
    """True when a file's extension is one its content's format goes by."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in FORMATS.get(image_format, ())


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
