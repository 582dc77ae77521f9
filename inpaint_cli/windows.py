"""Square context windows around holes, so a fixed-resolution model can fill any image.

Each group of nearby holes gets one square window (the hole's bounding box plus a context
margin), which is resized to the model's resolution, filled, resized back, and only the hole
pixels are pasted. Windows of different groups never overlap, so pastes never conflict.

A group whose window would be much larger than the hole's width calls for (a long thin stroke,
scattered specks) is cut into tiles instead: square cells over its bounding box, each filled
in a window sized for the hole's width, which pastes the hole pixels of its own cell and a
margin around it. One window shrunk 14x for a 30-pixel stroke across a photo filled it with a
blur. Tiles are filled side by side, so neighbours may disagree: where a tile's margin covers
pixels an earlier tile pasted, it cross-fades into them instead of meeting them at a seam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image

# Context on each side of a hole, as a fraction of the hole's larger side.
CONTEXT_MARGIN = 0.5
# Beyond this many connected holes, grouping pairwise gets slow; one window then covers all.
MAX_COMPONENTS = 2000
# A group is tiled when its window is more than this many times the side its hole's width asks
# for; below it one window keeps the whole hole in view (and no seams between cells).
TILE_ABOVE = 3.0
# How far, as a fraction of its cell, a tile pastes past its cell to cross-fade with neighbours.
TILE_OVERLAP = 0.25


@dataclass(frozen=True)
class Window:
    """A square `side` x `side` window whose top-left corner is (x0, y0) in image pixels.

    It may extend past the image border when the image is smaller than the window on one
    axis; pixels outside the image are treated as hole (generated, then discarded).
    """

    x0: int
    y0: int
    side: int
    # (x0, y0, x1, y1) in image pixels: the only hole pixels this window pastes (a tile's
    # cell); None for the whole window
    core: tuple[int, int, int, int] | None = None
    # a tile's cell grown by its cross-fade margin (within the window and image): what it pastes
    paste_box: tuple[int, int, int, int] | None = None
    # paste boxes of the tiles pasted before this one that overlap its own (hole_windows' order)
    blend_with: tuple[tuple[int, int, int, int], ...] = ()

    def shrink(self, resolution: int) -> float:
        return self.side / resolution


def _window_side(extent: float, height: int, width: int, resolution: int) -> int:
    """The side of a window around a hole `extent` pixels across: the hole plus its context."""
    # At least the model's resolution (native scale, no upsampling) when the image allows it,
    # never more than the image's larger side (context beyond the image does not exist).
    side = max(math.ceil(extent * (1 + 2 * CONTEXT_MARGIN)), min(resolution, max(height, width)))
    return max(min(side, max(height, width)), math.ceil(extent), 1)


def _placed(
    box: tuple[int, int, int, int], side: int, height: int, width: int, core: bool = False
) -> Window:
    """A `side` window centred on `box` and moved inside the image where it fits."""
    x0, y0, x1, y1 = box

    def place(lo: int, hi: int, size: int) -> int:
        if side >= size:
            return (size - side) // 2
        start = int(round((lo + hi) / 2 - side / 2))
        return min(max(start, 0), size - side)

    window = Window(place(x0, x1, width), place(y0, y1, height), side)
    if not core:
        return window
    margin = math.ceil(_overlap(box))
    paste_box = (
        max(x0 - margin, window.x0, 0),
        max(y0 - margin, window.y0, 0),
        min(x1 + margin, window.x0 + side, width),
        min(y1 + margin, window.y0 + side, height),
    )
    return replace(window, core=box, paste_box=paste_box)


def _overlap(cell: tuple[int, int, int, int]) -> float:
    """How far a tile pastes past its cell, and over how much it fades in."""
    return TILE_OVERLAP * max(cell[2] - cell[0], cell[3] - cell[1])


def _with_blends(windows: list[Window]) -> list[Window]:
    """Each tile with the paste boxes of the earlier tiles in `windows` that overlap its own."""
    boxes = [w.paste_box for w in windows if w.paste_box is not None]
    if len(boxes) < 2:
        return windows
    # Boxes are filed under every bucket they touch, so only near ones are compared (a photo
    # full of specks can have tens of thousands of tiles).
    bucket = max(max(b[2] - b[0], b[3] - b[1]) for b in boxes)
    filed: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    out = []
    for window in windows:
        box = window.paste_box
        if box is None:
            out.append(window)
            continue
        keys = [
            (bx, by)
            for by in range(box[1] // bucket, (box[3] - 1) // bucket + 1)
            for bx in range(box[0] // bucket, (box[2] - 1) // bucket + 1)
        ]
        near = dict.fromkeys(other for key in keys for other in filed.get(key, ()))
        overlapping = tuple(
            other
            for other in near
            if other[0] < box[2] and box[0] < other[2] and other[1] < box[3] and box[1] < other[3]
        )
        out.append(replace(window, blend_with=overlapping))
        for key in keys:
            filed.setdefault(key, []).append(box)
    return out


def _box_window(box: tuple[int, int, int, int], height: int, width: int, resolution: int) -> Window:
    extent = max(box[2] - box[0], box[3] - box[1])
    return _placed(box, _window_side(extent, height, width, resolution), height, width)


def _tiles(
    window: Window,
    box: tuple[int, int, int, int],
    mask: np.ndarray,
    width_of_hole: np.ndarray,
    resolution: int,
) -> list[Window]:
    """`window` itself, or tiles over `box` when the hole is much thinner than the window.

    `width_of_hole` is each hole pixel's distance to the nearest known pixel: twice its
    largest value in the box is the width of the group's widest part, which sets the tiles'
    window side, so that every cell is filled with context on all sides; each tile pastes the
    hole pixels of its own cell, half that side across.
    """
    height, width = mask.shape
    x0, y0, x1, y1 = box
    hole_width = 2.0 * float(width_of_hole[y0:y1, x0:x1].max())
    side = _window_side(hole_width, height, width, resolution)
    if window.side <= TILE_ABOVE * side:
        return [window]
    cell = max(side // 2, 1)
    tiles = []
    for cy in range(y0, y1, cell):
        for cx in range(x0, x1, cell):
            core = (cx, cy, min(cx + cell, x1), min(cy + cell, y1))
            if mask[core[1] : core[3], core[0] : core[2]].any():
                tiles.append(_placed(core, side, height, width, core=True))
    return tiles


def _overlaps(windows: list[Window]) -> np.ndarray:
    x0 = np.array([w.x0 for w in windows])
    y0 = np.array([w.y0 for w in windows])
    side = np.array([w.side for w in windows])
    x_overlap = (x0[:, None] < (x0 + side)[None, :]) & (x0[None, :] < (x0 + side)[:, None])
    y_overlap = (y0[:, None] < (y0 + side)[None, :]) & (y0[None, :] < (y0 + side)[:, None])
    return x_overlap & y_overlap


def _merge_boxes(
    boxes: list[tuple[int, int, int, int]], overlap: np.ndarray
) -> list[tuple[int, int, int, int]]:
    """Union of the boxes in each connected group of the `overlap` graph (union-find)."""
    parent = list(range(len(boxes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(overlap), strict=True):
        parent[find(int(i))] = find(int(j))
    merged: dict[int, tuple[int, int, int, int]] = {}
    for i, b in enumerate(boxes):
        root = find(i)
        m = merged.get(root, b)
        merged[root] = (min(m[0], b[0]), min(m[1], b[1]), max(m[2], b[2]), max(m[3], b[3]))
    return sorted(merged.values())


def hole_windows(mask: np.ndarray, resolution: int) -> list[Window]:
    """Windows covering every hole pixel of `mask` (bool HxW); empty when there is no hole.

    Deterministic for a given mask and resolution, so window indices can seed generators.
    """
    height, width = mask.shape
    count, _labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    boxes = [
        (int(s[0]), int(s[1]), int(s[0] + s[2]), int(s[1] + s[3]))
        for s in stats[1:]  # label 0 is the background
    ]
    if not boxes:
        return []
    if len(boxes) > MAX_COMPONENTS:
        boxes = [
            (
                min(b[0] for b in boxes),
                min(b[1] for b in boxes),
                max(b[2] for b in boxes),
                max(b[3] for b in boxes),
            )
        ]
    while True:
        windows = [_box_window(b, height, width, resolution) for b in boxes]
        overlap = _overlaps(windows)
        np.fill_diagonal(overlap, False)
        if not overlap.any():
            break
        # Grow each group of overlapping windows into one box and try again: a grown window
        # may reach further groups, hence the loop.
        boxes = _merge_boxes(boxes, overlap)
    # Tiles of a group stay inside its window (their cells lie in its box, and a tiled window
    # is over twice a tile's side), so they never reach another group's holes.
    width_of_hole = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    tiled = [
        t
        for w, b in zip(windows, boxes, strict=True)
        for t in _tiles(w, b, mask, width_of_hole, resolution)
    ]
    # run pastes an image's windows in this order, which the cross-fades rely on
    return _with_blends(sorted(tiled, key=lambda w: (w.y0, w.x0, w.core or ())))


def crop_window(
    rgb: np.ndarray, mask: np.ndarray, window: Window, resolution: int
) -> tuple[np.ndarray, np.ndarray]:
    """The window's pixels (uint8 RxRx3) and hole (bool RxR) at the model's resolution.

    A resized pixel counts as hole if any source pixel under it is a hole, so the model is
    never told that a generated or outside-the-image pixel is known.
    """
    height, width = mask.shape
    side = window.side
    crop = np.zeros((side, side, 3), np.uint8)
    hole = np.ones((side, side), np.float32)
    ix0, iy0 = max(window.x0, 0), max(window.y0, 0)
    ix1, iy1 = min(window.x0 + side, width), min(window.y0 + side, height)
    cx0, cy0 = ix0 - window.x0, iy0 - window.y0
    crop[cy0 : cy0 + iy1 - iy0, cx0 : cx0 + ix1 - ix0] = rgb[iy0:iy1, ix0:ix1]
    hole[cy0 : cy0 + iy1 - iy0, cx0 : cx0 + ix1 - ix0] = mask[iy0:iy1, ix0:ix1]
    if side == resolution:
        return crop, hole > 0.5
    interpolation = cv2.INTER_AREA if side > resolution else cv2.INTER_LINEAR
    crop_r = cv2.resize(crop, (resolution, resolution), interpolation=interpolation)
    hole_r = cv2.resize(hole, (resolution, resolution), interpolation=interpolation)
    return crop_r, hole_r > 1e-6


def paste_window(canvas: np.ndarray, mask: np.ndarray, window: Window, filled: np.ndarray) -> None:
    """Paste the hole pixels of `filled` (float RxRx3 in 0..255) into `canvas` (uint8 HxWx3).

    Only pixels where `mask` is True inside the window (inside its paste box, for a tile)
    change. A tile cross-fades into the pixels the tiles listed in its `blend_with` pasted, so
    the windows of an image must be pasted in hole_windows' order.
    """
    height, width = mask.shape
    side = window.side
    resolution = filled.shape[0]
    if side != resolution:
        interpolation = cv2.INTER_AREA if side < resolution else cv2.INTER_CUBIC
        filled = cv2.resize(filled, (side, side), interpolation=interpolation)
    values = np.clip(np.rint(filled), 0, 255).astype(np.uint8)
    ix0, iy0 = max(window.x0, 0), max(window.y0, 0)
    ix1, iy1 = min(window.x0 + side, width), min(window.y0 + side, height)
    cx0, cy0 = ix0 - window.x0, iy0 - window.y0
    region = canvas[iy0:iy1, ix0:ix1]
    hole = mask[iy0:iy1, ix0:ix1]
    if window.paste_box is not None:
        _paste_tile(
            region, hole, values[cy0 : cy0 + iy1 - iy0, cx0 : cx0 + ix1 - ix0], window, ix0, iy0
        )
        return
    region[hole] = values[cy0 : cy0 + iy1 - iy0, cx0 : cx0 + ix1 - ix0][hole]


def _paste_tile(
    region: np.ndarray, hole: np.ndarray, values: np.ndarray, window: Window, ix0: int, iy0: int
) -> None:
    """Paste a tile's fill (`values`, over `region` whose top-left image pixel is (ix0, iy0))
    on the hole pixels of its paste box: as is where no earlier tile pasted, else cross-faded
    with what is there, from the earlier fill at the box's edge to this one a margin inside."""
    x0, y0, x1, y1 = (v - o for v, o in zip(window.paste_box, (ix0, iy0, ix0, iy0), strict=True))
    inside = np.zeros_like(hole)
    inside[y0:y1, x0:x1] = True
    covered = np.zeros_like(hole)
    for bx0, by0, bx1, by1 in window.blend_with:
        covered[max(by0 - iy0, 0) : max(by1 - iy0, 0), max(bx0 - ix0, 0) : max(bx1 - ix0, 0)] = True
    pasted = hole & inside
    fading = pasted & covered
    region[pasted & ~covered] = values[pasted & ~covered]
    if not fading.any():
        return
    margin = max(1.0, _overlap(window.core))
    rows, cols = np.nonzero(fading)
    # distance into the paste box from its nearest edge: 0 there, a margin at the cell's edge
    depth = np.minimum.reduce([cols - x0 + 0.5, x1 - cols - 0.5, rows - y0 + 0.5, y1 - rows - 0.5])
    weight = np.clip(depth / (2 * margin), 0.0, 1.0)[:, None]
    mixed = region[rows, cols] * (1 - weight) + values[rows, cols].astype(np.float32) * weight
    region[rows, cols] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Grow holes by `pixels` (every pixel within that Euclidean distance of a hole), to cover
    halos around objects."""
    if pixels <= 0 or not mask.any():
        return mask
    # An exact distance transform costs the same for any radius; a disc kernel grows with the
    # radius (--dilate 100000 asked for a 40 GB kernel, 500 took 13 s on one megapixel).
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance <= pixels


# ----------------------------------------------------------------------------- output modes


def output_base(img: Image.Image, rgb: np.ndarray) -> tuple[str, np.ndarray]:
    """The output mode PNG can hold for a decoded image, and its pixels in that mode.

    `rgb` is the image as the model sees it (image_to_rgb_uint8). Outside the hole, outputs
    are exactly these pixels: the decoded, oriented input in the output mode.
    """
    mode = img.mode
    has_transparency = "transparency" in img.info
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(img)
        if pixels.dtype != np.uint16:
            pixels = np.clip(pixels, 0, 65535)
        return "I;16", np.ascontiguousarray(pixels, dtype=np.uint16)
    if mode in ("L", "1") and not has_transparency:
        return "L", np.asarray(img.convert("L"))
    if mode == "F":
        return "L", np.ascontiguousarray(rgb[:, :, 0])
    if mode in ("LA", "La") or (mode == "L" and has_transparency):
        return "LA", np.asarray(img.convert("LA"))
    if mode in ("RGBA", "RGBa", "PA") or (has_transparency and mode in ("P", "RGB")):
        return "RGBA", np.asarray(img.convert("RGBA"))
    return "RGB", rgb


def compose_output(
    mode: str, base: np.ndarray, canvas: np.ndarray, hole: np.ndarray
) -> Image.Image:
    """Output image: `base` everywhere, the filled `canvas` (RGB uint8) on hole pixels only.

    Alpha is passed through unchanged, the hole included; grey outputs take the luminance of
    the fill (Pillow's formula), 16-bit outputs scale it by 257 so 255 maps to 65535.
    """
    if mode == "RGB":
        return Image.fromarray(canvas, "RGB")
    out = base.copy()
    if mode == "RGBA":
        out[hole, :3] = unflatten_from_white(canvas[hole], base[hole, 3])
        return Image.fromarray(out, "RGBA")
    grey = np.asarray(Image.fromarray(canvas, "RGB").convert("L"))
    if mode == "L":
        out[hole] = grey[hole]
        return Image.fromarray(out, "L")
    if mode == "LA":
        out[hole, 0] = unflatten_from_white(grey[hole], base[hole, 1])
        return Image.fromarray(out, "LA")
    out[hole] = grey[hole].astype(np.uint16) * 257
    return Image.fromarray(out)  # uint16 -> I;16


def unflatten_from_white(fill: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The colours that, drawn at `alpha` (0..255) over white, look like `fill` (uint8).

    The model fills the image flattened onto white (image_to_rgb_uint8), and the output keeps
    the input's alpha: written as they are, the fill's colours would be blended with white a
    second time wherever the hole is semi-transparent, a pale patch. Fully transparent pixels
    keep the fill's colours (nothing shows through them, but a tool that drops alpha shows
    them); faint ones clip to 0..255.
    """
    alpha = alpha.astype(np.float32) / 255.0
    if fill.ndim == alpha.ndim + 1:
        alpha = alpha[..., None]
    blended = fill.astype(np.float32)
    colour = (blended - 255.0 * (1.0 - alpha)) / np.maximum(alpha, 1.0 / 255.0)
    colour = np.where(alpha > 0, colour, blended)
    return np.clip(np.rint(colour), 0, 255).astype(np.uint8)


def overlay_image(rgb: np.ndarray, hole: np.ndarray) -> Image.Image:
    """The input with its hole tinted red, to check masks at a glance."""
    out = rgb.astype(np.float32)
    out[hole] = out[hole] * 0.4 + np.array([255.0, 0.0, 0.0]) * 0.6
    return Image.fromarray(np.rint(out).astype(np.uint8), "RGB")


# Standard deviation (in levels of 0..255) shown at the top of the colour scale; fixed, so maps
# of different images compare.
UNCERTAINTY_FULL_SCALE = 64.0


def uncertainty_image(
    rgb: np.ndarray, canvases: list[np.ndarray], hole: np.ndarray, lut: np.ndarray
) -> Image.Image:
    """Per-pixel standard deviation across samples (mean over channels) as a heat map.

    Outside the hole the input is shown dimmed in grey, for orientation.
    """
    stack = np.stack([c.astype(np.float32) for c in canvases])
    std = stack.std(axis=0).mean(axis=2)
    level = np.clip(std / UNCERTAINTY_FULL_SCALE * 255.0, 0, 255).astype(np.uint8)
    heat = lut[level]
    dim = (rgb.astype(np.float32).mean(axis=2) * 0.35).astype(np.uint8)
    out = np.repeat(dim[:, :, None], 3, axis=2)
    out[hole] = heat[hole]
    return Image.fromarray(out, "RGB")


def heat_lut() -> np.ndarray:
    """256x3 uint8 colour table (matplotlib's inferno)."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def thumbnail(img: Image.Image, size: int) -> Image.Image:
    """An RGB image fitted into a size x size grey cell, aspect kept (small ones enlarged)."""
    scale = min(size / img.width, size / img.height)
    fitted = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    fitted_img = img.convert("RGB").resize(fitted, resample)
    cell = Image.new("RGB", (size, size), (128, 128, 128))
    cell.paste(fitted_img, ((size - fitted[0]) // 2, (size - fitted[1]) // 2))
    return cell
