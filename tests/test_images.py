"""images.py: every odd image and mask file either loads correctly or fails with one clear line."""

from __future__ import annotations

import errno
import io
import os
import struct
import time
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms

from inpaint_cli import images
from inpaint_cli.errors import InpaintError
from inpaint_cli.images import (
    atomic_write_bytes,
    decode_image,
    image_to_rgb_uint8,
    list_images,
    load_image,
    load_mask,
)


def encoded(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def rgb(data: bytes, background=(255, 255, 255)) -> np.ndarray:
    return image_to_rgb_uint8(decode_image(data, "test.png"), background)


def assert_one_line_error(error: pytest.ExceptionInfo, name: str) -> None:
    message = str(error.value)
    assert message.startswith(f"{name}: ")
    assert "\n" not in message
    assert error.value.exit_code == 1


# ---------------------------------------------------------------- broken files


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty"),
        (b"this is text, not a JPEG\n", "not a supported image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a supported image"),
    ],
)
def test_non_images_are_refused_with_one_line(data: bytes, problem: str) -> None:
    with pytest.raises(InpaintError) as error:
        decode_image(data, "photo.jpg")
    assert_one_line_error(error, "photo.jpg")
    assert problem in str(error.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), fmt)
    decode_image(data, "whole")  # the untruncated file is fine
    with pytest.raises(InpaintError) as error:
        decode_image(data[: len(data) // 2], "half")
    assert_one_line_error(error, "half")


def test_names_with_unicode_spaces_and_newlines_stay_one_line(tmp_path) -> None:
    good = tmp_path / "été photo 1.png"
    good.write_bytes(encoded(Image.new("RGB", (3, 2), (1, 2, 3))))
    assert load_image(good).size == (3, 2)
    bad = tmp_path / "bad\nname é.jpg"
    bad.write_bytes(b"")
    with pytest.raises(InpaintError) as error:
        load_image(bad)
    assert "\n" not in str(error.value)
    assert "name é.jpg" in str(error.value)


def test_missing_file_and_folder_are_reported(tmp_path) -> None:
    with pytest.raises(InpaintError) as error:
        load_image(tmp_path / "absent.png")
    assert_one_line_error(error, str(tmp_path / "absent.png"))
    with pytest.raises(InpaintError, match="folder"):
        load_image(tmp_path)


# ---------------------------------------------------------------- decompression bombs


def test_bomb_between_warning_and_error_limits_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encoded(Image.new("L", (40, 30)))  # 1200 px: Pillow itself would only warn
    with pytest.raises(InpaintError, match="decompression bomb") as error:
        decode_image(data, "bomb.png")
    assert_one_line_error(error, "bomb.png")
    big = encoded(Image.new("L", (80, 30)))  # 2400 px: above Pillow's own error limit
    with pytest.raises(InpaintError, match="decompression bomb"):
        decode_image(big, "big.png")
    assert decode_image(encoded(Image.new("L", (30, 30))), "ok.png").size == (30, 30)


def test_the_pixel_limit_can_be_raised_for_big_photos(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encoded(Image.new("L", (80, 30)))
    with pytest.raises(InpaintError, match="INPAINT_MAX_PIXELS=N allows"):
        decode_image(data, "panorama.png")
    monkeypatch.setenv("INPAINT_MAX_PIXELS", "2400")
    assert decode_image(data, "panorama.png").size == (80, 30)
    monkeypatch.setenv("INPAINT_MAX_PIXELS", "lots")
    with pytest.raises(InpaintError, match="INPAINT_MAX_PIXELS='lots'") as error:
        decode_image(data, "panorama.png")
    assert error.value.exit_code == 2


# ---------------------------------------------------------------- odd modes


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    levels = np.array([[0, 257, 300, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(levels)
    assert img.mode == "I;16"
    pixels = rgb(encoded(img))
    assert pixels.shape == (1, 5, 3)
    assert pixels[0, :, 0].tolist() == [0, 1, 1, 128, 255]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_16_bit_big_endian_and_32_bit_modes() -> None:
    values = [0, 300, 65535]
    big_endian = Image.frombytes("I;16B", (3, 1), struct.pack(">3H", *values))
    assert image_to_rgb_uint8(big_endian)[0, :, 1].tolist() == [0, 1, 255]
    tiff = decode_image(encoded(big_endian, "TIFF"), "x.tif")
    assert image_to_rgb_uint8(tiff)[0, :, 1].tolist() == [0, 1, 255]
    int32 = Image.fromarray(np.array([values], dtype=np.int32))
    assert int32.mode == "I"
    assert image_to_rgb_uint8(int32)[0, :, 0].tolist() == [0, 1, 255]


@pytest.mark.parametrize(("channels", "ext"), [(3, ".png"), (4, ".png"), (3, ".tif")])
def test_16_bit_colour_is_read_at_8_bits_scaled_not_clipped_and_marked(channels, ext) -> None:
    import cv2

    levels = np.array([[[0, 255, 256, 40000][:channels], [65535] * channels]], dtype=np.uint16)
    ok, data = cv2.imencode(ext, levels[..., [2, 1, 0, 3][:channels]])  # OpenCV writes BGR(A)
    img = decode_image(data.tobytes(), f"deep{ext}")
    assert img.mode == ("RGB", "RGBA")[channels - 3]
    assert np.asarray(img).tolist() == (levels >> 8).tolist()  # the high byte: 65535 -> 255
    assert img.info.get("reduced_from_16_bits") is True
    for eight_or_grey in (Image.new("RGB", (2, 1)), Image.fromarray(levels[..., 0])):
        assert "reduced_from_16_bits" not in decode_image(encoded(eight_or_grey), "x.png").info


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    pixels = rgb(data)
    assert pixels.shape == (8, 8, 3)
    assert np.abs(pixels.astype(int) - [255, 0, 0]).max() <= 3


def test_palette_with_transparency_is_flattened_on_the_background() -> None:
    palette_img = Image.new("P", (4, 1))
    palette_img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette_img.putpixel((0, 0), 0)
    palette_img.putpixel((1, 0), 1)
    data = encoded(palette_img, transparency=0)
    on_white = rgb(data)
    assert on_white[0, 0].tolist() == [255, 255, 255]
    assert on_white[0, 1].tolist() == [0, 0, 255]
    assert rgb(data, background=(0, 0, 0))[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_half_transparent_pixels_are_blended(mode: str) -> None:
    img = Image.new("RGBA", (2, 2), (255, 0, 0, 128)).convert(mode)
    # PNG cannot hold PA, so that one is converted in memory (as after a GIF/WebP decode).
    loaded = img if mode == "PA" else decode_image(encoded(img), "x.png")
    assert loaded.mode == mode
    red, green, blue, alpha = np.asarray(img.convert("RGBA"), dtype=float)[0, 0]
    share = alpha / 255
    expected = [round(c * share + 255 * (1 - share)) for c in (red, green, blue)]
    assert image_to_rgb_uint8(loaded)[0, 0].tolist() == expected
    assert alpha == 128 and expected != [255, 255, 255]


def test_exif_orientation_is_applied() -> None:
    original = np.zeros((2, 4, 3), dtype=np.uint8)
    original[:, :2] = (255, 0, 0)
    original[:, 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encoded(Image.fromarray(original), exif=exif.tobytes())
    shown = rgb(data)
    assert shown.shape == (4, 2, 3)
    assert np.array_equal(shown, np.rot90(original, k=-1))


def swapped_primaries_profile() -> bytes:
    """sRGB with its red and green primaries exchanged: a profile that must change pixels."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", icc[128:132])[0]
    offsets = {bytes(icc[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, green = offsets[b"rXYZ"], offsets[b"gXYZ"]
    icc[red + 4 : red + 12], icc[green + 4 : green + 12] = (
        icc[green + 4 : green + 12],
        icc[red + 4 : red + 12],
    )
    return bytes(icc)


def test_icc_profile_is_converted_to_srgb() -> None:
    data = encoded(Image.new("RGB", (4, 4), (255, 0, 0)), icc_profile=swapped_primaries_profile())
    img = decode_image(data, "x.png")
    assert "icc_profile" not in img.info
    assert np.abs(image_to_rgb_uint8(img)[0, 0].astype(int) - [0, 255, 0]).max() <= 2
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    same = rgb(encoded(Image.new("RGB", (4, 4), (200, 30, 60)), icc_profile=srgb))
    assert np.abs(same[0, 0].astype(int) - [200, 30, 60]).max() <= 1


def test_broken_icc_profile_keeps_the_pixels() -> None:
    data = encoded(Image.new("RGB", (2, 2), (10, 20, 30)), icc_profile=b"not a profile")
    assert rgb(data)[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_one_pixel_images_in_every_format(fmt: str) -> None:
    pixels = rgb(encoded(Image.new("RGB", (1, 1), (250, 250, 250)), fmt))
    assert pixels.shape == (1, 1, 3)
    assert np.abs(pixels.astype(int) - 250).max() <= 8


def test_bilevel_and_grey_become_rgb() -> None:
    assert rgb(encoded(Image.new("1", (2, 2), 1)))[0, 0].tolist() == [255, 255, 255]
    assert rgb(encoded(Image.new("L", (2, 2), 77)))[0, 0].tolist() == [77, 77, 77]


# ---------------------------------------------------------------- masks


def test_mask_threshold_grey_rgb_and_alpha(tmp_path) -> None:
    grey = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert load_mask(tmp_path / "grey.png").tolist() == [[False, False, True, True]]
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    assert load_mask(tmp_path / "rgb.png").tolist() == [[False, False, True, True]]
    painted = np.zeros((1, 2, 4), dtype=np.uint8)
    painted[0, 0] = (255, 255, 255, 255)  # opaque white stroke on a transparent layer
    Image.fromarray(painted).save(tmp_path / "alpha.png")
    assert load_mask(tmp_path / "alpha.png").tolist() == [[True, False]]
    # red paint (76 in greyscale) on black or on a transparent layer, nothing brighter: a hole
    red = np.zeros((1, 3, 3), dtype=np.uint8)
    red[0, 1] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "red.png")
    assert load_mask(tmp_path / "red.png").tolist() == [[False, True, False]]
    red_layer = np.zeros((1, 3, 4), dtype=np.uint8)
    red_layer[0, 2] = (220, 20, 20, 255)
    Image.fromarray(red_layer).save(tmp_path / "red_layer.png")
    assert load_mask(tmp_path / "red_layer.png").tolist() == [[False, False, True]]
    red[0, 2] = (255, 255, 255)  # with white paint present, white is the hole, as in greyscale
    Image.fromarray(red).save(tmp_path / "red_white.png")
    assert load_mask(tmp_path / "red_white.png").tolist() == [[False, False, True]]


def test_a_photo_given_as_mask_and_a_stretched_mask_are_warned_about(tmp_path) -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(40, 200, (20, 30, 3), dtype=np.uint8)
    photo[5:10, 5:15] = 255  # the hole painted white over the photo itself
    Image.fromarray(photo).save(tmp_path / "painted_photo.png")
    notes: list[str] = []
    load_mask(tmp_path / "painted_photo.png", notes=notes)
    assert len(notes) == 1 and "looks like a photo, not a mask" in notes[0]
    drawn = np.zeros((20, 30), np.uint8)
    drawn[5:10, 5:15] = 255
    drawn[4, 5:15] = 128  # a soft edge
    Image.fromarray(drawn).save(tmp_path / "drawn.png")
    notes = []
    load_mask(tmp_path / "drawn.png", size=(60, 40), resize=True, notes=notes)
    assert notes == []  # twice the size, same shape: no warning
    load_mask(tmp_path / "drawn.png", size=(30, 30), resize=True, notes=notes)
    assert len(notes) == 1 and "stretches it to another shape" in notes[0]


def test_mask_with_a_transparent_hole_openai_style(tmp_path) -> None:
    """The hole is transparent, the rest opaque: the photo with the hole erased, or black."""
    rng = np.random.default_rng(0)
    photo = np.concatenate(
        [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), np.full((24, 32, 1), 255, np.uint8)],
        axis=2,
    )
    hole = np.zeros((24, 32), dtype=bool)
    hole[6:14, 10:22] = True
    erased = photo.copy()
    erased[hole, 3] = 0
    Image.fromarray(erased, "RGBA").save(tmp_path / "erased.png")
    # read as white = hole, about half of the photo's pixels would be repainted
    assert np.array_equal(load_mask(tmp_path / "erased.png"), hole)
    black = np.zeros((24, 32, 4), dtype=np.uint8)
    black[..., 3] = 255
    black[hole, 3] = 0
    Image.fromarray(black, "RGBA").save(tmp_path / "black.png")
    assert np.array_equal(load_mask(tmp_path / "black.png"), hole)
    resized = load_mask(tmp_path / "black.png", size=(64, 48), resize=True)
    assert np.array_equal(resized, np.kron(hole, np.ones((2, 2), dtype=bool)))
    painted = np.zeros((24, 32, 4), dtype=np.uint8)
    painted[hole] = (255, 255, 255, 255)  # white paint on a transparent layer: unchanged
    Image.fromarray(painted, "RGBA").save(tmp_path / "painted.png")
    assert np.array_equal(load_mask(tmp_path / "painted.png"), hole)
    Image.fromarray(np.zeros((24, 32, 4), np.uint8), "RGBA").save(tmp_path / "empty.png")
    assert not load_mask(tmp_path / "empty.png").any()  # an empty layer marks no hole


def test_mask_all_black_all_white_and_16_bit(tmp_path) -> None:
    Image.new("L", (3, 2), 0).save(tmp_path / "black.png")
    Image.new("L", (3, 2), 255).save(tmp_path / "white.png")
    Image.fromarray(np.full((2, 3), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert not load_mask(tmp_path / "black.png").any()
    assert load_mask(tmp_path / "white.png").all()
    assert load_mask(tmp_path / "deep.png").all()  # 40000/65535 is above half: a hole


def test_mask_of_another_size(tmp_path) -> None:
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[:, 3:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    with pytest.raises(InpaintError, match="resize") as error:
        load_mask(tmp_path / "m.png", size=(12, 8))
    assert_one_line_error(error, str(tmp_path / "m.png"))
    resized = load_mask(tmp_path / "m.png", size=(12, 8), resize=True)
    assert resized.shape == (8, 12)
    assert resized[:, 6:].all() and not resized[:, :6].any()
    assert load_mask(tmp_path / "m.png", size=(6, 4)).shape == (4, 6)


# ---------------------------------------------------------------- listing and writing


def test_list_images_sorted_recursive_without_masks_or_hidden(tmp_path) -> None:
    for name in ["b.PNG", "a.jpg", "sub/c.webp", "a_mask.png", "a_mask001.png", ".hidden.png",
                 ".cache/d.png", "notes.txt", "sub/e.tiff"]:  # fmt: skip
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = [path.relative_to(tmp_path).as_posix() for path in list_images(tmp_path)]
    assert found == ["a.jpg", "b.PNG", "sub/c.webp", "sub/e.tiff"]
    assert list_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    with pytest.raises(InpaintError) as error:
        list_images(tmp_path / "nowhere")
    assert error.value.exit_code == 2


def test_list_images_follows_symlinked_folders_once(tmp_path) -> None:
    library, elsewhere = tmp_path / "library", tmp_path / "other_disk"
    for path in (library / "a.png", elsewhere / "2024" / "b.png", elsewhere / "c.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (library / "linked").symlink_to(elsewhere, target_is_directory=True)
    (library / "loop").symlink_to(library, target_is_directory=True)  # must not recurse forever
    (library / "broken.png").symlink_to(tmp_path / "gone.png")
    found = [path.relative_to(library).as_posix() for path in list_images(library)]
    assert found == ["a.png", "linked/2024/b.png", "linked/c.png"]


def test_atomic_write_replaces_whole_files(tmp_path) -> None:
    target = tmp_path / "out.png"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["out.png"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch, code) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def failing_write(fd, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(images.os, "write", failing_write)
    with pytest.raises(InpaintError) as error:
        atomic_write_bytes(target, b"new")
    assert str(error.value) == f"{target}: cannot write ({os.strerror(code)})"
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.png"]


@pytest.mark.parametrize("failure", [None, KeyboardInterrupt])
def test_cleanup_on_a_read_only_folder_never_masks_the_error(tmp_path, monkeypatch, failure):
    """On a read-only mount the temporary file cannot be made, and removing it fails with
    EROFS too (even though it does not exist): the user must see the first error, not that."""
    target = tmp_path / "out.png"
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS))
    unlinked = []

    def fail_open(*args, **kwargs):
        raise read_only if failure is None else failure()

    def fail_unlink(path, missing_ok=False):
        unlinked.append(path)
        raise read_only

    monkeypatch.setattr(images, "os", types.SimpleNamespace(**{**vars(os), "open": fail_open}))
    monkeypatch.setattr(Path, "unlink", fail_unlink)
    with pytest.raises(InpaintError if failure is None else failure) as error:
        atomic_write_bytes(target, b"new")
    assert len(unlinked) == 1  # the cleanup was tried, and its failure swallowed
    if failure is None:
        assert str(error.value) == f"{target}: cannot write (Read-only file system)"
        assert error.value.exit_code == 1


def test_kill_between_temp_write_and_rename_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.png"
    seen_temp = []

    def killed(source, destination):
        seen_temp.append(open(source, "rb").read())
        raise KeyboardInterrupt

    monkeypatch.setattr(images.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"complete bytes")
    assert seen_temp == [b"complete bytes"]  # the temp file was whole before the rename
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- property tests

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"RIFF"]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(MAGIC), st.binary(max_size=300))
def test_random_bytes_load_or_raise_our_error(magic: bytes, tail: bytes) -> None:
    try:
        img = decode_image(magic + tail, "random.bin")
    except InpaintError as error:
        assert str(error).startswith("random.bin: ") and "\n" not in str(error)
        return
    pixels = image_to_rgb_uint8(img)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    mode=st.sampled_from(["1", "L", "LA", "RGB", "RGBA", "P", "I;16"]),
    fmt=st.sampled_from(["PNG", "TIFF", "BMP"]),
    cut=st.integers(0, 400),
    asked=st.sampled_from([None, "same", "other"]),
    seed=st.integers(0, 2**16),
)
def test_random_masks_load_or_raise_our_error(
    tmp_path, height, width, mode, fmt, cut, asked, seed
) -> None:
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    img = Image.fromarray(noise, "RGBA").convert(mode)
    try:
        data = encoded(img, fmt)
    except (OSError, ValueError, KeyError):
        return  # this format cannot store this mode: nothing to load
    path = tmp_path / "mask.png"
    path.write_bytes(data[: len(data) - cut] if cut < len(data) else data)
    size = {None: None, "same": (width, height), "other": (width + 1, height)}[asked]
    try:
        mask = load_mask(path, size=size)
    except InpaintError as error:
        assert str(error).startswith(f"{path}: ") and "\n" not in str(error)
        return
    assert mask.dtype == bool and mask.shape == (height, width)


def test_output_lock_refuses_a_held_folder_and_works_on_where_flock_is_missing(
    tmp_path, monkeypatch
) -> None:
    import errno
    import fcntl

    from inpaint_cli.images import output_lock

    with output_lock(tmp_path, "run"):
        with pytest.raises(InpaintError, match="another `inpaint run` is writing") as error:
            with output_lock(tmp_path, "run"):
                pass
    assert error.value.exit_code == 2
    with output_lock(tmp_path, "run"):  # released with its holder
        pass

    def no_flock_here(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock_here)
    with output_lock(tmp_path, "run"):  # a network mount without flock: the job goes on
        pass


def test_a_forked_child_does_not_keep_the_output_lock(tmp_path) -> None:
    """DataLoader workers are forked; one orphaned by a kill -9 must not lock the folder."""
    import signal

    from inpaint_cli.images import output_lock

    started, ready = os.pipe()
    with output_lock(tmp_path, "run"):
        child = os.fork()
        if child == 0:  # the worker: outlives the job's lock
            os.write(ready, b"x")  # fork's handlers have run by now
            time.sleep(30)
            os._exit(0)
        os.read(started, 1)
    try:
        with output_lock(tmp_path, "run"):  # the job ended; its child lives on
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_mask_of_another_size_names_the_fix(tmp_path: Path) -> None:
    Image.new("L", (40, 30), 255).save(tmp_path / "small.png")
    with pytest.raises(InpaintError, match=r"mask is 40x30 but the image is 80x60 \(use --resize"):
        load_mask(tmp_path / "small.png", (80, 60))
    assert load_mask(tmp_path / "small.png", (80, 60), resize=True).shape == (60, 80)
    # drawn on a photo stored sideways: resizing would stretch it, so that is not the advice
    with pytest.raises(InpaintError, match=r"mask is 40x30 but the image is 30x40 \(.*upright"):
        load_mask(tmp_path / "small.png", (30, 40))
