import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from skinray.config import AugmentConfig
from skinray.data.augment import IDENTITY, AffineParams, image_seed, resize, sample_params, warp


@pytest.fixture
def square():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_identity_at_the_same_size_returns_the_pixels(square):
    assert np.array_equal(resize(square, 64), np.asarray(square))


def test_flip_twice_is_identity(square):
    once = warp(square, AffineParams(flip=True), 64)
    assert np.array_equal(once, np.asarray(square)[:, ::-1])
    assert np.array_equal(warp(Image.fromarray(once), AffineParams(flip=True), 64), np.asarray(square))


def test_zero_parameters_equal_a_plain_resize(square):
    plain = np.asarray(square.resize((128, 128), Image.Resampling.BILINEAR)).astype(int)
    ours = warp(square, AffineParams(), 128).astype(int)
    assert np.abs(ours - plain).max() <= 1
    assert np.array_equal(ours, resize(square, 128))


def test_rotation_by_90_degrees_rotates_the_pixels(square):
    turned = warp(square, AffineParams(rotation=90), 64).astype(int)
    # Pixel centres land on pixel centres; only float rounding (cos 90 = 6e-17) may move a level.
    assert np.abs(turned - np.rot90(np.asarray(square), k=1)).max() <= 1


def test_shift_moves_content_and_fills_with_the_nearest_edge():
    a = np.zeros((100, 100, 3), np.uint8)
    a[:, :, 0] = np.arange(100, dtype=np.uint8)[None, :]  # red = column index
    shifted = warp(Image.fromarray(a), AffineParams(shift_x=0.25), 100)
    # Output->input mapping: a positive shift samples 25 px further right...
    assert shifted[50, 10, 0] == 35 and shifted[50, 70, 0] == 95
    # ...and past the right edge repeats the edge column, as fill_mode="nearest".
    assert (shifted[:, 80:, 0] == 99).all()


def test_zoom_below_one_magnifies_the_centre():
    a = np.zeros((100, 100, 3), np.uint8)
    a[40:60, 40:60] = 255  # a 20 px white centre square
    zoomed = warp(Image.fromarray(a), AffineParams(zoom_x=0.5, zoom_y=0.5), 100)
    white = np.argwhere(zoomed[..., 0] > 128)
    extent = white.max(axis=0) - white.min(axis=0) + 1
    assert 38 <= extent[0] <= 42 and 38 <= extent[1] <= 42


def test_shear_slants_a_vertical_line():
    a = np.zeros((100, 100, 3), np.uint8)
    a[:, 49:51] = 255
    sheared = warp(Image.fromarray(a), AffineParams(shear=0.2), 100)
    top = np.argwhere(sheared[5, :, 0] > 128).mean()
    bottom = np.argwhere(sheared[95, :, 0] > 128).mean()
    assert abs((top - bottom) / 90) == pytest.approx(0.2, abs=0.03)


def test_resize_maps_any_aspect_ratio_to_a_square():
    out = resize(Image.new("RGB", (300, 120), (1, 2, 3)), 48)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    assert out[24, 24].tolist() == [1, 2, 3]


def test_draws_are_reproducible_per_seed_epoch_and_image():
    cfg = AugmentConfig()
    a = sample_params(cfg, image_seed(1, 3, "x/a.jpg"))
    assert a == sample_params(cfg, image_seed(1, 3, "x/a.jpg"))
    assert a != sample_params(cfg, image_seed(1, 4, "x/a.jpg"))
    assert a != sample_params(cfg, image_seed(1, 3, "x/b.jpg"))
    assert a != sample_params(cfg, image_seed(2, 3, "x/a.jpg"))


def test_draws_stay_in_the_configured_ranges():
    cfg = AugmentConfig(rotation=10, shear=0.1, zoom=0.2, width_shift=0.05, height_shift=0.1)
    draws = [sample_params(cfg, image_seed(0, 0, str(i))) for i in range(300)]
    assert max(abs(p.rotation) for p in draws) <= 10
    assert max(abs(p.shear) for p in draws) <= 0.1
    assert all(0.8 <= p.zoom_x <= 1.2 and 0.8 <= p.zoom_y <= 1.2 for p in draws)
    assert max(abs(p.shift_x) for p in draws) <= 0.05
    assert 0.3 < np.mean([p.flip for p in draws]) < 0.7
    none = AugmentConfig(rotation=0, shear=0, zoom=0, width_shift=0, height_shift=0, horizontal_flip=False)
    assert sample_params(none, image_seed(0, 0, "a")) == IDENTITY


def test_augmentation_inside_a_ray_dataset_equals_the_eager_call(ray_cluster, tmp_path):
    """The same function, eagerly and inside a 4-row Ray Dataset, gives the same pixels."""
    import pyarrow.fs as pafs

    from skinray.data.ingest import ImageSource, iter_stream, load_batch, stream

    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    table = pa.table(
        {
            "path": paths,
            "label": ["a"] * 4,
            "label_index": pa.array([0, 1, 0, 1], pa.int32()),
            "epoch": pa.array([2] * 4, pa.int32()),
        }
    )
    source = ImageSource(pafs.LocalFileSystem())
    cfg = AugmentConfig()
    eager = load_batch(
        {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names},
        source=source,
        size=48,
        augment=cfg,
        seed=7,
    )
    batches = list(iter_stream(stream(table, source=source, size=48, batch_size=2, augment=cfg, seed=7), 2))
    piped = {p: img for b in batches for p, img in zip(b["path"], b["image"])}
    assert sum(len(b["path"]) for b in batches) == 4
    for path, image in zip(eager["path"], eager["image"]):
        assert np.array_equal(piped[path], image)
