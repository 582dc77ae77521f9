"""Webdataset loaders for training and evaluation: seeded, resumable, multi-process correct.

Shards are read by our own bounded tar reader and decoded by our own handlers only: images
through `images.decode_image`, `txt` as UTF-8, `emb.f32` as raw float32, `json` as JSON (what
`inpaint shards` recorded: the file name and size `inpaint eval` matches masks by). Any other
member (`.pkl`, `.pth`, ...) stays bytes and is never looked at, so nothing is ever unpickled.

Training (`train_loader`) is infinite: each (rank, worker) draws shards with replacement from its
own seeded stream (webdataset's `ResampledShards`), so every rank always has a next batch and
DDP never waits on a rank that ran out. A training batch is a *window* of `batch_size` raw
samples; a corrupt sample in it is counted and its slot filled with another sample of the same
window. Batch n therefore depends only on raw sample positions, and resuming at `start_batch`
skips raw windows without decoding them, yet yields exactly what the uninterrupted run would.

Evaluation (`eval_loader`) is one exact pass: shards are split over ranks x workers, or, with
fewer shards than that, samples are (every process reads all shards and keeps its share).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import multiprocessing.util  # registers its exit handler before _kill_leftover_workers
import random
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inpaint_cli.errors import InpaintError, printable
from inpaint_cli.images import decode_image, image_to_rgb_uint8
from inpaint_cli.masks import check_kind, make_mask, stable_seed

IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")
# Larger members are skipped unread: a hostile (possibly compressed) shard cannot make us
# allocate more than this for one file.
MAX_MEMBER_BYTES = 64 << 20
# The members a sample is read for; others (a foreign shard's extras) are skipped unread, so a
# sample holds at most a few members' bytes.
USED_MEMBERS = frozenset(IMAGE_MEMBERS) | {"txt", "json", "emb.f32"}
SHUFFLE_BUFFER = 1000
SHUFFLE_INITIAL = 100
# The shuffle buffer holds raw (encoded) samples: at most this many bytes of them per worker,
# else 1,000 large photos (or hostile shards of 64 MiB members) would take gigabytes.
SHUFFLE_MAX_BYTES = 512 << 20
# A worker that sees this many shards in a row without a sample, or this many windows in a row
# without one decodable image, stops with an error instead of spinning forever.
_MAX_EMPTY_IN_A_ROW = 50
BACKGROUNDS = ("white", "black", "random")


def expand_urls(spec: str | list[str]) -> list[str]:
    """Shard URLs from brace patterns, comma or `::` separated lists, or a list of those.

    `pipe:` URLs run a shell command (webdataset's convention) and are kept whole.
    """
    import braceexpand

    if not isinstance(spec, (str, list, tuple)):
        raise InpaintError(f"{spec!r}: expected a shard pattern or a list of them", exit_code=2)
    parts = list(spec) if isinstance(spec, (list, tuple)) else spec.split("::")
    urls: list[str] = []
    for part in parts:
        part = str(part).strip()
        whole = list(braceexpand.braceexpand(part)) if part else []
        # A folder name may hold a comma ("runs/a,b/train-{000000..000003}.tar"): a pattern whose
        # files all exist is taken whole before commas are read as separators.
        if part.startswith("pipe:") or (whole and all(Path(url).is_file() for url in whole)):
            urls.extend(whole)
            continue
        # Split on commas outside braces only: "a-{0,1}.tar,b.tar" is two patterns.
        pieces = re.split(r",(?![^{]*\})", part)
        for piece in pieces:
            if piece.strip():
                urls.extend(braceexpand.braceexpand(piece.strip()))
    if not urls:
        raise InpaintError(f"{spec!r}: no shard URLs", exit_code=2)
    return urls


def _pack_record(folder: Path) -> dict[str, Any]:
    """The shards.json that `inpaint shards` wrote in `folder`; {} when absent or unreadable."""
    try:
        record = json.loads((folder / "shards.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _pack_patterns(folder: Path) -> dict[str, str]:
    """Split -> brace pattern of the shards in a folder `inpaint shards` wrote (its shards.json),
    as paths under `folder`; empty when there is no readable record."""
    splits = _pack_record(folder).get("splits")
    if not isinstance(splits, dict):
        return {}
    return {
        str(split): str(folder / Path(info["pattern"]).name)
        for split, info in splits.items()
        if isinstance(info, dict) and isinstance(info.get("pattern"), str)
    }


def missing_shard_message(url: str, wanted: str = "shard file") -> str:
    """Why a local shard URL names no file (`wanted`: what would have been accepted), with a
    hint for the two usual mistakes."""
    if Path(url).is_dir():
        patterns = _pack_patterns(Path(url))
        if patterns:  # a folder `inpaint shards` wrote: name its shards
            listed = ", ".join(f"{split} '{pattern}'" for split, pattern in patterns.items())
            return f"{url}: is a folder of shards, not a shard file; pass its patterns: {listed}"
        return (
            f"{url}: is a folder, not a shard file; pack it with `inpaint shards {url} OUT` first"
        )
    if any(mark in url for mark in "*?["):  # a shell glob quoted away from the shell
        return (
            f"{url}: no such {wanted} (only brace patterns such as "
            "train-{000000..000009}.tar are expanded, not * ? [ ])"
        )
    return f"{url}: no such {wanted}"


def is_local_shard(url: str) -> bool:
    """Whether a shard URL names a local file, as the loaders check it: `pipe:` runs a command
    and anything with "://" is fetched. Looser than report._is_local_path (what gopen opens as
    a file), which also counts '-' (stdin) and any scheme ("gs:...") as not local."""
    return not url.startswith("pipe:") and "://" not in url


def shard_encoder_record(urls: list[str]) -> dict[str, Any] | None:
    """The text encoder `inpaint shards` recorded in shards.json beside the first local shard:
    the one that made the shards' caption embeddings (None when unknown)."""
    local = [url for url in urls if is_local_shard(url)]
    if not local:
        return None
    record = _pack_record(Path(local[0]).parent).get("text_encoder")
    return record if isinstance(record, dict) else None


def _check_local(urls: list[str]) -> None:
    for url in urls:
        if is_local_shard(url) and not Path(url).is_file():
            raise InpaintError(missing_shard_message(url), exit_code=2)


def _warn(message: str) -> None:
    # Member names come from the shard: escape control characters to keep one line each.
    print(f"warning: {printable(message)}", file=sys.stderr, flush=True)


def _split_member(name: str) -> tuple[str | None, str]:
    # webdataset's convention: the key ends at the first dot of the file's base name.
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


_BLOCK = 512
_REGULAR_FILE = (b"0", b"\0", b"7")
# Links and special files: never followed or read, but the sample they belong to is marked.
_LINK_OR_SPECIAL = {b"1": "a hard link", b"2": "a symlink", b"3": "a device", b"4": "a device",
                    b"6": "a FIFO"}  # fmt: skip
_DECOMPRESSORS = {".gz": "gzip", ".tgz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


def _read_exact(stream, size: int, header: bool = False) -> bytes:
    chunks, missing = [], size
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            break
        chunks.append(chunk)
        missing -= len(chunk)
    data = b"".join(chunks)
    if header and data[:2] == b"\x1f\x8b":  # gzip's magic number where a tar header belongs
        raise tarfile.ReadError("gzip-compressed: name the shard .tar.gz")
    if missing:
        raise tarfile.ReadError("unexpected end of data")
    return data


def _skip(stream, size: int) -> None:
    while size:
        size -= len(_read_exact(stream, min(size, 1 << 20)))


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    records = {}
    for line in data.decode("utf-8", "surrogateescape").split("\n"):
        _, _, record = line.partition(" ")
        key, equals, value = record.partition("=")
        if equals:
            records[key] = value
    return records


def _open_shard(url: str):
    import importlib

    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    module = next((m for ext, m in _DECOMPRESSORS.items() if url.endswith(ext)), None)
    if module is None:
        return stream, stream
    opener = importlib.import_module(module)
    return opener.open(stream, "rb"), stream


def _tar_members(url: str) -> Iterator[tuple[str, bytes | str | None]]:
    """(name, bytes) of each regular file in a tar. Instead of bytes: None for a member over
    MAX_MEMBER_BYTES or one whose suffix no sample uses (both skipped unread), and a string
    naming the kind of a link or special file (never followed).

    A small reader of our own: tarfile parses every header field in Python and made resuming
    (which reads every skipped sample) several times slower. It checks each header's checksum
    and insists on the end-of-archive blocks, so a cut shard is always noticed.
    """
    stream, raw = _open_shard(url)
    long_name, pax = None, {}
    try:
        while True:
            header = _read_exact(stream, _BLOCK, header=True)
            if not header.strip(b"\0"):
                _read_exact(stream, _BLOCK)  # the second zero block: missing in a cut shard
                return
            if _number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
                raise tarfile.ReadError("bad tar header checksum")
            size, kind = _number(header[124:136]), header[156:157]
            padded = -(-size // _BLOCK) * _BLOCK
            if kind in (b"L", b"x"):
                if size > 1 << 20:
                    raise tarfile.ReadError("oversized extended header")
                data = _read_exact(stream, padded)[:size]
                if kind == b"L":
                    long_name = _text(data)
                else:
                    pax = _pax_records(data)
                continue
            name = pax.get("path") or long_name or _text(header[:100])
            if header[257:262] == b"ustar" and not (long_name or "path" in pax):
                prefix = _text(header[345:500])
                name = f"{prefix}/{name}" if prefix else name
            if "size" in pax:
                size = int(pax["size"])
                padded = -(-size // _BLOCK) * _BLOCK
            long_name, pax = None, {}
            if kind in _LINK_OR_SPECIAL:
                _skip(stream, padded)
                yield name, _LINK_OR_SPECIAL[kind]
                continue
            unused = _split_member(name)[1] not in USED_MEMBERS
            if kind not in _REGULAR_FILE or size > MAX_MEMBER_BYTES or unused:
                _skip(stream, padded)
                if kind in _REGULAR_FILE and not unused:
                    yield name, None
                continue
            yield name, _read_exact(stream, padded)[:size]
    finally:
        for handle in {id(stream): stream, id(raw): raw}.values():
            try:
                handle.close()
            except Exception:  # a pipe: command's exit status is reported by the read error
                pass


def read_shard(url: str, stats: dict[str, int], warned: set[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (members grouped by key, bytes undecoded) of one shard.

    A sample with an oversized, duplicated or path-escaping member is yielded marked `__bad__`
    so it still takes its place in the stream. A truncated or unreadable shard ends early.
    """
    current: dict[str, Any] | None = None
    try:
        for name, data in _tar_members(url):
            key, suffix = _split_member(name)
            if key is None:
                continue
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
                if key.startswith("/") or ".." in key.split("/"):
                    current["__bad__"] = "member name leaves the shard (absolute or '..')"
            if data is None:
                current["__bad__"] = f"member {suffix} is over {MAX_MEMBER_BYTES} bytes"
            elif isinstance(data, str):
                current["__bad__"] = f"member {suffix} is {data}, not a file (never followed)"
            elif suffix in current:
                current["__bad__"] = f"duplicate member {suffix}"
            else:
                current[suffix] = data
    except Exception as error:  # tarfile/gzip/pipe raise many types for a damaged shard
        stats["bad_shards"] += 1
        if url not in warned:
            warned.add(url)
            _warn(
                f"{url}: truncated or unreadable shard ({error}); the samples after the "
                "damage are lost"
            )
        return
    if current is not None:
        yield current


def _raw_bytes(sample: dict[str, Any]) -> int:
    return sum(len(value) for value in sample.values() if isinstance(value, bytes))


def shuffle_bounded(
    samples: Iterator[dict[str, Any]],
    rng: random.Random,
    size: int = SHUFFLE_BUFFER,
    initial: int = SHUFFLE_INITIAL,
    max_bytes: int = SHUFFLE_MAX_BYTES,
) -> Iterator[dict[str, Any]]:
    """webdataset's shuffle (the same picks from the same rng, so runs replay as before) with
    the buffer also bounded in bytes: a buffer over `max_bytes` only gives samples out."""
    samples = iter(samples)
    buffer: list[dict[str, Any]] = []
    held = 0

    def pick() -> dict[str, Any]:
        nonlocal held
        k = rng.randint(0, len(buffer) - 1)
        sample = buffer[k]
        buffer[k] = buffer[-1]
        buffer.pop()
        held -= _raw_bytes(sample)
        return sample

    for sample in samples:
        buffer.append(sample)
        held += _raw_bytes(sample)
        if len(buffer) < size and held < max_bytes:
            following = next(samples, None)
            if following is not None:
                buffer.append(following)
                held += _raw_bytes(following)
        if len(buffer) >= min(initial, size) or held >= max_bytes:
            yield pick()
    while buffer:
        yield pick()


def _read_shards(
    sources: Iterable[dict[str, Any]], stats: dict[str, int], warned: set[str]
) -> Iterator[dict[str, Any]]:
    empty_in_a_row = 0
    for source in sources:
        got_any = False
        for sample in read_shard(source["url"], stats, warned):
            got_any = True
            yield sample
        empty_in_a_row = 0 if got_any else empty_in_a_row + 1
        if empty_in_a_row >= _MAX_EMPTY_IN_A_ROW:
            raise InpaintError(f"{source['url']}: no readable samples in the shards", exit_code=1)


def fit_to_resolution(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize the shorter side to `resolution` (bicubic), then centre-crop a square."""
    height, width = image.shape[:2]
    if (height, width) != (resolution, resolution):
        scale = resolution / min(height, width)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        resized = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = np.asarray(resized.crop((left, top, left + resolution, top + resolution)))
    return image


def _recorded_info(raw: dict[str, Any]) -> dict[str, Any]:
    """The json `inpaint shards` records for a sample (source file name, original size, ...),
    or {}: the member is optional and, in a foreign shard, may hold anything."""
    try:
        info = json.loads(raw["json"])
    except (KeyError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return {}
    return info if isinstance(info, dict) else {}


def decode_sample(raw: dict[str, Any], resolution: int, background) -> dict[str, Any]:
    """Decode one raw sample with our handlers; InpaintError names the sample and the problem."""
    name = f"{raw['__url__']} {raw['__key__']}"
    if "__bad__" in raw:
        raise InpaintError(f"{name}: {raw['__bad__']}", exit_code=1)
    ext = next((ext for ext in IMAGE_MEMBERS if ext in raw), None)
    if ext is None:
        raise InpaintError(f"{name}: no image member", exit_code=1)
    image = image_to_rgb_uint8(decode_image(raw[ext], f"{name}.{ext}"), background)
    try:
        caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
    except UnicodeDecodeError:
        raise InpaintError(f"{name}: caption is not UTF-8 text", exit_code=1) from None
    sample = {"key": raw["__key__"], "image": fit_to_resolution(image, resolution)}
    sample["upscaled"] = min(image.shape[:2]) < resolution
    sample["caption"] = caption
    sample["info"] = _recorded_info(raw)
    if "emb.f32" in raw:
        data = raw["emb.f32"]
        embedding = np.frombuffer(data, dtype="<f4") if len(data) % 4 == 0 else None
        if embedding is None or embedding.size == 0 or not np.isfinite(embedding).all():
            raise InpaintError(f"{name}: caption embedding is not finite float32", exit_code=1)
        sample["embedding"] = embedding.astype(np.float32)
    return sample


def _collate(samples: list[dict[str, Any]], masks: list[np.ndarray]) -> dict[str, Any]:
    images = torch.from_numpy(np.stack([sample["image"] for sample in samples]))
    batch = {
        "image": images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous(),
        "mask": torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)),
        "caption": [sample["caption"] for sample in samples],
        "key": [sample["key"] for sample in samples],
        "info": [sample["info"] for sample in samples],
        # keys of images smaller than the resolution, which fit_to_resolution enlarged
        "upscaled": [sample["key"] for sample in samples if sample.get("upscaled")],
    }
    embeddings = [sample.get("embedding") for sample in samples]
    if all(e is not None for e in embeddings) and len({e.shape for e in embeddings}) == 1:
        batch["caption_embedding"] = torch.from_numpy(np.stack(embeddings))
    return batch


def _background(kind: str, rng: np.random.Generator) -> tuple[int, int, int]:
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))  # drawn always: streams stay aligned
    if kind == "random":
        return colour
    return (0, 0, 0) if kind == "black" else (255, 255, 255)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _new_stats() -> dict[str, int]:
    return {"skipped_samples": 0, "bad_shards": 0}


def _take_counts(stats: dict[str, int], sent: dict[str, int]) -> dict[str, int]:
    """What `stats` gained since the last call: counts travel to the main process with batches."""
    delta = {name: stats[name] - sent[name] for name in stats}
    sent.update(stats)
    return delta


class _TrainStream(torch.utils.data.IterableDataset):
    def __init__(
        self,
        urls,
        resolution,
        batch_size,
        seed,
        rank,
        mask_kinds,
        hole_area,
        background,
        start_batch,
    ) -> None:
        super().__init__()
        self.urls, self.resolution, self.batch_size = urls, resolution, batch_size
        self.seed, self.rank, self.mask_kinds = seed, rank, mask_kinds
        self.hole_area, self.background, self.start_batch = hole_area, background, start_batch

    def _windows(self, logical: int, stats, warned) -> Iterator[list[dict[str, Any]]]:
        import webdataset as wds

        pipeline = wds.DataPipeline(
            wds.ResampledShards(
                self.urls,
                seed=stable_seed(self.seed, self.rank, logical, "shards") % 2**31,
                worker_seed=lambda: 0,  # the seed above already names rank and worker
                deterministic=True,
            ),
            lambda sources: _read_shards(sources, stats, warned),
            lambda samples: shuffle_bounded(
                samples,
                random.Random(stable_seed(self.seed, self.rank, logical, "shuffle")),
            ),
        )
        window: list[dict[str, Any]] = []
        for raw in pipeline:
            window.append(raw)
            if len(window) == self.batch_size:
                yield window
                window = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        # DataLoader hands out batches round-robin from worker 0; rotating the roles makes
        # the worker that owns batch `start_batch` go first, so resuming keeps the order.
        logical = (worker + self.start_batch) % workers
        skip = max(0, -(-(self.start_batch - logical) // workers))
        stats, sent, warned, empty_in_a_row = _new_stats(), _new_stats(), set(), 0
        try:
            for index, window in enumerate(self._windows(logical, stats, warned)):
                if index < skip:
                    continue
                batch = self._decode_window(window, index, logical, stats, warned)
                if batch is None:
                    empty_in_a_row += 1
                    if empty_in_a_row >= _MAX_EMPTY_IN_A_ROW:
                        raise InpaintError(f"{self.urls[0]}: no decodable images", exit_code=1)
                    continue
                empty_in_a_row = 0
                batch["_stats"] = _take_counts(stats, sent)
                yield batch
        except InpaintError as error:
            yield {"_error": str(error), "_stats": _take_counts(stats, sent)}

    def _decode_window(self, window, index, logical, stats, warned) -> dict[str, Any] | None:
        slots = []
        for slot, raw in enumerate(window):
            rng = np.random.default_rng(stable_seed(self.seed, self.rank, logical, index, slot))
            kind = self.mask_kinds[int(rng.integers(len(self.mask_kinds)))]
            background = _background(self.background, rng)
            try:
                sample = decode_sample(raw, self.resolution, background)
            except InpaintError as error:
                stats["skipped_samples"] += 1
                if raw["__url__"] + raw["__key__"] not in warned:
                    warned.add(raw["__url__"] + raw["__key__"])
                    _warn(str(error))
                sample = None
            mask = make_mask(kind, self.resolution, self.resolution, rng, self.hole_area)
            slots.append((sample, mask))
        good = [sample for sample, _ in slots if sample is not None]
        if not good:
            return None
        # A corrupt sample's slot takes another sample of the window: batch size and the
        # window arithmetic that makes resuming exact both stay fixed.
        samples = [sample or good[slot % len(good)] for slot, (sample, _) in enumerate(slots)]
        return _collate(samples, [mask for _, mask in slots])


class _EvalStream(torch.utils.data.IterableDataset):
    def __init__(
        self,
        urls,
        resolution,
        batch_size,
        seed,
        rank,
        world_size,
        mask_kind,
        hole_area,
        background,
    ) -> None:
        super().__init__()
        self.urls, self.resolution, self.batch_size = urls, resolution, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.mask_kind, self.hole_area, self.background = mask_kind, hole_area, background

    def _raw_share(self, stats, warned) -> Iterator[dict[str, Any]]:
        worker, workers = _worker()
        unit, units = self.rank * workers + worker, self.world_size * workers
        if len(self.urls) >= units:
            # split_by_node then split_by_worker, with the rank we were given
            for url in self.urls[unit::units]:
                yield from read_shard(url, stats, warned)
            return
        # Fewer shards than processes: everyone reads everything and keeps every units-th.
        sources = ({"url": url} for url in self.urls)
        for position, raw in enumerate(_read_shards(sources, stats, warned)):
            if position % units == unit:
                yield raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stats, sent, warned = _new_stats(), _new_stats(), set()
        samples, masks = [], []
        try:
            for raw in self._raw_share(stats, warned):
                rng = np.random.default_rng(stable_seed(self.seed, "eval", raw["__key__"]))
                background = _background(self.background, rng)
                try:
                    sample = decode_sample(raw, self.resolution, background)
                except InpaintError as error:
                    stats["skipped_samples"] += 1
                    _warn(str(error))
                    continue
                samples.append(sample)
                size = self.resolution
                masks.append(make_mask(self.mask_kind, size, size, rng, self.hole_area))
                if len(samples) == self.batch_size:
                    batch = _collate(samples, masks)
                    batch["_stats"] = _take_counts(stats, sent)
                    samples, masks = [], []
                    yield batch
        except InpaintError as error:
            yield {"_error": str(error), "_stats": _take_counts(stats, sent)}
            return
        if samples:
            batch = _collate(samples, masks)
            batch["_stats"] = _take_counts(stats, sent)
            yield batch
        # Counts after the last batch still reach the main process.
        yield {"key": [], "_stats": _take_counts(stats, sent)}


def init_loader_worker(_worker_id: int) -> None:
    """The `worker_init_fn` of every DataLoader here: the worker leaves Ctrl-C and SIGTERM to
    its parent and is killed when its parent dies (Linux).

    Ctrl-C reaches every process of the terminal's group, and a scheduler's SIGTERM (Slurm's
    time limit, say) every process of the job: a worker that ended there would break its
    parent's loader while the parent finishes its step and checkpoints. PyTorch's own check for
    a dead parent runs between items; a worker blocked writing a full queue never gets there,
    so one orphaned by a kill -9 would hang on, holding the job's stdout open (a script reading
    it would wait forever).
    """
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


def _kill_leftover_workers() -> None:
    # multiprocessing's own exit handler ends daemon children with SIGTERM, then waits for them:
    # a worker ignores SIGTERM (above), so one whose loader was never closed (an exception's
    # traceback can keep it) would make the interpreter wait forever at exit. Registered after
    # that handler (imported above), so it runs before it.
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_leftover_workers)


class ShardLoader:
    """Iterable of batch dicts; `stats` counts skipped samples and bad shards seen so far.

    Counts come from every worker process with its batches, so they are exact in the main
    process (summed over this rank only).
    """

    def __init__(self, dataset: torch.utils.data.IterableDataset, num_workers: int) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self.stats = _new_stats()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            worker_init_fn=init_loader_worker if self.num_workers else None,
        )
        for batch in loader:
            for name, count in batch.pop("_stats").items():
                self.stats[name] += count
                SKIPPED[name] += count
            if "_error" in batch:
                raise InpaintError(batch["_error"], exit_code=1)
            if batch["key"]:
                yield batch


# Process-wide totals over every loader (the per-loader numbers are in ShardLoader.stats).
SKIPPED = _new_stats()


def _check_common(urls, resolution, batch_size, num_workers, hole_area, background) -> list[str]:
    urls = expand_urls(urls)
    _check_local(urls)
    if resolution < 1 or batch_size < 1 or num_workers < 0:
        raise InpaintError("resolution and batch size must be >= 1, workers >= 0", exit_code=2)
    low, high = hole_area
    if not 0.0 < low <= high <= 1.0:
        raise InpaintError(f"hole area {low}-{high}: expected 0 < low <= high <= 1", exit_code=2)
    if background not in BACKGROUNDS:
        raise InpaintError(
            f"--background {background}: expected white, black or random", exit_code=2
        )
    return urls


def train_loader(
    urls: str | list[str],
    resolution: int,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    mask_kinds: tuple[str, ...] = ("center", "box", "stroke"),
    hole_area: tuple[float, float] = (0.1, 0.5),
    background: str = "white",
    start_batch: int = 0,
) -> ShardLoader:
    """Infinite training batches for this rank; batch n is the same whenever it is produced.

    The order depends on (seed, rank, num_workers, batch_size): resume with the same values.
    `world_size` is accepted for symmetry; resampling needs no node split.
    """
    urls = _check_common(urls, resolution, batch_size, num_workers, hole_area, background)
    kinds = tuple(check_kind(kind) for kind in mask_kinds)
    if not kinds or start_batch < 0 or not 0 <= rank < world_size:
        raise InpaintError("need a mask kind, start_batch >= 0 and 0 <= rank < world", exit_code=2)
    stream = _TrainStream(
        urls, resolution, batch_size, seed, rank, kinds, hole_area, background, start_batch
    )
    return ShardLoader(stream, num_workers)


def eval_loader(
    urls: str | list[str],
    resolution: int,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    mask_kind: str = "center",
    hole_area: tuple[float, float] = (0.1, 0.5),
    background: str = "white",
) -> ShardLoader:
    """One exact pass: every readable sample once across ranks x workers, masks fixed per key."""
    urls = _check_common(urls, resolution, batch_size, num_workers, hole_area, background)
    check_kind(mask_kind)
    if not 0 <= rank < world_size:
        raise InpaintError(f"rank {rank} outside world size {world_size}", exit_code=2)
    stream = _EvalStream(
        urls, resolution, batch_size, seed, rank, world_size, mask_kind, hole_area, background
    )
    return ShardLoader(stream, num_workers)
