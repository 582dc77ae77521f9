"""`inpaint run` on a mixed folder with a tiny random model: outputs, naming, masks, captions,
resuming, reproducibility, manifest and path errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import random_tiny_model
from PIL import Image, ImageOps
from typer.testing import CliRunner

from inpaint_cli import run_plan
from inpaint_cli.app import app
from inpaint_cli.errors import InpaintError
from inpaint_cli.run import RunOptions, run_folder
from inpaint_cli.run_plan import read_caption_file
from inpaint_cli.windows import (
    compose_output,
    crop_window,
    dilate_mask,
    hole_windows,
    paste_window,
)

RNG_SEED = 1234


def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny HVAE (random pixel head) saved as a model folder."""
    folder = tmp_path_factory.mktemp("model") / "tiny"
    random_tiny_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory)


def _noise_image(rng: np.random.Generator, width: int, height: int, channels: int = 3):
    # smooth-ish content, so JPEG round trips do not matter and fills are visible
    base = rng.integers(0, 255, (height // 4 + 1, width // 4 + 1, channels), dtype=np.uint8)
    big = np.kron(base, np.ones((4, 4, 1), np.uint8))[:height, :width]
    return big[:, :, 0] if channels == 1 else big


def _box_mask(width: int, height: int, boxes: list[tuple[float, float, float, float]]):
    mask = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[int(y0 * height) : max(int(y1 * height), int(y0 * height) + 1),
             int(x0 * width) : max(int(x1 * width), int(x0 * width) + 1)] = 255  # fmt: skip
    return mask


def _save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def make_mixed_folder(root: Path) -> dict:
    """The folder of issue 4: good images of many kinds plus three that must fail."""
    rng = np.random.default_rng(RNG_SEED)
    images, masks = root / "images", root / "masks"
    (images / "sub" / "deep").mkdir(parents=True)
    masks.mkdir()
    far_apart = [(0.05, 0.05, 0.15, 0.15), (0.8, 0.75, 0.9, 0.9)]
    centre = [(0.3, 0.3, 0.6, 0.7)]
    good = {}

    def add(rel: str, img: Image.Image, boxes, mask_rel: str | None = None, **save) -> None:
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **save)
        shown = ImageOps.exif_transpose(Image.open(path))
        mask = _box_mask(shown.width, shown.height, boxes)
        _save_mask(masks / (mask_rel or str(Path(rel).with_suffix(".png"))), mask)
        good[rel] = mask > 127

    add("small.png", Image.fromarray(_noise_image(rng, 17, 23)), centre)
    add("big.jpg", Image.fromarray(_noise_image(rng, 640, 480)), far_apart, quality=95)
    rgba = np.dstack([_noise_image(rng, 50, 40), rng.integers(0, 256, (40, 50), dtype=np.uint8)])
    add("sub/alpha.png", Image.fromarray(rgba, "RGBA"), centre)
    add("sub/grey.png", Image.fromarray(_noise_image(rng, 31, 29, 1), "L"), far_apart)
    rotated = Image.fromarray(_noise_image(rng, 48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 24 wide, 48 high
    add("sub/deep/rotated.jpg", rotated, centre, exif=exif.tobytes(), quality=95)
    # a LaMa-style mask name in a sub-folder of MASKS
    add("sub/deep/wide.png", Image.fromarray(_noise_image(rng, 120, 20)), centre,
        mask_rel="sub/deep/wide_mask001.png")  # fmt: skip

    Image.fromarray(_noise_image(rng, 20, 20)).save(images / "wrong_size.png")
    _save_mask(masks / "wrong_size.png", np.full((10, 10), 255, np.uint8))
    Image.fromarray(_noise_image(rng, 20, 20)).save(images / "unmasked.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    _save_mask(masks / "corrupt.png", np.full((20, 20), 255, np.uint8))
    failing = ["corrupt.png", "unmasked.png", "wrong_size.png"]
    return {"images": images, "masks": masks, "good": good, "failing": failing}


def decoded(path: Path) -> Image.Image:
    """The input as the product promises to treat it: EXIF orientation applied."""
    return ImageOps.exif_transpose(Image.open(path))


def expected_mode(img: Image.Image) -> str:
    if img.mode == "P" and "transparency" in img.info:
        return "RGBA"
    return {"P": "RGB", "CMYK": "RGB", "I;16B": "I;16", "I": "I;16"}.get(img.mode, img.mode)


def assert_outside_unchanged(source: Path, output: Path, hole: np.ndarray) -> None:
    src = decoded(source)
    out = Image.open(output)
    assert out.size == src.size
    assert out.mode == expected_mode(src)
    src_pixels = np.asarray(src.convert(out.mode) if out.mode != src.mode else src)
    out_pixels = np.asarray(out)
    assert np.array_equal(src_pixels[~hole], out_pixels[~hole])


def invoke(*args: str):
    return CliRunner().invoke(app, ["run", *map(str, args)])


@pytest.fixture()
def mixed(tmp_path: Path) -> dict:
    return make_mixed_folder(tmp_path)


def base_args(folder: dict, model: Path, out: Path) -> list:
    return [folder["images"], "--masks", folder["masks"], "--out", out, "--model", model,
            "--num-workers", "0", "--batch-size", "7"]  # fmt: skip


def test_mixed_folder_outputs_failures_and_resume(mixed: dict, tiny_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = invoke(*base_args(mixed, tiny_model, out))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for name in mixed["failing"]:
        lines = [line for line in result.stderr.splitlines() if name in line]
        assert len(lines) == 1, result.stderr
    assert "640x480" not in result.stderr or "shrunk" in result.stderr
    assert "big.jpg" in result.stderr and "shrunk" in result.stderr  # 640x480 hole: soft fill
    for rel, hole in mixed["good"].items():
        output = out / Path(rel).with_suffix(".png")
        assert_outside_unchanged(mixed["images"] / rel, output, hole)
        filled = np.asarray(Image.open(output))
        source = np.asarray(decoded(mixed["images"] / rel).convert(Image.open(output).mode))
        assert not np.array_equal(filled[hole], source[hole])  # the hole was filled
    rgba_in = np.asarray(decoded(mixed["images"] / "sub/alpha.png"))
    rgba_out = np.asarray(Image.open(out / "sub/alpha.png"))
    assert np.array_equal(rgba_in[:, :, 3], rgba_out[:, :, 3])  # alpha untouched, hole included
    assert Image.open(out / "sub/deep/rotated.png").size == (24, 48)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["file"] for f in failures) == mixed["failing"]
    summary_line = result.stdout.strip().splitlines()[-1]
    assert f"done {len(mixed['good'])}, skipped 0, failed 3" in summary_line
    # nothing but outputs and the two records in OUT
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = sorted(str(Path(r).with_suffix(".png")) for r in mixed["good"])
    assert written == sorted(expected + ["failures.jsonl", "manifest.jsonl"])

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = invoke(*base_args(mixed, tiny_model, out), "--json")
    assert again.exit_code == 1
    summary = json.loads(again.stdout)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, len(mixed["good"]), 3)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


def _pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


def _pixels(out: Path) -> dict[str, bytes]:
    """The outputs' pixels: runs from other inputs (a caption from another place) write other
    input fingerprints into the files, so their bytes differ even where the fills agree."""
    return {name: Image.open(io.BytesIO(data)).tobytes() for name, data in _pngs(out).items()}


def test_same_seed_same_bytes_and_batch_size_tolerance(mixed: dict, tiny_model: Path, tmp_path):
    def run(out: str, batch: int, seed: int = 3, workers: int = 0) -> dict:
        options = RunOptions(images=mixed["images"], masks=mixed["masks"], out=tmp_path / out,
                             model=tiny_model, batch_size=batch, seed=seed, samples=2,
                             num_workers=workers)  # fmt: skip
        run_folder(options)
        return _pngs(tmp_path / out)

    first, second = run("a", 7), run("b", 7, workers=2)
    assert first == second and len(first) == 2 * len(mixed["good"])
    assert run("c", 7, seed=4) != first
    single = run("d", 1)
    changed = total = 0
    for name, data in first.items():
        a = np.asarray(Image.open(io.BytesIO(data))).astype(np.int32)
        b = np.asarray(Image.open(io.BytesIO(single[name]))).astype(np.int32)
        # 16-bit outputs would count 257 per level; this folder has none
        assert np.abs(a - b).max() <= 1, name
        changed += int((a != b).sum())
        total += a.size
    assert changed <= 0.001 * total


def test_one_fill_defaults_to_temperature_0_and_several_to_0_8(mixed, tiny_model, tmp_path):
    def run(out: str, seed: int, **changes: object) -> dict:
        options = RunOptions(images=mixed["images"], masks=mixed["masks"], out=tmp_path / out,
                             model=tiny_model, seed=seed, num_workers=0, **changes)  # fmt: skip
        run_folder(options)
        return _pngs(tmp_path / out)

    assert RunOptions(Path("i"), Path("m"), Path("o")).temperature == 0.0
    assert RunOptions(Path("i"), Path("m"), Path("o"), samples=3).temperature == 0.8
    # one fill at T=0 draws no noise: the seed does not matter; with noise it does
    assert run("a", seed=1) == run("b", seed=2)
    assert run("c", seed=1, temperature=0.8) != run("d", seed=2, temperature=0.8)


def test_dry_run_writes_nothing(mixed: dict, tiny_model: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = invoke(*base_args(mixed, tiny_model, out), "--dry-run", "--json")
    assert result.exit_code == 1  # three files would fail
    summary = json.loads(result.stdout)
    assert summary["would_fill"] == len(mixed["good"])  # the rotated photo's mask fits it
    failing = {p["file"]: p["problem"] for p in summary["plan"] if p["action"] == "fail"}
    assert sorted(failing) == mixed["failing"]  # headers show the corrupt file, the wrong size
    assert "corrupt or truncated image" in failing["corrupt.png"]
    assert "mask is 10x10 but the image is 20x20" in failing["wrong_size.png"]
    assert not out.exists()
    resized = invoke(*base_args(mixed, tiny_model, out), "--dry-run", "--json", "--resize-masks")
    assert json.loads(resized.stdout)["would_fill"] == len(mixed["good"]) + 1


def test_manifest_refuses_other_settings_unless_overwrite(mixed, tiny_model, tmp_path):
    single = tmp_path / "one"
    (single / "masks").mkdir(parents=True)
    shutil.copy(mixed["images"] / "small.png", single / "small.png")
    shutil.copy(mixed["masks"] / "small.png", single / "masks" / "small.png")
    out = tmp_path / "out"
    args = [single / "small.png", "--masks", single / "masks", "--out", out, "--model",
            tiny_model, "--num-workers", "0"]  # fmt: skip
    assert invoke(*args).exit_code == 0
    refused = invoke(*args, "--seed", "5")
    assert refused.exit_code == 2
    assert "manifest.jsonl" in refused.stderr and "seed 0 -> 5" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    redone = invoke(*args, "--seed", "5", "--overwrite", "--json")
    assert redone.exit_code == 0 and json.loads(redone.stdout)["done"] == 1
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["settings"]["seed"] for r in records] == [5]
    assert len(records[0]["settings"]["model_sha256"]) == 64


def test_overwrite_with_fewer_samples_leaves_no_stale_outputs(mixed, tiny_model, tmp_path):
    single = tmp_path / "one"
    (single / "masks").mkdir(parents=True)
    for name in ("small.png", "sub/grey.png"):
        shutil.copy(mixed["images"] / name, single / Path(name).name)
        shutil.copy(mixed["masks"] / name, single / "masks" / Path(name).name)
    out = tmp_path / "out"
    args = [single, "--masks", single / "masks", "--out", out, "--model", tiny_model,
            "--num-workers", "0"]  # fmt: skip

    def written() -> set[str]:
        return {p.name for p in out.glob("*.png")}

    assert (
        invoke(*args, "--samples", "3", "--save-uncertainty", "--save-mask-overlay").exit_code == 0
    )
    assert written() == {f"{stem}{end}" for stem in ("small", "grey")
                         for end in ("_0.png", "_1.png", "_2.png", "_uncertainty.png",
                                     "_overlay.png")}  # fmt: skip
    (out / "small_9.png").write_bytes(b"a file no run wrote")  # never removed
    redone = invoke(*args, "--overwrite", "--samples", "2")
    assert redone.exit_code == 0, redone.stderr
    assert "removed 6 output(s) of an earlier run" in redone.stderr
    expected = {"small_0.png", "small_1.png", "grey_0.png", "grey_1.png", "small_9.png"}
    assert written() == expected
    assert invoke(*args, "--overwrite").exit_code == 0  # one sample: <stem>.png
    assert written() == {"small.png", "grey.png", "small_9.png"}
    assert (out / "small_9.png").read_bytes() == b"a file no run wrote"
    # an image filled again because its mask changed loses its old overlay; the others keep
    # theirs (a rerun without the flag is no reason to delete them)
    assert invoke(*args, "--save-mask-overlay").exit_code == 0
    mask = single / "masks" / "small.png"
    Image.fromarray(255 - np.asarray(Image.open(mask).convert("L"))).save(mask)
    refilled = invoke(*args)
    assert refilled.exit_code == 0 and "removed 1 output(s)" in refilled.stderr, refilled.stderr
    assert written() == {"small.png", "grey.png", "grey_overlay.png", "small_9.png"}


def test_a_second_run_into_the_same_out_is_refused_while_one_runs(mixed, tiny_model, tmp_path):
    from inpaint_cli.images import output_lock

    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out, "run"):  # as a running `inpaint run` holds it
        refused = invoke(*base_args(mixed, tiny_model, out))
    assert refused.exit_code == 2
    assert (
        refused.stderr.strip() == f"error: {out}: another `inpaint run` is writing to this folder"
    )
    assert list(out.iterdir()) == []
    assert invoke(*base_args(mixed, tiny_model, out)).exit_code == 1  # two bad files, as above


def test_single_mask_for_all_with_resize_and_dilate(mixed, tiny_model, tmp_path):
    mask = np.zeros((10, 10), np.uint8)
    mask[4:6, 4:6] = 255
    _save_mask(tmp_path / "one_mask.png", mask)
    out = tmp_path / "out"
    (mixed["images"] / "corrupt.png").unlink()
    result = invoke(mixed["images"], "--masks", tmp_path / "one_mask.png", "--out", out,
                    "--model", tiny_model, "--num-workers", "0", "--resize-masks",
                    "--dilate", "2", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"] == len(mixed["good"]) + 2
    small_in = np.asarray(decoded(mixed["images"] / "small.png"), np.int32)
    small_out = np.asarray(Image.open(out / "small.png"), np.int32)
    changed = np.any(small_in != small_out, axis=2)
    # resized mask: rows/cols 40%..60% of 23x17, grown by 2 px: nothing outside that changed
    ys, xs = np.nonzero(changed)
    assert changed.any() and ys.min() >= 9 - 2 and ys.max() <= 13 + 2 and xs.max() <= 10 + 2


def test_masks_beside_images_are_not_images(tmp_path: Path, tiny_model: Path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    folder.mkdir()
    for stem in ("cat", "dog"):
        Image.fromarray(_noise_image(rng, 32, 24)).save(folder / f"{stem}.jpg")
        _save_mask(folder / f"{stem}_mask.png", _box_mask(32, 24, [(0.2, 0.2, 0.5, 0.5)]))
    out = tmp_path / "out"
    result = invoke(folder, "--masks", folder, "--out", out, "--model", tiny_model,
                    "--num-workers", "0", "--samples", "3", "--save-mask-overlay",
                    "--save-uncertainty", "--grid", tmp_path / "grid.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(
        f"{s}_{suffix}.png" for s in ("cat", "dog") for suffix in ("0", "1", "2", "overlay",
                                                                     "uncertainty")
    )  # fmt: skip
    heat = np.asarray(Image.open(out / "cat_uncertainty.png"))
    assert heat.shape == (24, 32, 3)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (128 * 4, 128 * 2)


def test_stem_clash_keeps_extensions(tmp_path: Path, tiny_model: Path):
    rng = np.random.default_rng(1)
    folder, masks = tmp_path / "in", tmp_path / "masks"
    folder.mkdir()
    Image.fromarray(_noise_image(rng, 20, 20)).save(folder / "a.jpg")
    Image.fromarray(_noise_image(rng, 20, 20)).save(folder / "a.png")
    _save_mask(masks / "a.png", _box_mask(20, 20, [(0.3, 0.3, 0.6, 0.6)]))
    out = tmp_path / "out"
    result = invoke(folder, "--masks", masks, "--out", out, "--model", tiny_model,
                    "--num-workers", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == ["a.jpg.png", "a.png.png"]
    assert "a.jpg -> a.jpg.png" in result.stderr
    several = invoke(folder, "--masks", masks, "--out", tmp_path / "out2", "--model", tiny_model,
                     "--samples", "2", "--dry-run")  # fmt: skip
    assert "a.jpg -> a.jpg_0.png, a.jpg_1.png; a.png -> a.png_0.png, a.png_1.png" in several.stderr


def test_output_inside_input_is_skipped_and_same_folder_refused(tmp_path, tiny_model):
    rng = np.random.default_rng(2)
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_noise_image(rng, 20, 20)).save(folder / "x.png")
    _save_mask(tmp_path / "m" / "x.png", _box_mask(20, 20, [(0.3, 0.3, 0.6, 0.6)]))
    args = ["--masks", tmp_path / "m", "--model", tiny_model, "--num-workers", "0", "--json"]
    first = invoke(folder, "--out", folder / "filled", *args)
    assert first.exit_code == 0 and json.loads(first.stdout)["total"] == 1
    second = invoke(folder, "--out", folder / "filled", *args)
    assert json.loads(second.stdout)["total"] == 1  # filled/x.png is not taken as an input
    same = invoke(folder, "--out", folder, *args)
    assert same.exit_code == 2 and "IMAGES folder itself" in same.stderr
    original = (folder / "x.png").read_bytes()
    onto_itself = invoke(folder / "x.png", "--out", folder, *args)  # x.png -> x.png
    assert onto_itself.exit_code == 2 and "the folder of x.png" in onto_itself.stderr
    assert (folder / "x.png").read_bytes() == original


def _photo(path: Path, seed: int = 0) -> bytes:
    """A 24x20 image at `path` with its mask beside it in ../masks; returns the image bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise_image(np.random.default_rng(seed), 24, 20)).save(path)
    return path.read_bytes()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


HOLE = [(0.3, 0.3, 0.6, 0.6)]


@pytest.mark.parametrize(
    "case, problem",
    [
        ("folder_of_single_image", "--out is the folder of cat.jpg"),
        ("out_contains_images", "--out contains the images"),
        ("out_is_masks", "--out is the MASKS folder itself"),
    ],
)
def test_out_that_could_replace_or_mix_with_inputs_is_refused(case, problem, tmp_path, tiny_model,
                                                              monkeypatch):  # fmt: skip
    proj = tmp_path / "proj"
    _photo(proj / "photos" / "cat.jpg")
    _photo(proj / "photos" / "cat.png", seed=1)  # the user's own, not an input of the run
    _save_mask(proj / "masks" / "cat.png", _box_mask(24, 20, HOLE))
    monkeypatch.chdir(proj)
    images, out = {
        "folder_of_single_image": ("photos/cat.jpg", "photos"),
        "out_contains_images": ("photos", "."),
        "out_is_masks": ("photos/cat.jpg", "masks"),
    }[case]
    before = _files(proj)
    result = invoke(images, "--masks", "masks", "--out", out, "--model", tiny_model,
                    "--num-workers", "0", "--overwrite")  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: ") and problem in lines[0]
    assert _files(proj) == before


def test_existing_files_in_an_out_without_manifest_are_not_outputs(tmp_path, tiny_model):
    images, masks, out = tmp_path / "photos", tmp_path / "masks", tmp_path / "filled"
    for stem in ("cat", "dog", "owl"):
        _photo(images / f"{stem}.jpg")
        _save_mask(masks / f"{stem}.png", _box_mask(24, 20, HOLE))
    mine = _photo(out / "cat.png", seed=1) + _photo(out / "dog.png", seed=2)
    args = [images, "--masks", masks, "--out", out, "--model", tiny_model, "--num-workers", "0"]
    for extra in ([], ["--overwrite"], ["--dry-run"]):
        result = invoke(*args, *extra)
        assert result.exit_code == 2, result.output
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: {out / 'cat.png'}: already exists, and {out} has no ")
        assert "manifest.jsonl" in line and "(2 planned output file(s) exist there)" in line
        assert (out / "cat.png").read_bytes() + (out / "dog.png").read_bytes() == mine
        assert sorted(p.name for p in out.iterdir()) == ["cat.png", "dog.png"]
    # outputs inpaint run wrote (the folder has its manifest) are skipped, or redone
    (out / "cat.png").unlink()
    (out / "dog.png").unlink()
    assert invoke(*args).exit_code == 0
    again = invoke(*args, "--json")
    assert again.exit_code == 0 and json.loads(again.stdout)["skipped"] == 3
    redone = invoke(*args, "--json", "--overwrite")
    assert redone.exit_code == 0 and json.loads(redone.stdout)["done"] == 3


def test_symlinked_folders_of_images_and_masks_are_followed(tmp_path, tiny_model):
    images, masks, disk = tmp_path / "photos", tmp_path / "masks", tmp_path / "disk"
    _photo(disk / "photos2024" / "cat.jpg")
    _save_mask(disk / "masks2024" / "cat.png", _box_mask(24, 20, HOLE))
    images.mkdir()
    masks.mkdir()
    (images / "2024").symlink_to(disk / "photos2024", target_is_directory=True)
    (masks / "2024").symlink_to(disk / "masks2024", target_is_directory=True)
    out = tmp_path / "out"
    result = invoke(images, "--masks", masks, "--out", out, "--model", tiny_model,
                    "--num-workers", "0", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"] == 1 and (out / "2024" / "cat.png").is_file()


def test_control_characters_in_file_names_keep_messages_on_one_line(tmp_path, tiny_model):
    images, masks = tmp_path / "photos", tmp_path / "masks"
    for name in ("good.jpg", "evil\nerror: forged.jpg", "evil\nerror: forged.png", "no\nmask.jpg"):
        _photo(images / name)
    for stem in ("good", "evil\nerror: forged"):
        _save_mask(masks / f"{stem}.png", _box_mask(24, 20, HOLE))
    result = invoke(images, "--masks", masks, "--out", tmp_path / "out", "--model", tiny_model,
                    "--num-workers", "0")  # fmt: skip
    assert result.exit_code == 1, result.output  # no mask for one image
    lines = result.stderr.splitlines()
    assert not any(line.startswith(("error: forged", "mask")) for line in lines), lines
    assert any("no\\nmask.jpg: no mask found" in line for line in lines), lines
    assert any("evil\\nerror: forged.jpg -> evil\\nerror: forged.jpg.png" in line for line in lines)
    # --dry-run lists one line per image (and the summary), names escaped the same way
    result = invoke(images, "--masks", masks, "--out", tmp_path / "planned", "--model", tiny_model,
                    "--dry-run")  # fmt: skip
    listed = result.stdout.splitlines()
    assert len(listed) == 5 and listed[-1].startswith("done 0, skipped 0, failed 1 of 4"), listed
    assert all(line.startswith(("fill ", "fail ")) for line in listed[:-1]), listed


def test_a_mask_that_looks_inverted_is_warned_about_and_still_filled(tmp_path, tiny_model):
    images, masks = tmp_path / "photos", tmp_path / "masks"
    _photo(images / "cat.jpg")
    _photo(images / "dog.jpg")
    _save_mask(masks / "cat.png", 255 - _box_mask(24, 20, HOLE))  # black hole on white
    _save_mask(masks / "dog.png", _box_mask(24, 20, HOLE))
    result = invoke(images, "--masks", masks, "--out", tmp_path / "out", "--model", tiny_model,
                    "--num-workers", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "inverted" in line]
    assert warnings == [
        f"warning: {images / 'cat.jpg'}: the hole covers 91% of the image (white = hole); "
        "is the mask inverted?"
    ]
    assert (tmp_path / "out" / "cat.png").is_file() and (tmp_path / "out" / "dog.png").is_file()


def test_an_animated_image_fills_its_first_frame_with_a_note(tmp_path, tiny_model):
    images, masks = tmp_path / "photos", tmp_path / "masks"
    images.mkdir()
    frames = [Image.new("RGB", (24, 20), colour) for colour in ("red", "blue", "green")]
    frames[0].save(images / "blink.gif", save_all=True, append_images=frames[1:], duration=100)
    _save_mask(masks / "blink.png", _box_mask(24, 20, HOLE))
    result = invoke(images, "--masks", masks, "--out", tmp_path / "out", "--model", tiny_model,
                    "--num-workers", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"note: {images / 'blink.gif'}: 3 frames, the first is filled" in result.stderr
    filled = np.asarray(Image.open(tmp_path / "out" / "blink.png").convert("RGB"))
    assert (filled[0, 0] == (255, 0, 0)).all()  # outside the hole: the first frame's pixels


def test_masks_inside_out_are_found(tmp_path, tiny_model):
    images, out = tmp_path / "photos", tmp_path / "results"
    _photo(images / "cat.jpg")
    _save_mask(out / "masks" / "cat.png", _box_mask(24, 20, HOLE))
    args = [images, "--masks", out / "masks", "--out", out, "--model", tiny_model,
            "--num-workers", "0", "--json"]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"] == 1 and (out / "cat.png").is_file()
    assert json.loads(invoke(*args).stdout)["skipped"] == 1


def test_masks_inside_images_are_not_inputs(tmp_path, tiny_model, monkeypatch):
    p2 = tmp_path / "p2"
    _photo(p2 / "cat.jpg")
    _save_mask(p2 / "masks" / "cat.png", _box_mask(24, 20, HOLE))
    monkeypatch.chdir(p2)
    result = invoke(".", "--masks", "masks", "--out", "../out", "--model", tiny_model,
                    "--num-workers", "0", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["done"]) == (1, 1)
    # one mask file for every image, kept in the IMAGES folder: it is no input either
    _save_mask(p2 / "everywhere.png", _box_mask(24, 20, HOLE))
    (p2 / "masks" / "cat.png").unlink()
    (p2 / "masks").rmdir()
    result = invoke(".", "--masks", "everywhere.png", "--out", "../out2", "--model", tiny_model,
                    "--num-workers", "0", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total"] == 1


@pytest.mark.parametrize(
    "case, problem",
    [
        ("input", "is an input image"),
        ("inside_images", "is inside IMAGES"),
        ("inside_masks", "is inside MASKS"),
        ("output", "is an output of cat.jpg"),
        ("manifest", "is a record of"),
        ("failures", "is a record of"),
    ],
)
def test_grid_that_would_replace_or_be_read_back_is_refused(case, problem, tmp_path, tiny_model):
    images, masks, out = tmp_path / "photos", tmp_path / "masks", tmp_path / "filled"
    _photo(images / "cat.jpg")
    _photo(images / "dog.png", seed=1)
    for stem in ("cat", "dog"):
        _save_mask(masks / f"{stem}.png", _box_mask(24, 20, HOLE))
    grid = {
        "input": images / "dog.png",
        "inside_images": images / "grid.png",
        "inside_masks": masks / "grid.png",
        "output": out / "cat.png",
        "manifest": out / "manifest.jsonl",
        "failures": out / "failures.jsonl",
    }[case]
    before = _files(tmp_path)
    result = invoke(images, "--masks", masks, "--out", out, "--model", tiny_model,
                    "--num-workers", "0", "--grid", grid)  # fmt: skip
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {grid}: ") and problem in line
    assert _files(tmp_path) == before


def test_grid_inside_an_out_inside_images_is_not_read_back(tmp_path, tiny_model):
    images, masks = tmp_path / "photos", tmp_path / "masks"
    _photo(images / "cat.jpg")
    _save_mask(masks / "cat.png", _box_mask(24, 20, HOLE))
    args = [images, "--masks", masks, "--out", images / "filled", "--model", tiny_model,
            "--num-workers", "0", "--grid", images / "filled" / "grid.png", "--json"]  # fmt: skip
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert (images / "filled" / "grid.png").is_file()
    assert json.loads(invoke(*args).stdout)["total"] == 1


@pytest.mark.parametrize("case", ["missing", "empty", "out_is_file", "masks_missing"])
def test_bad_paths_are_usage_errors(case: str, tmp_path: Path, tiny_model: Path):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    masks.mkdir()
    if case != "missing":
        images.mkdir()
    if case in ("out_is_file", "masks_missing"):
        Image.new("RGB", (8, 8)).save(images / "a.png")
    if case == "out_is_file":
        out.write_text("a file")
    if case == "masks_missing":
        masks.rmdir()
    result = invoke(images, "--masks", masks, "--out", out, "--model", tiny_model)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    named = {"missing": "images", "empty": "images", "out_is_file": "out", "masks_missing": "masks"}
    assert str(tmp_path / named[case]) in lines[0]
    assert "Traceback" not in result.output


def test_not_a_model_folder_and_bad_options(tmp_path: Path, mixed: dict):
    (tmp_path / "junk").mkdir()
    result = invoke(mixed["images"], "--masks", mixed["masks"], "--out", tmp_path / "o",
                    "--model", tmp_path / "junk")  # fmt: skip
    assert result.exit_code == 2 and "not a model folder" in result.stderr
    (tmp_path / "junk" / "run.json").write_text("{}")  # a training run: its best/ is the model
    result = invoke(mixed["images"], "--masks", mixed["masks"], "--out", tmp_path / "o",
                    "--model", tmp_path / "junk")  # fmt: skip
    assert f"it is a training run: use {tmp_path / 'junk' / 'best'}" in result.stderr
    with pytest.raises(InpaintError) as error:
        run_folder(RunOptions(mixed["images"], mixed["masks"], tmp_path / "o", samples=0))
    assert error.value.exit_code == 2 and "--samples" in str(error.value)
    for bad in ("--batch-size", "--samples"):
        assert invoke(mixed["images"], "--masks", mixed["masks"], "--out", tmp_path / "o",
                      bad, "0").exit_code == 2  # fmt: skip
    result = invoke(mixed["images"], "--masks", mixed["masks"], "--out", tmp_path / "o",
                    "--temperature", "inf")  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --temperature must be a finite number >= 0, got inf"
    for value in (float("inf"), float("nan")):  # the CLI already refuses nan itself
        with pytest.raises(InpaintError, match="--temperature must be a finite number"):
            run_folder(RunOptions(mixed["images"], mixed["masks"], tmp_path / "o",
                                  temperature=value))  # fmt: skip
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- windows


def test_dilate_grows_holes_by_euclidean_distance_for_any_radius():
    mask = np.zeros((40, 50), bool)
    mask[10, 12] = mask[30, 40] = True
    ys, xs = np.mgrid[:40, :50]
    nearest = np.minimum(np.hypot(ys - 10, xs - 12), np.hypot(ys - 30, xs - 40))
    for radius in (1, 3, 7):
        assert np.array_equal(dilate_mask(mask, radius), nearest <= radius)
    assert dilate_mask(mask, 10**6).all()  # no kernel is built, so a huge radius costs nothing
    assert dilate_mask(mask, 0) is mask and not dilate_mask(np.zeros((4, 4), bool), 5).any()


def test_a_semi_transparent_hole_is_not_blended_with_white_twice():
    """The model fills the image flattened onto white; the output keeps the input's alpha."""
    from inpaint_cli.images import image_to_rgb_uint8

    alphas = np.array([[0, 40, 128, 200, 255]], dtype=np.uint8)
    rgba = np.zeros((1, 5, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 40, 90)
    rgba[..., 3] = alphas
    flat = image_to_rgb_uint8(Image.fromarray(rgba, "RGBA"))  # what a perfect fill returns
    hole = np.ones((1, 5), dtype=bool)
    out = np.asarray(compose_output("RGBA", rgba, flat, hole)).astype(int)
    assert np.array_equal(out[..., 3], alphas)
    for i, alpha in enumerate(alphas[0]):
        if alpha == 0:  # nothing shows: the fill's own colours, not black
            assert out[0, i, :3].tolist() == flat[0, i].tolist()
        else:  # within the rounding of one 8-bit blend, scaled up by 1/alpha
            tolerance = 255 / alpha + 1
            assert np.abs(out[0, i, :3] - [200, 40, 90]).max() <= tolerance, (alpha, out[0, i])
    # drawn on white, the output looks like the fill that the model made
    shown = image_to_rgb_uint8(Image.fromarray(out.astype(np.uint8), "RGBA")).astype(int)
    assert np.abs(shown - flat).max() <= 1
    la = np.stack([np.full((1, 5), 60, np.uint8), alphas], axis=-1)
    flat_grey = image_to_rgb_uint8(Image.fromarray(la, "LA"))
    out_la = np.asarray(compose_output("LA", la, flat_grey, hole)).astype(int)
    assert np.abs(out_la[0, 2:, 0] - 60).max() <= 3 and np.array_equal(out_la[..., 1], alphas)


def test_far_apart_holes_get_separate_windows_and_paste_only_holes():
    mask = np.zeros((300, 400), bool)
    mask[10:20, 10:30] = True
    mask[250:280, 350:390] = True
    found = hole_windows(mask, 16)
    assert len(found) == 2
    for window in found:
        assert 0 <= window.x0 and window.x0 + window.side <= 400
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    canvas = image.copy()
    for window in found:
        crop, hole = crop_window(image, mask, window, 16)
        assert crop.shape == (16, 16, 3) and hole.any()
        paste_window(canvas, mask, window, np.zeros((16, 16, 3), np.float32))
    assert np.array_equal(canvas[~mask], image[~mask])
    assert (canvas[mask] == 0).all()
    near = mask.copy()
    near[22:25, 32:35] = True  # close to the first hole: one window for both
    assert len(hole_windows(near, 16)) == 2
    whole = np.ones((30, 50), bool)
    (window,) = hole_windows(whole, 16)
    assert window.side == 50 and window.y0 < 0  # taller than the image: padded as hole


def test_a_long_thin_hole_is_tiled_and_every_hole_pixel_pasted_once():
    import cv2

    mask = np.zeros((400, 600), bool)
    line = np.zeros((400, 600), np.uint8)
    cv2.line(line, (20, 30), (580, 370), 255, 6)  # a 6 px scratch across the image
    mask |= line > 0
    found = hole_windows(mask, 16)
    tiles = [w for w in found if w.core is not None]
    assert len(tiles) > 10 and len(found) == len(tiles)
    # sized for the scratch's width (no shrinking), not for its 600 px extent
    assert max(w.shrink(16) for w in tiles) < 1.5  # one window would be shrunk 37x
    compact = np.zeros((400, 600), bool)
    compact[300:340, 40:80] = True  # a compact hole keeps one window around all of it
    (box_window,) = hole_windows(compact, 16)
    assert box_window.core is None and box_window.side >= 40
    # the cells take each hole pixel exactly once; a tile pastes its cell and a margin, inside
    # its window, and cross-fades with exactly the earlier tiles whose paste boxes it overlaps
    owners = np.zeros(mask.shape, int)
    for n, window in enumerate(tiles):
        x0, y0, x1, y1 = window.core
        owners[y0:y1, x0:x1] += mask[y0:y1, x0:x1]
        px0, py0, px1, py1 = window.paste_box
        assert window.x0 <= px0 <= x0 < x1 <= px1 <= window.x0 + window.side
        assert window.y0 <= py0 <= y0 < y1 <= py1 <= window.y0 + window.side
        overlapping = {
            w.paste_box
            for w in tiles[:n]
            if w.paste_box[0] < px1 and px0 < w.paste_box[2]
            and w.paste_box[1] < py1 and py0 < w.paste_box[3]
        }  # fmt: skip
        assert set(window.blend_with) == overlapping
    assert (owners[mask] == 1).all() and (owners[~mask] == 0).all()
    assert hole_windows(mask, 16) == found  # deterministic: window indices seed generators

    # pasting the same colour everywhere gives that colour: the cross-fades add nothing
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    canvas = image.copy()
    for window in found:
        crop, hole = crop_window(image, mask, window, 16)
        assert hole.any()
        paste_window(canvas, mask, window, np.full((16, 16, 3), 90, np.float32))
    assert np.array_equal(canvas[~mask], image[~mask]) and (canvas[mask] == 90).all()


def test_neighbouring_tiles_cross_fade_instead_of_meeting_at_a_seam():
    mask = np.zeros((40, 400), bool)
    mask[18:22, 10:390] = True  # a 4 px line: tiles of 16 px windows, 8 px cells
    found = hole_windows(mask, 16)
    assert len(found) > 20 and all(w.core is not None for w in found)
    canvas = np.zeros((40, 400, 3), np.uint8)
    for k, window in enumerate(found):  # the tiles' fills alternate black and white
        paste_window(canvas, mask, window, np.full((16, 16, 3), 200.0 * (k % 2), np.float32))
    row = canvas[20, 10:390, 0].astype(int)
    for k, window in enumerate(found):
        x0, _, x1, _ = window.core
        margin = x0 + (x1 - x0) // 4 + 1, x1 - (x1 - x0) // 4 - 1
        # deep inside its cell each tile's own fill; near the cell's edges a blend
        assert (canvas[20, margin[0] : margin[1], 0] == 200 * (k % 2)).all()
    steps = np.abs(np.diff(row))
    assert steps.max() < 200 and len(set(row.tolist())) > 4  # no jump from black to white


# ----------------------------------------------------------------------------- captions


@pytest.fixture(scope="session")
def default_encoder_identity() -> dict:
    from conditioning import TextEncoder

    return TextEncoder().identity()


def _caption_model(folder: Path, identity: dict) -> Path:
    random_tiny_model(caption_dim=identity["dim"], text_encoder=identity).save_pretrained(folder)
    return folder


def _caption_folder(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    images, masks = root / "images", root / "masks"
    images.mkdir()
    for stem in ("listed", "sidecar", "plain"):
        Image.fromarray(_noise_image(rng, 24, 24)).save(images / f"{stem}.png")
        _save_mask(masks / f"{stem}.png", _box_mask(24, 24, [(0.2, 0.2, 0.7, 0.7)]))
    (images / "sidecar.txt").write_text("a red apple\n", encoding="utf-8")
    return images, masks


@pytest.mark.parametrize(
    "name, text",
    [
        ("captions.csv", "file_name,text\nlisted.png,a red apple\n"),
        ("metadata.jsonl", json.dumps({"file_name": "listed.png", "text": "a red apple"}) + "\n"),
    ],
)
def test_caption_file_with_a_byte_order_mark(name, text, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # Excel's "CSV UTF-8"
    assert read_caption_file(path) == {"listed.png": "a red apple"}


def test_captions_that_name_no_image_are_warned_about(tmp_path, tiny_model):
    images, masks = _caption_folder(tmp_path)
    captions = tmp_path / "captions.jsonl"
    rows = [
        {"file_name": "listed.png", "text": "ok"},
        {"file_name": "photos/plain.png", "text": "x"},
    ]
    captions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = invoke(images, "--masks", masks, "--out", tmp_path / "out", "--model", tiny_model,
                    "--caption-file", captions, "--dry-run")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 of 2 captions name no image" in result.stderr
    assert "'photos/plain.png'" in result.stderr


def test_caption_file_names_relative_to_its_folder_and_a_single_image(tmp_path, tiny_model):
    """A single image given from a captioned folder took no caption, silently."""
    images, masks = _caption_folder(tmp_path)
    (images / "trip").mkdir()
    shutil.move(images / "plain.png", images / "trip" / "plain.png")
    metadata = tmp_path / "metadata.jsonl"  # above IMAGES, names relative to its own folder
    rows = [{"file_name": "images/listed.png", "text": "a red apple"},
            {"file_name": "images/trip/plain.png", "text": "a blue sky"}]  # fmt: skip
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def planned(source: Path, caption_file: Path) -> tuple[dict, list[str]]:
        options = RunOptions(images=source, masks=masks, out=tmp_path / "out",
                             caption_file=caption_file)  # fmt: skip
        root, files = run_plan.discover(source, tmp_path / "out", masks)
        warnings: list[str] = []
        items = run_plan.plan(options, root, files, masks, tmp_path / "out", warnings.append)
        return {item.rel: item.caption for item in items}, warnings

    captions, warnings = planned(images, metadata)
    assert captions == {"listed.png": "a red apple", "sidecar.png": None,
                        "trip/plain.png": "a blue sky"}  # fmt: skip
    assert warnings == []
    one = images / "trip" / "plain.png"
    assert planned(one, metadata) == ({"plain.png": "a blue sky"}, [])
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "trip/plain.png",
                                                       "text": "a green leaf"}) + "\n")  # fmt: skip
    assert planned(one, images / "metadata.jsonl")[0] == {"plain.png": "a green leaf"}
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"file_name": "listed.png", "text": "x"}) + "\n")
    captions, warnings = planned(one, other)
    assert captions == {"plain.png": None} and len(warnings) == 1
    assert warnings[0].startswith(f"warning: {other}: no caption names {one}; it is filled")


def test_model_without_captions_ignores_them_with_one_warning(tmp_path, tiny_model):
    images, masks = _caption_folder(tmp_path)
    result = invoke(images, "--masks", masks, "--out", tmp_path / "out", "--model", tiny_model,
                    "--num-workers", "0", "--caption", "a red apple")  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "caption" in line]
    assert len(warnings) == 1 and "without captions" in warnings[0]


def test_caption_model_uses_flag_file_and_sidecar(tmp_path, default_encoder_identity):
    model = _caption_model(tmp_path / "model", default_encoder_identity)
    images, masks = _caption_folder(tmp_path)
    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": "listed.png", "text": "a red apple"}) + "\n")

    def run(out: str, **extra) -> dict[str, bytes]:
        options = RunOptions(images=images, masks=masks, out=tmp_path / out, model=model,
                             num_workers=0, batch_size=1, **extra)  # fmt: skip
        assert run_folder(options)["done"] == 3
        return _pixels(tmp_path / out)

    red, blue = run("red", caption="a red apple"), run("blue", caption="a blue sky")
    assert red["plain.png"] != blue["plain.png"]  # the caption reaches the model
    mixed = run("mixed", caption_file=metadata)
    assert mixed["listed.png"] == red["listed.png"]  # from metadata.jsonl
    assert mixed["sidecar.png"] == red["sidecar.png"]  # from sidecar.txt
    assert mixed["plain.png"] not in (red["plain.png"], blue["plain.png"])  # no caption


def test_a_metadata_file_in_images_is_named_when_not_used(tmp_path, default_encoder_identity):
    """inpaint shards and inpaint eval read IMAGES/metadata.jsonl; inpaint run needs
    --caption-file, and a user who just trained a caption model would not know."""
    model = _caption_model(tmp_path / "model", default_encoder_identity)
    images, masks = _caption_folder(tmp_path)
    metadata = images / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": "listed.png", "text": "a red apple"}) + "\n")
    args = [images, "--masks", masks, "--out", tmp_path / "out", "--model", model, "--dry-run"]
    note = f"note: {metadata} is not read by inpaint run on its own; pass --caption-file"
    assert note in invoke(*args).stderr
    assert note not in invoke(*args, "--caption-file", metadata).stderr


def test_a_text_encoder_for_a_model_without_captions_is_said_to_be_ignored(
    mixed, tiny_model, tmp_path
):
    result = invoke(*base_args(mixed, tiny_model, tmp_path / "out"), "--dry-run",
                    "--text-encoder", tmp_path / "no-such-encoder")  # fmt: skip
    assert f"warning: {tiny_model}: the model has no text path; --text-encoder ignored" in (
        result.stderr
    )


def test_caption_strength_from_the_model_config_or_the_flag(tmp_path, default_encoder_identity):
    model = _caption_model(tmp_path / "model", default_encoder_identity)
    images, masks = _caption_folder(tmp_path)

    def run(out: str, *extra) -> dict[str, bytes]:
        result = invoke(images, "--masks", masks, "--out", tmp_path / out, "--model", model,
                        "--num-workers", "0", *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
        return _pixels(tmp_path / out)

    (images / "sidecar.txt").unlink()
    plain = run("plain")  # no captions at all: the learned empty caption
    red = run("red", "--caption", "a red apple")
    assert red != plain
    assert run("zero", "--caption", "a red apple", "--caption-strength", "0") == plain
    half = run("half", "--caption", "a red apple", "--caption-strength", "0.5")
    assert half not in (plain, red)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "caption_strength": 0.5}))
    assert run("from-config", "--caption", "a red apple") == half
    # a folder filled at one strength is not topped up at another
    result = invoke(images, "--masks", masks, "--out", tmp_path / "half", "--model", model,
                    "--caption", "a red apple", "--caption-strength", "1")  # fmt: skip
    assert result.exit_code == 2 and "caption_strength 0.5 -> 1.0" in result.stderr
    (model / "config.json").write_text(json.dumps({**config, "caption_strength": "strong"}))
    result = invoke(images, "--masks", masks, "--out", tmp_path / "bad", "--model", model,
                    "--caption", "a red apple")  # fmt: skip
    assert result.exit_code == 2
    assert "config.json: invalid model config (caption_strength must be a number" in result.stderr
    assert "Traceback" not in result.output
    # every field is checked before planning reads any of them
    (model / "config.json").write_text(json.dumps({**config, "caption_dim": "abc"}))
    result = invoke(images, "--masks", masks, "--out", tmp_path / "bad", "--model", model,
                    "--caption", "a red apple")  # fmt: skip
    assert result.exit_code == 2 and "config.json: invalid model config (caption_dim" in (
        result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_caption_model_refuses_another_text_encoder(tmp_path, default_encoder_identity):
    other = {**default_encoder_identity, "name": "other-encoder", "weights_hash": "0" * 64}
    model = _caption_model(tmp_path / "model", other)
    images, masks = _caption_folder(tmp_path)
    result = invoke(images, "--masks", masks, "--out", tmp_path / "out", "--model", model,
                    "--caption", "a red apple")  # fmt: skip
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "other-encoder" in lines[0] and str(model) in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_bundled_model_is_a_clear_error(tmp_path, monkeypatch, mixed):
    import model.hvae

    monkeypatch.setattr(model.hvae, "default_model_path", lambda: tmp_path / "no-model")
    result = invoke(mixed["images"], "--masks", mixed["masks"], "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "bundled default model" in result.stderr and "--model" in result.stderr


def test_a_rerun_fills_again_the_images_whose_mask_photo_or_caption_changed(tmp_path, tiny_model):
    """Skipping by output name alone kept the old fill after a mask was redrawn."""
    images, masks, out = tmp_path / "photos", tmp_path / "masks", tmp_path / "out"
    for name, seed in (("cat", 0), ("dog", 1), ("owl", 2)):
        _photo(images / f"{name}.jpg", seed)
        _save_mask(masks / f"{name}.png", _box_mask(24, 20, HOLE))
    (images / "owl.txt").write_text("an owl")
    args = [images, "--masks", masks, "--out", out, "--model", tiny_model, "--num-workers", "0"]
    assert invoke(*args).exit_code == 0
    first = _pngs(out)

    # the same inputs copied (newer files, same contents) and by another path: nothing to redo
    copy = tmp_path / "copy"
    shutil.copytree(images, copy, copy_function=shutil.copyfile)
    again = invoke(copy, *args[1:], "--json")
    assert json.loads(again.stdout)["skipped"] == 3, again.output
    assert _pngs(out) == first

    _save_mask(masks / "cat.png", _box_mask(24, 20, [(0.0, 0.0, 0.5, 0.5)]))  # redrawn
    _photo(images / "dog.jpg", seed=7)  # replaced
    (images / "owl.txt").write_text("a snowy owl, hooting")  # recaptioned
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["skipped"]) == (3, 0)
    assert "3 image(s) changed since their outputs were written" in result.stderr
    second = _pngs(out)
    assert second["cat.png"] != first["cat.png"] and second["dog.png"] != first["dog.png"]
    hole = _box_mask(24, 20, [(0.0, 0.0, 0.5, 0.5)]) > 0
    assert_outside_unchanged(images / "cat.jpg", out / "cat.png", hole)  # the new mask's fill
    third = json.loads(invoke(*args, "--json").stdout)
    assert (third["done"], third["skipped"]) == (0, 3)  # and now they are done


def test_a_rerun_from_other_folders_checks_contents_not_dates(tmp_path, tiny_model):
    """Camera files reuse names (IMG_0001.jpg) and keep their old dates when copied: a second
    card's photos, older than the first card's outputs, were skipped as done."""
    import os

    card1, card2, masks, out = (tmp_path / n for n in ("card1", "card2", "masks", "out"))
    for name, seed in (("IMG_0001", 0), ("IMG_0002", 1)):
        _photo(card1 / f"{name}.jpg", seed)
        _photo(card2 / f"{name}.jpg", seed + 10)
        _save_mask(masks / f"{name}.png", _box_mask(24, 20, HOLE))
    for path in card2.iterdir():
        os.utime(path, (1_000_000_000, 1_000_000_000))  # taken in 2001
    for path in masks.iterdir():
        os.utime(path, (1_000_000_000, 1_000_000_000))
    common = ["--masks", masks, "--out", out, "--model", tiny_model, "--num-workers", "0"]
    assert invoke(card1, *common).exit_code == 0
    first = _pngs(out)
    second = invoke(card2, *common, "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["done"] == 2 and "2 image(s) changed" in second.stderr
    assert all(_pngs(out)[name] != first[name] for name in first)
    # the same masks from another folder, and --resize-masks, change no output: no --overwrite
    shutil.copytree(masks, tmp_path / "masks2")
    again = invoke(card2, *common[:1], tmp_path / "masks2", *common[2:], "--resize-masks", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["skipped"] == 2
    # a manifest of an earlier version, which compared these settings too, is still accepted
    manifest = out / "manifest.jsonl"
    record = json.loads(manifest.read_text().splitlines()[-1])
    record["settings"].update(masks="/elsewhere", resize_masks=True, caption_file_sha256=None)
    del record["inputs"]
    manifest.write_text(json.dumps(record) + "\n")
    last = invoke(card2, *common, "--json")
    assert last.exit_code == 0 and json.loads(last.stdout)["skipped"] == 2, last.output


def test_names_match_across_unicode_forms_and_a_doubled_mask_is_named(tmp_path, tiny_model):
    """A photo named on a Mac (é decomposed) and its mask and caption written elsewhere (é
    composed) look the same but differ byte for byte."""
    import unicodedata

    images, masks, out = tmp_path / "photos", tmp_path / "masks", tmp_path / "out"
    decomposed = unicodedata.normalize("NFD", "café")
    composed = unicodedata.normalize("NFC", "café")
    assert decomposed != composed
    _photo(images / f"{decomposed}.jpg")
    _save_mask(masks / f"{composed}.png", _box_mask(24, 20, HOLE))
    _photo(images / "tea.jpg", seed=1)
    _save_mask(masks / "tea.png", _box_mask(24, 20, HOLE))
    _save_mask(masks / "tea.jpg", _box_mask(24, 20, [(0.0, 0.0, 0.2, 0.2)]))
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"file_name": f"{composed}.jpg", "text": "a cup"}) + "\n")
    result = invoke(images, "--masks", masks, "--out", out, "--model", tiny_model,
                    "--caption-file", captions, "--num-workers", "0", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["done"] == 2
    assert "captions name no image" not in result.stderr  # the caption found its photo too
    doubled = [line for line in result.stderr.splitlines() if "several files" in line]
    assert len(doubled) == 1 and "tea.jpg, tea.png" in doubled[0] and "the PNG" in doubled[0]
    assert_outside_unchanged(images / "tea.jpg", out / "tea.png", _box_mask(24, 20, HOLE) > 0)


def test_pictures_in_formats_it_does_not_read_get_one_warning(tmp_path, tiny_model):
    images, masks = tmp_path / "photos", tmp_path / "masks"
    _photo(images / "cat.jpe")  # a JPEG by another extension: filled
    _save_mask(masks / "cat.png", _box_mask(24, 20, HOLE))
    for name in ("IMG_1.heic", "IMG_2.heic", "raw/IMG_3.dng"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(b"not read")
    result = invoke(images, "--masks", masks, "--out", tmp_path / "out", "--model", tiny_model,
                    "--num-workers", "0")  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = [
        line for line in result.stderr.splitlines() if "formats inpaint does not read" in line
    ]
    assert warnings == [
        f"warning: {images}: 3 file(s) in formats inpaint does not read (.dng, .heic) left out, "
        f"e.g. {images / 'IMG_1.heic'}; convert them to PNG, JPEG or WebP"
    ]
    assert (tmp_path / "out" / "cat.png").is_file()


def test_strict_stops_every_process_at_the_marker(tmp_path, tiny_model):
    """Under a launcher --strict stopped only the process that met the failure."""
    import torch

    from inpaint_cli.run import STRICT_STOP_NAME, _Log, _process
    from model.hvae import HVAE

    images, masks, out = tmp_path / "photos", tmp_path / "masks", tmp_path / "out"
    for name in ("a", "b", "c"):
        _photo(images / f"{name}.png")
        _save_mask(masks / f"{name}.png", _box_mask(24, 20, HOLE))
    (images / "bad.png").write_bytes(b"not a png")
    _save_mask(masks / "bad.png", _box_mask(24, 20, HOLE))
    out.mkdir()
    options = RunOptions(images=images, masks=masks, out=out, num_workers=0, strict=True)
    root, files = run_plan.discover(images, out, masks)
    items = run_plan.plan(options, root, files, masks, out, None)
    model = HVAE.from_pretrained(tiny_model).eval()
    marker = out / STRICT_STOP_NAME

    # this process meets the failure: it stops and tells the others
    bad_first = [item for item in items if item.rel == "bad.png"] + items
    counts = _process(options, bad_first, out, model, None, torch.device("cpu"), _Log(), False,
                      marker)  # fmt: skip
    assert counts.stopped and counts.failed == 1 and counts.done == 0 and marker.exists()
    # another process sees the marker before its next image
    good = [item for item in items if item.rel != "bad.png"]
    counts = _process(options, good, out, model, None, torch.device("cpu"), _Log(), False, marker)
    assert counts.stopped and counts.done == 0
    marker.unlink()
    counts = _process(options, good, out, model, None, torch.device("cpu"), _Log(), False, marker)
    assert not counts.stopped and counts.done == 3
