"""`inpaint eval`: classical baseline fills (known pixels untouched, smooth content filled
closely) and the evaluation job."""

from __future__ import annotations

import numpy as np
import pytest

from inpaint_cli.baselines import BASELINES, biharmonic_fill, mean_colour_fill
from inpaint_cli.metrics import hole_psnr


def _gradient_image(size: int = 32) -> np.ndarray:
    ramp = np.linspace(0, 255, size)
    red = np.tile(ramp, (size, 1))
    green = red.T
    blue = (red + green) / 2
    return np.round(np.stack([red, green, blue], axis=-1)).astype(np.uint8)


def _center_mask(size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    return mask


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_known_pixels_are_exact_and_input_unchanged(name: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    mask = rng.random((24, 24)) < 0.3
    before = image.copy()
    filled = BASELINES[name](image, mask)
    assert filled.dtype == np.uint8 and filled.shape == image.shape
    np.testing.assert_array_equal(filled[~mask], image[~mask])
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_empty_and_full_holes_do_not_fail(name: str) -> None:
    image = _gradient_image(16)
    empty = np.zeros((16, 16), dtype=bool)
    np.testing.assert_array_equal(BASELINES[name](image, empty), image)
    filled = BASELINES[name](image, ~empty)
    assert filled.shape == image.shape


def test_mean_colour_fill_uses_known_pixels_only() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    image[:, :4] = (200, 100, 50)
    image[:, 4:] = (0, 0, 0)
    mask = np.zeros((8, 8), dtype=bool)
    mask[:, 4:] = True  # the black half is the hole, so only the coloured half is known
    filled = mean_colour_fill(image, mask)
    assert tuple(filled[0, 7]) == (200, 100, 50)


def test_biharmonic_fills_a_smooth_gradient_closely() -> None:
    image = _gradient_image()
    mask = _center_mask()
    assert hole_psnr(biharmonic_fill(image, mask), image, mask) > 40.0


def test_every_fill_beats_mean_colour_on_a_gradient() -> None:
    image = _gradient_image()
    mask = _center_mask()
    mean_score = hole_psnr(mean_colour_fill(image, mask), image, mask)
    for name, fill in BASELINES.items():
        if name != "mean-colour":
            assert hole_psnr(fill(image, mask), image, mask) > mean_score + 3.0, name


def test_rejects_wrong_inputs() -> None:
    with pytest.raises(ValueError):
        mean_colour_fill(np.zeros((8, 8), dtype=np.uint8), np.zeros((8, 8), dtype=bool))
    with pytest.raises(ValueError):
        biharmonic_fill(np.zeros((8, 8, 3), dtype=np.uint8), np.zeros((4, 4), dtype=bool))
