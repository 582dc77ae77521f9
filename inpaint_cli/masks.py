"""Hole masks: the centre square, random boxes and free-form strokes (True = hole)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from inpaint_cli.errors import InpaintError, printable

MASK_KINDS = ("center", "box", "stroke")
# Pieces drawn before giving up on reaching the target area (tiny images, tight ranges).
_MAX_PIECES = 60


def parse_hole_area(text: str) -> tuple[float, float]:
    """Parse a hole-area range such as "0.1-0.5" (or one number) into (low, high) fractions."""
    parts = str(text).strip().split("-")
    try:
        low, high = (float(parts[0]), float(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or high is None or not 0.0 < low <= high <= 1.0:
        raise InpaintError(
            f"--hole-area {text}: expected a range like 0.1-0.5 with 0 < low <= high <= 1",
            exit_code=2,
        )
    return low, high


def check_kind(kind: str) -> str:
    """Return `kind` if it is a known mask kind, else raise a usage error."""
    if kind not in MASK_KINDS:
        raise InpaintError(f"--kind {kind}: expected one of {', '.join(MASK_KINDS)}", exit_code=2)
    return kind


def center_mask(height: int, width: int) -> np.ndarray:
    """The original task's hole: the middle half of each side."""
    mask = np.zeros((height, width), dtype=bool)
    hole_h, hole_w = max(1, height // 2), max(1, width // 2)
    top, left = (height - hole_h) // 2, (width - hole_w) // 2
    mask[top : top + hole_h, left : left + hole_w] = True
    return mask


def _box_pieces(height: int, width: int, target: float, rng: np.random.Generator):
    """Yield one random box as a drawing function; some boxes touch the border."""
    # A box covers up to the target area; boxes touching the border matter because real
    # damage and occlusions are often there.
    area_share, log_aspect, top_share, left_share = rng.random(4)
    area = (0.3 + 0.7 * area_share) * target * height * width
    aspect = math.exp((2 * log_aspect - 1) * math.log(3.0))
    box_h = min(max(round(math.sqrt(area * aspect)), 1), height)
    box_w = min(max(round(math.sqrt(area / aspect)), 1), width)
    top = -(box_h // 3) + int(top_share * (height - box_h + 2 * (box_h // 3) + 1))
    left = -(box_w // 3) + int(left_share * (width - box_w + 2 * (box_w // 3) + 1))

    def fill(canvas: np.ndarray) -> None:
        canvas[max(top, 0) : top + box_h, max(left, 0) : left + box_w] = 255

    yield fill


def _stroke_pieces(height: int, width: int, target: float, rng: np.random.Generator):
    """Yield the segments of one random thick polyline, each as a drawing function."""
    import cv2

    side = min(height, width)
    # One draw of all the randomness a stroke needs: numpy's scalar calls cost microseconds.
    thickness_share, x_share, y_share, start_angle, count_share = rng.random(5)
    turns, lengths = rng.random(12), rng.random(12)
    thickness = max(1, round((0.04 + 0.08 * thickness_share) * side * math.sqrt(target / 0.3)))
    x, y = x_share * (width - 1), y_share * (height - 1)
    angle = start_angle * 2 * math.pi
    for turn, length_share in zip(turns[: 4 + int(count_share * 8)], lengths, strict=False):
        angle += (turn - 0.5) * math.pi
        length = (0.1 + 0.25 * length_share) * max(height, width)
        nx = min(max(x + length * math.cos(angle), 0.0), width - 1.0)
        ny = min(max(y + length * math.sin(angle), 0.0), height - 1.0)
        start, end = (round(x), round(y)), (round(nx), round(ny))
        yield lambda canvas, start=start, end=end: cv2.line(canvas, start, end, 255, thickness)
        x, y = nx, ny


def _grow(height: int, width: int, hole_area, rng, pieces: Callable) -> np.ndarray:
    """Add pieces until the hole covers a random target area, never exceeding the maximum."""
    low, high = hole_area
    target = low + (high - low) * rng.random()
    pixels = height * width
    canvas = np.zeros((height, width), dtype=np.uint8)
    for _ in range(_MAX_PIECES):
        for draw_piece in pieces(height, width, target, rng):
            trial = canvas.copy()
            draw_piece(trial)
            covered = np.count_nonzero(trial)
            if covered > high * pixels:
                continue
            canvas = trial
            if covered >= target * pixels:
                return canvas > 0
    mask = canvas > 0
    if not mask.any():
        # Too small to fit a piece under the maximum: one pixel-sized hole keeps the task real.
        mask[int(rng.integers(height)), int(rng.integers(width))] = True
    return mask


def make_mask(
    kind: str,
    height: int,
    width: int,
    rng: np.random.Generator,
    hole_area: tuple[float, float] = (0.1, 0.5),
) -> np.ndarray:
    """A bool HxW hole mask. `center` ignores hole_area (it is always a quarter of the image)."""
    check_kind(kind)
    if kind == "center":
        return center_mask(height, width)
    pieces = _box_pieces if kind == "box" else _stroke_pieces
    return _grow(height, width, hole_area, rng, pieces)


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """A mask as a greyscale PNG-ready image: white (255) = hole."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from strings/ints that is the same in every process (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def write_masks(
    images: Path,
    out: Path,
    kind: str = "center",
    hole_area: str | tuple[float, float] = "0.1-0.5",
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write `<out>/<relative folder>/<stem>.png` (white = hole, same size) for every image.

    Each mask depends only on the seed and the image's relative path, so adding images to a
    folder never changes the masks of the others. Returns counts: written, skipped, failed.
    """
    from rich.console import Console
    from rich.progress import Progress

    from inpaint_cli.images import (
        check_output_place,
        left_out_warning,
        list_images,
        load_image,
        make_output_folder,
        save_png_atomic,
    )

    check_kind(kind)
    area = parse_hole_area(hole_area) if isinstance(hole_area, str) else tuple(hole_area)
    images, out = Path(images), Path(out)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    left_out: list[Path] = []
    paths = list_images(images, left_out)
    if left_out:
        console.print(printable(left_out_warning(images, left_out)), markup=False)
    if not paths:
        raise InpaintError(f"{images}: no images found", exit_code=2)
    root = images if images.is_dir() else images.parent
    check_output_place(images, out, option="OUT", outputs="masks")
    make_output_folder(out, images)
    # Second guard, for what the folder check cannot see (a symlink in OUT into IMAGES): a
    # mask is never written over an input image.
    inputs = {path.resolve() for path in paths}
    counts = {"written": 0, "skipped": 0, "failed": 0}
    targets: set[Path] = set()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("masks", total=len(paths))
        for path in paths:
            progress.advance(task)
            relative = path.relative_to(root)
            target = out / relative.parent / f"{relative.stem}.png"
            if target in targets:
                console.print(
                    f"warning: {printable(f'{path}: another image already writes {target}')}",
                    markup=False,
                )
                counts["failed"] += 1
                continue
            targets.add(target)
            if target.resolve() in inputs:
                console.print(
                    f"warning: {printable(f'{path}: its mask {target} would replace an input')}",
                    markup=False,
                )
                counts["failed"] += 1
                continue
            if target.exists() and not overwrite:
                counts["skipped"] += 1
                continue
            try:
                width, height = load_image(path).size
                rng = np.random.default_rng(stable_seed(seed, kind, relative.as_posix()))
                mask = make_mask(kind, height, width, rng, area)
                target.parent.mkdir(parents=True, exist_ok=True)
                save_png_atomic(mask_to_image(mask), target)
            except OSError as error:
                console.print(f"warning: {printable(f'{target}: {error.strerror}')}", markup=False)
                counts["failed"] += 1
                continue
            except InpaintError as error:
                console.print(f"warning: {error}", markup=False)
                counts["failed"] += 1
                continue
            counts["written"] += 1
    return {**counts, "out": str(out)}
