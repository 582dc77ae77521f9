"""Reading and writing images and masks: the one place that knows every odd file format.

Every problem with an input file becomes `InpaintError("<name>: <problem>", exit_code=1)`, so
batch jobs can print one warning line per bad file and carry on.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

from inpaint_cli.errors import InpaintError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)
# Photo and picture formats people keep beside those that inpaint does not read (no decoder
# here, or not among SAFE_FORMATS): a folder listing leaves them out with a warning, not silently.
UNREAD_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".dng", ".cr2", ".cr3", ".nef", ".arw"}
    | {".orf", ".rw2", ".raf", ".psd", ".svg", ".tga", ".ico", ".ppm", ".pgm", ".pnm", ".qoi"}
)
# Masks that live beside their images (LaMa style): `<stem>_mask.png`, `<stem>_mask001.png`.
MASK_NAME_RE = re.compile(r"^(?P<stem>.+)_mask[^/\\]*\.png$", re.IGNORECASE)

# Only plain raster formats: Pillow's EPS plugin runs Ghostscript, and rarer plugins are more
# attack surface than any user needs for photos.
SAFE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# Modes image_to_rgb_uint8 handles; anything else is converted (or refused) while decoding.
_KNOWN_MODES = frozenset(
    {"1", "L", "P", "RGB", "RGBA", "LA", "La", "PA", "RGBa", "CMYK", "I", "F"}
    | {"I;16", "I;16B", "I;16L", "I;16N"}
)
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _fail(name: str, problem: str) -> InpaintError:
    first_line = problem.strip().splitlines()[0] if problem.strip() else "unknown problem"
    return InpaintError(f"{name}: {first_line}", exit_code=1)


# Pillow's limit (about 89 megapixels) refuses a 100-megapixel camera's photos and stitched
# panoramas; this environment variable raises (or lowers) it for every command.
MAX_PIXELS_VARIABLE = "INPAINT_MAX_PIXELS"


def _apply_pixel_limit() -> None:
    value = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not value:
        return
    try:
        limit = int(float(value))
    except ValueError:
        limit = 0
    if limit < 1:
        raise InpaintError(
            f"{MAX_PIXELS_VARIABLE}={value!r}: expected a number of pixels, e.g. 200000000",
            exit_code=2,
        )
    Image.MAX_IMAGE_PIXELS = limit


def _refuse_bombs(img: Image.Image, name: str) -> None:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a long unattended job must not
    # allocate gigabytes for one hostile file, so refuse everything above the limit.
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise _fail(
            name,
            f"{width}x{height} pixels is above the limit of {limit} (decompression bomb?); "
            f"{MAX_PIXELS_VARIABLE}=N allows images of up to N pixels",
        )


def _to_srgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return img
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(img, source, _SRGB, outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        # A broken or mismatched profile is common in the wild; the pixels are still usable.
        return img
    converted.info = {k: v for k, v in img.info.items() if k != "icc_profile"}
    return converted


@contextlib.contextmanager
def _pillow_errors(name: str) -> Iterator[None]:
    """Pillow's many errors for a bad file as one InpaintError naming it. Its UserWarnings
    about odd metadata would be extra lines per file; the bomb warning becomes an error."""
    _apply_pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except InpaintError:
        raise
    except Image.UnidentifiedImageError:
        raise _fail(name, "not a supported image (PNG, JPEG, WebP, BMP, TIFF or GIF)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        problem = f"refused as a decompression bomb ({error}); {MAX_PIXELS_VARIABLE}=N allows"
        raise _fail(name, f"{problem} images of up to N pixels") from None
    except MemoryError:
        raise _fail(name, "image too large to decode") from None
    except Exception as error:  # Pillow raises many types for corrupt files
        raise _fail(name, f"corrupt or truncated image ({error})") from None


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes fully: EXIF orientation applied, ICC profile converted to sRGB.

    Animations and multi-page files give their first frame; `info["frames"]` says how many
    there were. 16-bit grey stays 16-bit (I;16); other 16-bit files (colour, grey with alpha)
    are read at 8 bits per channel, the high byte of each value, and marked
    `info["reduced_from_16_bits"]`: Pillow has no 16-bit modes for them.

    Refuses empty data, non-images, truncated or corrupt files and decompression bombs
    (anything above `PIL.Image.MAX_IMAGE_PIXELS`, including Pillow's warn-only range).
    """
    if not data:
        raise _fail(name, "empty file (0 bytes)")
    with _pillow_errors(name):
        img = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
        _refuse_bombs(img, name)
        reduced = _reads_16_bits_as_8(img)
        img.load()
    width, height = img.size
    if width < 1 or height < 1:
        raise _fail(name, f"image has no pixels ({width}x{height})")
    frames = getattr(img, "n_frames", 1)  # the copies made below forget it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF: keep the stored orientation
        pass
    img = _to_srgb(img)
    if img.mode not in _KNOWN_MODES:
        try:
            img = img.convert("RGBA" if "A" in img.mode else "RGB")
        except (ValueError, OSError):
            raise _fail(name, f"unsupported image mode {img.mode}") from None
    img.info["frames"] = frames
    if reduced:
        img.info["reduced_from_16_bits"] = True
    return img


def _reads_16_bits_as_8(img: Image.Image) -> bool:
    """Whether Pillow is about to decode 16 bits per channel into an 8-bit mode (its raw mode,
    known before loading, is `RGB;16B`, `RGBA;16L`, `LA;16B`, ...)."""
    if img.mode.startswith("I") or not img.tile:
        return False
    args = img.tile[0].args
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return isinstance(rawmode, str) and ";16" in rawmode


def load_image(path: Path) -> Image.Image:
    """Read and decode an image file (see decode_image)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise _fail(str(path), "is a folder, not an image file") from None
    except OSError as error:
        raise _fail(str(path), f"cannot read ({error.strerror or error})") from None
    return decode_image(data, str(path))


def _scale_to_uint8(values: np.ndarray, full_scale: float) -> np.ndarray:
    scaled = np.clip(values.astype(np.float64), 0.0, full_scale) * (255.0 / full_scale)
    return np.rint(scaled).astype(np.uint8)


def _grey_or_rgb_to_rgb(pixels: np.ndarray) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels)


def has_alpha(img: Image.Image) -> bool:
    """Whether `img` carries transparency (an alpha channel or a transparent palette entry)."""
    return "A" in img.mode or "a" in img.mode or "transparency" in img.info


def image_to_rgb_uint8(
    img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)
) -> np.ndarray:
    """HxWx3 uint8 RGB: 16/32-bit scaled (not clipped), alpha flattened onto `background`."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit sources load as I;16* or I; both hold 0..65535 at full scale.
        return _grey_or_rgb_to_rgb(_scale_to_uint8(np.asarray(img), 65535.0))
    if mode == "F":
        pixels = np.asarray(img, dtype=np.float64)
        full_scale = 1.0 if np.nanmax(pixels, initial=0.0) <= 1.0 else 255.0
        return _grey_or_rgb_to_rgb(_scale_to_uint8(np.nan_to_num(pixels), full_scale))
    if not has_alpha(img):
        rgb = img if mode == "RGB" else img.convert("RGB")
        return np.array(rgb, dtype=np.uint8)
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
    alpha = rgba[:, :, 3:4] / 255.0
    fill = np.asarray(background, dtype=np.float32).reshape(1, 1, 3)
    flat = rgba[:, :, :3] * alpha + fill * (1.0 - alpha)
    return np.rint(flat).astype(np.uint8)


def mask_size_problem(mask_size: tuple[int, int], image_size: tuple[int, int]) -> str:
    """Why a mask of `mask_size` (width, height) does not fit an image, and what to do."""
    turned = tuple(mask_size) == tuple(image_size)[::-1]  # a photo stored sideways, upright by EXIF
    advice = (
        "it looks drawn on the image turned by 90 degrees: images are read upright, as their "
        "EXIF orientation says, so draw it on the upright image"
        if turned
        else "use --resize-masks to resize it"
    )
    return (
        f"mask is {mask_size[0]}x{mask_size[1]} but the image is {image_size[0]}x{image_size[1]} "
        f"({advice})"
    )


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as it is read (after its EXIF orientation), from its header
    alone: cheap enough for a dry run over a large folder. Raises InpaintError as load_image
    would for a file that is empty, not a supported image or a decompression bomb."""
    name = str(path)
    try:
        handle = open(path, "rb")  # closed below; Pillow reads the header from it
    except OSError as error:
        raise _fail(name, f"cannot read ({error.strerror or error})") from None
    with handle:
        if not handle.read(1):
            raise _fail(name, "empty file (0 bytes)")
        handle.seek(0)
        with _pillow_errors(name):
            img = Image.open(handle, formats=SAFE_FORMATS)
            _refuse_bombs(img, name)
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_mask(
    path: Path,
    size: tuple[int, int] | None = None,
    resize: bool = False,
    notes: list[str] | None = None,
) -> np.ndarray:
    """Bool HxW hole mask (True = hole): greyscale >= 128. A mask with no such pixel but paint
    in a bright colour (red, as image editors show quick masks) has that paint as its hole:
    pixels with a channel at 128 or above. `size` is the image's (width, height).

    A mask of another size is an error unless `resize`, then it is resized nearest-neighbour.
    A mask with transparency is white paint on a transparent layer (transparent = not a hole),
    unless it follows the convention of OpenAI's image edit API, where the hole is transparent
    and the rest opaque: the photo with the hole erased, or black with a transparent hole.
    Read as white = hole, such a photo would have every bright part repainted, so an opaque
    part that looks like a photo (varied greys) or is all black makes the transparent part the
    hole.

    `notes` collects warnings: a mask that looks like a photo (the photo itself with white
    paint on it: every bright part would be repainted), one stretched to another shape.
    """
    path = Path(path)
    img = load_image(path)
    rgb = image_to_rgb_uint8(img, background=(0, 0, 0))
    hole = np.asarray(Image.fromarray(rgb).convert("L")) >= 128
    brightest = rgb.max(axis=2)
    alpha = has_alpha(img)
    if not hole.any():  # pure red is 76 in greyscale: read as grey, red paint is no hole
        hole = brightest >= 128
    if notes is not None and not alpha:
        grey_fraction = float(((brightest > 32) & (brightest < 224)).mean())
        if grey_fraction > PHOTO_MASK_GREY_FRACTION:
            notes.append(
                f"warning: {path}: looks like a photo, not a mask ({grey_fraction:.0%} of its "
                "pixels are neither near black nor near white); every pixel at 128 or brighter "
                "is filled: paint the hole white on black"
            )
    if alpha:
        rgba = np.asarray(img.convert("RGBA"))
        opaque = rgba[:, :, 3] >= 128
        if opaque.any() and not opaque.all():
            kept = np.asarray(Image.fromarray(rgba[:, :, :3]).convert("L"))[opaque]
            if kept.std() > ERASED_MASK_MIN_STD or kept.max() <= ERASED_MASK_MAX_BLACK:
                hole = ~opaque
    if size is not None and hole.shape[::-1] != tuple(size):
        if not resize:
            raise _fail(str(path), mask_size_problem(hole.shape[::-1], size))
        mask_aspect, image_aspect = hole.shape[1] / hole.shape[0], size[0] / size[1]
        if notes is not None and abs(mask_aspect / image_aspect - 1) > 0.01:
            notes.append(
                f"warning: {path}: mask is {hole.shape[1]}x{hole.shape[0]}, the image "
                f"{size[0]}x{size[1]}: --resize-masks stretches it to another shape"
            )
        scaled = Image.fromarray(hole).resize(tuple(size), Image.Resampling.NEAREST)
        hole = np.asarray(scaled, dtype=bool)
    return hole


# Paint masks are flat: one colour, edges soft through alpha. An opaque part with a grey spread
# above this (in levels) is a photo, one no brighter than this is black: both mark the hole by
# transparency (load_mask).
ERASED_MASK_MIN_STD = 16.0
ERASED_MASK_MAX_BLACK = 32
# A drawn mask is black and white with soft edges; a photo is mostly mid-tones.
PHOTO_MASK_GREY_FRACTION = 0.25


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def walk_files(root: Path) -> Iterator[Path]:
    """Every file under `root`, following symlinked folders (a photo library often links in
    folders from other disks) but entering each real folder once, so a link loop ends."""
    entered: set[tuple[int, int]] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        try:
            stat = os.stat(folder)
        except OSError:  # vanished or unreadable while walking: nothing to list there
            subfolders[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in entered:
            subfolders[:] = []
            continue
        entered.add((stat.st_dev, stat.st_ino))
        subfolders.sort()
        for name in sorted(files):
            yield Path(folder) / name


def list_images(root: Path, left_out: list[Path] | None = None) -> list[Path]:
    """Image files under `root` (recursive, sorted), leaving out hidden and `*_mask*.png` files.

    A file given directly is returned as is. A missing path is a usage error (exit code 2).
    Files in picture formats inpaint does not read (HEIC, RAW, ...) are added to `left_out`.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InpaintError(f"{root}: no such file or folder", exit_code=2)
    found = []
    for path in walk_files(root):
        if _is_hidden(path.relative_to(root)) or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS and not MASK_NAME_RE.match(path.name):
            found.append(path)
        elif suffix in UNREAD_IMAGE_EXTENSIONS and left_out is not None:
            left_out.append(path)
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def left_out_warning(root: Path, left_out: list[Path]) -> str:
    """One line for the files list_images left out for their format."""
    suffixes = sorted({path.suffix.lower() for path in left_out})
    return (
        f"warning: {root}: {len(left_out)} file(s) in formats inpaint does not read "
        f"({', '.join(suffixes)}) left out, e.g. {left_out[0]}; convert them to PNG, JPEG or WebP"
    )


def check_output_place(
    images: Path, out: Path, option: str = "--out", outputs: str = "outputs"
) -> None:
    """Refuse an output folder that is IMAGES (or the folder of a single image) or a folder
    above it, in one line naming `out`; `option` and `outputs` name OUT and what goes there.

    Outputs keep the inputs' relative paths: in IMAGES' own folder they could replace inputs
    or files of the user's that were never inputs, and in a folder above it they land among
    the inputs, or on one (IMAGES p/sub, OUT p: the output of sub/a.png is p/sub/a.png).
    """
    images = Path(images).expanduser().absolute()
    folder = images if images.is_dir() else images.parent
    place = Path(out).expanduser().absolute().resolve()
    if place == folder.resolve():
        which = "the IMAGES folder itself" if images.is_dir() else f"the folder of {images.name}"
        raise InpaintError(
            f"{out}: {option} is {which}; {outputs} could replace inputs, choose another folder",
            exit_code=2,
        )
    if folder.resolve().is_relative_to(place):  # place is above it: equality is refused above
        raise InpaintError(
            f"{out}: {option} contains the images ({folder}); {outputs} would be mixed with "
            "the inputs, choose a folder outside it",
            exit_code=2,
        )


def make_output_folder(out: Path, src: Path) -> None:
    """Create `out`, refusing one inside the input folder `src` (its files would be read back
    as inputs). One-line InpaintError on either problem."""
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise InpaintError(f"{out}: the output folder is inside the input folder", exit_code=2)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InpaintError(f"{out}: cannot create folder ({error.strerror})", exit_code=1) from None


# Descriptors of the output locks this process holds. A forked child (a DataLoader worker)
# inherits them, and an flock lasts while any copy is open: a worker orphaned by kill -9 would
# keep the folder locked. Children close their copies at once (the parent's lock stays).
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def output_lock(out: Path, command: str) -> Iterator[None]:
    """Hold an exclusive lock on the folder `out` for one job, or fail at once in one line.

    Two jobs writing the same folder would take each other's files for leftovers of an
    interrupted run. The lock is an flock on the folder itself: no lock file is left behind,
    and the kernel releases it when the process dies (forked children do not keep it), so a
    killed job never leaves the folder locked. Where flock does not exist (Windows) nothing is
    locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise InpaintError(f"{out}: cannot open ({error.strerror})", exit_code=1) from None
    _HELD_LOCKS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InpaintError(
                    f"{out}: another `inpaint {command}` is writing to this folder", exit_code=2
                ) from None
            # A file system without flock (some network mounts): work on, unlocked, rather
            # than refuse every job there.
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never part.

    The bytes go to a temporary file in the same folder (fsynced), then os.replace; on any
    failure the temporary file is removed and an InpaintError names `path`.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as error:
        _remove_quietly(temp)
        problem = f"cannot write ({error.strerror or error})"
        raise InpaintError(f"{path}: {problem}", exit_code=1) from None
    except BaseException:
        _remove_quietly(temp)
        raise


def _remove_quietly(path: Path) -> None:
    # Cleanup must not replace the error being reported: on a read-only mount unlink fails
    # with EROFS even when the file was never created.
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def png_bytes(img: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """Encode an image as PNG bytes, with `text` as tEXt chunks (before the pixels, so reading
    them back does not decode the image)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png_atomic(img: Image.Image, path: Path, text: dict[str, str] | None = None) -> None:
    """Save an image as PNG atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, png_bytes(img, text))


def check_replaceable(
    out: Path, names: Iterable[str], is_ours: Callable[[Path], bool], writer: str
) -> None:
    """Refuse, before any work, an --out holding a file named like one of `names` that
    `is_ours` does not take for one `writer` wrote: the user's file would be replaced."""
    for name in names:
        path = out / name
        if path.exists() and not is_ours(path):
            raise InpaintError(
                f"{path}: exists and is not from {writer}; choose another --out or move it away",
                exit_code=2,
            )
