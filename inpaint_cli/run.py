"""`inpaint run`: fill every hole in a folder of images, in batches, resumably.

Planning (files, masks, captions, output names, what is done) happens up front without
decoding pixels (run_plan.py). DataLoader workers decode images and masks and cut square
context windows (windows.py); the main process runs the model on batches of windows drawn
from many images; a thread pool composes and writes the PNGs while the next batch runs.
Under `accelerate launch` every process takes a disjoint share of the sorted file list.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from inpaint_cli import run_plan, windows
from inpaint_cli.errors import InpaintError, printable
from inpaint_cli.images import (
    atomic_write_bytes,
    image_to_rgb_uint8,
    load_image,
    load_mask,
    output_lock,
    save_png_atomic,
)
from inpaint_cli.run_plan import FAILURES_NAME, MANIFEST_NAME, Item

# Under --strict with several processes: made by the one that meets a failure, so that the
# others stop at their next image (all share OUT); removed when the run ends.
STRICT_STOP_NAME = ".inpaint-strict-stop"

# Errors of the output folder itself: every later write would fail too, so the run stops.
FATAL_WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO}
)
SHRINK_WARNING = 4.0
# A hole this large is more often a black-on-white mask than a wish to redraw the image.
INVERTED_MASK_WARNING = 0.75
GRID_ROWS = 64
GRID_CELL = 128


@dataclass
class RunOptions:
    """Options of `inpaint run` (see app.py for their help texts)."""

    images: Path
    masks: Path
    out: Path
    model: Path | None = None
    samples: int = 1
    temperature: float | None = None  # None: run_plan.default_temperature(samples)
    seed: int = 0
    batch_size: int = 16
    device: str = "auto"
    caption: str | None = None
    caption_file: Path | None = None
    caption_strength: float | None = None  # None: the model's config.json value
    resize_masks: bool = False
    dilate: int = 0
    overwrite: bool = False
    save_mask_overlay: bool = False
    save_uncertainty: bool = False
    grid: Path | None = None
    strict: bool = False
    dry_run: bool = False
    json_summary: bool = False
    num_workers: int = 2
    # Local text encoder folder, for caption models trained with another than the default.
    text_encoder: str | None = None

    def __post_init__(self) -> None:
        if self.temperature is None:
            self.temperature = run_plan.default_temperature(self.samples)


class _Log:
    """One line per message on stderr, above the progress bar when there is one."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)

    def line(self, text: str) -> None:
        self.console.print(printable(text), markup=False, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- workers


@dataclass
class Prepared:
    """An image decoded and cut into windows by a DataLoader worker (or its problem)."""

    index: int
    problem: str | None = None
    notes: list[str] = field(default_factory=list)
    mode: str = "RGB"
    base: np.ndarray | None = None
    rgb: np.ndarray | None = None
    mask: np.ndarray | None = None
    windows: list[windows.Window] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    holes: list[np.ndarray] = field(default_factory=list)
    caption: str | None = None
    fingerprint: str = ""  # of the inputs as read (run_plan.input_fingerprint)


def _load_hole_mask(
    item: Item, size: tuple[int, int], options: RunOptions, notes: list[str] | None = None
) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), bool)
    for mask_path in item.masks:
        try:
            mask |= load_mask(mask_path, size, resize=options.resize_masks, notes=notes)
        except InpaintError as error:  # name the image too: that is what the user looks for
            raise InpaintError(f"{item.source}: mask {error}", exit_code=1) from None
    return windows.dilate_mask(mask, options.dilate)


class _PrepareDataset:
    """Map-style dataset: decode one image and its masks and cut its windows."""

    def __init__(
        self, items: list[Item], options: RunOptions, resolution: int, read_sidecars: bool
    ) -> None:
        self.items = items
        self.options = options
        self.resolution = resolution
        self.read_sidecars = read_sidecars

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Prepared:
        item = self.items[index]
        try:
            return self._prepare(index, item)
        except InpaintError as error:
            return Prepared(index, problem=str(error))
        except Exception as error:  # one odd file must not stop the batch
            return Prepared(index, problem=f"{item.source}: {type(error).__name__}: {error}")

    def _prepare(self, index: int, item: Item) -> Prepared:
        if item.problem is not None:
            return Prepared(index, problem=item.problem)
        try:  # before decoding: an input edited meanwhile is filled again by the next run
            fingerprint = run_plan.input_fingerprint(item)
        except OSError:
            fingerprint = ""  # the file's problem is named by load_image or load_mask below
        img = load_image(item.source)
        rgb = image_to_rgb_uint8(img)
        mode, base = windows.output_base(img, rgb)
        mask_notes: list[str] = []
        mask = _load_hole_mask(item, img.size, self.options, mask_notes)
        frames = img.info.get("frames", 1)
        reduced = img.info.get("reduced_from_16_bits", False)
        del img
        prepared = Prepared(
            index,
            mode=mode,
            base=base,
            rgb=rgb,
            mask=mask,
            caption=item.caption,
            fingerprint=fingerprint,
            notes=mask_notes,
        )
        if frames > 1:
            prepared.notes.append(f"note: {item.source}: {frames} frames, the first is filled")
        if reduced:
            prepared.notes.append(
                f"warning: {item.source}: 16 bits per channel, read and written at 8 "
                "(only 16-bit grey stays 16-bit)"
            )
        if prepared.caption is None and item.sidecar is not None and self.read_sidecars:
            try:
                prepared.caption = item.sidecar.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as error:
                return Prepared(index, problem=f"{item.sidecar}: unreadable caption ({error})")
        prepared.windows = windows.hole_windows(mask, self.resolution)
        if not prepared.windows:
            prepared.notes.append(f"note: {item.source}: mask is empty, image copied unchanged")
        for window in prepared.windows:
            crop, hole = windows.crop_window(rgb, mask, window, self.resolution)
            prepared.crops.append(crop)
            prepared.holes.append(hole)
        hole_fraction = float(mask.mean())
        if hole_fraction > INVERTED_MASK_WARNING:
            # The usual cause is a mask drawn black-on-white; the fill goes on as asked.
            prepared.notes.append(
                f"warning: {item.source}: the hole covers {hole_fraction:.0%} of the image "
                "(white = hole); is the mask inverted?"
            )
        shrink = max((w.shrink(self.resolution) for w in prepared.windows), default=1.0)
        if shrink > SHRINK_WARNING:
            prepared.notes.append(
                f"warning: {item.source}: a hole needs a window shrunk {shrink:.1f}x to the "
                f"model's {self.resolution} px; the fill will be soft"
            )
        return prepared


def _first(batch: list[Prepared]) -> Prepared:
    return batch[0]


def window_seed(seed: int, rel: str, window_index: int) -> int:
    """Seed of one window: from the run seed and the image's path, not its batch position."""
    digest = hashlib.sha256(f"{seed}\0{rel}\0{window_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Job:
    item: Item
    prepared: Prepared
    canvases: list[np.ndarray]
    remaining: int
    failed: bool = False


def _write_outputs(job: _Job, options: RunOptions, out: Path, lut: np.ndarray | None) -> None:
    """Compose and write every output of one image; on failure remove what this wrote, so an
    image has all its outputs or none."""
    prepared, named = job.prepared, job.item.outputs(options)
    text = {run_plan.INPUTS_KEY: prepared.fingerprint}
    written: list[Path] = []
    try:
        try:
            (out / job.item.stem).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            message = f"{(out / job.item.stem).parent}: cannot create folder ({error.strerror})"
            raise InpaintError(message, exit_code=1) from error
        for name, canvas in zip(named["samples"], job.canvases, strict=True):
            img = windows.compose_output(prepared.mode, prepared.base, canvas, prepared.mask)
            save_png_atomic(img, out / name, text)
            written.append(out / name)
        if named["uncertainty"] and lut is not None:
            heat = windows.uncertainty_image(prepared.rgb, job.canvases, prepared.mask, lut)
            save_png_atomic(heat, out / named["uncertainty"], text)
            written.append(out / named["uncertainty"])
        if named["overlay"]:
            overlay = windows.overlay_image(prepared.rgb, prepared.mask)
            save_png_atomic(overlay, out / named["overlay"], text)
            written.append(out / named["overlay"])
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _is_fatal(error: BaseException) -> bool:
    cause = error.__cause__ or error.__context__
    return isinstance(cause, OSError) and cause.errno in FATAL_WRITE_ERRNOS


# ----------------------------------------------------------------------------- model side


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} images/s" if speed else "- images/s")


@dataclass
class _Counts:
    done: int = 0
    copied: int = 0
    failed: int = 0
    stopped: bool = False
    failures: list[dict] = field(default_factory=list)


class _Runner:
    """Batches windows across images, runs the model, hands finished images to writers."""

    def __init__(
        self,
        options: RunOptions,
        share: list[Item],
        out: Path,
        model: Any,
        encoder: Any,
        device: Any,
        log: _Log,
        advance: Any,
        stop_marker: Path | None = None,
    ) -> None:
        self.options, self.share, self.out = options, share, out
        self.model, self.encoder, self.device = model, encoder, device
        self.log, self.advance, self.stop_marker = log, advance, stop_marker
        self.counts = _Counts()
        self.queue: deque[tuple[_Job, int]] = deque()
        self.writes: deque[tuple[_Job, Future]] = deque()
        workers = options.num_workers
        self.executor = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
        self.max_writes = 2 * workers + 2  # bounds memory: finished images waiting for disk
        want_heat = options.save_uncertainty and options.samples > 1
        self.lut = windows.heat_lut() if want_heat else None

    def feed(self, prepared: Prepared) -> None:
        item = self.share[prepared.index]
        for note in prepared.notes:
            self.log.line(note)
        if prepared.problem is not None:
            self.fail(item, prepared.problem, remove_outputs=item.problem is None)
            return
        canvases = [prepared.rgb.copy() for _ in range(self.options.samples)]
        job = _Job(item, prepared, canvases, remaining=len(prepared.windows))
        if job.remaining == 0:
            self.counts.copied += 1
            self.submit(job)
            return
        self.queue.extend((job, k) for k in range(job.remaining))
        while len(self.queue) >= self.options.batch_size:
            self.run_batch([self.queue.popleft() for _ in range(self.options.batch_size)])

    def finish(self) -> None:
        while self.queue:
            size = min(self.options.batch_size, len(self.queue))
            self.run_batch([self.queue.popleft() for _ in range(size)])
        while self.writes:
            self.collect_one()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def _caption_embeddings(self, entries: list[tuple[_Job, int]]) -> Any:
        if self.encoder is None:
            return None
        import torch

        captions = [job.prepared.caption or "" for job, _ in entries]
        if not any(captions):
            return None
        encoded = iter(self.encoder.encode([c for c in captions if c]))
        # Images without a caption get the model's learned "no caption" embedding, as in
        # caption dropout during training.
        empty = self.model.empty_caption.detach()
        rows = [next(encoded).to(empty.device) if c else empty for c in captions]
        return torch.stack(rows).to(self.device, torch.float32)

    def run_batch(self, entries: list[tuple[_Job, int]]) -> None:
        import torch

        entries = [(job, k) for job, k in entries if not job.failed]
        if not entries:
            return
        crops = np.stack([job.prepared.crops[k] for job, k in entries])
        holes = np.stack([job.prepared.holes[k] for job, k in entries])
        image = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        mask = torch.from_numpy(holes).to(self.device).float()[:, None]
        generators = [
            torch.Generator().manual_seed(window_seed(self.options.seed, job.item.rel, k))
            for job, k in entries
        ]
        try:
            with torch.inference_mode():
                filled = self.model.inpaint(
                    image,
                    mask,
                    caption_embedding=self._caption_embeddings(entries),
                    samples=self.options.samples,
                    temperature=self.options.temperature,
                    generator=generators,
                )
        except (RuntimeError, ValueError) as error:  # e.g. out of memory: these images fail
            problem = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            for job in dict.fromkeys(job for job, _ in entries):
                job.failed = True
                self.fail(job.item, f"{job.item.source}: the model failed ({problem})")
            return
        values = ((filled.float() + 1) * 127.5).clamp(0, 255).permute(0, 1, 3, 4, 2).cpu().numpy()
        for b, (job, k) in enumerate(entries):
            for s in range(self.options.samples):
                window = job.prepared.windows[k]
                windows.paste_window(job.canvases[s], job.prepared.mask, window, values[b, s])
            job.remaining -= 1
            if job.remaining == 0:
                self.submit(job)

    def submit(self, job: _Job) -> None:
        job.prepared.crops, job.prepared.holes = [], []  # not needed any more: free them
        if self.executor is None:
            self._settle(job, lambda: _write_outputs(job, self.options, self.out, self.lut))
            return
        self.writes.append(
            (job, self.executor.submit(_write_outputs, job, self.options, self.out, self.lut))
        )
        while len(self.writes) > self.max_writes:
            self.collect_one()

    def collect_one(self) -> None:
        job, future = self.writes.popleft()
        self._settle(job, future.result)

    def _settle(self, job: _Job, wait: Any) -> None:
        try:
            wait()
        except InpaintError as error:
            if _is_fatal(error):
                raise InpaintError(
                    f"{error}; stopping: outputs already written are complete, a rerun "
                    "finishes the rest",
                    exit_code=1,
                ) from None
            self.fail(job.item, str(error))
            return
        self.counts.done += 1
        self.advance()

    def fail(self, item: Item, message: str, remove_outputs: bool = True) -> None:
        self.counts.failed += 1
        self.counts.failures.append({"file": item.rel, "error": message})
        self.log.line(f"failed: {message}")
        if remove_outputs:  # stale outputs of an earlier run must not pass for this one's
            for name in item.output_names(self.options):
                (self.out / name).unlink(missing_ok=True)
        self.advance()
        if self.options.strict:
            self.counts.stopped = True
            if self.stop_marker is not None:  # the other processes stop at their next image
                self.stop_marker.touch()


def _choose_device(options: RunOptions, state: Any) -> Any:
    import torch

    if options.device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return state.device if state.device.type == "cuda" else torch.device("cuda")
    if options.device == "cuda":
        raise InpaintError("--device cuda: no CUDA GPU is available here", exit_code=2)
    return torch.device("cpu")


def _load_model(model_dir: Path, device: Any) -> Any:
    from model.hvae import HVAE

    try:
        model = HVAE.from_pretrained(model_dir, map_location="cpu")
    except ValueError as error:
        raise InpaintError(str(error), exit_code=2) from None
    return model.to(device).eval()


def _load_text_encoder(options: RunOptions, config: dict, model_dir: Path, device: Any) -> Any:
    from conditioning import TextEncoder, check_encoder_fits

    try:
        encoder = TextEncoder(options.text_encoder, device=device)
    except (ValueError, OSError) as error:  # TextEncoderError is a ValueError naming the path
        raise InpaintError(str(error), exit_code=2) from None
    try:
        check_encoder_fits(config.get("text_encoder"), config["caption_dim"], encoder.identity())
    except ValueError as error:
        raise InpaintError(f"{model_dir}: {error}", exit_code=2) from None
    return encoder


def _process(
    options: RunOptions,
    share: list[Item],
    out: Path,
    model: Any,
    encoder: Any,
    device: Any,
    log: _Log,
    show_progress: bool,
    stop_marker: Path | None = None,
) -> _Counts:
    """Fill `share`. Under --strict with several processes, `stop_marker` is the file whose
    existence tells every process that one of them met a failure."""
    from torch.utils.data import DataLoader

    from inpaint_cli.data import init_loader_worker

    dataset = _PrepareDataset(share, options, model.config.resolution, encoder is not None)
    loader = DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,
        num_workers=options.num_workers,
        collate_fn=_first,
        prefetch_factor=2 if options.num_workers > 0 else None,
        worker_init_fn=init_loader_worker if options.num_workers > 0 else None,
    )
    progress = Progress(
        TextColumn("filling"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeRemainingColumn(),
        console=log.console,
        disable=not show_progress,
    )
    task = progress.add_task("filling", total=len(share))
    advance = functools.partial(progress.advance, task)
    runner = _Runner(options, share, out, model, encoder, device, log, advance, stop_marker)
    try:
        with progress:
            for prepared in loader:
                if stop_marker is not None and stop_marker.exists():
                    runner.counts.stopped = True
                    break
                runner.feed(prepared)
                if runner.counts.stopped:
                    break
            runner.finish()
    finally:
        runner.close()
    return runner.counts


# ----------------------------------------------------------------------------- after the run


def _write_grid(options: RunOptions, items: list[Item], out: Path, log: _Log) -> Path | None:
    """Contact sheet of the first finished images: input with its hole, then each sample."""
    rows: list[list[Image.Image]] = []
    for item in items:
        names = item.outputs(options)["samples"]
        if item.problem is not None or not all((out / n).is_file() for n in names):
            continue
        try:
            img = load_image(item.source)
            rgb = image_to_rgb_uint8(img)
            hole = _load_hole_mask(item, img.size, options)
            cells = [windows.thumbnail(windows.overlay_image(rgb, hole), GRID_CELL)]
            for name in names:
                sample = Image.fromarray(image_to_rgb_uint8(load_image(out / name)))
                cells.append(windows.thumbnail(sample, GRID_CELL))
        except InpaintError:
            continue
        rows.append(cells)
        if len(rows) == GRID_ROWS:
            log.line(f"note: the grid shows the first {GRID_ROWS} images only")
            break
    if not rows:
        log.line(f"warning: {options.grid}: no finished images, no grid written")
        return None
    sheet = Image.new("RGB", (GRID_CELL * len(rows[0]), GRID_CELL * len(rows)), (255, 255, 255))
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            sheet.paste(cell, (c * GRID_CELL, r * GRID_CELL))
    path = Path(options.grid)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InpaintError(
            f"{path.parent}: cannot create folder ({error.strerror})", exit_code=1
        ) from None
    save_png_atomic(sheet, path)
    return path


def _write_failures(out: Path, name: str, failures: list[dict]) -> None:
    text = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
    atomic_write_bytes(out / name, text.encode("utf-8"))


def _merge_failures(out: Path, world_size: int) -> list[dict]:
    merged = []
    for rank in range(world_size):
        path = out / f"failures.rank{rank}.jsonl"
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            merged.extend(json.loads(line) for line in lines if line.strip())
    merged.sort(key=lambda f: f["file"])
    _write_failures(out, FAILURES_NAME, merged)
    for rank in range(world_size):
        (out / f"failures.rank{rank}.jsonl").unlink(missing_ok=True)
    return merged


def _print_summary(summary: dict, options: RunOptions) -> None:
    if options.json_summary:
        print(json.dumps(summary, ensure_ascii=False))
        return
    text = (
        f"done {summary['done']}, skipped {summary['skipped']}, failed {summary['failed']} "
        f"of {summary['total']} images"
    )
    if not summary.get("dry_run"):
        text += f" in {summary['seconds']:.1f} s ({summary['images_per_second']:.2f} images/s)"
    if summary["copied"]:
        text += f"; {summary['copied']} had an empty mask and were copied unchanged"
    if summary.get("stopped_early"):
        text += "; stopped at the first failure (--strict)"
    if summary["failed"] and not summary.get("dry_run"):
        text += f"; failures listed in {summary['failures_file']}"
    print(text)


def _dry_run(
    options: RunOptions, items: list[Item], done: list[bool], out: Path, is_main: bool
) -> dict:
    plan = []
    for item, finished in zip(items, done, strict=True):
        problem = item.problem
        if not finished and problem is None:
            problem = run_plan.header_problem(item, options)
        action = "skip" if finished else ("fail" if problem else "fill")
        plan.append(
            {
                "file": item.rel,
                "action": action,
                "outputs": [str(out / n) for n in item.output_names(options)],
                "masks": [str(m) for m in item.masks],
                "problem": problem,
            }
        )
    summary = {
        "dry_run": True,
        "done": 0,
        "skipped": sum(p["action"] == "skip" for p in plan),
        "failed": sum(p["action"] == "fail" for p in plan),
        "would_fill": sum(p["action"] == "fill" for p in plan),
        "copied": 0,
        "total": len(items),
        "plan": plan,
    }
    if is_main:
        if not options.json_summary:
            for p in plan:
                detail = p["problem"] if p["problem"] else f"mask {', '.join(p['masks'])}"
                print(printable(f"{p['action']:<5} {p['file']} -> {p['outputs'][0]}  ({detail})"))
        _print_summary(summary, options)
    return summary


def run_folder(options: RunOptions) -> dict:
    """Fill the holes of every image under `options.images` and return the summary
    (done, skipped, failed, copied, total, ...). Bad usage raises InpaintError (exit code 2);
    so does a fault that stops the run, such as a full or read-only output disk (exit code 1).
    A bad input file only fails that file."""
    start = time.perf_counter()
    run_plan.check_options(options)
    images, masks, out = run_plan.check_paths(options)
    model_dir = run_plan.find_model_dir(options)
    config = run_plan.read_model_config(model_dir)
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    # Without cpu=True, Accelerate on a machine without GPUs ignores the launcher's world size.
    state = PartialState(cpu=options.device == "cpu" or not torch.cuda.is_available())
    is_main, rank, world = state.is_main_process, state.process_index, state.num_processes
    log = _Log()
    root, files = run_plan.discover(images, out, masks, log.line if is_main else None)
    items = run_plan.plan(options, root, files, masks, out, log.line if is_main else None)
    run_plan.check_grid(options, items, images, masks, out)

    caption_dim = int(config.get("caption_dim") or 0)
    given = options.caption is not None or options.caption_file is not None
    uses_captions = given or any(item.sidecar is not None for item in items)
    if uses_captions and caption_dim == 0 and is_main:
        log.line(f"warning: {model_dir}: the model was trained without captions; captions ignored")
    captioned = uses_captions and caption_dim > 0
    if caption_dim > 0 and not given and is_main:
        folder = images if images.is_dir() else images.parent
        for name in ("metadata.jsonl", "metadata.csv"):
            if (folder / name).is_file():  # what `inpaint shards` and `inpaint eval` read
                log.line(
                    f"note: {folder / name} is not read by inpaint run on its own; pass "
                    f"--caption-file {folder / name} to fill with its captions"
                )
                break
    if options.save_uncertainty and options.samples == 1 and is_main:
        log.line("warning: --save-uncertainty needs --samples 2 or more; no uncertainty maps")

    for option, value in (("--caption-strength", options.caption_strength),
                          ("--text-encoder", options.text_encoder)):  # fmt: skip
        if value is not None and caption_dim == 0 and is_main:
            log.line(f"warning: {model_dir}: the model has no text path; {option} ignored")
    strength = run_plan.caption_strength(options, config) if captioned else None
    encoder_record = config.get("text_encoder") if captioned else None
    settings = run_plan.output_settings(options, model_dir, encoder_record, strength)
    earlier = run_plan.check_manifest(out, settings, options.overwrite)
    run_plan.check_foreign_files(items, options, out)
    sources = run_plan.input_sources(options, masks)
    same_sources = run_plan.last_sources(earlier) == sources
    redo_all = options.overwrite
    states = [
        "missing"
        if redo_all or item.problem
        else run_plan.output_state(item, options, out, same_sources)
        for item in items
    ]
    done = [state == "done" for state in states]
    changed = [item for item, state in zip(items, states, strict=True) if state == "changed"]
    if changed and is_main:
        log.line(
            f"note: {len(changed)} image(s) changed since their outputs were written (image, "
            f"mask or caption), so they are filled again, e.g. {changed[0].source}"
        )
    if options.dry_run:
        return _dry_run(options, items, done, out, is_main)

    device = _choose_device(options, state)
    model = _load_model(model_dir, device)
    if strength is not None:
        model.config.caption_strength = strength
    encoder = _load_text_encoder(options, config, model_dir, device) if captioned else None
    # every process has judged which outputs are done (from OUT's manifest and files) before
    # the first one changes them: processes that disagree would split different lists
    state.wait_for_everyone()
    with contextlib.ExitStack() as held:
        if is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise InpaintError(
                    f"{out}: cannot create ({error.strerror})", exit_code=1
                ) from None
            # one run per OUT: a second would fill the same images and rewrite the manifest
            held.enter_context(output_lock(out, "run"))
            run_plan.remove_stale_temps(out)
            (out / STRICT_STOP_NAME).unlink(missing_ok=True)  # a killed --strict run's
            # Images filled again lose what earlier runs wrote for them under names this run
            # does not write (an overlay of the old hole); before the manifest that records
            # those runs is replaced.
            redone = items if options.overwrite else changed
            stale = run_plan.stale_outputs(redone, options, out) if redone else []
            for path in stale:
                path.unlink(missing_ok=True)
            if stale:
                log.line(
                    f"removed {len(stale)} output(s) of an earlier run that this run does not "
                    f"write (other --samples or extras), e.g. {stale[0]}"
                )
            record = {
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": str(model_dir),
                "settings": settings,
                "inputs": sources,
                "options": run_plan.options_record(options),
                "world_size": world,
            }
            lines = earlier + [json.dumps(record, ensure_ascii=False)]
            atomic_write_bytes(out / MANIFEST_NAME, ("\n".join(lines) + "\n").encode("utf-8"))
        state.wait_for_everyone()

        pending = [item for item, finished in zip(items, done, strict=True) if not finished]
        stop_marker = out / STRICT_STOP_NAME if options.strict and world > 1 else None
        share = pending[rank::world]  # sorted list, disjoint shares
        show_progress = is_main and log.console.is_terminal
        counts = _process(
            options, share, out, model, encoder, device, log, show_progress, stop_marker
        )
        if world == 1:
            _write_failures(out, FAILURES_NAME, counts.failures)
            totals = [counts]
        else:
            _write_failures(out, f"failures.rank{rank}.jsonl", counts.failures)
            totals = gather_object([counts])  # also a barrier: every rank has written its file
            if is_main:
                _merge_failures(out, world)
                (out / STRICT_STOP_NAME).unlink(missing_ok=True)
        summary = {
            "done": sum(c.done for c in totals),
            "skipped": sum(done),
            "failed": sum(c.failed for c in totals),
            "copied": sum(c.copied for c in totals),
            "total": len(items),
            "seconds": round(time.perf_counter() - start, 3),
            "out": str(out),
            "failures_file": str(out / FAILURES_NAME),
            "world_size": world,
            "stopped_early": any(c.stopped for c in totals),
            "failures": sorted((f for c in totals for f in c.failures), key=lambda f: f["file"]),
        }
        summary["images_per_second"] = round(summary["done"] / max(summary["seconds"], 1e-9), 3)
        grid_error = None
        if is_main:
            if options.grid is not None:
                try:
                    grid = _write_grid(options, items, out, log)
                except InpaintError as error:  # the outputs are done: still print the summary
                    grid, grid_error = None, error
                summary["grid"] = str(grid) if grid else None
            _print_summary(summary, options)
        if world > 1:
            # gloo's threads must stop before the interpreter does, or a rank can abort at exit
            state.wait_for_everyone()
            torch.distributed.destroy_process_group()
        if grid_error is not None:
            raise InpaintError(
                f"{grid_error}; no grid written, the outputs are complete", exit_code=1
            )
        return summary
