"""`inpaint eval`: score a model's fills of the hole against the truth and against classical fills.

Two passes over the data: the first scores the model (hole NLL bounds, PSNR/SSIM/L1 of the
temperature-0 fill that `inpaint run` writes by default, of one sample, of the mean of K samples
and of the best of K, diversity) and the baselines; the second,
only with `caption_ablation`, rescores the hole NLL with true, empty and shuffled captions (the
shuffle needs every caption first). Each image's samples come from its own generator seeded
from (seed, key), so results do not depend on the batch size or on the other images.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from inpaint_cli.errors import InpaintError, launched_processes, printable
from inpaint_cli.masks import MASK_KINDS, stable_seed
from inpaint_cli.metrics import PSNR_CAP_DB
from inpaint_cli.run_plan import (
    ONE_FILL_TEMPERATURE,
    SAMPLES_TEMPERATURE,
    check_caption_strength_option,
)

METRICS = ("psnr", "ssim", "l1")
METRIC_LABELS = {"psnr": "hole PSNR (dB)", "ssim": "hole SSIM", "l1": "hole L1"}
# Higher is better for PSNR and SSIM, lower for L1: used to pick the best of K samples.
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "l1": False}
MODEL_ONE = "model, 1 sample"
# What `inpaint run` writes for one fill by default: the prior's mean latents, no noise.
MODEL_ONE_FILL = f"model, fill at T={ONE_FILL_TEMPERATURE:g}"
SHOWN_SAMPLES = 4
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # what data.py reads
REPORT_FILES = {
    "json": "metrics.json",
    "markdown": "metrics.md",
    "figure": "examples.png",
    "html": "index.html",
}
BOUNDS_NOTE = (
    "Both hole NLL figures are upper bounds on the true negative log-likelihood: the negative "
    "ELBO (K=1) and the importance-weighted bound with K samples (tighter)."
)


@dataclass
class EvalOptions:
    """What `inpaint eval` scores and where it writes the report (fields mirror the CLI)."""

    data: str
    model: Path | None = None
    masks: str = "center"
    samples: int = 8
    baselines: bool = False
    caption_ablation: bool = False
    out: Path = Path("report")
    limit: int = 0
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    text_encoder: str | None = None
    caption_strength: float | None = None  # None: the model config's
    # of the K samples, as `inpaint run --samples K` draws them; NLL does not depend on it
    temperature: float = SAMPLES_TEMPERATURE
    hole_area: tuple[float, float] = (0.1, 0.5)
    resize_masks: bool = False  # a --masks folder's mask of another size than its image
    example_rows: int = 6
    bootstrap_resamples: int = 10_000
    progress: bool = True


@dataclass
class EvalItem:
    """One image at the model's resolution with its hole and caption."""

    key: str
    image: np.ndarray  # uint8 RxRx3
    mask: np.ndarray  # bool RxR, True = hole
    caption: str = ""
    caption_embedding: np.ndarray | None = None  # from shards, when they carry one


@dataclass
class _Source:
    """Where the items come from: `items()` can be called again for a second pass."""

    description: str
    items: Callable[[], Iterator[EvalItem]]
    total: int | None
    skipped: Callable[[], int] = lambda: 0
    # The text encoder that made the shards' caption embeddings, when shards.json records it.
    text_encoder: dict[str, Any] | None = None
    # Images with a caption, where known before any image is read (a folder); None for shards.
    captions: int | None = None
    # Truncated or unreadable shards met by the latest pass.
    bad_shards: Callable[[], int] = lambda: 0


@dataclass
class _Scores:
    """Per-image scores, appended in the same image order for every method (paired)."""

    keys: list[str] = field(default_factory=list)
    hole_fraction: list[float] = field(default_factory=list)
    nll_elbo: list[float] = field(default_factory=list)
    nll_iwae: list[float] = field(default_factory=list)
    diversity: list[float] = field(default_factory=list)
    methods: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, method: str, scores: dict[str, float]) -> None:
        table = self.methods.setdefault(method, {metric: [] for metric in METRICS})
        for metric in METRICS:
            table[metric].append(scores[metric])


# ----------------------------------------------------------------------------- small helpers


def _resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InpaintError(f"--device {name}: choose auto, cpu or cuda", exit_code=2)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InpaintError(f"--device {name}: no CUDA device is available", exit_code=2)
    return torch.device(name)


def _load_model(folder: Path | None, device: Any) -> tuple[Any, Path]:
    from model.hvae import HVAE, default_model_path

    path = Path(folder) if folder is not None else default_model_path()
    if folder is None and not (path / "config.json").is_file():
        raise InpaintError(
            f"{path}: the bundled default model is not installed; pass --model FOLDER",
            exit_code=2,
        )
    try:
        model = HVAE.from_pretrained(path, map_location=device)
    except ValueError as error:
        raise InpaintError(str(error), exit_code=2) from None
    return model.eval(), path


def derangement(
    count: int, rng: np.random.Generator, labels: list[str] | None = None
) -> np.ndarray:
    """A random permutation without fixed points; where `labels` are given, also avoids sending
    an index to one with the same label where a swap can fix it."""
    if count < 2:
        raise ValueError("a derangement needs at least two items")
    while True:
        order = rng.permutation(count)
        if not np.any(order == np.arange(count)):
            break
    if labels is None:
        return order
    for index in range(count):
        if labels[order[index]] != labels[index]:
            continue
        for other in rng.permutation(count):
            candidate_here, candidate_there = order[other], order[index]
            if (
                candidate_here != index
                and candidate_there != other
                and labels[candidate_here] != labels[index]
                and labels[candidate_there] != labels[other]
            ):
                order[index], order[other] = candidate_here, candidate_there
                break
    return order


# ----------------------------------------------------------------------------- data


def _fit_to_resolution(
    image: np.ndarray, mask: np.ndarray | None, resolution: int, name: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """The shard loader's resize-and-centre-crop for the image; the same geometry, nearest
    neighbour, for its mask (see _fit_hole)."""
    from inpaint_cli.data import fit_to_resolution

    fitted = fit_to_resolution(image, resolution)
    return fitted, None if mask is None else _fit_hole(mask, resolution, name)


def _fit_hole(mask: np.ndarray, resolution: int, name: str) -> np.ndarray:
    """_fit_mask, refusing a hole that the centre crop cuts away: the mask has a hole, but not
    where eval looks (a mask without any hole is judged later, with every other image)."""
    fitted = _fit_mask(mask, resolution)
    if mask.any() and not fitted.any():
        raise InpaintError(
            f"{name}: the hole lies outside the centred square that eval scores (each image is "
            f"resized to {resolution} px on its short side and centre-cropped), skipped",
            exit_code=1,
        )
    return fitted


def _fit_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A mask of the original image's size through the image's resize and centre crop."""
    from PIL import Image

    height, width = mask.shape
    if (height, width) == (resolution, resolution):
        return mask
    scale = resolution / min(height, width)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    box = (left, top, left + resolution, top + resolution)
    return np.asarray(resized.crop(box)) >= 128


class _MaskFolder:
    """Masks matched exactly as `inpaint run` matches them (run_plan.MaskFinder)."""

    def __init__(self, root: Path, image_files: Iterable[Path] = ()) -> None:
        from inpaint_cli.run_plan import MaskFinder

        self.root = root  # as the user wrote it, for messages
        # Absolute paths on both sides: MaskFinder tells images from masks by path when the
        # mask folder is the data folder (an image is no one's mask, as in `inpaint run`).
        images = frozenset(path.absolute() for path in image_files)
        self.finder = MaskFinder(root.absolute(), image_files=images)

    def load(
        self,
        name: str,
        stem: str,
        width: int,
        height: int,
        fallback: tuple[str, str] = ("", ""),
        resize: bool = True,
    ) -> np.ndarray:
        """The union of the holes of the masks for `name` (an image's relative path or a shard
        key, whose last part is `stem`), else for the `fallback` (name, stem), of width x height:
        resized (nearest) if `resize`, else refused when another size, as `inpaint run` does."""
        from inpaint_cli.images import load_mask

        paths = []
        for each_name, each_stem in ((name, stem), fallback):
            if each_stem and not paths:
                paths = self.finder.find_stem(PurePosixPath(each_name).parent.as_posix(), each_stem)
        if not paths:
            raise InpaintError(f"{name}: no mask found in {self.root}", exit_code=1)
        hole = np.zeros((height, width), dtype=bool)
        for path in paths:
            hole |= load_mask(path, (width, height), resize=resize)
        return hole


class _Warnings:
    """One `warning: ...` line per distinct problem, even when a second pass meets it again."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self.seen:
            self.seen.add(message)
            self.console.print(f"warning: {printable(message)}", markup=False, highlight=False)


def _masks_inside_data(options: EvalOptions) -> Path | None:
    """The --masks folder when it lies inside the --data folder (not the folder itself): its
    files are masks, never images, as `inpaint run` leaves out a MASKS inside IMAGES
    (run_plan.discover). MASKS equal to the data folder needs nothing here: list_images
    already leaves out the `<stem>_mask*.png` masks there. An --out inside --data is refused
    (_check_out), so it never needs leaving out."""
    if options.masks in MASK_KINDS:
        return None
    root, masks = Path(options.data).resolve(), Path(options.masks).resolve()
    return masks if masks != root and masks.is_relative_to(root) else None


def _folder_source(options: EvalOptions, resolution: int, warn: _Warnings) -> _Source:
    from inpaint_cli.images import decode_image, image_to_rgb_uint8
    from inpaint_cli.masks import make_mask
    from inpaint_cli.shards import folder_items

    root = Path(options.data)
    left_out = [0]  # images folder_items leaves out (a caption that is not UTF-8)

    def leave_out(name: str, problem: str) -> None:
        left_out[0] += 1
        warn(f"{name}: {problem}")

    # Read exactly as `inpaint shards` reads a folder: metadata.jsonl/csv, else sidecar .txt.
    sources = folder_items(
        root, "text", None, leave_out, lambda name, problem: warn(f"{name}: {problem}")
    )
    masks_inside = _masks_inside_data(options)
    if masks_inside is not None:
        sources = [s for s in sources if not Path(s.name).resolve().is_relative_to(masks_inside)]
    if not sources:
        raise InpaintError(f"{root}: no images found", exit_code=2)
    image_files = [Path(source.name) for source in sources]
    mask_folder = (
        None if options.masks in MASK_KINDS else _MaskFolder(Path(options.masks), image_files)
    )
    skipped = [0]

    def items() -> Iterator[EvalItem]:
        skipped[0], count = 0, 0
        for source in sources:
            # --limit counts images that decoded (as for shards), so the list is not cut before
            if options.limit and count >= options.limit:
                return
            relative = source.info["source"]
            try:
                image = image_to_rgb_uint8(decode_image(source.read_image(), source.name))
                mask = None
                if mask_folder is not None:
                    stem = PurePosixPath(relative).stem
                    width, height = image.shape[1], image.shape[0]
                    mask = mask_folder.load(
                        relative, stem, width, height, resize=options.resize_masks
                    )
                image, mask = _fit_to_resolution(image, mask, resolution, source.name)
            except InpaintError as error:
                warn(str(error))
                skipped[0] += 1
                continue
            except OSError as error:
                warn(f"{source.name}: cannot read ({error.strerror or error})")
                skipped[0] += 1
                continue
            except MemoryError:
                warn(f"{source.name}: too large to read into memory")
                skipped[0] += 1
                continue
            if mask is None:
                rng = np.random.default_rng(stable_seed(options.seed, relative))
                mask = make_mask(options.masks, resolution, resolution, rng, options.hole_area)
            yield EvalItem(relative, image, mask, source.caption or "")
            count += 1

    total = min(len(sources), options.limit or len(sources))
    source = _Source(str(root), items, total, lambda: left_out[0] + skipped[0])
    source.captions = sum(1 for each in sources if each.caption)
    return source


def _shard_mask(
    mask_folder: _MaskFolder, key: str, info: dict[str, Any], resolution: int
) -> np.ndarray:
    """A shard sample's mask, found by the relative file name `inpaint shards` recorded as its
    `source` (else by the sample's key) and fitted as the image was, from its recorded size."""
    from PIL import Image

    from inpaint_cli.images import IMAGE_EXTENSIONS
    from inpaint_cli.shards import relative_name

    by_key = (key, PurePosixPath(key).name)
    name = relative_name(info.get("source"))
    # Rows of datasets and parquet record "<file> row <n>", not an image's file name.
    is_file_name = name is not None and PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS
    first = (name, PurePosixPath(name).stem) if is_file_name else by_key
    width, height = info.get("width"), info.get("height")
    limit = Image.MAX_IMAGE_PIXELS or 1 << 30
    if not all(isinstance(side, int) and side > 0 for side in (width, height)) or (
        width * height > limit
    ):
        width = height = resolution  # no believable size recorded: the mask spans the square
    return _fit_hole(mask_folder.load(*first, width, height, fallback=by_key), resolution, key)


def _may_be_shard(path: str) -> bool:
    """False for a local file that is no tar, an image say. A damaged `.tar` still counts as a
    shard: the loader reads it as far as it goes and counts it, as for training."""
    try:
        return path.endswith(_SHARD_SUFFIXES) or tarfile.is_tarfile(path)
    except OSError:
        return True  # unreadable: the loader's warning names the problem


def _no_data(url: str) -> InpaintError:
    from inpaint_cli.data import missing_shard_message

    return InpaintError(missing_shard_message(url, "image folder or shard file"), exit_code=2)


def _shard_source(options: EvalOptions, resolution: int, warn: _Warnings) -> _Source:
    from inpaint_cli import data

    try:
        urls = data.expand_urls(options.data)
    except ValueError as error:
        raise InpaintError(f"{options.data}: {error}", exit_code=2) from None
    local = [url for url in urls if data.is_local_shard(url)]
    missing = [url for url in local if not Path(url).is_file()]
    if not urls or missing:
        raise _no_data(missing[0] if missing else options.data)
    for url in local:
        if not _may_be_shard(url):
            raise InpaintError(f"{url}: not a shard (tar file) nor an image folder", exit_code=2)
    generated = options.masks in MASK_KINDS
    mask_folder = None if generated else _MaskFolder(Path(options.masks))
    skipped = [0]
    loaders: list[Any] = []  # the latest pass's loader counts the corrupt samples it skipped

    def items() -> Iterator[EvalItem]:
        skipped[0] = 0
        count = 0
        loader = data.eval_loader(
            urls,
            resolution,
            options.batch_size,
            seed=options.seed,
            mask_kind=options.masks if generated else "center",
            hole_area=options.hole_area,
        )
        loaders.append(loader)
        for batch in loader:
            images = ((batch["image"].numpy() + 1.0) * 127.5).round().clip(0, 255)
            images = images.astype(np.uint8).transpose(0, 2, 3, 1)
            masks = batch["mask"].numpy()[:, 0] > 0.5
            embeddings = batch.get("caption_embedding")
            for index, key in enumerate(batch["key"]):
                mask = masks[index]
                if mask_folder is not None:
                    try:
                        mask = _shard_mask(mask_folder, key, batch["info"][index], resolution)
                    except InpaintError as error:
                        warn(str(error))
                        skipped[0] += 1
                        continue
                embedding = None if embeddings is None else embeddings[index].numpy()
                yield EvalItem(key, images[index], mask, batch["caption"][index], embedding)
                count += 1
                if options.limit and count >= options.limit:
                    return

    def bad_shard_count() -> int:
        return loaders[-1].stats["bad_shards"] if loaders else 0

    def skipped_count() -> int:
        # A damaged shard loses at least the sample it was cut in (the loader's warning says
        # "its last sample is dropped"); the ones after the cut cannot be counted, so it counts
        # one: the report and the exit code must not claim that every image was scored.
        corrupt = loaders[-1].stats["skipped_samples"] if loaders else 0
        return skipped[0] + corrupt + bad_shard_count()

    source = _Source(options.data, items, options.limit or None, skipped_count)
    source.text_encoder = data.shard_encoder_record(urls)
    source.bad_shards = bad_shard_count
    return source


def _open_source(options: EvalOptions, resolution: int, warn: _Warnings) -> _Source:
    if Path(options.data).is_dir():
        return _folder_source(options, resolution, warn)
    looks_like_one_path = not any(mark in options.data for mark in ("{", ",", "::", "pipe:"))
    if looks_like_one_path and "://" not in options.data and not Path(options.data).exists():
        raise _no_data(options.data)
    return _shard_source(options, resolution, warn)


def _batches(items: Iterator[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    batch: list[EvalItem] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- captions


class _CaptionEmbedder:
    """Caption embeddings for the model: the shards' own when present, else the text encoder's
    (built on first need and checked against the encoder the model was trained with); an empty
    caption gets the model's learned empty-caption embedding."""

    def __init__(
        self,
        model: Any,
        encoder_path: str | None,
        device: Any,
        stored_encoder: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.dim = int(model.config.caption_dim)
        self.encoder_path = encoder_path
        self.device = device
        self.encoder: Any = None
        self.sources: set[str] = set()
        # Shard embeddings made by another encoder than the model's would be silently wrong:
        # then every caption is embedded again with the model's own encoder.
        self.use_stored = True
        expected = model.config.text_encoder
        if self.enabled and stored_encoder is not None and expected is not None:
            from conditioning import check_same_encoder

            try:
                check_same_encoder(expected, stored_encoder)
            except ValueError:
                self.use_stored = False
                self.sources.add("shard embeddings ignored (another text encoder)")

    @property
    def enabled(self) -> bool:
        return self.dim > 0

    def _encoder(self) -> Any:
        if self.encoder is None:
            from conditioning import TextEncoder, TextEncoderError, check_encoder_fits

            try:
                encoder = TextEncoder(self.encoder_path)
            except TextEncoderError as error:
                raise InpaintError(str(error), exit_code=2) from None
            try:
                check_encoder_fits(self.model.config.text_encoder, self.dim, encoder.identity())
            except ValueError as error:
                where = self.encoder_path or "default text encoder"
                raise InpaintError(f"{where}: {error}", exit_code=2) from None
            self.encoder = encoder
        return self.encoder

    def embed(
        self, captions: list[str], stored: list[np.ndarray | None] | None = None
    ) -> Any | None:
        """(B, dim) float32 on the model's device, or None for a model without a text path."""
        import torch

        if not self.enabled:
            return None
        rows: list[Any] = [None] * len(captions)
        to_encode = []
        for index, caption in enumerate(captions):
            embedding = None if stored is None or not self.use_stored else stored[index]
            if not caption:
                rows[index] = self.model.empty_caption.detach().float().cpu()
                self.sources.add("learned empty caption")
            elif embedding is not None:
                if embedding.shape != (self.dim,):
                    raise InpaintError(
                        f"shard caption embeddings have shape {embedding.shape}, the model "
                        f"expects ({self.dim},); embed the captions with the model's text encoder",
                        exit_code=2,
                    )
                rows[index] = torch.from_numpy(np.asarray(embedding, dtype=np.float32))
                self.sources.add("shards")
            else:
                to_encode.append(index)
        if to_encode:
            encoded = self._encoder().encode([captions[i] for i in to_encode]).float().cpu()
            for row, index in zip(encoded, to_encode, strict=True):
                rows[index] = row
            self.sources.add(f"text encoder {self.encoder.name}")
        return torch.stack(rows).to(self.device)


# ----------------------------------------------------------------------------- scoring


def _to_uint8(tensor: Any) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    pixels = ((tensor.float() + 1.0) * 127.5).round().clamp(0, 255).to("cpu").numpy()
    return np.moveaxis(pixels.astype(np.uint8), -3, -1)


def score_fill(fill: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Hole PSNR (capped), SSIM and L1 of one fill."""
    from inpaint_cli.metrics import hole_l1, hole_psnr, hole_ssim

    return {
        "psnr": hole_psnr(fill, target, mask, max_db=PSNR_CAP_DB),
        "ssim": hole_ssim(fill, target, mask),
        "l1": hole_l1(fill, target, mask),
    }


def _best_of(sample_scores: list[dict[str, float]]) -> dict[str, float]:
    best = {}
    for metric in METRICS:
        values = [scores[metric] for scores in sample_scores]
        best[metric] = max(values) if HIGHER_IS_BETTER[metric] else min(values)
    return best


def _model_tensors(batch: list[EvalItem], device: Any) -> tuple[Any, Any]:
    import torch

    images = torch.from_numpy(np.stack([item.image for item in batch])).to(device)
    images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    masks = torch.from_numpy(np.stack([item.mask for item in batch])).to(device)
    return images, masks.float()[:, None]


def _seeded_nll(model: Any, images: Any, masks: Any, embedding: Any, k: int, seed: int) -> Any:
    """Hole NLL bound with the global RNG forked and seeded: the same noise for every caption
    condition of a batch (common random numbers make the paired differences less noisy)."""
    import torch

    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        bound = model.hole_nll_bits_per_dim(images, masks, embedding, importance_samples=k)
    return bound.float().cpu().numpy()


@dataclass
class _Example:
    item: EvalItem
    baseline_fills: dict[str, np.ndarray]
    samples: np.ndarray  # (K, R, R, 3) uint8
    std: np.ndarray  # (R, R) per-pixel std across samples, mean over channels, 0..255 scale


def _score_batch(
    batch: list[EvalItem],
    model: Any,
    embedder: _CaptionEmbedder,
    options: EvalOptions,
    device: Any,
    scores: _Scores,
    examples: list[_Example],
) -> None:
    import torch

    from inpaint_cli.baselines import BASELINES
    from inpaint_cli.metrics import hole_diversity

    k = options.samples
    images, masks = _model_tensors(batch, device)
    embedding = embedder.embed(
        [item.caption for item in batch], [item.caption_embedding for item in batch]
    )
    nll_seed = stable_seed(options.seed, "nll", batch[0].key)
    scores.nll_elbo.extend(_seeded_nll(model, images, masks, embedding, 1, nll_seed).tolist())
    if k > 1:
        iwae = _seeded_nll(model, images, masks, embedding, k, nll_seed)
        scores.nll_iwae.extend(iwae.tolist())
    generators = [
        torch.Generator().manual_seed(stable_seed(options.seed, "samples", item.key))
        for item in batch
    ]
    samples = model.inpaint(
        images, masks, embedding, samples=k, temperature=options.temperature, generator=generators
    )
    if options.temperature == ONE_FILL_TEMPERATURE:
        one_fill = samples[:, 0]
    else:
        one_fill = model.inpaint(
            images, masks, embedding, samples=1, temperature=ONE_FILL_TEMPERATURE
        )[:, 0]
    one_fill_uint8 = _to_uint8(one_fill)
    samples_uint8 = _to_uint8(samples)  # (B, K, R, R, 3)
    means_uint8 = _to_uint8(samples.float().mean(1))  # (B, R, R, 3)
    spread = (samples.float().std(1, unbiased=False) * 127.5).mean(1) if k > 1 else None
    for index, item in enumerate(batch):
        scores.keys.append(item.key)
        scores.hole_fraction.append(float(item.mask.mean()))
        sample_scores = [score_fill(s, item.image, item.mask) for s in samples_uint8[index]]
        scores.add(MODEL_ONE_FILL, score_fill(one_fill_uint8[index], item.image, item.mask))
        scores.add(MODEL_ONE, sample_scores[0])
        if k > 1:
            mean_scores = score_fill(means_uint8[index], item.image, item.mask)
            scores.add(f"model, mean of {k}", mean_scores)
            scores.add(f"model, best of {k}", _best_of(sample_scores))
        scores.diversity.append(hole_diversity(samples_uint8[index], item.mask))
        fills = {}
        if options.baselines:
            for name, fill in BASELINES.items():
                fills[name] = fill(item.image, item.mask)
                scores.add(name, score_fill(fills[name], item.image, item.mask))
        if len(examples) < options.example_rows:
            std = (
                np.zeros(item.mask.shape, np.float32)
                if spread is None
                else spread[index].cpu().numpy()
            )
            examples.append(_Example(item, fills, samples_uint8[index], std))


# ----------------------------------------------------------------------------- summaries


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON: they become null."""
    if isinstance(value, float):
        return _finite_or_none(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _interval_dict(interval: Any) -> dict[str, float | None]:
    return {
        "mean": _finite_or_none(interval.mean),
        "low": _finite_or_none(interval.low),
        "high": _finite_or_none(interval.high),
    }


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _summarise(scores: _Scores, options: EvalOptions) -> dict[str, Any]:
    from inpaint_cli.metrics import paired_bootstrap_interval

    k = options.samples
    methods = {
        name: {metric: _mean(values) for metric, values in table.items()}
        for name, table in scores.methods.items()
    }
    comparisons = []
    model_rows = [MODEL_ONE_FILL, MODEL_ONE] + ([f"model, mean of {k}"] if k > 1 else [])
    if options.baselines:
        from inpaint_cli.baselines import BASELINES

        for model_row in model_rows:
            for baseline in BASELINES:
                row: dict[str, Any] = {"model": model_row, "baseline": baseline}
                for metric in METRICS:
                    interval = paired_bootstrap_interval(
                        scores.methods[model_row][metric],
                        scores.methods[baseline][metric],
                        resamples=options.bootstrap_resamples,
                        seed=options.seed,
                    )
                    row[metric] = _interval_dict(interval)
                comparisons.append(row)
    return {
        "nll": {
            "negative_elbo_bits_per_dim": _mean(scores.nll_elbo),
            "iwae_bits_per_dim": _mean(scores.nll_iwae) if scores.nll_iwae else None,
            "importance_samples": k,
            "note": BOUNDS_NOTE,
        },
        "methods": methods,
        # the mean of per-image PSNR is pulled up by exact fills (capped at PSNR_CAP_DB)
        "median_psnr": {
            name: float(np.median(table["psnr"])) for name, table in scores.methods.items()
        },
        "diversity": _mean(scores.diversity) if k > 1 else None,
        "comparisons": comparisons,
        # Per-image figures in image order, so any other comparison can be recomputed.
        "per_image": {
            "keys": scores.keys,
            "hole_fraction": scores.hole_fraction,
            "negative_elbo_bits_per_dim": scores.nll_elbo,
            "iwae_bits_per_dim": scores.nll_iwae or None,
            "diversity": scores.diversity,
            "methods": scores.methods,
        },
    }


def _too_few_captions(options: EvalOptions, found: int) -> InpaintError | None:
    """The problem when the caption ablation cannot be done: shuffling needs two captions."""
    if found >= 2:
        return None
    return InpaintError(
        f"{options.data}: --caption-ablation needs at least two images with captions, "
        f"found {found}",
        exit_code=2,
    )


def _caption_ablation(
    source: _Source,
    model: Any,
    embedder: _CaptionEmbedder,
    options: EvalOptions,
    device: Any,
    captioned: list[tuple[str, str, np.ndarray | None]],
    progress: Any,
) -> dict[str, Any]:
    """Needs at least two captioned images (_too_few_captions)."""
    from inpaint_cli.metrics import paired_bootstrap_interval

    labels = [caption for _, caption, _ in captioned]
    order = derangement(len(captioned), np.random.default_rng(options.seed), labels)
    shuffled = {key: captioned[order[index]][1:] for index, (key, _, _) in enumerate(captioned)}
    same_after_shuffle = sum(labels[i] == labels[order[i]] for i in range(len(labels)))
    k = options.samples
    results: dict[str, list[float]] = {"true": [], "empty": [], "shuffled": []}
    keys, captions = [], []
    task = progress.add_task("caption ablation", total=len(captioned))
    wanted = (item for item in source.items() if item.key in shuffled)
    for batch in _batches(wanted, options.batch_size):
        images, masks = _model_tensors(batch, device)
        true = embedder.embed(
            [item.caption for item in batch], [item.caption_embedding for item in batch]
        )
        other = [shuffled[item.key] for item in batch]
        swapped = embedder.embed([c for c, _ in other], [e for _, e in other])
        keys += [item.key for item in batch]
        captions += [item.caption for item in batch]
        seed = stable_seed(options.seed, "ablation", batch[0].key)
        results["true"].extend(_seeded_nll(model, images, masks, true, k, seed).tolist())
        results["empty"].extend(_seeded_nll(model, images, masks, None, k, seed).tolist())
        results["shuffled"].extend(_seeded_nll(model, images, masks, swapped, k, seed).tolist())
        progress.advance(task, len(batch))

    def gap(first: str, second: str) -> dict[str, float | None]:
        return _interval_dict(
            paired_bootstrap_interval(
                results[first],
                results[second],
                resamples=options.bootstrap_resamples,
                seed=options.seed,
            )
        )

    return {
        "images": len(results["true"]),
        "bound": "negative ELBO" if k == 1 else f"importance-weighted, K={k}",
        "true_bits_per_dim": _mean(results["true"]),
        "empty_bits_per_dim": _mean(results["empty"]),
        "shuffled_bits_per_dim": _mean(results["shuffled"]),
        "empty_minus_true": gap("empty", "true"),
        "shuffled_minus_empty": gap("shuffled", "empty"),
        "shuffled_minus_true": gap("shuffled", "true"),
        "shuffled_with_same_caption": int(same_after_shuffle),
        # per image, so the effect of captions can be sliced by caption or concept
        "per_image": {"keys": keys, "captions": captions, **results},
    }


# ----------------------------------------------------------------------------- report files


def _format(value: float | None, metric: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def _format_interval(interval: dict[str, float | None], metric: str) -> str:
    return (
        f"{_format(interval['mean'], metric)} "
        f"[{_format(interval['low'], metric)}, {_format(interval['high'], metric)}]"
    )


def report_tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows) tables: one source for markdown, HTML and the
    terminal."""
    tables = []
    nll = result["nll"]
    k = nll["importance_samples"]
    nll_rows = [["negative ELBO (K=1)", _format(nll["negative_elbo_bits_per_dim"], "nll")]]
    if nll["iwae_bits_per_dim"] is not None:
        nll_rows.append(
            [f"importance-weighted bound (K={k})", _format(nll["iwae_bits_per_dim"], "nll")]
        )
    tables.append(("Hole NLL (bits/dim, upper bounds)", ["bound", "bits/dim"], nll_rows))
    header = ["method", *(METRIC_LABELS[m] for m in METRICS), "median hole PSNR (dB)"]
    medians = result.get("median_psnr", {})
    rows = [
        [name, *(_format(values[m], m) for m in METRICS), _format(medians.get(name), "psnr")]
        for name, values in result["methods"].items()
    ]
    tables.append(("Scores on the hole (mean over images, and median PSNR)", header, rows))
    if result["diversity"] is not None:
        tables.append(
            (
                "Diversity",
                ["measure", "value"],
                [
                    [
                        f"mean pairwise hole L1 between {k} samples",
                        _format(result["diversity"], "l1"),
                    ]
                ],
            )
        )
    if result["comparisons"]:
        header = ["model", "baseline", *(f"Δ {METRIC_LABELS[m]}" for m in METRICS)]
        rows = [
            [row["model"], row["baseline"], *(_format_interval(row[m], m) for m in METRICS)]
            for row in result["comparisons"]
        ]
        title = (
            "Model minus baseline: mean [paired bootstrap 95% interval]; higher PSNR and SSIM "
            "and lower L1 are better"
        )
        tables.append((title, header, rows))
    ablation = result.get("caption_ablation")
    if ablation:
        rows = [
            ["true caption", _format(ablation["true_bits_per_dim"], "nll")],
            ["empty caption", _format(ablation["empty_bits_per_dim"], "nll")],
            ["shuffled captions", _format(ablation["shuffled_bits_per_dim"], "nll")],
            ["empty − true", _format_interval(ablation["empty_minus_true"], "nll")],
            ["shuffled − empty", _format_interval(ablation["shuffled_minus_empty"], "nll")],
            ["shuffled − true", _format_interval(ablation["shuffled_minus_true"], "nll")],
        ]
        title = (
            f"Caption ablation: hole NLL (bits/dim, {ablation['bound']}; differences with "
            f"paired bootstrap 95% intervals; {ablation['images']} captioned images)"
        )
        tables.append((title, ["captions", "bits/dim"], rows))
    return tables


def _preamble(result: dict[str, Any]) -> list[str]:
    low_high = result.get("hole_area")
    area = f" (hole area {low_high[0]:g}-{low_high[1]:g})" if low_high else ""
    strength = result.get("caption_strength")
    captions = f"; caption strength {strength:g}" if strength is not None else ""
    bad_shards = result.get("bad_shards") or 0
    plural = "s" if bad_shards != 1 else ""
    damaged = f", {bad_shards} truncated or unreadable shard{plural}" if bad_shards else ""
    return [
        f"Model: {result['model']}",
        f"Data: {result['data']} ({result['images']} images at {result['resolution']} px, "
        f"{result['skipped']} skipped{damaged})",
        f"Masks: {result['masks']}{area}; samples per image: {result['samples']} at temperature "
        f"{result['temperature']}{captions}; seed {result['seed']}",
        BOUNDS_NOTE,
        f"PSNR per image is capped at {PSNR_CAP_DB:.0f} dB (an exact fill); SSIM is the map of "
        "the whole image averaged over hole pixels; L1 is a fraction of the 0-255 range.",
    ]


def metrics_markdown(result: dict[str, Any]) -> str:
    lines = ["# inpaint eval", ""]
    lines += [f"- {line}" for line in _preamble(result)]
    for title, header, rows in report_tables(result):
        lines += ["", f"## {title}", ""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "![examples](examples.png)", ""]
    return "\n".join(lines)


def metrics_html(result: dict[str, Any], figure_name: str = "examples.png") -> str:
    """A self-contained page: inline style, the figure by relative path, no external assets."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>inpaint eval</title>',
        "<style>body{font-family:sans-serif;margin:2em;max-width:80em}"
        "table{border-collapse:collapse;margin-bottom:1.5em}"
        "td,th{border:1px solid #aaa;padding:.3em .6em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style>",
        "</head><body><h1>inpaint eval</h1><ul>",
    ]
    parts += [f"<li>{escape(line)}</li>" for line in _preamble(result)]
    parts.append("</ul>")
    for title, header, rows in report_tables(result):
        parts.append(f"<h2>{escape(title)}</h2><table><tr>")
        parts += [f"<th>{escape(cell)}</th>" for cell in header]
        parts.append("</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>")
        parts.append("</table>")
    parts.append(
        f'<h2>Examples</h2><img src="{escape(figure_name)}" alt="rows of examples: masked '
        'input, baselines, samples, uncertainty, ground truth">'
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _masked_view(item: EvalItem) -> np.ndarray:
    # A light checkerboard marks the hole as missing rather than as some colour.
    cell = max(2, item.mask.shape[0] // 16)
    rows, cols = np.indices(item.mask.shape)
    checker = np.where(((rows // cell + cols // cell) % 2)[..., None] == 0, 200, 150)
    return np.where(item.mask[..., None], checker.astype(np.uint8), item.image)


def examples_png(examples: list[_Example]) -> bytes:
    """Rows of examples; columns: masked input, each baseline, samples, uncertainty, truth."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    baselines = list(examples[0].baseline_fills)
    shown = min(SHOWN_SAMPLES, examples[0].samples.shape[0])
    # One colour scale for the whole column, stated in its title, so rows compare.
    vmax = max(float(example.std.max()) for example in examples) or 1.0
    titles = ["masked input", *baselines, *(f"sample {i + 1}" for i in range(shown))]
    titles += [f"uncertainty\n(std 0-{vmax:.0f})", "ground truth"]
    columns, rows = len(titles), len(examples)
    figure = Figure(figsize=(1.2 * columns, 1.2 * rows + 0.45), dpi=100)
    figure.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=1 - 0.45 / (1.2 * rows + 0.45),
        wspace=0.05,
        hspace=0.05,
    )
    axes = figure.subplots(rows, columns, squeeze=False)
    for row, example in enumerate(examples):
        panels = [_masked_view(example.item)]
        panels += [example.baseline_fills[name] for name in baselines]
        panels += list(example.samples[:shown])
        for column, panel in enumerate(panels):
            axes[row, column].imshow(panel, interpolation="nearest")
        axes[row, len(panels)].imshow(
            example.std, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest"
        )
        axes[row, len(panels) + 1].imshow(example.item.image, interpolation="nearest")
        for column, title in enumerate(titles):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title, fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _write_report(result: dict[str, Any], examples: list[_Example], out: Path) -> dict[str, str]:
    from inpaint_cli.images import atomic_write_bytes

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InpaintError(f"{out}: cannot create folder ({error.strerror or error})", 1) from None
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    if examples:
        atomic_write_bytes(paths["figure"], examples_png(examples))
    atomic_write_bytes(paths["markdown"], metrics_markdown(result).encode("utf-8"))
    atomic_write_bytes(paths["html"], metrics_html(result).encode("utf-8"))
    result["files"] = {name: str(path) for name, path in paths.items()}
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(paths["json"], text.encode("utf-8"))
    return result["files"]


def print_summary(result: dict[str, Any], console: Any = None) -> None:
    """The report's tables on the terminal."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    for line in _preamble(result):
        console.print(line, markup=False, highlight=False)
    # Titles, headers and cells are plain text: "[paired bootstrap 95% interval]", "[n/a, n/a]"
    # or a method name in brackets would otherwise be taken for rich markup and vanish.
    for title, header, rows in report_tables(result):
        table = Table(title=escape(title), title_justify="left")
        for index, name in enumerate(header):
            table.add_column(escape(name), justify="left" if index == 0 else "right")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)
    if result.get("files"):
        console.print(f"report: {result['files']['html']}", markup=False, highlight=False)


# ----------------------------------------------------------------------------- the job


def _check_options(options: EvalOptions) -> None:
    if launched_processes() > 1:
        # every process would score every image and write the same report files
        raise InpaintError(
            "inpaint eval runs as one process: run it without accelerate launch or torchrun",
            exit_code=2,
        )
    if options.samples < 1:
        raise InpaintError(f"--samples {options.samples}: must be at least 1", exit_code=2)
    if options.batch_size < 1:
        raise InpaintError(f"--batch-size {options.batch_size}: must be at least 1", exit_code=2)
    if options.limit < 0:
        raise InpaintError(f"--limit {options.limit}: must be 0 or more", exit_code=2)
    if options.caption_strength is not None:
        check_caption_strength_option(options.caption_strength)
    if options.masks not in MASK_KINDS and not Path(options.masks).exists():
        raise InpaintError(
            f"{options.masks}: not a mask kind ({', '.join(MASK_KINDS)}) nor a mask folder or file",
            exit_code=2,
        )


def _holds_a_report(out: Path) -> bool:
    """Whether `out` holds a report of ours (its metrics.json), whose files may be replaced."""
    try:
        record = json.loads((out / REPORT_FILES["json"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"model", "data", "methods", "nll"} <= record.keys()


def _check_out(options: EvalOptions) -> None:
    """Refuse, before any scoring, an --out where the report would replace or mix with the
    user's files: the data or mask folder or a folder inside one (the report's examples.png
    would replace an image there), or a folder holding a file named like a report file that
    no earlier `inpaint eval` wrote. A shard's folder is fine: no shard is named so."""
    from inpaint_cli.images import check_replaceable

    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise InpaintError(f"{out}: is a file, --out must be a folder", exit_code=2)
    inputs = [("--data", Path(options.data))]
    if options.masks not in MASK_KINDS:
        inputs.append(("--masks", Path(options.masks)))
    for option, folder in inputs:
        # as `inpaint shards` refuses an OUT inside SRC (images.make_output_folder)
        if folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
            raise InpaintError(
                f"{out}: --out is or is inside the {option} folder; the report would replace or "
                "mix with its files, choose another folder",
                exit_code=2,
            )
    # Ours or not is decided for the folder (by its metrics.json), not file by file.
    check_replaceable(out, REPORT_FILES.values(), lambda _: _holds_a_report(out), "inpaint eval")


def _check_out_writable(out: Path) -> None:
    """Make --out and write and remove a scratch file there, just before scoring: a folder
    that cannot be written would otherwise fail only when the report is written, after the
    whole scoring pass. Made after the other refusals, so they leave no folder behind."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InpaintError(f"{out}: cannot create folder ({error.strerror or error})", 1) from None
    try:
        handle, scratch = tempfile.mkstemp(prefix=".inpaint-eval-", suffix=".tmp", dir=out)
    except OSError as error:
        raise InpaintError(f"{out}: cannot write ({error.strerror or error})", 1) from None
    os.close(handle)
    Path(scratch).unlink(missing_ok=True)


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Score the model (and optionally the baselines and the caption ablation); write the
    report into `options.out` and return what metrics.json holds."""
    import torch
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    _check_options(options)
    _check_out(options)
    # soft_wrap: one line per warning even when stderr is not a terminal (rich wraps at 80).
    console = Console(stderr=True, soft_wrap=True)
    device = _resolve_device(options.device)
    model, model_path = _load_model(options.model, device)
    resolution = int(model.config.resolution)
    if options.caption_ablation and int(model.config.caption_dim) == 0:
        raise InpaintError(
            f"{model_path}: the model has no text path (trained with --no-captions); "
            "--caption-ablation needs a model trained with captions",
            exit_code=2,
        )
    captions_used = int(model.config.caption_dim) > 0
    if options.caption_strength is not None:
        if not captions_used:
            raise InpaintError(
                f"{model_path}: the model has no text path; --caption-strength needs a model "
                "trained with captions",
                exit_code=2,
            )
        model.config.caption_strength = float(options.caption_strength)
    warn = _Warnings(console)
    if options.text_encoder is not None and not captions_used:
        warn(f"{model_path}: the model has no text path; --text-encoder ignored")
    source = _open_source(options, resolution, warn)
    if options.caption_ablation and source.captions is not None:
        # A folder's captions are known before reading any image: refuse before the work.
        problem = _too_few_captions(options, source.captions)
        if problem is not None:
            raise problem
    _check_out_writable(Path(options.out))
    embedder = _CaptionEmbedder(model, options.text_encoder, device, source.text_encoder)
    scores = _Scores()
    examples: list[_Example] = []
    captioned: list[tuple[str, str, np.ndarray | None]] = []
    empty_holes = 0
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not options.progress,
        transient=False,
    )
    with torch.inference_mode(), progress:
        task = progress.add_task("scoring", total=source.total)
        for batch in _batches(source.items(), options.batch_size):
            with_hole = []
            for item in batch:
                if item.mask.any():
                    with_hole.append(item)
                else:
                    warn(f"{item.key}: the mask has no hole, skipped")
                    empty_holes += 1
            if with_hole:
                _score_batch(with_hole, model, embedder, options, device, scores, examples)
                captioned += [
                    (item.key, item.caption, item.caption_embedding)
                    for item in with_hole
                    if item.caption
                ]
            progress.advance(task, len(batch))
        if not scores.keys:
            raise InpaintError(f"{options.data}: no images with a hole to score", exit_code=1)
        result: dict[str, Any] = {
            "model": str(model_path),
            "data": options.data,
            "images": len(scores.keys),
            "skipped": source.skipped() + empty_holes,
            "bad_shards": source.bad_shards(),
            "resolution": resolution,
            "masks": options.masks,
            "hole_area": list(options.hole_area) if options.masks in ("box", "stroke") else None,
            "samples": options.samples,
            "temperature": options.temperature,
            "caption_strength": model.config.caption_strength if captions_used else None,
            "seed": options.seed,
            "psnr_cap_db": PSNR_CAP_DB,
        }
        result.update(_summarise(scores, options))
        # Shards' captions are known only after the first pass: when too few, that pass's
        # report is still written, then the ablation's problem is reported.
        ablation_problem = (
            _too_few_captions(options, len(captioned)) if options.caption_ablation else None
        )
        if options.caption_ablation and ablation_problem is None:
            result["caption_ablation"] = _caption_ablation(
                source, model, embedder, options, device, captioned, progress
            )
    result["caption_embeddings"] = sorted(embedder.sources)
    files = _write_report(result, examples, Path(options.out))
    if ablation_problem is not None:
        raise InpaintError(
            f"{ablation_problem} (the report without it: {files['html']})", exit_code=2
        )
    return result
