"""Write a held-out photograph set for `inpaint eval`: 64x64 crops of scikit-image's photos.

The photographs bundled inside scikit-image are kept out of every training set of this project
(see README.md), so they measure how the bundled model does on photographs it never saw.
Crops are square, taken at several scales (a quarter of the short side up to all of it) and
resized with Lanczos to 64x64, so both textures and whole objects appear. Deterministic for a
given --seed. Usage:

    python examples/emoji/make_heldout_photos.py OUT_FOLDER [--per-photo 40] [--seed 0]
    inpaint eval --data OUT_FOLDER --masks center --samples 8 --baselines --out report/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from inpaint_cli.images import save_png_atomic

# natural photographs only: no microscopy, charts, text or synthetic test patterns
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "camera.png",
    "moon.png",
    "grass.png",
    "gravel.png",
    "brick.png",
)


def skimage_data_folder() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).resolve().parent


def photo_crops(photo: Image.Image, count: int, size: int, rng: np.random.Generator):
    """`count` square crops at random positions and scales, resized to size x size."""
    width, height = photo.size
    short = min(width, height)
    for _ in range(count):
        side = int(rng.integers(max(size, short // 4), short + 1))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        yield crop.resize((size, size), Image.Resampling.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-photo", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    source = skimage_data_folder()
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for index, name in enumerate(PHOTOS):
        path = source / name
        if not path.is_file():
            print(f"skipped {name}: not in this scikit-image")
            continue
        rng = np.random.default_rng([args.seed, index])
        with Image.open(path) as image:
            photo = image.convert("RGB")
        for k, crop in enumerate(photo_crops(photo, args.per_photo, args.size, rng)):
            save_png_atomic(crop, args.out / f"{Path(name).stem}_{k:03d}.png")
            written += 1
    print(f"wrote {written} crops of {args.size}x{args.size} into {args.out}")


if __name__ == "__main__":
    main()
