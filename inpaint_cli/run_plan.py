"""Planning for `inpaint run`: which images, which masks and captions, which output names,
what is done already, and whether OUT may take more outputs (its manifest).

Nothing here decodes pixels: a dry run and the skip check stay fast on large folders.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn

from inpaint_cli.errors import InpaintError
from inpaint_cli.images import (
    IMAGE_EXTENSIONS,
    MASK_NAME_RE,
    check_output_place,
    left_out_warning,
    list_images,
    walk_files,
)

if TYPE_CHECKING:
    from inpaint_cli.run import RunOptions

MANIFEST_NAME = "manifest.jsonl"
FAILURES_NAME = "failures.jsonl"
# Written by each process of a multi-process run, merged into FAILURES_NAME by the main one.
RANK_FAILURES_RE = re.compile(r"^failures\.rank\d+\.jsonl$")
# One fill per image: the prior's mean latents (temperature 0) scored about 1 dB better hole
# PSNR than one sample at 0.8 on validation (MODEL_CARD.md, "Temperature"). Several fills: 0.8
# keeps them visibly different and still plausible (0.5 averages slightly better, but the
# fills look alike); at 0 they would all be the same picture.
ONE_FILL_TEMPERATURE = 0.0
SAMPLES_TEMPERATURE = 0.8


def default_temperature(samples: int) -> float:
    """The prior temperature `inpaint run` uses when none is given."""
    return ONE_FILL_TEMPERATURE if samples == 1 else SAMPLES_TEMPERATURE


# Temporary files of images.atomic_write_bytes (".<name>.<8 hex>.tmp"), left by a killed run.
TEMP_NAME_RE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


@dataclass
class Item:
    """One input image and everything decided about it before any pixel is read."""

    rel: str  # path relative to IMAGES (posix); seeds and failure records use it
    source: Path
    stem: str  # output name without ".png", relative to OUT (posix)
    masks: list[Path] = field(default_factory=list)
    caption: str | None = None
    sidecar: Path | None = None
    problem: str | None = None  # known before decoding: no mask, clashing output name

    def outputs(self, options: RunOptions) -> dict[str, Any]:
        n = options.samples
        samples = [f"{self.stem}.png"] if n == 1 else [f"{self.stem}_{i}.png" for i in range(n)]
        return {
            "samples": samples,
            "uncertainty": f"{self.stem}_uncertainty.png"
            if options.save_uncertainty and n > 1
            else None,
            "overlay": f"{self.stem}_overlay.png" if options.save_mask_overlay else None,
        }

    def output_names(self, options: RunOptions) -> list[str]:
        named = self.outputs(options)
        return named["samples"] + [n for n in (named["uncertainty"], named["overlay"]) if n]


def check_options(options: RunOptions) -> None:
    checks = [
        (options.samples >= 1, f"--samples must be at least 1, got {options.samples}"),
        (options.batch_size >= 1, f"--batch-size must be at least 1, got {options.batch_size}"),
        (math.isfinite(options.temperature) and options.temperature >= 0,
         f"--temperature must be a finite number >= 0, got {options.temperature}"),
        (options.dilate >= 0, f"--dilate must be >= 0, got {options.dilate}"),
        (options.num_workers >= 0, f"--num-workers must be >= 0, got {options.num_workers}"),
        (options.device in ("auto", "cpu", "cuda"), f"--device {options.device!r}: use auto, "
         "cpu or cuda"),
        (options.caption is None or options.caption_file is None,
         "use --caption or --caption-file, not both"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise InpaintError(message, exit_code=2)
    if options.caption_strength is not None:
        check_caption_strength_option(options.caption_strength)


def check_caption_strength_option(value: float) -> None:
    """--caption-strength of `inpaint run` and `inpaint eval`, by the model config's own rule."""
    from model.hvae import check_caption_strength  # torch: both commands load it next anyway

    try:
        check_caption_strength(value)
    except ValueError as error:
        raise InpaintError(f"--caption-strength: {error}", exit_code=2) from None


def check_paths(options: RunOptions) -> tuple[Path, Path, Path]:
    images, masks, out = (Path(p).expanduser().absolute() for p in (options.images, options.masks,
                                                                     options.out))  # fmt: skip
    if not images.exists():
        raise InpaintError(f"{options.images}: no such file or folder", exit_code=2)
    if not masks.exists():
        raise InpaintError(f"{options.masks}: no such mask file or folder", exit_code=2)
    if out.exists() and not out.is_dir():
        raise InpaintError(f"{options.out}: is a file, --out must be a folder", exit_code=2)
    check_output_place(images, options.out)
    if masks.is_dir() and masks.resolve() == out.resolve():
        raise InpaintError(
            f"{options.out}: --out is the MASKS folder itself; outputs could replace masks, "
            "choose another folder",
            exit_code=2,
        )
    if images.is_file() and images.suffix.lower() not in IMAGE_EXTENSIONS:
        raise InpaintError(
            f"{options.images}: not an image file (extensions: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})",
            exit_code=2,
        )
    if options.caption_file is not None and not Path(options.caption_file).is_file():
        raise InpaintError(f"{options.caption_file}: no such caption file", exit_code=2)
    if options.grid is not None:
        check_grid_folder(Path(options.grid))
    return images, masks, out


def check_grid_folder(grid: Path) -> None:
    """Refuse a --grid that is a folder or whose folder cannot be made, before any work is
    done (the grid is written last). Creates nothing: a dry run writes nothing."""
    if grid.is_dir():
        raise InpaintError(f"{grid}: is a folder, --grid must be a PNG file", exit_code=2)
    for folder in grid.absolute().parents:  # nearest first
        if folder.exists():
            if not folder.is_dir():
                raise InpaintError(
                    f"{grid}: cannot make its folder, {folder} is a file", exit_code=2
                )
            return


def check_grid(
    options: RunOptions, items: list[Item], images: Path, masks: Path, out: Path
) -> None:
    """Refuse a --grid path that would replace an input, a mask, an output or a record of
    OUT, or that the next run would read back as an input or a mask."""
    if options.grid is None:
        return
    grid = Path(options.grid).expanduser().resolve()
    out = out.resolve()

    def refuse(problem: str) -> NoReturn:
        raise InpaintError(f"{options.grid}: {problem}; choose another --grid", exit_code=2)

    if any(grid == item.source.resolve() for item in items):
        refuse("is an input image")
    # Files in OUT are never read as inputs, nor as masks when OUT lies inside MASKS.
    in_out = grid.is_relative_to(out)
    if images.is_dir() and grid.is_relative_to(images.resolve()) and not in_out:
        refuse(f"is inside IMAGES ({images}), the next run would take it as an input")
    if grid.is_relative_to(masks.resolve()) and not (
        in_out and out.is_relative_to(masks.resolve())
    ):
        refuse(f"is inside MASKS ({masks}), it could replace or become a mask")
    if grid == out:
        refuse("is the --out folder")
    if in_out:
        name = grid.relative_to(out).as_posix()
        owner = next((item for item in items if name in item.output_names(options)), None)
        if owner is not None:
            refuse(f"is an output of {owner.rel}")
        if name in (MANIFEST_NAME, FAILURES_NAME) or RANK_FAILURES_RE.match(name):
            refuse(f"is a record of {out}")


def discover(
    images: Path, out: Path, masks: Path, warn: Callable[[str], None] | None = None
) -> tuple[Path, list[Path]]:
    """(root that relative paths start from, sorted image files)."""
    if images.is_file():
        return images.parent, [images]
    left_out: list[Path] = []
    found = list_images(images, left_out)
    if left_out and warn is not None:
        warn(left_out_warning(images, left_out))
    # OUT or MASKS inside IMAGES is allowed: its files (earlier outputs, masks) are never taken
    # as inputs. MASKS may also be IMAGES itself: then only <stem>_mask*.png are masks, and
    # list_images leaves those out already.
    excluded = [out.resolve()]
    if masks.resolve() != images.resolve() and masks.resolve().is_relative_to(images.resolve()):
        excluded.append(masks.resolve())
    found = [p for p in found if not any(p.resolve().is_relative_to(x) for x in excluded)]
    if not found:
        raise InpaintError(
            f"{images}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}; "
            "files named like masks, <stem>_mask*.png, are not images)",
            exit_code=2,
        )
    return images, found


class MaskFinder:
    """Masks by relative folder (then the top folder) and stem: `<stem>.<image ext>` first (PNG
    preferred), else every `<stem>_mask*.png` (their holes are united); a single mask file
    serves every image. `inpaint run` and `inpaint eval` both match masks with it."""

    def __init__(
        self, masks: Path, out: Path | None = None, image_files: AbstractSet[Path] = frozenset()
    ) -> None:
        self.single = masks if masks.is_file() else None
        self.by_stem: dict[tuple[str, str], list[Path]] = {}
        self.by_mask_name: dict[tuple[str, str], list[Path]] = {}
        self.ambiguous: list[list[Path]] = []
        if self.single is not None:
            return
        # An OUT inside MASKS holds earlier outputs, never masks; MASKS inside OUT holds masks.
        skipped = None
        if out is not None and out.resolve().is_relative_to(masks.resolve()):
            skipped = out.resolve()
        for path in walk_files(masks):
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                continue
            relative = path.relative_to(masks)
            if any(part.startswith(".") for part in relative.parts):
                continue
            if skipped is not None and path.resolve().is_relative_to(skipped):
                continue
            key_folder = _nfc(relative.parent.as_posix())
            named = MASK_NAME_RE.match(path.name)
            if named:
                self.by_mask_name.setdefault((key_folder, _nfc(named["stem"])), []).append(path)
            elif path not in image_files:  # MASKS may be IMAGES: an image is no one's mask
                self.by_stem.setdefault((key_folder, _nfc(path.stem)), []).append(path)
        # e.g. a.png beside a.jpg: the PNG is taken (find_stem); plan() says so once
        self.ambiguous = [sorted(paths) for paths in self.by_stem.values() if len(paths) > 1]

    def find(self, rel: PurePosixPath) -> list[Path]:
        """The masks of the image at relative path `rel`."""
        return self.find_stem(rel.parent.as_posix(), rel.stem)

    def find_stem(self, folder: str, stem: str) -> list[Path]:
        """The masks of an item named `stem` in relative folder `folder` (a shard key's stem
        may contain dots, so it is passed as is)."""
        if self.single is not None:
            return [self.single]
        folder, stem = _nfc(folder), _nfc(stem)
        for key in dict.fromkeys([(folder, stem), (".", stem)]):
            same_stem = self.by_stem.get(key)
            if same_stem:
                return [min(same_stem, key=lambda p: (p.suffix.lower() != ".png", p.name))]
            named = self.by_mask_name.get(key)
            if named:
                return named  # several <stem>_mask*.png: all their holes are filled
        return []


def _nfc(name: str) -> str:
    """A file name in one Unicode form: macOS writes "é" decomposed (NFD), most tools composed
    (NFC), so a mask made elsewhere for café.jpg would not match it byte for byte."""
    return unicodedata.normalize("NFC", name)


def read_caption_file(path: Path) -> dict[str, str]:
    """file_name (relative to IMAGES) -> text, from metadata.jsonl or a CSV file."""
    captions: dict[str, str] = {}
    try:
        # utf-8-sig: Excel's "CSV UTF-8" (and some editors) start the file with a byte-order mark
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InpaintError(f"{path}: cannot read caption file ({error})", exit_code=2) from None
    if path.suffix.lower() == ".csv":
        rows = csv.DictReader(text.splitlines())
        if not rows.fieldnames or not {"file_name", "text"} <= set(rows.fieldnames):
            raise InpaintError(f"{path}: CSV needs columns file_name and text", exit_code=2)
        records = [(i + 2, row) for i, row in enumerate(rows)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise InpaintError(
                    f"{path}: line {number}: not JSON ({error})", exit_code=2
                ) from None
    for number, record in records:
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise InpaintError(f"{path}: line {number}: needs a file_name", exit_code=2)
        caption = record.get("text")
        if caption is not None and not isinstance(caption, str):
            raise InpaintError(f"{path}: line {number}: text must be a string", exit_code=2)
        name = PurePosixPath(record["file_name"].replace("\\", "/")).as_posix()
        captions[_nfc(name.removeprefix("./"))] = caption or ""
    return captions


def plan(
    options: RunOptions,
    root: Path,
    files: list[Path],
    masks: Path,
    out: Path,
    warn: Callable[[str], None] | None,
) -> list[Item]:
    image_set = set(files)
    finder = MaskFinder(masks, out, image_set)
    if finder.ambiguous and warn is not None:
        example = ", ".join(path.name for path in finder.ambiguous[0])
        warn(
            f"warning: {masks}: {len(finder.ambiguous)} mask name(s) come in several files "
            f"({example} in {finder.ambiguous[0][0].parent}); the PNG, else the first by name, "
            "is used"
        )
    file_captions = read_caption_file(Path(options.caption_file)) if options.caption_file else {}
    # file_name is relative to IMAGES; else, as in a Hugging Face imagefolder, to the caption
    # file's folder (a single image given from a captioned folder, a metadata.jsonl above IMAGES)
    caption_root = _absolute(Path(options.caption_file).parent) if options.caption_file else None
    matched: set[str] = set()
    items = []
    for path in files:
        rel = PurePosixPath(path.relative_to(root).as_posix())
        item = Item(rel=rel.as_posix(), source=path, stem=rel.with_suffix("").as_posix())
        item.masks = finder.find(rel)
        if not item.masks:
            item.problem = f"{path}: no mask found in {options.masks} (looked for " \
                f"{rel.stem} with an image extension, and {rel.stem}_mask*.png)"  # fmt: skip
        key = _caption_key(item.rel, path, caption_root, file_captions)
        if options.caption is not None:
            item.caption = options.caption
        elif key is not None:
            item.caption = file_captions[key]
            matched.add(key)
        else:
            sidecar = path.with_suffix(".txt")
            item.sidecar = sidecar if sidecar.is_file() else None
        items.append(item)
    unmatched = sorted(set(file_captions) - matched) if options.caption is None else []
    if Path(options.images).is_file() and file_captions and options.caption is None:
        if not matched and warn is not None:  # one image: the other entries are no concern
            warn(
                f"warning: {options.caption_file}: no caption names {files[0]}; it is filled "
                "without one (file_name is relative to IMAGES or to the caption file's folder)"
            )
    elif unmatched and warn is not None:  # e.g. names relative to another folder than IMAGES
        warn(
            f"warning: {options.caption_file}: {len(unmatched)} of {len(file_captions)} captions "
            f"name no image under {root} (first: {unmatched[0]!r}); file_name is relative to "
            "IMAGES or to the caption file's folder"
        )
    resolve_name_clashes(items, options, warn)
    protected = {p.resolve() for p in image_set} | {
        m.resolve() for item in items for m in item.masks
    }
    for item in items:
        if item.problem is None:
            for name in item.output_names(options):
                if (out / name).resolve() in protected:
                    item.problem = f"{item.source}: output {out / name} would replace an input"
                    break
    return items


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))  # not resolved: a symlinked image keeps its place


def _caption_key(
    rel: str, path: Path, caption_root: Path | None, captions: dict[str, str]
) -> str | None:
    rel = _nfc(rel)
    if rel in captions:
        return rel
    if caption_root is None:
        return None
    absolute = _absolute(path)
    if not absolute.is_relative_to(caption_root):
        return None
    key = _nfc(absolute.relative_to(caption_root).as_posix())
    return key if key in captions else None


def resolve_name_clashes(
    items: list[Item], options: RunOptions, warn: Callable[[str], None] | None
) -> None:
    by_stem: dict[str, list[Item]] = {}
    for item in items:
        by_stem.setdefault(item.stem.casefold(), []).append(item)
    for group in by_stem.values():
        if len(group) > 1:
            for item in group:
                item.stem = item.rel  # a.jpg -> a.jpg.png
            if warn is not None:
                names = "; ".join(f"{item.rel} -> {_sample_names(item, options)}" for item in group)
                warn(f"warning: inputs share a name, outputs keep the extension: {names}")
    # Rarer clashes (an input named like another's output, e.g. a_0.png with --samples 2)
    # cannot be renamed away: the later file fails with a clear message.
    owners: dict[str, Item] = {}
    for item in items:
        names = [n.casefold() for n in item.output_names(options)]
        clash = next((owners[n] for n in names if n in owners), None)
        if clash is not None:
            item.problem = f"{item.source}: its outputs would have the name of {clash.rel}'s"
            continue
        owners.update(dict.fromkeys(names, item))


def _sample_names(item: Item, options: RunOptions) -> str:
    """The fills' file names, shortened to the first and last when there are many."""
    names = item.outputs(options)["samples"]
    return ", ".join(names) if len(names) <= 2 else f"{names[0]} ... {names[-1]}"


# The tEXt key of every output PNG that records what the output was made from.
INPUTS_KEY = "inpaint:inputs"


def _input_files(item: Item) -> list[Path]:
    return [item.source, *item.masks, *([item.sidecar] if item.sidecar else [])]


def input_fingerprint(item: Item) -> str:
    """What an image's outputs are made from: the sha256 of the image's, masks' and caption
    sidecar's bytes, and the caption. Contents only, so the same files copied elsewhere give
    the same fingerprint (and the same output bytes). Raises OSError for an unreadable file."""
    digest = hashlib.sha256()
    for path in _input_files(item):
        digest.update(sha256_file(path).encode("ascii"))
    digest.update(b"\0" + (item.caption or "").encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def recorded_fingerprint(output: Path) -> str | None:
    """The fingerprint an output was written with; None for an output that has none (written
    before outputs carried it) or cannot be read."""
    from PIL import Image

    try:
        with Image.open(output) as img:
            value = img.info.get(INPUTS_KEY)
    except Exception:  # a damaged output is judged as before: by its presence
        return None
    return value if isinstance(value, str) else None


def output_state(item: Item, options: RunOptions, out: Path, same_sources: bool = True) -> str:
    """'missing' (some output absent), 'changed' (all there, but made from other inputs) or
    'done'. `same_sources`: the last run into OUT read the same folders and caption file, so
    an output newer than its inputs was made from them."""
    names = item.output_names(options)
    if not all((out / name).is_file() for name in names):
        return "missing"
    try:
        written = (out / names[0]).stat().st_mtime_ns
        newest_input = max(path.stat().st_mtime_ns for path in _input_files(item))
        if same_sources and newest_input < written:
            return "done"  # make's rule, which spares reading every input on a rerun
        recorded = recorded_fingerprint(out / names[0])
        if recorded is None or recorded == input_fingerprint(item):
            return "done"
    except OSError:
        return "missing"  # an input gone or unreadable: filling it names the problem
    return "changed"


def header_problem(item: Item, options: RunOptions) -> str | None:
    """What would fail this image that file headers already show (unreadable or unsupported
    files, a mask of another size), without decoding pixels: for --dry-run. A file whose
    pixels are corrupt past its header still only fails when filled."""
    from inpaint_cli.images import mask_size_problem, upright_size

    try:
        size = upright_size(item.source)
    except InpaintError as error:
        return str(error)
    for mask in item.masks:
        try:
            mask_size = upright_size(mask)
        except InpaintError as error:
            return f"{item.source}: mask {error}"
        if mask_size != size and not options.resize_masks:
            return f"{item.source}: mask {mask}: {mask_size_problem(mask_size, size)}"
    return None


def check_foreign_files(items: list[Item], options: RunOptions, out: Path) -> None:
    """Refuse an OUT without a manifest in which planned outputs already exist.

    Every inpaint run writes OUT/manifest.jsonl before its first output, so such files are
    the user's own (or were copied there): taking them as finished outputs would leave images
    unfilled, and --overwrite would destroy them. A rerun into a folder inpaint run filled
    (it has the manifest) still skips, or with --overwrite redoes, its outputs.
    """
    if (out / MANIFEST_NAME).is_file():
        return
    existing = [
        out / name
        for item in items
        if item.problem is None  # an item that fails up front writes and removes nothing
        for name in item.output_names(options)
        if (out / name).exists()
    ]
    if existing:
        raise InpaintError(
            f"{existing[0]}: already exists, and {out} has no {MANIFEST_NAME}, so inpaint run "
            f"did not write it ({len(existing)} planned output file(s) exist there); such files "
            "are neither skipped nor replaced, even with --overwrite: choose another --out or "
            "move them away",
            exit_code=2,
        )


# ----------------------------------------------------------------------------- manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def caption_strength(options: RunOptions, config: dict) -> float:
    """The caption strength a run uses: --caption-strength, else the model config's (else 1);
    read_model_config has validated the config."""
    if options.caption_strength is not None:
        return float(options.caption_strength)
    return float(config.get("caption_strength", 1.0))


def output_settings(
    options: RunOptions,
    model_dir: Path,
    encoder: dict | None,
    caption_strength: float | None = None,
) -> dict:
    """What decides the output pixels besides each image's inputs: a rerun must match these
    to add to the same folder. The inputs themselves (image, masks, caption) are checked per
    image by their fingerprint, so other folders or a redrawn mask need no --overwrite."""
    return {
        "model_sha256": sha256_file(model_dir / "model.safetensors"),
        "seed": options.seed,
        "samples": options.samples,
        "temperature": options.temperature,
        "dilate": options.dilate,
        "text_encoder": encoder,
        "caption_strength": caption_strength,  # None when no caption reaches the model
    }


def input_sources(options: RunOptions, masks: Path) -> dict:
    """Where a run reads its inputs. When a rerun reads others (another folder of photos that
    reuse the same names, as cameras do, or an edited caption file), outputs newer than the
    inputs prove nothing, so every image is checked by its fingerprint (which holds its
    caption)."""
    caption_file = Path(options.caption_file) if options.caption_file else None
    return {
        "images": str(Path(options.images).resolve()),
        "masks": str(masks.resolve()),
        "caption": options.caption,
        "caption_file_sha256": sha256_file(caption_file) if caption_file else None,
    }


def last_sources(manifest_lines: list[str]) -> dict | None:
    """The input sources of the last run into OUT, from the manifest lines check_manifest kept
    (None if unknown)."""
    try:
        return json.loads(manifest_lines[-1]).get("inputs")
    except (ValueError, IndexError, AttributeError):
        return None


def check_manifest(out: Path, settings: dict, overwrite: bool) -> list[str]:
    """Earlier manifest lines to keep; raises when they record other settings."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return []
    if overwrite:
        return []
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        previous = json.loads(lines[-1])["settings"] if lines else settings
    except (OSError, ValueError, KeyError, TypeError):
        raise InpaintError(
            f"{path}: not a manifest written by inpaint run; use --overwrite or another --out",
            exit_code=2,
        ) from None
    # settings that earlier versions recorded and this one does not are not compared
    differ = sorted(k for k in settings if settings.get(k) != previous.get(k))
    if differ:
        changes = ", ".join(f"{k} {previous.get(k)!r} -> {settings.get(k)!r}" for k in differ)
        raise InpaintError(
            f"{path}: outputs there were made with other settings ({changes}); "
            "use --overwrite to redo them or choose another --out",
            exit_code=2,
        )
    return lines


def stale_outputs(items: list[Item], options: RunOptions, out: Path) -> list[Path]:
    """Files that earlier runs into OUT wrote for these images under names this run does not
    write: after `--samples 4`, a rerun with `--overwrite --samples 2` leaves `<stem>_2.png`
    and `<stem>_3.png`, which would pass for this run's. The manifest records every run's
    options, so only names inpaint run chose are ever listed."""
    try:
        lines = (out / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    earlier = []
    for line in lines:
        try:
            record = json.loads(line)["options"]
            samples = int(record["samples"])
            extras = bool(record["save_uncertainty"]), bool(record["save_mask_overlay"])
        except (ValueError, KeyError, TypeError):
            continue  # check_manifest has judged the file; a line it cannot read names nothing
        if samples >= 1:
            earlier.append(replace(options, samples=samples, save_uncertainty=extras[0],
                                   save_mask_overlay=extras[1]))  # fmt: skip
    current = {name for item in items for name in item.output_names(options)}
    stale = {
        name
        for item in items
        for old in earlier
        for name in item.output_names(old)
        if name not in current
    }
    return [out / name for name in sorted(stale) if (out / name).is_file()]


def options_record(options: RunOptions) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}


def remove_stale_temps(out: Path) -> None:
    for path in out.rglob(".*.tmp"):
        if TEMP_NAME_RE.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def find_model_dir(options: RunOptions) -> Path:
    if options.model is not None:
        return Path(options.model)
    from model.hvae import default_model_path

    path = default_model_path()
    if not (path / "config.json").is_file():
        raise InpaintError(
            f"{path}: the bundled default model is not installed; pass --model FOLDER",
            exit_code=2,
        )
    return path


def read_model_config(model_dir: Path) -> dict:
    from model.hvae import HVAEConfig, training_folder_hint  # torch: run loads it next anyway

    config_path = model_dir / "config.json"
    if not model_dir.is_dir() or not config_path.is_file():
        raise InpaintError(
            f"{model_dir}: not a model folder (needs config.json and model.safetensors)"
            + training_folder_hint(model_dir),
            exit_code=2,
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise InpaintError(f"{config_path}: invalid model config ({error})", exit_code=2) from None
    try:  # validated up front: later planning reads fields such as caption_dim
        HVAEConfig.from_dict(config)
    except (TypeError, ValueError) as error:
        raise InpaintError(f"{config_path}: invalid model config ({error})", exit_code=2) from None
    if not (model_dir / "model.safetensors").is_file():
        raise InpaintError(f"{model_dir}: not a model folder (no model.safetensors)", exit_code=2)
    return config
