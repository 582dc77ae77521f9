"""Fill quality on real photos with thin holes (strokes) and compact ones, against OpenCV Telea.

It draws, on each photo bundled with scikit-image (astronaut, chelsea, coffee, rocket,
motorcycle_left, camera: 300-640 px), two random 4-point polylines of widths 8, 20 and 40 px
(one mask per width) and one box hole a fifth of each side, then runs `inpaint run` (the
T=0 fill) and Telea on the same images and prints the hole PSNR of each, by kind. These photos
are the project's held-out evaluation set: no model here trained on them.

Run: python benchmarks/bench_thin_holes.py [--model DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "camera.png",
)
STROKE_WIDTHS = (8, 20, 40)


def make_cases(folder: Path, seed: int) -> dict[str, str]:
    """Write images/ and masks/ under `folder`; return each case's kind by file name."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(seed)
    kinds = {}
    for name in PHOTOS:
        rgb = np.asarray(Image.open(data / name).convert("RGB"))
        height, width = rgb.shape[:2]
        masks = {}
        for stroke in STROKE_WIDTHS:
            mask = np.zeros((height, width), np.uint8)
            for _ in range(2):
                points = np.stack([rng.integers(0, width, 4), rng.integers(0, height, 4)], 1)
                cv2.polylines(mask, [points.astype(np.int32)], False, 255, stroke)
            masks[f"stroke {stroke} px"] = mask
        box = np.zeros((height, width), np.uint8)
        box[height // 3 : height // 3 + height // 5, width // 3 : width // 3 + width // 5] = 255
        masks["box"] = box
        for kind, mask in masks.items():
            stem = f"{Path(name).stem}_{kind.replace(' ', '')}"
            Image.fromarray(rgb).save(folder / "images" / f"{stem}.png")
            Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")
            kinds[f"{stem}.png"] = kind
    return kinds


def hole_psnr(truth: np.ndarray, fill: np.ndarray, hole: np.ndarray) -> float:
    error = np.mean((truth[hole].astype(np.float64) - fill[hole].astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(error, 1e-10)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the bundled model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        kinds = make_cases(folder, args.seed)
        command = [
            sys.executable,
            "-m",
            "inpaint_cli.app",
            "run",
            str(folder / "images"),
            "--masks",
            str(folder / "masks"),
            "--out",
            str(folder / "filled"),
        ]
        if args.model:
            command += ["--model", args.model]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        scores: dict[str, list[tuple[float, float]]] = {}
        for name, kind in kinds.items():
            truth = np.asarray(Image.open(folder / "images" / name).convert("RGB"))
            hole = np.asarray(Image.open(folder / "masks" / name)) >= 128
            fill = np.asarray(Image.open(folder / "filled" / name).convert("RGB"))
            telea = cv2.inpaint(truth, hole.astype(np.uint8), 3, cv2.INPAINT_TELEA)
            scores.setdefault(kind, []).append(
                (hole_psnr(truth, fill, hole), hole_psnr(truth, telea, hole))
            )
    print("kind           images  inpaint run (dB)  OpenCV Telea (dB)")
    for kind, rows in scores.items():
        model, telea = np.mean(rows, axis=0)
        print(f"{kind:14s} {len(rows):6d}  {model:16.2f}  {telea:17.2f}")
    strokes = [row for kind, rows in scores.items() if kind != "box" for row in rows]
    model, telea = np.mean(strokes, axis=0)
    print(f"{'all strokes':14s} {len(strokes):6d}  {model:16.2f}  {telea:17.2f}")


if __name__ == "__main__":
    main()
