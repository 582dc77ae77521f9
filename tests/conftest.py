"""Shared fixtures: tiny generated images, folders, shards. Others may add fixtures at the end."""

from __future__ import annotations

import os

# One OpenMP thread, set before anything imports torch: the fault tests fork training
# processes (GNU OpenMP is not fork-safe once its pool exists), the timing-based kill tests
# need a responsive machine, and the short training tests were tuned with a fixed thread
# count, which also fixes their floating-point summation order.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def index_colour(index: int) -> tuple[int, int, int]:
    """A flat colour that identifies image `index` (< 256) even after resizing."""
    return (index * 37 % 256, (index * 11 + 50) % 256, 200)


def colour_index(pixel) -> int:
    """Inverse of index_colour, from the red channel."""
    return {index * 37 % 256: index for index in range(256)}[int(pixel[0])]


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture
def make_image_folder() -> Callable[..., dict[str, dict]]:
    """make(folder, count, captions="none"|"metadata"|"csv"|"sidecar", concepts=0, size=(24, 20))

    Writes `img_<i>.png` in flat colour index_colour(i) and returns {file name: row}, where a row
    has the caption ("" when none) and, with concepts, a `concept` column.
    """

    def make(folder: Path, count: int, captions: str = "none", concepts: int = 0, size=(24, 20)):
        folder.mkdir(parents=True, exist_ok=True)
        rows = {}
        for index in range(count):
            name = f"img_{index}.png"
            Image.new("RGB", size, index_colour(index)).save(folder / name)
            text = f"caption number {index}" if captions != "none" else ""
            row = {"file_name": name, "text": text}
            if concepts:
                row["concept"] = f"concept{index % concepts}"
            rows[name] = row
            if captions == "sidecar":
                (folder / f"img_{index}.txt").write_text(row["text"], encoding="utf-8")
        if captions == "metadata":
            lines = [json.dumps(row) for row in rows.values()]
            (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if captions == "csv":
            with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(next(iter(rows.values()))))
                writer.writeheader()
                writer.writerows(rows.values())
        return rows

    return make


@pytest.fixture
def write_tar() -> Callable[[Path, list[tuple[str, bytes]]], Path]:
    """write(path, [(member name, bytes), ...]): a hand-made shard, members in the given order."""

    def write(path: Path, members: list[tuple[str, bytes]]) -> Path:
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    return write


@pytest.fixture
def png_sample() -> Callable[..., bytes]:
    """png(index, size=(16, 16)): PNG bytes of a flat image in index_colour(index)."""

    def png(index: int, size=(16, 16)) -> bytes:
        return encode(Image.new("RGB", size, index_colour(index)))

    return png


@pytest.fixture
def index_of() -> Callable[[object], int]:
    """index_of(pixel): which make_image_folder / png_sample image a flat-colour pixel is from."""
    return colour_index


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_tiny_model(**overrides: object):
    """An untrained tiny HVAE whose fill depends on its latents and caption, for plumbing tests
    (seeds, captions, batching). A fresh HVAE fills exactly like the pyramid fill, because its
    pixel head's mean and coupling weights start at zero; these get random values here."""
    import torch

    from model.hvae import HVAE, preset_config

    torch.manual_seed(0)
    model = HVAE(preset_config("tiny", **overrides))
    m = model.pixels.m
    with torch.no_grad():
        model.pixels.head.weight[m : 4 * m].normal_(0.0, 0.25)
    return model
