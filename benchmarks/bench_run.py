"""Inference: `inpaint run` end to end vs the model's pure forward vs OpenCV Telea; peak memory.

For each image size (64 and 512 by default) it writes N synthetic images with one square hole
(a quarter of the side), then measures
- `inpaint run` in a fresh process: wall time (with start-up) and the job's own images/s,
- the model's `inpaint()` alone on batches of model-resolution windows at the same batch size,
- OpenCV Telea on the same images and masks, in memory (one core),
and finally the peak RSS of `inpaint run` on 500 vs 5,000 64x64 images (memory must stay flat).

Run: python benchmarks/bench_run.py [--model DIR] [--count 200]
     [--sizes 64,512] [--rss-counts 500,5000] [--batch-size 16] [--num-workers 2]
Without --model (and without a bundled model) a fresh `small` preset is used: speed does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine_line, one_hole_mask, synthetic_images, write_folder


def model_folder(requested: str | None, scratch: Path) -> tuple[Path, str]:
    from model.hvae import HVAE, default_model_path, preset_config

    if requested:
        return Path(requested), requested
    bundled = default_model_path()
    if (bundled / "config.json").is_file():
        return bundled, f"bundled model ({bundled})"
    folder = scratch / "small-untrained"
    HVAE(preset_config("small")).save_pretrained(folder)
    return folder, "untrained `small` preset (no bundled model installed)"


def run_job(
    images: Path, masks: Path, out: Path, model: Path, batch_size: int, workers: int
) -> dict:
    """`inpaint run` in a fresh process; wall time and peak RSS of that process."""
    inpaint = shutil.which("inpaint") or str(Path(sys.executable).with_name("inpaint"))
    command = [
        inpaint, "run", str(images), "--masks", str(masks), "--out", str(out), "--model",
        str(model), "--batch-size", str(batch_size), "--num-workers", str(workers), "--json",
        "--device", "cpu",
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"inpaint run failed ({process.returncode}): {stderr.decode()[-500:]}")
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    return {"wall": wall, "summary": summary}


def peak_rss_of(images: Path, masks: Path, out: Path, model: Path, args: argparse.Namespace):
    """Peak RSS (MiB) of the largest process of an `inpaint run` (the job or one of its
    DataLoader workers: ru_maxrss of RUSAGE_CHILDREN in a wrapper process) and its wall time."""
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "start = time.perf_counter()\n"
        "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "wall = time.perf_counter() - start\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(code, peak, wall)\n"
    )
    inpaint = shutil.which("inpaint") or str(Path(sys.executable).with_name("inpaint"))
    command = [
        sys.executable, "-c", wrapper, inpaint, "run", str(images), "--masks", str(masks),
        "--out", str(out), "--model", str(model), "--batch-size", str(args.batch_size),
        "--num-workers", str(args.num_workers), "--device", "cpu",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    code, peak_kib, wall = result.stdout.split()
    if code != "0":
        raise RuntimeError(f"inpaint run failed ({code}): {result.stderr[-500:]}")
    return int(peak_kib) / 1024.0, float(wall)


def forward_images_per_second(model_dir: Path, batch_size: int, repeats: int = 3) -> float:
    """The model's `inpaint()` alone on batches of windows at its own resolution."""
    import torch

    from model.hvae import HVAE

    model = HVAE.from_pretrained(model_dir).eval()
    resolution = model.config.resolution
    rng = np.random.default_rng(0)
    images = np.stack(synthetic_images(batch_size, resolution, seed=1))
    holes = np.stack([one_hole_mask(resolution, rng, 0.5) for _ in range(batch_size)])
    image = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    mask = torch.from_numpy(holes).float()[:, None]
    with torch.inference_mode():
        model.inpaint(image, mask)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.inpaint(image, mask, generator=torch.Generator().manual_seed(0))
            best = min(best, time.perf_counter() - start)
    return batch_size / best


def telea_images_per_second(images: list[np.ndarray], masks: list[np.ndarray]) -> float:
    import cv2

    from inpaint_cli.baselines import telea_fill

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        start = time.perf_counter()
        for image, mask in zip(images, masks, strict=True):
            telea_fill(image, mask)
        return len(images) / (time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)


def make_set(scratch: Path, name: str, count: int, size: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    images = synthetic_images(count, size, seed=seed)
    masks = [one_hole_mask(size, rng) for _ in range(count)]
    folder = write_folder(scratch / name, images, masks)
    return folder, folder.with_name(folder.name + "_masks"), images, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--sizes", default="64,512")
    parser.add_argument("--rss-counts", default="500,5000")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()

    print(machine_line())
    scratch = Path(tempfile.mkdtemp(prefix="bench_run_"))
    try:
        model_dir, model_note = model_folder(args.model, scratch)
        print(f"model: {model_note}; batch size {args.batch_size}; workers {args.num_workers}")
        forward = forward_images_per_second(model_dir, args.batch_size)
        print(f"model inpaint() alone: {forward:8.1f} windows/s (batch {args.batch_size})")
        for size in (int(s) for s in args.sizes.split(",") if s):
            folder, masks, images, holes = make_set(scratch, f"s{size}", args.count, size, size)
            job = run_job(
                folder, masks, scratch / f"out{size}", model_dir, args.batch_size, args.num_workers
            )
            summary = job["summary"]
            telea = telea_images_per_second(images, holes)
            print(
                f"{size}x{size}, {args.count} images, one hole each: inpaint run "
                f"{args.count / job['wall']:7.1f} images/s wall (start-up included), "
                f"{summary['images_per_second']:7.1f} images/s in the job; "
                f"OpenCV Telea {telea:8.1f} images/s (in memory, 1 thread); "
                f"done {summary['done']}, failed {summary['failed']}"
            )
        for count in (int(c) for c in args.rss_counts.split(",") if c):
            folder, masks, _, _ = make_set(scratch, f"rss{count}", count, 64, count)
            peak, wall = peak_rss_of(folder, masks, scratch / f"rss_out{count}", model_dir, args)
            print(
                f"peak RSS of inpaint run on {count} 64x64 images: {peak:7.0f} MiB "
                f"(largest single process; {count / wall:6.1f} images/s wall)"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
