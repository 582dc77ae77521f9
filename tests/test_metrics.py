"""Hole metrics and the paired bootstrap, on cases whose answers can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inpaint_cli.metrics import (
    hole_diversity,
    hole_l1,
    hole_mse,
    hole_psnr,
    hole_ssim,
    paired_bootstrap_interval,
)


def _textured_image(size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _center_mask(size: int = 32) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
    return mask


def test_identical_images_score_perfectly() -> None:
    image = _textured_image()
    mask = _center_mask()
    assert hole_psnr(image, image, mask) == math.inf
    assert hole_psnr(image, image, mask, max_db=100.0) == 100.0
    assert hole_ssim(image, image, mask) == pytest.approx(1.0)
    assert hole_l1(image, image, mask) == 0.0


def test_constant_offset_in_hole_gives_known_psnr_and_l1() -> None:
    target = np.full((16, 16, 3), 100, dtype=np.uint8)
    mask = _center_mask(16)
    prediction = target.copy()
    prediction[mask] += 10
    # Known pixels differ wildly but must not count.
    prediction[~mask] = 0
    assert hole_mse(prediction, target, mask) == pytest.approx(100.0)
    assert hole_psnr(prediction, target, mask) == pytest.approx(10 * math.log10(255**2 / 100))
    assert hole_l1(prediction, target, mask) == pytest.approx(10 / 255)


def test_ssim_over_a_thin_stroke_differs_from_whole_image_ssim() -> None:
    from skimage.metrics import structural_similarity

    target = _textured_image(32, seed=1)
    mask = np.zeros((32, 32), dtype=bool)
    mask[15:17, 2:30] = True  # a 2-pixel stroke
    prediction = target.copy()
    prediction[mask] = 128
    whole = structural_similarity(
        prediction,
        target,
        data_range=255,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    on_stroke = hole_ssim(prediction, target, mask)
    # Known pixels around the stroke are untouched, so the whole-image score stays high while
    # the stroke itself is badly filled.
    assert whole > 0.9
    assert on_stroke < whole - 0.2


def test_worse_fill_scores_worse() -> None:
    target = _textured_image(32, seed=2)
    mask = _center_mask()
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 1, size=target.shape)
    slightly_off = np.clip(target + 5 * noise, 0, 255).astype(np.uint8)
    very_off = np.clip(target + 60 * noise, 0, 255).astype(np.uint8)
    assert hole_psnr(slightly_off, target, mask) > hole_psnr(very_off, target, mask)
    assert hole_ssim(slightly_off, target, mask) > hole_ssim(very_off, target, mask)
    assert hole_l1(slightly_off, target, mask) < hole_l1(very_off, target, mask)


def test_shape_mismatch_and_empty_hole_are_rejected() -> None:
    image = _textured_image(16)
    with pytest.raises(ValueError):
        hole_psnr(image, image, np.zeros((16, 16), dtype=bool))
    with pytest.raises(ValueError):
        hole_l1(image, image, np.ones((8, 8), dtype=bool))


def test_diversity_is_mean_pairwise_l1_over_the_hole() -> None:
    mask = _center_mask(16)
    samples = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    samples[1][mask] = 51  # 0.2 of the range
    samples[2][mask] = 102  # 0.4
    samples[:, ~mask] = 255  # identical outside the hole: no effect
    # pairs: |0-0.2| + |0-0.4| + |0.2-0.4| = 0.8 over 3 pairs
    assert hole_diversity(samples, mask) == pytest.approx(0.8 / 3)
    assert hole_diversity(np.repeat(samples[:1], 4, axis=0), mask) == 0.0
    assert math.isnan(hole_diversity(samples[:1], mask))


def test_bootstrap_interval_covers_true_mean() -> None:
    rng = np.random.default_rng(0)
    true_mean = 0.3
    first = rng.normal(5.0, 2.0, size=400)
    second = first - rng.normal(true_mean, 1.0, size=400)
    interval = paired_bootstrap_interval(first, second, seed=1)
    assert interval.low < true_mean < interval.high
    assert interval.low < interval.mean < interval.high
    # Reproducible for a fixed seed.
    assert paired_bootstrap_interval(first, second, seed=1) == interval


def test_bootstrap_interval_excludes_zero_for_a_clear_gain_and_includes_it_for_none() -> None:
    rng = np.random.default_rng(4)
    base = rng.normal(20.0, 5.0, size=200)  # large per-image spread, cancelled by pairing
    better = base + 1.0 + rng.normal(0.0, 0.2, size=200)
    clear = paired_bootstrap_interval(better, base)
    assert clear.low > 0.0
    same = paired_bootstrap_interval(base + rng.normal(0.0, 0.2, size=200), base)
    assert same.low < 0.0 < same.high


def test_bootstrap_rejects_unpaired_input() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap_interval(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        paired_bootstrap_interval(np.zeros(0), np.zeros(0))
