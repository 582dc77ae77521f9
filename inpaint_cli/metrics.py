"""Scores of a fill on the hole only, and paired bootstrap intervals for comparing two fills.

Images are HxWx3 arrays (uint8 or float) on the scale 0..data_range; masks are bool HxW with
True = hole. Known pixels are never scored: a fill that copies them would otherwise look better
the smaller the hole is.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# Wang et al. (2004) SSIM settings: 11x11 Gaussian window, sigma 1.5, population covariance.
SSIM_SIGMA = 1.5
# A fill that reproduces the hole exactly has infinite PSNR; capped so that means stay finite.
PSNR_CAP_DB = 100.0
# Resampled index matrices are drawn in chunks of at most this many entries to bound memory.
_BOOTSTRAP_CHUNK_ENTRIES = 4_000_000


class MeanInterval(NamedTuple):
    """A mean with a two-sided confidence interval."""

    mean: float
    low: float
    high: float


def _check_pair(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ")
    if mask.shape != target.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {target.shape[:2]}")
    hole = np.asarray(mask, dtype=bool)
    if not hole.any():
        raise ValueError("mask has no hole pixels")
    return hole


def hole_mse(prediction: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Mean squared error over the hole pixels (all channels), on the images' own scale."""
    hole = _check_pair(prediction, target, mask)
    difference = prediction[hole].astype(np.float64) - target[hole].astype(np.float64)
    return float(np.mean(difference * difference))


def hole_psnr(
    prediction: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    data_range: float = 255.0,
    max_db: float = math.inf,
) -> float:
    """PSNR in dB over the hole pixels; `inf` for an exact fill unless capped at `max_db`."""
    mse = hole_mse(prediction, target, mask)
    if mse == 0.0:
        return float(max_db)
    return float(min(10.0 * math.log10(data_range * data_range / mse), max_db))


def hole_ssim(
    prediction: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 255.0
) -> float:
    """SSIM map of the whole image averaged over the hole pixels (and channels).

    Computing the map on the whole image lets windows around a thin stroke see its known
    neighbours, and averaging only over hole pixels keeps the untouched known pixels (SSIM 1)
    from inflating the score.
    """
    from skimage.metrics import structural_similarity

    hole = _check_pair(prediction, target, mask)
    _, ssim_map = structural_similarity(
        prediction.astype(np.float64),
        target.astype(np.float64),
        data_range=data_range,
        channel_axis=-1 if prediction.ndim == 3 else None,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
        full=True,
    )
    return float(ssim_map[hole].mean())


def hole_l1(
    prediction: np.ndarray, target: np.ndarray, mask: np.ndarray, data_range: float = 255.0
) -> float:
    """Mean absolute error over the hole pixels as a fraction of `data_range` (0 = exact)."""
    hole = _check_pair(prediction, target, mask)
    difference = prediction[hole].astype(np.float64) - target[hole].astype(np.float64)
    return float(np.mean(np.abs(difference)) / data_range)


def hole_diversity(samples: np.ndarray, mask: np.ndarray, data_range: float = 255.0) -> float:
    """Mean pairwise L1 between K samples (K x H x W x 3) over the hole, as a fraction of
    `data_range`; NaN when there are fewer than two samples."""
    hole = np.asarray(mask, dtype=bool)
    if samples.shape[1:3] != hole.shape:
        raise ValueError(f"mask {hole.shape} does not match samples {samples.shape[1:3]}")
    count = samples.shape[0]
    if count < 2:
        return math.nan
    values = samples[:, hole].astype(np.float64)  # (K, N, 3)
    total = 0.0
    for first in range(count - 1):
        total += float(np.abs(values[first + 1 :] - values[first]).mean(axis=(1, 2)).sum())
    return total / (count * (count - 1) / 2) / data_range


def paired_bootstrap_interval(
    first: np.ndarray,
    second: np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> MeanInterval:
    """Mean of the per-image difference `first - second` with a percentile bootstrap interval.

    Images are resampled with replacement as pairs, so what the two fills share (an easy or a
    hard image) cancels out. Seeded: the same inputs give the same interval.
    """
    first_values = np.asarray(first, dtype=np.float64).ravel()
    second_values = np.asarray(second, dtype=np.float64).ravel()
    if first_values.shape != second_values.shape:
        raise ValueError(
            f"paired scores differ in length: {first_values.size} vs {second_values.size}"
        )
    if first_values.size == 0:
        raise ValueError("no scores to compare")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    differences = first_values - second_values
    count = differences.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, _BOOTSTRAP_CHUNK_ENTRIES // count)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        indices = rng.integers(0, count, size=(stop - start, count))
        means[start:stop] = differences[indices].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return MeanInterval(float(differences.mean()), float(low), float(high))
