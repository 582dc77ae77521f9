"""Classical fills that users would otherwise reach for; `inpaint eval --baselines` scores them.

Every fill takes a uint8 HxWx3 RGB image and a bool HxW mask (True = hole) and returns a new
uint8 HxWx3 image whose known pixels are exactly the input's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Neighbourhood radius in pixels for OpenCV's fills; 3 is OpenCV's documented example value.
OPENCV_RADIUS = 3
# What a fill with no known pixels to go on returns: the middle of the range.
_NO_CONTEXT_GREY = 128


def _check(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    hole = np.asarray(mask, dtype=bool)
    if hole.shape != image.shape[:2]:
        raise ValueError(f"mask {hole.shape} does not match image {image.shape[:2]}")
    return hole


def _keep_known(filled: np.ndarray, image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    return np.where(hole[..., None], filled, image).astype(np.uint8)


def mean_colour_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill the hole with the mean colour of the known pixels."""
    hole = _check(image, mask)
    known = image[~hole]
    if known.size == 0:
        colour = np.full(3, _NO_CONTEXT_GREY, dtype=np.uint8)
    else:
        colour = np.clip(np.round(known.astype(np.float64).mean(axis=0)), 0, 255).astype(np.uint8)
    filled = np.broadcast_to(colour, image.shape)
    return _keep_known(filled, image, hole)


def _opencv_fill(image: np.ndarray, mask: np.ndarray, method: int, radius: int) -> np.ndarray:
    import cv2

    hole = _check(image, mask)
    if not hole.any():
        return image.copy()
    if hole.all():
        return mean_colour_fill(image, hole)
    # OpenCV treats the channels alike, so RGB order needs no conversion to BGR.
    filled = cv2.inpaint(
        np.ascontiguousarray(image), hole.astype(np.uint8) * 255, float(radius), method
    )
    return _keep_known(filled, image, hole)


def telea_fill(image: np.ndarray, mask: np.ndarray, radius: int = OPENCV_RADIUS) -> np.ndarray:
    """OpenCV's fast-marching fill (Telea 2004)."""
    import cv2

    return _opencv_fill(image, mask, cv2.INPAINT_TELEA, radius)


def navier_stokes_fill(
    image: np.ndarray, mask: np.ndarray, radius: int = OPENCV_RADIUS
) -> np.ndarray:
    """OpenCV's Navier-Stokes fill (Bertalmio et al. 2001)."""
    import cv2

    return _opencv_fill(image, mask, cv2.INPAINT_NS, radius)


def biharmonic_fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """scikit-image's biharmonic fill: the smoothest surface through the known border."""
    from skimage.restoration import inpaint_biharmonic

    hole = _check(image, mask)
    if not hole.any():
        return image.copy()
    if hole.all():
        return mean_colour_fill(image, hole)
    filled = inpaint_biharmonic(image.astype(np.float64) / 255.0, hole, channel_axis=-1)
    filled = np.clip(np.round(filled * 255.0), 0, 255)
    return _keep_known(filled, image, hole)


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "mean-colour": mean_colour_fill,
    "telea": telea_fill,
    "navier-stokes": navier_stokes_fill,
    "biharmonic": biharmonic_fill,
}
