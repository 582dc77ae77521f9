"""`inpaint shards`: pack images and captions into webdataset tar shards, split by group.

Sources: an image folder (captions from HF-style metadata.jsonl/csv, sidecar `<stem>.txt`, or
none), a dataset saved with `datasets.save_to_disk`, or parquet files with image and text
columns. One sample per image: the image bytes (`png`/`jpg`/`webp`), `txt` when there is a
caption, `json` (source, size, format, other metadata columns) and, with embeddings, `emb.f32`
(raw little-endian float32; its length is in the json, so nothing is ever unpickled).

Resumable: the source's items have a fixed order, and `.shards-progress.json` records, per split,
the complete shards and the position of the last item in them. A rerun with the same settings
and source skips those items, so its shards come out as an uninterrupted run's would.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import posixpath
import re
import shlex
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inpaint_cli.errors import InpaintError, printable
from inpaint_cli.images import (
    atomic_write_bytes,
    decode_image,
    image_to_rgb_uint8,
    list_images,
    make_output_folder,
    output_lock,
    png_bytes,
    walk_files,
)

SPLIT_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# What the shards of a run of ours are named: `<split>-NNNNNN.tar`.
SHARD_NAME_RE = re.compile(r"^.+-[0-9]{6}\.tar$")
# The caption column when none is named: a source without it simply has no captions there
# (metadata kept for --split-by only, captions in sidecars). A column the user names must exist.
DEFAULT_TEXT_COLUMN = "text"
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
# Written after each complete shard: what a rerun of the same command needs to resume.
PROGRESS_NAME = ".shards-progress.json"
# Embedding this many captions per text-encoder call keeps memory flat and the model busy.
_CHUNK = 64

Warn = Callable[[str, str], None]


@dataclass
class SourceItem:
    """One sample to be, before its image is read."""

    key: str
    name: str  # how warnings name it: a path, or "<file> row <n>"
    group: str  # the --split-by value
    read_image: Callable[[], bytes]
    caption: str | None
    info: dict[str, Any] = field(default_factory=dict)


def parse_splits(text: str) -> list[tuple[str, float]]:
    """Parse "train=0.9,val=0.05,test=0.05"; fractions must be positive and sum to 1."""
    splits: list[tuple[str, float]] = []
    for part in str(text).split(","):
        name, _, value = part.strip().partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not SPLIT_NAME_RE.match(name) or not 0.0 < fraction <= 1.0:
            raise InpaintError(
                f"--splits {text}: expected name=fraction pairs such as train=0.9,val=0.1",
                exit_code=2,
            )
        if name in dict(splits):
            raise InpaintError(f"--splits {text}: split {name} named twice", exit_code=2)
        splits.append((name, fraction))
    total = sum(fraction for _, fraction in splits)
    if abs(total - 1.0) > 1e-6:
        raise InpaintError(f"--splits {text}: fractions add up to {total:g}, not 1", exit_code=2)
    return splits


def assign_split(group: str, splits: list[tuple[str, float]]) -> str:
    """The split of a group: a hash of the group value, so a group never spans two splits."""
    digest = hashlib.sha256(group.encode("utf-8", "surrogatepass")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name, fraction in splits:
        cumulative += fraction
        if position < cumulative:
            return name
    return splits[-1][0]


def safe_key(stem: str, unique: str) -> str:
    """A tar-safe sample key: no dots (webdataset splits there), slashes or odd characters."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:48] or "image"
    return f"{readable}-{hashlib.sha1(unique.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return not (isinstance(value, dict) and "bytes" in value)


def _caption_text(value: Any) -> str | None:
    """A caption cell as text: strings as they are, numbers as written; None when empty.

    ValueError for anything else (true, an object, a list): its Python repr ("True",
    "{'a': 1}") would be stored as if someone had written it as the caption."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return json.dumps(value)
    kind = {bool: "a boolean", dict: "an object", list: "a list"}.get(type(value))
    raise ValueError(f"is {kind or type(value).__name__}, not a caption")


def _checked_caption(row: dict[str, Any], column: str, where: str, warn: Warn) -> str | None:
    """The row's caption, or None with one warning when it is not text (the image is kept)."""
    try:
        return _caption_text(row.get(column))
    except ValueError as error:
        warn(where, f"{column} {error}; ignored")
        return None


# ---------------------------------------------------------------- image folders


def relative_name(file_name: Any) -> str | None:
    """A metadata file_name as a clean relative path, or None when it tries to leave the folder."""
    if not isinstance(file_name, str) or not file_name:
        return None
    name = posixpath.normpath(file_name.replace("\\", "/"))
    if name.startswith(("/", "../")) or name == ".." or re.match(r"^[A-Za-z]:", name):
        return None
    return name


def _metadata_rows(path: Path, warn: Warn) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of each row: where is "<file> line <n>", as warnings name it."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise InpaintError(f"{path}: cannot read metadata ({error})", exit_code=1) from None
    try:
        # utf-8-sig: a file saved with a byte-order mark (Excel, Notepad) would otherwise name
        # its first column "\ufefffile_name" and lose every caption.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        if path.suffix == ".csv":  # a row may span lines: no line can be left out alone
            raise InpaintError(f"{path}: cannot read metadata ({error})", exit_code=1) from None
        text = None
    # Lines end at \n only (as JSON Lines and the csv module say): str.splitlines would also
    # split captions at U+2028, U+0085 and other characters JSON leaves unescaped.
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield f"{path} line {reader.line_num}", row
        return
    lines = text.split("\n") if text is not None else raw.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    for number, line in enumerate(lines, start=1):
        if isinstance(line, bytes):  # the file is not all UTF-8: each line on its own
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError:
                warn(f"{path} line {number}", "not UTF-8 text")
                continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            yield f"{path} line {number}", row
        else:
            warn(f"{path} line {number}", "not a JSON object")


def _folder_metadata(
    root: Path, images: set[Path], text_column: str, warn: Warn
) -> dict[Path, dict[str, Any]]:
    """Metadata rows keyed by image path; file_name is relative to its metadata file's folder.

    A caption that is not text is warned about and dropped from its row (the image then falls
    back to its sidecar, as with an empty caption)."""
    rows: dict[Path, dict[str, Any]] = {}
    found = sorted(path for path in walk_files(root) if path.name in METADATA_NAMES)
    for name in METADATA_NAMES:
        for meta_path in (path for path in found if path.name == name):
            for where, row in _metadata_rows(meta_path, warn):
                relative = relative_name(row.get("file_name"))
                image = meta_path.parent / relative if relative else None
                shown = repr(row.get("file_name"))
                if image is None or image not in images:
                    warn(where, f"file_name {shown} is not an image in {root}")
                    continue
                if image in rows:
                    warn(where, f"file_name {shown} is listed again; its first row is kept")
                    continue
                if text_column in row:
                    row[text_column] = _checked_caption(row, text_column, where, warn)
                rows[image] = row
    return rows


def _read_sidecar(path: Path) -> str | None:
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        return sidecar.read_bytes().decode("utf-8-sig").strip()  # -sig: as metadata files
    except UnicodeDecodeError:
        raise InpaintError(f"{sidecar}: caption is not UTF-8 text", exit_code=1) from None
    except OSError as error:
        raise InpaintError(f"{sidecar}: cannot read ({error.strerror})", exit_code=1) from None


def folder_items(
    root: Path, text_column: str, split_by: str | None, warn: Warn, warn_metadata: Warn
):
    """Items of an image folder, captions from metadata, else sidecar .txt, else none.

    `warn` is called for each image left out, `warn_metadata` for each metadata line or row
    that is ignored (it leaves no image out, so callers count the two apart).
    """
    left_out: list[Path] = []
    paths = list_images(root, left_out)
    for path in left_out:
        warn(str(path), f"{path.suffix} is not a format inpaint reads; convert it to PNG or JPEG")
    metadata = _folder_metadata(root, set(paths), text_column, warn_metadata)
    if split_by and not any(split_by in row for row in metadata.values()):
        raise InpaintError(
            f"--split-by {split_by}: no such column in {root}'s metadata", exit_code=2
        )
    named = text_column != DEFAULT_TEXT_COLUMN
    if named and metadata and not any(text_column in row for row in metadata.values()):
        raise InpaintError(
            f"--text-column {text_column}: no such column in {root}'s metadata", exit_code=2
        )
    items = []
    for path in paths:
        relative = path.relative_to(root).as_posix()
        row = metadata.get(path, {})
        if split_by and row.get(split_by) is None:
            warn(str(path), f"no {split_by!r} value in the metadata (needed by --split-by)")
            continue
        try:
            caption = row.get(text_column)  # text or None: _folder_metadata checked it
            caption = caption if caption is not None else _read_sidecar(path)
        except InpaintError as error:
            warn(str(path), str(error))
            continue
        extra = {
            k: v for k, v in row.items() if k not in ("file_name", text_column) and _jsonable(v)
        }
        items.append(
            SourceItem(
                key=safe_key(path.stem, relative),
                name=str(path),
                group=str(row[split_by]) if split_by else path.stem,
                read_image=functools.partial(read_source_file, path),
                caption=caption,
                info={
                    "source": relative,
                    "metadata": {k: v for k, v in extra.items() if _jsonable(v)},
                },
            )
        )
    return items


# ---------------------------------------------------------------- datasets and parquet


# A source file is refused above this size before it is read (a sparse or hostile 6 GB file
# would be loaded whole): above any photo's encoded size at the decompression bomb limit.
MAX_SOURCE_BYTES = 512 << 20


def read_source_file(path: Path) -> bytes:
    """A source image's bytes, after checking its size."""
    size = path.stat().st_size
    if size > MAX_SOURCE_BYTES:
        raise InpaintError(
            f"{path}: {size / 2**20:,.0f} MiB, above the {MAX_SOURCE_BYTES >> 20} MiB an image "
            "file may have",
            exit_code=1,
        )
    return path.read_bytes()


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes")
        if value is None:
            raise ValueError("the image is stored as a file path, not as bytes")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ValueError(f"the image column holds {type(value).__name__}, not image bytes")


def _row_item(
    row: dict, name: str, key: str, columns: tuple[str, str], split_by: str | None, warn: Warn
):
    image_column, text_column = columns
    value = row.get(image_column)
    extra = {k: v for k, v in row.items() if k not in columns and _jsonable(v)}
    return SourceItem(
        key=key,
        name=name,
        group=str(row.get(split_by)) if split_by else key,
        read_image=lambda: _image_bytes(value),
        caption=_checked_caption(row, text_column, name, warn),
        info={"source": name, "metadata": extra},
    )


def _check_columns(src: Path, names: Iterable[str], columns: tuple[str, str], split_by):
    names = list(names)
    image_column, text_column = columns
    named_text = text_column if text_column != DEFAULT_TEXT_COLUMN else None
    checks = (("--image-column", image_column), ("--text-column", named_text))
    for option, column in (*checks, ("--split-by", split_by)):
        if column and column not in names:
            raise InpaintError(
                f"{src}: no column {column!r} for {option} (columns: {', '.join(names)})",
                exit_code=2,
            )


def dataset_items(src: Path, image_column: str, text_column: str, split_by: str | None, warn: Warn):
    """Items of a dataset saved with `save_to_disk` (all of a DatasetDict's splits)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(src))
    except Exception as error:  # datasets raises many types for a damaged folder
        raise InpaintError(f"{src}: cannot load the saved dataset ({error})", exit_code=1) from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for part_name, dataset in parts:
        _check_columns(src, dataset.column_names, (image_column, text_column), split_by)
        if isinstance(dataset.features[image_column], datasets.Image):
            # Raw bytes, decoded later by our own loader rather than by datasets' Pillow call.
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        prefix = f"{part_name}-" if part_name else ""
        for index, row in enumerate(dataset):
            name = f"{src} {prefix}row {index}"
            key = safe_key(f"{prefix}{index:08d}", name)
            yield _row_item(row, name, key, (image_column, text_column), split_by, warn)


def _parquet_files(folder: Path) -> list[Path]:
    # walk_files, as for images: symlinked sub-folders are followed, each real folder once
    return sorted(path for path in walk_files(folder) if path.suffix == ".parquet")


def parquet_items(src: Path, image_column: str, text_column: str, split_by: str | None, warn: Warn):
    """Items of a parquet file or a folder of them (read in batches, in file order)."""
    import pyarrow.parquet as pq

    files = [src] if src.is_file() else _parquet_files(src)
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
            columns = (image_column, text_column)
            _check_columns(path, parquet.schema_arrow.names, columns, split_by)
            index = 0
            for batch in parquet.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    name = f"{path} row {index}"
                    key = safe_key(f"{path.stem}-{index:08d}", name)
                    yield _row_item(row, name, key, (image_column, text_column), split_by, warn)
                    index += 1
        except InpaintError:
            raise
        except Exception as error:  # pyarrow raises many types for damaged files
            raise InpaintError(f"{path}: cannot read parquet ({error})", exit_code=1) from None


# ---------------------------------------------------------------- writing


def _image_member(
    data: bytes, name: str, note: Callable[[str], None]
) -> tuple[str, bytes, dict[str, Any]]:
    """Validate by decoding fully; keep PNG/JPEG/WebP bytes as they are, re-encode others.
    An animation or a multi-page file is `note`d: the loaders decode its first frame only."""
    img = decode_image(data, name)
    frames = img.info.get("frames", 1)
    if frames > 1:
        note(f"note: {name}: {frames} frames, training and evaluation use the first")
    info = {"width": img.width, "height": img.height}
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png", data, {**info, "format": "PNG"}
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg", data, {**info, "format": "JPEG"}
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", data, {**info, "format": "WEBP"}
    try:
        encoded = png_bytes(img)
    except (OSError, ValueError, KeyError):
        from PIL import Image

        encoded = png_bytes(Image.fromarray(image_to_rgb_uint8(img)))
    return "png", encoded, {**info, "format": "PNG"}


class _SplitWriter:
    """A webdataset.ShardWriter whose shards appear only when complete (temp name, rename).

    Each item has a position in the source's (fixed) order. `through` is the position of the
    last item in this split's complete shards: a resumed run starts after it. Items of the
    split that were skipped as bad up to `through` are counted in `skipped`; later ones are
    read (and warned about) again by a resumed run.
    """

    def __init__(
        self, out: Path, split: str, max_count: int, max_size: int, on_shard: Callable[[], None]
    ) -> None:
        self.out, self.split = out, split
        self.max_count, self.max_size = max_count, max_size
        self.on_shard = on_shard
        self.shard_info: list[dict[str, Any]] = []  # name, bytes, samples of each shard
        self.recorded = 0  # shards in the progress record: what a resumed run keeps
        self.count = 0  # samples written, complete shards or not
        self.through, self.skipped = -1, 0
        self._last_position = -1
        self._skip_positions: list[int] = []
        self._writer = None
        self._handles: dict[str, Any] = {}

    def resume(self, record: dict[str, Any]) -> None:
        self.shard_info = list(record["shards"])
        self.recorded = len(self.shard_info)
        self.count = sum(info["samples"] for info in self.shard_info)
        self.through, self.skipped = record["through"], record["skipped"]

    @property
    def shards(self) -> list[Path]:
        return [self.out / info["name"] for info in self.shard_info]

    def record(self) -> dict[str, Any]:
        return {"shards": self.shard_info, "through": self.through, "skipped": self.skipped}

    def _open(self, temp_name: str):
        handle = open(temp_name, "wb")  # closed in _finish once the shard is full
        self._handles[temp_name] = handle
        return handle

    def _finish(self, temp_name: str) -> None:
        handle = self._handles[temp_name]
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        final = self.out / f"{self.split}-{len(self.shards):06d}.tar"
        os.replace(temp_name, final)
        del self._handles[temp_name]  # only now is it no longer ours to clean up
        # ShardWriter finishes a shard before writing the sample that overflows it, so every
        # sample written so far is in a complete shard.
        done = sum(info["samples"] for info in self.shard_info)
        size = final.stat().st_size
        self.shard_info.append({"name": final.name, "bytes": size, "samples": self.count - done})
        self.through = self._last_position
        self.skipped += sum(position < self.through for position in self._skip_positions)
        self._skip_positions = [p for p in self._skip_positions if p > self.through]
        self.on_shard()
        self.recorded = len(self.shards)

    def skip(self, position: int) -> None:
        self._skip_positions.append(position)

    def write(self, sample: dict[str, Any], position: int) -> None:
        if self._writer is None:
            import webdataset

            # The pattern is a %-format: a '%' in the folder name must not be read as one.
            folder = str(self.out).replace("%", "%%")
            self._writer = webdataset.ShardWriter(
                f"{folder}/.{self.split}-%06d.tar.tmp",
                maxcount=self.max_count,
                maxsize=self.max_size,
                post=self._finish,
                opener=self._open,
                verbose=0,
                encoder=False,
                mtime=0,
            )
        self._writer.write(sample)
        self.count += 1
        self._last_position = position

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def discard_partial(self) -> None:
        """Remove the shard being written; complete shards stay for a resumed run."""
        # Close the tar stream before its file: left open, tarfile flushes its buffer into the
        # closed file when garbage-collected and prints a traceback ("Exception ignored in
        # _Stream.__del__"). The file is deleted below, so failures to write now do not matter.
        tar = getattr(self._writer, "tarstream", None)
        with contextlib.suppress(OSError, ValueError):
            if tar is not None:
                tar.close()
        for temp_name, handle in self._handles.items():
            with contextlib.suppress(OSError):  # a full disk fails the buffered flush again
                handle.close()
            Path(temp_name).unlink(missing_ok=True)
        self._handles.clear()

    def pattern(self) -> str:
        if len(self.shards) == 1:
            return str(self.shards[0])
        return str(self.out / f"{self.split}-{{{0:06d}..{len(self.shards) - 1:06d}}}.tar")


# How an error names each setting that a resumed run must share with the interrupted one.
_SETTING_NAMES = {
    "source": "SRC",
    "fingerprint": "list of source files or captions",
    "splits": "--splits",
    "split_by": "--split-by",
    "max_count": "--max-count",
    "max_size": "--max-size",
    "image_column": "--image-column",
    "text_column": "--text-column",
    "text_encoder": "text encoder",
}


def _sampled_file_hash(path: Path) -> list[Any]:
    """Size plus the first and last MiB: catches a rewritten data file without reading all of
    a many-GB dataset again, and ignores times (a copy or `touch` changes nothing)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        handle.seek(max(size - (1 << 20), 0))
        digest.update(handle.read(1 << 20))
    return [size, digest.hexdigest()]


def _source_fingerprint(src: Path, items: Iterable[SourceItem]) -> str:
    """What a resumed run must find unchanged. A folder: each image's name, size, group,
    caption and metadata, in order. A dataset or parquet source: its data files."""
    digest = hashlib.sha256()
    if isinstance(items, list):
        rows: Iterable[list[Any]] = (
            [item.key, item.group, item.caption, item.info, _size(Path(item.name))]
            for item in items
        )
    elif src.is_file():
        rows = [_sampled_file_hash(src)]
    else:
        data = [p for p in walk_files(src) if p.suffix in (".parquet", ".arrow", ".json")]
        rows = ([p.relative_to(src).as_posix(), *_sampled_file_hash(p)] for p in sorted(data))
    for row in rows:
        # ascii: surrogates are escaped; sort_keys: metadata in any column order
        digest.update(json.dumps(row, sort_keys=True, default=str).encode("ascii"))
    return digest.hexdigest()


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None  # read (and reported) when its turn comes


def _read_progress(
    path: Path, settings: dict[str, Any], split_positions: dict[str, list[int]] | None
) -> dict[str, Any]:
    """The progress record, checked for consistency. With the same settings as now and a list
    source, `split_positions` (the source positions of each split's items) checks its counts
    exactly."""
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
        records = progress["splits"]
        assert set(records) == {name for name, _ in progress["settings"]["splits"]}
        for split, record in records.items():
            through, skipped, shards = record["through"], record["skipped"], record["shards"]
            assert isinstance(through, int) and isinstance(skipped, int) and through >= -1
            for index, info in enumerate(shards):
                assert info["name"] == f"{split}-{index:06d}.tar"
                assert isinstance(info["bytes"], int) and isinstance(info["samples"], int)
                assert info["samples"] >= 1
            written = sum(info["samples"] for info in shards)
            assert (through == -1) == (not shards) and 0 <= skipped
            assert written + skipped <= through + 1
            if split_positions is not None and progress["settings"] == settings:
                # every item of the split up to `through` is in a shard or was skipped as bad
                positions = split_positions[split]
                assert written + skipped == sum(position <= through for position in positions)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise InpaintError(
            f"{path}: damaged record of an interrupted run; remove the folder's shards and it, "
            "then start again",
            exit_code=2,
        ) from None
    return progress


def _prepare_output(
    out: Path,
    splits: list[tuple[str, float]],
    settings: dict[str, Any],
    split_positions: dict[str, list[int]] | None,
) -> dict[str, Any] | None:
    """Check OUT (locked); return the record of the interrupted run it holds, else None."""
    found = {p.name for p in out.iterdir() if SHARD_NAME_RE.match(p.name)}
    for stale in [*out.glob(f".{PROGRESS_NAME}.*.tmp"), *out.glob(".shards.json.*.tmp")]:
        stale.unlink()  # atomic_write_bytes's, left by a killed run of ours
    if (out / "shards.json").exists():
        raise InpaintError(
            f"{out}: already holds shards (shards.json: a finished pack); choose another "
            "folder, or remove them to pack again",
            exit_code=2,
        )
    progress_path = out / PROGRESS_NAME
    progress = None
    if progress_path.exists():
        progress = _read_progress(progress_path, settings, split_positions)
        recorded = [info["name"] for r in progress["splits"].values() for info in r["shards"]]
        if progress["settings"] != settings and (recorded or found):
            changed = [
                v for k, v in _SETTING_NAMES.items() if progress["settings"].get(k) != settings[k]
            ]
            raise InpaintError(
                f"{out}: holds the shards of an interrupted run with another "
                f"{', '.join(changed)}; run that command again to finish it, or remove them",
                exit_code=2,
            )
        if progress["settings"] != settings:
            progress = None  # a run stopped before its first shard: nothing to keep
        for name, record in (progress or {"splits": {}})["splits"].items():
            for info in record["shards"]:
                shard = out / info["name"]
                if info["name"] not in found or shard.stat().st_size != info["bytes"]:
                    raise InpaintError(
                        f"{shard}: missing or changed since the interrupted run wrote it; "
                        "remove the folder's shards and start again",
                        exit_code=2,
                    )
                found.discard(info["name"])
            # Renamed into place after the record was last written: ours, but not recorded.
            for index in range(len(record["shards"]), len(record["shards"]) + len(found)):
                if f"{name}-{index:06d}.tar" in found:
                    (out / f"{name}-{index:06d}.tar").unlink()
                    found.discard(f"{name}-{index:06d}.tar")
    # Any other shards, not only those of the splits asked for now: a new split named
    # otherwise would hold the same images (leaking them between splits), and shards.json
    # would describe only the new run.
    if found:
        raise InpaintError(
            f"{out}: already holds shards ({min(found)}); remove them or choose another folder",
            exit_code=2,
        )
    for name, _ in splits:
        for stale in out.glob(f".{name}-*.tar.tmp"):
            stale.unlink()  # left by an interrupted run of ours
    return progress


def _source_items(
    src, image_column, text_column, split_by, warn, warn_metadata
) -> Iterable[SourceItem]:
    if not src.exists():
        raise InpaintError(f"{src}: no such file or folder", exit_code=2)
    if src.is_file() and src.suffix == ".parquet":
        return parquet_items(src, image_column, text_column, split_by, warn_metadata)
    if not src.is_dir():
        raise InpaintError(
            f"{src}: expected an image folder, saved dataset or parquet", exit_code=2
        )
    if (src / "dataset_dict.json").is_file() or (src / "state.json").is_file():
        return dataset_items(src, image_column, text_column, split_by, warn_metadata)
    items = folder_items(src, text_column, split_by, warn, warn_metadata)
    if not items and _parquet_files(src):
        return parquet_items(src, image_column, text_column, split_by, warn_metadata)
    if not items:
        raise InpaintError(f"{src}: no images found", exit_code=2)
    # Hash order mixes concepts across shards (folders are often sorted by concept).
    return sorted(items, key=lambda item: hashlib.sha1(item.key.encode()).digest())


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _load_encoder(text_encoder: str | None):
    from conditioning import TextEncoder, TextEncoderError

    try:
        # No cache: a cached embedding would come from whichever batch met its caption first,
        # and a resumed run meets captions in other batches (the last bits would differ).
        return TextEncoder(text_encoder, cache_size=0)
    except TextEncoderError as error:
        raise InpaintError(str(error), exit_code=2) from None


def _pack(
    items: Iterable[SourceItem],
    writers: dict[str, _SplitWriter],
    split_fractions: list[tuple[str, float]],
    encoder: Any,
    warn: Warn,
    note: Callable[[str], None],
    progress_bar: Any,
) -> None:
    """Read, check and write every item that no complete shard holds yet."""
    task = progress_bar.add_task("shards", total=len(items) if isinstance(items, list) else None)
    # Chunks by position in the source, the same in every run: the text encoder's batches, and
    # so the last bits of each embedding, are then those of an uninterrupted run.
    for chunk in _chunks(enumerate(items), _CHUNK):
        samples = []
        for position, item in chunk:
            progress_bar.advance(task)
            split = assign_split(item.group, split_fractions)
            if position <= writers[split].through:
                continue  # in a complete shard already
            try:
                ext, data, info = _image_member(item.read_image(), item.name, note)
                sample = {"__key__": item.key, ext: data}
                if item.caption is not None:
                    sample["txt"] = item.caption.encode("utf-8")
            except (InpaintError, ValueError, OSError) as error:
                warn(item.name, str(error))
                writers[split].skip(position)
                continue
            except MemoryError:
                warn(item.name, "too large to read into memory")
                writers[split].skip(position)
                continue
            samples.append((position, split, sample, {**item.info, **info}))
        if encoder is not None and samples:
            # every caption of the chunk, done and bad items' too: the same batch in every run
            embeddings = encoder.encode([item.caption or "" for _, item in chunk])
            rows = embeddings.detach().cpu().float().numpy().astype("<f4")
            for position, _, sample, info in samples:
                row = rows[position - chunk[0][0]]
                sample["emb.f32"] = row.tobytes()
                info["embedding_dim"] = int(row.shape[0])
        for position, split, sample, info in samples:
            sample["json"] = json.dumps(info).encode("utf-8")
            writers[split].write(sample, position)
    for writer in writers.values():
        writer.close()


def write_shards(
    src: Path,
    out: Path,
    *,
    splits: str = "train=1.0",
    split_by: str | None = None,
    max_count: int = 1000,
    max_size: int = 1 << 30,
    image_column: str = "image",
    text_column: str = "text",
    embed_captions: bool = False,
    text_encoder: str | None = None,
) -> dict[str, Any]:
    """Write `<out>/<split>-NNNNNN.tar` shards and `<out>/shards.json`; return the summary.

    Bad files are skipped with one warning line each and counted in `skipped`; ignored
    metadata lines are warned about too, and counted apart in `metadata_skipped`. An
    interrupted run is resumed: its complete shards are kept and only the rest is packed.
    """
    from rich.console import Console
    from rich.progress import Progress

    src, out = Path(src), Path(out)
    split_fractions = parse_splits(splits)
    if max_count < 1 or max_size < 1:
        raise InpaintError("--max-count and --max-size must be at least 1", exit_code=2)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    counts = {"skipped": 0, "metadata_skipped": 0}

    def warner(count: str) -> Warn:
        def warn(name: str, problem: str) -> None:
            counts[count] += 1
            # an InpaintError's message names the file already, escaped (printable)
            named = problem.startswith(f"{printable(name)}: ")
            message = problem if named else f"{name}: {problem}"
            console.print(f"warning: {printable(message)}", markup=False)

        return warn

    def note(message: str) -> None:
        console.print(printable(message), markup=False)

    warn = warner("skipped")
    items = _source_items(
        src, image_column, text_column, split_by, warn, warner("metadata_skipped")
    )
    encoder = _load_encoder(text_encoder) if embed_captions else None
    settings = {
        "source": str(src.resolve()),
        "fingerprint": _source_fingerprint(src, items),
        "splits": split_fractions,
        "split_by": split_by,
        "max_count": max_count,
        "max_size": max_size,
        "image_column": image_column,
        "text_column": text_column,
        "text_encoder": encoder.identity() if encoder is not None else None,
    }
    settings = json.loads(json.dumps(settings))  # as read back from the record (lists, not tuples)
    split_positions = None
    if isinstance(items, list):
        split_positions = {name: [] for name, _ in split_fractions}
        for position, item in enumerate(items):
            split_positions[assign_split(item.group, split_fractions)].append(position)
    make_output_folder(out, src)
    with output_lock(out, "shards"):
        interrupted = _prepare_output(out, split_fractions, settings, split_positions)

        def record_progress() -> None:
            splits_done = {name: writer.record() for name, writer in writers.items()}
            data = json.dumps({"settings": settings, "splits": splits_done}, indent=1)
            atomic_write_bytes(out / PROGRESS_NAME, data.encode("utf-8"))

        writers = {
            name: _SplitWriter(out, name, max_count, max_size, record_progress)
            for name, _ in split_fractions
        }
        if interrupted is None:
            record_progress()  # before any shard exists, so a kill at any moment can resume
        else:
            for name, writer in writers.items():
                writer.resume(interrupted["splits"][name])
            before = sum(writer.skipped for writer in writers.values())
            counts["skipped"] += before
            kept = ", ".join(f"{n} {len(w.shards)}" for n, w in writers.items())
            bad = f", {before} bad files skipped before" if before else ""
            console.print(f"resuming an interrupted run: complete shards kept ({kept}){bad}")
        try:
            with Progress(console=console, transient=True) as progress_bar:
                _pack(items, writers, split_fractions, encoder, warn, note, progress_bar)
        except BaseException as error:
            for writer in writers.values():
                writer.discard_partial()
            kept = sum(writer.recorded for writer in writers.values())
            # A shard renamed into place but not yet recorded is ours: the record must stay
            # for the rerun to know it (and pack it again).
            resumable = any(writer.shards for writer in writers.values())
            if not resumable:
                (out / PROGRESS_NAME).unlink(missing_ok=True)
            again = f"; {kept} complete shards kept: run the same command again to resume"
            again = again if resumable else ""
            if isinstance(error, OSError):
                problem = f"cannot write shards ({error.strerror or error})"
                raise InpaintError(f"{out}: {problem}{again}", exit_code=1) from None
            if isinstance(error, InpaintError) and resumable:
                raise InpaintError(f"{error}{again}", exit_code=error.exit_code) from None
            if isinstance(error, KeyboardInterrupt) and resumable:
                raise InpaintError(f"{out}: interrupted{again}", exit_code=130) from None
            raise
        summary = {
            "out": str(out),
            "splits": {
                name: {
                    "count": writer.count,
                    "shards": [shard.name for shard in writer.shards],
                    "pattern": writer.pattern() if writer.shards else None,
                }
                for name, writer in writers.items()
            },
            **counts,
            "text_encoder": encoder.identity() if encoder is not None else None,
        }
        atomic_write_bytes(out / "shards.json", json.dumps(summary, indent=2).encode("utf-8"))
        (out / PROGRESS_NAME).unlink(missing_ok=True)
    return summary


def format_summary(summary: dict[str, Any]) -> list[str]:
    """Lines for the terminal: samples and a paste-ready --data pattern per split."""
    lines = []
    for name, split in summary["splits"].items():
        if not split["shards"]:
            lines.append(f"{name}: 0 samples, no shards")
            continue
        shards = len(split["shards"])
        lines.append(
            f"{name}: {split['count']} samples in {shards} shard{'s' * (shards > 1)}: "
            f"--data {shlex.quote(split['pattern'])}"
        )
    lines.append(f"skipped: {summary['skipped']} bad files")
    if summary.get("metadata_skipped"):
        lines.append(f"ignored: {summary['metadata_skipped']} metadata lines (see the warnings)")
    return lines
