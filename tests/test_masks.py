"""masks.py: holes respect their kind and area range; `inpaint masks` writes one per image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from inpaint_cli.app import app
from inpaint_cli.errors import InpaintError
from inpaint_cli.masks import make_mask, parse_hole_area, write_masks


def test_parse_hole_area() -> None:
    assert parse_hole_area("0.1-0.5") == (0.1, 0.5)
    assert parse_hole_area("0.25") == (0.25, 0.25)
    for bad in ["0.5-0.1", "0-0.5", "0.1-1.5", "a-b", "0.1-0.2-0.3", ""]:
        with pytest.raises(InpaintError) as error:
            parse_hole_area(bad)
        assert error.value.exit_code == 2


@pytest.mark.parametrize(("height", "width"), [(64, 64), (7, 10), (1, 1)])
def test_center_is_the_middle_half_of_each_side(height: int, width: int) -> None:
    mask = make_mask("center", height, width, np.random.default_rng(0))
    rows, cols = np.nonzero(mask)
    assert rows.max() - rows.min() + 1 == max(1, height // 2)
    assert cols.max() - cols.min() + 1 == max(1, width // 2)
    assert abs((rows.min() + rows.max()) / 2 - (height - 1) / 2) <= 0.5
    assert mask.sum() == max(1, height // 2) * max(1, width // 2)


@pytest.mark.parametrize("kind", ["box", "stroke"])
@pytest.mark.parametrize(("size", "area"), [((64, 64), (0.1, 0.5)), ((32, 48), (0.05, 0.1))])
def test_random_holes_stay_in_their_area_range(kind, size, area) -> None:
    coverages = []
    for seed in range(40):
        mask = make_mask(kind, *size, np.random.default_rng(seed), area)
        assert mask.shape == size and mask.dtype == bool
        coverages.append(mask.mean())
    assert min(coverages) >= area[0] and max(coverages) <= area[1]
    assert len(set(coverages)) > 10  # the area varies, it is not one fixed shape


def test_boxes_sometimes_touch_the_border_and_strokes_are_irregular() -> None:
    touches = []
    for seed in range(30):
        box = make_mask("box", 64, 64, np.random.default_rng(seed))
        edges = np.concatenate([box[0], box[-1], box[:, 0], box[:, -1]])
        touches.append(bool(edges.any()))
        stroke = make_mask("stroke", 64, 64, np.random.default_rng(seed))
        rows, cols = np.nonzero(stroke)
        bounding_box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        assert stroke.sum() < bounding_box  # not a rectangle
    assert any(touches) and not all(touches)


@pytest.mark.parametrize("kind", ["box", "stroke"])
def test_same_seed_same_mask(kind: str) -> None:
    first = make_mask(kind, 40, 40, np.random.default_rng(5))
    assert np.array_equal(first, make_mask(kind, 40, 40, np.random.default_rng(5)))
    assert not np.array_equal(first, make_mask(kind, 40, 40, np.random.default_rng(6)))


def test_unknown_kind_is_a_usage_error() -> None:
    with pytest.raises(InpaintError) as error:
        make_mask("circle", 8, 8, np.random.default_rng(0))
    assert error.value.exit_code == 2


def test_write_masks_one_per_image_same_size_and_stem(tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(photos / "a.png")
    Image.new("RGB", (11, 17)).save(photos / "sub" / "b c.jpg")
    (photos / "broken.jpg").write_bytes(b"not an image")
    summary = write_masks(photos, tmp_path / "masks", kind="stroke", hole_area="0.2-0.3", seed=3)
    assert (summary["written"], summary["skipped"], summary["failed"]) == (2, 0, 1)
    first = Image.open(tmp_path / "masks" / "a.png")
    second = Image.open(tmp_path / "masks" / "sub" / "b c.png")
    assert (first.size, first.mode, second.size) == ((30, 20), "L", (11, 17))
    values = np.asarray(first)
    assert set(np.unique(values)) <= {0, 255} and 0.2 <= (values == 255).mean() <= 0.3
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]


def test_write_masks_skips_existing_and_depends_only_on_the_file(tmp_path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32)).save(photos / "a.png")
    write_masks(photos, tmp_path / "masks", kind="box", seed=1)
    before = (tmp_path / "masks" / "a.png").read_bytes()
    Image.new("RGB", (32, 32)).save(photos / "0_new.png")
    again = write_masks(photos, tmp_path / "masks", kind="box", seed=1)
    assert (again["written"], again["skipped"]) == (1, 1)
    redone = write_masks(photos, tmp_path / "masks", kind="box", seed=1, overwrite=True)
    assert redone["written"] == 2
    assert (tmp_path / "masks" / "a.png").read_bytes() == before  # a new file changed nothing


def test_write_masks_refuses_output_inside_input_and_empty_folders(tmp_path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(InpaintError, match="no images"):
        write_masks(tmp_path / "photos", tmp_path / "masks")
    Image.new("RGB", (4, 4)).save(tmp_path / "photos" / "a.png")
    with pytest.raises(InpaintError, match="inside the input") as error:
        write_masks(tmp_path / "photos", tmp_path / "photos" / "masks")
    assert error.value.exit_code == 2
    assert not (tmp_path / "photos" / "masks").exists()


def test_masks_command_reports_and_exits(tmp_path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    runner = CliRunner()
    result = runner.invoke(app, ["masks", str(tmp_path / "a.png"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "wrote 1 masks" in result.output
    assert Image.open(tmp_path / "out" / "a.png").size == (8, 8)
    bad = runner.invoke(app, ["masks", str(tmp_path / "a.png"), str(tmp_path / "o"), "--kind", "x"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "error: --kind x: expected one of center, box, stroke"
    ]


def _photos(folder) -> dict:
    """Three small photos in `folder`; returns each file's bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(3):
        Image.new("RGB", (32, 32), (index * 9, 50, 50)).save(folder / f"p{index:02d}.png")
    return {path: path.read_bytes() for path in sorted(folder.rglob("*.png"))}


def test_write_masks_refuses_the_images_folder_and_folders_above_it(tmp_path) -> None:
    photos = _photos(tmp_path / "p" / "sub")
    refused = [
        (tmp_path / "p" / "sub" / "p00.png", tmp_path / "p" / "sub", "the folder of p00.png"),
        (tmp_path / "p" / "sub", tmp_path / "p" / "sub", "the IMAGES folder itself"),
        (tmp_path / "p" / "sub", tmp_path / "p" / "sub" / ".", "the IMAGES folder itself"),
        # masks keep relative paths: p/sub/p00.png would be the mask of sub/p00.png
        (tmp_path / "p" / "sub", tmp_path / "p", "contains the images"),
        (tmp_path / "p" / "sub" / "p01.png", tmp_path, "contains the images"),
    ]
    for images, out, problem in refused:
        with pytest.raises(InpaintError) as error:
            write_masks(images, out, overwrite=True)
        assert error.value.exit_code == 2 and problem in str(error.value)
        assert str(error.value).startswith(f"{out}: OUT ")
    assert {path: path.read_bytes() for path in sorted(tmp_path.rglob("*.png"))} == photos


def test_masks_command_refuses_to_write_over_the_photos_in_one_line(tmp_path) -> None:
    photos = _photos(tmp_path / "photos")
    single = tmp_path / "photos" / "p00.png"
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, ["masks", str(single), str(tmp_path / "photos"), *extra])
        assert result.exit_code == 2, result.output
        assert result.output.strip().splitlines() == [
            f"error: {tmp_path / 'photos'}: OUT is the folder of p00.png; masks could replace "
            "inputs, choose another folder"
        ]
    assert {path: path.read_bytes() for path in sorted(tmp_path.rglob("*.png"))} == photos


def test_a_mask_is_never_written_over_an_input_through_a_symlink(tmp_path, capsys) -> None:
    photos = _photos(tmp_path / "photos" / "sub")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "sub").symlink_to(tmp_path / "photos" / "sub")  # OUT/sub is IMAGES/sub
    summary = write_masks(tmp_path / "photos", tmp_path / "masks", overwrite=True)
    assert (summary["written"], summary["failed"]) == (0, 3)
    assert {path: path.read_bytes() for path in sorted(photos)} == photos
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 3 and all("would replace an input" in line for line in warnings)
