"""Augmentation parameters -> ONE affine warp from the decoded image to the model's input size.

Sits between decode (an upright RGB image of any size) and the Ray Data pipeline (fixed-shape uint8
batches). The seed notebook's ImageDataGenerator resized each image, then resampled it again for the
augmentation; here rotation, shear, zoom, shifts, flip and the resize are composed into a single
3x3 matrix, so every output pixel is interpolated exactly once from the decoded pixels.

Each augmentation is a small named function returning a matrix that maps output coordinates to input
coordinates (as Keras' `apply_affine_transform` does), in pixel units centred on the image, with
pixel i covering [i, i + 1). OpenCV does the one resampling. Evaluation, bulk scoring and serving
use `resize`, the same warp with the identity parameters, so every path produces the same pixels
for the same image.

Note: ImageDataGenerator's `shear_range` is an angle in degrees (0.2 degrees in the seed notebook, a
no-op); skinray's `shear` is the shear factor (0.2 ~ 11 degrees), as Keras 3's RandomShear uses it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from skinray.config import AugmentConfig

# Ray Data gives each task one CPU; OpenCV's own thread pool would only oversubscribe it.
cv2.setNumThreads(1)
# OpenCV puts pixel centres on integers, skinray's matrices on half-integers.
_TO_CENTRES = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
_FROM_CENTRES = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class AffineParams:
    """One image's draw of augmentation parameters. The defaults are the identity."""

    rotation: float = 0.0  # degrees
    shear: float = 0.0  # shear factor along x
    zoom_x: float = 1.0  # < 1 zooms in, as in Keras
    zoom_y: float = 1.0
    shift_x: float = 0.0  # fraction of the output width
    shift_y: float = 0.0  # fraction of the output height
    flip: bool = False  # left-right


IDENTITY = AffineParams()


def image_seed(seed: int, epoch: int, key: str) -> np.random.Generator:
    """A generator determined by (seed, epoch, image key) alone, the same in every process."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode("utf-8"))])


def sample_params(cfg: AugmentConfig, rng: np.random.Generator) -> AffineParams:
    """Draws one image's parameters from the configured ranges."""
    u = rng.uniform(-1.0, 1.0, size=6)
    return AffineParams(
        rotation=cfg.rotation * u[0],
        shear=cfg.shear * u[1],
        zoom_x=1.0 + cfg.zoom * u[2],
        zoom_y=1.0 + cfg.zoom * u[3],
        shift_x=cfg.width_shift * u[4],
        shift_y=cfg.height_shift * u[5],
        flip=bool(cfg.horizontal_flip and rng.random() < 0.5),
    )


# === The named transforms (output -> input, centred pixel coordinates) ===


def rotation(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def shear(factor: float) -> np.ndarray:
    return np.array([[1.0, factor, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def zoom(zx: float, zy: float) -> np.ndarray:
    return np.diag([zx, zy, 1.0])


def shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def flip(enabled: bool) -> np.ndarray:
    return np.diag([-1.0 if enabled else 1.0, 1.0, 1.0])


def affine_matrix(params: AffineParams, size: int, source_size: tuple[int, int]) -> np.ndarray:
    """The one matrix taking output pixel coordinates to source pixel coordinates.

    The augmentation acts in the coordinates of the resized (size x size) image, as it did in the
    seed notebook; the final factor maps those to the decoded image, whatever its size.
    """
    width, height = source_size
    half = size / 2.0
    augmentation = (
        rotation(params.rotation)
        @ shift(params.shift_x * size, params.shift_y * size)
        @ shear(params.shear)
        @ zoom(params.zoom_x, params.zoom_y)
        @ flip(params.flip)
    )
    to_source = np.diag([width / size, height / size, 1.0])
    return to_source @ shift(half, half) @ augmentation @ shift(-half, -half)


def warp(image: Image.Image, params: AffineParams, size: int) -> np.ndarray:
    """Resamples an RGB image once, bilinearly, to a (size, size, 3) uint8 array.

    OpenCV's warpAffine does the resampling: on the decoded sizes ingest sees it is about 2.5x
    faster than Pillow's `Image.transform`, and the warp is a third of the per-image cost.
    """
    pixels = np.asarray(image)
    matrix = _FROM_CENTRES @ affine_matrix(params, size, image.size) @ _TO_CENTRES
    return cv2.warpAffine(
        pixels,
        matrix[:2],
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        # Outside the image: the nearest edge pixel, as ImageDataGenerator's fill_mode="nearest".
        borderMode=cv2.BORDER_REPLICATE,
    )


def resize(image: Image.Image, size: int) -> np.ndarray:
    """The evaluation path: the same warp with no augmentation."""
    return warp(image, IDENTITY, size)
