"""A corpus of awkward image files, each with what decoding it must give.

Every case is a file a real archive holds sooner or later. `expect` is either "ok" (decodes to an
RGB image whose pixels the tests check) or a phrase the recorded failure reason must contain.
"""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _png(image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width=50_000, height=50_000) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def red_square(size=(120, 80)) -> Image.Image:
    return Image.new("RGB", size, (220, 30, 30))


def exif_rotated_jpeg() -> bytes:
    """Stored 200x100 with a blue left half; EXIF orientation 6 says 'rotate 90 degrees clockwise'
    to view, so the upright image is 100x200 with blue on top."""
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :100] = (0, 0, 255)
    a[:, 100:] = (255, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(Image.fromarray(a), exif=exif.tobytes())


def palette_png_with_transparency() -> bytes:
    """Left half transparent (palette index 0), right half opaque green (index 1)."""
    image = Image.new("P", (64, 32), 0)
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    image.paste(1, (32, 0, 64, 32))
    return _png(image, transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def png16() -> bytes:
    """A 16-bit greyscale gradient: left column 0, right column 65535."""
    values = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    return _png(Image.fromarray(values))


def dds_without_pixel_format() -> bytes:
    """A 128-byte DDS texture whose pixel-format flags are 0: Pillow identifies it by content and
    raised NotImplementedError while decoding it, whatever the file was called."""
    header = (
        struct.pack("<7I", 124, 0x1007, 16, 16, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 0) + bytes(48)
    )
    return b"DDS " + header


CASES = {
    # name: (file name, bytes factory, expect)
    "truncated_jpeg": ("truncated.jpg", lambda: _jpeg(red_square((400, 300)))[:1500], "truncated"),
    "zero_bytes": ("empty.jpg", lambda: b"", "empty file"),
    "text_as_jpg": ("notes.jpg", lambda: b"patient notes, not a picture\n" * 10, "not an image"),
    "png_as_jpg": ("really_png.jpg", lambda: _png(red_square()), "ok"),
    "cmyk_jpeg": ("cmyk.jpg", lambda: _jpeg(red_square().convert("CMYK")), "ok"),
    "png_16bit": ("grey16.png", png16, "ok"),
    "palette_transparent": ("palette.png", palette_png_with_transparency, "ok"),
    "animated_gif": ("animated.gif", animated_gif, "ok"),
    "exif_rotated": ("rotated.jpg", exif_rotated_jpeg, "ok"),
    "bomb": ("bomb.png", bomb_png, "decompression bomb"),
    "dds_as_jpg": ("texture.jpg", dds_without_pixel_format, "not an image skinray reads"),
}


def write_corpus(folder: Path, class_name: str = "Odd") -> dict[str, Path]:
    """Writes every case under folder/train/<class_name>/ and returns their paths by case."""
    target = Path(folder) / "train" / class_name
    target.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case, (name, make, _) in CASES.items():
        path = target / name
        path.write_bytes(make())
        paths[case] = path
    return paths
