import io

import numpy as np
import pytest
from corpus import CASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from skinray.data.decode import FORMATS, DecodeError, decode, is_image_name


def _decode_case(awkward_files, case, **kw):
    return decode(awkward_files[case].read_bytes(), **kw)


@pytest.mark.parametrize("case", [c for c, (_, _, expect) in CASES.items() if expect != "ok"])
def test_bad_files_raise_with_reason(awkward_files, case):
    with pytest.raises(DecodeError) as err:
        _decode_case(awkward_files, case)
    assert CASES[case][2] in err.value.reason


def test_bomb_under_pillows_limit_is_refused_by_ours():
    from corpus import bomb_png

    with pytest.raises(DecodeError, match="12000x8000"):
        decode(bomb_png(12_000, 8_000))  # 96 MP: past skinray's 80 MP default, not Pillow's


def test_png_named_jpg_decodes_by_content(awkward_files):
    image = _decode_case(awkward_files, "png_as_jpg")
    assert image.mode == "RGB" and image.size == (120, 80)
    assert np.asarray(image)[40, 60].tolist() == [220, 30, 30]


def test_cmyk_jpeg_becomes_the_same_rgb_colour(awkward_files):
    pixel = np.asarray(_decode_case(awkward_files, "cmyk_jpeg"))[40, 60].astype(int)
    assert np.abs(pixel - [220, 30, 30]).max() <= 8


def test_16bit_png_is_scaled_not_clipped(awkward_files):
    grey = np.asarray(_decode_case(awkward_files, "png_16bit"))
    assert grey.dtype == np.uint8 and grey.shape == (16, 64, 3)
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[0, -1].tolist() == [255, 255, 255]
    assert 120 <= grey[0, 32, 0] <= 136  # mid-grey stays mid-grey (clipping would give 255)


def test_transparency_is_composited_on_white(awkward_files):
    pixels = np.asarray(_decode_case(awkward_files, "palette_transparent"))
    assert pixels[16, 5].tolist() == [255, 255, 255]
    assert pixels[16, 50].tolist() == [0, 200, 0]


def test_animated_gif_gives_first_frame(awkward_files):
    pixel = np.asarray(_decode_case(awkward_files, "animated_gif"))[20, 20].astype(int)
    assert pixel[0] > 200 and pixel[2] < 50


def test_exif_orientation_is_applied(awkward_files):
    image = _decode_case(awkward_files, "exif_rotated")
    pixels = np.asarray(image).astype(int)
    assert image.size == (100, 200)  # upright: portrait
    assert pixels[20, 50, 2] > 200 and pixels[20, 50, 0] < 60  # blue on top
    assert pixels[180, 50, 0] > 200 and pixels[180, 50, 2] < 60  # yellow below


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "1", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new("RGB", (32, 24), (90, 90, 90)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, "TIFF")
    out = decode(buf.getvalue())
    assert out.mode == "RGB" and out.size == (32, 24)


def test_large_jpeg_is_decoded_reduced_but_never_below_the_target():
    big = Image.new("RGB", (2000, 1500), (10, 120, 200))
    buf = io.BytesIO()
    big.save(buf, "JPEG")
    out = decode(buf.getvalue(), min_size=224)
    assert min(out.size) >= 224 and max(out.size) < 1000
    full = decode(buf.getvalue())
    assert full.size == (2000, 1500)


def test_large_png_is_box_reduced_to_within_twice_the_target():
    buf = io.BytesIO()
    Image.new("RGB", (1200, 900), (10, 120, 200)).save(buf, "PNG")
    out = decode(buf.getvalue(), min_size=100)
    assert 100 <= min(out.size) < 200


def test_pixel_limit_is_configurable():
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, "PNG")
    with pytest.raises(DecodeError, match="100x100"):
        decode(buf.getvalue(), max_pixels=5_000)


def test_image_names_are_matched_case_insensitively():
    assert is_image_name("a.JPG") and is_image_name("b.Png") and is_image_name("c.tiff")
    assert not is_image_name("notes.txt") and not is_image_name("README")


# === Any file, any bytes: an image or a DecodeError, never another exception ===


def _every_format_pillow_writes() -> dict[str, bytes]:
    """One small image in each format this Pillow can write (in the first mode it takes)."""
    Image.init()
    files = {}
    for name in sorted(Image.SAVE):
        for mode in ("RGB", "L", "RGBA", "1"):
            buffer = io.BytesIO()
            try:
                Image.new(mode, (40, 30), 120).save(buffer, name)
            except Exception:  # this format does not take this mode, or cannot be written here
                continue
            files[name] = buffer.getvalue()
            break
    return files


WRITTEN = _every_format_pillow_writes()


def _decodes_or_refuses(data: bytes):
    """decode() gives an RGB image or raises DecodeError with a reason; anything else fails the test."""
    try:
        image = decode(data, min_size=16)
    except DecodeError as exc:
        assert exc.reason
        return None
    assert image.mode == "RGB" and min(image.size) >= 1
    return image


def test_the_corpus_covers_pillows_writers_and_every_format_we_read():
    assert set(FORMATS) | {"DDS", "TGA", "PPM", "ICO", "JPEG2000"} <= set(WRITTEN)


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_each_format_decodes_only_if_we_read_it(name):
    image = _decodes_or_refuses(WRITTEN[name])
    assert (image is not None) == (name in FORMATS), name
    if image is None:
        with pytest.raises(DecodeError, match="not an image skinray reads"):
            decode(WRITTEN[name])


@pytest.mark.parametrize("name", sorted(WRITTEN))
def test_each_format_truncated_or_with_a_corrupt_header_is_that_files_error(name):
    data = WRITTEN[name]
    for length in (1, 8, 16, 32, 64, len(data) // 2, len(data) - 1):
        _decodes_or_refuses(data[:length])
    for start in range(0, min(len(data), 96), 5):
        corrupt = bytearray(data)
        corrupt[start : start + 3] = bytes(b ^ 0xA5 for b in corrupt[start : start + 3])
        _decodes_or_refuses(bytes(corrupt))


MAGICS = [data[:16] for data in WRITTEN.values()]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_never_escape_as_another_exception(data):
    _decodes_or_refuses(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MAGICS), st.binary(max_size=4096))
def test_a_known_header_with_random_bytes_after_it_never_escapes(magic, rest):
    _decodes_or_refuses(magic + rest)


# === Memory: what one decode holds, which the endpoint's decode slots are sized by ===

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large process starts high.
PEAK_PROBE = """
import sys
from skinray.data.decode import decode
def peak():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
data, small = (open(path, "rb").read() for path in sys.argv[1:3])
decode(small, min_size=16)  # the decoders loaded
before = peak()
image = decode(data, min_size=224)
print((peak() - before) / 6e6)
"""


@pytest.mark.parametrize(
    "mode, fmt", [("RGBA", "WEBP"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("RGB", "JPEG")]
)
def test_one_decode_holds_at_most_peak_bytes_per_pixel(mode, fmt, tmp_path):
    """The growth of a fresh process's peak resident set while one 6 MP image decodes, per pixel."""
    import subprocess
    import sys

    from skinray.data.decode import PEAK_BYTES_PER_PIXEL

    image = Image.new(mode, (3000, 2000), 1 if mode == "P" else (200, 90, 60, 200)[: len(mode)])
    if mode == "P":
        image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    image.save(tmp_path / "big", fmt, **({"transparency": 0} if mode == "P" else {}))
    Image.new("RGB", (64, 64)).save(tmp_path / "small.png")
    out = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, str(tmp_path / "big"), str(tmp_path / "small.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    per_pixel = float(out.stdout)
    assert per_pixel <= PEAK_BYTES_PER_PIXEL, f"{mode} {fmt}: {per_pixel:.1f} bytes per pixel"
    if (mode, fmt) == ("RGBA", "WEBP"):  # the worst case the bound was measured on: the probe sees it
        assert per_pixel > PEAK_BYTES_PER_PIXEL / 2
