"""Shared pieces of the benchmark scripts: machine description, matmul peak, synthetic data.

The scripts print figures; nothing here asserts a speed. On a shared machine the load average
printed with each figure says how much to trust it.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np


def machine_line() -> str:
    """CPU model, usable cores, torch threads and the current load average, on one line."""
    import torch

    model_name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    # On a shared machine OpenMP's default spin-waiting makes 2 threads far slower than 1 when
    # another process holds a core; OMP_WAIT_POLICY=PASSIVE avoids that. Print what was set.
    omp = {name: os.environ.get(name, "unset") for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return (
        f"{model_name}; {os.cpu_count()} cores; torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()}); "
        f"OMP_NUM_THREADS={omp['OMP_NUM_THREADS']} OMP_WAIT_POLICY={omp['OMP_WAIT_POLICY']}; "
        f"load average {load}"
    )


def matmul_peak_gflops(dtype_name: str, size: int = 2048, budget_seconds: float = 2.0) -> float:
    """Measured GFLOP/s of a size x size matmul: repeated until `budget_seconds` have passed
    (at least once after a warm-up), best repetition kept."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    left = torch.randn(size, size).to(dtype)
    right = torch.randn(size, size).to(dtype)
    torch.mm(left, right)  # warm-up: thread pool, kernel selection
    best = float("inf")
    started = time.perf_counter()
    while True:
        start = time.perf_counter()
        torch.mm(left, right)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() - started >= budget_seconds:
            break
    return 2.0 * size**3 / best / 1e9


def synthetic_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Flat-colour shapes on gradients (emoji-like content), uint8 size x size x 3."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)
    images = []
    for _ in range(count):
        start, end = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
        weights = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
        background = start * (1 - weights) + end * weights
        canvas = Image.fromarray(np.broadcast_to(background, (size, size, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = rng.integers(0, size * 3 // 4, size=2)
            extent = int(rng.integers(size // 8, size // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            box = [int(x0), int(y0), int(x0) + extent, int(y0) + extent]
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        images.append(np.asarray(canvas))
    return images


def one_hole_mask(size: int, rng: np.random.Generator, side_fraction: float = 0.25) -> np.ndarray:
    """One square hole of `side_fraction` of the side at a random place (True = hole)."""
    side = max(2, int(size * side_fraction))
    top, left = rng.integers(0, size - side + 1, size=2)
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def write_folder(
    folder: Path, images: list[np.ndarray], masks: list[np.ndarray] | None = None
) -> Path:
    """PNG files img000000.png ... and, with masks, a sibling `<folder>_masks` of same stems."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{index:06d}.png")
    if masks is not None:
        mask_folder = folder.with_name(folder.name + "_masks")
        mask_folder.mkdir(parents=True, exist_ok=True)
        for index, mask in enumerate(masks):
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_folder / f"img{index:06d}.png")
    return folder
